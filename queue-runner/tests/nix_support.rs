//! Reading `nix-support/` from real output directories in a temporary
//! store: products (quoted paths, defaults, regular files with size and
//! sha256), the implicit `nix-build` products, metrics, the release name,
//! `failed`, and hostile outputs that try to lead the reader out of the
//! store.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use sluice_core::Status;
use sluice_queue_runner::nix_support::{
    read_outputs, read_outputs_blocking, BuildProduct, NixSupport, NixSupportError, RegularFile,
    MAX_METADATA_FILE_BYTES,
};

const HASH_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const HASH_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

/// A temporary store directory and, beside it, a directory outside it.
struct Store {
    _root: tempfile::TempDir,
    dir: PathBuf,
    outside: PathBuf,
}

impl Store {
    fn new() -> Store {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("store");
        let outside = root.path().join("outside");
        fs::create_dir_all(&dir).expect("store");
        fs::create_dir_all(&outside).expect("outside");
        fs::write(outside.join("secret"), "do not read me").expect("secret");
        Store {
            _root: root,
            dir,
            outside,
        }
    }

    /// Creates an output directory `<hash>-<name>` and returns its path.
    fn output(&self, hash: &str, name: &str) -> String {
        let path = self.dir.join(format!("{hash}-{name}"));
        fs::create_dir_all(path.join("nix-support")).expect("output");
        path.display().to_string()
    }

    fn write(&self, path: &str, contents: impl AsRef<[u8]>) {
        let path = Path::new(path);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).expect("parent");
        }
        fs::write(path, contents).expect("write");
    }

    fn read(&self, outputs: &[(&str, &str)]) -> NixSupport {
        read_outputs_blocking(&self.dir, &owned(outputs)).expect("read outputs")
    }
}

fn owned(outputs: &[(&str, &str)]) -> Vec<(String, String)> {
    outputs
        .iter()
        .map(|(n, p)| (n.to_string(), p.to_string()))
        .collect()
}

fn regular(contents: &[u8]) -> Option<RegularFile> {
    Some(RegularFile {
        size: contents.len() as u64,
        sha256: Sha256::digest(contents).into(),
    })
}

#[test]
fn declared_products_with_quoted_paths_files_and_directories() {
    let store = Store::new();
    let out = store.output(HASH_A, "hello-1.0");
    let tarball = b"not really a tarball";
    store.write(&format!("{out}/dist/hello 1.0.tar.gz"), tarball);
    store.write(&format!("{out}/share/doc/index.html"), "<html/>");
    store.write(&format!("{out}/bin/we$ird"), "x");
    store.write(
        &format!("{out}/nix-support/hydra-build-products"),
        format!(
            "file source-dist \"{out}/dist/hello 1.0.tar.gz\"\n\
             doc manual {out}/share/doc index.html\n\
             nix-build out {out}\n\
             file binary {out}/bin/../bin/we$ird\n\
             this line is not a product\n\
             file missing {out}/no-such-file\n"
        ),
    );

    let support = store.read(&[("out", &out)]);
    assert_eq!(
        support.products,
        [
            BuildProduct {
                kind: "file".into(),
                subtype: "source-dist".into(),
                path: format!("{out}/dist/hello 1.0.tar.gz"),
                name: "hello 1.0.tar.gz".into(),
                default_path: String::new(),
                file: regular(tarball),
            },
            BuildProduct {
                kind: "doc".into(),
                subtype: "manual".into(),
                path: format!("{out}/share/doc"),
                name: "doc".into(),
                default_path: "index.html".into(),
                file: None,
            },
            BuildProduct {
                kind: "nix-build".into(),
                subtype: "out".into(),
                path: out.clone(),
                name: String::new(),
                default_path: String::new(),
                file: None,
            },
            // `..` removed from the recorded path; `$` is no name character.
            BuildProduct {
                kind: "file".into(),
                subtype: "binary".into(),
                path: format!("{out}/bin/we$ird"),
                name: String::new(),
                default_path: String::new(),
                file: regular(b"x"),
            },
        ]
    );
    assert!(!support.failed);
    assert_eq!(support.build_status(), Status::Success);
    let hex = support
        .products
        .first()
        .and_then(|p| p.file)
        .map(|f| f.sha256_hex())
        .expect("a regular file");
    assert_eq!(hex, hex::encode(Sha256::digest(tarball)));
}

#[test]
fn without_a_products_file_each_directory_output_is_a_product() {
    let store = Store::new();
    let out = store.output(HASH_A, "hello-1.0");
    let dev = store.output(HASH_B, "hello-1.0-dev");
    // An output that is a single file is no product.
    let file_output = store.dir.join("cccccccccccccccccccccccccccccccc-script");
    fs::write(&file_output, "#!/bin/sh").expect("file output");
    let file_output = file_output.display().to_string();

    let support = store.read(&[("out", &out), ("dev", &dev), ("bin", &file_output)]);
    assert_eq!(
        support.products,
        [
            BuildProduct {
                kind: "nix-build".into(),
                subtype: String::new(),
                path: out.clone(),
                name: "hello-1.0".into(),
                default_path: String::new(),
                file: None,
            },
            BuildProduct {
                kind: "nix-build".into(),
                subtype: "dev".into(),
                path: dev.clone(),
                name: "hello-1.0-dev".into(),
                default_path: String::new(),
                file: None,
            },
        ]
    );
}

#[test]
fn metrics_release_name_and_failed_across_outputs() {
    let store = Store::new();
    let out = store.output(HASH_A, "hello-1.0");
    let doc = store.output(HASH_B, "hello-1.0-doc");
    store.write(
        &format!("{out}/nix-support/hydra-metrics"),
        "time 12.5 s\nlines 1000\ncoverage 87.5 %\nbroken notanumber\nbad/name 1\n",
    );
    store.write(
        &format!("{doc}/nix-support/hydra-metrics"),
        "time 13 s\npages 40 per/page\n",
    );
    store.write(
        &format!("{out}/nix-support/hydra-release-name"),
        "  hello-1.0 \n",
    );
    store.write(
        &format!("{doc}/nix-support/hydra-release-name"),
        "not valid!",
    );
    store.write(&format!("{doc}/nix-support/failed"), "");

    let support = store.read(&[("out", &out), ("doc", &doc)]);
    let metrics: Vec<(&str, f64, Option<&str>)> = support
        .metrics
        .iter()
        .map(|m| (m.name.as_str(), m.value, m.unit.as_deref()))
        .collect();
    assert_eq!(
        metrics,
        [
            ("coverage", 87.5, Some("%")),
            ("lines", 1000.0, None),
            ("pages", 40.0, None),
            ("time", 13.0, Some("s")),
        ]
    );
    assert_eq!(support.release_name.as_deref(), Some("hello-1.0"));
    assert!(support.failed);
    assert_eq!(support.build_status(), Status::FailedWithOutput);
}

#[test]
fn products_leading_out_of_the_store_are_skipped() {
    let store = Store::new();
    let out = store.output(HASH_A, "evil");
    let other = store.output(HASH_B, "other");
    store.write(&format!("{other}/file"), "in another store path");
    let secret = store.outside.join("secret");
    symlink(&secret, Path::new(&out).join("link-out")).expect("symlink out");
    symlink(&store.outside, Path::new(&out).join("dir-out")).expect("dir symlink out");
    symlink(format!("{other}/file"), Path::new(&out).join("link-in")).expect("symlink in");
    let store_dir = store.dir.display();
    store.write(
        &format!("{out}/nix-support/hydra-build-products"),
        format!(
            "file escape {out}/../../outside/secret\n\
             file absolute {}\n\
             file link {out}/link-out\n\
             file through {out}/dir-out/secret\n\
             file relative evil/file\n\
             file store-itself {store_dir}\n\
             file store-dotdot {store_dir}/..\n\
             file inside {out}/link-in\n\
             file other {other}/file\n",
            secret.display()
        ),
    );

    let support = store.read(&[("out", &out)]);
    let kept: Vec<(&str, &str, Option<RegularFile>)> = support
        .products
        .iter()
        .map(|p| (p.subtype.as_str(), p.path.as_str(), p.file))
        .collect();
    let in_other = regular(b"in another store path");
    assert_eq!(
        kept,
        [
            ("inside", format!("{out}/link-in").as_str(), in_other),
            ("other", format!("{other}/file").as_str(), in_other),
        ]
    );
}

#[test]
fn hostile_nix_support_files_are_ignored() {
    let store = Store::new();
    // nix-support/ itself a symlink out of the store.
    let a = store.dir.join(format!("{HASH_A}-a"));
    fs::create_dir_all(&a).expect("a");
    fs::write(store.outside.join("hydra-release-name"), "stolen").expect("bait");
    symlink(&store.outside, a.join("nix-support")).expect("symlink");
    // Metadata files that are symlinks, or too large.
    let b = store.output(HASH_B, "b");
    symlink(
        store.outside.join("hydra-release-name"),
        Path::new(&b).join("nix-support/hydra-release-name"),
    )
    .expect("symlink file");
    let big = fs::File::create(Path::new(&b).join("nix-support/hydra-metrics")).expect("big");
    big.set_len(MAX_METADATA_FILE_BYTES + 1).expect("sparse");
    // An output that is a symlink to a directory outside.
    let c = store.dir.join("cccccccccccccccccccccccccccccccc-c");
    fs::create_dir_all(store.outside.join("nix-support")).expect("outside nix-support");
    fs::write(store.outside.join("nix-support/failed"), "").expect("failed bait");
    symlink(&store.outside, &c).expect("output symlink");

    let a = a.display().to_string();
    let c = c.display().to_string();
    let support = store.read(&[("a", &a), ("b", &b), ("c", &c)]);
    assert_eq!(support.release_name, None);
    assert!(support.metrics.is_empty());
    assert!(!support.failed);
    // Only real directories become implicit products.
    let paths: Vec<&str> = support.products.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(paths, [a.as_str(), b.as_str()]);
}

#[test]
fn a_large_product_is_hashed_in_full() {
    let store = Store::new();
    let out = store.output(HASH_A, "big");
    let path = format!("{out}/disk.img");
    let file = fs::File::create(&path).expect("image");
    let size = 3 * 1024 * 1024 + 17;
    file.set_len(size).expect("sparse image");
    store.write(
        &format!("{out}/nix-support/hydra-build-products"),
        format!("file image {path}\n"),
    );
    let support = store.read(&[("out", &out)]);
    let zeros = vec![0u8; usize::try_from(size).expect("size")];
    assert_eq!(
        support.products.first().and_then(|p| p.file),
        regular(&zeros)
    );
}

#[test]
fn outputs_must_be_store_paths_that_exist() {
    let store = Store::new();
    let outside = store.outside.display().to_string();
    assert!(matches!(
        read_outputs_blocking(&store.dir, &owned(&[("out", &outside)])),
        Err(NixSupportError::OutputOutsideStore { .. })
    ));
    let nested = format!("{}/{HASH_A}-x/sub", store.dir.display());
    assert!(matches!(
        read_outputs_blocking(&store.dir, &owned(&[("out", &nested)])),
        Err(NixSupportError::OutputOutsideStore { .. })
    ));
    let dotdot = format!("{}/..", store.dir.display());
    assert!(matches!(
        read_outputs_blocking(&store.dir, &owned(&[("out", &dotdot)])),
        Err(NixSupportError::OutputOutsideStore { .. })
    ));
    let missing = format!("{}/{HASH_A}-missing", store.dir.display());
    assert!(matches!(
        read_outputs_blocking(&store.dir, &owned(&[("out", &missing)])),
        Err(NixSupportError::Io { .. })
    ));
}

#[tokio::test]
async fn the_async_reader_runs_off_the_runtime() {
    let store = Store::new();
    let out = store.output(HASH_A, "hello");
    store.write(&format!("{out}/nix-support/hydra-release-name"), "hello");
    let support = read_outputs(store.dir.clone(), &owned(&[("out", &out)]))
        .await
        .expect("read");
    assert_eq!(support.release_name.as_deref(), Some("hello"));
}
