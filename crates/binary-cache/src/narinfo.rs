//! `.narinfo` files as Nix reads them, and the fingerprint their
//! signatures sign.
//!
//! Nix (2.8 and later alike) reads a `.narinfo` line by line as
//! `Name: value`; it requires `StorePath`, `URL`, `NarHash` and a non-zero
//! `NarSize`, takes a missing `Compression` for bzip2 (so it is always
//! written), and lists `References` and `Deriver` as base names. Lines are
//! written in the order Nix writes them itself.
//!
//! The fingerprint is `1;<store path>;<NAR hash as sha256:nix32>;<NAR
//! size>;<references as full paths, sorted, comma-separated>`, the
//! references including a self-reference when the path has one.
//!
//! Invariant: the fingerprint and the `References:` line are made from the
//! same sorted set, so a narinfo's signature is over what it advertises.

use std::collections::BTreeSet;

use sluice_nix::hash::{Base, Hash};
use sluice_nix::store_path::{StoreDir, StorePath};

use crate::compression::Compression;
use crate::key::SecretKey;

/// Everything a `.narinfo` says about one store path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    pub path: StorePath,
    /// Where the compressed NAR is, relative to the cache's root.
    pub url: String,
    pub compression: Compression,
    /// SHA-256 of the compressed NAR, and its length.
    pub file_hash: Hash,
    pub file_size: u64,
    /// SHA-256 of the NAR, and its length.
    pub nar_hash: Hash,
    pub nar_size: u64,
    pub references: BTreeSet<StorePath>,
    pub deriver: Option<StorePath>,
    pub sigs: Vec<String>,
    /// The content address as Nix renders it (`fixed:r:sha256:…`,
    /// `text:sha256:…`), for content-addressed paths.
    pub ca: Option<String>,
}

/// The object key of a path's `.narinfo`: `<hash part>.narinfo`.
pub fn narinfo_key(path: &StorePath) -> String {
    format!("{}.narinfo", path.hash_part())
}

/// The object key of a compressed NAR: `nar/<file hash, nix32>.nar<ext>`.
pub fn nar_key(file_hash: &Hash, compression: Compression) -> String {
    format!(
        "nar/{}.nar{}",
        file_hash.format(Base::Nix32, false),
        compression.extension()
    )
}

/// The signed message of a path: see the module documentation.
pub fn fingerprint(
    dir: &StoreDir,
    path: &StorePath,
    nar_hash: &Hash,
    nar_size: u64,
    references: &BTreeSet<StorePath>,
) -> String {
    let mut out = format!(
        "1;{};{};{};",
        dir.print(path),
        nar_hash.format(Base::Nix32, true),
        nar_size
    );
    for (i, r) in references.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&dir.print(r));
    }
    out
}

impl NarInfo {
    /// This path's fingerprint (see [`fingerprint`]).
    pub fn fingerprint(&self, dir: &StoreDir) -> String {
        fingerprint(
            dir,
            &self.path,
            &self.nar_hash,
            self.nar_size,
            &self.references,
        )
    }

    /// Adds `key`'s signature of the fingerprint.
    pub fn sign(&mut self, dir: &StoreDir, key: &SecretKey) {
        let sig = key.sign(&self.fingerprint(dir));
        if !self.sigs.contains(&sig) {
            self.sigs.push(sig);
        }
    }

    /// The `.narinfo` text.
    pub fn render(&self, dir: &StoreDir) -> String {
        let mut out = String::with_capacity(512 + 64 * self.references.len());
        let mut line = |name: &str, value: &str| {
            out.push_str(name);
            out.push_str(": ");
            out.push_str(value);
            out.push('\n');
        };
        line("StorePath", &dir.print(&self.path));
        line("URL", &self.url);
        line("Compression", self.compression.name());
        line("FileHash", &self.file_hash.format(Base::Nix32, true));
        line("FileSize", &self.file_size.to_string());
        line("NarHash", &self.nar_hash.format(Base::Nix32, true));
        line("NarSize", &self.nar_size.to_string());
        let refs: Vec<&str> = self.references.iter().map(StorePath::base_name).collect();
        line("References", &refs.join(" "));
        if let Some(deriver) = &self.deriver {
            line("Deriver", deriver.base_name());
        }
        for sig in &self.sigs {
            line("Sig", sig);
        }
        if let Some(ca) = &self.ca {
            line("CA", ca);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(base: &str) -> StorePath {
        StorePath::from_base_name(base).expect("a store path")
    }

    /// A made-up path info (well-formed hashes and paths, not a real
    /// store's) that refers to itself and to another path. That Nix reads
    /// and accepts what is rendered is tested against real Nix in
    /// `tests/nix_substitutes.rs`.
    fn example() -> NarInfo {
        NarInfo {
            path: path("8ak1s2gr1bxzf9b3v2q8wr8f1i4s3k0p-hello"),
            url: "nar/0q2bq1lcj2zsk4h3s0n4a3r2pdfzjx5g0jcqlz3gj5p5qb5vmyz5.nar.zst".into(),
            compression: Compression::Zstd,
            file_hash: Hash::parse_prefixed(
                "sha256:0q2bq1lcj2zsk4h3s0n4a3r2pdfzjx5g0jcqlz3gj5p5qb5vmyz5",
            )
            .expect("hash"),
            file_size: 120,
            nar_hash: Hash::parse_prefixed(
                "sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s",
            )
            .expect("hash"),
            nar_size: 128,
            references: [
                path("8ak1s2gr1bxzf9b3v2q8wr8f1i4s3k0p-hello"),
                path("0c4bxvbw6czbkgvqhm6f6srgs7hcjcnq-dep"),
            ]
            .into_iter()
            .collect(),
            deriver: Some(path("9v1zbl4qgv0kp8xf9bw4g7c8lm6l0n7w-hello.drv")),
            sigs: Vec::new(),
            ca: None,
        }
    }

    #[test]
    fn renders_every_field_in_nix_order() {
        let text = example().render(&StoreDir::default());
        assert_eq!(
            text,
            "StorePath: /nix/store/8ak1s2gr1bxzf9b3v2q8wr8f1i4s3k0p-hello\n\
             URL: nar/0q2bq1lcj2zsk4h3s0n4a3r2pdfzjx5g0jcqlz3gj5p5qb5vmyz5.nar.zst\n\
             Compression: zstd\n\
             FileHash: sha256:0q2bq1lcj2zsk4h3s0n4a3r2pdfzjx5g0jcqlz3gj5p5qb5vmyz5\n\
             FileSize: 120\n\
             NarHash: sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s\n\
             NarSize: 128\n\
             References: 0c4bxvbw6czbkgvqhm6f6srgs7hcjcnq-dep 8ak1s2gr1bxzf9b3v2q8wr8f1i4s3k0p-hello\n\
             Deriver: 9v1zbl4qgv0kp8xf9bw4g7c8lm6l0n7w-hello.drv\n"
        );
    }

    #[test]
    fn the_fingerprint_lists_full_reference_paths_sorted() {
        assert_eq!(
            example().fingerprint(&StoreDir::default()),
            "1;/nix/store/8ak1s2gr1bxzf9b3v2q8wr8f1i4s3k0p-hello;\
             sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s;128;\
             /nix/store/0c4bxvbw6czbkgvqhm6f6srgs7hcjcnq-dep,\
             /nix/store/8ak1s2gr1bxzf9b3v2q8wr8f1i4s3k0p-hello"
        );
        let mut leaf = example();
        leaf.references.clear();
        assert!(leaf.fingerprint(&StoreDir::default()).ends_with(";128;"));
    }

    #[test]
    fn a_signed_ca_path_lists_sig_then_ca_and_no_deriver_when_unknown() {
        let key: SecretKey =
            "test-1:VUuRmFbV2QdsOYxNMpTuvbOGga2d4QJBRA7eP3vSMHNyViC+N+l4EORBtquoqACd4FlnI03CyzBbUOIA+fRPLw=="
                .parse()
                .expect("key");
        let mut info = example();
        info.deriver = None;
        info.ca =
            Some("fixed:r:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s".into());
        info.sign(&StoreDir::default(), &key);
        info.sign(&StoreDir::default(), &key);
        let text = info.render(&StoreDir::default());
        let tail: Vec<&str> = text.lines().skip(7).collect();
        assert_eq!(tail.len(), 3, "{text}");
        assert!(tail[0].starts_with("References: "));
        assert!(tail[1].starts_with("Sig: test-1:"));
        assert_eq!(
            tail[2],
            "CA: fixed:r:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s"
        );
        let sig = tail[1].trim_start_matches("Sig: ");
        assert!(key
            .public_key()
            .verifies(&info.fingerprint(&StoreDir::default()), sig));
    }

    #[test]
    fn keys_follow_nix_naming() {
        let info = example();
        assert_eq!(
            narinfo_key(&info.path),
            "8ak1s2gr1bxzf9b3v2q8wr8f1i4s3k0p.narinfo"
        );
        assert_eq!(
            nar_key(&info.file_hash, Compression::Xz),
            "nar/0q2bq1lcj2zsk4h3s0n4a3r2pdfzjx5g0jcqlz3gj5p5qb5vmyz5.nar.xz"
        );
        assert_eq!(
            nar_key(&info.file_hash, Compression::None),
            "nar/0q2bq1lcj2zsk4h3s0n4a3r2pdfzjx5g0jcqlz3gj5p5qb5vmyz5.nar"
        );
    }
}
