//! The cost of resolving content-addressed steps, as the driver does it
//! (`driver::resolve::resolve_derivation`): 10,000 derivations, each
//! using the output of a content-addressed input, resolved against
//! 100,000 realisations recorded in `SluiceRealisations`. Run with
//! `cargo bench -p sluice-queue-runner --bench resolution` (as root, with
//! Nix and PostgreSQL installed); prints the time per resolution and the
//! database round trips per resolution.
//!
//! Setup: a throwaway PostgreSQL with Sluice's schema, a private
//! `nix-daemon` on the host store. The derivations are written to the
//! store as Nix writes `.drv` files; every input's output is realised to
//! one small valid path (what the resolved derivations refer to). Each
//! resolution reads the derivation and its input, computes hashes modulo
//! (memoised as in the driver), looks the input's realisation up, resolves,
//! looks the resolved derivation's outputs up, and writes the resolved
//! `.drv` to the store with a GC root: the whole path but the status-13
//! row, which the writer records.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use sluice_nix::derivation::placeholder::{downstream_placeholder, hash_placeholder};
use sluice_nix::derivation::{Derivation, DerivationOutput};
use sluice_nix::hash::HashAlgo;
use sluice_nix::store_path::{ContentAddressMethod, StoreDir, StorePath};
use sluice_queue_runner::db::results::{record_realisations, Realisation};
use sluice_queue_runner::driver::resolve::resolve_derivation;
use sluice_queue_runner::grpc::{LocalStore, StoreConnection};
use sluice_queue_runner::store::Store;
use sluice_test_support::nix::NixDaemon;
use sluice_test_support::pg::TestPg;

const STEPS: usize = 10_000;
const REALISATIONS: usize = 100_000;

fn ca_output() -> DerivationOutput {
    DerivationOutput::CAFloating {
        method: ContentAddressMethod::Recursive,
        hash_algo: HashAlgo::Sha256,
    }
}

/// A floating content-addressed derivation named `name`, using output
/// `out` of each of `inputs`.
fn ca_drv(name: String, inputs: &[StorePath], extra: &str) -> Derivation {
    let mut env = BTreeMap::new();
    env.insert("out".to_owned(), hash_placeholder("out"));
    env.insert("extra".to_owned(), extra.to_owned());
    let mut args = vec!["-c".to_owned()];
    let mut script = String::from("echo ");
    for input in inputs {
        script.push_str(&downstream_placeholder(input, "out"));
        script.push(' ');
    }
    script.push_str("> $out");
    args.push(script);
    Derivation {
        name,
        outputs: [("out".to_owned(), ca_output())].into(),
        input_drvs: inputs
            .iter()
            .map(|i| (i.clone(), BTreeSet::from(["out".to_owned()])))
            .collect(),
        input_srcs: BTreeSet::new(),
        platform: "x86_64-linux".to_owned(),
        builder: "/bin/sh".to_owned(),
        args,
        env,
    }
}

async fn write(store: &Store, drv: &Derivation) -> StorePath {
    let dir = store.store_dir().clone();
    let text = drv.to_aterm(&dir).expect("prints");
    let refs: BTreeSet<StorePath> = drv.references().cloned().collect();
    let mut client = store.connect().await.expect("store");
    let info = client
        .add_text_to_store(&format!("{}.drv", drv.name), text.as_bytes(), &refs)
        .await
        .expect("writes the .drv");
    assert_eq!(info.path, drv.drv_path(&dir).expect("path"));
    info.path
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let pg = TestPg::start();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&pg.url())
        .await
        .expect("connects");
    {
        let mut conn = pool.acquire().await.expect("conn");
        sluice_queue_runner::db::migrate::migrate(&mut conn)
            .await
            .expect("migrates");
    }
    let daemon = NixDaemon::start();
    let store = Store::new(LocalStore::new(
        StoreConnection::Socket(daemon.socket_path()),
        8,
    ));
    let dir: StoreDir = store.store_dir().clone();
    let nonce = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let gc_roots = tempfile::tempdir().expect("tempdir");

    // One valid path every input's output is realised to.
    let realised = {
        let mut client = store.connect().await.expect("store");
        client
            .add_text_to_store(
                &format!("bench-output-{nonce}"),
                nonce.as_bytes(),
                &BTreeSet::new(),
            )
            .await
            .expect("adds")
            .path
    };

    print!("writing {STEPS} inputs and {STEPS} dependents to the store... ");
    let started = Instant::now();
    let hashes = sluice_queue_runner::ca::Hashes::default();
    let mut tops = Vec::with_capacity(STEPS);
    let mut rows = Vec::with_capacity(REALISATIONS);
    for i in 0..STEPS {
        let input = ca_drv(format!("in-{nonce}-{i}"), &[], &i.to_string());
        let input_path = write(&store, &input).await;
        // Its realisation key, as the queue runner computes it.
        let keys = {
            let read = |_p: StorePath| async { Err::<Derivation, String>("no input".into()) };
            sluice_queue_runner::ca::realisation_keys(&hashes, &dir, &input_path, &input, &read)
                .await
                .expect("hashes")
        };
        rows.push(Realisation {
            drv_hash: keys["out"].clone(),
            output: "out".to_owned(),
            out_path: dir.print(&realised),
            drv_path: dir.print(&input_path),
        });
        let top = ca_drv(format!("top-{nonce}-{i}"), &[input_path], &i.to_string());
        tops.push(dir.print(&write(&store, &top).await));
    }
    // Realisations nobody here uses, so lookups run on a table this big.
    for i in rows.len()..REALISATIONS {
        rows.push(Realisation {
            drv_hash: format!("sha256:{:064x}", i),
            output: "out".to_owned(),
            out_path: dir.print(&realised),
            drv_path: format!("/nix/store/{:032}-filler-{i}.drv", i),
        });
    }
    {
        let mut conn = pool.acquire().await.expect("conn");
        for chunk in rows.chunks(10_000) {
            record_realisations(&mut conn, chunk)
                .await
                .expect("records");
        }
    }
    println!("{:.1} s", started.elapsed().as_secs_f64());
    // The hashes the driver would have memoised while loading are not
    // given: each resolution hashes its input as a cold driver does.
    let hashes = sluice_queue_runner::ca::Hashes::default();

    let mut times = Vec::with_capacity(STEPS);
    let mut round_trips = 0u64;
    let all = Instant::now();
    for top in &tops {
        let t = Instant::now();
        let summary = resolve_derivation(&pool, &store, &hashes, top, gc_roots.path())
            .await
            .expect("resolves");
        times.push(t.elapsed());
        assert!(summary.resolved.is_some(), "nothing here is built yet");
        round_trips += u64::from(summary.db_round_trips);
    }
    let total = all.elapsed();
    times.sort();
    let mean = total / STEPS as u32;
    println!(
        "resolution of {STEPS} steps against {REALISATIONS} realisations: \
         mean {:.2} ms, p50 {:.2} ms, p99 {:.2} ms, total {:.1} s; \
         {:.2} database round trips per resolution",
        mean.as_secs_f64() * 1e3,
        percentile(&times, 0.5).as_secs_f64() * 1e3,
        percentile(&times, 0.99).as_secs_f64() * 1e3,
        total.as_secs_f64(),
        round_trips as f64 / STEPS as f64
    );
}
