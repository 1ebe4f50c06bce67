//! [`BinaryCache`]: one destination, its signing key and compression, and
//! the object operations the uploads are made of (look up, put, put a
//! spooled file, `nix-cache-info`).
//!
//! Objects of up to [`WHOLE_PUT_LIMIT`] bytes go up in one request; larger
//! ones in multipart uploads of [`PART_SIZE`] parts, at most
//! [`PARTS_IN_FLIGHT`] in flight, read from the spool file as they go, so
//! an upload holds a few parts in memory whatever the NAR's size. A
//! `file://` cache gets the same calls: `object_store` writes each object
//! to a staging file and renames it into place, so a reader never sees a
//! partial object.

use std::collections::HashSet;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::{
    Attribute, Attributes, ObjectStore, ObjectStoreExt, PutMultipartOptions, PutOptions,
    PutPayload, WriteMultipart,
};
use sluice_nix::store_path::{StoreDir, StorePath};

use crate::compression::Compression;
use crate::destination::{Destination, DestinationError, Location};
use crate::key::SecretKey;
use crate::retry::RetryPolicy;
use crate::source::NarSource;

/// Objects up to this size are put in one request.
pub const WHOLE_PUT_LIMIT: u64 = 16 << 20;
/// The part size of multipart uploads (S3 wants at least 5 MiB).
pub const PART_SIZE: usize = 8 << 20;
/// Parts of one multipart upload in flight at once.
pub const PARTS_IN_FLIGHT: usize = 2;

/// Paths remembered as present in the cache, so popular dependencies are
/// not looked up again and again: two generations of half this each,
/// about 100 bytes per path.
pub const KNOWN_PATHS: usize = 65_536;

/// Everything a [`BinaryCache`] is made of, besides its store.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub destination: Destination,
    /// Signs every `.narinfo` written; `None`: unsigned (clients then need
    /// `require-sigs = false`).
    pub signing_key: Option<SecretKey>,
    pub compression: Compression,
    /// NARs spooled and uploaded at once.
    pub parallel_uploads: usize,
    /// `.narinfo` lookups in flight at once.
    pub parallel_checks: usize,
    pub retry: RetryPolicy,
    /// Where NARs are spooled (the system's temporary directory if
    /// `None`). It needs room for the largest compressed NARs in flight.
    pub spool_dir: Option<PathBuf>,
    pub store_dir: StoreDir,
}

impl CacheConfig {
    /// Defaults: zstd, unsigned, 4 uploads and 32 lookups at once, the
    /// default [`RetryPolicy`], `/nix/store`.
    pub fn new(destination: Destination) -> CacheConfig {
        CacheConfig {
            destination,
            signing_key: None,
            compression: Compression::default(),
            parallel_uploads: 4,
            parallel_checks: 32,
            retry: RetryPolicy::default(),
            spool_dir: None,
            store_dir: StoreDir::default(),
        }
    }
}

/// One operation on one object of the cache failed.
#[derive(Debug, thiserror::Error)]
#[error("{op} {key} in binary cache {cache}: {source}")]
pub struct CacheError {
    pub op: &'static str,
    pub key: String,
    pub cache: String,
    #[source]
    pub source: object_store::Error,
}

impl CacheError {
    pub fn is_transient(&self) -> bool {
        crate::retry::transient(&self.source)
    }
}

/// Why the cache's `nix-cache-info` could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CacheInfoError {
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(
        "binary cache {cache} is for the store {found} (its nix-cache-info says so), not {ours}"
    )]
    WrongStoreDir {
        cache: String,
        found: String,
        ours: String,
    },
}

/// A binary cache the queue runner uploads to, reading paths from `S`.
/// Cheap to clone; clones share everything.
pub struct BinaryCache<S> {
    pub(crate) inner: Arc<Inner<S>>,
}

impl<S> Clone for BinaryCache<S> {
    fn clone(&self) -> Self {
        BinaryCache {
            inner: self.inner.clone(),
        }
    }
}

impl<S> std::fmt::Debug for BinaryCache<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BinaryCache")
            .field("uri", &self.inner.config.destination.uri)
            .field("compression", &self.inner.config.compression)
            .field(
                "signing_key",
                &self.inner.config.signing_key.as_ref().map(SecretKey::name),
            )
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner<S> {
    pub(crate) config: CacheConfig,
    pub(crate) objects: Arc<dyn ObjectStore>,
    pub(crate) source: S,
    pub(crate) known: KnownPaths,
    cache_info: tokio::sync::OnceCell<()>,
}

impl<S: NarSource> BinaryCache<S> {
    /// Opens the destination (no network IO: see [`Destination::open`]).
    pub fn new(config: CacheConfig, source: S) -> Result<BinaryCache<S>, DestinationError> {
        let objects = config.destination.open()?;
        Ok(Self::with_objects(config, objects, source))
    }

    /// A cache writing into `objects` (which `config.destination` is only
    /// the name of, in messages).
    pub fn with_objects(
        config: CacheConfig,
        objects: Arc<dyn ObjectStore>,
        source: S,
    ) -> BinaryCache<S> {
        BinaryCache {
            inner: Arc::new(Inner {
                config,
                objects,
                source,
                known: KnownPaths::new(KNOWN_PATHS),
                cache_info: tokio::sync::OnceCell::new(),
            }),
        }
    }

    pub fn config(&self) -> &CacheConfig {
        &self.inner.config
    }

    /// Writes `nix-cache-info` if the cache has none, or checks that the
    /// one there is for our store directory. Done once per `BinaryCache`
    /// (a failure is tried again by the next call); every upload calls it
    /// first.
    pub async fn ensure_cache_info(&self) -> Result<(), CacheInfoError> {
        self.inner
            .cache_info
            .get_or_try_init(|| self.write_cache_info())
            .await
            .map(|_| ())
    }

    async fn write_cache_info(&self) -> Result<(), CacheInfoError> {
        let config = &self.inner.config;
        let key = "nix-cache-info";
        let existing = self.get(key).await?;
        let ours = config.store_dir.as_str();
        match existing {
            Some(text) => {
                let text = String::from_utf8_lossy(&text);
                let found = text
                    .lines()
                    .find_map(|l| l.strip_prefix("StoreDir:"))
                    .map(str::trim);
                match found {
                    Some(found) if found != ours => Err(CacheInfoError::WrongStoreDir {
                        cache: config.destination.uri.clone(),
                        found: found.to_owned(),
                        ours: ours.to_owned(),
                    }),
                    _ => Ok(()),
                }
            }
            None => {
                let text = format!(
                    "StoreDir: {ours}\nWantMassQuery: {}\nPriority: {}\n",
                    u8::from(config.destination.want_mass_query),
                    config.destination.priority
                );
                self.put(key, Bytes::from(text), "text/x-nix-cache-info", None)
                    .await?;
                Ok(())
            }
        }
    }

    fn cache_err(&self, op: &'static str, key: &str, source: object_store::Error) -> CacheError {
        CacheError {
            op,
            key: key.to_owned(),
            cache: self.inner.config.destination.uri.clone(),
            source,
        }
    }

    /// Content type and encoding, for S3 only: a local directory keeps
    /// no attributes (`object_store` refuses them there).
    fn attributes(&self, content_type: &'static str, encoding: Option<Compression>) -> Attributes {
        let mut attributes = Attributes::new();
        if matches!(self.inner.config.destination.location, Location::S3(_)) {
            attributes.insert(Attribute::ContentType, content_type.into());
            if let Some(c) = encoding {
                attributes.insert(Attribute::ContentEncoding, c.name().into());
            }
        }
        attributes
    }

    /// Whether the object exists (retried).
    pub(crate) async fn exists(&self, key: &str) -> Result<bool, CacheError> {
        let location = ObjectPath::from(key);
        self.inner
            .config
            .retry
            .run(
                &format!("looking up {key}"),
                CacheError::is_transient,
                || async {
                    match self.inner.objects.head(&location).await {
                        Ok(_) => Ok(true),
                        Err(object_store::Error::NotFound { .. }) => Ok(false),
                        Err(e) => Err(self.cache_err("looking up", key, e)),
                    }
                },
            )
            .await
    }

    /// The object's contents, or `None` if it does not exist (retried).
    async fn get(&self, key: &str) -> Result<Option<Bytes>, CacheError> {
        let location = ObjectPath::from(key);
        self.inner
            .config
            .retry
            .run(
                &format!("reading {key}"),
                CacheError::is_transient,
                || async {
                    let got = match self.inner.objects.get(&location).await {
                        Ok(got) => got,
                        Err(object_store::Error::NotFound { .. }) => return Ok(None),
                        Err(e) => return Err(self.cache_err("reading", key, e)),
                    };
                    got.bytes()
                        .await
                        .map(Some)
                        .map_err(|e| self.cache_err("reading", key, e))
                },
            )
            .await
    }

    /// Puts a small object (retried).
    pub(crate) async fn put(
        &self,
        key: &str,
        data: Bytes,
        content_type: &'static str,
        encoding: Option<Compression>,
    ) -> Result<(), CacheError> {
        let location = ObjectPath::from(key);
        let attributes = self.attributes(content_type, encoding);
        self.inner
            .config
            .retry
            .run(
                &format!("writing {key}"),
                CacheError::is_transient,
                || async {
                    let options = PutOptions {
                        attributes: attributes.clone(),
                        ..PutOptions::default()
                    };
                    self.inner
                        .objects
                        .put_opts(&location, PutPayload::from(data.clone()), options)
                        .await
                        .map(|_| ())
                        .map_err(|e| self.cache_err("writing", key, e))
                },
            )
            .await
    }

    /// Uploads `size` bytes of `file` (a spool) as `key`, retried; each
    /// try reads the file from its start.
    pub(crate) async fn put_file(
        &self,
        key: &str,
        file: Arc<std::fs::File>,
        size: u64,
        content_type: &'static str,
        encoding: Option<Compression>,
    ) -> Result<(), CacheError> {
        let attributes = self.attributes(content_type, encoding);
        self.inner
            .config
            .retry
            .run(
                &format!("uploading {key}"),
                CacheError::is_transient,
                || self.put_file_once(key, file.clone(), size, attributes.clone()),
            )
            .await
    }

    async fn put_file_once(
        &self,
        key: &str,
        file: Arc<std::fs::File>,
        size: u64,
        attributes: Attributes,
    ) -> Result<(), CacheError> {
        let location = ObjectPath::from(key);
        let err = |e| self.cache_err("uploading", key, e);
        if size <= WHOLE_PUT_LIMIT {
            let len = usize::try_from(size).map_err(|_| err(too_big(size)))?;
            let data = read_at(file, 0, len).await.map_err(err)?;
            let options = PutOptions {
                attributes,
                ..PutOptions::default()
            };
            self.inner
                .objects
                .put_opts(&location, PutPayload::from(data), options)
                .await
                .map_err(err)?;
            return Ok(());
        }
        let options = PutMultipartOptions {
            attributes,
            ..PutMultipartOptions::default()
        };
        let upload = self
            .inner
            .objects
            .put_multipart_opts(&location, options)
            .await
            .map_err(err)?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let mut offset = 0u64;
        while offset < size {
            let len = usize::try_from((size - offset).min(PART_SIZE as u64))
                .map_err(|_| err(too_big(size)))?;
            let part = async {
                writer.wait_for_capacity(PARTS_IN_FLIGHT).await?;
                read_at(file.clone(), offset, len).await
            };
            match part.await {
                Ok(data) => writer.put(data),
                Err(e) => {
                    // Leave no half-made upload behind if it can be helped.
                    let _ = writer.abort().await;
                    return Err(err(e));
                }
            }
            offset += len as u64;
        }
        writer.finish().await.map_err(err)?;
        Ok(())
    }
}

fn too_big(size: u64) -> object_store::Error {
    object_store::Error::Generic {
        store: "spool",
        source: format!("{size} bytes do not fit in memory's address space").into(),
    }
}

/// `len` bytes of `file` from `offset`, read on the blocking pool.
async fn read_at(
    file: Arc<std::fs::File>,
    offset: u64,
    len: usize,
) -> Result<Bytes, object_store::Error> {
    let io_err = |e: std::io::Error| object_store::Error::Generic {
        store: "spool",
        source: format!("reading the spooled object: {e}").into(),
    };
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset)?;
        Ok(Bytes::from(buf))
    })
    .await
    .map_err(|e| io_err(std::io::Error::other(e)))?
    .map_err(io_err)
}

/// Paths known to be in the cache (two generations: a bounded set that
/// forgets the oldest half when full).
pub(crate) struct KnownPaths {
    sets: Mutex<[HashSet<StorePath>; 2]>,
    half: usize,
}

impl KnownPaths {
    fn new(bound: usize) -> KnownPaths {
        KnownPaths {
            sets: Mutex::new([HashSet::new(), HashSet::new()]),
            half: (bound / 2).max(1),
        }
    }

    pub(crate) fn contains(&self, path: &StorePath) -> bool {
        let sets = self.sets.lock().unwrap_or_else(|p| p.into_inner());
        sets[0].contains(path) || sets[1].contains(path)
    }

    pub(crate) fn insert(&self, path: StorePath) {
        let mut sets = self.sets.lock().unwrap_or_else(|p| p.into_inner());
        sets[0].insert(path);
        if sets[0].len() >= self.half {
            sets[1] = std::mem::take(&mut sets[0]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_paths_stay_bounded_and_keep_the_newest() {
        let known = KnownPaths::new(4);
        let p =
            |i: usize| StorePath::from_base_name(&format!("{:0>32}-p{i}", i % 10)).expect("a path");
        for i in 0..10 {
            known.insert(p(i));
        }
        assert!(known.contains(&p(9)) && known.contains(&p(8)));
        assert!(!known.contains(&p(0)));
        let sets = known.sets.lock().unwrap_or_else(|p| p.into_inner());
        assert!(sets[0].len() + sets[1].len() <= 4);
    }
}
