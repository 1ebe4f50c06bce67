//! Primitives of the Nix worker protocol, decoded from and encoded into
//! byte buffers, with no IO.
//!
//! Everything on the wire is built from little-endian `u64`s and strings
//! (a `u64` length, the bytes, zero padding to a multiple of 8). Booleans are
//! `u64`s (any non-zero value is true, as Nix reads them); collections are a
//! `u64` count followed by the elements.
//!
//! Decoding distinguishes "the buffer ends too early" ([`DecodeError::NeedMore`],
//! carrying how many bytes in total are needed at least) from "these bytes
//! are wrong" ([`DecodeError::Malformed`]). A caller holding a partial
//! message waits for more bytes and decodes again from the start.
//!
//! Invariants: decoding never panics and never allocates more than the
//! bytes actually present, except within [`Limits`]: a string's length is
//! checked against `max_string` before waiting for its bytes, a count against
//! `max_list` before reading elements, and reservations are capped, so a
//! lying peer cannot make us wait for or allocate gigabytes.

use thiserror::Error;

use crate::hash::{Hash, HashAlgo};
use crate::store_path::{StoreDir, StorePath};

/// Bounds on what a peer may make us accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest string (log line, error message, JSON, path).
    pub max_string: usize,
    /// Most elements in one collection.
    pub max_list: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_string: 16 << 20,
            max_list: 1 << 20,
        }
    }
}

/// Why a buffer does not (yet) hold a value.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The value continues past the end of the buffer, which must hold at
    /// least `needed` bytes (counted from the start of the buffer).
    #[error("incomplete message: at least {needed} bytes are needed")]
    NeedMore { needed: usize },
    #[error(transparent)]
    Malformed(#[from] Malformed),
}

/// Bytes that are not a valid encoding of what was expected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Malformed {
    #[error("{what}: string of {len} bytes exceeds the limit of {max}")]
    StringTooLong {
        what: &'static str,
        len: u64,
        max: usize,
    },
    #[error("{what}: {len} elements exceed the limit of {max}")]
    ListTooLong {
        what: &'static str,
        len: u64,
        max: usize,
    },
    #[error("{what}: non-zero string padding")]
    NonZeroPadding { what: &'static str },
    #[error("{what}: {value} is out of range")]
    OutOfRange { what: &'static str, value: u64 },
    #[error("{what}: not valid UTF-8")]
    InvalidUtf8 { what: &'static str },
    #[error("{what}: {message}")]
    Invalid { what: &'static str, message: String },
    #[error("unknown message type {0:#x} from the Nix daemon")]
    UnknownMessage(u64),
}

impl Malformed {
    pub(crate) fn invalid(what: &'static str, message: impl ToString) -> Malformed {
        Malformed::Invalid {
            what,
            message: message.to_string(),
        }
    }
}

/// Initial capacity for a collection of `len` claimed elements.
pub(crate) fn capped(len: usize) -> usize {
    len.min(1024)
}

/// A cursor over a buffer that may end in the middle of a value.
#[derive(Debug, Clone)]
pub struct WireReader<'a> {
    buf: &'a [u8],
    pos: usize,
    limits: Limits,
}

impl<'a> WireReader<'a> {
    pub fn new(buf: &'a [u8], limits: Limits) -> Self {
        WireReader {
            buf,
            pos: 0,
            limits,
        }
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The next `n` bytes, consumed.
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or(DecodeError::NeedMore { needed: usize::MAX })?;
        if end > self.buf.len() {
            return Err(DecodeError::NeedMore { needed: end });
        }
        let bytes = &self.buf[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }

    /// A `u64` that must fit `max` (Nix's `readNum<T>` range check).
    pub fn u64_max(&mut self, what: &'static str, max: u64) -> Result<u64, DecodeError> {
        let v = self.u64()?;
        if v > max {
            return Err(Malformed::OutOfRange { what, value: v }.into());
        }
        Ok(v)
    }

    pub fn bool(&mut self) -> Result<bool, DecodeError> {
        Ok(self.u64()? != 0)
    }

    /// A string's bytes, borrowed from the buffer.
    pub fn bytes(&mut self, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let len = self.u64()?;
        if len > self.limits.max_string as u64 {
            return Err(Malformed::StringTooLong {
                what,
                len,
                max: self.limits.max_string,
            }
            .into());
        }
        // Bounded by max_string above.
        let len = len as usize;
        let pad = (8 - len % 8) % 8;
        let data = self.take(len + pad)?;
        if data[len..].iter().any(|&b| b != 0) {
            return Err(Malformed::NonZeroPadding { what }.into());
        }
        Ok(&data[..len])
    }

    /// A string that must be UTF-8.
    pub fn string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let bytes = self.bytes(what)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| Malformed::InvalidUtf8 { what }.into())
    }

    /// A string for humans (log lines, errors): invalid UTF-8 is replaced.
    pub fn string_lossy(&mut self, what: &'static str) -> Result<String, DecodeError> {
        Ok(String::from_utf8_lossy(self.bytes(what)?).into_owned())
    }

    /// A collection's element count.
    pub fn count(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let len = self.u64()?;
        if len > self.limits.max_list as u64 {
            return Err(Malformed::ListTooLong {
                what,
                len,
                max: self.limits.max_list,
            }
            .into());
        }
        Ok(len as usize)
    }

    /// A list of UTF-8 strings.
    pub fn strings(&mut self, what: &'static str) -> Result<Vec<String>, DecodeError> {
        let n = self.count(what)?;
        let mut out = Vec::with_capacity(capped(n));
        for _ in 0..n {
            out.push(self.string(what)?);
        }
        Ok(out)
    }

    /// A full store path such as `/nix/store/…-foo`.
    pub fn store_path(
        &mut self,
        dir: &StoreDir,
        what: &'static str,
    ) -> Result<StorePath, DecodeError> {
        let s = self.bytes(what)?;
        let s = std::str::from_utf8(s).map_err(|_| Malformed::InvalidUtf8 { what })?;
        dir.parse_path(s)
            .map_err(|e| Malformed::invalid(what, e).into())
    }

    /// A store path or the empty string.
    pub fn opt_store_path(
        &mut self,
        dir: &StoreDir,
        what: &'static str,
    ) -> Result<Option<StorePath>, DecodeError> {
        let s = self.bytes(what)?;
        if s.is_empty() {
            return Ok(None);
        }
        let s = std::str::from_utf8(s).map_err(|_| Malformed::InvalidUtf8 { what })?;
        dir.parse_path(s)
            .map(Some)
            .map_err(|e| Malformed::invalid(what, e).into())
    }

    /// A set of store paths (a count and full paths, in any order).
    pub fn store_paths(
        &mut self,
        dir: &StoreDir,
        what: &'static str,
    ) -> Result<std::collections::BTreeSet<StorePath>, DecodeError> {
        let n = self.count(what)?;
        let mut out = std::collections::BTreeSet::new();
        for _ in 0..n {
            out.insert(self.store_path(dir, what)?);
        }
        Ok(out)
    }

    /// A SHA-256 hash in any form Nix accepts (the daemon sends base-16).
    pub fn sha256(&mut self, what: &'static str) -> Result<Hash, DecodeError> {
        let s = self.bytes(what)?;
        let s = std::str::from_utf8(s).map_err(|_| Malformed::InvalidUtf8 { what })?;
        Hash::parse_any(s, Some(HashAlgo::Sha256)).map_err(|e| Malformed::invalid(what, e).into())
    }
}

/// Appends encoded values to a buffer.
#[derive(Debug, Default, Clone)]
pub struct WireWriter {
    buf: Vec<u8>,
}

impl WireWriter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    pub fn clear(&mut self) {
        self.buf.clear();
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u64(u64::from(v))
    }

    pub fn bytes(&mut self, s: &[u8]) -> &mut Self {
        crate::nar::put_str(&mut self.buf, s);
        self
    }

    pub fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }

    pub fn strings<I, S>(&mut self, items: I) -> &mut Self
    where
        I: IntoIterator<Item = S>,
        I::IntoIter: ExactSizeIterator,
        S: AsRef<str>,
    {
        let items = items.into_iter();
        self.u64(items.len() as u64);
        for s in items {
            self.str(s.as_ref());
        }
        self
    }

    pub fn store_path(&mut self, dir: &StoreDir, path: &StorePath) -> &mut Self {
        self.str(&dir.print(path))
    }

    pub fn opt_store_path(&mut self, dir: &StoreDir, path: Option<&StorePath>) -> &mut Self {
        match path {
            Some(p) => self.store_path(dir, p),
            None => self.str(""),
        }
    }

    pub fn store_paths<'p, I>(&mut self, dir: &StoreDir, paths: I) -> &mut Self
    where
        I: IntoIterator<Item = &'p StorePath>,
        I::IntoIter: ExactSizeIterator,
    {
        let paths = paths.into_iter();
        self.u64(paths.len() as u64);
        for p in paths {
            self.store_path(dir, p);
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_round_trip_with_padding() {
        let mut w = WireWriter::new();
        w.str("").str("a").str("12345678").str("123456789");
        let bytes = w.into_bytes();
        assert_eq!(bytes.len(), 8 + (8 + 8) + (8 + 8) + (8 + 16));
        let mut r = WireReader::new(&bytes, Limits::default());
        for s in ["", "a", "12345678", "123456789"] {
            assert_eq!(r.string("s").as_deref(), Ok(s));
        }
        assert_eq!(r.position(), bytes.len());
    }

    #[test]
    fn incomplete_input_asks_for_the_missing_bytes() {
        let mut w = WireWriter::new();
        w.str("hello");
        let bytes = w.into_bytes();
        for len in 0..bytes.len() {
            let mut r = WireReader::new(&bytes[..len], Limits::default());
            let needed = if len < 8 { 8 } else { 16 };
            assert_eq!(r.string("s"), Err(DecodeError::NeedMore { needed }));
        }
    }

    #[test]
    fn oversized_lengths_are_malformed_before_waiting() {
        let limits = Limits {
            max_string: 10,
            max_list: 3,
        };
        let bytes = 11u64.to_le_bytes();
        assert!(matches!(
            WireReader::new(&bytes, limits).string("s"),
            Err(DecodeError::Malformed(Malformed::StringTooLong {
                len: 11,
                ..
            }))
        ));
        let bytes = 4u64.to_le_bytes();
        assert!(matches!(
            WireReader::new(&bytes, limits).strings("l"),
            Err(DecodeError::Malformed(Malformed::ListTooLong {
                len: 4,
                ..
            }))
        ));
        let bytes = u64::MAX.to_le_bytes();
        assert!(matches!(
            WireReader::new(&bytes, Limits::default()).bytes("s"),
            Err(DecodeError::Malformed(Malformed::StringTooLong { .. }))
        ));
    }

    #[test]
    fn non_zero_padding_is_malformed() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&1u64.to_le_bytes());
        bytes.extend_from_slice(b"a\0\0\0\0\0\0\x01");
        assert_eq!(
            WireReader::new(&bytes, Limits::default()).string("s"),
            Err(DecodeError::Malformed(Malformed::NonZeroPadding {
                what: "s"
            }))
        );
    }
}
