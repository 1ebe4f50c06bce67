//! `queue-runner serve` as an operator meets it: the real executable on
//! its embedded PostgreSQL, stopped with SIGTERM, killed with SIGKILL,
//! started twice, and given bad input.

#![allow(clippy::unwrap_used)]

mod cli;

use std::process::Command;
use std::time::{Duration, Instant};

use cli::*;
use nix::sys::signal::Signal;

const UP: Duration = Duration::from_secs(120);
const TOKEN: &str = "cli-test-token-0123456789abcdef";

#[test]
fn sigterm_stops_serve_and_its_embedded_postgres_and_a_second_start_works() {
    let dir = data_dir();
    let _leftovers = StopLeftovers(dir.path().to_path_buf());
    let tokens = token_file(dir.path(), TOKEN);

    let mut first = serve(dir.path(), &tokens);
    first.expect_line("queue runner up", UP);
    assert_eq!(postmasters_of(dir.path()).len(), 1, "one server runs");
    // The log says where everything is, at the default level.
    let log = first.output();
    for expected in [
        "listening for builder agents",
        "listening for HTTP",
        "database: the embedded PostgreSQL",
        "store:",
    ] {
        assert!(log.contains(expected), "{expected:?} missing from:\n{log}");
    }
    assert!(
        !log.contains('\u{1b}'),
        "no colour codes into a pipe:\n{log}"
    );

    // A second queue runner on the same data directory is refused, and
    // does not start a server beside the first.
    let mut second = serve(dir.path(), &tokens);
    let status = second.wait_exit(UP).expect("refused at once");
    assert!(!status.success());
    assert!(
        second.output().contains("another queue runner"),
        "{}",
        second.output()
    );
    assert_eq!(postmasters_of(dir.path()).len(), 1);

    first.signal(Signal::SIGTERM);
    let status = first.wait_exit(Duration::from_secs(60)).expect("exits");
    assert_eq!(status.code(), Some(0), "{}", first.output());
    assert!(
        postmasters_of(dir.path()).is_empty(),
        "PostgreSQL left running after SIGTERM:\n{}",
        first.output()
    );
    assert!(first.output().contains("the embedded PostgreSQL stopped"));

    let server_log = dir.path().join("postgres/server.log");
    let after_first = std::fs::read_to_string(&server_log).unwrap();
    assert!(after_first.contains("database system is shut down"));

    let mut again = serve(dir.path(), &tokens);
    again.expect_line("queue runner up", UP);
    again.signal(Signal::SIGINT);
    let status = again.wait_exit(Duration::from_secs(60)).expect("exits");
    assert_eq!(status.code(), Some(0), "{}", again.output());
    assert!(postmasters_of(dir.path()).is_empty());

    // The log was appended to: the first run's lines are still there.
    let after_second = std::fs::read_to_string(&server_log).unwrap();
    assert!(
        after_second.starts_with(&after_first),
        "the server log was truncated"
    );
    assert_eq!(after_second.matches("sluice: starting postgres").count(), 2);
}

#[test]
fn a_server_left_by_a_killed_run_is_adopted_never_run_beside() {
    let dir = data_dir();
    let _leftovers = StopLeftovers(dir.path().to_path_buf());
    let tokens = token_file(dir.path(), TOKEN);

    let mut killed = serve(dir.path(), &tokens);
    killed.expect_line("queue runner up", UP);
    let left = postmasters_of(dir.path());
    assert_eq!(left.len(), 1);
    killed.signal(Signal::SIGKILL);
    killed.wait_exit(Duration::from_secs(30)).expect("dies");
    // SIGKILL gives no chance to stop it: the server is still there.
    assert_eq!(
        postmasters_of(dir.path()),
        left,
        "the server outlives SIGKILL"
    );

    let mut next = serve(dir.path(), &tokens);
    next.expect_line("queue runner up", UP);
    assert!(next.output().contains("adopting the PostgreSQL server"));
    assert_eq!(
        postmasters_of(dir.path()),
        left,
        "the same server, and no second one"
    );
    next.signal(Signal::SIGTERM);
    let status = next.wait_exit(Duration::from_secs(60)).expect("exits");
    assert_eq!(status.code(), Some(0), "{}", next.output());
    assert!(postmasters_of(dir.path()).is_empty());
}

#[test]
fn a_stale_lock_file_of_a_dead_server_is_removed() {
    let dir = data_dir();
    let _leftovers = StopLeftovers(dir.path().to_path_buf());
    let tokens = token_file(dir.path(), TOKEN);

    let mut first = serve(dir.path(), &tokens);
    first.expect_line("queue runner up", UP);
    // Kill the queue runner and its server, as a power cut would.
    let pids = postmasters_of(dir.path());
    first.signal(Signal::SIGKILL);
    first.wait_exit(Duration::from_secs(30)).expect("dies");
    for pid in &pids {
        // A server already on its way out (ESRCH) is what we want anyway.
        match nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), Signal::SIGKILL) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => panic!("killing postmaster {pid}: {e}"),
        }
    }
    // Gone for good: its command line empties while it is still exiting.
    assert!(sluice_test_support::wait_until(
        Duration::from_secs(30),
        || pids
            .iter()
            .all(|pid| !sluice_pg_embed::postmaster::is_alive(*pid))
    ));
    assert!(postmasters_of(dir.path()).is_empty());
    assert!(dir.path().join("postgres/postmaster.pid").exists());

    let mut next = serve(dir.path(), &tokens);
    next.expect_line("queue runner up", UP);
    next.signal(Signal::SIGTERM);
    assert_eq!(
        next.wait_exit(Duration::from_secs(60)).unwrap().code(),
        Some(0)
    );
}

#[test]
fn a_refused_database_connection_fails_at_once_naming_host_and_cause() {
    let dir = data_dir();
    let tokens = token_file(dir.path(), TOKEN);
    let started = Instant::now();
    let out = Command::new(QUEUE_RUNNER)
        .args(["serve", "--database-url", "postgres://x@127.0.0.1:1/x"])
        .arg("--agent-token-file")
        .arg(&tokens)
        .arg("--data-dir")
        .arg(dir.path().join("state"))
        .output()
        .unwrap();
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(took < Duration::from_secs(2), "took {took:?}: {stderr}");
    assert!(stderr.contains("127.0.0.1:1"), "{stderr}");
    assert!(stderr.contains("refused"), "{stderr}");
}

#[test]
fn bad_input_is_reported_once_before_anything_is_created() {
    let dir = data_dir();
    let state = dir.path().join("state");
    let out = Command::new(QUEUE_RUNNER)
        .args(["serve", "--agent-token-file"])
        .arg(dir.path().join("no-such-file"))
        .arg("--data-dir")
        .arg(&state)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "{stderr}"
    );
    assert!(stderr.contains("no-such-file"), "{stderr}");
    assert!(
        !state.exists(),
        "created {} for a bad input",
        state.display()
    );

    // A token file that is there but not valid.
    std::fs::write(dir.path().join("short"), "short\n").unwrap();
    let out = Command::new(QUEUE_RUNNER)
        .args(["serve", "--agent-token-file"])
        .arg(dir.path().join("short"))
        .arg("--data-dir")
        .arg(&state)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 1"), "{stderr}");
    assert!(!state.exists());

    // No token file at all: the message says how to give one.
    let out = Command::new(QUEUE_RUNNER)
        .args(["serve", "--data-dir"])
        .arg(&state)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--agent-token-file"), "{stderr}");
    assert!(!state.exists());
}

#[test]
fn a_wrong_agent_token_is_logged_with_peer_and_reason_never_the_token() {
    let dir = data_dir();
    let _leftovers = StopLeftovers(dir.path().to_path_buf());
    let tokens = token_file(dir.path(), TOKEN);
    let mut serve = serve(dir.path(), &tokens);
    serve.expect_line("queue runner up", UP);
    let grpc = bound_address(&serve, "grpc_addr");

    let wrong = "wrong-token-abcdefghijklmnopqrstuvwxyz";
    let wrong_file = dir.path().join("wrong-token");
    std::fs::write(&wrong_file, format!("{wrong}\n")).unwrap();
    let agent = Command::new(builder_agent())
        .arg("--queue-runner")
        .arg(format!("http://{grpc}"))
        .arg("--token-file")
        .arg(&wrong_file)
        .args(["--systems", "x86_64-linux"])
        .output()
        .unwrap();
    let agent_err = String::from_utf8_lossy(&agent.stderr);
    assert!(!agent.status.success());
    assert!(
        agent_err.contains("refused this agent's token") && !agent_err.contains("version check"),
        "the agent names the real reason: {agent_err}"
    );

    serve.expect_line("agent refused", Duration::from_secs(10));
    let log = serve.output();
    let line = log.lines().find(|l| l.contains("agent refused")).unwrap();
    assert!(line.contains("unknown agent token"), "{line}");
    assert!(line.contains("peer=127.0.0.1:"), "{line}");
    assert!(!log.contains(wrong), "the presented token was logged");
    assert!(!log.contains(TOKEN), "a real token was logged");

    serve.signal(Signal::SIGTERM);
    assert_eq!(
        serve.wait_exit(Duration::from_secs(60)).unwrap().code(),
        Some(0)
    );
}

#[test]
fn json_logs_are_one_object_per_line_and_a_second_signal_exits_at_once() {
    let dir = data_dir();
    let _leftovers = StopLeftovers(dir.path().to_path_buf());
    let tokens = token_file(dir.path(), TOKEN);
    // The global flag after the subcommand, as users write it.
    let mut serve = serve_with(
        dir.path(),
        &tokens,
        &["--grpc-listen", "127.0.0.1:0", "--log-format", "json"],
    );
    serve.expect_line("queue runner up", UP);
    for line in serve.output().lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }

    // Two signals at once: the second does not wait for the first's
    // orderly shutdown, and still asks the embedded PostgreSQL to stop.
    serve.signal(Signal::SIGTERM);
    serve.signal(Signal::SIGTERM);
    let status = serve.wait_exit(Duration::from_secs(30)).expect("exits");
    assert!(
        status.code() == Some(0) || status.code() == Some(128 + 15),
        "{status:?}: {}",
        serve.output()
    );
    assert!(
        sluice_test_support::wait_until(Duration::from_secs(30), || postmasters_of(dir.path())
            .is_empty()),
        "PostgreSQL left running"
    );
}
