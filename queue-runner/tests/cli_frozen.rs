//! An agent frozen with SIGSTOP while it builds: it stops heartbeating, so
//! past its lease its step is retried on another agent; thawed, its stale
//! result changes nothing. The real executables (queue runner on its
//! embedded PostgreSQL, two builder agents).

#![allow(clippy::unwrap_used)]

mod cli;

use std::time::{Duration, Instant};

use cli::*;
use nix::sys::signal::Signal;
use sluice_test_support::nix::NixEnv;

const TOKEN: &str = "cli-frozen-token-0123456789abcdef";
const LEASE_S: u64 = 6;
const BUILD_S: u64 = 10;

const JOBS: &str = r#"{
  slow = mkDrv { PATH = "/usr/bin:/bin"; name = "slow"; args = [ "-c" "sleep 10; echo slow > $out" ]; };
}"#;

async fn rows(pool: &sqlx::PgPool) -> Vec<(Option<i32>, String, Option<String>)> {
    sqlx::query_as("select status, machine, errorMsg from BuildSteps order by stepnr")
        .fetch_all(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_agent_loses_its_step_after_the_lease_and_its_late_result_changes_nothing() {
    let dir = data_dir();
    let _leftovers = StopLeftovers(dir.path().to_path_buf());
    let tokens = token_file(dir.path(), TOKEN);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let lease = LEASE_S.to_string();
    let mut runner = serve_with(
        dir.path(),
        &tokens,
        &[
            "--grpc-listen",
            &listen,
            "--retry-interval-s",
            "1",
            "--lease-s",
            &lease,
        ],
    );
    runner.expect_line("queue runner up", Duration::from_secs(120));
    let frozen = agent_proc(port, &tokens, "frozen", 1, &[]);
    runner.expect_line("agent=frozen", Duration::from_secs(30));

    let env = NixEnv::new();
    let expr = env.write_expr(JOBS);
    submit_jobs(dir.path(), &expr, &["slow"]);
    let pool = embedded_pool(dir.path()).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while rows(&pool).await.is_empty() {
        assert!(Instant::now() < deadline, "{}", runner.output());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _spare = agent_proc(port, &tokens, "spare", 1, &[]);
    runner.expect_line("agent=spare", Duration::from_secs(30));

    frozen.signal(Signal::SIGSTOP);
    let frozen_at = Instant::now();
    let deadline = frozen_at + Duration::from_secs(LEASE_S + BUILD_S + 20);
    loop {
        let (finished,): (i32,) = sqlx::query_as("select finished from Builds")
            .fetch_one(&pool)
            .await
            .unwrap();
        if finished == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "{}", runner.output());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let took = frozen_at.elapsed();
    assert!(
        took < Duration::from_secs(LEASE_S + BUILD_S + 10),
        "retried and built within lease + build time: {took:?}"
    );
    let before = rows(&pool).await;
    assert_eq!(before.len(), 2, "{before:?}");
    assert_eq!(
        (before[0].0, before[0].1.as_str()),
        (Some(3), "frozen"),
        "{before:?}"
    );
    assert!(
        before[0].2.as_deref().unwrap_or("").contains("lease"),
        "{before:?}"
    );
    assert_eq!(
        (before[1].0, before[1].1.as_str()),
        (Some(0), "spare"),
        "{before:?}"
    );

    // Thawed, the frozen agent comes back with its stale attempt.
    frozen.signal(Signal::SIGCONT);
    frozen.expect_line("registered with the queue runner", Duration::from_secs(30));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(rows(&pool).await, before, "the late result changed nothing");
    let (status,): (Option<i32>,) = sqlx::query_as("select buildStatus from Builds")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(status, Some(0));
    pool.close().await;
    runner.signal(Signal::SIGTERM);
    assert_eq!(
        runner.wait_exit(Duration::from_secs(60)).unwrap().code(),
        Some(0)
    );
}
