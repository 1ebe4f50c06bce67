//! Where the uploader reads store paths from: the queue runner's store,
//! behind a trait so the uploader holds no daemon connection of its own
//! (the queue runner lends it its pool; tests give it a daemon socket,
//! [`DaemonNarSource`]).
//!
//! [`daemon_path_infos`] and [`daemon_nar`] are a source's two reads over
//! one daemon connection, however the source comes by it, so every source
//! reports a path the store lacks, or a failed read, the same way.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use sluice_nix::daemon::{DaemonClient, PathInfo};
use sluice_nix::nar::NarSummary;
use sluice_nix::store_path::{StoreDir, StorePath};
use tokio::io::AsyncWrite;

/// Why the store could not give a path.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The path is not valid in the store: asking again will not help.
    #[error("{0} is not valid in the store")]
    Missing(String),
    /// Anything else (a connection lost, the daemon failed): worth another
    /// try.
    #[error("{0}")]
    Failed(String),
}

/// A Nix store the uploader reads path infos and NARs from.
pub trait NarSource: Send + Sync + 'static {
    /// The path infos of `paths`, in the same order; [`SourceError::Missing`]
    /// if one is not valid.
    fn path_infos(
        &self,
        paths: &[StorePath],
    ) -> impl Future<Output = Result<Vec<Arc<PathInfo>>, SourceError>> + Send;

    /// Writes the NAR of `path` into `sink`, returning its hash and size.
    fn nar(
        &self,
        path: &StorePath,
        sink: &mut (dyn AsyncWrite + Send + Unpin),
    ) -> impl Future<Output = Result<NarSummary, SourceError>> + Send;
}

/// The path infos of `paths` from the store behind `client`, in the same
/// order, in one pipelined round trip; [`SourceError::Missing`] for the
/// first one that is not valid.
pub async fn daemon_path_infos(
    client: &mut DaemonClient,
    paths: &[StorePath],
) -> Result<Vec<PathInfo>, SourceError> {
    let infos = client
        .query_path_infos(paths)
        .await
        .map_err(|e| SourceError::Failed(e.to_string()))?;
    paths
        .iter()
        .zip(infos)
        .map(|(path, info)| {
            info.ok_or_else(|| SourceError::Missing(StoreDir::default().print(path)))
        })
        .collect()
}

/// Writes the NAR of `path`, from the store behind `client`, into `sink`.
pub async fn daemon_nar(
    client: &mut DaemonClient,
    path: &StorePath,
    sink: &mut (dyn AsyncWrite + Send + Unpin),
) -> Result<NarSummary, SourceError> {
    client
        .nar_from_path(path, sink)
        .await
        .map_err(|e| SourceError::Failed(e.to_string()))
}

/// The store a `nix-daemon` serves at a socket, read through a connection
/// of its own per call: no pool, no cache.
#[derive(Debug, Clone)]
pub struct DaemonNarSource {
    socket: PathBuf,
}

impl DaemonNarSource {
    pub fn new(socket: impl Into<PathBuf>) -> DaemonNarSource {
        DaemonNarSource {
            socket: socket.into(),
        }
    }

    async fn client(&self) -> Result<DaemonClient, SourceError> {
        DaemonClient::connect(&self.socket)
            .await
            .map_err(|e| SourceError::Failed(e.to_string()))
    }
}

impl NarSource for DaemonNarSource {
    async fn path_infos(&self, paths: &[StorePath]) -> Result<Vec<Arc<PathInfo>>, SourceError> {
        let mut client = self.client().await?;
        let infos = daemon_path_infos(&mut client, paths).await?;
        Ok(infos.into_iter().map(Arc::new).collect())
    }

    async fn nar(
        &self,
        path: &StorePath,
        sink: &mut (dyn AsyncWrite + Send + Unpin),
    ) -> Result<NarSummary, SourceError> {
        let mut client = self.client().await?;
        daemon_nar(&mut client, path, sink).await
    }
}
