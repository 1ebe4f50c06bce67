//! The queue runner's binary cache uploader as `serve` builds it: read
//! from the queue runner's store through its connection pool, uploaded to
//! a `file://` cache, and substituted by a fresh Nix store with
//! signatures required. `serve` refuses a missing signing key file before
//! it starts anything. Needs root (an isolated store).

#![allow(clippy::unwrap_used)]

#[path = "e2e/harness.rs"]
mod harness;

use harness::generate_key;
use sluice_binary_cache::{Compression, Destination};
use sluice_nix::store_path::StoreDir;
use sluice_queue_runner::binary_cache;
use sluice_queue_runner::config::{BinaryCacheConfig, ServeConfig, Settings};
use sluice_queue_runner::grpc::{LocalStore, StoreConnection};
use sluice_test_support::nix::{run, IsolatedStore, NixCommands, NixDaemon, NixEnv};

const JOBS: &str = r#"rec {
  leaf = mkDrv { name = "leaf"; args = [ "-c" "echo leaf > $out" ]; };
  top = mkDrv { name = "top"; inherit leaf; args = [ "-c" "echo $leaf > $out" ]; };
}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_uploaded_from_the_queue_runners_store_are_substituted_by_nix() {
    let env = NixEnv::new();
    let drvs = env.instantiate(JOBS, &["top"]);
    let top = env.realise(&drvs[0]).remove(0);
    let daemon = NixDaemon::start();
    let keys = tempfile::tempdir().unwrap();
    let (secret, public) = generate_key(&env, keys.path(), "sluice-qr-test-1");
    let cache_dir = tempfile::tempdir().unwrap();
    let config = BinaryCacheConfig {
        destination: Destination::parse(&format!("file://{}", cache_dir.path().display())).unwrap(),
        signing_key_file: Some(secret),
        compression: Compression::Zstd,
    };
    let store = LocalStore::new(StoreConnection::Socket(daemon.socket_path()), 2);
    let key = binary_cache::read_signing_key(&config).unwrap();
    let uploader = binary_cache::open(&config, key, store.clone()).unwrap();
    let top_path = StoreDir::default().parse_path(&top).unwrap();
    let report = uploader.upload_closure([top_path]).await.unwrap();
    assert_eq!(report.uploaded.len(), 2, "leaf and top: {report:?}");
    assert_eq!(
        store.path_infos().len(),
        2,
        "infos went through the pool's cache"
    );

    let client = IsolatedStore::new();
    run(client.command("nix-store").arg("--init"));
    let xdg = tempfile::tempdir().unwrap();
    let out = client
        .command("nix-store")
        .args(["--realise", &top, "--option", "substituters"])
        .arg(format!("file://{}", cache_dir.path().display()))
        .args(["--option", "trusted-public-keys", &public])
        .args(["--option", "require-sigs", "true"])
        .env("XDG_CACHE_HOME", xdg.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(client.host_path(&top)).unwrap();
    assert!(text.contains("-leaf-"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_a_missing_signing_key_file_before_starting_anything() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "agent:0123456789abcdef0123\n").unwrap();
    let data_dir = dir.path().join("data");
    let missing = dir.path().join("no-such-key");
    let config = ServeConfig::resolve(
        Settings::default(),
        Settings {
            agent_token_file: Some(tokens),
            data_dir: Some(data_dir.clone()),
            binary_cache: Some(format!("file://{}/cache", dir.path().display())),
            signing_key_file: Some(missing.clone()),
            ..Settings::default()
        },
    )
    .unwrap();
    let err = sluice_queue_runner::service::run(config, std::future::pending())
        .await
        .expect_err("no key file");
    let text = format!("{err:#}");
    assert!(text.contains(&missing.display().to_string()), "{text}");
    assert!(text.contains("signing key file"), "{text}");
    assert!(!data_dir.exists(), "nothing was started: {text}");
}
