//! Steps pinned to slots of the machine: an agent with two slots of one
//! CPU runs two steps at once, and each build, and a child it starts,
//! sees only its slot's CPU, with NIX_BUILD_CORES to match. A real agent
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
  '' ];
};
in { a = probe "a"; b = probe "b"; }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pinned_steps_run_at_once_each_on_its_own_cpu() {
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
    for id in &ids {
        let (path,): (String,) = sqlx::query_as("select path from BuildOutputs where build = $1")
            .bind(id)
            .fetch_one(&d.pool)
            .await
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        let build = lines[0].split_whitespace().last().unwrap();
        let child = lines[1].split_whitespace().last().unwrap();
        assert_eq!(build, child, "the child inherits the slot: {text}");
        assert!(build.parse::<u32>().is_ok(), "one CPU: {text}");
        assert_eq!(lines[2], "cores=1", "{text}");
        cpus.push(build.to_owned());
    }
    assert_ne!(cpus[0], cpus[1], "each step has a slot of its own");
    d.stop().await;
}
