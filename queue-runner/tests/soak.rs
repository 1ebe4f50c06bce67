//! Soak: 300 builds over a DAG with diamonds, on the real executables (a
//! queue runner on a throwaway PostgreSQL, two builder agents with stores
//! of their own), while the test kills agents, restarts PostgreSQL twice
//! and kills the queue runner once. Afterwards every build has succeeded,
//! no row is busy, no derivation has two successful rows, and every output
//! is valid in the queue runner's store.

#![allow(clippy::unwrap_used)]

mod cli;

use std::process::Command;
use std::time::{Duration, Instant};

use cli::*;
use nix::sys::signal::Signal;
use sluice_test_support::nix::{IsolatedStore, NixDaemon, NixEnv, NIX_CONFIG};
use sluice_test_support::pg::TestPg;

const TOKEN: &str = "soak-token-0123456789abcdefghij";
const UP: Duration = Duration::from_secs(120);

/// 20 leaves; 80 middles on two leaves each; 200 tops on two middles each.
fn dag() -> (String, Vec<String>) {
    let mut attrs = String::new();
    let mut names = Vec::new();
    let mut step = |name: String, deps: Vec<String>| {
        let env: String = deps.iter().map(|d| format!("d_{d} = {d}; ")).collect();
        let reads: String = deps
            .iter()
            .map(|d| format!("read x < $d_{d}; echo $x >> $out; "))
            .collect();
        attrs += &format!(
            "{name} = mkDrv {{ name = \"{name}\"; {env}args = [ \"-c\" \"echo {name} > $out; {reads}\" ]; }};\n"
        );
        names.push(name);
    };
    for l in 0..20 {
        step(format!("l{l}"), vec![]);
    }
    for m in 0..80 {
        step(
            format!("m{m}"),
            vec![format!("l{}", m % 20), format!("l{}", (m * 7 + 3) % 20)],
        );
    }
    for t in 0..200 {
        step(
            format!("t{t}"),
            vec![format!("m{}", t % 80), format!("m{}", (t * 3 + 11) % 80)],
        );
    }
    (format!("rec {{\n{attrs}}}"), names)
}

fn serve(pg: &TestPg, data_dir: &std::path::Path, tokens: &std::path::Path, port: u16) -> Proc {
    let proc = Proc::spawn(
        Command::new(QUEUE_RUNNER)
            .args(["serve", "--database-url", &pg.url()])
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--agent-token-file")
            .arg(tokens)
            .args(["--grpc-listen", &format!("127.0.0.1:{port}")])
            .args(["--http-listen", "127.0.0.1:0"])
            .args(["--retry-interval-s", "1", "--max-tries", "20"])
            .env("NIX_CONFIG", NIX_CONFIG)
            .env_remove("RUST_LOG"),
    );
    proc.expect_line("queue runner up", UP);
    proc
}

fn agent(name: &str, daemon: &NixDaemon, tokens: &std::path::Path, port: u16) -> Proc {
    let socket = daemon.socket_path();
    agent_proc(
        port,
        tokens,
        name,
        2,
        &["--store-socket".as_ref(), socket.as_os_str()],
    )
}

async fn count(pool: &sqlx::PgPool, sql: &str) -> i64 {
    // The pool reconnects by itself after PostgreSQL restarts; a query
    // that meets the outage is simply asked again.
    loop {
        match sqlx::query_scalar(sql).fetch_one(pool).await {
            Ok(n) => return n,
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_builds_survive_agent_kills_database_restarts_and_a_queue_runner_kill() {
    let mut pg = TestPg::start();
    let state = data_dir();
    let tokens = token_file(state.path(), TOKEN);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let stores = [IsolatedStore::new(), IsolatedStore::new()];
    let daemons = [stores[0].start_daemon(), stores[1].start_daemon()];

    let mut runner = serve(&pg, state.path(), &tokens, port);
    let mut agents = [
        agent("soak-a", &daemons[0], &tokens, port),
        agent("soak-b", &daemons[1], &tokens, port),
    ];

    let env = NixEnv::new();
    let (expr, names) = dag();
    let attrs: Vec<&str> = names.iter().map(String::as_str).collect();
    let drvs = env.instantiate(&expr, &attrs);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&pg.url())
        .await
        .unwrap();
    let jobs: Vec<sluice_queue_runner::submit::Job> = names
        .iter()
        .zip(&drvs)
        .map(|(name, drv)| sluice_queue_runner::submit::Job {
            name: name.clone(),
            drv_path: drv.clone(),
        })
        .collect();
    let ids = sluice_queue_runner::submit::queue(&pool, "soak", "dag", &jobs)
        .await
        .unwrap();
    assert_eq!(ids.len(), 300);

    // The disruptions, each once the run has got that far.
    let finished = "select count(*) from Builds where finished = 1";
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut next = 0;
    loop {
        let done = count(&pool, finished).await;
        if done == 300 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{done} of 300 builds finished; queue runner:\n{}",
            runner.output()
        );
        let due = [30, 60, 110, 160, 220];
        if next < due.len() && done >= due[next] {
            match next {
                0 => {
                    agents[0].signal(Signal::SIGKILL);
                    agents[0].wait_exit(Duration::from_secs(10));
                    agents[0] = agent("soak-a", &daemons[0], &tokens, port);
                }
                1 | 4 => {
                    pg.stop();
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    pg.start_again();
                }
                2 => {
                    runner.signal(Signal::SIGKILL);
                    runner.wait_exit(Duration::from_secs(10));
                    runner = serve(&pg, state.path(), &tokens, port);
                }
                _ => {
                    agents[1].signal(Signal::SIGKILL);
                    agents[1].wait_exit(Duration::from_secs(10));
                    agents[1] = agent("soak-b", &daemons[1], &tokens, port);
                }
            }
            next += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(next, 5, "every disruption happened before the end");

    assert_settled(&pool, &runner.output()).await;
    let outputs: Vec<String> = sqlx::query_scalar("select path from BuildOutputs")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(outputs.len(), 300);
    let check = Command::new("nix-store")
        .arg("--check-validity")
        .args(&outputs)
        .env("NIX_CONFIG", NIX_CONFIG)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "outputs missing from the queue runner's store: {}",
        String::from_utf8_lossy(&check.stderr)
    );

    pool.close().await;
    runner.signal(Signal::SIGTERM);
    assert_eq!(
        runner.wait_exit(Duration::from_secs(60)).unwrap().code(),
        Some(0)
    );
}
