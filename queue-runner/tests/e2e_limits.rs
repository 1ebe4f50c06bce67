//! Limits, end to end through the real driver and a real agent: max silent
//! time and timeout give 7, the log limit 10, the output limit 11; a step
//! shared by builds gets the largest limits among them.

#![allow(clippy::unwrap_used)]

#[path = "e2e/harness.rs"]
mod harness;

use std::collections::BTreeMap;

use harness::Deployment;
use sluice_queue_runner::db::evaluator::{queue_builds, NewBuild};

const JOBS: &str = r#"{
  silent = mkDrv { name = "silent"; PATH = "/usr/bin:/bin"; args = [ "-c" "sleep 30" ]; };
  slow = mkDrv { name = "slow"; PATH = "/usr/bin:/bin";
    args = [ "-c" "for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do echo tick; sleep 1; done" ]; };
  chatty = mkDrv { name = "chatty"; PATH = "/usr/bin:/bin";
    args = [ "-c" "i=0; while [ $i -lt 3000 ]; do echo 'a line of log that is long enough to add up'; i=$((i+1)); done; echo x > $out" ]; };
  big = mkDrv { name = "big"; PATH = "/usr/bin:/bin";
    args = [ "-c" "head -c 2000000 /dev/zero > $out" ]; };
  shared = mkDrv { name = "shared"; PATH = "/usr/bin:/bin"; args = [ "-c" "sleep 4; echo ok > $out" ]; };
}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_give_their_statuses_and_a_shared_step_gets_the_largest() {
    let mut d = Deployment::start_with(|c| {
        c.max_log_bytes = 20_000;
        c.max_output_bytes = 500_000;
    })
    .await;
    let names = ["silent", "slow", "chatty", "big", "shared"];
    let drvs: BTreeMap<&str, String> = names
        .iter()
        .copied()
        .zip(d.env.instantiate(JOBS, &names))
        .collect();
    // (job, derivation, max silent, timeout)
    let jobs = [
        ("silent", "silent", 2, 3600),
        ("slow", "slow", 3600, 3),
        ("chatty", "chatty", 3600, 36000),
        ("big", "big", 3600, 36000),
        // One step, two builds: 2 s alone would time it out; the other
        // build allows an hour.
        ("shared-tight", "shared", 3600, 2),
        ("shared-loose", "shared", 3600, 3600),
    ];
    let builds: Vec<NewBuild> = jobs
        .iter()
        .map(|(job, drv, max_silent_s, timeout_s)| NewBuild {
            job: job.to_string(),
            nix_name: drv.to_string(),
            drv_path: drvs[drv].clone(),
            system: String::new(),
            outputs: vec![("out".into(), None)],
            max_silent_s: *max_silent_s,
            timeout_s: *timeout_s,
        })
        .collect();
    let ids = queue_builds(
        &d.pool,
        "limits",
        "all",
        &builds,
        sluice_queue_runner::driver::unix_now(),
    )
    .await
    .unwrap();
    // The agent comes once every build is loaded.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let body = harness::http_get(d.bound.http, "/status").await.unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if v["queueRunner"]["nrQueuedBuilds"].as_u64() == Some(6) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    d.add_agent("a1", 6).await;

    let statuses = d.wait_finished(&ids, 120).await;
    let got: Vec<(&str, i32)> = jobs
        .iter()
        .zip(&ids)
        .map(|((job, ..), id)| (*job, statuses[id]))
        .collect();
    assert_eq!(
        got,
        vec![
            ("silent", 7),
            ("slow", 7),
            ("chatty", 10),
            ("big", 11),
            ("shared-tight", 0),
            ("shared-loose", 0),
        ]
    );
    d.stop().await;
}
