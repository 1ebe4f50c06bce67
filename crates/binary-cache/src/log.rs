//! Build logs in the cache, where `nix log` looks for them:
//! `log/<derivation base name>`.
//!
//! Nix reads a log from a `file://` cache as it is, so there it is stored
//! plain. From S3 (and from an HTTP server in front of a bucket) Nix
//! decodes the object by its `Content-Encoding`, so with the URI's
//! `log-compression` the log is stored compressed, with that encoding, as
//! Nix's and Hydra's own uploads do.

use std::path::Path;

use tokio::io::{AsyncRead, AsyncWriteExt};

use sluice_nix::store_path::StorePath;

use crate::cache::{BinaryCache, CacheError, CacheInfoError};
use crate::compression::Compression;
use crate::destination::Location;
use crate::source::NarSource;
use crate::upload::spool_from;

/// Why a build log could not be uploaded.
#[derive(Debug, thiserror::Error)]
pub enum LogUploadError {
    #[error("build log of {0}: not a derivation")]
    NotADerivation(String),
    #[error("reading the build log of {drv}: {source}")]
    Read {
        drv: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    CacheInfo(#[from] CacheInfoError),
}

impl<S: NarSource> BinaryCache<S> {
    /// Uploads the build log of `drv` from `log` (plain text) as
    /// `log/<drv base name>`, replacing any log there. The upload is
    /// retried per the configured policy; reading `log` is not.
    pub async fn upload_log(
        &self,
        drv: &StorePath,
        log: impl AsyncRead + Send + Unpin,
    ) -> Result<(), LogUploadError> {
        let config = &self.inner.config;
        if !drv.is_derivation() {
            return Err(LogUploadError::NotADerivation(config.store_dir.print(drv)));
        }
        self.ensure_cache_info().await?;
        let encoding = match &config.destination.location {
            Location::File(_) => None,
            Location::S3(s3) => s3.log_compression,
        };
        let read_err = |source| LogUploadError::Read {
            drv: config.store_dir.print(drv),
            source,
        };
        let (writer, reader) = tokio::io::duplex(64 << 10);
        let spool = spool_from(
            reader,
            encoding.unwrap_or(Compression::None),
            config.spool_dir.clone(),
        );
        let copy = async move {
            let mut writer = writer;
            let mut log = log;
            let copied = tokio::io::copy(&mut log, &mut writer).await;
            let _ = writer.shutdown().await;
            copied
        };
        let (copied, spooled) = tokio::join!(copy, spool);
        let spooled = spooled.map_err(read_err)?;
        copied.map_err(read_err)?;
        let key = format!("log/{}", drv.base_name());
        self.put_file(
            &key,
            std::sync::Arc::new(spooled.file),
            spooled.file_size,
            "text/plain; charset=utf-8",
            encoding,
        )
        .await?;
        tracing::debug!(%key, bytes = spooled.file_size, "binary cache: build log uploaded");
        Ok(())
    }

    /// [`BinaryCache::upload_log`] from a log file (as the queue runner
    /// keeps them under `build-logs/`).
    pub async fn upload_log_file(
        &self,
        drv: &StorePath,
        file: &Path,
    ) -> Result<(), LogUploadError> {
        let log = tokio::fs::File::open(file)
            .await
            .map_err(|source| LogUploadError::Read {
                drv: self.inner.config.store_dir.print(drv),
                source,
            })?;
        self.upload_log(drv, log).await
    }
}
