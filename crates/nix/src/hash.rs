//! Cryptographic hashes as Nix names, prints and parses them.
//!
//! A [`Hash`](struct@Hash) is an algorithm ([`HashAlgo`]: md5, sha1, sha256, sha512) and a
//! digest of exactly that algorithm's size. It prints in base-16 (lower case),
//! nix32 ([`crate::base32`]), base-64 and SRI (`sha256-<base64>`), with or
//! without an `algo:` prefix, and parses every form Nix accepts: an
//! unprefixed string whose base is told by its length, `algo:<any base>`,
//! and SRI. [`compress_hash`] is Nix's XOR-fold used for store path hash parts.
//!
//! Invariants: a `Hash` always holds a digest of its algorithm's size, and the
//! unused tail of its buffer is zero, so derived equality and ordering are
//! those of (algorithm, digest).

use std::fmt;
use std::str::FromStr;

use sha2::Digest;
use thiserror::Error;

use crate::base32;

/// The hash algorithms Nix knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HashAlgo {
    Md5,
    Sha1,
    Sha256,
    Sha512,
}

impl HashAlgo {
    /// Digest size in bytes.
    pub const fn size(self) -> usize {
        match self {
            HashAlgo::Md5 => 16,
            HashAlgo::Sha1 => 20,
            HashAlgo::Sha256 => 32,
            HashAlgo::Sha512 => 64,
        }
    }

    /// Nix's name for it (`sha256`).
    pub const fn name(self) -> &'static str {
        match self {
            HashAlgo::Md5 => "md5",
            HashAlgo::Sha1 => "sha1",
            HashAlgo::Sha256 => "sha256",
            HashAlgo::Sha512 => "sha512",
        }
    }

    /// The algorithm Nix calls `name`, if any (names are case-sensitive).
    pub fn from_name(name: &str) -> Option<HashAlgo> {
        match name {
            "md5" => Some(HashAlgo::Md5),
            "sha1" => Some(HashAlgo::Sha1),
            "sha256" => Some(HashAlgo::Sha256),
            "sha512" => Some(HashAlgo::Sha512),
            _ => None,
        }
    }

    const fn base16_len(self) -> usize {
        self.size() * 2
    }

    const fn base32_len(self) -> usize {
        base32::encoded_len(self.size())
    }

    const fn base64_len(self) -> usize {
        (4 * self.size() / 3 + 3) & !3
    }
}

impl fmt::Display for HashAlgo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for HashAlgo {
    type Err = ParseHashError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        HashAlgo::from_name(s).ok_or_else(|| ParseHashError::UnknownAlgo(s.to_owned()))
    }
}

/// The textual bases a hash prints in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Base {
    Base16,
    Nix32,
    Base64,
    /// `algo-<base64>`; always carries the algorithm.
    Sri,
}

/// Why a string is not a hash.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ParseHashError {
    #[error("unknown hash algorithm '{0}'")]
    UnknownAlgo(String),
    #[error("hash '{0}' does not say its algorithm, and none is known from context")]
    MissingAlgo(String),
    #[error("hash '{hash}' should have algorithm '{expected}'")]
    AlgoMismatch { hash: String, expected: HashAlgo },
    #[error("hash '{hash}' has a length ({len}) that is no encoding of a {algo} digest")]
    WrongLength {
        hash: String,
        len: usize,
        algo: HashAlgo,
    },
    #[error("invalid base-16 digit at offset {offset} in hash '{hash}'")]
    InvalidBase16 { hash: String, offset: usize },
    #[error("invalid nix32 hash '{hash}': {source}")]
    InvalidNix32 {
        hash: String,
        source: base32::DecodeError,
    },
    #[error("invalid base-64 hash '{hash}'")]
    InvalidBase64 { hash: String },
    #[error("'{0}' is not an SRI hash (expected 'algo-<base64>')")]
    NotSri(String),
}

/// A digest together with its algorithm.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hash {
    algo: HashAlgo,
    digest: [u8; 64],
}

impl Hash {
    /// A hash from a digest, which must be `algo.size()` bytes long.
    pub fn from_digest(algo: HashAlgo, digest: &[u8]) -> Option<Hash> {
        if digest.len() != algo.size() {
            return None;
        }
        let mut buf = [0u8; 64];
        buf[..digest.len()].copy_from_slice(digest);
        Some(Hash { algo, digest: buf })
    }

    /// The hash of `data` under `algo`.
    pub fn compute(algo: HashAlgo, data: &[u8]) -> Hash {
        let mut buf = [0u8; 64];
        match algo {
            HashAlgo::Md5 => buf[..16].copy_from_slice(&md5::Md5::digest(data)),
            HashAlgo::Sha1 => buf[..20].copy_from_slice(&sha1::Sha1::digest(data)),
            HashAlgo::Sha256 => buf[..32].copy_from_slice(&sha2::Sha256::digest(data)),
            HashAlgo::Sha512 => buf.copy_from_slice(&sha2::Sha512::digest(data)),
        }
        Hash { algo, digest: buf }
    }

    /// SHA-256 of `data`.
    pub fn sha256(data: &[u8]) -> Hash {
        Self::from_sha256(sha2::Sha256::digest(data).into())
    }

    pub(crate) fn from_sha256(digest: [u8; 32]) -> Hash {
        let mut buf = [0u8; 64];
        buf[..32].copy_from_slice(&digest);
        Hash {
            algo: HashAlgo::Sha256,
            digest: buf,
        }
    }

    pub fn algo(&self) -> HashAlgo {
        self.algo
    }

    /// The digest bytes (`algo().size()` of them).
    pub fn digest(&self) -> &[u8] {
        &self.digest[..self.algo.size()]
    }

    /// Prints like Nix's `Hash::to_string(base, include_algo)`; SRI always
    /// includes the algorithm.
    pub fn format(&self, base: Base, include_algo: bool) -> String {
        let mut s = String::with_capacity(8 + self.algo.base64_len().max(self.algo.base16_len()));
        self.format_into(base, include_algo, &mut s);
        s
    }

    /// [`Hash::format`], appending to `out`.
    pub fn format_into(&self, base: Base, include_algo: bool, out: &mut String) {
        if base == Base::Sri || include_algo {
            out.push_str(self.algo.name());
            out.push(if base == Base::Sri { '-' } else { ':' });
        }
        match base {
            Base::Base16 => push_base16(self.digest(), out),
            Base::Nix32 => base32::encode_into(self.digest(), out),
            Base::Base64 | Base::Sri => push_base64(self.digest(), out),
        }
    }

    /// Lower-case base-16 digest, no prefix.
    pub fn to_base16(&self) -> String {
        self.format(Base::Base16, false)
    }

    /// nix32 digest, no prefix.
    pub fn to_nix32(&self) -> String {
        self.format(Base::Nix32, false)
    }

    /// `algo-<base64>`.
    pub fn to_sri(&self) -> String {
        self.format(Base::Sri, true)
    }

    /// Parses a digest without prefix in base-16, nix32 or base-64, telling
    /// which by its length (Nix's `parseNonSRIUnprefixed`). Base-16 accepts
    /// upper-case digits, as Nix does.
    pub fn parse_unprefixed(s: &str, algo: HashAlgo) -> Result<Hash, ParseHashError> {
        let bytes = s.as_bytes();
        let mut digest = [0u8; 64];
        let size = algo.size();
        if bytes.len() == algo.base16_len() {
            for (i, pair) in bytes.chunks_exact(2).enumerate() {
                let hi = hex_digit(pair[0]).ok_or_else(|| ParseHashError::InvalidBase16 {
                    hash: s.to_owned(),
                    offset: 2 * i,
                })?;
                let lo = hex_digit(pair[1]).ok_or_else(|| ParseHashError::InvalidBase16 {
                    hash: s.to_owned(),
                    offset: 2 * i + 1,
                })?;
                digest[i] = hi << 4 | lo;
            }
        } else if bytes.len() == algo.base32_len() {
            base32::decode_into(bytes, &mut digest[..size]).map_err(|source| {
                ParseHashError::InvalidNix32 {
                    hash: s.to_owned(),
                    source,
                }
            })?;
        } else if bytes.len() == algo.base64_len() {
            decode_base64_digest(s, &mut digest[..size])?;
        } else {
            return Err(ParseHashError::WrongLength {
                hash: s.to_owned(),
                len: bytes.len(),
                algo,
            });
        }
        Ok(Hash { algo, digest })
    }

    /// Parses `algo-<base64>`.
    pub fn parse_sri(s: &str) -> Result<Hash, ParseHashError> {
        let (algo, rest) = s
            .split_once('-')
            .ok_or_else(|| ParseHashError::NotSri(s.to_owned()))?;
        let algo: HashAlgo = algo.parse()?;
        Self::parse_base64(rest, algo)
    }

    /// Parses a hash that says its algorithm: `algo:<base16|nix32|base64>`
    /// or SRI.
    pub fn parse_prefixed(s: &str) -> Result<Hash, ParseHashError> {
        Self::parse_any(s, None)
    }

    /// Parses any form Nix accepts (`Hash::parseAny`): prefixed, SRI, or
    /// unprefixed when `algo` is given. If both the string and `algo` name
    /// an algorithm they must agree.
    pub fn parse_any(s: &str, algo: Option<HashAlgo>) -> Result<Hash, ParseHashError> {
        let (parsed, rest, sri) = if let Some((a, rest)) = s.split_once(':') {
            (Some(a.parse::<HashAlgo>()?), rest, false)
        } else if let Some((a, rest)) = s.split_once('-') {
            (Some(a.parse::<HashAlgo>()?), rest, true)
        } else {
            (None, s, false)
        };
        let algo = match (parsed, algo) {
            (Some(p), Some(a)) if p != a => {
                return Err(ParseHashError::AlgoMismatch {
                    hash: s.to_owned(),
                    expected: a,
                })
            }
            (Some(p), _) => p,
            (None, Some(a)) => a,
            (None, None) => return Err(ParseHashError::MissingAlgo(s.to_owned())),
        };
        if sri {
            Self::parse_base64(rest, algo)
        } else {
            Self::parse_unprefixed(rest, algo)
        }
    }

    fn parse_base64(s: &str, algo: HashAlgo) -> Result<Hash, ParseHashError> {
        let mut digest = [0u8; 64];
        decode_base64_digest(s, &mut digest[..algo.size()])?;
        Ok(Hash { algo, digest })
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", self.format(Base::Nix32, true))
    }
}

/// SRI form, which is what current Nix prints by default.
impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_sri())
    }
}

/// Folds `hash` into `size` bytes by XOR-ing byte `i` into byte `i % size`
/// (Nix's `compressHash`); store path hash parts are the SHA-256 of their
/// fingerprint compressed to 20 bytes. `size` must not exceed 64.
pub fn compress_hash(digest: &[u8], size: usize) -> Vec<u8> {
    let mut out = vec![0u8; size];
    if size == 0 {
        return out;
    }
    for (i, b) in digest.iter().enumerate() {
        out[i % size] ^= b;
    }
    out
}

/// [`compress_hash`] of a SHA-256 digest to the 20 bytes of a store path.
pub(crate) fn compress_to_20(digest: &[u8; 32]) -> [u8; 20] {
    let mut out = [0u8; 20];
    for (i, b) in digest.iter().enumerate() {
        out[i % 20] ^= b;
    }
    out
}

const HEX: &[u8; 16] = b"0123456789abcdef";

pub(crate) fn push_base16(bytes: &[u8], out: &mut String) {
    out.reserve(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 15)]));
    }
}

/// A SHA-256 fed through a small buffer, so that many short writes (of
/// printing, or of store path fingerprints) cost a copy each rather than a
/// hasher call each.
pub(crate) struct HashSink {
    hasher: sha2::Sha256,
    buf: [u8; 512],
    len: usize,
}

impl HashSink {
    pub(crate) fn new() -> HashSink {
        HashSink {
            hasher: sha2::Sha256::new(),
            buf: [0; 512],
            len: 0,
        }
    }

    fn flush(&mut self) {
        self.hasher.update(&self.buf[..self.len]);
        self.len = 0;
    }

    #[inline]
    pub(crate) fn put(&mut self, bytes: &[u8]) {
        if self.len + bytes.len() <= self.buf.len() {
            self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
            self.len += bytes.len();
        } else {
            self.flush();
            if bytes.len() >= self.buf.len() {
                self.hasher.update(bytes);
            } else {
                self.buf[..bytes.len()].copy_from_slice(bytes);
                self.len = bytes.len();
            }
        }
    }

    #[inline]
    pub(crate) fn put_byte(&mut self, b: u8) {
        if self.len == self.buf.len() {
            self.flush();
        }
        self.buf[self.len] = b;
        self.len += 1;
    }

    pub(crate) fn finish(mut self) -> Hash {
        self.flush();
        Hash::from_sha256(self.hasher.finalize().into())
    }

    /// The digest, for folding into a store path hash part.
    pub(crate) fn finish_digest(mut self) -> [u8; 32] {
        self.flush();
        self.hasher.finalize().into()
    }
}

/// The lower-case base-16 digest of `hash`, in a stack buffer: the bytes
/// are `buf[..len]`. For feeding hashers without allocating.
pub(crate) fn base16_on_stack(hash: &Hash) -> ([u8; 128], usize) {
    let mut buf = [0u8; 128];
    let digest = hash.digest();
    for (pair, &b) in buf.chunks_exact_mut(2).zip(digest) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 15)];
    }
    (buf, digest.len() * 2)
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn push_base64(bytes: &[u8], out: &mut String) {
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(char::from(B64[((n >> (18 - 6 * k)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
}

fn b64_value(c: u8) -> Option<u32> {
    match c {
        b'A'..=b'Z' => Some(u32::from(c - b'A')),
        b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
        b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    }
}

/// Decodes base-64 (padding optional) into `out`, which it must fill exactly.
fn decode_base64_digest(s: &str, out: &mut [u8]) -> Result<(), ParseHashError> {
    let bad = || ParseHashError::InvalidBase64 { hash: s.to_owned() };
    let data = s.trim_end_matches('=');
    if s.len() - data.len() > 2 {
        return Err(bad());
    }
    let mut acc: u32 = 0;
    let mut bits = 0;
    let mut n = 0;
    for &c in data.as_bytes() {
        acc = acc << 6 | b64_value(c).ok_or_else(bad)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            let slot = out.get_mut(n).ok_or_else(bad)?;
            *slot = (acc >> bits) as u8;
            n += 1;
            acc &= (1 << bits) - 1;
        }
    }
    if n != out.len() || acc != 0 {
        return Err(bad());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn prints_every_base() {
        let h = Hash::sha256(b"");
        assert_eq!(h.to_base16(), EMPTY_SHA256);
        assert_eq!(
            h.format(Base::Nix32, true),
            "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
        assert_eq!(
            h.to_sri(),
            "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
        );
        // Values from `nix hash to-base32` / `to-sri` (Nix 2.8).
        assert_eq!(
            Hash::compute(HashAlgo::Sha1, b"").to_nix32(),
            "143xibwh31h9bvxzalr0sjvbbvpa6ffs"
        );
        assert_eq!(
            Hash::compute(HashAlgo::Md5, b"").to_nix32(),
            "3y8bwfr609h3lh9ch0izcqq7fl"
        );
        assert_eq!(
            Hash::compute(HashAlgo::Sha512, b"").to_sri(),
            "sha512-z4PhNX7vuL3xVChQ1m2AB9Yg5AULVxXcg/SpIdNs6c5H0NE8XYXysP+DGNKHfuwvY7kxvUdBeoGlODJ6+SfaPg=="
        );
    }

    #[test]
    fn parses_every_form() {
        let h = Hash::sha256(b"");
        for s in [
            format!("sha256:{EMPTY_SHA256}"),
            format!("sha256:{}", EMPTY_SHA256.to_uppercase()),
            "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73".to_owned(),
            "sha256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=".to_owned(),
            "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=".to_owned(),
        ] {
            assert_eq!(Hash::parse_prefixed(&s), Ok(h), "{s}");
        }
        assert_eq!(
            Hash::parse_unprefixed(EMPTY_SHA256, HashAlgo::Sha256),
            Ok(h)
        );
        assert_eq!(Hash::parse_any(EMPTY_SHA256, Some(HashAlgo::Sha256)), Ok(h));
        assert!(matches!(
            Hash::parse_any(&format!("sha256:{EMPTY_SHA256}"), Some(HashAlgo::Sha1)),
            Err(ParseHashError::AlgoMismatch { .. })
        ));
        assert!(matches!(
            Hash::parse_any(EMPTY_SHA256, None),
            Err(ParseHashError::MissingAlgo(_))
        ));
        assert!(matches!(
            Hash::parse_prefixed("sha3:00"),
            Err(ParseHashError::UnknownAlgo(_))
        ));
        assert!(matches!(
            Hash::parse_unprefixed("abc", HashAlgo::Sha256),
            Err(ParseHashError::WrongLength { len: 3, .. })
        ));
        let mut bad = EMPTY_SHA256.to_owned();
        bad.replace_range(5..6, "g");
        assert_eq!(
            Hash::parse_unprefixed(&bad, HashAlgo::Sha256),
            Err(ParseHashError::InvalidBase16 {
                hash: bad.clone(),
                offset: 5
            })
        );
        assert!(Hash::parse_sri("sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFV=").is_err());
        assert!(Hash::parse_sri("sha256-47DEQpj8").is_err());
    }

    #[test]
    fn compress_folds_with_xor() {
        let digest: Vec<u8> = (0u8..32).collect();
        let c = compress_hash(&digest, 20);
        assert_eq!(c[0], 20);
        assert_eq!(c[11], 11 ^ 31);
        assert_eq!(c[12], 12);
        let fixed: [u8; 32] = digest.clone().try_into().expect("32 bytes");
        assert_eq!(compress_to_20(&fixed).to_vec(), c);
    }
}
