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
    let lease = LEASE_S.to_string();
    let farm = Serving::start(TOKEN, &["--retry-interval-s", "1", "--lease-s", &lease]);
    let runner = &farm.runner;
    let frozen = farm.agent("frozen", 1, &[]);

    let env = NixEnv::new();
    let expr = env.write_expr(JOBS);
    submit_jobs(farm.dir.path(), &expr, &["slow"]);
    let pool = embedded_pool(farm.dir.path()).await;
    wait_first_step_row(&pool, runner).await;
    let _spare = farm.agent("spare", 1, &[]);

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
    farm.stop();
}
