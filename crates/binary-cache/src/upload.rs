//! Uploading store paths with their closures: [`BinaryCache::upload_closure`].
//!
//! 1. What is missing: from the roots, level by level, each path not known
//!    to be in the cache has its `.narinfo` looked up (up to
//!    `parallel_checks` at once); a path that is there is taken with its
//!    closure, one that is not is read from the store and its references
//!    are looked at next.
//! 2. Each missing path's NAR is exported from the store, compressed into
//!    a spool file while its `FileHash` is computed, checked against the
//!    store's NAR hash and size, and uploaded unless an object of the same
//!    file hash is there (up to `parallel_uploads` at once, dependencies
//!    first).
//! 3. A path's `.narinfo` is written (signed) once its NAR is uploaded and
//!    the `.narinfo`s of all its references are.
//!
//! Invariant (the cache's): a `.narinfo` is written only after its NAR
//! and the `.narinfo`s of its whole closure, so a client never finds a
//! path whose NAR or references are missing. Step 1 relies on it: a
//! path's `.narinfo` stands for its closure.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures::stream::{FuturesUnordered, StreamExt};
use sluice_nix::daemon::PathInfo;
use sluice_nix::hash::Hash;
use sluice_nix::store_path::StorePath;
use tokio::io::AsyncWriteExt;

use crate::cache::{BinaryCache, CacheError, CacheInfoError};
use crate::compression::{Compression, Spool, Spooled};
use crate::narinfo::{nar_key, narinfo_key, NarInfo};
use crate::source::{NarSource, SourceError};

/// Path infos asked of the store at once.
const INFO_BATCH: usize = 512;

/// The pipe between the store's NAR and the compressor.
const PIPE_BYTES: usize = 256 << 10;

/// What an upload did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UploadReport {
    /// `.narinfo` lookups made.
    pub checked: usize,
    /// Paths found in the cache (looked up, or remembered from an earlier
    /// upload); their closures were not looked at.
    pub present: usize,
    /// Paths uploaded, in the order their `.narinfo`s were written
    /// (dependencies before dependents).
    pub uploaded: Vec<StorePath>,
    /// NARs not uploaded because the cache had an identical one.
    pub nars_reused: usize,
    /// Uncompressed and compressed bytes of the NARs uploaded.
    pub nar_bytes: u64,
    pub file_bytes: u64,
}

/// Why an upload failed. Whatever was written before the failure is
/// complete and consistent (see the module's invariant); calling again
/// uploads the rest.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("reading {path} from the store: {source}")]
    Source {
        path: String,
        #[source]
        source: SourceError,
    },
    #[error("the NAR of {path} read from the store is {got}, {got_size} bytes, but the store records {expected}, {expected_size} bytes")]
    Corrupt {
        path: String,
        expected: String,
        expected_size: u64,
        got: String,
        got_size: u64,
    },
    #[error("compressing the NAR of {path} into a spool file: {source}")]
    Spool {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    CacheInfo(#[from] CacheInfoError),
}

impl UploadError {
    /// Whether trying again later may succeed (the store or the cache
    /// was unreachable, a disk was full) rather than never (a path is
    /// missing or corrupt, the cache is for another store).
    pub fn is_transient(&self) -> bool {
        match self {
            UploadError::Source { source, .. } => matches!(source, SourceError::Failed(_)),
            UploadError::Corrupt { .. } => false,
            UploadError::Spool { .. } => true,
            UploadError::Cache(e) => e.is_transient(),
            UploadError::CacheInfo(CacheInfoError::Cache(e)) => e.is_transient(),
            UploadError::CacheInfo(CacheInfoError::WrongStoreDir { .. }) => false,
        }
    }
}

type Job<'a> = Pin<Box<dyn Future<Output = Done> + Send + 'a>>;

enum Done {
    Nar(usize, Result<(NarInfo, bool), UploadError>),
    NarInfo(usize, Result<(), UploadError>),
}

impl<S: NarSource> BinaryCache<S> {
    /// Uploads `roots` and their closures, minus what the cache has, to
    /// the cache; returns what it did. See the module documentation for
    /// the order. Transient failures are retried per the configured
    /// [`crate::RetryPolicy`]; past it the error is returned, and a later
    /// call carries on where this one stopped.
    pub async fn upload_closure(
        &self,
        roots: impl IntoIterator<Item = StorePath>,
    ) -> Result<UploadReport, UploadError> {
        self.ensure_cache_info().await?;
        let mut report = UploadReport::default();
        let missing = self.missing(roots, &mut report).await?;
        let order = dependencies_first(missing);
        self.upload_in_order(order, &mut report).await?;
        tracing::info!(
            cache = %self.inner.config.destination,
            uploaded = report.uploaded.len(),
            present = report.present,
            checked = report.checked,
            nar_bytes = report.nar_bytes,
            file_bytes = report.file_bytes,
            "binary cache: upload done"
        );
        Ok(report)
    }

    /// The paths of the closure of `roots` that the cache lacks, with
    /// their infos.
    async fn missing(
        &self,
        roots: impl IntoIterator<Item = StorePath>,
        report: &mut UploadReport,
    ) -> Result<HashMap<StorePath, Arc<PathInfo>>, UploadError> {
        let inner = &self.inner;
        let mut seen: HashSet<StorePath> = HashSet::new();
        let mut frontier: Vec<StorePath> = roots
            .into_iter()
            .filter(|p| seen.insert(p.clone()))
            .collect();
        let mut missing = HashMap::new();
        while !frontier.is_empty() {
            let (known, unknown): (Vec<StorePath>, Vec<StorePath>) =
                frontier.drain(..).partition(|p| inner.known.contains(p));
            report.present += known.len();
            report.checked += unknown.len();
            // Owned keys: a closure over borrowed paths makes the future
            // fail to be `Send` (rustc's higher-ranked lifetime limits).
            let keys: Vec<String> = unknown.iter().map(narinfo_key).collect();
            let looked_up: Vec<Result<bool, CacheError>> = futures::stream::iter(keys)
                .map(|key| async move { self.exists(&key).await })
                .buffered(inner.config.parallel_checks.max(1))
                .collect()
                .await;
            let mut absent = Vec::new();
            for (path, present) in unknown.into_iter().zip(looked_up) {
                if present? {
                    report.present += 1;
                    inner.known.insert(path);
                } else {
                    absent.push(path);
                }
            }
            for batch in absent.chunks(INFO_BATCH) {
                for info in self.path_infos(batch).await? {
                    for r in &info.references {
                        if seen.insert(r.clone()) {
                            frontier.push(r.clone());
                        }
                    }
                    missing.insert(info.path.clone(), info);
                }
            }
        }
        Ok(missing)
    }

    async fn path_infos(&self, batch: &[StorePath]) -> Result<Vec<Arc<PathInfo>>, UploadError> {
        let dir = &self.inner.config.store_dir;
        self.inner
            .config
            .retry
            .run(
                "reading path infos",
                |e: &SourceError| matches!(e, SourceError::Failed(_)),
                || self.inner.source.path_infos(batch),
            )
            .await
            .map_err(|source| UploadError::Source {
                path: batch.first().map(|p| dir.print(p)).unwrap_or_default(),
                source,
            })
    }

    /// Uploads NARs in `order` (dependencies first), and each `.narinfo`
    /// once its NAR and its references' `.narinfo`s are up. On a failure
    /// nothing new is started; what is in flight finishes (its
    /// `.narinfo`s are written if they may be) and the first error is
    /// returned.
    async fn upload_in_order(
        &self,
        order: Vec<Arc<PathInfo>>,
        report: &mut UploadReport,
    ) -> Result<(), UploadError> {
        let index: HashMap<&StorePath, usize> = order
            .iter()
            .enumerate()
            .map(|(i, info)| (&info.path, i))
            .collect();
        // For each path, its references still without a `.narinfo`, and
        // the paths that wait for it.
        let mut waiting: Vec<usize> = vec![0; order.len()];
        let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); order.len()];
        for (i, info) in order.iter().enumerate() {
            for r in &info.references {
                if let Some(&j) = index.get(r) {
                    if j != i {
                        waiting[i] += 1;
                        dependents[j].push(i);
                    }
                }
            }
        }
        let mut prepared: Vec<Option<NarInfo>> = vec![None; order.len()];
        let mut jobs: FuturesUnordered<Job<'_>> = FuturesUnordered::new();
        let mut next = 0;
        let mut nars_running = 0;
        let mut failure: Option<UploadError> = None;
        let parallel = self.inner.config.parallel_uploads.max(1);
        loop {
            while failure.is_none() && nars_running < parallel && next < order.len() {
                let i = next;
                let info = order[i].clone();
                jobs.push(Box::pin(async move {
                    Done::Nar(i, self.upload_nar(&info).await)
                }));
                next += 1;
                nars_running += 1;
            }
            let Some(done) = jobs.next().await else { break };
            let ready: Vec<usize> = match done {
                Done::Nar(i, Ok((narinfo, reused))) => {
                    nars_running -= 1;
                    if reused {
                        report.nars_reused += 1;
                    } else {
                        report.nar_bytes += narinfo.nar_size;
                        report.file_bytes += narinfo.file_size;
                    }
                    prepared[i] = Some(narinfo);
                    if waiting[i] == 0 {
                        vec![i]
                    } else {
                        Vec::new()
                    }
                }
                Done::Nar(_, Err(e)) => {
                    nars_running -= 1;
                    failure.get_or_insert(e);
                    Vec::new()
                }
                Done::NarInfo(i, Ok(())) => {
                    let path = order[i].path.clone();
                    self.inner.known.insert(path.clone());
                    report.uploaded.push(path);
                    let mut ready = Vec::new();
                    for &d in &dependents[i] {
                        waiting[d] -= 1;
                        if waiting[d] == 0 && prepared[d].is_some() {
                            ready.push(d);
                        }
                    }
                    ready
                }
                Done::NarInfo(_, Err(e)) => {
                    failure.get_or_insert(e);
                    Vec::new()
                }
            };
            for i in ready {
                if let Some(narinfo) = prepared[i].take() {
                    jobs.push(Box::pin(async move {
                        Done::NarInfo(i, self.write_narinfo(narinfo).await)
                    }));
                }
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Signs and writes a `.narinfo`.
    async fn write_narinfo(&self, mut narinfo: NarInfo) -> Result<(), UploadError> {
        let config = &self.inner.config;
        if let Some(key) = &config.signing_key {
            narinfo.sign(&config.store_dir, key);
        }
        let text = narinfo.render(&config.store_dir);
        self.put(
            &narinfo_key(&narinfo.path),
            bytes::Bytes::from(text),
            "text/x-nix-narinfo",
            None,
        )
        .await?;
        tracing::debug!(
            path = %config.store_dir.print(&narinfo.path),
            "binary cache: .narinfo written"
        );
        Ok(())
    }

    /// Spools and uploads one path's NAR; returns its `.narinfo` (not yet
    /// signed) and whether an identical NAR was there already.
    async fn upload_nar(&self, info: &PathInfo) -> Result<(NarInfo, bool), UploadError> {
        let config = &self.inner.config;
        let spooled = config
            .retry
            .run("exporting a NAR", UploadError::is_transient, || {
                self.spool_nar(info)
            })
            .await?;
        let key = nar_key(&spooled.file_hash, config.compression);
        let reused = self.exists(&key).await?;
        if !reused {
            self.put_file(
                &key,
                Arc::new(spooled.file),
                spooled.file_size,
                "application/x-nix-nar",
                None,
            )
            .await?;
        }
        let mut sigs: Vec<String> = info.sigs.iter().cloned().collect();
        sigs.sort();
        Ok((
            NarInfo {
                path: info.path.clone(),
                url: key,
                compression: config.compression,
                file_hash: spooled.file_hash,
                file_size: spooled.file_size,
                nar_hash: info.nar_hash,
                nar_size: info.nar_size,
                references: info.references.clone(),
                deriver: info.deriver.clone(),
                sigs,
                ca: info.ca.clone(),
            },
            reused,
        ))
    }

    /// Exports the NAR of `info`'s path from the store into a compressed
    /// spool file, and checks it against the store's hash and size.
    async fn spool_nar(&self, info: &PathInfo) -> Result<Spooled, UploadError> {
        let config = &self.inner.config;
        let printed = config.store_dir.print(&info.path);
        let (writer, reader) = tokio::io::duplex(PIPE_BYTES);
        let spool = spool_from(reader, config.compression, config.spool_dir.clone());
        let export = async move {
            let mut writer = writer;
            let result = self.inner.source.nar(&info.path, &mut writer).await;
            // Ends the spool's input whatever happened; on failure the
            // spool is thrown away below.
            let _ = writer.shutdown().await;
            result
        };
        let (exported, spooled) = tokio::join!(export, spool);
        let spooled = match (exported, spooled) {
            // A spool that failed first breaks the pipe: its error is the cause.
            (_, Err(source)) => {
                return Err(UploadError::Spool {
                    path: printed,
                    source,
                })
            }
            (Err(source), Ok(_)) => {
                return Err(UploadError::Source {
                    path: printed,
                    source,
                })
            }
            (Ok(summary), Ok(spooled)) => {
                if summary.nar_hash != info.nar_hash || summary.nar_size != info.nar_size {
                    return Err(UploadError::Corrupt {
                        path: printed,
                        expected: show(&info.nar_hash),
                        expected_size: info.nar_size,
                        got: show(&summary.nar_hash),
                        got_size: summary.nar_size,
                    });
                }
                spooled
            }
        };
        Ok(spooled)
    }
}

fn show(hash: &Hash) -> String {
    hash.format(sluice_nix::hash::Base::Nix32, true)
}

/// Compresses what `reader` gives into a spool file, on the blocking pool.
pub(crate) async fn spool_from(
    reader: tokio::io::DuplexStream,
    compression: Compression,
    dir: Option<std::path::PathBuf>,
) -> std::io::Result<Spooled> {
    // The bridge takes the runtime's handle: made here, used there.
    let mut input = tokio_util::io::SyncIoBridge::new(reader);
    tokio::task::spawn_blocking(move || {
        let mut spool = Spool::new(compression, dir.as_deref())?;
        std::io::copy(&mut input, &mut spool)?;
        spool.finish()
    })
    .await
    .map_err(std::io::Error::other)?
}

/// `missing` in dependency order: every path after the paths it refers
/// to (self-references aside), ties broken by path so the order does not
/// depend on hashing.
fn dependencies_first(missing: HashMap<StorePath, Arc<PathInfo>>) -> Vec<Arc<PathInfo>> {
    let mut pending: BTreeMap<StorePath, Arc<PathInfo>> = missing.into_iter().collect();
    let mut blocked_by: BTreeMap<StorePath, usize> = BTreeMap::new();
    let mut unblocks: HashMap<StorePath, Vec<StorePath>> = HashMap::new();
    for (path, info) in &pending {
        let refs = info
            .references
            .iter()
            .filter(|r| *r != path && pending.contains_key(*r));
        let mut n = 0;
        for r in refs {
            n += 1;
            unblocks.entry(r.clone()).or_default().push(path.clone());
        }
        blocked_by.insert(path.clone(), n);
    }
    let mut ready: std::collections::BTreeSet<StorePath> = blocked_by
        .iter()
        .filter(|(_, n)| **n == 0)
        .map(|(p, _)| p.clone())
        .collect();
    let mut order = Vec::with_capacity(pending.len());
    while let Some(path) = ready.pop_first() {
        if let Some(info) = pending.remove(&path) {
            order.push(info);
        }
        for d in unblocks.remove(&path).unwrap_or_default() {
            if let Some(n) = blocked_by.get_mut(&d) {
                *n -= 1;
                if *n == 0 {
                    ready.insert(d);
                }
            }
        }
    }
    // A reference cycle cannot occur in a store; were there one, its
    // paths go last rather than never.
    order.extend(pending.into_values());
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(name: &str) -> StorePath {
        StorePath::from_base_name(&format!("{:0>32}-{name}", name.len())).expect("path")
    }

    fn info(name: &str, refs: &[&str]) -> (StorePath, Arc<PathInfo>) {
        let mut i = PathInfo::new(path(name), Hash::sha256(name.as_bytes()), 1);
        i.references = refs.iter().map(|r| path(r)).collect();
        (i.path.clone(), Arc::new(i))
    }

    #[test]
    fn dependencies_come_first_and_self_references_do_not_block() {
        let missing: HashMap<_, _> = [
            info("top", &["mid", "leaf", "top", "elsewhere"]),
            info("mid", &["leaf"]),
            info("leaf", &["leaf"]),
        ]
        .into_iter()
        .collect();
        let order: Vec<String> = dependencies_first(missing)
            .iter()
            .map(|i| i.path.name().to_owned())
            .collect();
        assert_eq!(order, ["leaf", "mid", "top"]);
    }
}
