//! The queue runner's binary cache uploader: `sluice-binary-cache`'s
//! [`BinaryCache`] reading from the queue runner's own store.
//!
//! [`StoreNarSource`] lends the uploader a pool of store connections of
//! its own (a sibling of the driver's, sharing its path-info cache), so
//! uploads never take the connections dispatch or agents' transfers need.
//! [`read_signing_key`] and [`open`] build the [`Uploader`] `service`
//! holds from the configuration.
//!
//! The uploader's interface, as the driver's build-finish path uses it
//! (`driver/upload.rs`):
//! [`BinaryCache::upload_closure`] with a step's output paths (it uploads
//! their closures minus what the cache has; dependencies' `.narinfo`s
//! first, so the cache is consistent whenever it stops), and
//! [`BinaryCache::upload_log_file`] with the step's `.drv` and its log
//! file. Both retry transient failures a few times and then return the
//! error; [`sluice_binary_cache::UploadError::is_transient`] says whether
//! calling again later can help.

#[cfg(test)]
use std::path::Path;
use std::sync::Arc;

use sluice_binary_cache::{BinaryCache, CacheConfig, NarSource, SecretKey, SourceError};
use sluice_nix::daemon::PathInfo;
use sluice_nix::nar::NarSummary;
use sluice_nix::store_path::{StoreDir, StorePath};
use tokio::io::AsyncWrite;

use crate::config::BinaryCacheConfig;
use crate::grpc::LocalStore;

/// Store connections the uploader has, at most: one per NAR uploaded at
/// once, and one for path infos.
pub const UPLOAD_CONNECTIONS: usize = PARALLEL_UPLOADS + 1;

/// NARs exported, compressed and uploaded at once.
pub const PARALLEL_UPLOADS: usize = 4;

/// The uploader `serve` runs with.
pub type Uploader = BinaryCache<StoreNarSource>;

/// Reads the configured signing key file, if any: `serve` does it first
/// thing, so a missing or malformed file stops the start-up at once.
pub fn read_signing_key(
    config: &BinaryCacheConfig,
) -> Result<Option<SecretKey>, sluice_binary_cache::KeyError> {
    config
        .signing_key_file
        .as_deref()
        .map(SecretKey::from_file)
        .transpose()
}

/// The uploader for `config`, signing with `signing_key` (from
/// [`read_signing_key`]), reading from `store`. No network IO.
pub fn open(
    config: &BinaryCacheConfig,
    signing_key: Option<SecretKey>,
    store: LocalStore,
) -> Result<Uploader, sluice_binary_cache::DestinationError> {
    let mut cache = CacheConfig::new(config.destination.clone());
    cache.signing_key = signing_key;
    cache.compression = config.compression;
    cache.parallel_uploads = PARALLEL_UPLOADS;
    BinaryCache::new(cache, StoreNarSource { store })
}

/// The queue runner's store as the uploader reads it.
#[derive(Debug, Clone)]
pub struct StoreNarSource {
    store: LocalStore,
}

impl StoreNarSource {
    pub fn new(store: LocalStore) -> StoreNarSource {
        StoreNarSource { store }
    }

    async fn client(&self) -> Result<crate::grpc::store::PooledClient, SourceError> {
        self.store
            .client()
            .await
            .map_err(|e| SourceError::Failed(e.to_string()))
    }
}

impl NarSource for StoreNarSource {
    /// From the pool's path-info cache where it can, the rest in one
    /// pipelined round trip.
    async fn path_infos(&self, paths: &[StorePath]) -> Result<Vec<Arc<PathInfo>>, SourceError> {
        let cache = self.store.path_infos();
        let mut found: std::collections::HashMap<StorePath, Arc<PathInfo>> =
            std::collections::HashMap::with_capacity(paths.len());
        let misses = cache.lookup(paths, |info| {
            found.insert(info.path.clone(), info);
        });
        if !misses.is_empty() {
            let mut client = self.client().await?;
            let infos = sluice_binary_cache::daemon_path_infos(&mut client, &misses).await?;
            let mut fresh = Vec::with_capacity(infos.len());
            for info in infos {
                let info = Arc::new(info);
                fresh.push((info.path.clone(), info.clone()));
                found.insert(info.path.clone(), info);
            }
            cache.insert(fresh);
        }
        paths
            .iter()
            .map(|p| {
                found
                    .get(p)
                    .cloned()
                    .ok_or_else(|| SourceError::Missing(StoreDir::default().print(p)))
            })
            .collect()
    }

    async fn nar(
        &self,
        path: &StorePath,
        sink: &mut (dyn AsyncWrite + Send + Unpin),
    ) -> Result<NarSummary, SourceError> {
        let mut client = self.client().await?;
        sluice_binary_cache::daemon_nar(&mut client, path, sink).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpc::StoreConnection;

    fn spawnable<F: std::future::Future + Send + 'static>(_: &F) {}

    /// The driver runs uploads in tasks of their own, with a clone
    /// of the uploader: the futures must be `Send + 'static` then.
    #[test]
    fn uploads_can_run_in_tasks_of_their_own() {
        let dir = std::env::temp_dir().join(format!("sluice-spawnable-{}", std::process::id()));
        let config = BinaryCacheConfig {
            destination: format!("file://{}", dir.display())
                .parse()
                .expect("a file URI"),
            signing_key_file: None,
            compression: sluice_binary_cache::Compression::Zstd,
        };
        let store = LocalStore::new(StoreConnection::Socket("/nonexistent".into()), 1);
        let uploader = open(&config, None, store).expect("opens");
        let path =
            StorePath::from_base_name("00000000000000000000000000000000-x.drv").expect("a path");
        let (up, paths) = (uploader.clone(), vec![path.clone()]);
        spawnable(&async move { up.upload_closure(paths).await });
        let up = uploader.clone();
        spawnable(&async move { up.upload_log_file(&path, Path::new("/x")).await });
        let _ = std::fs::remove_dir(&dir);
    }
}
