//! A PostgreSQL outage while builds run and finish: the results wait in
//! the queue runner and are written when the database is back. Real
//! PostgreSQL (stopped and started again), real agents, the real driver.

#![allow(clippy::unwrap_used)]

#[path = "e2e/harness.rs"]
mod harness;

use std::time::Duration;

use harness::{http_get, Deployment};

const JOBS: &str = r#"rec {
  ok1 = mkDrv { PATH = "/usr/bin:/bin"; name = "ok1"; args = [ "-c" "sleep 2; echo one > $out" ]; };
  ok2 = mkDrv { PATH = "/usr/bin:/bin"; name = "ok2"; args = [ "-c" "sleep 2; echo two > $out" ]; };
  bad = mkDrv { PATH = "/usr/bin:/bin"; name = "bad"; args = [ "-c" "sleep 2; echo broken; exit 1" ]; };
  needsBad = mkDrv { PATH = "/usr/bin:/bin"; name = "needs-bad"; dep = bad; args = [ "-c" "cat $dep > $out" ]; };
}"#;

/// The `queueRunner` object of `/status`.
async fn status(d: &Deployment) -> serde_json::Value {
    let body = http_get(d.bound.http, "/status").await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["queueRunner"].clone()
}

/// Polls `/status` until `pred` holds; panics with the last status after `secs`.
async fn wait_status(d: &Deployment, secs: u64, pred: impl Fn(&serde_json::Value) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let s = status(d).await;
        if pred(&s) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "status never matched: {s}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_that_finish_while_postgresql_is_down_are_written_when_it_is_back() {
    let mut d = Deployment::start().await;
    d.add_agent("a1", 3).await;
    let drvs = d.env.instantiate(JOBS, &["ok1", "ok2", "bad", "needsBad"]);
    let jobs: Vec<(String, String)> = ["ok1", "ok2", "bad", "needs-bad"]
        .iter()
        .zip(&drvs)
        .map(|(n, p)| (n.to_string(), p.clone()))
        .collect();
    let ids = d.submit(&jobs).await;

    // The three leaves are building.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (busy,): (i64,) =
            sqlx::query_as("select count(*) from BuildSteps where busy <> 0 and build = any($1)")
                .bind(&ids)
                .fetch_one(&d.pool)
                .await
                .unwrap();
        if busy == 3 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "steps never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The outage: every result arrives while the database is down.
    d.pg.stop();
    wait_status(&d, 60, |s| {
        s["nrStepsDone"].as_u64() >= Some(3) && s["databaseUp"] == false
    })
    .await;
    let during = status(&d).await;
    assert!(during["nrPendingWrites"].as_u64() >= Some(1), "{during}");
    assert!(during["databaseDownSince"].is_i64(), "{during}");
    // Stay down a little longer: the writer keeps retrying meanwhile.
    tokio::time::sleep(Duration::from_secs(3)).await;
    d.pg.start_again();

    let statuses = d.wait_finished(&ids, 120).await;
    assert_eq!(statuses[&ids[0]], 0, "ok1");
    assert_eq!(statuses[&ids[1]], 0, "ok2");
    assert_eq!(statuses[&ids[2]], 1, "bad failed");
    assert_eq!(statuses[&ids[3]], 2, "its dependent failed");
    wait_status(&d, 30, |s| {
        s["databaseUp"] == true && s["nrPendingWrites"].as_u64() == Some(0)
    })
    .await;

    // Nothing busy, nothing doubled, and the real results recorded.
    let (busy,): (i64,) =
        sqlx::query_as("select count(*) from BuildSteps where busy <> 0 or status is null")
            .fetch_one(&d.pool)
            .await
            .unwrap();
    assert_eq!(busy, 0, "a step row stayed busy");
    let doubled: Vec<(String,)> = sqlx::query_as(
        "select drvPath from BuildSteps where status = 0 group by drvPath having count(*) > 1",
    )
    .fetch_all(&d.pool)
    .await
    .unwrap();
    assert!(doubled.is_empty(), "built twice: {doubled:?}");
    let (bad_status, machine): (Option<i32>, String) =
        sqlx::query_as("select status, machine from BuildSteps where build = $1 and stepnr = 1")
            .bind(ids[2])
            .fetch_one(&d.pool)
            .await
            .unwrap();
    assert_eq!(bad_status, Some(1));
    assert_eq!(machine, "a1");
    let (paths,): (i64,) = sqlx::query_as(
        "select count(*) from BuildOutputs where build = any($1) and path is not null",
    )
    .bind(&ids[..2])
    .fetch_one(&d.pool)
    .await
    .unwrap();
    assert_eq!(paths, 2);
    d.stop().await;
}

const MANY: &str = r#"{
  b1 = mkDrv { PATH = "/usr/bin:/bin"; name = "b1"; args = [ "-c" "sleep 1; echo 1 > $out" ]; };
  b2 = mkDrv { PATH = "/usr/bin:/bin"; name = "b2"; args = [ "-c" "sleep 1; echo 2 > $out" ]; };
  b3 = mkDrv { PATH = "/usr/bin:/bin"; name = "b3"; args = [ "-c" "sleep 1; echo 3 > $out" ]; };
  b4 = mkDrv { PATH = "/usr/bin:/bin"; name = "b4"; args = [ "-c" "sleep 1; echo 4 > $out" ]; };
  b5 = mkDrv { PATH = "/usr/bin:/bin"; name = "b5"; args = [ "-c" "sleep 1; echo 5 > $out" ]; };
  b6 = mkDrv { PATH = "/usr/bin:/bin"; name = "b6"; args = [ "-c" "sleep 1; echo 6 > $out" ]; };
}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_write_queue_pauses_dispatch_and_loses_nothing() {
    // Room for one queued write: an outage fills it at once.
    let mut d = Deployment::start_with(|c| c.max_pending_writes = 1).await;
    d.add_agent("a1", 2).await;
    let ids = d
        .submit_attrs(MANY, &["b1", "b2", "b3", "b4", "b5", "b6"])
        .await;
    wait_status(&d, 60, |s| s["nrStepsBuilding"].as_u64() == Some(2)).await;

    d.pg.stop();
    // The writes back up behind the outage, and dispatching pauses: the
    // steps already running finish, the rest wait.
    wait_status(&d, 60, |s| {
        s["databaseUp"] == false && s["nrPendingWrites"].as_u64() >= Some(2)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let during = status(&d).await;
    assert!(
        during["nrStepsDone"].as_u64() <= Some(4),
        "dispatching went on during the outage: {during}"
    );
    d.pg.start_again();

    let statuses = d.wait_finished(&ids, 120).await;
    assert!(statuses.values().all(|s| *s == 0), "{statuses:?}");
    wait_status(&d, 30, |s| s["nrPendingWrites"].as_u64() == Some(0)).await;
    let rows: Vec<(i32, i64)> = sqlx::query_as(
        "select build, count(*) from BuildSteps where build = any($1) and status = 0 group by build",
    )
    .bind(&ids)
    .fetch_all(&d.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 6, "{rows:?}");
    assert!(rows.iter().all(|(_, n)| *n == 1), "{rows:?}");
    let (busy,): (i64,) = sqlx::query_as("select count(*) from BuildSteps where busy <> 0")
        .fetch_one(&d.pool)
        .await
        .unwrap();
    assert_eq!(busy, 0);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_writes_what_waited_in_the_backlog() {
    let mut d = Deployment::start_with(|c| c.max_pending_writes = 1).await;
    d.add_agent("a1", 2).await;
    let ids = d.submit_attrs(MANY, &["b1", "b2", "b3", "b4"]).await;
    wait_status(&d, 60, |s| s["nrStepsBuilding"].as_u64() == Some(2)).await;

    // Results pile up behind an outage, past the one-write queue.
    d.pg.stop();
    wait_status(&d, 60, |s| {
        s["nrStepsDone"].as_u64() >= Some(2) && s["nrPendingWrites"].as_u64() >= Some(3)
    })
    .await;
    // The queue runner is stopped while the database is still away; it
    // comes back within the shutdown timeout (10 s here): what waited in
    // the backlog must still be written before the queue runner exits.
    let stopping = d.begin_stopping_queue_runner();
    tokio::time::sleep(Duration::from_secs(2)).await;
    d.pg.start_again();
    tokio::time::timeout(Duration::from_secs(30), stopping)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    let (recorded,): (i64,) =
        sqlx::query_as("select count(*) from BuildSteps where build = any($1) and status = 0")
            .bind(&ids)
            .fetch_one(&d.pool)
            .await
            .unwrap();
    assert_eq!(recorded, 2, "both results that arrived during the outage");
    d.stop().await;
}
