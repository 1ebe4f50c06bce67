//! End to end, what lands where Hydra's web UI and notifier look:
//! `nix-support` products, metrics and release name, status 6 for a
//! `failed` marker, failures and dependency failures, logs at the
//! contract's path, the notifications, a cached build, the report
//! `submit --wait` prints for failed builds (built on Nix 2.8 and 2.26),
//! and each run's exit status and phase timings in `SluiceStepRuns`.

#![allow(clippy::unwrap_used)]

#[path = "e2e/harness.rs"]
mod harness;

use std::time::Duration;

use harness::Deployment;
use sluice_test_support::nix::NixVersion;
use sqlx::postgres::PgListener;

const JOBS: &str = r#"
rec {
  products = mkDrv {
    name = "products";
    PATH = "/usr/bin:/bin";
    args = [ "-c" ''
      echo "making products"
      dir="$out/my docs"
      mkdir -p $out/nix-support "$dir"
      echo hello > "$dir/read me.txt"
      echo "doc manual \"$dir/read me.txt\"" > $out/nix-support/hydra-build-products
      echo "file tarball $out/nix-support" >> $out/nix-support/hydra-build-products
      printf 'lines 42 count\nspeed 1.5\nbogus notanumber\n' > $out/nix-support/hydra-metrics
      echo "  products-1.2.3 " > $out/nix-support/hydra-release-name
    '' ];
  };
  marked = mkDrv {
    name = "marked";
    PATH = "/usr/bin:/bin";
    args = [ "-c" "mkdir -p $out/nix-support; echo broken-but-built; touch $out/nix-support/failed" ];
  };
  fails = mkDrv {
    name = "fails";
    args = [ "-c" "echo about to fail; echo boom-on-stderr >&2; exit 1" ];
  };
  needsFails = mkDrv {
    name = "needs-fails";
    dep = fails;
    args = [ "-c" "echo never > $out" ];
  };
}
"#;

/// productnr, type, subtype, fileSize, sha256hash, path, name.
type ProductRow = (
    i32,
    String,
    String,
    Option<i64>,
    Option<String>,
    String,
    String,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn results_logs_and_notifications_follow_the_contract() {
    let mut d = Deployment::start().await;
    let mut listener = PgListener::connect(&d.pg.url()).await.unwrap();
    listener
        .listen_all([
            "build_started",
            "step_started",
            "step_finished",
            "build_finished",
        ])
        .await
        .unwrap();
    d.add_agent("agent", 2).await;
    let names = ["products", "marked", "fails", "needsFails"];
    let drvs = d.env.instantiate(JOBS, &names);
    let jobs: Vec<(String, String)> = names
        .iter()
        .map(|n| n.to_string())
        .zip(drvs.iter().cloned())
        .collect();
    let ids = d.submit(&jobs).await;
    let statuses = d.wait_finished(&ids, 120).await;
    let (products, marked, fails, needs_fails) = (ids[0], ids[1], ids[2], ids[3]);
    assert_eq!(statuses[&products], 0);
    assert_eq!(statuses[&marked], 6, "nix-support/failed gives status 6");
    assert_eq!(statuses[&fails], 1);
    assert_eq!(statuses[&needs_fails], 2, "a dependency failed");

    // Products: the quoted path with spaces, and a directory product.
    let rows: Vec<ProductRow> = sqlx::query_as(
        "select productnr, type, subtype, fileSize, sha256hash, path, name from BuildProducts
         where build = $1 order by productnr",
    )
    .bind(products)
    .fetch_all(&d.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!((rows[0].1.as_str(), rows[0].2.as_str()), ("doc", "manual"));
    assert!(rows[0].5.ends_with("/my docs/read me.txt"), "{rows:?}");
    assert_eq!(rows[0].6, "read me.txt");
    assert_eq!(rows[0].3, Some(6));
    assert_eq!(
        rows[0].4.as_deref(),
        Some("5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"),
        "sha256 of \"hello\\n\""
    );
    assert_eq!(rows[1].3, None, "a directory has no size");

    let metrics: Vec<(String, Option<String>, f64)> =
        sqlx::query_as("select name, unit, value from BuildMetrics where build = $1 order by name")
            .bind(products)
            .fetch_all(&d.pool)
            .await
            .unwrap();
    assert_eq!(
        metrics,
        vec![
            ("lines".into(), Some("count".into()), 42.0),
            ("speed".into(), None, 1.5)
        ]
    );
    let release: Option<String> =
        sqlx::query_scalar("select releaseName from Builds where id = $1")
            .bind(products)
            .fetch_one(&d.pool)
            .await
            .unwrap();
    assert_eq!(release.as_deref(), Some("products-1.2.3"));

    // Logs at <dataDir>/build-logs/<2>/<rest>, with what the builder printed
    // (stdout and stderr), for successes and failures alike.
    for (drv, text) in [(&drvs[0], "making products"), (&drvs[2], "boom-on-stderr")] {
        let base = drv.strip_prefix("/nix/store/").unwrap();
        let path = d
            .data_dir
            .path()
            .join("build-logs")
            .join(&base[..2])
            .join(&base[2..]);
        let log =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(log.contains(text), "{}: {log:?}", path.display());
    }

    // The failed step carries its status and message; the dependent build
    // has a step propagated from the failed one.
    let (status, msg): (i32, Option<String>) =
        sqlx::query_as("select status, errorMsg from BuildSteps where build = $1 and drvPath = $2")
            .bind(fails)
            .bind(&drvs[2])
            .fetch_one(&d.pool)
            .await
            .unwrap();
    assert_eq!(status, 1);
    assert!(msg.unwrap_or_default().contains("exit code 1"));
    let propagated: Option<i32> = sqlx::query_scalar(
        "select propagatedFrom from BuildSteps where build = $1 and drvPath = $2",
    )
    .bind(needs_fails)
    .bind(&drvs[2])
    .fetch_one(&d.pool)
    .await
    .unwrap();
    assert_eq!(propagated, Some(fails));

    // Notifications, with their payloads.
    let mut seen: Vec<(String, String)> = Vec::new();
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(500), listener.recv()).await {
        seen.push((n.channel().to_string(), n.payload().to_string()));
    }
    let has = |channel: &str, pred: &dyn Fn(&str) -> bool| {
        seen.iter().any(|(c, p)| c == channel && pred(p))
    };
    assert!(
        has("build_started", &|p| p == products.to_string()),
        "{seen:?}"
    );
    let fails_log = format!("{}\t", fails);
    assert!(
        has("step_finished", &|p| p.starts_with(&fails_log)
            && p.contains("/build-logs/")),
        "{seen:?}"
    );
    assert!(
        has("build_finished", &|p| p
            == format!("{fails}\t{needs_fails}")),
        "the failure finishes its dependent with it: {seen:?}"
    );
    assert!(
        has("build_finished", &|p| p == products.to_string()),
        "{seen:?}"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_build_whose_outputs_exist_finishes_cached_without_dispatch() {
    let d = Deployment::start().await;
    let drv = d
        .env
        .instantiate(
            r#"{ x = mkDrv { name = "cached"; args = [ "-c" "echo hi > $out" ]; }; }"#,
            &["x"],
        )
        .remove(0);
    d.env.realise(&drv);
    // No agent at all: nothing can be dispatched. Queued with the CLI,
    // which follows the build and exits 0 once it succeeded.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_queue-runner"))
        .args([
            "submit",
            "--database-url",
            &d.pg.url(),
            "--wait",
            "--job",
            "cached",
            &drv,
        ])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("all 1 builds succeeded"), "{stdout}");
    let ids: Vec<i32> = sqlx::query_scalar("select id from Builds where job = 'cached'")
        .fetch_all(&d.pool)
        .await
        .unwrap();
    let statuses = d.wait_finished(&ids, 60).await;
    assert_eq!(statuses[&ids[0]], 0);
    let (cached, start, stop): (i32, i32, i32) =
        sqlx::query_as("select isCachedBuild, startTime, stopTime from Builds where id = $1")
            .bind(ids[0])
            .fetch_one(&d.pool)
            .await
            .unwrap();
    assert_eq!(cached, 1);
    assert!(start > 0 && stop > 0);
    let steps: i64 = sqlx::query_scalar("select count(*) from BuildSteps")
        .fetch_one(&d.pool)
        .await
        .unwrap();
    assert_eq!(steps, 0, "nothing was dispatched");
    d.stop().await;
}

/// A builder that prints 25 numbered lines, one on stderr, and fails; and
/// a build that depends on it.
const FAILING: &str = r#"
rec {
  chatty = mkDrv {
    name = "chatty";
    args = [ "-c" ''
      i=1
      while [ $i -le 25 ]; do echo "tail-marker-$i."; i=$((i + 1)); done
      echo "giving up" >&2
      exit 1
    '' ];
  };
  needsChatty = mkDrv {
    name = "needs-chatty";
    dep = chatty;
    args = [ "-c" "echo never > $out" ];
  };
}
"#;

/// The report for a failure on an agent whose store is on `nix`: Nix 2.8
/// and 2.26 word a builder's failure differently.
async fn wait_reports_the_failed_step_its_log_path_and_last_lines(nix: NixVersion) {
    let mut d = Deployment::start().await;
    d.add_agent_on("agent", 2, nix).await;
    let drvs = d.env.instantiate(FAILING, &["chatty", "needsChatty"]);
    let ids = d
        .submit(&[
            ("chatty".into(), drvs[0].clone()),
            ("needsChatty".into(), drvs[1].clone()),
        ])
        .await;
    let (chatty, needs) = (ids[0], ids[1]);

    // What `submit --wait` prints, through the same function.
    let mut out = Vec::new();
    let all_ok = tokio::time::timeout(
        Duration::from_secs(120),
        sluice_queue_runner::submit::follow(
            &d.pool,
            &ids,
            Duration::from_millis(100),
            d.data_dir.path(),
            &mut out,
        ),
    )
    .await
    .expect("the builds finish within 120 s")
    .unwrap();
    assert!(!all_ok);
    let out = String::from_utf8(out).unwrap();

    let log = sluice_queue_runner::logs::log_path(d.data_dir.path(), &drvs[0]).unwrap();
    assert!(log.is_file(), "{}", log.display());
    let report_of = |id: i32| {
        let head = format!("build {id} (");
        let start = out
            .find(&head)
            .unwrap_or_else(|| panic!("no report for build {id}: {out}"));
        let end = out[start + 1..]
            .find("\nbuild ")
            .map_or(out.len(), |n| start + n + 2);
        out[start..end].to_string()
    };

    let direct = report_of(chatty);
    assert!(
        direct.starts_with(&format!("build {chatty} (chatty): failed\n")),
        "{out}"
    );
    let stepnr: i32 = sqlx::query_scalar(
        "select stepnr from BuildSteps where build = $1 and drvPath = $2 and status = 1",
    )
    .bind(chatty)
    .bind(&drvs[0])
    .fetch_one(&d.pool)
    .await
    .unwrap();
    assert!(
        direct.contains(&format!(
            "  failed step: {} (step {stepnr}): failed\n",
            drvs[0]
        )),
        "{out}"
    );
    assert!(direct.contains("  machine: agent\n"), "{out}");
    assert!(direct.contains("  exit code: 1\n"), "{out}");
    assert!(
        direct.contains(&format!(
            "  error: builder for '{}' failed with exit code 1\n",
            drvs[0]
        )),
        "Nix's own excerpt of the log is left out: {out}"
    );
    assert!(!direct.contains("nix log"), "{out}");
    assert!(
        direct.contains(&format!("  log: {}\n", log.display())),
        "{out}"
    );
    // The last 20 lines: markers 7 to 25 and what went to stderr.
    let tail: String = (7..=25)
        .map(|n| format!("    tail-marker-{n}.\n"))
        .chain(["    giving up\n".to_string()])
        .collect();
    assert!(
        direct.contains(&format!("  last 20 lines of the log:\n{tail}")),
        "{out}"
    );
    assert!(!direct.contains("tail-marker-6."), "{out}");

    // The dependent build points at the step that failed under the first
    // build, and at its log.
    let dependent = report_of(needs);
    assert!(
        dependent.starts_with(&format!("build {needs} (needsChatty): dependency failed\n")),
        "{out}"
    );
    assert!(
        dependent.contains(&format!(
            "  failed step: {} (step {stepnr} of build {chatty}, whose failure this build inherited): failed\n",
            drvs[0]
        )),
        "{out}"
    );
    assert!(
        dependent.contains(&format!("  log: {}\n", log.display())),
        "{out}"
    );
    assert!(dependent.contains("    giving up\n"), "{out}");

    // Without the log file, the report says so.
    std::fs::remove_file(&log).unwrap();
    let state = sluice_queue_runner::submit::BuildState {
        id: chatty,
        job: "chatty".into(),
        finished: true,
        status: Some(1),
    };
    let report = sluice_queue_runner::submit::failure_report(&d.pool, &state, d.data_dir.path())
        .await
        .unwrap();
    assert!(
        report.contains(&format!("  log: none; no file at {}\n", log.display())),
        "{report}"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wait_reports_the_failed_step_its_log_path_and_last_lines_on_nix_2_8() {
    wait_reports_the_failed_step_its_log_path_and_last_lines(NixVersion::Nix2_8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wait_reports_the_failed_step_its_log_path_and_last_lines_on_nix_2_26() {
    wait_reports_the_failed_step_its_log_path_and_last_lines(NixVersion::Nix2_26).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_run_records_the_builders_exit_status_and_its_phase_timings_on_nix_2_8() {
    each_run_records_the_builders_exit_status_and_its_phase_timings(NixVersion::Nix2_8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_run_records_the_builders_exit_status_and_its_phase_timings_on_nix_2_26() {
    each_run_records_the_builders_exit_status_and_its_phase_timings(NixVersion::Nix2_26).await;
}

async fn each_run_records_the_builders_exit_status_and_its_phase_timings(nix: NixVersion) {
    let mut d = Deployment::start().await;
    d.add_agent_on("a1", 3, nix).await;
    let jobs = r#"
{
  ok = mkDrv { name = "ok"; PATH = "/usr/bin:/bin";
    args = [ "-c" "sleep 1; head -c 4000000 /dev/zero > $out" ]; };
  exits = mkDrv { name = "exits"; PATH = "/usr/bin:/bin";
    args = [ "-c" "echo this line says it failed with exit code 7; exit 42" ]; };
  killed = mkDrv { name = "killed"; PATH = "/usr/bin:/bin"; args = [ "-c" "kill -9 $$" ]; };
}"#;
    let ids = d.submit_attrs(jobs, &["ok", "exits", "killed"]).await;
    let statuses = d.wait_finished(&ids, 120).await;
    assert_eq!(statuses[&ids[0]], 0, "{statuses:?}");
    let run = |id: i32| {
        let pool = d.pool.clone();
        async move {
            sqlx::query_as::<_, (i32, Option<i32>, Option<i32>, i64, i64, i64)>(
                "select s.status, r.exitCode, r.signal, r.fetchMs, r.buildMs, r.uploadMs
                 from BuildSteps s join SluiceStepRuns r using (build, stepnr)
                 where s.build = $1",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let (status, exit, signal, _fetch, build, upload) = run(ids[0]).await;
    assert_eq!((status, exit, signal), (0, Some(0), None));
    assert!(build >= 1000, "the build slept 1 s, yet took {build} ms");
    assert!(upload > 0, "4 MB went up in {upload} ms");
    let (status, exit, signal, _, _, upload) = run(ids[1]).await;
    assert_eq!((status, exit, signal, upload), (1, Some(42), None, 0));
    let (status, exit, signal, _, _, _) = run(ids[2]).await;
    assert_eq!((status, exit, signal), (1, None, Some(9)));
    d.stop().await;
}
