//! An agent dies mid-build: its attempt is recorded as aborted, and the
//! step moves to the other agent and succeeds. The real driver, two real
//! agents with stores of their own.

#![allow(clippy::unwrap_used)]

#[path = "e2e/harness.rs"]
mod harness;

use std::time::{Duration, Instant};

use harness::Deployment;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_on_an_agent_that_dies_is_retried_on_another_and_succeeds() {
    let mut d = Deployment::start().await;
    d.add_agent("first", 1).await;
    let drvs = d.env.instantiate(
        r#"{ x = mkDrv { name = "survivor"; PATH = "/usr/bin:/bin"; args = [ "-c" "sleep 3; echo ok > $out" ]; }; }"#,
        &["x"],
    );
    let ids = d.submit(&[("survivor".into(), drvs[0].clone())]).await;

    assert_eq!(d.wait_building(ids[0]).await, "first");
    d.add_agent("second", 1).await;
    let killed = Instant::now();
    d.kill_agent("first");

    let statuses = d.wait_finished(&ids, 60).await;
    assert_eq!(statuses[&ids[0]], 0);
    assert!(
        killed.elapsed() < Duration::from_secs(30),
        "took {:?}",
        killed.elapsed()
    );
    let rows: Vec<(i32, String)> =
        sqlx::query_as("select status, machine from BuildSteps where build = $1 order by stepnr")
            .bind(ids[0])
            .fetch_all(&d.pool)
            .await
            .unwrap();
    assert_eq!(
        rows,
        vec![(3, "first".to_string()), (0, "second".to_string())],
        "the lost attempt aborted, the retry on the other agent succeeded"
    );
    // The output is in the queue runner's store, derived from the
    // derivation that was queued (not the agent's basic derivation).
    let out: String =
        sqlx::query_scalar("select path from BuildOutputs where build = $1 and name = 'out'")
            .bind(ids[0])
            .fetch_one(&d.pool)
            .await
            .unwrap();
    let deriver = sluice_test_support::nix::run(
        std::process::Command::new("nix-store")
            .args(["--query", "--deriver", &out])
            .env("NIX_CONFIG", sluice_test_support::nix::NIX_CONFIG),
    );
    assert_eq!(deriver.trim(), drvs[0].trim());
    d.stop().await;
}
