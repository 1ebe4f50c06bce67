//! The `builder-agent` binary: its command line, and a real run against
//! the queue runner's gRPC service (the test plays the driver; the agent
//! builds in a store of its own).

#[path = "../../queue-runner/tests/support/mod.rs"]
mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use sluice_queue_runner::agents::AttemptId;
use sluice_test_support::nix::{IsolatedStore, NixEnv};
use support::*;

const AGENT: &str = env!("CARGO_BIN_EXE_builder-agent");

#[test]
fn help_lists_every_option() {
    let out = Command::new(AGENT).arg("--help").output().expect("runs");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for option in [
        "--queue-runner",
        "--token-file",
        "--name",
        "--systems",
        "--features",
        "--mandatory-features",
        "--max-jobs",
        "--store-socket",
        "--reconnect-min-ms",
        "--reconnect-max-ms",
        "--pinning",
        "--slots",
        "--cpus-per-slot",
        "--sysfs-root",
        "--cgroup-root",
        "--drain-timeout-s",
        "--store-dir",
        "--build-dir",
    ] {
        assert!(help.contains(option), "{option} missing from:\n{help}");
    }
}

#[test]
fn a_missing_token_file_is_a_one_line_error() {
    let out = Command::new(AGENT)
        .args([
            "--queue-runner",
            "http://127.0.0.1:9",
            "--token-file",
            "/nonexistent/token",
            "--systems",
            "x86_64-linux",
        ])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("error: reading the token file '/nonexistent/token'"),
        "{stderr}"
    );
}

/// The agent process, killed when the test ends however it ends. Its
/// stderr goes to a file, shown if the test fails.
struct Child {
    process: std::process::Child,
    stderr: std::path::PathBuf,
}

impl Child {
    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Child {
    /// The agent binary dialling `runner`, with `args` after the address
    /// and token, its stderr in `dir`.
    fn agent(runner: &Runner, dir: &std::path::Path, args: &[&std::ffi::OsStr]) -> Child {
        let stderr = dir.join("agent.stderr");
        Child {
            process: Command::new(AGENT)
                .arg("--queue-runner")
                .arg(runner.url())
                .arg("--token-file")
                .arg(&runner.token_file)
                .args(args)
                .stdin(Stdio::null())
                .stderr(std::fs::File::create(&stderr).expect("creates the agent's log"))
                .spawn()
                .expect("starts the agent"),
            stderr,
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
        if std::thread::panicking() {
            eprintln!("the agent's stderr:\n{}", self.stderr());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_binary_builds_an_assignment_and_survives_a_restart() {
    let env = NixEnv::new();
    let drvs = env.instantiate(
        r#"{ quick = mkDrv { name = "quick"; args = [ "-c" "echo from the binary; echo quick > $out" ]; }; }"#,
        &["quick"],
    );
    let out = output_of(&drvs[0]);
    let mut runner = Runner::start().await;
    let store = IsolatedStore::new();
    let daemon = store.start_daemon();
    let logs = tempfile::tempdir().expect("tempdir");
    let socket = daemon.socket_path();
    let agent = Child::agent(
        &runner,
        logs.path(),
        &[
            "--store-socket".as_ref(),
            socket.as_os_str(),
            "--name".as_ref(),
            "binary-agent".as_ref(),
            "--max-jobs".as_ref(),
            "2".as_ref(),
            "--reconnect-min-ms".as_ref(),
            "100".as_ref(),
            "--reconnect-max-ms".as_ref(),
            "500".as_ref(),
        ],
    );
    let (_, info, _) = runner.connected().await;
    assert_eq!(info.name, "binary-agent");
    // The default systems: the local Nix's and `builtin`.
    assert_eq!(info.systems, [system_of(&drvs[0]), "builtin".to_owned()]);

    runner.restart().await;
    let (machine, _, commands) = runner.connected().await;
    // It said why it reconnected before doing so.
    assert!(
        agent
            .stderr()
            .contains("connection to the queue runner lost"),
        "{}",
        agent.stderr()
    );
    let attempt = AttemptId(uuid::Uuid::from_u128(1));
    let a = assignment(&runner.store, &drvs[0], attempt).await;
    runner.assign(machine, &commands, a).await;
    let (phases, report) = runner.finished(attempt, 120).await;
    assert_eq!(report.status, 0, "{report:?}");
    assert_eq!(report.outputs, [("out".to_owned(), out.clone())]);
    assert_eq!(phases, [20, 30, 40]);
    assert!(in_store(&store, &out));
    assert_eq!(
        std::fs::read_to_string(&out).expect("uploaded into the host store"),
        "quick\n"
    );
    assert!(runner.log_of(&drvs[0]).contains("from the binary\n"));
    tokio::time::timeout(Duration::from_secs(20), runner.stop())
        .await
        .expect("stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_cgroups_the_agent_says_so_once_and_pins_by_affinity() {
    let mut runner = Runner::start().await;
    let empty = tempfile::tempdir().expect("tempdir");
    let logs = tempfile::tempdir().expect("tempdir");
    let agent = Child::agent(
        &runner,
        logs.path(),
        &[
            "--cgroup-root".as_ref(),
            empty.path().as_os_str(),
            "--name".as_ref(),
            "no-cgroups".as_ref(),
            "--reconnect-min-ms".as_ref(),
            "100".as_ref(),
        ],
    );
    runner.connected().await;
    // Reconnecting does not say it again.
    runner.restart().await;
    runner.connected().await;
    let log = agent.stderr();
    let said: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("no cgroups for steps"))
        .collect();
    assert_eq!(said.len(), 1, "{log}");
    assert!(
        said[0].contains(&empty.path().display().to_string())
            && said[0].contains("pinned by CPU affinity alone"),
        "{log}"
    );
    tokio::time::timeout(Duration::from_secs(20), runner.stop())
        .await
        .expect("stops");
}
