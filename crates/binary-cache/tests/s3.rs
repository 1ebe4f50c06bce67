//! The uploader against an S3-compatible server: moto's (`moto_server`,
//! from PyPI; `scripts/install-deps.sh` installs it), started by the test
//! on a free port. A closure with a NAR large enough for a multipart
//! upload goes up through an `s3://…?endpoint=…&profile=…` URI, and real
//! Nix substitutes it over HTTP from the bucket with signatures required;
//! a build log stored with `log-compression=zstd` is served with that
//! `Content-Encoding` and `nix log` reads it. Needs root (an isolated
//! store).
//!
//! One test in its own binary: it sets the credentials file's variable
//! before any thread exists.

#![allow(clippy::unwrap_used)]

mod support;

use std::process::{Command, Stdio};

use sluice_binary_cache::{
    BinaryCache, CacheConfig, Compression, DaemonNarSource, Destination, SecretKey, PART_SIZE,
    WHOLE_PUT_LIMIT,
};
use sluice_test_support::nix::{NixCommands, NixDaemon, NixEnv};
use sluice_test_support::s3::Moto;
use support::*;

/// `leaf`; `big`, 20 MB of random bytes (compressed, still past the
/// single-request limit); `top`, referring to both.
const JOBS: &str = r#"rec {
  leaf = mkDrv { name = "leaf"; args = [ "-c" "echo leaf > $out" ]; };
  big = mkDrv { name = "big"; PATH = "/usr/bin:/bin";
    args = [ "-c" "head -c 20000000 /dev/urandom > $out" ]; };
  top = mkDrv { name = "top"; inherit leaf big; args = [ "-c" "echo $leaf $big > $out" ]; };
}"#;

#[test]
fn nix_substitutes_from_an_s3_bucket_and_reads_compressed_logs() {
    let creds = tempfile::tempdir().unwrap();
    let creds_file = creds.path().join("credentials");
    std::fs::write(
        &creds_file,
        "[sluice-test]\naws_access_key_id = testing\naws_secret_access_key = testing\n",
    )
    .unwrap();
    // No thread exists yet (the runtime comes below).
    std::env::set_var("AWS_SHARED_CREDENTIALS_FILE", &creds_file);

    let moto = Moto::start();
    moto.create_public_bucket("sluice-cache");
    let env = NixEnv::new();
    let drvs = env.instantiate(JOBS, &["top"]);
    let top = env.realise(&drvs[0]).remove(0);
    let daemon = NixDaemon::start();
    let key = KeyPair::generate("sluice-s3-test-1");

    let uri = format!(
        "s3://sluice-cache?region=us-east-1&endpoint={}&profile=sluice-test&log-compression=zstd",
        moto.url()
    );
    let mut config = CacheConfig::new(Destination::parse(&uri).unwrap());
    config.compression = Compression::Zstd;
    config.signing_key = Some(SecretKey::from_file(&key.secret_file()).unwrap());
    let source = DaemonNarSource::new(daemon.socket_path());
    let cache = BinaryCache::new(config.clone(), source).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    let report = runtime
        .block_on(cache.upload_closure([store_path(&top)]))
        .unwrap();
    assert_eq!(report.uploaded.len(), 3, "{report:?}");
    assert!(
        report.file_bytes > WHOLE_PUT_LIMIT && report.file_bytes > 2 * PART_SIZE as u64,
        "the big NAR went up in parts: {report:?}"
    );
    let log = b"building top\nsluice s3 log line\n".to_vec();
    let drv = store_path(&drvs[0]);
    runtime.block_on(cache.upload_log(&drv, &log[..])).unwrap();

    // The bucket as Nix's HTTP binary cache store sees it.
    let http = format!("{}/sluice-cache", moto.url());
    let headers =
        command(Command::new("curl").args(["-sfI", &format!("{http}/log/{}", drv.base_name())]));
    assert!(
        headers
            .to_ascii_lowercase()
            .contains("content-encoding: zstd"),
        "{headers}"
    );
    let client = fresh_store();
    let xdg = tempfile::tempdir().unwrap();
    let out = client
        .command("nix-store")
        .args(["--realise", &top, "--option", "substituters", &http])
        .args(["--option", "trusted-public-keys", &key.public])
        .args(["--option", "require-sigs", "true"])
        .env("XDG_CACHE_HOME", xdg.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    let big = std::fs::metadata(
        client.host_path(
            std::fs::read_to_string(client.host_path(&top))
                .unwrap()
                .split_whitespace()
                .nth(1)
                .unwrap(),
        ),
    )
    .unwrap();
    assert_eq!(big.len(), 20_000_000, "the multipart NAR arrived whole");
    let printed = command(
        env.command("nix")
            .args(["log", "--store", &http, &top])
            .env("XDG_CACHE_HOME", xdg.path()),
    );
    assert!(printed.contains("sluice s3 log line"), "{printed:?}");

    // Again, from a new uploader: the root is looked up, nothing is sent.
    let again = BinaryCache::new(config, DaemonNarSource::new(daemon.socket_path())).unwrap();
    let report = runtime
        .block_on(again.upload_closure([store_path(&top)]))
        .unwrap();
    assert!(report.uploaded.is_empty(), "{report:?}");
    assert_eq!((report.checked, report.present), (1, 1), "{report:?}");
}
