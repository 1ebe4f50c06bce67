//! The NAR restorer: writes [`NarEvent`]s to the filesystem, recreating the
//! archived tree at a target path that must not exist yet.
//!
//! Files are created with mode 0666 (0777 when executable), directories with
//! 0777, both less the umask, as Nix's own restorer does; the store then
//! canonicalises them.
//!
//! Invariants: nothing is written outside the target. Entry names from the
//! decoder never contain `/` and are never `.` or `..`, and everything is
//! created with "must not exist" semantics, so an archive cannot reach
//! through a symlink it created or overwrite an existing file. Memory is one
//! write buffer and the current path.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::decode::{FeedError, NarDecoder, NarError, NarEvent};
use super::hashing::{NarHasher, NarSummary};

/// Why writing an event to the filesystem failed.
#[derive(Debug, Error)]
pub enum NarRestoreError {
    #[error("restoring NAR: {op} '{path}' failed: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("restoring NAR: event {event} out of order")]
    OutOfOrder { event: &'static str },
}

/// Why restoring an archive from a reader failed.
#[derive(Debug, Error)]
pub enum RestoreError {
    #[error(transparent)]
    Nar(#[from] NarError),
    #[error(transparent)]
    Restore(#[from] NarRestoreError),
    #[error("restoring NAR: reading the archive failed: {0}")]
    Read(#[source] io::Error),
    #[error("restoring NAR: {extra} bytes follow the end of the archive")]
    TrailingData { extra: usize },
}

impl From<FeedError<NarRestoreError>> for RestoreError {
    fn from(e: FeedError<NarRestoreError>) -> Self {
        match e {
            FeedError::Nar(e) => RestoreError::Nar(e),
            FeedError::Sink(e) => RestoreError::Restore(e),
        }
    }
}

/// Applies events in archive order to the filesystem.
#[derive(Debug)]
pub struct NarRestorer {
    /// Path of the node the next node event creates (or of the open file).
    current: PathBuf,
    file: Option<BufWriter<File>>,
    /// The root node has been created.
    started: bool,
}

impl NarRestorer {
    /// A restorer creating the archive's root node at `target`.
    pub fn new(target: impl Into<PathBuf>) -> Self {
        NarRestorer {
            current: target.into(),
            file: None,
            started: false,
        }
    }

    fn io_error(&self, op: &'static str) -> impl FnOnce(io::Error) -> NarRestoreError + '_ {
        move |source| NarRestoreError::Io {
            op,
            path: self.current.clone(),
            source,
        }
    }

    fn start_node(&mut self, event: &'static str) -> Result<(), NarRestoreError> {
        if self.file.is_some() {
            return Err(NarRestoreError::OutOfOrder { event });
        }
        self.started = true;
        Ok(())
    }

    pub fn apply(&mut self, event: NarEvent<'_>) -> Result<(), NarRestoreError> {
        match event {
            NarEvent::File { executable, .. } => {
                self.start_node("File")?;
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(if executable { 0o777 } else { 0o666 })
                    .open(&self.current)
                    .map_err(self.io_error("creating file"))?;
                self.file = Some(BufWriter::with_capacity(64 * 1024, file));
            }
            NarEvent::Contents(bytes) => {
                let Some(file) = &mut self.file else {
                    return Err(NarRestoreError::OutOfOrder { event: "Contents" });
                };
                if let Err(source) = file.write_all(bytes) {
                    return Err(self.io_error("writing")(source));
                }
            }
            NarEvent::FileEnd => {
                let Some(file) = self.file.take() else {
                    return Err(NarRestoreError::OutOfOrder { event: "FileEnd" });
                };
                if let Err(e) = file.into_inner() {
                    return Err(self.io_error("writing")(e.into_error()));
                }
            }
            NarEvent::Symlink { target } => {
                self.start_node("Symlink")?;
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target), &self.current)
                    .map_err(self.io_error("creating symlink"))?;
            }
            NarEvent::Directory => {
                self.start_node("Directory")?;
                std::fs::create_dir(&self.current).map_err(self.io_error("creating directory"))?;
            }
            NarEvent::Entry { name } => {
                if self.file.is_some() || !self.started {
                    return Err(NarRestoreError::OutOfOrder { event: "Entry" });
                }
                self.current.push(std::ffi::OsStr::from_bytes(name));
            }
            NarEvent::EntryEnd => {
                if self.file.is_some() || !self.current.pop() {
                    return Err(NarRestoreError::OutOfOrder { event: "EntryEnd" });
                }
            }
            NarEvent::DirectoryEnd => {
                if self.file.is_some() {
                    return Err(NarRestoreError::OutOfOrder {
                        event: "DirectoryEnd",
                    });
                }
            }
        }
        Ok(())
    }
}

/// Restores the NAR read from `reader` at `target`, returning the archive's
/// hash and size. The reader must hold exactly one archive.
pub fn restore_path(mut reader: impl Read, target: &Path) -> Result<NarSummary, RestoreError> {
    let mut decoder = NarDecoder::new();
    let mut restorer = NarRestorer::new(target);
    let mut hasher = NarHasher::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(RestoreError::Read(e)),
        };
        let used = decoder.feed(&buf[..n], |ev| restorer.apply(ev))?;
        hasher.update(&buf[..used]);
        if used < n {
            return Err(RestoreError::TrailingData { extra: n - used });
        }
    }
    decoder.finish()?;
    Ok(hasher.summary())
}
