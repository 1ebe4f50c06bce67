//! Latency of the queue runner's dispatch path, end to end. Run with
//! `cargo bench -p sluice-queue-runner --bench latency` (as root, with Nix
//! and PostgreSQL installed); prints figures.
//!
//! Setup: a throwaway PostgreSQL, a private `nix-daemon` on the host store,
//! and the whole queue runner in-process (`service::run_with`, real gRPC on
//! loopback). One simulated agent speaks the real `sluice.v1` protocol
//! (version, registration, heartbeats, the work stream, `UploadNar`,
//! `ReportResult`). On an assignment it "builds" at once: for each
//! input-addressed output of the basic derivation it writes a small file,
//! encodes its NAR with `sluice_nix::nar::dump_path`, uploads it (the queue
//! runner verifies and imports it into its store) and reports success.
//!
//! Measured:
//! 1. `builds_added` → first dispatch: from `submit::queue` returning (the
//!    evaluator's transaction committed, which delivers `builds_added`) to
//!    the agent receiving the assignment of the build's one ready step.
//! 2. runnable → assignment: on chains of derivations (each needs the
//!    previous one's output), from `ReportResult` returning for one step to
//!    the agent receiving the assignment of the next, for one chain at a
//!    time and for eight chains at once.
//! 3. The cost of one dispatch decision is the core's own bench.
//!
//! Everything started here is stopped on the way out; the harness types
//! (`TestPg`, `NixDaemon`, temporary directories) clean up on drop, also
//! when the bench panics. The outputs it uploads stay in the host store,
//! as those of the end-to-end tests do.

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/e2e/harness.rs"]
mod harness;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::Client;
use harness::{Deployment, TOKEN};
use sluice_nix::derivation::Derivation;
use sluice_nix::hash::Base;
use sluice_nix::nar::dump_path;
use sluice_nix::store_path::StoreDir;
use sluice_proto::v1 as pb;
use sluice_queue_runner::driver::unix_now;
use sluice_queue_runner::submit::{self, Job};
use sluice_test_support::nix::{run as run_command, NixCommands, NixEnv};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Builds measured for `builds_added` → dispatch, and warm-up builds
/// before them (not counted).
const READY_BUILDS: usize = 30;
const WARM_UP: usize = 2;
/// Steps per chain: each chain gives `CHAIN_LEN - 1` samples.
const CHAIN_LEN: usize = 26;
/// Chains run one at a time, then this many at once.
const CHAINS: usize = 8;
/// Slots of the simulated agent: enough that it is always idle for the
/// next step of every chain.
const AGENT_SLOTS: u32 = 8;
/// How long any one thing may take before the bench gives up.
const DEADLINE: Duration = Duration::from_secs(60);

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    runtime.block_on(bench());
}

async fn bench() {
    let started = Instant::now();
    common::print_machine("queue runner latency bench");

    let deployment = Deployment::start().await;
    let drvs = Drvs::instantiate(&deployment.env);
    let system = common::read_drv(&drvs.ready[0]).platform;
    let mut agent = SimAgent::connect(deployment.bound.grpc, &system).await;
    println!(
        "setup (PostgreSQL, nix-daemon, queue runner, {} derivations): {:.1} s",
        drvs.ready.len() + drvs.chains.iter().map(Vec::len).sum::<usize>(),
        started.elapsed().as_secs_f64()
    );
    println!();

    // 1. builds_added → first dispatch.
    let mut committed = Vec::new();
    let mut called = Vec::new();
    for (i, drv) in drvs.ready.iter().enumerate() {
        let job = Job {
            name: format!("ready-{i}"),
            drv_path: drv.clone(),
        };
        let before = Instant::now();
        let ids = submit::queue(&deployment.pool, "bench", "ready", &[job])
            .await
            .expect("queueing a build with submit::queue");
        let after = Instant::now();
        let built = agent.collect(std::slice::from_ref(drv)).await;
        let received = built[drv].received;
        if i >= WARM_UP {
            committed.push(received.saturating_duration_since(after));
            called.push(received.saturating_duration_since(before));
        }
        deployment.wait_succeeded(&ids).await;
    }
    println!("1. builds_added -> first dispatch (one new build with one ready step, agent idle)");
    println!(
        "   {} samples, after {WARM_UP} warm-up builds (not counted)",
        committed.len()
    );
    common::print_figures("   from submit::queue returning (committed)", &committed);
    common::print_figures("   from calling submit::queue", &called);
    println!(
        "   includes: the NOTIFY reaching the listener, loading the new Builds row, reading the \
         closure (.drv files, output validity through the daemon), the core's decision, the \
         BuildSteps row (and build_started/step_started), the basic derivation and its input \
         closure, and the gRPC send."
    );
    println!();

    // 2. runnable → assignment, one chain at a time, then all at once.
    let half = drvs.chains.len() / 2;
    let (sequential, concurrent) = drvs.chains.split_at(half);
    let mut one_at_a_time = Vec::new();
    let mut one_at_a_time_from_call = Vec::new();
    let mut early = 0;
    let mut report_calls = Vec::new();
    for (i, chain) in sequential.iter().enumerate() {
        let figures = deployment
            .run_chains(
                &mut agent,
                &format!("chain-{i}"),
                std::slice::from_ref(chain),
            )
            .await;
        one_at_a_time.extend(figures.latencies);
        one_at_a_time_from_call.extend(figures.from_call);
        early += figures.early;
        report_calls.extend(figures.report_calls);
    }
    let together = deployment
        .run_chains(&mut agent, "chains-together", concurrent)
        .await;
    println!("2. runnable -> assignment at an idle agent (chains of {CHAIN_LEN} derivations)");
    println!(
        "   from ReportResult returning for a step to the agent receiving the next step's \
         assignment"
    );
    let sequential_label = format!("   1 chain at a time ({} chains)", sequential.len());
    let together_label = format!("   {} chains at once", concurrent.len());
    common::print_figures(&sequential_label, &one_at_a_time);
    common::print_figures(&together_label, &together.latencies);
    let early = early + together.early;
    if early > 0 {
        println!(
            "   ({early} assignments arrived before the previous step's ReportResult call \
             returned, i.e. its response was held back; counted as 0 above)"
        );
    }
    println!("   the same, from the ReportResult call being made (an upper bound):");
    common::print_figures(&sequential_label, &one_at_a_time_from_call);
    common::print_figures(&together_label, &together.from_call);
    report_calls.extend(together.report_calls);
    common::print_figures("   for scale, the ReportResult call itself", &report_calls);
    println!(
        "   includes: the driver handling the result (the BuildSteps row finished, \
         step_finished), the core making the next step runnable and dispatching it, the next \
         BuildSteps row created (behind the previous step's writes: one ordered writer), the \
         basic derivation and the input closure queried from the daemon, registering the \
         attempt, and the gRPC send. Not included: the upload, which precedes ReportResult."
    );
    println!();

    // 3. The dispatch decision itself.
    println!("3. one dispatch decision with 100,000 queued steps and 8 agents:");
    println!("   measured without IO by `cargo bench -p sluice-core --bench dispatch`");
    println!("   (8 machines x 4 slots, queues of 1k/10k/100k steps; not repeated here)");
    println!();

    println!("trouble seen on the way (none is expected):");
    println!(
        "   agent calls refused as Unavailable and retried after 10 ms: {}",
        agent.retries
    );
    deployment.print_aborted_steps().await;
    println!();

    agent.stop();
    deployment.stop().await;
    println!("total: {:.1} s", started.elapsed().as_secs_f64());
}

/// The derivations the bench queues, all unique to this run.
struct Drvs {
    /// Ready derivations (no inputs), one build each.
    ready: Vec<String>,
    /// Chains: each derivation needs the output of the one before.
    chains: Vec<Vec<String>>,
}

impl Drvs {
    fn instantiate(env: &NixEnv) -> Drvs {
        let mut expr = String::from("rec {\n");
        let mut attrs = Vec::new();
        for r in 0..READY_BUILDS + WARM_UP {
            expr += &format!(
                "  r{r} = mkDrv {{ name = \"ready{r}\"; args = [ \"-c\" \"echo {r} > $out\" ]; }};\n"
            );
            attrs.push(format!("r{r}"));
        }
        for c in 0..2 * CHAINS {
            for s in 0..CHAIN_LEN {
                let prev = if s == 0 {
                    String::new()
                } else {
                    format!("prev = c{c}s{};", s - 1)
                };
                expr += &format!(
                    "  c{c}s{s} = mkDrv {{ name = \"chain{c}-{s}\"; {prev} args = [ \"-c\" \"echo {c}-{s} > $out\" ]; }};\n"
                );
                attrs.push(format!("c{c}s{s}"));
            }
        }
        expr += "}";
        let file = env.write_expr(&expr);
        let mut cmd = env.command("nix-instantiate");
        cmd.arg(&file);
        for attr in &attrs {
            cmd.args(["-A", attr]);
        }
        let out = run_command(&mut cmd);
        let paths: Vec<String> = out
            .lines()
            .map(str::trim)
            .filter(|l| l.ends_with(".drv"))
            .map(str::to_owned)
            .collect();
        assert_eq!(
            paths.len(),
            attrs.len(),
            "nix-instantiate printed one .drv per attribute: {out}"
        );
        let (ready, chained) = paths.split_at(READY_BUILDS + WARM_UP);
        Drvs {
            ready: ready.to_vec(),
            chains: chained.chunks(CHAIN_LEN).map(<[String]>::to_vec).collect(),
        }
    }
}

/// What one run of chains measured.
struct ChainFigures {
    /// From the ReportResult call returning.
    latencies: Vec<Duration>,
    /// From the ReportResult call being made.
    from_call: Vec<Duration>,
    /// Assignments that arrived before the previous step's ReportResult
    /// call returned (their latency counts as 0).
    early: usize,
    report_calls: Vec<Duration>,
}

impl Deployment {
    /// Queues one build per chain (its last derivation) in one evaluator
    /// transaction, lets the agent build every step, and measures each
    /// step's ReportResult return → the next step's assignment.
    async fn run_chains(
        &self,
        agent: &mut SimAgent,
        jobset: &str,
        chains: &[Vec<String>],
    ) -> ChainFigures {
        let jobs: Vec<Job> = chains
            .iter()
            .enumerate()
            .map(|(i, chain)| Job {
                name: format!("chain-{i}"),
                drv_path: chain.last().expect("a chain has steps").clone(),
            })
            .collect();
        let ids = submit::queue(&self.pool, "bench", jobset, &jobs)
            .await
            .expect("queueing the chains with submit::queue");
        let all: Vec<String> = chains.iter().flatten().cloned().collect();
        let built = agent.collect(&all).await;
        self.wait_succeeded(&ids).await;
        let mut figures = ChainFigures {
            latencies: Vec::new(),
            from_call: Vec::new(),
            early: 0,
            report_calls: Vec::new(),
        };
        for chain in chains {
            for pair in chain.windows(2) {
                let (done, next) = (&built[&pair[0]], &built[&pair[1]]);
                if next.received < done.acked {
                    figures.early += 1;
                }
                figures
                    .latencies
                    .push(next.received.saturating_duration_since(done.acked));
                figures
                    .from_call
                    .push(next.received.saturating_duration_since(done.reporting));
            }
            for drv in chain {
                let b = &built[drv];
                figures.report_calls.push(b.acked - b.reporting);
            }
        }
        figures
    }

    /// Waits until every build in `ids` is finished, and checks it succeeded.
    async fn wait_succeeded(&self, ids: &[i32]) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let rows: Vec<(i32, i32, Option<i32>)> =
                sqlx::query_as("select id, finished, buildStatus from Builds where id = any($1)")
                    .bind(ids)
                    .fetch_all(&self.pool)
                    .await
                    .expect("reading the state of the bench's builds");
            if rows.len() == ids.len() && rows.iter().all(|(_, finished, _)| *finished == 1) {
                let failed: Vec<_> = rows.iter().filter(|(_, _, s)| *s != Some(0)).collect();
                assert!(
                    failed.is_empty(),
                    "builds (id, finished, status) did not succeed: {failed:?}"
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "builds not finished after {DEADLINE:?}: (id, finished, status) {rows:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Attempts the queue runner gave up on (it retries them): each one
    /// stretches one sample by the retry interval.
    async fn print_aborted_steps(&self) {
        let rows: Vec<(Option<String>, i64)> = sqlx::query_as(
            "select errorMsg, count(*) from BuildSteps where status = 3 group by errorMsg",
        )
        .fetch_all(&self.pool)
        .await
        .expect("reading aborted BuildSteps");
        let total: i64 = rows.iter().map(|(_, n)| n).sum();
        println!("   attempts aborted by the queue runner (BuildSteps status 3): {total}");
        for (error, n) in rows {
            println!("     {n} x {}", error.unwrap_or_default());
        }
    }
}

/// When the agent received, and finished reporting, one assignment.
#[derive(Debug, Clone, Copy)]
struct Built {
    received: Instant,
    /// Just before the ReportResult call.
    reporting: Instant,
    /// When the ReportResult call returned.
    acked: Instant,
    /// Calls refused with `Unavailable` and made again.
    retries: u32,
}

/// A simulated agent on the real protocol: it registers, heartbeats, and
/// answers each assignment by uploading made-up outputs at once.
struct SimAgent {
    built: mpsc::Receiver<Result<(String, Built), String>>,
    /// Calls refused with `Unavailable` and made again, so far.
    retries: u32,
    tasks: Vec<JoinHandle<()>>,
}

impl SimAgent {
    async fn connect(addr: SocketAddr, system: &str) -> SimAgent {
        let common::Session {
            client,
            id: session,
            events,
            mut commands,
            heartbeats,
        } = common::open_session(
            addr,
            TOKEN,
            common::Registration {
                agent_version: "latency-bench",
                name: "sim-agent",
                system,
                max_jobs: AGENT_SLOTS,
                prefetch: 0,
                events: 4,
            },
        )
        .await;

        let (built_tx, built) = mpsc::channel(1024);
        let reader = tokio::spawn(async move {
            // Holding the sender keeps the work stream open.
            let _events = events;
            loop {
                let assignment = match common::next_assignment(&mut commands).await {
                    Ok(Some(a)) => a,
                    Ok(None) => break,
                    Err(e) => {
                        let _ = built_tx.send(Err(e)).await;
                        break;
                    }
                };
                let received = Instant::now();
                let client = client.clone();
                let session = session.clone();
                let built_tx = built_tx.clone();
                tokio::spawn(async move {
                    let drv = assignment.drv_path.clone();
                    let result = build(client, &session, assignment, received)
                        .await
                        .map(|b| (drv.clone(), b))
                        .map_err(|e| format!("building {drv}: {e}"));
                    let _ = built_tx.send(result).await;
                });
            }
        });
        SimAgent {
            built,
            retries: 0,
            tasks: vec![reader, heartbeats],
        }
    }

    /// Waits until every derivation in `drvs` has been assigned and built.
    async fn collect(&mut self, drvs: &[String]) -> HashMap<String, Built> {
        let mut wanted: HashSet<&String> = drvs.iter().collect();
        let mut out = HashMap::new();
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while !wanted.is_empty() {
            let next = tokio::time::timeout_at(deadline, self.built.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "{} of {} steps were not assigned and built within {DEADLINE:?}",
                        wanted.len(),
                        drvs.len()
                    )
                })
                .expect("the simulated agent's tasks are running");
            let (drv, built) = next.unwrap_or_else(|e| panic!("simulated agent: {e}"));
            assert!(
                wanted.remove(&drv),
                "the agent was assigned {drv}, which is not what this run queued (or twice)"
            );
            self.retries += built.retries;
            out.insert(drv, built);
        }
        out
    }

    fn stop(self) {
        for task in self.tasks {
            task.abort();
        }
    }
}

/// "Builds" one assignment: uploads a small file as each output, then
/// reports success.
async fn build(
    client: Client,
    session: &str,
    assignment: pb::Assignment,
    received: Instant,
) -> Result<Built, String> {
    let dir = StoreDir::default();
    let drv_path = dir
        .parse_path(&assignment.drv_path)
        .map_err(|e| format!("drv path: {e}"))?;
    let drv = Derivation::parse_drv_file(&dir, &drv_path, &assignment.drv)
        .map_err(|e| format!("basic derivation: {e}"))?;
    let start_time = unix_now();
    let scratch = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    let mut retries = 0;
    let mut outputs = Vec::new();
    for (name, output) in &drv.outputs {
        let path = output
            .path(&dir, &drv.name, name)
            .map_err(|e| format!("output {name}: {e}"))?
            .ok_or_else(|| format!("output {name} is not input-addressed"))?;
        let file = scratch.path().join(name);
        std::fs::write(&file, format!("{name} of {}\n", assignment.drv_path))
            .map_err(|e| format!("writing output {name}: {e}"))?;
        let mut nar = Vec::new();
        let summary = dump_path(&file, &mut nar).map_err(|e| format!("NAR of {name}: {e}"))?;
        let printed = dir.print(&path);
        let header = pb::NarUpload {
            part: Some(pb::nar_upload::Part::Header(pb::UploadHeader {
                session_id: session.to_owned(),
                step_id: assignment.step_id.clone(),
                output_name: name.clone(),
                info: Some(pb::StorePathInfo {
                    path: printed.clone(),
                    nar_hash: summary.nar_hash.format(Base::Nix32, true),
                    nar_size: summary.nar_size,
                    references: vec![],
                    deriver: assignment.drv_path.clone(),
                    ca: String::new(),
                }),
            })),
        };
        let data = pb::NarUpload {
            part: Some(pb::nar_upload::Part::Data(nar)),
        };
        let upload = || {
            let mut client = client.clone();
            let parts = [header.clone(), data.clone()];
            async move { client.upload_nar(tokio_stream::iter(parts)).await }
        };
        common::retrying(upload, &mut retries)
            .await
            .map_err(|s| format!("UploadNar of {printed}: {s}"))?;
        outputs.push(pb::BuildOutput {
            name: name.clone(),
            path: printed,
        });
    }
    let result = pb::StepResult {
        session_id: session.to_owned(),
        step_id: assignment.step_id.clone(),
        status: 0,
        times_built: 1,
        start_time,
        stop_time: unix_now(),
        outputs,
        ..Default::default()
    };
    let reporting = Instant::now();
    let report = || {
        let mut client = client.clone();
        let result = result.clone();
        async move { client.report_result(result).await }
    };
    common::retrying(report, &mut retries)
        .await
        .map_err(|s| format!("ReportResult: {s}"))?;
    Ok(Built {
        received,
        reporting,
        acked: Instant::now(),
        retries,
    })
}
