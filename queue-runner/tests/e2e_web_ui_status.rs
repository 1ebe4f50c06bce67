//! Status for every Hydra web UI, against a real queue runner and a real
//! agent (reading a fake `/proc` the test writes, so its load and pressure
//! are known):
//! - `/status/machines` and the `machines` of `/status` have each machine
//!   under the name `BuildSteps.machine` gives it, with the fields and
//!   types Hydra's machines page reads (`getMachines`: `systems`,
//!   `maxJobs`, `speedFactor`, features, capacities, `totalMem`, `stats`
//!   with load averages, memory, pressure, steps done and average build
//!   time) and those of the C++ queue runner's status (`enabled`,
//!   `systemTypes`, `currentJobs`, `nrStepsDone`, `avgStepBuildTime`, …);
//! - `/status` has the counters `hydra-send-stats` reads;
//! - the `SystemStatus` row `queue-runner` holds the same JSON, is current
//!   while `serve` runs, and is written again after a database outage,
//!   during which the dashboard still answers at once.

#![allow(clippy::unwrap_used)]

#[path = "e2e/harness.rs"]
mod harness;

use std::time::{Duration, Instant};

use harness::{http_get, Deployment};
use serde_json::Value;

const AGENT: &str = "web-ui-agent";

fn jobs(release: &std::path::Path) -> String {
    format!(
        r#"{{ held = mkDrv {{ PATH = "/usr/bin:/bin"; name = "web-ui-held"; args = [ "-c" "while [ ! -e {} ]; do sleep 0.2; done; echo done > $out" ]; }}; }}"#,
        release.display()
    )
}

/// A `/proc` with known figures.
fn fake_proc() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("pressure")).unwrap();
    std::fs::write(root.join("loadavg"), "1.50 0.75 0.25 1/100 4242\n").unwrap();
    std::fs::write(
        root.join("meminfo"),
        "MemTotal: 2048000 kB\nMemFree: 1 kB\nMemAvailable: 1024000 kB\n",
    )
    .unwrap();
    let psi = |a: &str, b: &str, c: &str| {
        format!("some avg10={a} avg60={b} avg300={c} total=1\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    };
    std::fs::write(root.join("pressure/cpu"), psi("12.50", "6.25", "3.00")).unwrap();
    std::fs::write(root.join("pressure/memory"), psi("1.00", "2.00", "4.00")).unwrap();
    std::fs::write(root.join("pressure/io"), psi("0.50", "0.25", "0.125")).unwrap();
    dir
}

async fn json(d: &Deployment, path: &str) -> Value {
    serde_json::from_str(&http_get(d.bound.http, path).await.unwrap()).unwrap()
}

/// The `SystemStatus` row `queue-runner`, if there is one (and the
/// database answers).
async fn status_row(d: &Deployment) -> Option<Value> {
    let text: Option<String> =
        sqlx::query_scalar("select status::text from SystemStatus where what = 'queue-runner'")
            .fetch_optional(&d.pool)
            .await
            .ok()
            .flatten();
    text.map(|t| serde_json::from_str(&t).unwrap())
}

/// Polls the row until `pred` holds; panics with the last row after a
/// minute.
async fn wait_row(d: &Deployment, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        // None while the database is away, too.
        let row: Option<Value> = tokio::time::timeout(Duration::from_secs(5), status_row(d))
            .await
            .unwrap_or_default();
        if let Some(row) = row.filter(|r| pred(r)) {
            return row;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the SystemStatus row never showed {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn is_string_array(v: &Value) -> bool {
    v.as_array().is_some_and(|a| a.iter().all(Value::is_string))
}

/// Checks one machine as Hydra's web UIs read it, with `running` steps on
/// it and `done` done.
fn check_machine(m: &Value, running: u64, done: u64) {
    // What Hydra's `getMachines` (the `/machines` page) reads.
    assert!(
        is_string_array(&m["systems"]) && m["systems"][0].is_string(),
        "{m}"
    );
    assert_eq!(m["maxJobs"], 1, "{m}");
    assert!(m["speedFactor"].is_number(), "{m}");
    assert!(is_string_array(&m["supportedFeatures"]), "{m}");
    assert!(is_string_array(&m["mandatoryFeatures"]), "{m}");
    assert_eq!(m["hasCapacity"], running == 0, "{m}");
    assert_eq!(m["hasStaticCapacity"], running == 0, "{m}");
    assert_eq!(m["hasDynamicCapacity"], true, "{m}");
    assert_eq!(m["totalMem"], 2_048_000u64 * 1024, "{m}");
    let s = &m["stats"];
    assert_eq!(s["load1"], 1.5, "{m}");
    assert_eq!(s["load5"], 0.75, "{m}");
    assert_eq!(s["load15"], 0.25, "{m}");
    assert_eq!(s["memUsage"], 1_024_000u64 * 1024, "{m}");
    let p = &s["pressure"];
    assert_eq!(
        (
            &p["cpuSome"]["avg10"],
            &p["cpuSome"]["avg60"],
            &p["cpuSome"]["avg300"]
        ),
        (&Value::from(12.5), &Value::from(6.25), &Value::from(3.0)),
        "{m}"
    );
    assert_eq!(p["memSome"]["avg300"], 4.0, "{m}");
    assert_eq!(p["ioSome"]["avg300"], 0.125, "{m}");
    assert_eq!(s["nrStepsDone"], done, "{m}");
    assert_eq!(s["currentJobs"], running, "{m}");
    assert!(s["avgStepBuildTimeMs"].is_u64(), "{m}");
    assert!(
        s["storeFreeBytes"].is_u64() && s["buildDirFreeBytes"].is_u64(),
        "{m}"
    );
    // What the C++ queue runner's status had (older web UIs read
    // `nrStepsDone` and `avgStepBuildTime` from the SystemStatus row).
    assert_eq!(m["enabled"], true, "{m}");
    assert_eq!(m["systemTypes"], m["systems"], "{m}");
    assert_eq!(m["currentJobs"], running, "{m}");
    assert_eq!(m["nrStepsDone"], done, "{m}");
    assert!(m["avgStepBuildTime"].is_f64(), "{m}");
    assert!(m["avgStepTime"].is_f64(), "{m}");
    assert!(
        m["totalStepTime"].is_u64() && m["totalStepBuildTime"].is_u64(),
        "{m}"
    );
    assert_eq!(m["idleSince"].is_i64(), running == 0, "{m}");
    assert_eq!(m["disabledUntil"], 0, "{m}");
    assert_eq!(m["lastFailure"], 0, "{m}");
    assert_eq!(m["consecutiveFailures"], 0, "{m}");
    // Sluice's own.
    assert_eq!(m["hostname"], AGENT, "{m}");
    assert_eq!(m["connected"], true, "{m}");
    assert_eq!(m["draining"], false, "{m}");
    assert!(m["paused"].is_null(), "{m}");
    assert!(m["slots"].is_array(), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machines_and_the_system_status_row_are_what_hydras_web_uis_read() {
    let mut d = Deployment::start().await;
    let proc_root = fake_proc();
    let url = format!("http://{}", d.bound.grpc);
    let fake = proc_root.path().to_path_buf();
    d.add_agent_with(AGENT, 1, url, move |config, _| config.proc_root = fake)
        .await;
    let release = tempfile::tempdir().unwrap();
    let release_file = release.path().join("release");
    let ids = d.submit_attrs(&jobs(&release_file), &["held"]).await;
    let machine = d.wait_building(ids[0]).await;
    assert_eq!(machine, AGENT);

    // While the step runs: the machine under the name its steps carry.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let machines = loop {
        let v = json(&d, "/status/machines").await;
        if v["machines"][AGENT]["stats"]["load5"] == 0.75
            && v["machines"][AGENT]["currentJobs"] == 1
        {
            break v;
        }
        assert!(tokio::time::Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        machines["machines"].is_object(),
        "keyed by name: {machines}"
    );
    assert_eq!(machines["machinesCount"], 1);
    check_machine(&machines["machines"][AGENT], 1, 0);

    let status = json(&d, "/status").await;
    check_machine(&status["machines"][AGENT], 1, 0);
    // What `hydra-send-stats` reads (it stops at the first one missing).
    let qr = &status["queueRunner"];
    assert_eq!(qr["status"], "up");
    for field in [
        "nrStepsBuilding",
        "nrStepsRunnable",
        "nrStepsUnfinished",
        "nrStepsDone",
        "nrRetries",
        "nrUnsupportedSteps",
        "maxNrRetries",
        "avgStepTimeMs",
        "avgStepBuildTimeMs",
        "nrBuildsRead",
        "nrBuildsUnfinished",
        "nrBuildsDone",
        "nrQueueWakeups",
        "machinesTotal",
        "machinesInUse",
    ] {
        assert!(qr[field].is_u64(), "queueRunner.{field}: {status}");
    }
    assert_eq!(qr["nrStepsBuilding"], 1, "{status}");
    assert_eq!(qr["nrBuildsRead"], 1, "{status}");
    assert_eq!(qr["nrStepsUnfinished"], 1, "{status}");

    // The SystemStatus row: the same JSON, current.
    let row = wait_row(&d, "the running step", |r| {
        r["queueRunner"]["nrStepsBuilding"] == 1 && r["machines"][AGENT]["currentJobs"] == 1
    })
    .await;
    check_machine(&row["machines"][AGENT], 1, 0);
    let keys = |v: &Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&row), keys(&status));
    assert_eq!(keys(&row["queueRunner"]), keys(&status["queueRunner"]));
    assert_eq!(
        keys(&row["machines"][AGENT]),
        keys(&status["machines"][AGENT])
    );
    let written = row["queueRunner"]["time"].as_i64().unwrap();
    assert!(
        (unix_now() - written).abs() <= 5,
        "row written at {written}"
    );

    // The step ends: counted on the machine, in the API and in the row.
    std::fs::write(&release_file, "").unwrap();
    let statuses = d.wait_finished(&ids, 60).await;
    assert_eq!(statuses[&ids[0]], 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let m = loop {
        let v = json(&d, "/status/machines").await;
        if v["machines"][AGENT]["nrStepsDone"] == 1 {
            break v["machines"][AGENT].clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    check_machine(&m, 0, 1);
    assert!(m["avgStepBuildTime"].as_f64().unwrap() > 0.0, "{m}");
    assert!(
        m["stats"]["avgStepBuildTimeMs"].as_u64().unwrap() > 0,
        "{m}"
    );
    let row = wait_row(&d, "the finished step", |r| {
        r["machines"][AGENT]["nrStepsDone"] == 1
    })
    .await;
    check_machine(&row["machines"][AGENT], 0, 1);

    // The database goes away: the dashboard and /status still answer at
    // once; the row is written again once it is back.
    d.pg.stop();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let asked = Instant::now();
        let page = http_get(d.bound.http, "/").await.unwrap();
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "the dashboard took {:?} without the database",
            asked.elapsed()
        );
        if page.contains("The database cannot be read") {
            assert!(page.contains(AGENT), "{page}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{page}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let status = json(&d, "/status").await;
    assert_eq!(status["queueRunner"]["status"], "up");
    tokio::time::sleep(Duration::from_secs(2)).await;
    d.pg.start_again();
    let back = unix_now();
    wait_row(&d, "a write after the outage", |r| {
        r["queueRunner"]["time"].as_i64() >= Some(back)
    })
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let page = http_get(d.bound.http, "/").await.unwrap();
        if !page.contains("The database cannot be read") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{page}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    d.stop().await;
}
