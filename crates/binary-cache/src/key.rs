//! Nix's signing keys: the `name:base64` files that
//! `nix-store --generate-binary-cache-key` writes, and the `Sig:` lines
//! of `.narinfo` files.
//!
//! A secret key file holds a key name, a colon and the base-64 of a
//! 64-byte Ed25519 secret key in libsodium's layout (the 32-byte seed,
//! then the 32-byte public key). A public key is the same with the 32-byte
//! public key. A signature is `name:base64(64-byte detached signature)`
//! over a path's fingerprint ([`crate::NarInfo::fingerprint`]).
//!
//! Invariant: a [`SecretKey`] always holds a seed and the public key that
//! seed derives, so what it signs verifies under [`SecretKey::public_key`].

use std::fmt;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};

/// Why a key could not be read.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading signing key file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("signing key file {path}: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("key '{text}': {reason}")]
    MalformedText { text: String, reason: String },
}

/// A secret key that signs `.narinfo` files as Nix does.
#[derive(Clone)]
pub struct SecretKey {
    name: String,
    key: SigningKey,
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key itself.
        f.debug_struct("SecretKey")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// What a `name:base64` text failed on, without naming the text (which
/// for a secret key must not be echoed).
fn split_key(text: &str) -> Result<(&str, Vec<u8>), String> {
    let text = text.trim();
    if text.is_empty() {
        return Err(
            "it is empty (want name:base64, as nix-store --generate-binary-cache-key writes)"
                .into(),
        );
    }
    let Some((name, data)) = text.split_once(':') else {
        return Err(
            "no ':' in it (want name:base64, as nix-store --generate-binary-cache-key writes)"
                .into(),
        );
    };
    if name.is_empty() {
        return Err("the key name before ':' is empty".into());
    }
    if name.chars().any(|c| c.is_whitespace()) {
        return Err("the key name contains white space".into());
    }
    if data.is_empty() {
        return Err(format!("key '{name}' has nothing after ':'"));
    }
    let bytes = BASE64
        .decode(data)
        .map_err(|e| format!("key '{name}': the part after ':' is not base-64 ({e})"))?;
    Ok((name, bytes))
}

impl SecretKey {
    /// Reads a secret key file.
    pub fn from_file(path: &Path) -> Result<SecretKey, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.to_owned(),
            source,
        })?;
        SecretKey::parse_secret(&text).map_err(|reason| KeyError::Malformed {
            path: path.to_owned(),
            reason,
        })
    }

    /// Parses the contents of a secret key file (surrounding white space
    /// allowed). The error never repeats the text.
    fn parse_secret(text: &str) -> Result<SecretKey, String> {
        let (name, bytes) = split_key(text)?;
        let pair: [u8; 64] = match bytes.len() {
            64 => bytes
                .try_into()
                .map_err(|_| "key of 64 bytes".to_string())?,
            32 => {
                return Err(format!(
                    "key '{name}' is 32 bytes long: that is a public key; give the secret key file"
                ))
            }
            n => {
                return Err(format!(
                    "key '{name}' is {n} bytes long; an Ed25519 secret key has 64"
                ))
            }
        };
        let key = SigningKey::from_keypair_bytes(&pair).map_err(|_| {
            format!("key '{name}' is corrupt: its public half does not match its secret half")
        })?;
        Ok(SecretKey {
            name: name.to_owned(),
            key,
        })
    }

    /// The key's name, which every signature it makes starts with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The public key that verifies this key's signatures (what clients
    /// put in `trusted-public-keys`).
    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// A `Sig:` value: `name:base64(signature of message)`.
    pub fn sign(&self, message: &str) -> String {
        let signature = self.key.sign(message.as_bytes());
        format!("{}:{}", self.name, BASE64.encode(signature.to_bytes()))
    }
}

impl std::str::FromStr for SecretKey {
    type Err = KeyError;

    /// Parses a secret key given as text (as in a key file).
    fn from_str(text: &str) -> Result<SecretKey, KeyError> {
        SecretKey::parse_secret(text).map_err(|reason| KeyError::MalformedText {
            text: "(secret key, not shown)".into(),
            reason,
        })
    }
}

/// A public key, `name:base64(32 bytes)`.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: VerifyingKey,
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl fmt::Display for PublicKey {
    /// As Nix prints it: `name:base64`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, BASE64.encode(self.key.as_bytes()))
    }
}

impl std::str::FromStr for PublicKey {
    type Err = KeyError;

    fn from_str(text: &str) -> Result<PublicKey, KeyError> {
        let err = |reason: String| KeyError::MalformedText {
            text: text.trim().to_owned(),
            reason,
        };
        let (name, bytes) = split_key(text).map_err(err)?;
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| err(format!("{} bytes; a public key has 32", b.len())))?;
        let key = VerifyingKey::from_bytes(&bytes)
            .map_err(|_| err("not a point of the Ed25519 curve".into()))?;
        Ok(PublicKey {
            name: name.to_owned(),
            key,
        })
    }
}

impl PublicKey {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether `sig` (a `Sig:` value) is this key's signature of `message`.
    /// A signature by another key name is not.
    pub fn verifies(&self, message: &str, sig: &str) -> bool {
        let Some((name, data)) = sig.split_once(':') else {
            return false;
        };
        if name != self.name {
            return false;
        }
        let Ok(bytes) = BASE64.decode(data) else {
            return false;
        };
        let Ok(signature) = ed25519_dalek::Signature::from_slice(&bytes) else {
            return false;
        };
        self.key.verify(message.as_bytes(), &signature).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Made by `nix-store --generate-binary-cache-key test-1 sk pk` (Nix
    /// 2.8): the secret key file and the public key it printed.
    const NIX_SECRET: &str = "test-1:VUuRmFbV2QdsOYxNMpTuvbOGga2d4QJBRA7eP3vSMHNyViC+N+l4EORBtquoqACd4FlnI03CyzBbUOIA+fRPLw==";
    const NIX_PUBLIC: &str = "test-1:clYgvjfpeBDkQbarqKgAneBZZyNNwsswW1DiAPn0Ty8=";

    fn malformed(text: &str) -> String {
        match text.parse::<SecretKey>() {
            Ok(_) => panic!("{text:?} parsed as a secret key"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_nix_generated_key_gives_the_public_key_nix_printed() {
        let key: SecretKey = NIX_SECRET.parse().expect("a Nix secret key");
        assert_eq!(key.name(), "test-1");
        assert_eq!(key.public_key().to_string(), NIX_PUBLIC);
        let public: PublicKey = NIX_PUBLIC.parse().expect("a Nix public key");
        assert_eq!(public, key.public_key());
    }

    #[test]
    fn a_trailing_newline_is_fine() {
        let key: SecretKey = format!("{NIX_SECRET}\n").parse().expect("with a newline");
        assert_eq!(key.public_key().to_string(), NIX_PUBLIC);
    }

    #[test]
    fn signatures_verify_under_the_public_key_only() {
        let key: SecretKey = NIX_SECRET.parse().expect("key");
        let sig = key.sign("1;/nix/store/x;sha256:y;1;");
        assert!(sig.starts_with("test-1:"), "{sig}");
        assert!(key
            .public_key()
            .verifies("1;/nix/store/x;sha256:y;1;", &sig));
        assert!(!key
            .public_key()
            .verifies("1;/nix/store/x;sha256:y;2;", &sig));
        let other: PublicKey = "test-1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
            .parse()
            .expect("a public key");
        assert!(!other.verifies("1;/nix/store/x;sha256:y;1;", &sig));
    }

    #[test]
    fn malformed_keys_say_what_is_wrong_without_echoing_the_key() {
        assert!(malformed("").contains("empty"));
        assert!(malformed("no-colon").contains("no ':'"));
        assert!(malformed(":AAAA").contains("name"));
        assert!(malformed("name:").contains("nothing after"));
        assert!(malformed("name:!!!not base64").contains("not base-64"));
        let public = malformed(NIX_PUBLIC);
        assert!(public.contains("public key"), "{public}");
        assert!(malformed("name:AAAA").contains("3 bytes"));
        // A secret half whose public half was changed.
        let mut bytes = BASE64
            .decode(NIX_SECRET.split_once(':').map(|(_, d)| d).unwrap_or(""))
            .expect("base64");
        bytes[63] ^= 1;
        let tampered = format!("test-1:{}", BASE64.encode(&bytes));
        let err = malformed(&tampered);
        assert!(err.contains("corrupt"), "{err}");
        assert!(!err.contains(&tampered[7..]), "the key is echoed: {err}");
    }

    #[test]
    fn a_missing_file_is_a_read_error_naming_it() {
        let err = SecretKey::from_file(Path::new("/nonexistent/sluice-key")).expect_err("missing");
        let text = err.to_string();
        assert!(text.contains("/nonexistent/sluice-key"), "{text}");
        assert!(matches!(err, KeyError::Read { .. }));
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let key: SecretKey = NIX_SECRET.parse().expect("key");
        let shown = format!("{key:?}");
        assert!(!shown.contains("VUuR"), "{shown}");
    }
}
