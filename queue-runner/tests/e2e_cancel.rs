//! Cancelling and deleting builds from the web UI while they build: the
//! build's processes on the agent are gone within 5 s, and the other
//! builds go on. The real driver, a real agent with its own store, and the
//! web UI's own SQL.

#![allow(clippy::unwrap_used)]

#[path = "e2e/harness.rs"]
mod harness;

use std::time::{Duration, Instant};

use harness::Deployment;

/// Whether process `pid` is alive (a zombie counts as gone).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next().map(str::to_owned))
        })
        .is_some_and(|state| state != "Z")
}

/// Waits for the builder to write its pid into `file`.
async fn pid_in(file: &std::path::Path) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(pid) = std::fs::read_to_string(file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            return pid;
        }
        assert!(Instant::now() < deadline, "the build never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn gone_within(pid: i32, limit: Duration) -> Duration {
    let started = Instant::now();
    while alive(pid) {
        assert!(
            started.elapsed() < limit,
            "process {pid} still runs after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    started.elapsed()
}

/// Cancels build `id`, as the web UI does it.
async fn cancel(d: &Deployment, id: i32) {
    sqlx::query(
        "update Builds set finished = 1, isCachedBuild = 0, buildStatus = 4,
         startTime = extract(epoch from now())::int, stopTime = extract(epoch from now())::int
         where id = $1 and finished = 0",
    )
    .bind(id)
    .execute(&d.pool)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_or_deleting_a_build_kills_its_processes_and_spares_the_others() {
    let mut d = Deployment::start().await;
    d.add_agent("a1", 3).await;
    let dir = tempfile::tempdir().unwrap();
    let cancel_pid = dir.path().join("cancel.pid");
    let delete_pid = dir.path().join("delete.pid");
    let expr = format!(
        r#"{{
  toCancel = mkDrv {{ name = "to-cancel"; PATH = "/usr/bin:/bin";
    args = [ "-c" "echo $$ > {c}; exec sleep 300" ]; }};
  toDelete = mkDrv {{ name = "to-delete"; PATH = "/usr/bin:/bin";
    args = [ "-c" "echo $$ > {d}; exec sleep 300" ]; }};
  other = mkDrv {{ name = "other"; PATH = "/usr/bin:/bin";
    args = [ "-c" "sleep 3; echo done > $out" ]; }};
}}"#,
        c = cancel_pid.display(),
        d = delete_pid.display()
    );
    let drvs = d.env.instantiate(&expr, &["toCancel", "toDelete", "other"]);
    let jobs: Vec<(String, String)> = ["to-cancel", "to-delete", "other"]
        .iter()
        .zip(&drvs)
        .map(|(n, p)| (n.to_string(), p.clone()))
        .collect();
    let ids = d.submit(&jobs).await;
    let cancelled = pid_in(&cancel_pid).await;
    let deleted = pid_in(&delete_pid).await;
    assert!(alive(cancelled) && alive(deleted));

    cancel(&d, ids[0]).await;
    gone_within(cancelled, Duration::from_secs(5)).await;

    // Delete, as the web UI does it.
    sqlx::query("delete from Builds where id = $1")
        .bind(ids[1])
        .execute(&d.pool)
        .await
        .unwrap();
    gone_within(deleted, Duration::from_secs(5)).await;

    let statuses = d.wait_finished(&ids[2..], 60).await;
    assert_eq!(statuses[&ids[2]], 0, "the other build went on");
    let (status,): (Option<i32>,) = sqlx::query_as("select buildStatus from Builds where id = $1")
        .bind(ids[0])
        .fetch_one(&d.pool)
        .await
        .unwrap();
    assert_eq!(status, Some(4), "the cancelled build keeps its status");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_process_of_a_cancelled_or_timed_out_build_remains_not_even_a_background_one() {
    use sluice_queue_runner::db::evaluator::{queue_builds, NewBuild};
    let mut d = Deployment::start().await;
    d.add_agent("a1", 2).await;
    let dir = tempfile::tempdir().unwrap();
    let pids = |name: &str| {
        (
            dir.path().join(format!("{name}.pid")),
            dir.path().join(format!("{name}-bg.pid")),
        )
    };
    let (cancel_main, cancel_bg) = pids("cancel");
    let (timeout_main, timeout_bg) = pids("timeout");
    // Each starts a child in the background, then waits.
    let expr = format!(
        r#"{{
  toCancel = mkDrv {{ name = "bg-cancel"; PATH = "/usr/bin:/bin";
    args = [ "-c" "sleep 1000 & echo $! > {cb}; echo $$ > {cm}; exec sleep 300" ]; }};
  toTimeOut = mkDrv {{ name = "bg-timeout"; PATH = "/usr/bin:/bin";
    args = [ "-c" "sleep 1000 & echo $! > {tb}; echo $$ > {tm}; exec sleep 300" ]; }};
}}"#,
        cb = cancel_bg.display(),
        cm = cancel_main.display(),
        tb = timeout_bg.display(),
        tm = timeout_main.display(),
    );
    let drvs = d.env.instantiate(&expr, &["toCancel", "toTimeOut"]);
    let build = |job: &str, drv: &str, timeout_s: i32| NewBuild {
        job: job.into(),
        nix_name: job.into(),
        drv_path: drv.into(),
        system: String::new(),
        outputs: vec![("out".into(), None)],
        max_silent_s: 3600,
        timeout_s,
    };
    let ids = queue_builds(
        &d.pool,
        "orphans",
        "all",
        &[
            build("bg-cancel", &drvs[0], 36000),
            build("bg-timeout", &drvs[1], 4),
        ],
        sluice_queue_runner::driver::unix_now(),
    )
    .await
    .unwrap();
    sqlx::query("notify builds_added")
        .execute(&d.pool)
        .await
        .unwrap();
    let procs = [
        pid_in(&cancel_main).await,
        pid_in(&cancel_bg).await,
        pid_in(&timeout_main).await,
        pid_in(&timeout_bg).await,
    ];
    assert!(procs.iter().all(|p| alive(*p)), "{procs:?}");

    cancel(&d, ids[0]).await;
    let statuses = d.wait_finished(&ids[1..], 60).await;
    assert_eq!(statuses[&ids[1]], 7, "timed out");
    for pid in procs {
        gone_within(pid, Duration::from_secs(5)).await;
    }
    d.stop().await;
}
