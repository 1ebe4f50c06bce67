//! SIGTERM to a builder agent in the middle of a 20 s build: the real
//! executables (queue runner on its embedded PostgreSQL, two builder
//! agents). The draining agent lets the build finish and delivers it,
//! takes no step queued meanwhile (the other agent builds it), and exits 0.

#![allow(clippy::unwrap_used)]

mod cli;

use std::time::{Duration, Instant};

use cli::*;
use nix::sys::signal::Signal;
use sluice_test_support::nix::NixEnv;

const TOKEN: &str = "cli-drain-token-0123456789abcdef";
const BUILD_S: u64 = 20;

const JOBS: &str = r#"{
  slow = mkDrv { PATH = "/usr/bin:/bin"; name = "drain-slow"; args = [ "-c" "echo started slow; sleep 20; echo slow > $out" ]; };
  quick = mkDrv { PATH = "/usr/bin:/bin"; name = "drain-quick"; args = [ "-c" "echo quick > $out" ]; };
}"#;

/// Each step row: job, status, machine, start and stop time.
type Row = (String, Option<i32>, String, Option<i32>, Option<i32>);

async fn rows(pool: &sqlx::PgPool) -> Vec<Row> {
    sqlx::query_as(
        "select b.job, s.status, s.machine, s.startTime, s.stopTime
         from BuildSteps s join Builds b on b.id = s.build order by b.id, s.stepnr",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_running_build_finish_sends_new_steps_elsewhere_and_the_agent_exits_0() {
    let farm = Serving::start(TOKEN, &[]);
    let (dir, runner) = (farm.dir.path(), &farm.runner);
    let mut draining = farm.agent("draining", 1, &[]);

    let env = NixEnv::new();
    let expr = env.write_expr(JOBS);
    submit_jobs(dir, &expr, &["slow"]);
    let pool = embedded_pool(dir).await;
    wait_first_step_row(&pool, runner).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    // The build has started: its log says so.
    let drv: String = sqlx::query_scalar("select drvPath from BuildSteps")
        .fetch_one(&pool)
        .await
        .unwrap();
    let log = sluice_queue_runner::logs::log_path(dir, &drv).unwrap();
    while !std::fs::read_to_string(&log).is_ok_and(|l| l.contains("started slow")) {
        assert!(Instant::now() < deadline, "{}", runner.output());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _spare = farm.agent("spare", 1, &[]);

    draining.signal(Signal::SIGTERM);
    let signalled = Instant::now();
    runner.expect_line("agent draining", Duration::from_secs(10));
    submit_jobs(dir, &expr, &["quick"]);

    let status = draining.wait_exit(Duration::from_secs(BUILD_S + 30));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "the drained agent exits 0:\n{}",
        draining.output()
    );
    assert!(draining
        .output()
        .contains("drained: every step is delivered"));
    wait_all_finished(&pool, runner).await;
    assert_settled(&pool, &runner.output()).await;
    let rows = rows(&pool).await;
    let took_since_signal = signalled.elapsed();
    // The slow build ran once, on the draining agent, to success; the
    // step queued meanwhile went to the spare agent, with no refusal row.
    assert_eq!(rows.len(), 2, "{rows:?}\n{}", runner.output());
    let (job, status, machine, start, stop) = &rows[0];
    assert_eq!(
        (job.as_str(), *status, machine.as_str()),
        ("slow", Some(0), "draining"),
        "{rows:?}"
    );
    let took = i64::from(stop.unwrap() - start.unwrap());
    assert!(
        (BUILD_S as i64 - 1..BUILD_S as i64 + 10).contains(&took),
        "{took} s: {rows:?}"
    );
    assert_eq!(
        (rows[1].0.as_str(), rows[1].1, rows[1].2.as_str()),
        ("quick", Some(0), "spare"),
        "{rows:?}"
    );
    assert!(
        took_since_signal < Duration::from_secs(BUILD_S + 30),
        "{took_since_signal:?}"
    );
    pool.close().await;
    farm.stop();
}
