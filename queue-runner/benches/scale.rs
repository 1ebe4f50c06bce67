//! Loading a farm-sized queue: time and resident memory. Run with
//! `cargo bench -p sluice-queue-runner --bench scale` (as root, with Nix
//! and PostgreSQL installed); prints figures. `SLUICE_BENCH_STEPS` and
//! `SLUICE_BENCH_BUILDS` change the size (default 270,000 derivations and
//! 100,000 builds); `SLUICE_BENCH_ORDER` lists the `serve
//! --dispatch-order`s to measure, one queue runner and database each, on
//! the same store (default `critical-path,hydra`). `SLUICE_BENCH_STORE`
//! names a directory to keep the store and its DAG in, and reuse them on
//! the next run of the same size (writing 270,000 `.drv` files takes
//! minutes). `SLUICE_BENCH_LOAD_BATCH` sets `serve --load-batch` (default
//! the queue runner's own): smaller batches hold fewer temporaries at
//! once, and leave less of the heap fragmented, but cost more per build.
//!
//! Setup: an isolated Nix store with its own `nix-daemon`, into which the
//! bench writes a generated nixpkgs-shaped DAG of real `.drv` files (a
//! bootstrap chain; then derivations with about 20 inputs each on
//! average, half of them among the first 1% of the derivations, as
//! stdenv's are, half anywhere before), with input-addressed outputs
//! computed as Nix does. The files are written into the store directory
//! and registered with `nix-store --register-validity` (which hashes
//! them), before the daemon starts. A throwaway PostgreSQL. The queue runner runs as
//! its own process (`queue-runner serve`, in the store's mount namespace)
//! with no agent, so nothing is dispatched.
//!
//! Measured: from the evaluator's transaction that queues the builds (as
//! `builds_added`) until `/status` shows every build held; then the
//! queue runner process's resident memory (`VmRSS`, and its peak
//! `VmHWM`) divided by the steps it holds.

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/e2e/harness.rs"]
mod harness;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::time::{Duration, Instant};

use sluice_nix::derivation::hash_modulo::{fill_input_addressed_outputs, hash_derivation_modulo};
use sluice_nix::derivation::{Derivation, DerivationOutput, DrvHashCache};
use sluice_nix::store_path::{StoreDir, StorePath};
use sluice_queue_runner::db::evaluator::{self, NewBuild};
use sluice_test_support::nix::{run, IsolatedStore, NixCommands};
use sluice_test_support::pg::TestPg;

const BOOTSTRAP: usize = 20;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    runtime.block_on(bench());
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn bench() {
    let steps = env_usize("SLUICE_BENCH_STEPS", 270_000).max(BOOTSTRAP + 1);
    let builds = env_usize("SLUICE_BENCH_BUILDS", 100_000).min(steps);
    let orders: Vec<String> = std::env::var("SLUICE_BENCH_ORDER")
        .unwrap_or_else(|_| "critical-path,hydra".to_string())
        .split(',')
        .map(str::to_owned)
        .collect();
    common::print_machine("queue scale bench");

    let kept = std::env::var_os("SLUICE_BENCH_STORE").map(std::path::PathBuf::from);
    let store = match &kept {
        Some(dir) => IsolatedStore::kept_at(dir),
        None => IsolatedStore::new(),
    };
    let system = sluice_builder_agent::host::nix_system().await;
    let started = Instant::now();
    let list = kept
        .as_ref()
        .map(|dir| dir.join(format!("dag-{steps}-{system}.tsv")));
    let dag = match list.as_deref().and_then(read_dag) {
        Some(dag) => {
            println!("reusing the DAG in {}", store.root().display());
            dag
        }
        None => {
            run(store.command("nix-store").arg("--init"));
            let dag = write_dag(&store, steps, &system);
            if let Some(list) = &list {
                save_dag(list, &dag);
            }
            dag
        }
    };
    let daemon = store.start_daemon();
    println!(
        "wrote {} .drv files ({:.1} inputs each on average) in {:.1} s",
        dag.len(),
        dag.iter().map(|d| d.inputs).sum::<usize>() as f64 / dag.len() as f64,
        started.elapsed().as_secs_f64()
    );

    for order in &orders {
        measure(&store, &daemon, &dag, builds, &system, order).await;
    }
    drop(daemon);
}

/// Loads the queue into a fresh queue runner (its own PostgreSQL) with
/// dispatch order `order`, and prints the figures.
async fn measure(
    store: &IsolatedStore,
    daemon: &sluice_test_support::nix::NixDaemon,
    dag: &[Node],
    builds: usize,
    system: &str,
    order: &str,
) {
    let pg = TestPg::start();
    let data = tempfile::tempdir().expect("data dir");
    let tokens = data.path().join("tokens");
    std::fs::write(&tokens, format!("agents:{}\n", harness::TOKEN)).expect("token file");
    let http = free_port();
    let mut serve = store.command(env!("CARGO_BIN_EXE_queue-runner"));
    serve
        .args(["serve", "--database-url", &pg.url()])
        .arg("--store-socket")
        .arg(daemon.socket_path())
        .arg("--agent-token-file")
        .arg(&tokens)
        .arg("--data-dir")
        .arg(data.path())
        .args(["--grpc-listen", "127.0.0.1:0"])
        .args(["--http-listen", &format!("127.0.0.1:{http}")])
        .args(["--unsupported-grace-s", "86400"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    serve.args(["--dispatch-order", order]);
    let load_batch = std::env::var("SLUICE_BENCH_LOAD_BATCH").ok();
    if let Some(n) = &load_batch {
        serve.args(["--load-batch", n]);
    }
    let mut child = KillOnDrop(serve.spawn().expect("starting queue-runner serve"));
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], http).into();
    let up = Instant::now();
    while harness::http_get(addr, "/status").await.is_err() {
        assert!(
            up.elapsed() < Duration::from_secs(60),
            "the queue runner came up"
        );
        if let Ok(Some(status)) = child.0.try_wait() {
            panic!("queue-runner serve exited: {status}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pid = child.0.id();
    let idle_rss = memory(pid).0;

    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&pg.url())
        .await
        .expect("connecting to PostgreSQL");
    let dir = StoreDir::default();
    let jobs: Vec<NewBuild> = dag[dag.len() - builds..]
        .iter()
        .map(|d| NewBuild {
            job: d.name.clone(),
            nix_name: d.name.clone(),
            drv_path: dir.print(&d.drv_path),
            system: system.to_owned(),
            outputs: vec![("out".into(), Some(dir.print(&d.out)))],
            max_silent_s: NewBuild::DEFAULT_LIMITS.0,
            timeout_s: NewBuild::DEFAULT_LIMITS.1,
        })
        .collect();
    let queued = evaluator::queue_builds(&pool, "bench", "scale", &jobs, 1_700_000_000)
        .await
        .expect("queueing the builds");
    let from = Instant::now();
    assert_eq!(queued.len(), builds);
    let (held_steps, seconds) = loop {
        let body: serde_json::Value = serde_json::from_str(
            &harness::http_get(addr, "/status")
                .await
                .expect("GET /status"),
        )
        .expect("/status is JSON");
        let status = &body["queueRunner"];
        let queued = status["nrQueuedBuilds"].as_u64().unwrap_or(0) as usize;
        if queued >= builds {
            let held = status["nrStepsWaiting"].as_u64().unwrap_or(0)
                + status["nrStepsRunnable"].as_u64().unwrap_or(0);
            break (held, from.elapsed());
        }
        assert!(
            from.elapsed() < Duration::from_secs(1800),
            "every build held within 30 minutes (held {queued})"
        );
        if let Ok(Some(status)) = child.0.try_wait() {
            panic!("queue-runner serve exited: {status}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss, peak) = memory(pid);
    let heap = serde_json::from_str::<serde_json::Value>(
        &harness::http_get(addr, "/status")
            .await
            .expect("GET /status"),
    )
    .expect("/status is JSON")["queueRunner"]["heapBytes"]
        .as_u64()
        .unwrap_or(0);
    println!("order: {order}");
    println!(
        "load batch: {}",
        load_batch.as_deref().unwrap_or("the default")
    );
    println!(
        "{builds} builds, {held_steps} steps held: every build held {:.1} s after builds_added",
        seconds.as_secs_f64()
    );
    println!(
        "queue-runner process: VmRSS {:.1} MiB (idle before: {:.1} MiB), VmHWM {:.1} MiB",
        rss as f64 / 1048576.0,
        idle_rss as f64 / 1048576.0,
        peak as f64 / 1048576.0
    );
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    for line in status.lines().filter(|l| l.starts_with("Rss")) {
        println!("  {line}");
    }
    if held_steps > 0 {
        println!(
            "heap held (allocated, not freed): {:.1} MiB, {:.0} bytes per held step",
            heap as f64 / 1048576.0,
            heap as f64 / held_steps as f64
        );
        println!(
            "resident bytes per held step: {:.0} (whole process), {:.0} (above idle); peak {:.0}",
            rss as f64 / held_steps as f64,
            rss.saturating_sub(idle_rss) as f64 / held_steps as f64,
            peak as f64 / held_steps as f64
        );
    }
    drop(child);
}

/// One generated derivation.
struct Node {
    name: String,
    drv_path: StorePath,
    out: StorePath,
    inputs: usize,
}

/// Writes the DAG's `.drv` files straight into `store`'s directory and
/// registers them in one `nix-store --register-validity` (a daemon call
/// per file took 18 ms each: 270,000 of them would take over an hour);
/// returns them in order.
fn write_dag(store: &IsolatedStore, n: usize, system: &str) -> Vec<Node> {
    let dir = StoreDir::default();
    let nonce = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let mut rng = common::XorShift(0x5ca1_ab1e_0000_0001);
    let mut hashes = DrvHashCache::new();
    let mut nodes: Vec<Node> = Vec::with_capacity(n);
    // What `--register-validity` reads: per path, the path, its deriver
    // (none), the number of references, then the references.
    let mut registration = String::new();
    std::fs::create_dir_all(store.root().join("store")).expect("the store directory");
    for i in 0..n {
        let mut inputs: BTreeSet<usize> = BTreeSet::new();
        if i > 0 && i < BOOTSTRAP {
            inputs.insert(i - 1);
        } else if i >= BOOTSTRAP {
            inputs.insert(BOOTSTRAP - 1);
            let wanted = 10 + rng.below(21) as usize;
            let popular = (i / 100).max(BOOTSTRAP);
            for k in 0..wanted {
                let pick = if k % 2 == 0 {
                    rng.below(popular as u64) as usize
                } else {
                    rng.below(i as u64) as usize
                };
                inputs.insert(pick);
            }
        }
        let name = format!("n{i}-{nonce}");
        let mut drv = Derivation {
            name: name.clone(),
            outputs: BTreeMap::from([("out".to_string(), DerivationOutput::Deferred)]),
            input_drvs: inputs
                .iter()
                .map(|&j| {
                    (
                        nodes[j].drv_path.clone(),
                        BTreeSet::from(["out".to_string()]),
                    )
                })
                .collect(),
            input_srcs: BTreeSet::new(),
            platform: system.to_owned(),
            builder: "/bin/sh".into(),
            args: vec!["-c".into(), "echo > $out".into()],
            env: BTreeMap::from([
                ("name".to_string(), name.clone()),
                ("builder".to_string(), "/bin/sh".to_string()),
                ("system".to_string(), system.to_owned()),
                ("out".to_string(), String::new()),
            ]),
        };
        fill_input_addressed_outputs(&dir, &mut drv, &hashes).expect("output paths");
        let out = match drv.outputs.get("out") {
            Some(DerivationOutput::InputAddressed { path }) => path.clone(),
            other => panic!("an input-addressed output, not {other:?}"),
        };
        let drv_path = drv.drv_path(&dir).expect("the .drv path");
        let hash = hash_derivation_modulo(&dir, &drv, false, &hashes).expect("hash modulo");
        hashes.insert(drv_path.clone(), hash);
        let text = drv.to_aterm(&dir).expect("ATerm");
        let printed = dir.print(&drv_path);
        let file = store.host_path(&printed);
        std::fs::write(&file, text.as_bytes()).expect("writing a .drv");
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o444))
            .expect("making a .drv read-only");
        registration.push_str(&printed);
        registration.push_str("\n\n");
        registration.push_str(&format!("{}\n", drv.input_drvs.len()));
        for input in drv.input_drvs.keys() {
            registration.push_str(&dir.print(input));
            registration.push('\n');
        }
        nodes.push(Node {
            name,
            drv_path,
            out,
            inputs: inputs.len(),
        });
    }
    let mut register = store.command("nix-store");
    register
        .arg("--register-validity")
        .stdin(Stdio::piped())
        .stdout(Stdio::null());
    let mut child = register
        .spawn()
        .expect("starting nix-store --register-validity");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("its stdin");
        stdin
            .write_all(registration.as_bytes())
            .expect("writing the registrations");
    }
    let status = child
        .wait()
        .expect("waiting for nix-store --register-validity");
    assert!(status.success(), "nix-store --register-validity: {status}");
    nodes
}

/// Saves the DAG's list beside a kept store: one node per line, its name,
/// `.drv` path, output path and number of inputs, tab-separated.
fn save_dag(list: &std::path::Path, dag: &[Node]) {
    let dir = StoreDir::default();
    let text: String = dag
        .iter()
        .map(|n| {
            format!(
                "{}\t{}\t{}\t{}\n",
                n.name,
                dir.print(&n.drv_path),
                dir.print(&n.out),
                n.inputs
            )
        })
        .collect();
    std::fs::write(list, text).expect("saving the DAG's list");
}

/// A DAG saved by [`save_dag`], if there is one and it reads back whole.
fn read_dag(list: &std::path::Path) -> Option<Vec<Node>> {
    let dir = StoreDir::default();
    let text = std::fs::read_to_string(list).ok()?;
    text.lines()
        .map(|line| {
            let mut fields = line.split('\t');
            let name = fields.next()?.to_owned();
            let drv_path = dir.parse_path(fields.next()?).ok()?;
            let out = dir.parse_path(fields.next()?).ok()?;
            let inputs = fields.next()?.parse().ok()?;
            Some(Node {
                name,
                drv_path,
                out,
                inputs,
            })
        })
        .collect()
}

/// (VmRSS, VmHWM) of process `pid`, in bytes.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Kills the queue runner when the bench ends, also on a panic.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
