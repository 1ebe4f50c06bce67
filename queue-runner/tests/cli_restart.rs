//! The queue runner killed with SIGKILL while it builds, and started
//! again: the real executables (the queue runner on its embedded
//! PostgreSQL, which outlives it and is adopted; a builder agent that
//! reconnects and reports the builds it still runs), and the rows Hydra's
//! web UI reads afterwards.

#![allow(clippy::unwrap_used)]

mod cli;

use std::time::Duration;

use cli::*;
use nix::sys::signal::Signal;
use sluice_test_support::nix::NixEnv;

const TOKEN: &str = "cli-restart-token-0123456789abcdef";
const UP: Duration = Duration::from_secs(120);

/// How long the slow leaves build.
const BUILD_S: i64 = 20;

const JOBS: &str = r#"rec {
  slow1 = mkDrv { PATH = "/usr/bin:/bin"; name = "slow1"; args = [ "-c" "echo started slow1; sleep 20; echo finished slow1; echo 1 > $out" ]; };
  slow2 = mkDrv { PATH = "/usr/bin:/bin"; name = "slow2"; args = [ "-c" "echo started slow2; sleep 20; echo finished slow2; echo 2 > $out" ]; };
  top1 = mkDrv { PATH = "/usr/bin:/bin"; name = "top1"; a = slow1; b = slow2; args = [ "-c" "cat $a $b > $out" ]; };
  top2 = mkDrv { PATH = "/usr/bin:/bin"; name = "top2"; a = slow1; args = [ "-c" "cat $a > $out" ]; };
}"#;

fn serve_on(data_dir: &std::path::Path, tokens: &std::path::Path, port: u16) -> Proc {
    let listen = format!("127.0.0.1:{port}");
    serve_with(
        data_dir,
        tokens,
        &["--grpc-listen", &listen, "--retry-interval-s", "1"],
    )
}

/// A queue runner on its embedded PostgreSQL with one agent, building
/// `jobs` of `expr` until every `.drv` matching `busy_like` is building.
struct Farm {
    dir: tempfile::TempDir,
    _leftovers: StopLeftovers,
    tokens: std::path::PathBuf,
    port: u16,
    first: Proc,
    _agent: Proc,
    pool: sqlx::PgPool,
}

async fn farm_building(expr_text: &str, jobs: &[&str], busy_like: &str, busy: i64) -> Farm {
    let dir = data_dir();
    let leftovers = StopLeftovers(dir.path().to_path_buf());
    let tokens = token_file(dir.path(), TOKEN);
    let port = free_port();

    let first = serve_on(dir.path(), &tokens, port);
    first.expect_line("queue runner up", UP);
    let agent = agent_proc(port, &tokens, "local", 2, &[]);
    first.expect_line("agent connected", Duration::from_secs(30));

    let env = NixEnv::new();
    let expr = env.write_expr(expr_text);
    submit_jobs(dir.path(), &expr, jobs);
    let pool = embedded_pool(dir.path()).await;
    let sql =
        format!("select count(*) from BuildSteps where busy >= 30 and drvPath like '{busy_like}'");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while count(&pool, &sql).await < busy {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the steps never built; builds: {:?}\n{}",
            sqlx::query_as::<_, (i32, i32, Option<i32>)>(
                "select id, finished, buildStatus from Builds"
            )
            .fetch_all(&pool)
            .await
            .unwrap(),
            first.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Farm {
        dir,
        _leftovers: leftovers,
        tokens,
        port,
        first,
        _agent: agent,
        pool,
    }
}

/// The step rows of derivations named like `like`: drv, start, stop,
/// status, error.
async fn step_rows(
    pool: &sqlx::PgPool,
    like: &str,
) -> Vec<(String, i32, Option<i32>, Option<i32>, Option<String>)> {
    sqlx::query_as(
        "select drvPath, startTime, stopTime, status, errorMsg from BuildSteps
         where drvPath like $1 order by drvPath, stepnr",
    )
    .bind(like)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_runner_killed_mid_build_adopts_the_running_builds_after_a_restart() {
    let Farm {
        dir,
        _leftovers,
        tokens,
        port,
        mut first,
        _agent,
        pool,
    } = farm_building(JOBS, &["slow1", "slow2", "top1", "top2"], "%-slow%", 2).await;
    let started: Vec<(String, i32)> = step_rows(&pool, "%-slow%")
        .await
        .into_iter()
        .map(|r| (r.0, r.1))
        .collect();
    first.signal(Signal::SIGKILL);
    first.wait_exit(Duration::from_secs(30)).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut second = serve_on(dir.path(), &tokens, port);
    second.expect_line("queue runner up", UP);
    // The dashboard shows each adopted step building in its pinned slot,
    // as the agent reported them when it reconnected.
    second.expect_line("adopted a step its agent still runs", UP);
    let http: std::net::SocketAddr = bound_address(&second, "http_addr").parse().unwrap();
    let names: Vec<String> = started
        .iter()
        .map(|(drv, _)| {
            drv.rsplit('/')
                .next()
                .unwrap()
                .split_once('-')
                .unwrap()
                .1
                .to_owned()
        })
        .collect();
    let mut page = String::new();
    let shown = sluice_test_support::wait_until(Duration::from_secs(10), || {
        page = sluice_test_support::http_get(http, "/").unwrap_or_else(|e| e);
        names.iter().all(|name| {
            page.lines().any(|l| {
                l.contains(name.as_str())
                    && l.contains("building")
                    && l.starts_with("<tr><td>")
                    && l.contains("(node ")
            })
        })
    });
    assert!(shown, "{names:?} building in slots:\n{page}");
    // The pool reconnects: the adopted server never went away.
    wait_all_finished(&pool, &second).await;

    assert_settled(&pool, &second.output()).await;
    // Each slow leaf ran once: one row, successful, with the start time
    // of the attempt the restart adopted, and it ended about one build
    // time after it started, not after the restart.
    let rows = step_rows(&pool, "%-slow%").await;
    assert_eq!(rows.len(), 2, "{rows:?}\n{}", second.output());
    for ((drv, start, stop, status, _), (drv_before, start_before)) in rows.iter().zip(&started) {
        assert_eq!((drv, start), (drv_before, start_before), "{rows:?}");
        assert_eq!(*status, Some(0), "{drv}: {rows:?}\n{}", second.output());
        let took = i64::from(stop.unwrap()) - i64::from(*start);
        assert!(
            (BUILD_S - 1..BUILD_S + 10).contains(&took),
            "{drv} took {took} s from its start: {rows:?}"
        );
        // Its log holds what the agent streamed before and after the
        // restart, and the build started once.
        let log =
            std::fs::read_to_string(sluice_queue_runner::logs::log_path(dir.path(), drv).unwrap())
                .unwrap();
        assert_eq!(
            log.matches("started slow").count(),
            1,
            "{drv}'s log: {log:?}"
        );
        // What the build printed after the restart was appended to the
        // same log, which the adoption did not truncate.
        assert_eq!(
            log.matches("finished slow").count(),
            1,
            "{drv}'s log: {log:?}"
        );
    }
    assert_eq!(
        count(&pool, "select count(*) from BuildSteps where status = 3").await,
        0,
        "nothing was aborted:\n{}",
        second.output()
    );
    assert!(
        second
            .output()
            .contains("adopted a step its agent still runs"),
        "{}",
        second.output()
    );
    pool.close().await;

    second.signal(Signal::SIGTERM);
    assert_eq!(
        second.wait_exit(Duration::from_secs(60)).unwrap().code(),
        Some(0)
    );
    assert!(postmasters_of(dir.path()).is_empty());
}

const QUICK: &str = r#"rec {
  quick = mkDrv { PATH = "/usr/bin:/bin"; name = "quick"; args = [ "-c" "echo started quick; sleep 4; echo q > $out" ]; };
  after = mkDrv { PATH = "/usr/bin:/bin"; name = "after"; a = quick; args = [ "-c" "cat $a > $out" ]; };
}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_that_ends_while_the_queue_runner_is_down_reaches_the_next_one() {
    let Farm {
        dir,
        _leftovers,
        tokens,
        port,
        mut first,
        _agent: agent,
        pool,
    } = farm_building(QUICK, &["quick", "after"], "%-quick-%", 1).await;
    let started = step_rows(&pool, "%-quick-%").await;
    first.signal(Signal::SIGKILL);
    first.wait_exit(Duration::from_secs(30)).unwrap();
    // The build ends while no queue runner listens: the agent keeps its
    // result and outputs.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let restarted = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap();

    let mut second = serve_on(dir.path(), &tokens, port);
    second.expect_line("queue runner up", UP);
    wait_all_finished(&pool, &second).await;
    // The builds may finish first: this agent shares the queue runner's
    // store, so the output is valid (cached) before the result arrives.
    // The step's row is finished by the delivered result.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while count(&pool, "select count(*) from BuildSteps where busy <> 0").await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}",
            second.output()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_settled(&pool, &second.output()).await;
    let rows = step_rows(&pool, "%-quick-%").await;
    assert_eq!(
        rows.len(),
        1,
        "one attempt, one row: {rows:?}\n{}",
        second.output()
    );
    let (drv, start, stop, status, _) = &rows[0];
    assert_eq!((drv, start), (&started[0].0, &started[0].1));
    assert_eq!(*status, Some(0), "{rows:?}\n{}", second.output());
    // Recorded when the second queue runner received it.
    assert!(i64::from(stop.unwrap()) >= restarted, "{rows:?}");
    let log =
        std::fs::read_to_string(sluice_queue_runner::logs::log_path(dir.path(), drv).unwrap())
            .unwrap_or_else(|e| {
                panic!(
                    "no log ({e}):\n{}\nagent:\n{}",
                    second.output(),
                    agent.output()
                )
            });
    assert_eq!(log.matches("started quick").count(), 1, "log: {log:?}");
    // The dependent build used the delivered output.
    assert_eq!(
        count(&pool, "select count(*) from Builds where buildStatus = 0").await,
        2
    );
    pool.close().await;
    second.signal(Signal::SIGTERM);
    assert_eq!(
        second.wait_exit(Duration::from_secs(60)).unwrap().code(),
        Some(0)
    );
}
