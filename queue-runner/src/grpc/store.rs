//! The queue runner's own Nix store, reached through the Nix daemon
//! protocol: a small pool of [`DaemonClient`] connections.
//!
//! A connection is either to a daemon socket, or to a `nix-daemon --stdio`
//! child; as root and with `NIX_REMOTE=local` that child serves the local
//! store in-process (no system daemon needed).
//!
//! The pool also holds the store's [`PathInfoCache`], which its
//! [`LocalStore::sibling`]s share, so the driver and the service use one.
//!
//! Invariants: at most `max_connections` connections exist at once (a
//! caller waits for a free one); a connection goes back to the pool only
//! if it is still open, so one that an error or a dropped operation closed
//! is never handed out again.

use std::ffi::OsString;
use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;
use sluice_nix::daemon::{ClientError, DaemonClient};
use thiserror::Error;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::store::{PathInfoCache, PATH_INFO_CACHE_PATHS};

/// How to reach the store.
#[derive(Debug, Clone)]
pub enum StoreConnection {
    /// A daemon's Unix socket, e.g. `/nix/var/nix/daemon-socket/socket`.
    Socket(PathBuf),
    /// A child speaking the protocol on its stdio: `program args...`, with
    /// `env` added to the inherited environment.
    Stdio {
        program: PathBuf,
        args: Vec<OsString>,
        env: Vec<(OsString, OsString)>,
    },
}

impl StoreConnection {
    /// `nix-daemon --stdio` with `NIX_REMOTE=local`: the local store,
    /// served in-process (needs write access to it, i.e. root).
    pub fn local_stdio() -> StoreConnection {
        StoreConnection::Stdio {
            program: "nix-daemon".into(),
            args: vec!["--stdio".into()],
            env: vec![("NIX_REMOTE".into(), "local".into())],
        }
    }
}

/// Why no connection could be had.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("opening a connection to the queue runner's Nix store: {0}")]
    Connect(#[source] ClientError),
    #[error("the store connection pool is closed")]
    Closed,
}

struct Pool {
    connection: StoreConnection,
    idle: Mutex<Vec<DaemonClient>>,
    slots: Arc<Semaphore>,
    path_infos: Arc<PathInfoCache>,
}

/// A handle on the store; cheap to clone.
#[derive(Clone)]
pub struct LocalStore {
    pool: Arc<Pool>,
}

impl std::fmt::Debug for LocalStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalStore")
            .field("connection", &self.pool.connection)
            .finish_non_exhaustive()
    }
}

impl LocalStore {
    /// A pool with a path-info cache of its own.
    pub fn new(connection: StoreConnection, max_connections: usize) -> LocalStore {
        Self::with_path_infos(
            connection,
            max_connections,
            Arc::new(PathInfoCache::new(PATH_INFO_CACHE_PATHS)),
        )
    }

    /// Another pool on the same store sharing this one's path-info cache
    /// (the driver's and the transfers' pools: a closure the driver read
    /// for an assignment is then in memory when the agent asks for it).
    pub fn sibling(&self, connection: StoreConnection, max_connections: usize) -> LocalStore {
        Self::with_path_infos(connection, max_connections, self.pool.path_infos.clone())
    }

    fn with_path_infos(
        connection: StoreConnection,
        max_connections: usize,
        path_infos: Arc<PathInfoCache>,
    ) -> LocalStore {
        LocalStore {
            pool: Arc::new(Pool {
                connection,
                idle: Mutex::new(Vec::new()),
                slots: Arc::new(Semaphore::new(max_connections.max(1))),
                path_infos,
            }),
        }
    }

    /// The path infos every user of this store shares (see
    /// [`crate::store::closure`]).
    pub fn path_infos(&self) -> &PathInfoCache {
        &self.pool.path_infos
    }

    /// A connection, from the pool or newly opened; waits while
    /// `max_connections` are in use.
    pub async fn client(&self) -> Result<PooledClient, StoreError> {
        let permit = self
            .pool
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Closed)?;
        let idle = self.pool.idle.lock().pop();
        let client = match idle {
            Some(client) => client,
            None => self.open().await?,
        };
        Ok(PooledClient {
            client: Some(client),
            pool: self.pool.clone(),
            _permit: permit,
        })
    }

    async fn open(&self) -> Result<DaemonClient, StoreError> {
        match &self.pool.connection {
            StoreConnection::Socket(path) => {
                // Nix's daemon listens with a tiny backlog (5 in Nix 2.8):
                // a burst of connections gets EAGAIN, which is worth a few
                // short retries rather than a failed step.
                let mut delay = std::time::Duration::from_millis(5);
                let mut tries = 0;
                loop {
                    match DaemonClient::connect(path).await {
                        Err(e) if tries < 8 && is_busy(&e) => {
                            tries += 1;
                            tokio::time::sleep(delay).await;
                            delay *= 2;
                        }
                        other => break other,
                    }
                }
            }
            StoreConnection::Stdio { program, args, env } => {
                // Its stderr goes to `tracing` (see `DaemonClient::spawn`):
                // it reports failures over the protocol, and what it prints
                // when a connection closes is logged at debug level only.
                let mut cmd = tokio::process::Command::new(program);
                cmd.args(args).envs(env.iter().map(|(k, v)| (k, v)));
                DaemonClient::spawn(cmd).await
            }
        }
        .map_err(StoreError::Connect)
    }
}

/// Whether connecting failed because the daemon's listen queue was full
/// (`EAGAIN` on a Unix socket).
fn is_busy(e: &ClientError) -> bool {
    matches!(e, ClientError::Connect { source, .. }
        if source.kind() == std::io::ErrorKind::WouldBlock)
}

/// A connection borrowed from the pool; returned to it on drop if open.
pub struct PooledClient {
    client: Option<DaemonClient>,
    pool: Arc<Pool>,
    _permit: OwnedSemaphorePermit,
}

impl Deref for PooledClient {
    type Target = DaemonClient;
    fn deref(&self) -> &DaemonClient {
        // Present from construction until drop.
        self.client.as_ref().unwrap_or_else(|| unreachable!())
    }
}

impl DerefMut for PooledClient {
    fn deref_mut(&mut self) -> &mut DaemonClient {
        self.client.as_mut().unwrap_or_else(|| unreachable!())
    }
}

impl Drop for PooledClient {
    fn drop(&mut self) {
        if let Some(mut client) = self.client.take() {
            if client.is_open() {
                // A load's answers can be megabytes; an idle connection
                // keeps no more than a frame's worth.
                client.shrink_buffers(1 << 20);
                self.pool.idle.lock().push(client);
            }
        }
    }
}
