//! Where the uploader reads store paths from: the queue runner's store,
//! behind a trait so the uploader holds no daemon connection of its own
//! (the queue runner lends it its pool; tests give it a daemon socket).

use std::future::Future;
use std::sync::Arc;

use sluice_nix::daemon::PathInfo;
use sluice_nix::nar::NarSummary;
use sluice_nix::store_path::StorePath;
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
