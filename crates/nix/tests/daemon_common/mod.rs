//! Helpers shared by the daemon tests.

#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use sluice_nix::daemon::ProtocolVersion;
use sluice_nix::daemon::{ClientError, DaemonClient};
use sluice_nix::derivation::Derivation;
use sluice_nix::store_path::{StoreDir, StorePath};
use sluice_test_support::nix::{IsolatedStore, NixCommands, NixDaemon, NixVersion};

pub fn store_path(full: &str) -> StorePath {
    StoreDir::default()
        .parse_path(full.trim())
        .unwrap_or_else(|e| panic!("'{full}' is not a store path: {e}"))
}

/// Connects to `daemon`, retrying briefly when its listen queue is full
/// (Nix 2.8 listens with a backlog of 5: a burst of connections gets
/// `EAGAIN`) or it refuses.
pub async fn connect(daemon: &NixDaemon) -> DaemonClient {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match DaemonClient::connect(&daemon.socket_path()).await {
            Ok(client) => return client,
            Err(ClientError::Connect { source, .. })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::WouldBlock
                ) && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("connecting to the test daemon: {e}"),
        }
    }
}

/// A client on `nix-daemon --stdio` for the store `store` commands see.
pub async fn spawn_stdio(store: &dyn NixCommands) -> DaemonClient {
    let mut cmd = store.command("nix-daemon");
    cmd.arg("--stdio");
    DaemonClient::spawn(tokio::process::Command::from(cmd))
        .await
        .expect("starting nix-daemon --stdio")
}

/// A client on `nix-daemon --stdio` of `version` for the isolated `store`.
pub async fn spawn_stdio_on(store: &IsolatedStore, version: NixVersion) -> DaemonClient {
    match version {
        NixVersion::Nix2_8 => spawn_stdio(store).await,
        NixVersion::Nix2_26 => spawn_stdio(&store.nix_226()).await,
    }
}

/// The protocol version a client negotiates with `version`'s daemon.
pub fn protocol(version: NixVersion) -> ProtocolVersion {
    let (major, minor) = version.protocol();
    ProtocolVersion::new(major, minor)
}

/// Reads and parses a `.drv` file of the host store.
pub fn read_drv(drv_path: &str) -> (StorePath, Derivation) {
    let path = store_path(drv_path);
    let text = std::fs::read(Path::new(drv_path.trim())).expect("reading a .drv file");
    let drv = Derivation::parse_drv_file(&StoreDir::default(), &path, &text)
        .expect("parsing a .drv file");
    (path, drv)
}

/// The NAR of `path` as the daemon behind `client` exports it.
pub async fn export_nar(client: &mut DaemonClient, path: &StorePath) -> Vec<u8> {
    let mut nar = Vec::new();
    let summary = client
        .nar_from_path(path, &mut nar)
        .await
        .expect("exporting a NAR");
    assert_eq!(summary.nar_size, nar.len() as u64);
    nar
}

/// Waits, without blocking the runtime, until `cond` holds.
pub async fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether process `pid` is gone (or a zombie).
pub fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
    }
}
