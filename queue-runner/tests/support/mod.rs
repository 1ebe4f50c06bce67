//! A test-side queue runner for the gRPC tests: the real service on a real
//! socket, the host's Nix store as the queue runner's store, and a small
//! driver made of helper functions (the tests play the driver: they read
//! `FromAgent` events and send assignments).
//!
//! Shared with `builder-agent/tests` through `#[path]`.

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sluice_nix::daemon::PathInfo;
use sluice_nix::derivation::Derivation;
use sluice_nix::store_path::{StoreDir, StorePath};
use sluice_queue_runner::agents::{Assignment, AttemptId, FromAgent};
use sluice_queue_runner::grpc::{
    Attempts, LocalStore, QueueRunnerService, ServeError, ServiceConfig, StoreConnection, Tokens,
};
use sluice_queue_runner::store::Store;
use sluice_test_support::nix::NIX_CONFIG;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

pub const TOKEN: &str = "test-agent-token-0123456789";

/// The host's store through `nix-daemon --stdio`, configured for tests.
pub fn host_store() -> LocalStore {
    LocalStore::new(
        StoreConnection::Stdio {
            program: "nix-daemon".into(),
            args: vec!["--stdio".into()],
            env: vec![
                ("NIX_REMOTE".into(), "local".into()),
                ("NIX_CONFIG".into(), NIX_CONFIG.into()),
            ],
        },
        4,
    )
}

pub fn store_path(p: &str) -> StorePath {
    StoreDir::default().parse_path(p.trim()).unwrap()
}

/// A running service and what the test needs to play the driver.
pub struct Runner {
    pub addr: SocketAddr,
    pub events: mpsc::Receiver<FromAgent>,
    pub attempts: Attempts,
    pub store: LocalStore,
    pub data_dir: tempfile::TempDir,
    pub token_file: PathBuf,
    pub config: ServiceConfig,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServeError>>>,
}

impl Runner {
    pub async fn start() -> Runner {
        let data_dir = tempfile::tempdir().unwrap();
        let config = ServiceConfig::new(data_dir.path().join("data"));
        Runner::start_with(config, data_dir).await
    }

    pub async fn start_with(config: ServiceConfig, data_dir: tempfile::TempDir) -> Runner {
        let token_file = data_dir.path().join("agent-token");
        std::fs::write(&token_file, format!("test-agent:{TOKEN}\n")).unwrap();
        let (tx, events) = mpsc::channel(64);
        let mut runner = Runner {
            addr: "127.0.0.1:0".parse().unwrap(),
            events,
            attempts: Attempts::new(),
            store: host_store(),
            data_dir,
            token_file,
            config,
            shutdown: None,
            task: None,
        };
        runner.serve(tx).await;
        runner
    }

    async fn serve(&mut self, events: mpsc::Sender<FromAgent>) {
        let tokens = Tokens::from_file(&self.token_file).unwrap();
        let service = QueueRunnerService::new(
            self.config.clone(),
            tokens,
            self.store.clone(),
            self.attempts.clone(),
            events,
        );
        self.serve_on_addr(service).await;
    }

    /// Serves on `self.addr`; after a restart the same port may linger
    /// briefly, so binding is retried.
    async fn serve_on_addr(&mut self, service: QueueRunnerService) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (stop, stopped) = oneshot::channel::<()>();
            let shutdown = async {
                let _ = stopped.await;
            };
            match service.clone().spawn(self.addr, shutdown).await {
                Ok((addr, task)) => {
                    self.addr = addr;
                    self.shutdown = Some(stop);
                    self.task = Some(task);
                    return;
                }
                Err(e) if tokio::time::Instant::now() < deadline => {
                    eprintln!("retrying bind: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("cannot serve: {e}"),
            }
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the service (the driver then gets `Disconnected` for every
    /// connected agent) and waits for it to finish.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.shutdown.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("the service stops within 20 s")
                .expect("the service task")
                .expect("the service ends cleanly");
        }
    }

    /// Starts a fresh service on the same address, with a new event
    /// channel (the old one keeps what was sent before).
    pub async fn restart(&mut self) {
        self.stop().await;
        let (tx, events) = mpsc::channel(64);
        self.events = events;
        self.serve(tx).await;
    }

    /// The next event, or a panic after `secs` seconds.
    pub async fn next_event(&mut self, secs: u64) -> FromAgent {
        tokio::time::timeout(Duration::from_secs(secs), self.events.recv())
            .await
            .unwrap_or_else(|_| panic!("no event from the service within {secs} s"))
            .expect("the service's event channel is open")
    }

    /// Waits for an agent to connect; returns its machine and command channel.
    pub async fn connected(
        &mut self,
    ) -> (
        sluice_core::MachineId,
        sluice_queue_runner::agents::AgentInfo,
        mpsc::Sender<sluice_queue_runner::agents::ToAgent>,
    ) {
        loop {
            match self.next_event(60).await {
                FromAgent::Connected {
                    machine,
                    info,
                    commands,
                    ..
                } => return (machine, info, commands),
                FromAgent::Heartbeat { .. } => {}
                other => panic!("expected Connected, got {other:?}"),
            }
        }
    }

    /// Registers `assignment` for `machine` and sends it.
    pub async fn assign(
        &self,
        machine: sluice_core::MachineId,
        commands: &mpsc::Sender<sluice_queue_runner::agents::ToAgent>,
        assignment: Assignment,
    ) {
        let entry =
            sluice_queue_runner::grpc::AttemptEntry::from_assignment(machine, &assignment).unwrap();
        self.attempts.register(assignment.attempt, entry).unwrap();
        commands
            .send(sluice_queue_runner::agents::ToAgent::Assign(assignment))
            .await
            .unwrap();
    }

    /// Collects phases until `attempt` finishes; returns them and the report.
    pub async fn finished(
        &mut self,
        attempt: AttemptId,
        secs: u64,
    ) -> (Vec<i32>, sluice_queue_runner::agents::StepReport) {
        let mut phases = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let event = tokio::time::timeout(left, self.events.recv())
                .await
                .unwrap_or_else(|_| panic!("{attempt} did not finish within {secs} s"))
                .expect("event channel open");
            match event {
                FromAgent::Phase {
                    attempt: a, busy, ..
                } if a == attempt => phases.push(busy),
                FromAgent::Finished {
                    attempt: a,
                    report,
                    committed,
                    ..
                } if a == attempt => {
                    // As the driver does once the result is committed: the
                    // agent hears it and forgets the result. (The entry
                    // stays, for the test to look at; the driver removes it.)
                    let _ = committed.send(true);
                    return (phases, report);
                }
                FromAgent::Disconnected { machine } => {
                    panic!("machine {machine} disconnected while {attempt} ran")
                }
                _ => {}
            }
        }
    }

    pub fn log_of(&self, drv: &str) -> String {
        let path = sluice_queue_runner::logs::log_path(&self.config.data_dir, drv).unwrap();
        std::fs::read_to_string(&path).unwrap_or_default()
    }
}

/// Path infos of the closure of `roots` in the queue runner's store,
/// references before referrers (the queue runner's own query).
pub async fn closure(store: &LocalStore, roots: &BTreeSet<StorePath>) -> Vec<PathInfo> {
    sluice_queue_runner::store::closure(store, roots.iter().cloned())
        .await
        .unwrap()
        .iter()
        .map(|i| PathInfo::clone(i))
        .collect()
}

/// The assignment for `drv_path` (a `.drv` in the host store whose input
/// derivations are built there), made the way the queue runner's driver
/// makes it: the basic derivation and its input closure.
pub async fn assignment(store: &LocalStore, drv_path: &str, attempt: AttemptId) -> Assignment {
    let runner_store = Store::new(store.clone());
    let dir = runner_store.store_dir().clone();
    let drv = runner_store.read_derivation(drv_path.trim()).await.unwrap();
    let basic = sluice_queue_runner::store::basic_derivation(&runner_store, &drv)
        .await
        .unwrap();
    let inputs = closure(store, &basic.input_srcs).await;
    Assignment {
        attempt,
        drv_path: drv_path.trim().to_owned(),
        basic_drv: basic.to_aterm(&dir).unwrap(),
        inputs: inputs
            .iter()
            .map(|i| sluice_queue_runner::store::summary(&dir, i))
            .collect(),
        max_silent_time_s: 60,
        build_timeout_s: 300,
        max_log_bytes: 1 << 20,
        max_output_bytes: 1 << 30,
        streamed_inputs: None,
    }
}

/// The system of the derivation at `drv_path`.
pub fn system_of(drv_path: &str) -> String {
    let path = store_path(drv_path);
    let text = std::fs::read(Path::new(drv_path.trim())).unwrap();
    Derivation::parse_drv_file(&StoreDir::default(), &path, &text)
        .unwrap()
        .platform
}

/// The static path of output `out` of `drv_path`.
pub fn output_of(drv_path: &str) -> String {
    let dir = StoreDir::default();
    let path = store_path(drv_path);
    let text = std::fs::read(Path::new(drv_path.trim())).unwrap();
    let drv = Derivation::parse_drv_file(&dir, &path, &text).unwrap();
    let out = drv.outputs["out"]
        .path(&dir, &drv.name, "out")
        .unwrap()
        .unwrap();
    dir.print(&out)
}

/// An in-process agent's settings: `store` is its own Nix daemon.
pub fn agent_config(
    runner: &Runner,
    daemon: &sluice_test_support::nix::NixDaemon,
    system: &str,
) -> sluice_builder_agent::AgentConfig {
    sluice_builder_agent::AgentConfig {
        queue_runner: runner.url(),
        token: TOKEN.to_owned(),
        name: "test-agent".to_owned(),
        systems: vec![system.to_owned(), "builtin".to_owned()],
        features: vec![],
        mandatory_features: vec![],
        max_jobs: 2,
        prefetch: 2,
        speed_factor: 1.0,
        store: sluice_builder_agent::LocalNix::Socket(daemon.socket_path()),
        reconnect_min: Duration::from_millis(100),
        reconnect_max: Duration::from_millis(1000),
        proc_root: PathBuf::from("/proc"),
        cgroup_root: Some(PathBuf::from("/sys/fs/cgroup")),
        drain_timeout: Duration::from_secs(60),
        store_dir: PathBuf::from("/nix/store"),
        build_dir: std::env::temp_dir(),
        slots: None,
        topology: None,
    }
}

/// Runs an agent in-process until the returned sender is dropped or used.
pub fn start_agent(
    config: sluice_builder_agent::AgentConfig,
) -> (
    oneshot::Sender<()>,
    JoinHandle<Result<(), sluice_builder_agent::AgentError>>,
) {
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(sluice_builder_agent::run(config, async {
        let _ = stopped.await;
    }));
    (stop, task)
}

/// A valid path in the agent's isolated store?
pub fn in_store(store: &sluice_test_support::nix::IsolatedStore, path: &str) -> bool {
    store.host_path(path).exists()
}
