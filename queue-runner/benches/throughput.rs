//! Small-step throughput against plain Nix. Run with
//! `cargo bench -p sluice-queue-runner --bench throughput` (as root, with
//! Nix and PostgreSQL installed); prints figures. `SLUICE_BENCH_NODES`
//! changes the number of derivations (default 1,000).
//!
//! The DAG is shaped like a small nixpkgs: a bootstrap chain, then nodes
//! that each depend on the end of the chain and on up to three earlier
//! nodes (picked by a fixed-seed generator, so every run has the same
//! shape). Every node is a `/bin/sh` echo into `$out`. A fresh nonce makes
//! every run's derivations new.
//!
//! 1. Sluice: a throwaway PostgreSQL, the queue runner in-process on the
//!    host store through a private `nix-daemon`, and one real builder
//!    agent in an isolated store of its own (max-jobs 2, its own daemon),
//!    speaking real gRPC. Every node is queued as a build of its own (one
//!    evaluator transaction); timed from the queueing until every build is
//!    finished in the database.
//! 2. Nix: the same derivations instantiated in a fresh isolated store,
//!    then `nix-store --realise --max-jobs 2` of all of them, timed.
//!
//! Both use the same Nix (the system's) and the same machine, in one run.

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/e2e/harness.rs"]
mod harness;

use std::fmt::Write as _;
use std::time::Instant;

use harness::Deployment;
use sluice_test_support::nix::{run as run_command, IsolatedStore, NixCommands};

/// Nodes after the bootstrap chain.
const DEFAULT_NODES: usize = 1000;
const BOOTSTRAP: usize = 5;
/// Slots of the agent, and Nix's `--max-jobs`.
const MAX_JOBS: u32 = 2;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    runtime.block_on(bench());
}

async fn bench() {
    let nodes = std::env::var("SLUICE_BENCH_NODES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(DEFAULT_NODES);
    common::print_machine("small-step throughput bench");
    let mut deployment = Deployment::start().await;
    deployment.add_agent("agent", MAX_JOBS).await;

    let attrs: Vec<String> = (0..nodes).map(|i| format!("n{i}")).collect();
    let file = deployment.env.write_expr(&dag_expr(nodes));
    let instantiate = |store: &dyn NixCommands| -> Vec<String> {
        let mut cmd = store.command("nix-instantiate");
        cmd.arg(&file);
        for attr in &attrs {
            cmd.args(["-A", attr]);
        }
        let drvs: Vec<String> = run_command(&mut cmd)
            .lines()
            .map(|l| l.trim().to_owned())
            .filter(|l| l.ends_with(".drv"))
            .collect();
        assert_eq!(
            drvs.len(),
            attrs.len(),
            "nix-instantiate printed a path per attribute"
        );
        drvs
    };

    // The same derivations in a fresh store for Nix alone (instantiated
    // now: the expression goes with the deployment).
    let store = IsolatedStore::new();
    let drvs_for_nix = instantiate(&store);

    // 1. Sluice.
    let drvs = instantiate(&deployment.env);
    assert_eq!(drvs, drvs_for_nix, "the same derivations in both stores");
    let jobs: Vec<(String, String)> = attrs.iter().cloned().zip(drvs.iter().cloned()).collect();
    let started = Instant::now();
    let ids = deployment.submit(&jobs).await;
    let statuses = deployment.wait_finished(&ids, 1800).await;
    let sluice = started.elapsed();
    let failed = statuses.values().filter(|s| **s != 0).count();
    assert_eq!(failed, 0, "every build succeeds");
    let steps: i64 = sqlx::query_scalar("select count(*) from BuildSteps where status = 0")
        .fetch_one(&deployment.pool)
        .await
        .expect("counting steps");
    let refused: i64 = sqlx::query_scalar("select count(*) from BuildSteps where status <> 0")
        .fetch_one(&deployment.pool)
        .await
        .expect("counting failed attempts");
    let phases: (f64, f64, f64, f64) = sqlx::query_as(
        "select avg(r.fetchMs)::float8, avg(r.buildMs)::float8, avg(r.uploadMs)::float8, \
         avg((s.stopTime - s.startTime) * 1000)::float8 \
         from SluiceStepRuns r join BuildSteps s using (build, stepnr) where s.status = 0",
    )
    .fetch_one(&deployment.pool)
    .await
    .expect("reading the step runs");
    println!(
        "DAG: {BOOTSTRAP} bootstrap derivations, then {nodes} nodes on up to 3 earlier nodes each"
    );
    println!(
        "sluice: {:.2} s for {nodes} builds ({steps} steps built, {refused} attempts not \
         successful), {:.0} steps/s",
        sluice.as_secs_f64(),
        steps as f64 / sluice.as_secs_f64()
    );
    println!(
        "  per step on the agent (mean ms): fetch {:.1}, build {:.1}, upload {:.1}; \
         dispatch to result (whole seconds, mean): {:.0} ms",
        phases.0, phases.1, phases.2, phases.3
    );
    deployment.stop().await;

    // 2. Nix alone, in a fresh store.
    let drvs = drvs_for_nix;
    let started = Instant::now();
    let mut realise = store.command("nix-store");
    realise.args(["--realise", "--max-jobs", &MAX_JOBS.to_string(), "--quiet"]);
    realise.args(&drvs);
    let outputs = run_command(&mut realise);
    let nix = started.elapsed();
    assert_eq!(
        outputs.lines().count(),
        drvs.len(),
        "one output per derivation"
    );

    println!(
        "nix-store --realise --max-jobs {MAX_JOBS}: {:.2} s",
        nix.as_secs_f64()
    );
    println!(
        "ratio sluice / nix: {:.2}",
        sluice.as_secs_f64() / nix.as_secs_f64()
    );
}

/// The DAG as a Nix expression for `NixEnv::write_expr`: attributes
/// `n0`..`n{nodes-1}`.
fn dag_expr(nodes: usize) -> String {
    let mut rng = common::XorShift(0x5eed_1234_abcd_0001);
    let mut expr = String::from("rec {\n");
    for i in 0..BOOTSTRAP {
        let dep = if i == 0 {
            String::new()
        } else {
            format!("dep = boot{}; ", i - 1)
        };
        let _ = writeln!(
            expr,
            "  boot{i} = mkDrv {{ PATH = \"/usr/bin:/bin\"; name = \"boot{i}\"; {dep}args = [ \"-c\" \"echo boot{i} $dep > $out\" ]; }};"
        );
    }
    for i in 0..nodes {
        let mut deps: Vec<usize> = (0..rng.below(4))
            .filter(|_| i > 0)
            .map(|_| rng.below(i as u64) as usize)
            .collect();
        deps.sort_unstable();
        deps.dedup();
        let deps: Vec<String> = deps.iter().map(|d| format!("n{d}")).collect();
        let _ = writeln!(
            expr,
            "  n{i} = mkDrv {{ PATH = \"/usr/bin:/bin\"; name = \"n{i}\"; boot = boot{last}; deps = [ {deps} ]; args = [ \"-c\" \"echo n{i} $boot $deps > $out\" ]; }};",
            last = BOOTSTRAP - 1,
            deps = deps.join(" "),
        );
    }
    expr.push('}');
    expr
}
