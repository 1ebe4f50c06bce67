//! The queue runner stopped dead in the middle of loading a queue (the
//! `abort-mid-load` failpoint: one batch applied, the next being read,
//! more left), and started again: the real executables on the embedded
//! PostgreSQL, one builder agent. What a load holds (the builds and steps
//! it read, the copy of held derivations it keeps from batch to batch)
//! lives only in memory; the queued builds are rows. The restart loads
//! them all again, and every derivation is built once.

#![allow(clippy::unwrap_used)]

mod cli;

use cli::*;
use sluice_test_support::nix::NixEnv;

const TOKEN: &str = "cli-load-restart-token-0123456789abcdef";

/// Tops over shared dependencies, so later batches read past what
/// earlier ones brought.
const JOBS: &str = r#"rec {
  base = mkDrv { PATH = "/usr/bin:/bin"; name = "lr-base"; args = [ "-c" "echo base > $out" ]; };
  mid = mkDrv { PATH = "/usr/bin:/bin"; name = "lr-mid"; b = base; args = [ "-c" "cat $b > $out" ]; };
  t1 = mkDrv { PATH = "/usr/bin:/bin"; name = "lr-t1"; m = mid; args = [ "-c" "cat $m > $out; echo 1 >> $out" ]; };
  t2 = mkDrv { PATH = "/usr/bin:/bin"; name = "lr-t2"; m = mid; args = [ "-c" "cat $m > $out; echo 2 >> $out" ]; };
  t3 = mkDrv { PATH = "/usr/bin:/bin"; name = "lr-t3"; b = base; args = [ "-c" "cat $b > $out; echo 3 >> $out" ]; };
  t4 = mkDrv { PATH = "/usr/bin:/bin"; name = "lr-t4"; m = mid; n = t1; args = [ "-c" "cat $m $n > $out" ]; };
}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_runner_stopped_mid_load_loads_every_build_again_and_builds_each_once() {
    let mut farm = Serving::start_with_failpoint(
        TOKEN,
        &["--load-batch", "1", "--lease-s", "3"],
        "abort-mid-load",
    );
    let dir = farm.dir.path().to_path_buf();
    let _agent = farm.agent("local", 2, &[]);
    let env = NixEnv::new();
    let expr = env.write_expr(JOBS);
    let jobs = ["t1", "t2", "t3", "t4", "mid", "base"];
    submit_jobs(&dir, &expr, &jobs);
    farm.expect_failpoint_stop("abort-mid-load");

    let pool = embedded_pool(&dir).await;
    assert_eq!(
        count(&pool, "select count(*) from Builds where finished = 0").await,
        jobs.len() as i64,
        "every build is still queued"
    );

    farm.serve_again();
    wait_all_finished(&pool, &farm.runner).await;
    // Every build succeeded, no row is left busy, and no derivation has
    // two successful rows.
    assert_settled(&pool, &farm.runner.output()).await;
    assert_eq!(
        count(&pool, "select count(*) from BuildSteps where status = 0").await,
        jobs.len() as i64,
        "each derivation built once"
    );
    pool.close().await;
    farm.stop();
}
