//! Content-addressed derivations end to end: steps are resolved into fresh
//! steps once their inputs are built, with the realisations recorded in
//! the database; outputs match what a plain local Nix builds; two
//! downstreams that resolve to one derivation build it once (early
//! cutoff); a job set queued again finishes cached; the web UI's contract
//! for status-13 rows holds. The real driver, two agents with stores of
//! their own, real PostgreSQL, Nix with `ca-derivations`.

#![allow(clippy::unwrap_used)]

#[path = "e2e/harness.rs"]
mod harness;

use std::collections::BTreeMap;

use harness::Deployment;
use sluice_nix::derivation::placeholder::downstream_placeholder;
use sluice_nix::derivation::Derivation;
use sluice_nix::store_path::StoreDir;
use sluice_test_support::nix::{realise_in, IsolatedStore};

/// `ca` makes a floating content-addressed derivation.
const PRELUDE: &str = include_str!("nix/ca-prelude.nix");

const MIXED: &str = r#"rec {
  root = ca { name = "root"; args = [ "-c" "echo root > $out" ]; };
  mid = ca { name = "mid"; args = [ "-c" "cat ${root} > $out; echo mid >> $out" ]; };
  top = ca { name = "top"; args = [ "-c" "cat ${mid} > $out; echo top >> $out" ]; };
  failing = ca { name = "failing"; args = [ "-c" "exit 1" ]; };
  afterFailing = ca { name = "after-failing"; args = [ "-c" "cat ${failing} > $out" ]; };
  iaOnCa = mkDrv { name = "ia-on-ca"; PATH = "/usr/bin:/bin";
    args = [ "-c" "cat ${mid} > $out; echo ia >> $out" ]; };
  multi = ca { name = "multi"; outputs = [ "out" "bin" "lib" ];
    args = [ "-c" "mkdir -p $lib $bin; echo lib > $lib/l; ln -s $lib/l $bin/l; echo $bin > $out" ]; };
  usesMulti = ca { name = "uses-multi"; args = [ "-c" "cat ${multi.bin}/l ${multi} > $out" ]; };
  selfRef = ca { name = "self-ref"; args = [ "-c" "echo $out > $out" ]; };
  marked = ca { name = "marked"; args = [ "-c" "mkdir -p $out/nix-support; touch $out/nix-support/failed" ]; };
}"#;

const JOBS: &[(&str, i32)] = &[
    ("root", 0),
    ("mid", 0),
    ("top", 0),
    ("failing", 1),
    ("afterFailing", 2),
    ("iaOnCa", 0),
    ("multi", 0),
    ("usesMulti", 0),
    ("selfRef", 0),
    ("marked", 6),
];

/// Every step row, for a failing assertion's message.
async fn steps(d: &Deployment) -> String {
    type Row = (i32, i32, String, Option<i32>, Option<String>);
    let rows: Vec<Row> = sqlx::query_as(
        "select build, stepnr, drvPath, status, errorMsg from BuildSteps order by build, stepnr",
    )
    .fetch_all(&d.pool)
    .await
    .unwrap();
    rows.iter()
        .map(|r| format!("{r:?}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn expr(body: &str) -> String {
    format!("{PRELUDE}{body}")
}

/// The output paths of `build`, by name.
async fn outputs_of(d: &Deployment, build: i32) -> BTreeMap<String, Option<String>> {
    sqlx::query_as::<_, (String, Option<String>)>(
        "select name, path from BuildOutputs where build = $1",
    )
    .bind(build)
    .fetch_all(&d.pool)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

/// Every file under `path`, read (symlinks not followed).
fn contents(path: &std::path::Path, out: &mut Vec<(String, Vec<u8>)>) {
    let meta = std::fs::symlink_metadata(path).unwrap();
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            contents(&entry.unwrap().path(), out);
        }
    } else if meta.file_type().is_symlink() {
        let target = std::fs::read_link(path).unwrap();
        out.push((
            path.display().to_string(),
            target.into_os_string().into_encoded_bytes(),
        ));
    } else {
        out.push((path.display().to_string(), std::fs::read(path).unwrap()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mixed_ca_job_set_builds_what_plain_nix_builds_with_no_placeholder_left() {
    let mut d = Deployment::start().await;
    d.add_agent("a1", 2).await;
    d.add_agent("a2", 2).await;
    let attrs: Vec<&str> = JOBS.iter().map(|(a, _)| *a).collect();
    let text = expr(MIXED);
    let drvs = d.env.instantiate(&text, &attrs);
    let jobs: Vec<(String, String)> = attrs
        .iter()
        .zip(&drvs)
        .map(|(a, p)| (a.to_string(), p.clone()))
        .collect();
    let ids = d.submit(&jobs).await;
    let statuses = d.wait_finished(&ids, 300).await;
    for ((attr, expected), id) in JOBS.iter().zip(&ids) {
        assert_eq!(
            statuses[id],
            *expected,
            "{attr}: {statuses:?}\n{}",
            steps(&d).await
        );
    }

    // The same expression, built by plain Nix in a fresh store of its own.
    let fresh = IsolatedStore::new();
    let fresh_drvs = d.env.instantiate_in(&fresh, &text, &attrs);
    let dir = StoreDir::default();
    let mut store = sluice_nix::daemon::DaemonClient::connect(&d.host_daemon.socket_path())
        .await
        .unwrap();
    for (((attr, expected), id), drv) in JOBS.iter().zip(&ids).zip(&fresh_drvs) {
        let outputs = outputs_of(&d, *id).await;
        if *expected != 0 && *expected != 6 {
            continue;
        }
        let plain = realise_in(&fresh, drv);
        let ours: Vec<String> = outputs.values().map(|p| p.clone().unwrap()).collect();
        let mut ours_sorted = ours.clone();
        ours_sorted.sort();
        let mut plain_sorted = plain.clone();
        plain_sorted.sort();
        assert_eq!(
            ours_sorted, plain_sorted,
            "{attr}: the paths plain Nix gives"
        );
        for path in &ours {
            let parsed = dir.parse_path(path).unwrap();
            assert!(
                store.is_valid_path(&parsed).await.unwrap(),
                "{attr}: {path} is valid in the queue runner's store"
            );
        }
    }

    // No output of any build holds a placeholder of an input's output.
    let mut placeholders = Vec::new();
    for drv in &drvs {
        let sp = dir.parse_path(drv).unwrap();
        let parsed = Derivation::parse_drv_file(&dir, &sp, &std::fs::read(drv).unwrap()).unwrap();
        for (input, outputs) in &parsed.input_drvs {
            for output in outputs {
                placeholders.push(downstream_placeholder(input, output));
            }
        }
    }
    assert!(!placeholders.is_empty());
    for id in &ids {
        for path in outputs_of(&d, *id).await.values().flatten() {
            let mut files = Vec::new();
            contents(std::path::Path::new(path), &mut files);
            for (file, bytes) in files {
                let text = String::from_utf8_lossy(&bytes);
                for p in &placeholders {
                    assert!(!text.contains(p.as_str()), "{file} holds placeholder {p}");
                }
            }
        }
    }

    // The web UI's contract: a resolved step names its resolved derivation
    // by base name, and that derivation's own row has the full path.
    let resolved: Vec<(i32, String, Option<String>)> =
        sqlx::query_as("select build, drvPath, resolvedDrvPath from BuildSteps where status = 13")
            .fetch_all(&d.pool)
            .await
            .unwrap();
    assert!(!resolved.is_empty(), "CA on CA is resolved");
    for (build, original, base) in &resolved {
        let base = base.clone().unwrap();
        assert!(!base.contains('/') && base.ends_with(".drv"), "{base}");
        let (rows,): (i64,) =
            sqlx::query_as("select count(*) from BuildSteps where drvPath = $1 and status = 0")
                .bind(format!("/nix/store/{base}"))
                .fetch_one(&d.pool)
                .await
                .unwrap();
        let (failed,): (i64,) =
            sqlx::query_as("select count(*) from BuildSteps where drvPath = $1 and status <> 0")
                .bind(format!("/nix/store/{base}"))
                .fetch_one(&d.pool)
                .await
                .unwrap();
        assert!(
            rows == 1 || failed > 0,
            "build {build}: {original} resolved to {base}, built {rows} times"
        );
    }

    // The whole job set queued again finishes as before, all of it cached:
    // nothing is resolved or dispatched, and the failures are cached
    // failures (their one row each has status 8), although the failing
    // derivation's output has no path for FailedPaths to hold.
    let rows_before: i64 = sqlx::query_scalar("select count(*) from BuildSteps")
        .fetch_one(&d.pool)
        .await
        .unwrap();
    let again = d.submit(&jobs).await;
    let statuses = d.wait_finished(&again, 120).await;
    let cached: Vec<(i32, i32)> =
        sqlx::query_as("select id, isCachedBuild from Builds where id = any($1) order by id")
            .bind(&again)
            .fetch_all(&d.pool)
            .await
            .unwrap();
    for (((attr, expected), id), (_, is_cached)) in JOBS.iter().zip(&again).zip(&cached) {
        assert_eq!(
            (statuses[id], *is_cached),
            (*expected, 1),
            "{attr} queued again: {statuses:?}\n{}",
            steps(&d).await
        );
    }
    for (first, second) in ids.iter().zip(&again) {
        assert_eq!(outputs_of(&d, *first).await, outputs_of(&d, *second).await);
    }
    let added = step_rows(&d, &again).await;
    let failures = JOBS.iter().filter(|(_, s)| *s == 1 || *s == 2).count();
    assert_eq!(added.len(), failures, "{added:?}\n{}", steps(&d).await);
    assert!(
        added.iter().all(|(_, s, m)| *s == Some(8) && m.is_empty()),
        "{added:?}"
    );
    let rows_after: i64 = sqlx::query_scalar("select count(*) from BuildSteps")
        .fetch_one(&d.pool)
        .await
        .unwrap();
    assert_eq!(rows_before + failures as i64, rows_after);

    // Restarted as the web UI does it (the failing output has no path to
    // delete from FailedPaths): built again, and failed again.
    let failing = again[JOBS.iter().position(|(a, _)| *a == "failing").unwrap()];
    d.restart_build_as_the_web_ui_does(failing).await;
    let statuses = d.wait_finished(&[failing], 60).await;
    assert_eq!(statuses[&failing], 1);
    let rows = step_rows(&d, &[failing]).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[1].1, Some(1), "a real build: {rows:?}");
    assert!(!rows[1].2.is_empty(), "{rows:?}");

    // Restarted while the queue runner is down, so it never hears of it:
    // the next one still builds it again.
    d.stop_queue_runner().await;
    d.restart_build_as_the_web_ui_does(failing).await;
    d.start_queue_runner_again().await;
    d.add_agent("a3", 2).await;
    let statuses = d.wait_finished(&[failing], 60).await;
    assert_eq!(statuses[&failing], 1);
    let rows = step_rows(&d, &[failing]).await;
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert_eq!((rows[2].1, rows[2].2.as_str()), (Some(1), "a3"), "{rows:?}");
    d.stop().await;
}

/// `(build, status, machine)` of every step row of `builds`, in order.
async fn step_rows(d: &Deployment, builds: &[i32]) -> Vec<(i32, Option<i32>, String)> {
    sqlx::query_as(
        "select build, status, machine from BuildSteps where build = any($1) order by build, stepnr",
    )
    .bind(builds)
    .fetch_all(&d.pool)
    .await
    .unwrap()
}

const CUTOFF: &str = r#"rec {
  up1 = ca { name = "up"; unused = "one"; args = [ "-c" "echo same > $out" ]; };
  up2 = ca { name = "up"; unused = "two"; args = [ "-c" "echo same > $out" ]; };
  down1 = ca { name = "down"; args = [ "-c" "cat ${up1} > $out" ]; };
  down2 = ca { name = "down"; args = [ "-c" "cat ${up2} > $out" ]; };
}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_downstreams_that_resolve_alike_build_once_and_share_the_output() {
    let mut d = Deployment::start().await;
    d.add_agent("a1", 2).await;
    let text = expr(CUTOFF);
    let ids = d
        .submit_attrs(&text, &["up1", "up2", "down1", "down2"])
        .await;
    let statuses = d.wait_finished(&ids, 180).await;
    assert!(
        statuses.values().all(|s| *s == 0),
        "{statuses:?}\n{}",
        steps(&d).await
    );
    let out = |id: i32| {
        let d = &d;
        async move { outputs_of(d, id).await["out"].clone().unwrap() }
    };
    assert_eq!(
        out(ids[0]).await,
        out(ids[1]).await,
        "identical upstream outputs"
    );
    assert_eq!(
        out(ids[2]).await,
        out(ids[3]).await,
        "one downstream output"
    );
    let resolved: Vec<(i32, Option<String>)> = sqlx::query_as(
        "select build, resolvedDrvPath from BuildSteps where status = 13 and build = any($1) order by build",
    )
    .bind(&ids[2..])
    .fetch_all(&d.pool)
    .await
    .unwrap();
    assert_eq!(resolved.len(), 2, "{resolved:?}");
    assert_eq!(
        resolved[0].1, resolved[1].1,
        "both resolve to one derivation"
    );
    let base = resolved[0].1.clone().unwrap();
    let (built,): (i64,) =
        sqlx::query_as("select count(*) from BuildSteps where drvPath = $1 and status = 0")
            .bind(format!("/nix/store/{base}"))
            .fetch_one(&d.pool)
            .await
            .unwrap();
    assert_eq!(built, 1, "the resolved derivation is built once");
    // It stays rooted, so a garbage collection keeps it while it waits.
    let root = d.data_dir.path().join("gcroots").join(&base);
    assert_eq!(
        std::fs::read_link(&root).unwrap(),
        std::path::PathBuf::from(format!("/nix/store/{base}"))
    );

    // Both the resolved rows and the resolved derivation's row carry the
    // outputs.
    let unknown: i64 = sqlx::query_scalar(
        "select count(*) from BuildSteps s join BuildStepOutputs o using (build, stepnr)
         where s.status in (0, 13) and s.build = any($1) and o.path is null",
    )
    .bind(&ids)
    .fetch_one(&d.pool)
    .await
    .unwrap();
    assert_eq!(unknown, 0, "{}", steps(&d).await);

    // The queue runner's own store knows what each output became.
    let recorded: Vec<(String, String, String)> =
        sqlx::query_as("select drvHash, outputName, outPath from SluiceRealisations")
            .fetch_all(&d.pool)
            .await
            .unwrap();
    assert!(recorded.len() >= 3, "{recorded:?}");
    let mut store = sluice_nix::daemon::DaemonClient::connect(&d.host_daemon.socket_path())
        .await
        .unwrap();
    let dir = StoreDir::default();
    for (hash, output, path) in &recorded {
        let id = sluice_nix::daemon::DrvOutput::ByHash {
            drv_hash: sluice_nix::hash::Hash::parse_prefixed(hash).unwrap(),
            output: output.clone(),
        };
        let mut known = None;
        // Registered in the background, just after the commit.
        for _ in 0..50 {
            known = store.query_realisation(&id).await.unwrap();
            if known.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let known = known.unwrap_or_else(|| panic!("{hash}!{output} is not in the store"));
        assert_eq!(dir.print(&known.out_path), *path);
    }

    // Queued again, everything is known: cached, nothing dispatched.
    let (steps_before,): (i64,) = sqlx::query_as("select count(*) from BuildSteps")
        .fetch_one(&d.pool)
        .await
        .unwrap();
    let again = d
        .submit_attrs(&text, &["up1", "up2", "down1", "down2"])
        .await;
    let statuses = d.wait_finished(&again, 60).await;
    assert!(statuses.values().all(|s| *s == 0), "{statuses:?}");
    let cached: Vec<(i32, i32)> =
        sqlx::query_as("select id, isCachedBuild from Builds where id = any($1)")
            .bind(&again)
            .fetch_all(&d.pool)
            .await
            .unwrap();
    assert!(cached.iter().all(|(_, c)| *c == 1), "{cached:?}");
    let (steps_after,): (i64,) = sqlx::query_as("select count(*) from BuildSteps")
        .fetch_one(&d.pool)
        .await
        .unwrap();
    assert_eq!(
        steps_before, steps_after,
        "nothing was dispatched or resolved"
    );
    for (first, second) in ids.iter().zip(&again) {
        assert_eq!(out(*first).await, out(*second).await);
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_whose_input_output_was_never_recorded_cannot_be_resolved_and_says_which() {
    use sluice_queue_runner::grpc::{LocalStore, StoreConnection};
    let d = Deployment::start().await;
    let drvs = d.env.instantiate(&expr(MIXED), &["mid"]);
    let store = sluice_queue_runner::store::Store::new(LocalStore::new(
        StoreConnection::Socket(d.host_daemon.socket_path()),
        2,
    ));
    let error = sluice_queue_runner::driver::resolve::resolve_derivation(
        &d.pool,
        &store,
        &Default::default(),
        &drvs[0],
        d.data_dir.path(),
    )
    .await
    .unwrap_err();
    assert!(
        error.contains("output 'out' of input")
            && error.contains("-root-")
            && error.contains("never recorded as built"),
        "{error}"
    );
    d.stop().await;
}

/// A `nix-daemon` on the host store without `ca-derivations`, killed on
/// drop.
struct DaemonWithoutCa {
    child: std::process::Child,
    dir: tempfile::TempDir,
}

impl DaemonWithoutCa {
    fn start() -> DaemonWithoutCa {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("socket");
        let child = std::process::Command::new("nix-daemon")
            .env(
                "NIX_CONFIG",
                "build-users-group =\nsandbox = false\nsubstituters =\n",
            )
            .env("NIX_REMOTE", "local")
            .env("NIX_DAEMON_SOCKET_PATH", &socket)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        for _ in 0..200 {
            if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        DaemonWithoutCa { child, dir }
    }

    fn socket(&self) -> std::path::PathBuf {
        self.dir.path().join("socket")
    }
}

impl Drop for DaemonWithoutCa {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_runner_whose_nix_lacks_ca_derivations_aborts_ca_builds_and_says_why() {
    let daemon = DaemonWithoutCa::start();
    let socket = daemon.socket();
    let mut d = Deployment::start_with(|c| c.store_socket = Some(socket)).await;
    d.add_agent("a1", 2).await;
    let ids = d.submit_attrs(&expr(MIXED), &["mid"]).await;
    let statuses = d.wait_finished(&ids, 60).await;
    assert_eq!(statuses[&ids[0]], 3, "{}", steps(&d).await);
    let error = d.only_step_error(ids[0]).await;
    assert!(
        error.contains("experimental-features = ca-derivations"),
        "{error}"
    );
    d.stop().await;
}

const LOCAL: &str = r#"rec {
  root = ca { name = "local-root"; args = [ "-c" "echo local root > $out" ]; };
  down = ca { name = "local-down"; args = [ "-c" "cat ${root} > $out; echo down >> $out" ]; };
}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_output_only_the_local_store_knows_is_taken_as_built_and_recorded() {
    let mut d = Deployment::start().await;
    d.add_agent("a1", 2).await;
    let text = expr(LOCAL);
    let drvs = d.env.instantiate(&text, &["root", "down"]);
    // Built by plain Nix in the queue runner's store: the store knows the
    // realisation, the database does not.
    let built = realise_in(&d.env, &drvs[0]);
    assert_eq!(built.len(), 1, "{built:?}");
    let (recorded,): (i64,) = sqlx::query_as("select count(*) from SluiceRealisations")
        .fetch_one(&d.pool)
        .await
        .unwrap();
    assert_eq!(recorded, 0);

    let jobs = [
        ("root".to_owned(), drvs[0].clone()),
        ("down".to_owned(), drvs[1].clone()),
    ];
    let ids = d.submit(&jobs).await;
    let statuses = d.wait_finished(&ids, 120).await;
    assert!(
        statuses.values().all(|s| *s == 0),
        "{statuses:?}\n{}",
        steps(&d).await
    );
    // The root finished cached with the path the store knew, no step run.
    let (cached,): (i32,) = sqlx::query_as("select isCachedBuild from Builds where id = $1")
        .bind(ids[0])
        .fetch_one(&d.pool)
        .await
        .unwrap();
    assert_eq!(cached, 1, "{}", steps(&d).await);
    assert_eq!(
        outputs_of(&d, ids[0]).await["out"].as_deref(),
        Some(built[0].as_str())
    );
    let (root_rows,): (i64,) = sqlx::query_as("select count(*) from BuildSteps where drvPath = $1")
        .bind(&drvs[0])
        .fetch_one(&d.pool)
        .await
        .unwrap();
    assert_eq!(
        root_rows,
        0,
        "the root was not built again: {}",
        steps(&d).await
    );
    // Its realisation is now in the database, which the dependent's
    // resolution read.
    let rows: Vec<(String, String)> =
        sqlx::query_as("select outPath, drvPath from SluiceRealisations where drvPath = $1")
            .bind(&drvs[0])
            .fetch_all(&d.pool)
            .await
            .unwrap();
    assert_eq!(rows, [(built[0].clone(), drvs[0].clone())]);
    let (resolved,): (i64,) = sqlx::query_as(
        "select count(*) from BuildSteps where build = $1 and drvPath = $2 and status = 13",
    )
    .bind(ids[1])
    .bind(&drvs[1])
    .fetch_one(&d.pool)
    .await
    .unwrap();
    assert_eq!(resolved, 1, "{}", steps(&d).await);
    let down = outputs_of(&d, ids[1]).await["out"].clone().unwrap();
    let text = std::fs::read_to_string(&down).unwrap();
    assert_eq!(text, "local root\ndown\n");
    d.stop().await;
}
