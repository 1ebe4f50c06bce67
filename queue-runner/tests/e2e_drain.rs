//! Draining an agent, as SIGTERM does: it takes no new steps, lets the
//! running one finish and delivers it, then stops; a second signal stops
//! the running step, which is reported aborted and retried elsewhere. A
//! step held ahead of the agent's slots is given back unstarted, at no
//! cost of a try.
//! Real agents in their own stores, the real driver.

#![allow(clippy::unwrap_used)]

#[path = "e2e/harness.rs"]
mod harness;

use std::time::Duration;

use harness::{http_get, Deployment};

const JOBS: &str = r#"{
  slow = mkDrv { PATH = "/usr/bin:/bin"; name = "slow"; args = [ "-c" "echo started slow; sleep 10; echo slow > $out" ]; };
  quick = mkDrv { PATH = "/usr/bin:/bin"; name = "quick"; args = [ "-c" "echo quick > $out" ]; };
}"#;

/// Step rows of a build: status, machine, error.
async fn rows(d: &Deployment, build: i32) -> Vec<(Option<i32>, String, Option<String>)> {
    sqlx::query_as(
        "select status, machine, errorMsg from BuildSteps where build = $1 order by stepnr",
    )
    .bind(build)
    .fetch_all(&d.pool)
    .await
    .unwrap()
}

/// `draining` of machine `name` in `/status/machines`.
async fn draining(d: &Deployment, name: &str) -> Option<bool> {
    let body = http_get(d.bound.http, "/status/machines").await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["machines"]
        .get(name)
        .and_then(|m| m["draining"].as_bool())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_agent_finishes_its_step_takes_no_new_one_and_stops() {
    let mut d = Deployment::start().await;
    // a1 first: with two slots it would take the second step too.
    d.add_agent("a1", 2).await;
    let slow = d.submit_attrs(JOBS, &["slow"]).await;
    assert_eq!(d.wait_building(slow[0]).await, "a1");
    d.add_agent("a2", 1).await;

    d.drain_agent("a1");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while draining(&d, "a1").await != Some(true) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a1 never showed as draining"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let quick = d.submit_attrs(JOBS, &["quick"]).await;

    let statuses = d.wait_finished(&[slow[0], quick[0]], 60).await;
    assert_eq!(statuses[&slow[0]], 0);
    assert_eq!(statuses[&quick[0]], 0);
    // The running step finished where it ran, once; the new one went to
    // the other agent, with no refusal on the way.
    assert_eq!(rows(&d, slow[0]).await, [(Some(0), "a1".into(), None)]);
    assert_eq!(rows(&d, quick[0]).await, [(Some(0), "a2".into(), None)]);
    // Then the drained agent stops by itself, cleanly.
    d.agent_exit("a1", 30).await.unwrap();
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_stops_the_running_step_which_is_retried_elsewhere() {
    let mut d = Deployment::start().await;
    d.add_agent("a1", 1).await;
    let slow = d.submit_attrs(JOBS, &["slow"]).await;
    d.wait_building(slow[0]).await;
    d.add_agent("a2", 1).await;

    d.drain_agent("a1");
    tokio::time::sleep(Duration::from_millis(500)).await;
    d.abort_agent("a1");
    d.agent_exit("a1", 30).await.unwrap();

    let statuses = d.wait_finished(&slow, 60).await;
    assert_eq!(statuses[&slow[0]], 0);
    let rows = rows(&d, slow[0]).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!((rows[0].0, rows[0].1.as_str()), (Some(3), "a1"), "{rows:?}");
    assert!(
        rows[0].2.as_deref().unwrap_or("").contains("stopped"),
        "{rows:?}"
    );
    assert_eq!((rows[1].0, rows[1].1.as_str()), (Some(0), "a2"), "{rows:?}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_held_ahead_is_given_back_on_drain_and_costs_no_try() {
    // One try, and an hour before a retry: a refusal that cost a try would
    // fail the build, and one that cost a retry interval would not let it
    // finish within the test.
    let mut d = Deployment::start_with(|c| {
        c.max_tries = 1;
        c.retry_interval = Duration::from_secs(3600);
    })
    .await;
    // One slot, and one step ahead of it (the agents' default).
    d.add_agent("a1", 1).await;
    let slow = d.submit_attrs(JOBS, &["slow"]).await;
    assert_eq!(d.wait_building(slow[0]).await, "a1");
    let quick = d.submit_attrs(JOBS, &["quick"]).await;
    // a1 holds `quick` ahead while `slow` builds: its row is open on a1.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while rows(&d, quick[0]).await != [(None, "a1".to_string(), None)] {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a1 never took the second step ahead: {:?}",
            rows(&d, quick[0]).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    d.drain_agent("a1");
    d.add_agent("a2", 1).await;
    let statuses = d.wait_finished(&[slow[0], quick[0]], 60).await;
    assert_eq!(statuses[&slow[0]], 0);
    assert_eq!(
        statuses[&quick[0]], 0,
        "the refusal cost the step its one try"
    );
    assert_eq!(rows(&d, slow[0]).await, [(Some(0), "a1".into(), None)]);
    // The refused attempt is recorded as aborted on a1, and the step was
    // built on a2 at once.
    let quick_rows = rows(&d, quick[0]).await;
    let (last, refused) = quick_rows.split_last().unwrap();
    assert_eq!(last, &(Some(0), "a2".to_string(), None), "{quick_rows:?}");
    assert!(!refused.is_empty(), "{quick_rows:?}");
    for row in refused {
        assert_eq!((row.0, row.1.as_str()), (Some(3), "a1"), "{quick_rows:?}");
        assert!(
            row.2.as_deref().unwrap_or("").contains("draining"),
            "{quick_rows:?}"
        );
    }
    d.agent_exit("a1", 30).await.unwrap();
    d.stop().await;
}
