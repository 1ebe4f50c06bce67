//! Steps pinned to slots of the machine: an agent with two slots of one
//! CPU runs two steps at once, and each build, and a child it starts,
//! sees only its slot's CPU, with NIX_BUILD_CORES to match; each runs in
//! a cgroup of its own, and what a build leaves running, even outside its
//! process group, is killed when its step ends. A real agent
//! whose store is served by a `nix-daemon --stdio` child in a private
//! mount namespace (so the builds are the agent's descendants), the real
//! queue runner.

#![allow(clippy::unwrap_used)]

#[path = "e2e/harness.rs"]
mod harness;

use std::path::Path;

use harness::Deployment;
use sluice_builder_agent::config::DaemonCommand;
use sluice_builder_agent::topology::{Layout, Topology};
use sluice_builder_agent::LocalNix;
use sluice_test_support::nix::NixCommands;

const JOBS: &str = r#"
let probe = n: mkDrv {
  PATH = "/usr/bin:/bin";
  name = "probe-${n}";
  args = [ "-c" ''
    sleep 2
    grep Cpus_allowed_list /proc/self/status > $out
    sh -c 'grep Cpus_allowed_list /proc/self/status' >> $out
    echo "cores=$NIX_BUILD_CORES" >> $out
    grep /step- /proc/self/cgroup >> $out
  '' ];
};
in { a = probe "a"; b = probe "b"; }
"#;

/// A deployment with one agent of two slots of one CPU, whose store is
/// served by `nix-daemon --stdio` children it starts.
async fn pinned_agent() -> Deployment {
    let topology = Topology::read(Path::new("/sys")).unwrap();
    let layout = Layout::explicit(&topology, 2, 1).unwrap();
    let mut d = Deployment::start().await;
    let url = format!("http://{}", d.bound.grpc);
    d.add_agent_with("pinned", 2, url, |config, store| {
        // The store's own daemon, started by the agent per step.
        let mut cmd = store.command("nix-daemon");
        cmd.arg("--stdio");
        config.store = LocalNix::Command(DaemonCommand {
            program: cmd.get_program().into(),
            args: cmd.get_args().map(Into::into).collect(),
            env: cmd
                .get_envs()
                .filter_map(|(k, v)| Some((k.into(), v?.into())))
                .collect(),
        });
        config.slots = Some(layout);
    })
    .await;
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pinned_steps_run_at_once_each_on_its_own_cpu_and_cgroup() {
    let d = pinned_agent().await;
    let ids = d.submit_attrs(JOBS, &["a", "b"]).await;
    let statuses = d.wait_finished(&ids, 120).await;
    assert!(statuses.values().all(|s| *s == 0), "{statuses:?}");

    // Both ran at once.
    let times: Vec<(i32, i32)> =
        sqlx::query_as("select startTime, stopTime from BuildSteps where build = any($1)")
            .bind(&ids)
            .fetch_all(&d.pool)
            .await
            .unwrap();
    assert_eq!(times.len(), 2);
    assert!(
        times[0].0 < times[1].1 && times[1].0 < times[0].1,
        "{times:?}"
    );

    let mut cpus = Vec::new();
    let mut cgroups = Vec::new();
    for id in &ids {
        let (path,): (String,) = sqlx::query_as("select path from BuildOutputs where build = $1")
            .bind(id)
            .fetch_one(&d.pool)
            .await
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        let build = lines[0].split_whitespace().last().unwrap();
        let child = lines[1].split_whitespace().last().unwrap();
        assert_eq!(build, child, "the child inherits the slot: {text}");
        assert!(build.parse::<u32>().is_ok(), "one CPU: {text}");
        assert_eq!(lines[2], "cores=1", "{text}");
        cpus.push(build.to_owned());
        // `<id>:cpuset:/…/sluice-<pid>-<n>/step-<k>` (v1) or `0::/…` (v2).
        let cgroup = lines[3].split(':').next_back().unwrap().to_owned();
        assert!(cgroup.contains("/sluice-"), "{text}");
        cgroups.push(cgroup);
    }
    assert_ne!(cpus[0], cpus[1], "each step has a slot of its own");
    assert_ne!(cgroups[0], cgroups[1], "each step has a cgroup of its own");
    d.stop().await;
}

/// Whether process `pid` is alive (a zombie counts as gone).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, r)| !r.starts_with('Z')))
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_a_build_leaves_behind_in_a_session_of_its_own_is_killed_when_the_step_ends() {
    let d = pinned_agent().await;
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("escaped.pid");
    // The background sleep leaves the builder's process group (setsid), so
    // Nix's own kill of that group does not reach it; and without build
    // users Nix has no uid to kill by.
    let expr = format!(
        r#"{{ leaver = mkDrv {{ name = "leaver"; PATH = "/usr/bin:/bin";
    args = [ "-c" "setsid sleep 1000 </dev/null >/dev/null 2>&1 & echo $! > {p}; echo ok > $out" ]; }}; }}"#,
        p = pid_file.display()
    );
    let ids = d.submit_attrs(&expr, &["leaver"]).await;
    let statuses = d.wait_finished(&ids, 120).await;
    assert_eq!(statuses[&ids[0]], 0, "{statuses:?}");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while alive(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "process {pid}, started by a finished build, still runs"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    d.stop().await;
}
