//! The queue runner stopped dead right after it committed a step's
//! resolution (with the resolved derivation's first row, in one
//! transaction), before the resolved derivation was sent to an agent (the
//! `abort-after-resolution` failpoint), and started again: the real
//! executables on the embedded PostgreSQL, one builder agent. The restart
//! derives the same resolution again from the database and the store, and
//! records it once.

#![allow(clippy::unwrap_used)]

mod cli;

use cli::*;
use sluice_test_support::nix::NixEnv;

const TOKEN: &str = "cli-ca-restart-token-0123456789abcdef";

/// `root`, and `down` using it, both content-addressed.
fn jobs() -> String {
    format!(
        "{}{}",
        include_str!("nix/ca-prelude.nix"),
        r#"rec {
  root = ca { name = "root"; args = [ "-c" "echo root > $out" ]; };
  down = ca { name = "down"; args = [ "-c" "cat ${root} > $out; echo down >> $out" ]; };
}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_runner_stopped_right_after_a_resolution_carries_on_without_duplicates() {
    let mut farm = Serving::start_with_failpoint(
        TOKEN,
        &["--retry-interval-s", "1", "--lease-s", "3"],
        "abort-after-resolution",
    );
    let dir = farm.dir.path().to_path_buf();
    let _agent = farm.agent("local", 2, &[]);
    let env = NixEnv::new();
    let expr = env.write_expr(&jobs());
    submit_jobs(&dir, &expr, &["root", "down"]);
    farm.expect_failpoint_stop("abort-after-resolution");

    let pool = embedded_pool(&dir).await;
    let resolved: Vec<(i32, String, String)> =
        sqlx::query_as("select build, drvPath, resolvedDrvPath from BuildSteps where status = 13")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        resolved.len(),
        1,
        "the resolution was committed: {resolved:?}"
    );
    let resolved_drv = format!("/nix/store/{}", resolved[0].2);
    let rows_of_resolved =
        format!("select count(*) from BuildSteps where drvPath = '{resolved_drv}' and busy <> 0");
    assert_eq!(
        count(&pool, &rows_of_resolved).await,
        1,
        "its first row was committed with the resolution"
    );

    farm.serve_again();
    wait_all_finished(&pool, &farm.runner).await;
    assert_settled(&pool, &farm.runner.output()).await;
    // One status-13 row per build and original derivation, and one
    // successful row of the resolved derivation (the attempt the stop cut
    // short, never sent to an agent, is aborted after a lease).
    let per_build: Vec<(i32, String, i64)> = sqlx::query_as(
        "select build, drvPath, count(*) from BuildSteps where status = 13 group by 1, 2",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(per_build.iter().all(|(_, _, n)| *n == 1), "{per_build:?}");
    let statuses: Vec<(Option<i32>,)> = sqlx::query_as(&format!(
        "select status from BuildSteps where drvPath = '{resolved_drv}' order by stepnr"
    ))
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        statuses.iter().filter(|(s,)| *s == Some(0)).count(),
        1,
        "{statuses:?}\n{}",
        farm.runner.output()
    );
    pool.close().await;
    farm.stop();
}
