//! The queue runner killed with SIGKILL while it builds, and started
//! again: the real executables (the queue runner on its embedded
//! PostgreSQL, which outlives it and is adopted; a builder agent that
//! reconnects), and the rows Hydra's web UI reads afterwards.

#![allow(clippy::unwrap_used)]

mod cli;

use std::process::Command;
use std::time::Duration;

use cli::*;
use nix::sys::signal::Signal;
use sluice_test_support::nix::{NixEnv, NIX_CONFIG};

const TOKEN: &str = "cli-restart-token-0123456789abcdef";
const UP: Duration = Duration::from_secs(120);

const JOBS: &str = r#"rec {
  slow1 = mkDrv { PATH = "/usr/bin:/bin"; name = "slow1"; args = [ "-c" "sleep 3; echo 1 > $out" ]; };
  slow2 = mkDrv { PATH = "/usr/bin:/bin"; name = "slow2"; args = [ "-c" "sleep 3; echo 2 > $out" ]; };
  top1 = mkDrv { PATH = "/usr/bin:/bin"; name = "top1"; a = slow1; b = slow2; args = [ "-c" "cat $a $b > $out" ]; };
  top2 = mkDrv { PATH = "/usr/bin:/bin"; name = "top2"; a = slow1; args = [ "-c" "cat $a > $out" ]; };
}"#;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn serve_on(data_dir: &std::path::Path, tokens: &std::path::Path, port: u16) -> Proc {
    let listen = format!("127.0.0.1:{port}");
    serve_with(
        data_dir,
        tokens,
        &["--grpc-listen", &listen, "--retry-interval-s", "1"],
    )
}

async fn count(pool: &sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_runner_killed_mid_build_resumes_every_build_after_a_restart() {
    let dir = data_dir();
    let _leftovers = StopLeftovers(dir.path().to_path_buf());
    let tokens = token_file(dir.path(), TOKEN);
    let port = free_port();

    let mut first = serve_on(dir.path(), &tokens, port);
    first.expect_line("queue runner up", UP);
    let _agent = Proc::spawn(
        Command::new(builder_agent())
            .args(["--queue-runner", &format!("http://127.0.0.1:{port}")])
            .arg("--token-file")
            .arg(&tokens)
            .args([
                "--max-jobs",
                "2",
                "--reconnect-max-ms",
                "500",
                "--name",
                "local",
            ])
            .env("NIX_CONFIG", NIX_CONFIG)
            .env_remove("RUST_LOG"),
    );
    first.expect_line("agent connected", Duration::from_secs(30));

    let env = NixEnv::new();
    let expr = env.write_expr(JOBS);
    let expr = expr.to_str().unwrap();
    let mut submit = Command::new(QUEUE_RUNNER);
    submit.arg("submit").arg("--data-dir").arg(dir.path());
    for job in ["slow1", "slow2", "top1", "top2"] {
        submit.args(["--job", job, expr, "-A", job]);
    }
    let out = submit.env("NIX_CONFIG", NIX_CONFIG).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let url = sluice_queue_runner::embedded::url_if_running(dir.path()).unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .unwrap();
    // Both slow leaves are building when the queue runner dies.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while count(&pool, "select count(*) from BuildSteps where busy >= 30").await < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the leaves never built; builds: {:?}\n{}",
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
    first.signal(Signal::SIGKILL);
    first.wait_exit(Duration::from_secs(30)).unwrap();

    let mut second = serve_on(dir.path(), &tokens, port);
    second.expect_line("queue runner up", UP);
    // The pool reconnects: the adopted server never went away.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let unfinished = count(&pool, "select count(*) from Builds where finished = 0").await;
        if unfinished == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{unfinished} builds never finished:\n{}",
            second.output()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    assert_settled(&pool, &second.output()).await;
    assert_eq!(
        count(
            &pool,
            "select count(*) from BuildSteps where status = 0 and drvPath like '%-slow%'"
        )
        .await,
        2
    );
    // The attempts the kill cut short are recorded, as aborted.
    assert!(count(&pool, "select count(*) from BuildSteps where status = 3").await >= 2);
    pool.close().await;

    second.signal(Signal::SIGTERM);
    assert_eq!(
        second.wait_exit(Duration::from_secs(60)).unwrap().code(),
        Some(0)
    );
    assert!(postmasters_of(dir.path()).is_empty());
}
