//! Cached failures through the real driver: a step that fails for good
//! puts its outputs into `FailedPaths`; a later build that needs it
//! finishes at once, with no machine, as Hydra's users expect; a restart
//! from the web UI (which clears `FailedPaths`) builds it again, promptly.

#![allow(clippy::unwrap_used)]

#[path = "e2e/harness.rs"]
mod harness;

use std::time::{Duration, Instant};

use harness::Deployment;

const JOBS: &str = r#"rec {
  fails = mkDrv { name = "fails"; args = [ "-c" "echo nope; exit 1" ]; };
  needsFails = mkDrv { name = "needs-fails"; dep = fails; args = [ "-c" "cat $dep > $out" ]; };
}"#;

/// `(status, machine, propagatedFrom)` of every step row of `build`.
async fn steps_of(d: &Deployment, build: i32) -> Vec<(Option<i32>, String, Option<i32>)> {
    sqlx::query_as(
        "select status, machine, propagatedFrom from BuildSteps where build = $1 order by stepnr",
    )
    .bind(build)
    .fetch_all(&d.pool)
    .await
    .unwrap()
}

async fn is_cached(d: &Deployment, build: i32) -> i32 {
    sqlx::query_scalar("select isCachedBuild from Builds where id = $1")
        .bind(build)
        .fetch_one(&d.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_path_is_a_cached_failure_until_a_restart_clears_it() {
    let mut d = Deployment::start().await;
    d.add_agent("a1", 2).await;
    let drvs = d.env.instantiate(JOBS, &["fails", "needsFails"]);
    let jobs = vec![
        ("fails".to_string(), drvs[0].clone()),
        ("needs-fails".to_string(), drvs[1].clone()),
    ];

    // Built and failed: 1, and 2 for the build that needs it.
    let first = d.submit(&jobs).await;
    let statuses = d.wait_finished(&first, 60).await;
    assert_eq!((statuses[&first[0]], statuses[&first[1]]), (1, 2));
    // The dependent's row says what the failed attempt said: its own
    // status (never 2, which is for builds), error and machine.
    assert_eq!(
        steps_of(&d, first[1]).await,
        vec![(Some(1), "a1".to_string(), Some(first[0]))]
    );
    let errors: Vec<Option<String>> =
        sqlx::query_scalar("select errorMsg from BuildSteps where build = any($1) order by build")
            .bind(&first)
            .fetch_all(&d.pool)
            .await
            .unwrap();
    assert!(errors[0].is_some() && errors[0] == errors[1], "{errors:?}");
    let out: String =
        sqlx::query_scalar("select path from BuildOutputs where build = $1 and name = 'out'")
            .bind(first[0])
            .fetch_one(&d.pool)
            .await
            .unwrap();
    let in_failed_paths: i64 =
        sqlx::query_scalar("select count(*) from FailedPaths where path = $1")
            .bind(&out)
            .fetch_one(&d.pool)
            .await
            .unwrap();
    assert_eq!(in_failed_paths, 1, "{out} is in FailedPaths");

    // Queued again: cached failures at once, nothing built.
    let second = d.submit(&jobs).await;
    let statuses = d.wait_finished(&second, 30).await;
    assert_eq!((statuses[&second[0]], statuses[&second[1]]), (1, 2));
    for build in &second {
        assert_eq!(is_cached(&d, *build).await, 1, "build {build} is cached");
        assert_eq!(
            steps_of(&d, *build).await,
            vec![(Some(8), String::new(), Some(first[0]))],
            "build {build}: one cached-failure row, propagated from where it failed"
        );
    }

    // Restarted as the web UI does it: its paths leave FailedPaths.
    let restarted = Instant::now();
    d.restart_build_as_the_web_ui_does(second[0]).await;

    let statuses = d.wait_finished(&second[..1], 30).await;
    assert!(
        restarted.elapsed() < Duration::from_secs(20),
        "the restart waited {:?}",
        restarted.elapsed()
    );
    assert_eq!(statuses[&second[0]], 1, "built again, and failed again");
    assert_eq!(is_cached(&d, second[0]).await, 0);
    let rows = steps_of(&d, second[0]).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[1], (Some(1), "a1".to_string(), None), "a real build");
    d.stop().await;
}
