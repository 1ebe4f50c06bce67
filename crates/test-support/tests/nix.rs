//! The Nix helpers: unique derivations, private daemons of Nix 2.8 and
//! 2.26, isolated stores.

use std::path::Path;
use std::time::Duration;

use sluice_test_support::nix::{
    realise_in, run, IsolatedStore, Nix226Store, NixCommands, NixDaemon, NixEnv, NixVersion,
};

const HELLO: &str =
    r#"{ hello = mkDrv { name = "hello"; args = [ "-c" "echo hello > $out" ]; }; }"#;

#[test]
fn derivations_are_unique_per_environment() {
    let (a, b) = (NixEnv::new(), NixEnv::new());
    let da = a.instantiate(HELLO, &["hello"]);
    let db = b.instantiate(HELLO, &["hello"]);
    assert_ne!(da, db, "two environments must never share a .drv");
    assert!(da[0].contains(a.nonce()), "{da:?}");
    assert!(Path::new(&da[0]).is_file());
}

#[test]
fn isolated_store_starts_empty_and_keeps_its_builds() {
    let env = NixEnv::new();
    let store = IsolatedStore::new();
    let drv = env.instantiate_in(&store, HELLO, &["hello"]).remove(0);
    assert!(
        !Path::new(&drv).exists(),
        "the .drv was written to the isolated store, not the host's"
    );
    assert!(store.host_path(&drv).is_file());
    let out = realise_in(&store, &drv).remove(0);
    let content = std::fs::read_to_string(store.host_path(&out)).expect("output in isolated store");
    assert_eq!(content, "hello\n");
    assert!(
        !Path::new(&out).exists(),
        "the output must not appear in the host's store"
    );
    let check = env
        .command("nix-store")
        .args(["--check-validity", &out])
        .output()
        .expect("nix-store");
    assert!(
        !check.status.success(),
        "the host's store must not know {out}"
    );
}

/// A daemon of `version` on the host's store builds, and reports itself.
fn private_daemon_serves_the_host_store(version: NixVersion) {
    let env = NixEnv::new();
    let drv = env.instantiate(HELLO, &["hello"]).remove(0);
    let daemon = NixDaemon::start_version(version);
    let out =
        run(env
            .command("nix-store")
            .args(["--store", &daemon.store_uri(), "--realise", &drv]));
    let out = out.trim();
    assert_eq!(std::fs::read_to_string(out).expect("output"), "hello\n");
    // The readiness check connects and hangs up; the worker that served it
    // says so in the daemon's log, not in the test's output.
    let logged = sluice_test_support::wait_until(Duration::from_secs(10), || {
        daemon.log().contains("unexpected end-of-file")
    });
    assert!(
        logged,
        "{}: {:?}",
        daemon.log_path().display(),
        daemon.log()
    );
}

#[test]
fn private_daemon_serves_the_host_store_on_nix_2_8() {
    private_daemon_serves_the_host_store(NixVersion::Nix2_8);
}

#[test]
fn private_daemon_serves_the_host_store_on_nix_2_26() {
    private_daemon_serves_the_host_store(NixVersion::Nix2_26);
}

fn daemon_in_isolated_store_serves_only_that_store(version: NixVersion) {
    let env = NixEnv::new();
    let store = IsolatedStore::new();
    let daemon = store.start_daemon_version(version);
    // A path of the host's store is unknown to the isolated daemon.
    let host_drv = env.instantiate(HELLO, &["hello"]).remove(0);
    let status = env
        .command("nix-store")
        .args([
            "--store",
            &daemon.store_uri(),
            "--check-validity",
            &host_drv,
        ])
        .output()
        .expect("nix-store");
    assert!(
        !status.status.success(),
        "isolated daemon must not know {host_drv}"
    );
    // ...while one instantiated inside it is valid through the daemon.
    let drv = env.instantiate_in(&store, HELLO, &["hello"]).remove(0);
    run(env
        .command("nix-store")
        .args(["--store", &daemon.store_uri(), "--check-validity", &drv]));
}

#[test]
fn daemon_in_isolated_store_serves_only_that_store_on_nix_2_8() {
    daemon_in_isolated_store_serves_only_that_store(NixVersion::Nix2_8);
}

#[test]
fn daemon_in_isolated_store_serves_only_that_store_on_nix_2_26() {
    daemon_in_isolated_store_serves_only_that_store(NixVersion::Nix2_26);
}

/// The processes in the mount namespace `ns`.
fn processes_in(ns: &Path) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
                .ok()
                .as_deref()
                == Some(ns)
        })
        .collect()
}

/// A daemon's workers start sessions of their own, outside its process
/// group: dropping the daemon still ends them, even one whose client is
/// still connected.
fn daemon_workers_end_with_the_daemon(version: NixVersion) {
    let store = IsolatedStore::new();
    let daemon = store.start_daemon_version(version);
    let ns = std::fs::read_link(format!("/proc/{}/ns/mnt", daemon.pid()))
        .expect("the daemon's namespace");
    let _client = std::os::unix::net::UnixStream::connect(daemon.socket_path()).expect("connect");
    assert!(
        sluice_test_support::wait_until(Duration::from_secs(10), || processes_in(&ns).len() >= 2),
        "a worker serves the connection: {:?}",
        processes_in(&ns)
    );
    // Once they are gone the namespace's number may name another test's
    // new namespace: what is checked is that these very processes ended.
    let ours: Vec<(i32, Option<String>)> = processes_in(&ns)
        .into_iter()
        .map(|pid| (pid, start_time(pid)))
        .collect();
    drop(daemon);
    let left: Vec<i32> = ours
        .iter()
        .filter(|(pid, started)| started.is_some() && start_time(*pid) == *started)
        .map(|(pid, _)| *pid)
        .collect();
    assert_eq!(left, Vec::<i32>::new(), "left behind, of {ours:?}");
}

/// When process `pid` started (field 22 of its stat), if it exists and
/// has not exited (a zombie waits only to be reaped).
fn start_time(pid: i32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if matches!(fields.first(), Some(&"Z" | &"X")) {
        return None;
    }
    fields.get(19).map(|s| (*s).to_owned())
}

#[test]
fn daemon_workers_end_with_the_daemon_on_nix_2_8() {
    daemon_workers_end_with_the_daemon(NixVersion::Nix2_8);
}

#[test]
fn daemon_workers_end_with_the_daemon_on_nix_2_26() {
    daemon_workers_end_with_the_daemon(NixVersion::Nix2_26);
}

#[test]
fn nix_2_26_commands_build_in_an_isolated_store() {
    let env = NixEnv::new();
    let store = IsolatedStore::new();
    let nix = store.nix_226();
    let version = run(nix.command("nix-store").arg("--version"));
    assert!(version.contains("2.26."), "{version}");
    let drv = env.instantiate_in(&nix, HELLO, &["hello"]).remove(0);
    assert!(store.host_path(&drv).is_file(), "the .drv is in the store");
    let out = realise_in(&nix, &drv).remove(0);
    assert_eq!(
        std::fs::read_to_string(store.host_path(&out)).expect("output in the isolated store"),
        "hello\n"
    );
    // Nix 2.8 reads what Nix 2.26 wrote.
    run(store.command("nix-store").args(["--check-validity", &out]));
    let on_host = Nix226Store::host();
    let host_version = run(on_host.command("nix-store").arg("--version"));
    assert_eq!(host_version, version);
}

#[test]
fn missing_nix_says_what_is_missing_and_how_to_get_it() {
    let empty = tempfile::tempdir().expect("tempdir");
    let err = sluice_test_support::nix::require_nix_on(Some(empty.path().as_os_str()))
        .expect_err("no Nix on an empty PATH");
    assert!(err.contains("nix-instantiate"), "{err}");
    assert!(err.contains("apt-get install -y nix-bin"), "{err}");
    assert!(
        sluice_test_support::nix::require_nix().is_ok(),
        "Nix is installed here"
    );
}

#[test]
fn missing_nix_2_26_says_how_to_set_it_up() {
    let empty = tempfile::tempdir().expect("tempdir");
    let err = sluice_test_support::nix::require_nix_2_26_in(empty.path())
        .expect_err("no Nix 2.26 in an empty directory");
    assert!(err.contains("Nix 2.26 is not set up"), "{err}");
    assert!(err.contains("scripts/install-nix-2.26.sh"), "{err}");
    assert!(err.contains("SLUICE_TRIXIE_ROOT"), "{err}");
    assert!(
        sluice_test_support::nix::require_nix_2_26().is_ok(),
        "the test command sets Nix 2.26 up"
    );
}
