//! Compression of NARs (and of logs sent to S3), and the spool file a
//! compressed object is written to before it is uploaded.
//!
//! A [`Spool`] takes uncompressed bytes, compresses them into an unlinked
//! temporary file and hashes what it writes, so an object's `FileHash` and
//! `FileSize` are known before it is uploaded, and an upload that fails
//! can be repeated from the file without reading the store again. Memory
//! stays bounded whatever the size of the NAR: the compressor's window
//! and one buffer.
//!
//! The compressors are blocking code: callers run a spool on the blocking
//! pool (see `upload::spool_nar`).

use std::fs::File;
use std::io::{self, Seek, Write};
use std::path::Path;

use sha2::{Digest, Sha256};
use sluice_nix::hash::Hash;

/// How NARs are compressed. Nix reads each of these from a binary cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Compression {
    None,
    Xz,
    #[default]
    Zstd,
}

#[derive(Debug, thiserror::Error)]
#[error("unknown compression '{0}': give zstd, xz or none")]
pub struct UnknownCompression(pub String);

impl Compression {
    /// The name in `.narinfo` files and in `Content-Encoding`.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
        }
    }

    /// What Nix appends to `.nar` in a NAR's URL.
    pub fn extension(self) -> &'static str {
        match self {
            Compression::None => "",
            Compression::Xz => ".xz",
            Compression::Zstd => ".zst",
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Compression {
    type Err = UnknownCompression;

    fn from_str(s: &str) -> Result<Compression, UnknownCompression> {
        match s {
            "none" => Ok(Compression::None),
            "xz" => Ok(Compression::Xz),
            "zstd" => Ok(Compression::Zstd),
            other => Err(UnknownCompression(other.to_owned())),
        }
    }
}

/// Nix's default levels: zstd's default, xz's preset 6.
const ZSTD_LEVEL: i32 = 3;
const XZ_PRESET: u32 = 6;

/// A file that hashes what is written to it.
struct HashingFile {
    file: File,
    sha: Sha256,
    size: u64,
}

impl Write for HashingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.sha.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

enum Encoder {
    None(HashingFile),
    Xz(liblzma::write::XzEncoder<HashingFile>),
    Zstd(zstd::stream::write::Encoder<'static, HashingFile>),
}

/// A compressed object being written to an unlinked temporary file.
pub struct Spool {
    encoder: Encoder,
}

/// A finished spool: the file (positioned at its start), and the hash and
/// size of its contents.
#[derive(Debug)]
pub struct Spooled {
    pub file: File,
    pub file_hash: Hash,
    pub file_size: u64,
}

impl Spool {
    /// A spool in `dir` (the system's temporary directory if `None`).
    pub fn new(compression: Compression, dir: Option<&Path>) -> io::Result<Spool> {
        let file = match dir {
            Some(dir) => tempfile::tempfile_in(dir)?,
            None => tempfile::tempfile()?,
        };
        let sink = HashingFile {
            file,
            sha: Sha256::new(),
            size: 0,
        };
        let encoder = match compression {
            Compression::None => Encoder::None(sink),
            Compression::Xz => Encoder::Xz(liblzma::write::XzEncoder::new(sink, XZ_PRESET)),
            Compression::Zstd => {
                Encoder::Zstd(zstd::stream::write::Encoder::new(sink, ZSTD_LEVEL)?)
            }
        };
        Ok(Spool { encoder })
    }

    /// Ends the compressed stream and rewinds the file.
    pub fn finish(self) -> io::Result<Spooled> {
        let mut sink = match self.encoder {
            Encoder::None(sink) => sink,
            Encoder::Xz(e) => e.finish()?,
            Encoder::Zstd(e) => e.finish()?,
        };
        sink.flush()?;
        sink.file.rewind()?;
        let digest = sink.sha.finalize();
        let file_hash = Hash::from_digest(sluice_nix::hash::HashAlgo::Sha256, &digest)
            .ok_or_else(|| io::Error::other("a SHA-256 digest of the wrong size"))?;
        Ok(Spooled {
            file: sink.file,
            file_hash,
            file_size: sink.size,
        })
    }
}

impl Write for Spool {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.encoder {
            Encoder::None(w) => w.write(buf),
            Encoder::Xz(w) => w.write(buf),
            Encoder::Zstd(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.encoder {
            Encoder::None(w) => w.flush(),
            Encoder::Xz(w) => w.flush(),
            Encoder::Zstd(w) => w.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn spool(compression: Compression, data: &[u8]) -> (Vec<u8>, Spooled) {
        let mut spool = Spool::new(compression, None).expect("spool");
        spool.write_all(data).expect("write");
        let mut done = spool.finish().expect("finish");
        let mut bytes = Vec::new();
        done.file.read_to_end(&mut bytes).expect("read back");
        (bytes, done)
    }

    #[test]
    fn each_compression_round_trips_and_hashes_what_it_wrote() {
        let data: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        for compression in [Compression::None, Compression::Xz, Compression::Zstd] {
            let (bytes, done) = spool(compression, &data);
            assert_eq!(done.file_size, bytes.len() as u64, "{compression}");
            assert_eq!(done.file_hash, Hash::sha256(&bytes), "{compression}");
            let back = match compression {
                Compression::None => bytes.clone(),
                Compression::Xz => {
                    let mut out = Vec::new();
                    liblzma::read::XzDecoder::new(&bytes[..])
                        .read_to_end(&mut out)
                        .expect("xz decodes");
                    out
                }
                Compression::Zstd => zstd::decode_all(&bytes[..]).expect("zstd decodes"),
            };
            assert_eq!(back, data, "{compression}");
            if compression != Compression::None {
                assert!(bytes.len() < data.len() / 4, "{compression} compresses");
            }
        }
    }

    #[test]
    fn names_parse_and_print() {
        for c in [Compression::None, Compression::Xz, Compression::Zstd] {
            assert_eq!(c.name().parse::<Compression>().ok(), Some(c));
        }
        let err = "bzip2".parse::<Compression>().expect_err("not offered");
        assert!(err.to_string().contains("zstd, xz or none"), "{err}");
        assert_eq!(Compression::default(), Compression::Zstd);
    }
}
