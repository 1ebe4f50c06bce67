//! Build logs, where Hydra's web UI looks for them: a plain file at
//! `<dataDir>/build-logs/<first two characters of the drv base name>/<rest
//! of the base name>`, the base name including `.drv`.
//!
//! Invariants: a log path is derived only from a derivation base name made
//! of store-path characters, so it always lies under
//! `<dataDir>/build-logs/`; a [`LogWriter`] never lets its file grow past
//! its limit, and once the limit is reached it writes nothing more.

use std::path::{Path, PathBuf};

use tokio::io::AsyncWriteExt;

/// Why a log could not be placed or written.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error(
        "build log for {drv_path}: not a derivation path (want <store dir>/<hash>-<name>.drv)"
    )]
    BadDrvPath { drv_path: String },
    #[error("build log {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// What became of a chunk given to [`LogWriter::append`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Appended {
    /// All of it is in the file.
    All,
    /// The log reached its limit: the file holds the first bytes up to the
    /// limit and nothing after. The step should fail with status 10 (log
    /// limit exceeded).
    LimitReached,
}

/// Characters of a store path's base name (Nix allows `+-._?=` besides
/// letters and digits, and no leading `.`).
fn is_store_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.' | '_' | '?' | '='))
}

/// The log file of a derivation: `<data_dir>/build-logs/ab/cdef…-name.drv`
/// for `/nix/store/abcdef…-name.drv`.
pub fn log_path(data_dir: &Path, drv_path: &str) -> Result<PathBuf, LogError> {
    let bad = || LogError::BadDrvPath {
        drv_path: drv_path.to_owned(),
    };
    let base = drv_path.rsplit('/').next().unwrap_or(drv_path);
    if !is_store_name(base) || !base.ends_with(".drv") || base.len() <= 2 {
        return Err(bad());
    }
    // The base name is ASCII, so byte 2 is a character boundary.
    let (dir, rest) = base.split_at(2);
    Ok(data_dir.join("build-logs").join(dir).join(rest))
}

/// Appends a running step's log to its file, up to a maximum size.
///
/// The file is truncated when the writer is created, so a new attempt at a
/// step replaces the log of the previous one, as in Hydra.
#[derive(Debug)]
pub struct LogWriter {
    path: PathBuf,
    file: tokio::fs::File,
    written: u64,
    /// Bytes of the agent's log held (see [`LogWriter::append_at`]).
    received: u64,
    max_bytes: u64,
    limit_reached: bool,
}

impl LogWriter {
    /// Creates (or truncates) the log file of `drv_path` under `data_dir`,
    /// creating its directories.
    pub async fn create(data_dir: &Path, drv_path: &str, max_bytes: u64) -> Result<Self, LogError> {
        Self::open(data_dir, drv_path, max_bytes, false).await
    }

    /// Opens the log of `drv_path`: truncated, or (`append`) continued
    /// after what it already holds, which counts against the limit.
    pub async fn open(
        data_dir: &Path,
        drv_path: &str,
        max_bytes: u64,
        append: bool,
    ) -> Result<Self, LogError> {
        let path = log_path(data_dir, drv_path)?;
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|source| LogError::Io {
                    path: path.clone(),
                    what: "creating its directory",
                    source,
                })?;
        }
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(&path)
            .await
            .map_err(|source| LogError::Io {
                path: path.clone(),
                what: "creating",
                source,
            })?;
        let written = if append {
            file.metadata().await.map(|m| m.len()).unwrap_or(0)
        } else {
            0
        };
        Ok(LogWriter {
            path,
            file,
            written,
            received: written,
            max_bytes,
            limit_reached: written >= max_bytes,
        })
    }

    /// Appends the bytes of `chunk`, which starts at `offset` of the
    /// agent's log, that the file does not hold yet: a chunk sent again
    /// after a broken stream is written once. If bytes before `offset`
    /// never arrived, a line says how many were lost.
    pub async fn append_at(&mut self, offset: u64, chunk: &[u8]) -> Result<Appended, LogError> {
        if offset > self.received {
            let note = format!(
                "sluice: {} bytes of build output were lost on the way\n",
                offset - self.received
            );
            self.received = offset;
            if let Appended::LimitReached = self.append(note.as_bytes()).await? {
                return Ok(Appended::LimitReached);
            }
        }
        let skip = usize::try_from(self.received - offset).unwrap_or(usize::MAX);
        let Some(new) = chunk.get(skip..).filter(|new| !new.is_empty()) else {
            return Ok(Appended::All);
        };
        self.received += new.len() as u64;
        self.append(new).await
    }

    /// Appends `chunk`, or as much of it as fits under the limit.
    pub async fn append(&mut self, chunk: &[u8]) -> Result<Appended, LogError> {
        if self.limit_reached {
            return Ok(Appended::LimitReached);
        }
        let room = self.max_bytes.saturating_sub(self.written);
        let fits = usize::try_from(room).map_or(chunk.len(), |room| room.min(chunk.len()));
        let part = chunk.get(..fits).unwrap_or(chunk);
        if !part.is_empty() {
            self.file
                .write_all(part)
                .await
                .map_err(|source| LogError::Io {
                    path: self.path.clone(),
                    what: "writing",
                    source,
                })?;
            self.written += part.len() as u64;
        }
        if part.len() < chunk.len() {
            self.limit_reached = true;
            return Ok(Appended::LimitReached);
        }
        Ok(Appended::All)
    }

    /// Bytes in the file so far.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Whether a chunk has been cut short by the limit.
    pub fn limit_reached(&self) -> bool {
        self.limit_reached
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Flushes and closes the file; returns its path, for `step_finished`.
    pub async fn finish(mut self) -> Result<PathBuf, LogError> {
        self.flush().await?;
        Ok(self.path)
    }

    /// Waits until everything appended so far is in the file (a tokio
    /// file's writes complete in the background).
    pub async fn flush(&mut self) -> Result<(), LogError> {
        self.file.flush().await.map_err(|source| LogError::Io {
            path: self.path.clone(),
            what: "flushing",
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_path_follows_the_contract() {
        let path = log_path(
            Path::new("/var/lib/hydra"),
            "/nix/store/abcdefghijklmnopqrstuvwxyz012345-hello-2.12.drv",
        )
        .expect("a derivation path");
        assert_eq!(
            path,
            Path::new("/var/lib/hydra/build-logs/ab/cdefghijklmnopqrstuvwxyz012345-hello-2.12.drv")
        );
    }

    #[test]
    fn log_path_refuses_what_could_escape_the_log_dir() {
        for bad in [
            "",
            "/nix/store/",
            "/nix/store/x.drv/",
            "/nix/store/..drv",
            "/nix/store/.hidden.drv",
            "/nix/store/abc-hello",
            "/nix/store/abc-he llo.drv",
            "/nix/store/abc-h\u{e9}llo.drv",
            "..",
        ] {
            assert!(log_path(Path::new("/d"), bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn chunks_sent_again_are_written_once_and_a_gap_is_noted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let drv = "/nix/store/abcdefghijklmnopqrstuvwxyz012345-x.drv";
        let mut log = LogWriter::create(dir.path(), drv, 1000)
            .await
            .expect("create");
        log.append_at(0, b"one\ntwo\n").await.expect("append");
        // The stream broke after that; the agent sends it all again.
        log.append_at(0, b"one\ntwo\nthree\n")
            .await
            .expect("append");
        log.append_at(4, b"two\n").await.expect("append");
        // Bytes 14..20 never arrived.
        log.append_at(20, b"five\n").await.expect("append");
        let path = log.finish().await.expect("finish");
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            "one\ntwo\nthree\nsluice: 6 bytes of build output were lost on the way\nfive\n"
        );

        // A queue runner that restarted goes on after what the file holds.
        let mut log = LogWriter::open(dir.path(), drv, 1000, true)
            .await
            .expect("reopen");
        let held = std::fs::metadata(&path).expect("size").len();
        log.append_at(held - 5, b"five\nsix\n")
            .await
            .expect("append");
        log.finish().await.expect("finish");
        assert!(std::fs::read_to_string(&path)
            .expect("read")
            .ends_with("\nfive\nsix\n"));
    }

    #[tokio::test]
    async fn writer_appends_and_stops_at_the_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let drv = "/nix/store/abcdefghijklmnopqrstuvwxyz012345-x.drv";
        let mut log = LogWriter::create(dir.path(), drv, 10)
            .await
            .expect("create");
        assert_eq!(log.append(b"hello ").await.expect("append"), Appended::All);
        assert_eq!(
            log.append(b"world!").await.expect("append"),
            Appended::LimitReached
        );
        assert_eq!(
            log.append(b"more").await.expect("append"),
            Appended::LimitReached
        );
        assert_eq!(log.bytes_written(), 10);
        let path = log.finish().await.expect("finish");
        assert_eq!(path, log_path(dir.path(), drv).expect("path"));
        assert_eq!(std::fs::read(&path).expect("read"), b"hello worl");

        // A new attempt replaces the old log.
        let mut log = LogWriter::create(dir.path(), drv, 100)
            .await
            .expect("create");
        assert_eq!(log.append(b"again").await.expect("append"), Appended::All);
        let path = log.finish().await.expect("finish");
        assert_eq!(std::fs::read(&path).expect("read"), b"again");
    }

    #[tokio::test]
    async fn exactly_filling_the_limit_is_not_exceeding_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let drv = "/nix/store/abcdefghijklmnopqrstuvwxyz012345-x.drv";
        let mut log = LogWriter::create(dir.path(), drv, 4).await.expect("create");
        assert_eq!(log.append(b"abcd").await.expect("append"), Appended::All);
        assert_eq!(log.append(b"").await.expect("append"), Appended::All);
        assert!(!log.limit_reached());
        assert_eq!(
            log.append(b"e").await.expect("append"),
            Appended::LimitReached
        );
    }
}
