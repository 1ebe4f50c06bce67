//! The queue runner stopped dead in the middle of loading a queue (the
//! `abort-mid-load` failpoint: one batch applied, the next being read,
//! more left), and started again: the real executables on the embedded
//! PostgreSQL, one builder agent. What a load holds (the builds and steps
//! it read, the copy of held derivations it keeps from batch to batch)
//! lives only in memory; the queued builds are rows. The restart loads
//! them all again, and every derivation is built once.

#![allow(clippy::unwrap_used)]

mod cli;

use std::time::Duration;

use cli::*;
use sluice_test_support::nix::NixEnv;

const TOKEN: &str = "cli-load-restart-token-0123456789abcdef";
const UP: Duration = Duration::from_secs(120);

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
    let dir = data_dir();
    let _leftovers = StopLeftovers(dir.path().to_path_buf());
    let tokens = token_file(dir.path(), TOKEN);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let args = [
        "--grpc-listen",
        listen.as_str(),
        "--load-batch",
        "1",
        "--lease-s",
        "3",
    ];

    let mut first = serve_with_env(
        dir.path(),
        &tokens,
        &args,
        &[("SLUICE_FAILPOINTS", "abort-mid-load")],
    );
    first.expect_line("queue runner up", UP);
    let _agent = agent_proc(port, &tokens, "local", 2, &[]);
    first.expect_line("agent connected", Duration::from_secs(30));
    let env = NixEnv::new();
    let expr = env.write_expr(JOBS);
    let jobs = ["t1", "t2", "t3", "t4", "mid", "base"];
    submit_jobs(dir.path(), &expr, &jobs);
    let status = first.wait_exit(Duration::from_secs(120));
    assert!(
        status.is_some_and(|s| !s.success()),
        "the failpoint stopped it: {status:?}\n{}",
        first.output()
    );
    assert!(first.output().contains("failpoint abort-mid-load"));

    let pool = embedded_pool(dir.path()).await;
    assert_eq!(
        count(&pool, "select count(*) from Builds where finished = 0").await,
        jobs.len() as i64,
        "every build is still queued"
    );

    let mut second = serve_with(dir.path(), &tokens, &args);
    second.expect_line("queue runner up", UP);
    wait_all_finished(&pool, &second).await;
    // Every build succeeded, no row is left busy, and no derivation has
    // two successful rows.
    assert_settled(&pool, &second.output()).await;
    assert_eq!(
        count(&pool, "select count(*) from BuildSteps where status = 0").await,
        jobs.len() as i64,
        "each derivation built once"
    );
    second.signal(nix::sys::signal::Signal::SIGTERM);
    second.wait_exit(Duration::from_secs(60));
}
