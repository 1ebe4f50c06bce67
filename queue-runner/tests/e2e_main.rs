//! The main path, end to end: a jobset of 35 builds over a DAG with
//! diamonds and shared dependencies, built by two agents with stores of
//! their own, recorded the way Hydra's web UI reads it. Run with every
//! store on Nix 2.8, with the agents' stores on Nix 2.26, and with the
//! queue runner's store on Nix 2.26.

#![allow(clippy::unwrap_used)]

#[path = "e2e/harness.rs"]
mod harness;

use std::collections::{BTreeMap, BTreeSet};

use harness::Deployment;
use sluice_test_support::nix::{run, NixCommands, NixVersion};

/// 5 leaves, 10 middles each on two leaves, 20 tops each on two middles.
fn dag_expr() -> String {
    let mut attrs = String::new();
    let step = |name: &str, deps: &[String]| {
        let inputs: Vec<String> = deps.iter().map(|d| format!("d_{d}")).collect();
        let env: String = deps.iter().map(|d| format!("d_{d} = {d}; ")).collect();
        let cat: String = inputs
            .iter()
            .map(|i| format!("read x < ${i}; echo $x >> $out; "))
            .collect();
        format!(
            "{name} = mkDrv {{ name = \"{name}\"; {env}args = [ \"-c\" \"echo building {name}; echo {name} > $out; {cat}\" ]; }};\n"
        )
    };
    for l in 0..5 {
        attrs += &step(&format!("l{l}"), &[]);
    }
    for m in 0..10 {
        attrs += &step(
            &format!("m{m}"),
            &[format!("l{}", m % 5), format!("l{}", (m + 1) % 5)],
        );
    }
    for t in 0..20 {
        attrs += &step(
            &format!("t{t}"),
            &[format!("m{}", t % 10), format!("m{}", (t + 3) % 10)],
        );
    }
    format!("rec {{\n{attrs}}}")
}

fn names() -> Vec<String> {
    (0..5)
        .map(|i| format!("l{i}"))
        .chain((0..10).map(|i| format!("m{i}")))
        .chain((0..20).map(|i| format!("t{i}")))
        .collect()
}

fn nar_hash(store: &dyn NixCommands, path: &str) -> String {
    let json = run(store.command("nix").args(["path-info", "--json", path]));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    v[0]["narHash"].as_str().unwrap().to_string()
}

/// Builds the jobset with the queue runner's store on `queue_runner` and
/// both agents' stores on `agents`, and checks what is recorded.
async fn two_agents_build_a_jobset_of_35_builds_once_each(
    queue_runner: NixVersion,
    agents: NixVersion,
) {
    let mut d = Deployment::start_on(queue_runner, |_| {}).await;
    d.add_agent_on("agent-a", 2, agents).await;
    d.add_agent_on("agent-b", 2, agents).await;
    let names = names();
    let attrs: Vec<&str> = names.iter().map(String::as_str).collect();
    let drvs = d.env.instantiate(&dag_expr(), &attrs);
    let jobs: Vec<(String, String)> = names.iter().cloned().zip(drvs.iter().cloned()).collect();
    let ids = d.submit(&jobs).await;

    let statuses = d.wait_finished(&ids, 300).await;
    assert!(
        statuses.values().all(|s| *s == 0),
        "every build succeeds: {statuses:?}"
    );

    // Every derivation built exactly once, and nothing left busy.
    let built: Vec<(String, i64)> = sqlx::query_as(
        "select drvPath, count(*) from BuildSteps where status = 0 group by drvPath",
    )
    .fetch_all(&d.pool)
    .await
    .unwrap();
    let built: BTreeMap<String, i64> = built.into_iter().collect();
    assert_eq!(
        built.keys().cloned().collect::<BTreeSet<_>>(),
        drvs.iter().cloned().collect::<BTreeSet<_>>()
    );
    assert!(built.values().all(|n| *n == 1), "{built:?}");
    let busy: i64 = sqlx::query_scalar("select count(*) from BuildSteps where busy != 0")
        .fetch_one(&d.pool)
        .await
        .unwrap();
    assert_eq!(busy, 0);
    let machines: Vec<String> =
        sqlx::query_scalar("select distinct machine from BuildSteps order by 1")
            .fetch_all(&d.pool)
            .await
            .unwrap();
    assert_eq!(machines, ["agent-a", "agent-b"], "both agents build");

    // Builds, BuildOutputs and BuildStepOutputs as the contract says; the
    // outputs are valid in the queue runner's store with the NAR hash the
    // agent that built them has.
    for (id, drv) in ids.iter().zip(&drvs) {
        let (start, stop, cached, size, closure): (i32, i32, i32, i64, i64) = sqlx::query_as(
            "select startTime, stopTime, isCachedBuild, size, closureSize from Builds where id = $1",
        )
        .bind(id)
        .fetch_one(&d.pool)
        .await
        .unwrap();
        assert!(start > 0 && stop >= start, "build {id}: {start}..{stop}");
        assert_eq!(cached, 0);
        assert!(size > 0 && closure >= size);
        let out: String =
            sqlx::query_scalar("select path from BuildOutputs where build = $1 and name = 'out'")
                .bind(id)
                .fetch_one(&d.pool)
                .await
                .unwrap();
        let step_out: String = sqlx::query_scalar(
            "select o.path from BuildStepOutputs o join BuildSteps s using (build, stepnr)
             where s.drvPath = $1 and s.status = 0",
        )
        .bind(drv)
        .fetch_one(&d.pool)
        .await
        .unwrap();
        assert_eq!(out, step_out);
        let machine: String =
            sqlx::query_scalar("select machine from BuildSteps where drvPath = $1 and status = 0")
                .bind(drv)
                .fetch_one(&d.pool)
                .await
                .unwrap();
        let agent = d.agent(&machine);
        assert_eq!(
            nar_hash(&d.env, &out),
            nar_hash(&agent.store, &out),
            "{out}"
        );
        let notify: Option<i32> =
            sqlx::query_scalar("select notificationPendingSince from Builds where id = $1")
                .bind(id)
                .fetch_one(&d.pool)
                .await
                .unwrap();
        assert!(notify.is_some(), "build {id} awaits the notifier");
    }
    // What the web UI and Prometheus read.
    let status = harness::http_get(d.bound.http, "/status").await.unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["queueRunner"]["nrBuildsDone"], 35, "{status}");
    assert_eq!(status["queueRunner"]["machinesTotal"], 2, "{status}");
    let machines = harness::http_get(d.bound.http, "/status/machines")
        .await
        .unwrap();
    let machines: serde_json::Value = serde_json::from_str(&machines).unwrap();
    // Keyed by name, as Hydra's machines page reads them.
    let by_name = machines["machines"].as_object().unwrap();
    let hosts: Vec<&str> = by_name.keys().map(String::as_str).collect();
    assert_eq!(hosts, ["agent-a", "agent-b"]);
    assert!(by_name
        .iter()
        .all(|(name, m)| m["hostname"] == name.as_str()));
    let done: u64 = by_name
        .values()
        .map(|m| m["stats"]["nrStepsDone"].as_u64().unwrap())
        .sum();
    assert_eq!(done, 35);
    let metrics = harness::http_get(d.bound.http, "/metrics").await.unwrap();
    assert!(metrics.contains("sluice_builds_done_total 35"), "{metrics}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_agents_build_a_jobset_of_35_builds_once_each_on_nix_2_8() {
    two_agents_build_a_jobset_of_35_builds_once_each(NixVersion::Nix2_8, NixVersion::Nix2_8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_on_nix_2_26_build_a_jobset_of_35_builds_once_each() {
    two_agents_build_a_jobset_of_35_builds_once_each(NixVersion::Nix2_8, NixVersion::Nix2_26).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queue_runner_on_nix_2_26_gets_a_jobset_of_35_builds_built_once_each() {
    two_agents_build_a_jobset_of_35_builds_once_each(NixVersion::Nix2_26, NixVersion::Nix2_8).await;
}
