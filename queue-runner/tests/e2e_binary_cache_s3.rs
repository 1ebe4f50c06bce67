//! The binary cache on the build-finish path against an S3-compatible
//! server (moto, from PyPI, started by the test): `serve` with
//! `s3://…?endpoint=…&profile=…` and a signing key builds a job with a
//! run-time dependency on a real agent, the build finishes only once its
//! closure is in the bucket, and a fresh Nix store substitutes it from the
//! bucket over HTTP with signatures required, refusing it when another
//! key is trusted. Needs root (isolated stores).
//!
//! One test in its own binary: it sets the credentials file's variable
//! before any thread exists.

#![allow(clippy::unwrap_used)]

#[path = "e2e/harness.rs"]
mod harness;

use harness::{generate_key, Deployment};
use sluice_binary_cache::{Compression, Destination};
use sluice_queue_runner::config::BinaryCacheConfig;
use sluice_test_support::nix::{run, IsolatedStore, NixCommands, NixEnv};
use sluice_test_support::s3::Moto;

const JOBS: &str = r#"rec {
  leaf = mkDrv { name = "s3-leaf"; args = [ "-c" "echo leaf > $out" ]; };
  top = mkDrv { name = "s3-top"; inherit leaf; args = [ "-c" "echo $leaf > $out" ]; };
}"#;

/// `nix-store --realise path` in `client` from `substituter`, trusting
/// only `public`, with signatures required.
fn substitute(client: &IsolatedStore, path: &str, substituter: &str, public: &str) -> bool {
    let xdg = tempfile::tempdir().unwrap();
    let out = client
        .command("nix-store")
        .args(["--realise", path, "--option", "substituters", substituter])
        .args(["--option", "trusted-public-keys", public])
        .args(["--option", "require-sigs", "true"])
        .env("XDG_CACHE_HOME", xdg.path())
        .output()
        .unwrap();
    if !out.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    }
    out.status.success()
}

#[test]
fn a_jobset_built_with_an_s3_cache_is_substituted_from_the_bucket() {
    let creds = tempfile::tempdir().unwrap();
    let creds_file = Moto::credentials_file(creds.path(), "sluice-e2e");
    // No thread exists yet (the runtime comes below).
    std::env::set_var("AWS_SHARED_CREDENTIALS_FILE", &creds_file);
    let moto = Moto::start();
    moto.create_public_bucket("sluice-e2e-cache");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let keys = tempfile::tempdir().unwrap();
        let env = NixEnv::new();
        let (secret, public) = generate_key(&env, keys.path(), "sluice-s3-e2e-1");
        let (_, other_public) = generate_key(&env, keys.path(), "someone-else-1");
        let uri = format!(
            "s3://sluice-e2e-cache?region=us-east-1&endpoint={}&profile=sluice-e2e",
            moto.url()
        );
        let destination = Destination::parse(&uri).unwrap();
        let mut d = Deployment::start_with(|c| {
            c.binary_cache = Some(BinaryCacheConfig {
                destination,
                signing_key_file: Some(secret),
                compression: Compression::Xz,
            })
        })
        .await;
        d.add_agent("agent-a", 2).await;
        let drvs = d.env.instantiate(JOBS, &["top", "leaf"]);
        let ids = d.submit(&[("top".to_owned(), drvs[0].clone())]).await;
        let statuses = d.wait_finished(&ids, 180).await;
        assert_eq!(statuses[&ids[0]], 0, "{statuses:?}");
        let top: String =
            sqlx::query_scalar("select path from BuildOutputs where build = $1 and name = 'out'")
                .bind(ids[0])
                .fetch_one(&d.pool)
                .await
                .unwrap();
        let leaf = run(d
            .env
            .command("nix-store")
            .args(["-q", "--outputs", &drvs[1]]))
        .trim()
        .to_owned();

        // The bucket as Nix's HTTP binary cache store reads it; the build
        // is finished, so its closure is there.
        let http = format!("{}/sluice-e2e-cache", moto.url());
        let client = IsolatedStore::new();
        run(client.command("nix-store").arg("--init"));
        assert!(
            !substitute(&client, &top, &http, &other_public),
            "substituted although the cache's key is not trusted"
        );
        assert!(
            substitute(&client, &top, &http, &public),
            "substituting {top} from the bucket"
        );
        run(client
            .command("nix-store")
            .args(["--verify-path", &top, &leaf]));
        let text = std::fs::read_to_string(client.host_path(&top)).unwrap();
        assert_eq!(text.trim(), leaf);
        d.stop().await;
    });
}
