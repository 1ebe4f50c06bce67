//! Store paths: parsing, printing, and computing them the way Nix does.
//!
//! A [`StorePath`] is a base name `<hash>-<name>`: a 32-character nix32 hash
//! part (20 bytes) and a name of at most 211 characters from
//! `[A-Za-z0-9+\-._?=]`. A [`StoreDir`] (default `/nix/store`) turns base
//! names into full paths and back, and computes paths from fingerprints:
//! `sha256("<type>:sha256:<hex>:<store dir>:<name>")` folded to 20 bytes
//! ([`StoreDir::make_store_path`]), with the text, fixed-output and
//! derivation-output flavours built on it.
//!
//! Invariants: a `StorePath` value is always valid (its constructors check);
//! ordering is that of base names, which is the order Nix sorts paths in
//! `.drv` files and fingerprints; a `StoreDir` is absolute and has no trailing
//! slash.
//!
//! Name rule: Nix 2.8 accepts any name made of the allowed characters. Newer
//! Nix also rejects `.`, `..` and names starting with `.-` or `..-`; we do
//! too. Other names starting with a dot (`.envrc`) are valid in every Nix
//! version and accepted here.

use std::fmt;

use thiserror::Error;

use crate::base32;
use crate::hash::{base16_on_stack, compress_to_20, Hash, HashAlgo, HashSink};

/// Length of the nix32 hash part of a base name.
pub const HASH_PART_LEN: usize = 32;
/// Longest valid name.
pub const MAX_NAME_LEN: usize = 211;
/// Suffix of derivation names.
pub const DRV_EXTENSION: &str = ".drv";

/// Why a string is not a store path, or a name not a store path name.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StorePathError {
    #[error("'{0}' is too short to be a store path base name")]
    TooShort(String),
    #[error("'{0}' is not a store path: its hash part is not followed by '-'")]
    MissingDash(String),
    #[error("store path '{path}' has invalid nix32 character {char:?} at offset {offset}")]
    InvalidHashChar {
        path: String,
        offset: usize,
        char: char,
    },
    #[error("store path name must not be empty")]
    EmptyName,
    #[error("store path name '{0}' is longer than 211 characters")]
    NameTooLong(String),
    #[error("store path name '{name}' has invalid character {char:?} at offset {offset}")]
    InvalidNameChar {
        name: String,
        offset: usize,
        char: char,
    },
    #[error("'{0}' is not a valid store path name")]
    ReservedName(String),
    #[error("path '{path}' is not directly inside the store directory '{store_dir}'")]
    NotInStore { path: String, store_dir: String },
}

/// Why a path could not be computed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MakeStorePathError {
    #[error("invalid name for a computed store path: {0}")]
    Name(#[from] StorePathError),
    #[error("text paths need a sha256 hash, not {0}")]
    TextNeedsSha256(HashAlgo),
    #[error("only recursive sha256 content addresses can have references")]
    ReferencesNotAllowed,
}

/// A valid store path base name, `<hash>-<name>`, without the store directory.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StorePath {
    base: Box<str>,
}

impl StorePath {
    /// Parses a base name such as `ffff…ffff-hello-2.12`.
    pub fn from_base_name(base: &str) -> Result<StorePath, StorePathError> {
        let bytes = base.as_bytes();
        if bytes.len() < HASH_PART_LEN + 2 {
            return Err(StorePathError::TooShort(base.to_owned()));
        }
        if let Some(offset) = bytes[..HASH_PART_LEN]
            .iter()
            .position(|&c| !base32::is_digit(c))
        {
            return Err(StorePathError::InvalidHashChar {
                path: base.to_owned(),
                offset,
                char: base[offset..].chars().next().unwrap_or('?'),
            });
        }
        if bytes[HASH_PART_LEN] != b'-' {
            return Err(StorePathError::MissingDash(base.to_owned()));
        }
        check_name(&base[HASH_PART_LEN + 1..])?;
        Ok(StorePath { base: base.into() })
    }

    /// The path with hash part `digest` (nix32-encoded) and name `name`.
    pub fn from_digest(digest: &[u8; 20], name: &str) -> Result<StorePath, StorePathError> {
        check_name(name)?;
        Ok(Self::from_digest_unchecked(digest, name))
    }

    fn from_digest_unchecked(digest: &[u8; 20], name: &str) -> StorePath {
        let mut buf = vec![0u8; HASH_PART_LEN + 1 + name.len()];
        base32::encode_to_slice(digest, &mut buf[..HASH_PART_LEN]);
        buf[HASH_PART_LEN] = b'-';
        buf[HASH_PART_LEN + 1..].copy_from_slice(name.as_bytes());
        // Only nix32 digits, '-' and the bytes of a `str` were written.
        let base = String::from_utf8(buf).unwrap_or_default();
        StorePath { base: base.into() }
    }

    /// `<hash>-<name>`.
    pub fn base_name(&self) -> &str {
        &self.base
    }

    /// The 32-character nix32 hash part.
    pub fn hash_part(&self) -> &str {
        &self.base[..HASH_PART_LEN]
    }

    /// The name after the hash part and its dash.
    pub fn name(&self) -> &str {
        &self.base[HASH_PART_LEN + 1..]
    }

    /// The 20 bytes the hash part encodes.
    pub fn digest(&self) -> [u8; 20] {
        let mut out = [0u8; 20];
        // Validated at construction; a decoding error cannot happen, and if
        // it did the zero digest is returned rather than a panic.
        let _ = base32::decode_into(self.hash_part().as_bytes(), &mut out);
        out
    }

    /// Whether the name ends in `.drv`.
    pub fn is_derivation(&self) -> bool {
        self.name().ends_with(DRV_EXTENSION)
    }

    /// The derivation name of a `.drv` path (its name without `.drv`).
    pub fn derivation_name(&self) -> Option<&str> {
        self.name().strip_suffix(DRV_EXTENSION)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({:?})", &*self.base)
    }
}

/// Prints the base name; a full path needs a [`StoreDir`].
impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.base)
    }
}

/// Checks a store path name against Nix's rules.
pub fn check_name(name: &str) -> Result<(), StorePathError> {
    let bytes = name.as_bytes();
    if bytes.is_empty() {
        return Err(StorePathError::EmptyName);
    }
    if bytes.len() > MAX_NAME_LEN {
        return Err(StorePathError::NameTooLong(name.to_owned()));
    }
    if let Some(offset) = bytes.iter().position(|&c| !is_name_char(c)) {
        return Err(StorePathError::InvalidNameChar {
            name: name.to_owned(),
            offset,
            char: name[offset..].chars().next().unwrap_or('?'),
        });
    }
    let reserved = matches!(
        bytes,
        [b'.'] | [b'.', b'.'] | [b'.', b'-', ..] | [b'.', b'.', b'-', ..]
    );
    if reserved {
        return Err(StorePathError::ReservedName(name.to_owned()));
    }
    Ok(())
}

#[inline]
fn is_name_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.' | b'_' | b'?' | b'=')
}

/// `<drv name>` for output `out`, `<drv name>-<output>` otherwise: the name of
/// a derivation output's store path.
pub fn output_path_name(drv_name: &str, output_name: &str) -> String {
    if output_name == "out" {
        drv_name.to_owned()
    } else {
        let mut s = String::with_capacity(drv_name.len() + 1 + output_name.len());
        s.push_str(drv_name);
        s.push('-');
        s.push_str(output_name);
        s
    }
}

/// How content was hashed for a content address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ContentAddressMethod {
    /// The file's bytes.
    Flat,
    /// The NAR serialisation of the path.
    Recursive,
    /// The file's bytes, addressed like `builtins.toFile` output (newer Nix;
    /// Nix 2.8 refuses `outputHashMode = "text"`).
    Text,
}

impl ContentAddressMethod {
    /// The prefix before the algorithm in a `.drv` hash algorithm field:
    /// `""`, `"r:"` or `"text:"`.
    pub const fn prefix(self) -> &'static str {
        match self {
            ContentAddressMethod::Flat => "",
            ContentAddressMethod::Recursive => "r:",
            ContentAddressMethod::Text => "text:",
        }
    }

    /// Splits a `.drv` hash algorithm field (`r:sha256`) into the method and
    /// the algorithm name.
    pub fn split_prefix(field: &str) -> (ContentAddressMethod, &str) {
        if let Some(rest) = field.strip_prefix("r:") {
            (ContentAddressMethod::Recursive, rest)
        } else if let Some(rest) = field.strip_prefix("text:") {
            (ContentAddressMethod::Text, rest)
        } else {
            (ContentAddressMethod::Flat, field)
        }
    }
}

/// Why a store directory is unusable.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("store directory '{0}' must be an absolute path without a trailing slash")]
pub struct InvalidStoreDir(pub String);

/// The directory store paths live in; `/nix/store` by default. Part of every
/// computed path's fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StoreDir {
    dir: Box<str>,
}

impl Default for StoreDir {
    fn default() -> Self {
        StoreDir {
            dir: "/nix/store".into(),
        }
    }
}

impl StoreDir {
    pub fn new(dir: &str) -> Result<StoreDir, InvalidStoreDir> {
        if !dir.starts_with('/') || dir.len() < 2 || dir.ends_with('/') {
            return Err(InvalidStoreDir(dir.to_owned()));
        }
        Ok(StoreDir { dir: dir.into() })
    }

    pub fn as_str(&self) -> &str {
        &self.dir
    }

    /// Parses a full path `<store dir>/<base name>`. Nothing may follow the
    /// base name: `/nix/store/…-foo/bin` is not a store path.
    pub fn parse_path(&self, path: &str) -> Result<StorePath, StorePathError> {
        let base = path
            .strip_prefix(&*self.dir)
            .and_then(|rest| rest.strip_prefix('/'))
            .ok_or_else(|| StorePathError::NotInStore {
                path: path.to_owned(),
                store_dir: self.dir.to_string(),
            })?;
        StorePath::from_base_name(base)
    }

    /// The full path.
    pub fn print(&self, path: &StorePath) -> String {
        let mut s = String::with_capacity(self.dir.len() + 1 + path.base.len());
        s.push_str(&self.dir);
        s.push('/');
        s.push_str(&path.base);
        s
    }

    /// Nix's `makeStorePath`: the path whose hash part is the SHA-256 of
    /// `<type>:<algo>:<hex digest>:<store dir>:<name>`, folded to 20 bytes.
    pub fn make_store_path(
        &self,
        path_type: &str,
        hash: &Hash,
        name: &str,
    ) -> Result<StorePath, MakeStorePathError> {
        self.make_with_type(|h| h.put(path_type.as_bytes()), hash, name)
    }

    /// [`StoreDir::make_store_path`] with the type fed to the hasher by
    /// `write_type`, so long reference lists need no intermediate string.
    fn make_with_type(
        &self,
        write_type: impl FnOnce(&mut HashSink),
        hash: &Hash,
        name: &str,
    ) -> Result<StorePath, MakeStorePathError> {
        check_name(name)?;
        let mut hasher = HashSink::new();
        write_type(&mut hasher);
        hasher.put(b":");
        hasher.put(hash.algo().name().as_bytes());
        hasher.put(b":");
        let (hex, hex_len) = base16_on_stack(hash);
        hasher.put(&hex[..hex_len]);
        hasher.put(b":");
        hasher.put(self.dir.as_bytes());
        hasher.put(b":");
        hasher.put(name.as_bytes());
        let digest = hasher.finish_digest();
        Ok(StorePath::from_digest_unchecked(
            &compress_to_20(&digest),
            name,
        ))
    }

    /// The path of output `output_name` of an input-addressed derivation
    /// named `drv_name` whose hash modulo is `hash`.
    pub fn make_output_path(
        &self,
        output_name: &str,
        hash: &Hash,
        drv_name: &str,
    ) -> Result<StorePath, MakeStorePathError> {
        let name = output_path_name(drv_name, output_name);
        self.make_with_type(
            |h| {
                h.put(b"output:");
                h.put(output_name.as_bytes());
            },
            hash,
            &name,
        )
    }

    /// The path of a text file with contents hash `hash` (which must be
    /// SHA-256) that refers to `references`, which must be in store-path
    /// order (as a `BTreeSet<StorePath>` iterates).
    pub fn make_text_path<'a>(
        &self,
        name: &str,
        hash: &Hash,
        references: impl IntoIterator<Item = &'a StorePath>,
    ) -> Result<StorePath, MakeStorePathError> {
        if hash.algo() != HashAlgo::Sha256 {
            return Err(MakeStorePathError::TextNeedsSha256(hash.algo()));
        }
        self.make_with_type(
            |h| {
                h.put(b"text");
                self.feed_references(h, references);
            },
            hash,
            name,
        )
    }

    /// The path `addTextToStore` gives `contents` (e.g. a `.drv` file).
    pub fn compute_text_path<'a>(
        &self,
        name: &str,
        contents: &[u8],
        references: impl IntoIterator<Item = &'a StorePath>,
    ) -> Result<StorePath, MakeStorePathError> {
        self.make_text_path(name, &Hash::sha256(contents), references)
    }

    fn feed_references<'a>(
        &self,
        h: &mut HashSink,
        references: impl IntoIterator<Item = &'a StorePath>,
    ) {
        for r in references {
            h.put_byte(b':');
            h.put(self.dir.as_bytes());
            h.put_byte(b'/');
            h.put(r.base.as_bytes());
        }
    }

    /// The path of content-addressed data (Nix's `makeFixedOutputPath`, and
    /// `makeTextPath` for [`ContentAddressMethod::Text`]). Recursive SHA-256
    /// paths are `source` paths and may have references (and a self
    /// reference); every other flat or recursive hash is hashed again as
    /// `fixed:out:<r:?><algo>:<hex>:` and may have none.
    pub fn make_fixed_output_path<'a>(
        &self,
        method: ContentAddressMethod,
        hash: &Hash,
        name: &str,
        references: impl IntoIterator<Item = &'a StorePath>,
        self_reference: bool,
    ) -> Result<StorePath, MakeStorePathError> {
        let mut references = references.into_iter().peekable();
        match method {
            ContentAddressMethod::Text => {
                if self_reference {
                    return Err(MakeStorePathError::ReferencesNotAllowed);
                }
                self.make_text_path(name, hash, references)
            }
            ContentAddressMethod::Recursive if hash.algo() == HashAlgo::Sha256 => self
                .make_with_type(
                    |h| {
                        h.put(b"source");
                        self.feed_references(h, references);
                        if self_reference {
                            h.put(b":self");
                        }
                    },
                    hash,
                    name,
                ),
            _ => {
                if self_reference || references.peek().is_some() {
                    return Err(MakeStorePathError::ReferencesNotAllowed);
                }
                let mut inner = HashSink::new();
                inner.put(b"fixed:out:");
                inner.put(method.prefix().as_bytes());
                inner.put(hash.algo().name().as_bytes());
                inner.put(b":");
                let (hex, hex_len) = base16_on_stack(hash);
                inner.put(&hex[..hex_len]);
                inner.put(b":");
                let inner = inner.finish();
                self.make_store_path("output:out", &inner, name)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO: &str = "/nix/store/g9ixp4rbp6bjymsixj1hb7q7m2fpr4r4-hello-2.12";

    #[test]
    fn parses_and_prints() {
        let dir = StoreDir::default();
        let p = dir.parse_path(HELLO).expect("valid path");
        assert_eq!(p.hash_part(), "g9ixp4rbp6bjymsixj1hb7q7m2fpr4r4");
        assert_eq!(p.name(), "hello-2.12");
        assert_eq!(dir.print(&p), HELLO);
        assert_eq!(
            StorePath::from_digest(&p.digest(), p.name()).expect("valid name"),
            p
        );
        assert!(!p.is_derivation());
    }

    #[test]
    fn rejects_invalid_paths() {
        let dir = StoreDir::default();
        let cases = [
            "/nix/store/g9ixp4rbp6bjymsixj1hb7q7m2fpr4r4",
            "/nix/store/g9ixp4rbp6bjymsixj1hb7q7m2fpr4r4-",
            "/nix/store/e9ixp4rbp6bjymsixj1hb7q7m2fpr4r4-x",
            "/nix/store/g9ixp4rbp6bjymsixj1hb7q7m2fpr4r4_x",
            "/nix/store/g9ixp4rbp6bjymsixj1hb7q7m2fpr4r4-a/b",
            "/nix/store/g9ixp4rbp6bjymsixj1hb7q7m2fpr4r4-a b",
            "/nix/store/g9ixp4rbp6bjymsixj1hb7q7m2fpr4r4-..",
            "/nix/store/g9ixp4rbp6bjymsixj1hb7q7m2fpr4r4-.-x",
            "/nix/storeg9ixp4rbp6bjymsixj1hb7q7m2fpr4r4-x",
            "/gnu/store/g9ixp4rbp6bjymsixj1hb7q7m2fpr4r4-x",
            "/nix/store/g9ixp4rbp6bjymsixj1hb7q7m2fpr4r4-é",
        ];
        for c in cases {
            assert!(dir.parse_path(c).is_err(), "{c} should be rejected");
        }
        let long = format!(
            "/nix/store/g9ixp4rbp6bjymsixj1hb7q7m2fpr4r4-{}",
            "a".repeat(212)
        );
        assert!(matches!(
            dir.parse_path(&long),
            Err(StorePathError::NameTooLong(_))
        ));
        let ok = format!(
            "/nix/store/g9ixp4rbp6bjymsixj1hb7q7m2fpr4r4-{}",
            "a".repeat(211)
        );
        assert!(dir.parse_path(&ok).is_ok());
        assert!(dir
            .parse_path("/nix/store/g9ixp4rbp6bjymsixj1hb7q7m2fpr4r4-.envrc")
            .is_ok());
        assert!(StoreDir::new("/nix/store/").is_err());
        assert!(StoreDir::new("nix/store").is_err());
    }

    #[test]
    fn output_names() {
        assert_eq!(output_path_name("hello", "out"), "hello");
        assert_eq!(output_path_name("hello", "dev"), "hello-dev");
    }
}
