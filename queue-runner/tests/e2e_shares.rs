//! Jobset scheduling shares through the real driver and a real agent with
//! one slot: equal shares take turns, and 300:100 shares give 3:1 of the
//! build time. Shares come from `Jobsets.schedulingShares`, as the web UI
//! sets them.

#![allow(clippy::unwrap_used)]

#[path = "e2e/harness.rs"]
mod harness;

use std::time::Duration;

use harness::{http_get, Deployment};
use sluice_queue_runner::db::evaluator::{queue_builds, NewBuild};

/// Creates jobsets `(name, shares)` of project "shares", as the web UI would.
async fn jobsets(d: &Deployment, jobsets: &[(&str, i32)]) {
    sqlx::query(
        "insert into Users (userName, emailAddress, password) values ('sluice', '', '!')
         on conflict do nothing",
    )
    .execute(&d.pool)
    .await
    .unwrap();
    sqlx::query(
        "insert into Projects (name, displayName, owner) values ('shares', 'shares', 'sluice')
         on conflict do nothing",
    )
    .execute(&d.pool)
    .await
    .unwrap();
    for (name, shares) in jobsets {
        sqlx::query(
            "insert into Jobsets (project, name, emailOverride, type, nixExprInput, nixExprPath,
                                  schedulingShares)
             values ('shares', $1, '', 0, 'src', 'default.nix', $2)",
        )
        .bind(name)
        .bind(shares)
        .execute(&d.pool)
        .await
        .unwrap();
    }
}

/// Queues `n` builds of `seconds` each in `jobset`; returns their ids.
async fn queue(d: &Deployment, jobset: &str, n: usize, seconds: &str) -> Vec<i32> {
    let expr: String = (0..n)
        .map(|i| {
            format!(
                r#"j{i} = mkDrv {{ name = "{jobset}-{i}"; PATH = "/usr/bin:/bin"; args = [ "-c" "sleep {seconds}; echo > $out" ]; }};"#
            )
        })
        .collect();
    let attrs: Vec<String> = (0..n).map(|i| format!("j{i}")).collect();
    let attrs: Vec<&str> = attrs.iter().map(String::as_str).collect();
    let drvs = d.env.instantiate(&format!("{{ {expr} }}"), &attrs);
    let builds: Vec<NewBuild> = drvs
        .iter()
        .enumerate()
        .map(|(i, drv)| NewBuild {
            job: format!("{jobset}-{i}"),
            nix_name: format!("{jobset}-{i}"),
            drv_path: drv.clone(),
            system: String::new(),
            outputs: vec![("out".into(), None)],
            max_silent_s: NewBuild::DEFAULT_LIMITS.0,
            timeout_s: NewBuild::DEFAULT_LIMITS.1,
        })
        .collect();
    queue_builds(
        &d.pool,
        "shares",
        jobset,
        &builds,
        sluice_queue_runner::driver::unix_now(),
    )
    .await
    .unwrap()
}

/// Waits until the queue runner holds `n` builds.
async fn held(d: &Deployment, n: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let body = http_get(d.bound.http, "/status").await.unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if v["queueRunner"]["nrQueuedBuilds"].as_u64() == Some(n) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The jobset names of the first `n` builds to finish, in order.
async fn first_finished(d: &Deployment, n: i64) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let done: i64 = sqlx::query_scalar(
            "select count(*) from Builds b join Jobsets j on j.id = b.jobset_id
             where j.project = 'shares' and b.finished = 1",
        )
        .fetch_one(&d.pool)
        .await
        .unwrap();
        if done >= n {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {done} finished"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let statuses: Vec<i32> = sqlx::query_scalar(
        "select b.buildStatus from Builds b join Jobsets j on j.id = b.jobset_id
         where j.project = 'shares' and b.finished = 1",
    )
    .fetch_all(&d.pool)
    .await
    .unwrap();
    assert!(statuses.iter().all(|s| *s == 0), "{statuses:?}");
    sqlx::query_scalar(
        "select j.name from Builds b join Jobsets j on j.id = b.jobset_id
         where j.project = 'shares' and b.finished = 1
         order by b.startTime, b.id limit $1",
    )
    .bind(n)
    .fetch_all(&d.pool)
    .await
    .unwrap()
}

/// Waits until at least `n` builds finished; returns how many finished per
/// jobset then.
async fn count_finished(d: &Deployment, n: i64) -> std::collections::BTreeMap<String, i64> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "select j.name, count(*) from Builds b join Jobsets j on j.id = b.jobset_id
             where j.project = 'shares' and b.finished = 1 and b.buildStatus = 0
             group by j.name",
        )
        .fetch_all(&d.pool)
        .await
        .unwrap();
        let done: i64 = rows.iter().map(|(_, c)| c).sum();
        if done >= n {
            return rows.into_iter().collect();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {done} finished"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobsets_of_equal_shares_take_turns() {
    let mut d = Deployment::start().await;
    jobsets(&d, &[("left", 100), ("right", 100)]).await;
    // Long enough that start times (whole seconds) tell the order.
    queue(&d, "left", 3, "1.5").await;
    queue(&d, "right", 3, "1.5").await;
    held(&d, 6).await;
    // No step held ahead: each pick follows the shares of the moment.
    d.add_agent_without_prefetch("one-slot", 1).await;
    let order = first_finished(&d, 6).await;
    // Each build is charged its real duration, so near-equal builds may
    // reorder a pair; but they share the machine evenly, never more than
    // two in a row for one jobset.
    let left = order.iter().filter(|j| *j == "left").count();
    assert_eq!(left, 3, "{order:?}");
    assert!(
        order.windows(3).all(|w| !(w[0] == w[1] && w[1] == w[2])),
        "one jobset ran three in a row: {order:?}"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shares_of_300_to_100_give_three_times_the_build_time() {
    let mut d = Deployment::start().await;
    jobsets(&d, &[("big", 300), ("small", 100)]).await;
    // The scheduler keeps big's time within about one build of three
    // times small's; over 60 builds that is well inside 20 %.
    queue(&d, "big", 60, "0.3").await;
    queue(&d, "small", 60, "0.3").await;
    held(&d, 120).await;
    // No step held ahead: each pick follows the shares of the moment.
    d.add_agent_without_prefetch("one-slot", 1).await;
    let finished = count_finished(&d, 60).await;
    let big = finished["big"] as f64;
    let small = finished["small"] as f64;
    let ratio = big / small;
    assert!(
        (2.4..=3.6).contains(&ratio),
        "big:small = {big}:{small} over equal builds, not 3:1 within 20 %"
    );
    d.stop().await;
}
