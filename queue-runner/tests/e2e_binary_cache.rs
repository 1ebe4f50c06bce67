//! The binary cache on the build-finish path, end to end: `serve` with a
//! signed `file://` cache builds a job with dependencies on a real agent,
//! and a fresh Nix store substitutes the outputs from the cache with
//! signatures required; the build log is there for `nix log`. With the
//! cache unwritable, a built job stays unfinished (and `/status` says it
//! waits) until the cache is back, also across a restart of the queue
//! runner. Needs root (isolated stores).
//!
//! Root writes through permission bits, so "unwritable" here is the
//! cache's directory swapped for a regular file of the same name (every
//! write and lookup under it then fails), and swapped back to heal it; or,
//! where `serve` must start with the cache broken (it creates a missing
//! `file://` directory at start, and refuses a path it cannot create), a
//! regular file where NARs go, `nar`.

#![allow(clippy::unwrap_used)]

#[path = "e2e/harness.rs"]
mod harness;

use std::path::{Path, PathBuf};
use std::time::Duration;

use harness::{generate_key, Deployment};
use sluice_binary_cache::{Compression, Destination};
use sluice_queue_runner::config::BinaryCacheConfig;
use sluice_test_support::nix::{run, IsolatedStore, NixCommands, NixEnv};

/// `top` keeps `leaf` at run time; `tool` is needed only to build it.
const JOBS: &str = r#"rec {
  leaf = mkDrv { name = "leaf"; args = [ "-c" "echo building leaf; echo leaf > $out" ]; };
  tool = mkDrv { name = "tool"; args = [ "-c" "echo building tool; echo tool-made > $out" ]; };
  top = mkDrv {
    name = "top"; inherit leaf tool;
    args = [ "-c" "echo building top-with-a-marker; read t < $tool; echo $leaf $t > $out" ];
  };
}"#;

/// A queue runner uploading to `file://<cache>`, signed with `secret`.
async fn deployment(cache: &Path, secret: Option<PathBuf>) -> Deployment {
    let destination = Destination::parse(&format!("file://{}", cache.display())).unwrap();
    Deployment::start_with(|c| {
        c.binary_cache = Some(BinaryCacheConfig {
            destination,
            signing_key_file: secret,
            compression: Compression::Zstd,
        })
    })
    .await
}

fn narinfo(cache: &Path, path: &str) -> PathBuf {
    let base = path.rsplit('/').next().unwrap();
    let hash = base.split('-').next().unwrap();
    cache.join(format!("{hash}.narinfo"))
}

fn log_file(cache: &Path, drv: &str) -> PathBuf {
    cache.join("log").join(drv.rsplit('/').next().unwrap())
}

async fn status(d: &Deployment) -> serde_json::Value {
    let text = harness::http_get(d.bound.http, "/status").await.unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Waits until `pred` holds of `/status`; panics after `secs`.
async fn wait_status(
    d: &Deployment,
    secs: u64,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let s = status(d).await;
        if pred(&s) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {secs} s; /status: {s}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until `path` exists; panics after `secs`.
async fn wait_file(path: &Path, secs: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !path.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} not there within {secs} s",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn finished(d: &Deployment, build: i32) -> i32 {
    sqlx::query_scalar("select finished from Builds where id = $1")
        .bind(build)
        .fetch_one(&d.pool)
        .await
        .unwrap()
}

/// Waits until the step that builds `drv` succeeded (its row says so).
async fn wait_step_built(d: &Deployment, drv: &str, secs: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let built: i64 =
            sqlx::query_scalar("select count(*) from BuildSteps where drvPath = $1 and status = 0")
                .bind(drv)
                .fetch_one(&d.pool)
                .await
                .unwrap();
        if built > 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{drv} not built within {secs} s; /status: {}",
            status(d).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The output path a build recorded.
async fn output(d: &Deployment, build: i32) -> String {
    sqlx::query_scalar("select path from BuildOutputs where build = $1 and name = 'out'")
        .bind(build)
        .fetch_one(&d.pool)
        .await
        .unwrap()
}

/// Makes the cache at `dir` unwritable (and unreadable): the directory
/// moves aside and a regular file takes its name. [`heal`] undoes it.
fn break_cache(dir: &Path) {
    std::fs::rename(dir, dir.with_extension("away")).unwrap();
    std::fs::write(dir, "not a directory\n").unwrap();
}

fn heal(dir: &Path) {
    std::fs::remove_file(dir).unwrap();
    std::fs::rename(dir.with_extension("away"), dir).unwrap();
}

/// Makes the cache at `dir` refuse NARs: `nar` is a regular file.
fn break_nars(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("nar"), "not a directory\n").unwrap();
}

fn heal_nars(dir: &Path) {
    std::fs::remove_file(dir.join("nar")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fresh_store_substitutes_the_outputs_of_a_finished_build_with_signatures_required() {
    let keys = tempfile::tempdir().unwrap();
    let env = NixEnv::new();
    let (secret, public) = generate_key(&env, keys.path(), "sluice-e2e-cache-1");
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let mut d = deployment(&cache, Some(secret)).await;
    d.add_agent("agent-a", 2).await;
    let drvs = d.env.instantiate(JOBS, &["top", "leaf", "tool"]);
    let ids = d.submit(&[("top".to_owned(), drvs[0].clone())]).await;
    let statuses = d.wait_finished(&ids, 180).await;
    assert_eq!(statuses[&ids[0]], 0, "{statuses:?}");

    // Finished only once its outputs and their closure are in the cache.
    let top = output(&d, ids[0]).await;
    let leaf = run(d
        .env
        .command("nix-store")
        .args(["-q", "--outputs", &drvs[1]]))
    .trim()
    .to_owned();
    let tool = run(d
        .env
        .command("nix-store")
        .args(["-q", "--outputs", &drvs[2]]))
    .trim()
    .to_owned();
    for path in [&top, &leaf] {
        assert!(
            narinfo(&cache, path).is_file(),
            "{path} is in the cache when its build is finished"
        );
    }
    // Every step's outputs go there, those needed only to build too.
    wait_file(&narinfo(&cache, &tool), 60).await;
    let info = std::fs::read_to_string(narinfo(&cache, &top)).unwrap();
    assert!(info.contains("\nSig: sluice-e2e-cache-1:"), "{info}");
    // The log, for `nix log`.
    let log = log_file(&cache, &drvs[0]);
    wait_file(&log, 60).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("building top-with-a-marker"), "{text}");

    let s = wait_status(&d, 60, "uploads done", |s| {
        s["queueRunner"]["binaryCache"]["nrUploadsPending"] == 0
            && s["queueRunner"]["binaryCache"]["nrLogsUploaded"].as_u64() >= Some(3)
    })
    .await;
    let uploads = &s["queueRunner"]["binaryCache"];
    assert_eq!(uploads["nrBuildsWaiting"], 0, "{s}");
    assert!(uploads["oldestUploadPendingS"].is_null(), "{s}");
    assert!(uploads["nrUploadsDone"].as_u64() >= Some(3), "{s}");
    assert_eq!(uploads["nrUploadFailures"], 0, "{s}");
    let metrics = harness::http_get(d.bound.http, "/metrics").await.unwrap();
    assert!(
        metrics.contains("sluice_binary_cache_uploads_pending 0"),
        "{metrics}"
    );

    // A fresh store with only the cache as substituter and only its key
    // trusted.
    let client = IsolatedStore::new();
    run(client.command("nix-store").arg("--init"));
    let xdg = tempfile::tempdir().unwrap();
    let out = client
        .command("nix-store")
        .args(["--realise", &top, "--option", "substituters"])
        .arg(format!("file://{}", cache.display()))
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
    run(client
        .command("nix-store")
        .args(["--verify-path", &top, &leaf]));
    let text = std::fs::read_to_string(client.host_path(&top)).unwrap();
    assert_eq!(text.trim(), format!("{leaf} tool-made"));
    assert!(client.host_path(&leaf).exists(), "leaf came with top");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_cache_unwritable_a_built_job_waits_unfinished_until_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let mut d = deployment(&cache, None).await;
    break_cache(&cache);
    d.add_agent("agent-a", 2).await;
    let drvs = d.env.instantiate(JOBS, &["top"]);
    let ids = d.submit(&[("top".to_owned(), drvs[0].clone())]).await;
    wait_step_built(&d, &drvs[0], 180).await;

    // Built, but its outputs cannot go to the cache: it waits.
    let s = wait_status(&d, 120, "a failed upload", |s| {
        s["queueRunner"]["binaryCache"]["nrUploadFailures"].as_u64() >= Some(1)
    })
    .await;
    let uploads = &s["queueRunner"]["binaryCache"];
    assert_eq!(uploads["nrBuildsWaiting"], 1, "{s}");
    assert!(uploads["nrUploadsPending"].as_u64() >= Some(1), "{s}");
    assert!(uploads["oldestUploadPendingS"].as_i64() >= Some(0), "{s}");
    assert!(uploads["lastUploadError"].is_string(), "{s}");
    assert_eq!(finished(&d, ids[0]).await, 0, "not finished: {s}");

    heal(&cache);
    let statuses = d.wait_finished(&ids, 120).await;
    assert_eq!(statuses[&ids[0]], 0);
    assert!(narinfo(&cache, &output(&d, ids[0]).await).is_file());
    wait_status(&d, 60, "nothing waits", |s| {
        s["queueRunner"]["binaryCache"]["nrBuildsWaiting"] == 0
    })
    .await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_build_whose_upload_was_pending_at_a_restart_is_uploaded_before_it_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    break_nars(&cache);
    let mut d = deployment(&cache, None).await;
    d.add_agent("agent-a", 2).await;
    let drvs = d.env.instantiate(JOBS, &["top"]);
    let ids = d.submit(&[("top".to_owned(), drvs[0].clone())]).await;
    wait_step_built(&d, &drvs[0], 180).await;
    wait_status(&d, 60, "the build waits for its upload", |s| {
        s["queueRunner"]["binaryCache"]["nrBuildsWaiting"] == 1
    })
    .await;

    // Stopped with the upload pending, started again with the cache still
    // unwritable: the build is loaded again, its outputs are valid, and
    // it still waits for them to be uploaded.
    d.restart_queue_runner().await;
    assert_eq!(finished(&d, ids[0]).await, 0);
    let s = wait_status(&d, 120, "the reloaded build waits for its upload", |s| {
        s["queueRunner"]["binaryCache"]["nrBuildsWaiting"] == 1
            && s["queueRunner"]["binaryCache"]["nrUploadFailures"].as_u64() >= Some(1)
    })
    .await;
    assert_eq!(finished(&d, ids[0]).await, 0, "not finished: {s}");

    heal_nars(&cache);
    let statuses = d.wait_finished(&ids, 120).await;
    assert_eq!(statuses[&ids[0]], 0);
    let top = output(&d, ids[0]).await;
    let info = std::fs::read_to_string(narinfo(&cache, &top)).unwrap();
    assert!(info.contains("\nReferences: "), "{info}");
    for reference in info
        .lines()
        .find_map(|l| l.strip_prefix("References: "))
        .unwrap()
        .split_whitespace()
    {
        assert!(
            narinfo(&cache, reference).is_file(),
            "{reference}, in the closure of {top}, is in the cache"
        );
    }
    d.stop().await;
}
