//! The NAR encoder: serialises a filesystem path as `nix-store --dump` does,
//! as a pull stream ([`std::io::Read`]).
//!
//! Regular files are executable when their owner-execute bit is set (like
//! Nix); directory entries are emitted sorted by the bytes of their names.
//! Sockets, FIFOs and devices cannot be archived.
//!
//! Invariants: memory is bounded by one directory listing per open level
//! and a few small buffers; file contents go straight from the file into
//! the caller's buffer. A file is archived with the size `lstat` reported
//! when it was reached: if it shrinks meanwhile that is an error, if it
//! grows the extra bytes are left out (again like Nix).

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::hashing::{HashingWriter, NarSummary};
use super::{padding, put_str, NAR_MAGIC};

/// Why a path could not be archived.
#[derive(Debug, Error)]
pub enum NarEncodeError {
    #[error("archiving '{path}': {op} failed: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("archiving '{path}': it is neither a regular file, a directory nor a symlink")]
    UnsupportedFileType { path: PathBuf },
    #[error("archiving '{path}': the file shrank while it was being read")]
    FileShrank { path: PathBuf },
    #[error("writing the NAR of '{path}' failed: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A directory being archived: its path and its remaining entries.
struct OpenDir {
    path: PathBuf,
    entries: std::vec::IntoIter<OsString>,
}

/// A regular file whose contents are being copied.
struct OpenFile {
    file: File,
    path: PathBuf,
    size: u64,
    remaining: u64,
}

/// Pull-based NAR serialiser of one filesystem path.
pub struct NarEncoder {
    root: Option<PathBuf>,
    /// Archive bytes produced but not yet read.
    pending: Vec<u8>,
    pending_pos: usize,
    dirs: Vec<OpenDir>,
    file: Option<OpenFile>,
    finished: bool,
}

impl NarEncoder {
    /// An encoder for `path`; nothing is read until the first `read`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        NarEncoder {
            root: Some(path.into()),
            pending: Vec::with_capacity(512),
            pending_pos: 0,
            dirs: Vec::new(),
            file: None,
            finished: false,
        }
    }

    /// Fills `buf` with the next archive bytes; 0 only at the end.
    pub fn read_chunk(&mut self, buf: &mut [u8]) -> Result<usize, NarEncodeError> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.pending_pos < self.pending.len() {
                let n = (self.pending.len() - self.pending_pos).min(buf.len());
                buf[..n].copy_from_slice(&self.pending[self.pending_pos..self.pending_pos + n]);
                self.pending_pos += n;
                if self.pending_pos == self.pending.len() {
                    self.pending.clear();
                    self.pending_pos = 0;
                }
                return Ok(n);
            }
            if let Some(open) = &mut self.file {
                let want = usize::try_from(open.remaining)
                    .unwrap_or(usize::MAX)
                    .min(buf.len());
                let n = loop {
                    match open.file.read(&mut buf[..want]) {
                        Ok(n) => break n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(source) => {
                            return Err(NarEncodeError::Io {
                                op: "read",
                                path: open.path.clone(),
                                source,
                            })
                        }
                    }
                };
                if n == 0 {
                    return Err(NarEncodeError::FileShrank {
                        path: open.path.clone(),
                    });
                }
                open.remaining -= n as u64;
                if open.remaining == 0 {
                    let size = open.size;
                    self.file = None;
                    self.pending.extend_from_slice(&[0u8; 8][..padding(size)]);
                    put_str(&mut self.pending, b")");
                    self.node_finished();
                }
                return Ok(n);
            }
            if self.finished {
                return Ok(0);
            }
            self.advance()?;
        }
    }

    /// Produces the next piece of structure into `pending`, or opens a file.
    fn advance(&mut self) -> Result<(), NarEncodeError> {
        if let Some(root) = self.root.take() {
            put_str(&mut self.pending, NAR_MAGIC.as_bytes());
            return self.start_node(root);
        }
        let Some(dir) = self.dirs.last_mut() else {
            self.finished = true;
            return Ok(());
        };
        match dir.entries.next() {
            Some(name) => {
                let child = dir.path.join(&name);
                for s in [&b"entry"[..], b"(", b"name", name.as_bytes(), b"node"] {
                    put_str(&mut self.pending, s);
                }
                self.start_node(child)
            }
            None => {
                self.dirs.pop();
                put_str(&mut self.pending, b")");
                self.node_finished();
                Ok(())
            }
        }
    }

    /// A node ended: close the entry holding it, or finish the archive.
    fn node_finished(&mut self) {
        if self.dirs.is_empty() {
            self.finished = true;
        } else {
            put_str(&mut self.pending, b")");
        }
    }

    fn start_node(&mut self, path: PathBuf) -> Result<(), NarEncodeError> {
        let io_err = |op, path: &Path| {
            let path = path.to_owned();
            move |source| NarEncodeError::Io { op, path, source }
        };
        let meta = std::fs::symlink_metadata(&path).map_err(io_err("lstat", &path))?;
        put_str(&mut self.pending, b"(");
        put_str(&mut self.pending, b"type");
        let kind = meta.file_type();
        if kind.is_file() {
            put_str(&mut self.pending, b"regular");
            if meta.permissions().mode() & 0o100 != 0 {
                put_str(&mut self.pending, b"executable");
                put_str(&mut self.pending, b"");
            }
            put_str(&mut self.pending, b"contents");
            let size = meta.len();
            self.pending.extend_from_slice(&size.to_le_bytes());
            if size == 0 {
                put_str(&mut self.pending, b")");
                self.node_finished();
            } else {
                let file = File::open(&path).map_err(io_err("open", &path))?;
                self.file = Some(OpenFile {
                    file,
                    path,
                    size,
                    remaining: size,
                });
            }
        } else if kind.is_symlink() {
            let target = std::fs::read_link(&path).map_err(io_err("readlink", &path))?;
            put_str(&mut self.pending, b"symlink");
            put_str(&mut self.pending, b"target");
            put_str(&mut self.pending, target.as_os_str().as_bytes());
            put_str(&mut self.pending, b")");
            self.node_finished();
        } else if kind.is_dir() {
            put_str(&mut self.pending, b"directory");
            let mut names = Vec::new();
            for entry in std::fs::read_dir(&path).map_err(io_err("readdir", &path))? {
                let entry = entry.map_err(io_err("readdir", &path))?;
                names.push(entry.file_name());
            }
            names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            self.dirs.push(OpenDir {
                path,
                entries: names.into_iter(),
            });
        } else {
            return Err(NarEncodeError::UnsupportedFileType { path });
        }
        Ok(())
    }
}

impl Read for NarEncoder {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_chunk(buf).map_err(io::Error::other)
    }
}

/// Writes the NAR of `path` to `out`, returning its hash and size.
pub fn dump_path(path: &Path, out: impl Write) -> Result<NarSummary, NarEncodeError> {
    let mut encoder = NarEncoder::new(path);
    let mut out = HashingWriter::new(out);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = encoder.read_chunk(&mut buf)?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])
            .map_err(|source| NarEncodeError::Write {
                path: path.to_owned(),
                source,
            })?;
    }
    out.flush().map_err(|source| NarEncodeError::Write {
        path: path.to_owned(),
        source,
    })?;
    Ok(out.summary())
}
