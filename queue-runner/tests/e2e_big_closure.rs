//! A step whose input closure has 50,000 paths is assigned and built: the
//! assignment does not carry the closure (the agent streams it with
//! `InputClosure`), the agent asks its store which paths it has a chunk at
//! a time, and fetches the few it lacks.
//!
//! The 50,000 paths are small files registered with
//! `nix-store --register-validity` (a binary tree of references, so the
//! closure of its root is all of them) rather than added one daemon call
//! each. In the queue runner's store (the host's) their names and
//! contents are fixed, so later runs find them valid and add nothing; the
//! agent's store gets all of them but one root-to-leaf chain.
//!
//! The test also prints what the closure query costs on the host's
//! daemon: one round trip per path (how the queue runner walked closures
//! before), pipelined batches with a cold cache, and the warm cache.

#![allow(clippy::unwrap_used)]

#[path = "e2e/harness.rs"]
mod harness;

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Instant;

use harness::Deployment;
use sha2::{Digest, Sha256};
use sluice_nix::daemon::DaemonClient;
use sluice_nix::store_path::{StoreDir, StorePath};
use sluice_queue_runner::grpc::{LocalStore, StoreConnection};
use sluice_test_support::nix::{run, NixCommands};

const PATHS: usize = 50_000;

/// Path `i` of the tree; it refers to paths `2i + 1` and `2i + 2`.
fn tree_path(i: usize) -> String {
    let digest = Sha256::digest(format!("sluice-big-closure-v1-{i}"));
    format!(
        "/nix/store/{}-big-closure-{i}",
        sluice_nix::base32::encode(&digest[..20])
    )
}

fn contents(i: usize) -> String {
    format!("input {i}\n")
}

fn children(i: usize) -> impl Iterator<Item = usize> {
    [2 * i + 1, 2 * i + 2].into_iter().filter(|c| *c < PATHS)
}

/// A string as NAR encodes it: its length, its bytes, zero padding.
fn nar_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s);
    out.resize(out.len() + (8 - s.len() % 8) % 8, 0);
}

/// The NAR of a regular file holding `data`.
fn file_nar(data: &[u8]) -> Vec<u8> {
    let mut nar = Vec::new();
    for s in [
        &b"nix-archive-1"[..],
        b"(",
        b"type",
        b"regular",
        b"contents",
    ] {
        nar_str(&mut nar, s);
    }
    nar_str(&mut nar, data);
    nar_str(&mut nar, b")");
    nar
}

/// Writes the files of the tree's paths but `skip` under `store_root` (the
/// directory its store's processes see as `/nix`) and registers them with
/// `nix-store --register-validity` run by `nix`. A file already there is
/// left alone: it may be a valid path, and so read-only.
fn seed(
    nix: &dyn NixCommands,
    store_root: &std::path::Path,
    skip: &[usize],
    scratch: &std::path::Path,
) {
    let list = scratch.join(format!("register-{}", uuid::Uuid::new_v4().simple()));
    let mut reg = std::io::BufWriter::new(std::fs::File::create(&list).unwrap());
    std::fs::create_dir_all(store_root.join("store")).unwrap();
    for i in (0..PATHS).filter(|i| !skip.contains(i)) {
        let path = tree_path(i);
        let file = store_root.join(path.strip_prefix("/nix/").unwrap());
        let data = contents(i);
        if !file.exists() {
            std::fs::write(&file, &data).unwrap();
        }
        let nar = file_nar(data.as_bytes());
        let refs: Vec<String> = children(i).map(tree_path).collect();
        writeln!(
            reg,
            "{path}\n{}\n{}\n\n{}",
            hex::encode(Sha256::digest(&nar)),
            nar.len(),
            refs.len()
        )
        .unwrap();
        for r in refs {
            writeln!(reg, "{r}").unwrap();
        }
    }
    reg.into_inner().unwrap().sync_all().unwrap();
    run(nix.command("sh").args([
        "-c",
        "exec nix-store --register-validity --hash-given < \"$0\"",
        list.to_str().unwrap(),
    ]));
}

/// The chain from the root to the last leaf: taking these out of a store
/// leaves every remaining path's references valid.
fn root_to_leaf() -> Vec<usize> {
    let mut chain = vec![PATHS - 1];
    while let Some(&i) = chain.last() {
        if i == 0 {
            break;
        }
        chain.push((i - 1) / 2);
    }
    chain
}

/// The closure walked as the queue runner walked it before: one
/// `QueryPathInfo` round trip per path.
async fn closure_one_by_one(client: &mut DaemonClient, root: StorePath) -> usize {
    let mut seen = std::collections::HashSet::new();
    let mut pending = vec![root];
    while let Some(path) = pending.pop() {
        if !seen.insert(path.clone()) {
            continue;
        }
        let info = client.query_path_info(&path).await.unwrap().unwrap();
        pending.extend(info.references.into_iter().filter(|r| !seen.contains(r)));
    }
    seen.len()
}

/// Prints what the closure of the root costs on the host's daemon.
async fn measure(socket: std::path::PathBuf, root: &str) {
    let root = StoreDir::default().parse_path(root).unwrap();
    let mut client = DaemonClient::connect(&socket).await.unwrap();
    let t = Instant::now();
    let n = closure_one_by_one(&mut client, root.clone()).await;
    let serial = t.elapsed();
    assert_eq!(n, PATHS);

    let pool = LocalStore::new(StoreConnection::Socket(socket), 1);
    let t = Instant::now();
    let cold = sluice_queue_runner::store::closure(&pool, [root.clone()])
        .await
        .unwrap();
    let cold_time = t.elapsed();
    let t = Instant::now();
    let warm = sluice_queue_runner::store::closure(&pool, [root])
        .await
        .unwrap();
    let warm_time = t.elapsed();
    assert_eq!(cold.len(), PATHS);
    assert_eq!(warm.len(), PATHS);
    println!(
        "closure of {PATHS} paths on the host's Nix 2.8 daemon: one query per path {serial:.2?}, \
         pipelined batches (cold cache) {cold_time:.2?}, cached {warm_time:.2?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_with_an_input_closure_of_50000_paths_is_built() {
    let started = Instant::now();
    let mut d = Deployment::start().await;
    eprintln!("deployment up in {:.1?}", started.elapsed());
    let scratch = tempfile::tempdir().unwrap();
    seed(&d.env, std::path::Path::new("/nix"), &[], scratch.path());
    eprintln!("queue runner's store seeded in {:.1?}", started.elapsed());

    let missing = root_to_leaf();
    let url = format!("http://{}", d.bound.grpc);
    let scratch_path = scratch.path().to_path_buf();
    let seeded = Instant::now();
    d.add_agent_with("big", 1, url, |_, store| {
        seed(store, &store.root(), &missing, &scratch_path);
    })
    .await;
    eprintln!(
        "agent's store seeded with all but {} paths in {:.1?}",
        missing.len(),
        seeded.elapsed()
    );

    let root = tree_path(0);
    measure(d.host_daemon.socket_path(), &root).await;

    let expr = format!(
        "{{ big = mkDrv {{ name = \"big\"; PATH = \"/usr/bin:/bin\"; root = builtins.storePath \"{root}\"; \
         args = [ \"-c\" \"read x < $root; echo \\\"built on $x\\\" > $out\" ]; }}; }}"
    );
    let built = Instant::now();
    let ids = d.submit_attrs(&expr, &["big"]).await;
    let statuses = d.wait_finished(&ids, 120).await;
    eprintln!("built in {:.1?}", built.elapsed());
    assert_eq!(statuses, BTreeMap::from([(ids[0], 0)]), "the build failed");

    let steps: Vec<(i32, String)> =
        sqlx::query_as("select status, machine from BuildSteps where build = $1")
            .bind(ids[0])
            .fetch_all(&d.pool)
            .await
            .unwrap();
    assert_eq!(steps, vec![(0, "big".to_owned())]);
    let out: String =
        sqlx::query_scalar("select path from BuildOutputs where build = $1 and name = 'out'")
            .bind(ids[0])
            .fetch_one(&d.pool)
            .await
            .unwrap();
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "built on input 0\n");
    // The agent fetched the paths it lacked: they are valid in its store.
    let agent = d.agent("big");
    let valid = run(agent
        .store
        .command("nix-store")
        .args(["--check-validity", "--print-invalid"])
        .args(missing.iter().map(|i| tree_path(*i))));
    assert_eq!(valid.trim(), "", "the agent's store still lacks inputs");
    let stopping = Instant::now();
    d.stop().await;
    eprintln!("deployment stopped in {:.1?}", stopping.elapsed());
    eprintln!("whole test {:.1?}", started.elapsed());
}
