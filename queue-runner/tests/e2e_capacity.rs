//! Capacity by pressure and disk: an agent whose CPU pressure is over the
//! threshold, or whose build directory has too little free space, gets no
//! new steps until it recovers, and `/status/machines` shows why, with its
//! free disk. One agent reads a fake `/proc` whose pressure file the test
//! writes; the other builds on a small tmpfs that the test fills and
//! empties. The rest is real.

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

async fn machine(d: &Deployment, name: &str) -> serde_json::Value {
    let body = http_get(d.bound.http, "/status/machines").await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["machines"][name].clone()
}

async fn wait_machine(
    d: &Deployment,
    name: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let m = machine(d, name).await;
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
    let paused = wait_machine(&d, "pressed", |m| m["paused"].is_string()).await;
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
    assert_no_step_within(&d, ids[0], Duration::from_secs(3)).await;

    // The pressure falls: the step goes out.
    std::fs::write(&cpu, pressure(5.0)).unwrap();
    wait_machine(&d, "pressed", |m| m["paused"].is_null()).await;
    let statuses = d.wait_finished(&ids, 60).await;
    assert_eq!(statuses[&ids[0]], 0);
    d.stop().await;
}

/// Asserts that build `id` gets no step row for `wait`.
async fn assert_no_step_within(d: &Deployment, id: i32, wait: Duration) {
    tokio::time::sleep(wait).await;
    let (rows,): (i64,) = sqlx::query_as("select count(*) from BuildSteps where build = $1")
        .bind(id)
        .fetch_one(&d.pool)
        .await
        .unwrap();
    assert_eq!(rows, 0, "nothing is sent to a paused machine");
}

/// A tmpfs of `mib` MiB mounted on a temporary directory, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(mib: u64) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting a tmpfs (the test runs as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_build_directory_runs_out_of_space_gets_no_new_steps_until_space_is_freed() {
    let mut d = Deployment::start_with(|c| c.min_free_disk_mb = 32).await;
    let tmpfs = Tmpfs::mount(64);
    let filler = tmpfs.dir.path().join("filler");
    std::fs::write(&filler, vec![1u8; 48 << 20]).unwrap();
    let url = format!("http://{}", d.bound.grpc);
    let build_dir = tmpfs.dir.path().to_path_buf();
    d.add_agent_with("full", 1, url, move |config, _| {
        config.build_dir = build_dir
    })
    .await;
    let paused = wait_machine(&d, "full", |m| m["paused"].is_string()).await;
    let why = paused["paused"].as_str().unwrap();
    assert!(why.contains("MiB of free disk is under 32 MiB"), "{paused}");
    assert_eq!(paused["hasCapacity"], false, "{paused}");
    let free = paused["stats"]["buildDirFreeBytes"].as_u64().unwrap();
    assert!(
        free < 32 << 20,
        "the tmpfs's free space is reported: {paused}"
    );
    assert!(
        paused["stats"]["storeFreeBytes"].as_u64() > Some(free),
        "the store is elsewhere: {paused}"
    );

    let ids = d.submit_attrs(JOBS, &["x"]).await;
    assert_no_step_within(&d, ids[0], Duration::from_secs(3)).await;

    // Space is freed: the step goes out.
    std::fs::remove_file(&filler).unwrap();
    let recovered = wait_machine(&d, "full", |m| m["paused"].is_null()).await;
    assert!(
        recovered["stats"]["buildDirFreeBytes"].as_u64() > Some(32 << 20),
        "{recovered}"
    );
    let statuses = d.wait_finished(&ids, 60).await;
    assert_eq!(statuses[&ids[0]], 0);
    d.stop().await;
}
