//! A whole deployment in one test: a throwaway PostgreSQL, the queue
//! runner (`service::run_with`, real gRPC and HTTP on loopback) on the
//! host's Nix store through a private daemon, and builder agents, each with
//! an isolated store of its own and its own daemon. Each daemon is Nix 2.8
//! unless the test asks for Nix 2.26 ([`Deployment::start_on`],
//! [`Deployment::add_agent_on`]).

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use sluice_queue_runner::config::ServeConfig;
use sluice_queue_runner::service::{self, Bound};
use sluice_test_support::nix::{IsolatedStore, NixDaemon, NixEnv, NixVersion};
use sluice_test_support::pg::TestPg;
use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const TOKEN: &str = "e2e-agent-token-0123456789abcdef";

pub struct Deployment {
    pub pg: TestPg,
    pub pool: PgPool,
    pub env: NixEnv,
    pub host_daemon: NixDaemon,
    pub data_dir: tempfile::TempDir,
    pub bound: Bound,
    /// What the queue runner runs with (for [`Deployment::restart_queue_runner`]).
    config: ServeConfig,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    agents: Vec<Agent>,
}

pub struct Agent {
    pub name: String,
    /// Before `store`: fields drop in order, and the daemon must be gone
    /// before its store's directory is deleted.
    pub daemon: NixDaemon,
    pub store: IsolatedStore,
    /// Starts a drain (as SIGTERM does).
    stop: Option<oneshot::Sender<()>>,
    /// Stops the running steps (as a second SIGTERM does).
    abort: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), sluice_builder_agent::AgentError>>,
}

impl Deployment {
    pub async fn start() -> Deployment {
        Self::start_with(|_| {}).await
    }

    /// [`Deployment::start`] with the queue runner's settings changed by
    /// `adjust` first.
    pub async fn start_with(adjust: impl FnOnce(&mut ServeConfig)) -> Deployment {
        Self::start_on(NixVersion::Nix2_8, adjust).await
    }

    /// [`Deployment::start_with`], with the queue runner's store served by
    /// a daemon of `nix`.
    pub async fn start_on(nix: NixVersion, adjust: impl FnOnce(&mut ServeConfig)) -> Deployment {
        let pg = TestPg::start();
        let env = NixEnv::new();
        let host_daemon = NixDaemon::start_version(nix);
        let data_dir = tempfile::tempdir().unwrap();
        let token_file = data_dir.path().join("tokens");
        std::fs::write(&token_file, format!("agents:{TOKEN}\n")).unwrap();
        let config = ServeConfig {
            database_url: Some(pg.url()),
            data_dir: data_dir.path().to_path_buf(),
            grpc_listen: "127.0.0.1:0".parse().unwrap(),
            http_listen: "127.0.0.1:0".parse().unwrap(),
            agent_token_file: token_file,
            store_socket: Some(host_daemon.socket_path()),
            unsupported_grace: Duration::from_secs(120),
            max_tries: 3,
            retry_interval: Duration::from_secs(1),
            max_log_bytes: 1 << 20,
            max_output_bytes: 1 << 30,
            shutdown_timeout: Duration::from_secs(10),
            max_pending_writes: 4096,
            load_batch: 2000,
            lease: Duration::from_secs(5),
            max_cpu_pressure: 0.0,
            min_free_disk_mb: 0,
            store_connections: 8,
            transfer_connections: 16,
            dispatch_order: sluice_core::ConfiguredOrder::CriticalPath,
            binary_cache: None,
            status_interval: Duration::from_secs(1),
        };
        let mut config = config;
        adjust(&mut config);
        let (bound, stop, task) = start_queue_runner(config.clone()).await;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&pg.url())
            .await
            .unwrap();
        Deployment {
            pg,
            pool,
            env,
            host_daemon,
            data_dir,
            bound,
            config,
            stop: Some(stop),
            task: Some(task),
            agents: Vec::new(),
        }
    }

    /// Starts an agent with an isolated, empty store.
    pub async fn add_agent(&mut self, name: &str, max_jobs: u32) {
        let url = format!("http://{}", self.bound.grpc);
        self.add_agent_via(name, max_jobs, url).await;
    }

    /// [`Deployment::add_agent`], holding no step ahead of its slots
    /// (`--prefetch 0`): for tests that pin down an exact order or count.
    pub async fn add_agent_without_prefetch(&mut self, name: &str, max_jobs: u32) {
        let url = format!("http://{}", self.bound.grpc);
        self.add_agent_with(name, max_jobs, url, |c, _| c.prefetch = 0)
            .await;
    }

    /// [`Deployment::add_agent`], with its store served by a daemon of `nix`.
    pub async fn add_agent_on(&mut self, name: &str, max_jobs: u32, nix: NixVersion) {
        let url = format!("http://{}", self.bound.grpc);
        self.add_agent_with_nix(name, max_jobs, url, nix, |_, _| {})
            .await;
    }

    /// [`Deployment::add_agent`], dialling the queue runner at `url` (a
    /// proxy, say).
    pub async fn add_agent_via(&mut self, name: &str, max_jobs: u32, url: String) {
        self.add_agent_with(name, max_jobs, url, |_, _| {}).await;
    }

    /// [`Deployment::add_agent_via`], with the agent's settings changed by
    /// `adjust` (which also sees the agent's store) first.
    pub async fn add_agent_with(
        &mut self,
        name: &str,
        max_jobs: u32,
        url: String,
        adjust: impl FnOnce(&mut sluice_builder_agent::AgentConfig, &IsolatedStore),
    ) {
        self.add_agent_with_nix(name, max_jobs, url, NixVersion::Nix2_8, adjust)
            .await;
    }

    /// [`Deployment::add_agent_with`], with the agent's store served by a
    /// daemon of `nix`.
    pub async fn add_agent_with_nix(
        &mut self,
        name: &str,
        max_jobs: u32,
        url: String,
        nix: NixVersion,
        adjust: impl FnOnce(&mut sluice_builder_agent::AgentConfig, &IsolatedStore),
    ) {
        let store = IsolatedStore::new();
        let daemon = store.start_daemon_version(nix);
        let config = sluice_builder_agent::AgentConfig {
            queue_runner: url,
            token: TOKEN.to_owned(),
            name: name.to_owned(),
            systems: vec![
                sluice_builder_agent::host::nix_system().await,
                "builtin".to_owned(),
            ],
            features: vec![],
            mandatory_features: vec![],
            max_jobs,
            prefetch: max_jobs,
            speed_factor: 1.0,
            store: sluice_builder_agent::LocalNix::Socket(daemon.socket_path()),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_millis(1000),
            proc_root: PathBuf::from("/proc"),
            cgroup_root: Some(PathBuf::from("/sys/fs/cgroup")),
            drain_timeout: Duration::from_secs(60),
            store_dir: store.root().join("store"),
            build_dir: std::env::temp_dir(),
            slots: None,
            topology: None,
        };
        let mut config = config;
        adjust(&mut config, &store);
        let (stop, stopped) = oneshot::channel::<()>();
        let (abort, aborted) = oneshot::channel::<()>();
        let task = tokio::spawn(sluice_builder_agent::run_until(
            config,
            async {
                let _ = stopped.await;
            },
            async {
                // A dropped sender is no abort.
                if aborted.await.is_err() {
                    std::future::pending::<()>().await;
                }
            },
        ));
        self.agents.push(Agent {
            name: name.to_owned(),
            store,
            daemon,
            stop: Some(stop),
            abort: Some(abort),
            task,
        });
    }

    /// Drains agent `name`, as SIGTERM does.
    pub fn drain_agent(&mut self, name: &str) {
        let agent = self.agents.iter_mut().find(|a| a.name == name).unwrap();
        if let Some(stop) = agent.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Stops agent `name`'s running steps, as a second SIGTERM does.
    pub fn abort_agent(&mut self, name: &str) {
        let agent = self.agents.iter_mut().find(|a| a.name == name).unwrap();
        if let Some(abort) = agent.abort.take() {
            let _ = abort.send(());
        }
    }

    /// Waits for agent `name` to stop by itself; returns how it ended.
    pub async fn agent_exit(
        &mut self,
        name: &str,
        secs: u64,
    ) -> Result<(), sluice_builder_agent::AgentError> {
        let i = self.agents.iter().position(|a| a.name == name).unwrap();
        let agent = self.agents.remove(i);
        tokio::time::timeout(Duration::from_secs(secs), agent.task)
            .await
            .unwrap_or_else(|_| panic!("agent {name} did not stop within {secs} s"))
            .unwrap()
    }

    /// Kills agent `name` as a crash would: its task is aborted, so its
    /// connections drop without a goodbye, and its daemon (with the build
    /// it runs) is killed.
    pub fn kill_agent(&mut self, name: &str) {
        let i = self.agents.iter().position(|a| a.name == name).unwrap();
        let agent = self.agents.remove(i);
        agent.task.abort();
        drop(agent);
    }

    pub fn agent(&self, name: &str) -> &Agent {
        self.agents.iter().find(|a| a.name == name).unwrap()
    }

    /// Instantiates `attrs` of `expr` (see `NixEnv::write_expr`) and
    /// queues one build per attribute, named after it; returns the ids.
    pub async fn submit_attrs(&self, expr: &str, attrs: &[&str]) -> Vec<i32> {
        let drvs = self.env.instantiate(expr, attrs);
        let jobs: Vec<(String, String)> = attrs
            .iter()
            .zip(drvs)
            .map(|(name, drv)| (name.to_string(), drv))
            .collect();
        self.submit(&jobs).await
    }

    /// Queues one build per `(job, drv)` as an evaluator would.
    pub async fn submit(&self, jobs: &[(String, String)]) -> Vec<i32> {
        let jobs: Vec<sluice_queue_runner::submit::Job> = jobs
            .iter()
            .map(|(name, drv)| sluice_queue_runner::submit::Job {
                name: name.clone(),
                drv_path: drv.clone(),
            })
            .collect();
        sluice_queue_runner::submit::queue(&self.pool, "e2e", "jobs", &jobs)
            .await
            .unwrap()
    }

    /// Waits until a step of `build` is building (phase 30 or later);
    /// returns the machine it builds on. Panics after a minute.
    pub async fn wait_building(&self, build: i32) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let machine: Option<String> = sqlx::query_scalar(
                "select machine from BuildSteps where build = $1 and busy >= 30 limit 1",
            )
            .bind(build)
            .fetch_optional(&self.pool)
            .await
            .unwrap();
            if let Some(machine) = machine {
                return machine;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "build {build} never started building"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every build in `ids` is finished; panics after `secs`.
    pub async fn wait_finished(&self, ids: &[i32], secs: u64) -> BTreeMap<i32, i32> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let rows: Vec<(i32, i32, Option<i32>)> =
                sqlx::query_as("select id, finished, buildStatus from Builds where id = any($1)")
                    .bind(ids)
                    .fetch_all(&self.pool)
                    .await
                    .unwrap();
            if rows.len() == ids.len() && rows.iter().all(|(_, f, _)| *f == 1) {
                return rows
                    .into_iter()
                    .map(|(id, _, s)| (id, s.unwrap_or(-1)))
                    .collect();
            }
            if tokio::time::Instant::now() > deadline {
                let status = reqwest_status(self.bound.http).await;
                panic!(
                    "builds not finished after {secs}s: {:?}; queue runner status: {status}",
                    rows.iter()
                        .filter(|(_, f, _)| *f == 0)
                        .map(|(id, _, _)| id)
                        .collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The error message of the `BuildSteps` row of `build`, a build of
    /// one step ("" if the row has none); panics if there is no row.
    pub async fn only_step_error(&self, build: i32) -> String {
        let (error,): (Option<String>,) =
            sqlx::query_as("select errorMsg from BuildSteps where build = $1")
                .bind(build)
                .fetch_one(&self.pool)
                .await
                .unwrap();
        error.unwrap_or_default()
    }

    /// Starts shutting the queue runner down as SIGTERM would (its agents
    /// and the database stay); the returned task ends with what
    /// `service::run_with` returned.
    pub fn begin_stopping_queue_runner(&mut self) -> JoinHandle<anyhow::Result<()>> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.take().expect("the queue runner runs")
    }

    /// Stops the queue runner as SIGTERM does and starts it again with the
    /// same settings, database, data directory and store. It listens on
    /// new ports: agents started before do not find it again.
    pub async fn restart_queue_runner(&mut self) {
        self.stop_queue_runner().await;
        self.start_queue_runner_again().await;
    }

    /// Restarts finished build `id` with the web UI's SQL, in one
    /// transaction: its output paths leave `FailedPaths`, and it is queued
    /// again.
    pub async fn restart_build_as_the_web_ui_does(&self, id: i32) {
        let mut tx = self.pool.begin().await.unwrap();
        sqlx::query(
            "delete from FailedPaths where path in
               (select path from BuildOutputs where build = $1
                union select path from BuildStepOutputs where build = $1)",
        )
        .bind(id)
        .execute(&mut *tx)
        .await
        .unwrap();
        sqlx::query("update Builds set finished = 0, isCachedBuild = 0 where id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }

    /// Stops the queue runner as SIGTERM does, and waits until it has
    /// (its agents and the database stay).
    pub async fn stop_queue_runner(&mut self) {
        let stopping = self.begin_stopping_queue_runner();
        tokio::time::timeout(Duration::from_secs(30), stopping)
            .await
            .expect("the queue runner stops within 30 s")
            .unwrap()
            .unwrap();
    }

    /// Starts the stopped queue runner again with the same settings,
    /// database, data directory and store, on new ports.
    pub async fn start_queue_runner_again(&mut self) {
        let (bound, stop, task) = start_queue_runner(self.config.clone()).await;
        self.bound = bound;
        self.stop = Some(stop);
        self.task = Some(task);
    }

    pub async fn stop(mut self) {
        for agent in &mut self.agents {
            if let Some(stop) = agent.stop.take() {
                let _ = stop.send(());
            }
        }
        for agent in self.agents.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(10), agent.task).await;
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }
}

/// Starts `service::run_with(config)`; returns once it is up.
async fn start_queue_runner(
    config: ServeConfig,
) -> (Bound, oneshot::Sender<()>, JoinHandle<anyhow::Result<()>>) {
    let (stop, stopped) = oneshot::channel::<()>();
    let (bound_tx, bound_rx) = oneshot::channel();
    let task = tokio::spawn(service::run_with(
        config,
        async {
            let _ = stopped.await;
        },
        bound_tx,
    ));
    match tokio::time::timeout(Duration::from_secs(60), bound_rx).await {
        Ok(Ok(bound)) => (bound, stop, task),
        _ => {
            let result = task.await;
            panic!("the queue runner did not come up: {result:?}");
        }
    }
}

/// `GET /status` of the queue runner, as text (for failure messages).
pub async fn reqwest_status(addr: std::net::SocketAddr) -> String {
    http_get(addr, "/status").await.unwrap_or_else(|e| e)
}

/// A minimal HTTP/1.0 GET over a TCP stream.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<String, String> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || sluice_test_support::http_get(addr, &path))
        .await
        .map_err(|e| e.to_string())?
}

/// A binary cache signing key named `name`, made by Nix in `dir`:
/// `(secret key file, public key)`.
pub fn generate_key(env: &NixEnv, dir: &std::path::Path, name: &str) -> (PathBuf, String) {
    use sluice_test_support::nix::NixCommands as _;
    let (secret, public) = (
        dir.join(format!("{name}.sec")),
        dir.join(format!("{name}.pub")),
    );
    sluice_test_support::nix::run(
        env.command("nix-store")
            .arg("--generate-binary-cache-key")
            .arg(name)
            .arg(&secret)
            .arg(&public),
    );
    let public = std::fs::read_to_string(&public).unwrap().trim().to_owned();
    (secret, public)
}
