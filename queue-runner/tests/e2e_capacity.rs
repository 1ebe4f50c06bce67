//! Capacity by pressure and disk: an agent whose CPU pressure is over the
//! threshold gets no new steps until it falls back, and `/status/machines`
//! shows why, with its free disk. The agent reads a fake `/proc` whose
//! pressure file the test writes; the rest is real.

#![allow(clippy::unwrap_used)]

#[path = "e2e/harness.rs"]
mod harness;

use std::time::Duration;

use harness::{http_get, Deployment};

const JOBS: &str = r#"{
  x = mkDrv { PATH = "/usr/bin:/bin"; name = "under-pressure"; args = [ "-c" "echo x > $out" ]; };
}"#;

fn pressure(avg10: f32) -> String {
    format!("some avg10={avg10:.2} avg60=0.00 avg300=0.00 total=0\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
}

async fn machine(d: &Deployment) -> serde_json::Value {
    let body = http_get(d.bound.http, "/status/machines").await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["machines"]["pressed"].clone()
}

async fn wait_machine(
    d: &Deployment,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let m = machine(d).await;
        if pred(&m) {
            return m;
        }
        assert!(tokio::time::Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_under_cpu_pressure_gets_no_new_steps_until_it_recovers() {
    let mut d = Deployment::start_with(|c| c.max_cpu_pressure = 50.0).await;
    let proc_root = tempfile::tempdir().unwrap();
    std::fs::create_dir(proc_root.path().join("pressure")).unwrap();
    let cpu = proc_root.path().join("pressure/cpu");
    std::fs::write(&cpu, pressure(90.0)).unwrap();
    let url = format!("http://{}", d.bound.grpc);
    let fake = proc_root.path().to_path_buf();
    d.add_agent_with("pressed", 1, url, move |config, _| config.proc_root = fake)
        .await;
    let paused = wait_machine(&d, |m| m["paused"].is_string()).await;
    assert!(
        paused["paused"]
            .as_str()
            .unwrap()
            .contains("CPU pressure 90.0%"),
        "{paused}"
    );
    assert_eq!(paused["hasCapacity"], false, "{paused}");
    assert!(
        paused["stats"]["storeFreeBytes"].as_u64() > Some(0),
        "{paused}"
    );
    assert!(
        paused["stats"]["buildDirFreeBytes"].as_u64() > Some(0),
        "{paused}"
    );

    let ids = d.submit_attrs(JOBS, &["x"]).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (rows,): (i64,) = sqlx::query_as("select count(*) from BuildSteps where build = $1")
        .bind(ids[0])
        .fetch_one(&d.pool)
        .await
        .unwrap();
    assert_eq!(rows, 0, "nothing is sent to a machine under pressure");

    // The pressure falls: the step goes out.
    std::fs::write(&cpu, pressure(5.0)).unwrap();
    wait_machine(&d, |m| m["paused"].is_null()).await;
    let statuses = d.wait_finished(&ids, 60).await;
    assert_eq!(statuses[&ids[0]], 0);
    d.stop().await;
}
