//! The queue runner's gRPC service (`sluice.v1.QueueRunner`): the only
//! code that speaks to builder agents.
//!
//! Agents dial in, present a token, check the protocol version, register
//! and open a work stream. From then on the service turns what they send
//! into [`FromAgent`] values for the driver, and forwards the driver's
//! [`ToAgent`](crate::agents::ToAgent) values to them. Around that it moves
//! bytes: build logs into log files, input NARs out of the queue runner's
//! store, output NARs into it.
//!
//! Invariants:
//! - Protobuf types never leave this module: [`convert`] turns them into the
//!   plain types of [`crate::agents`] and back.
//! - Everything an agent says is checked before it is believed: its token on
//!   every call, that its session exists and belongs to that token, and that
//!   an attempt it names is one the driver gave to that session
//!   ([`Attempts`]). A lying agent gets an error status, never a panic.
//! - Every channel is bounded and every NAR moves in chunks: a slow agent
//!   or a huge output never makes the queue runner buffer without limit.
//! - Every `Connected` sent to the driver is followed by exactly one
//!   `Disconnected` for the same machine, and nothing after it.
//! - Errors are `thiserror` enums per operation; they become
//!   [`tonic::Status`] only here.

pub mod attempts;
pub mod auth;
mod convert;
mod fetch;
mod input_closure;
mod log_stream;
mod service;
mod sessions;
pub mod store;
mod upload;
mod work;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sluice_proto::v1::queue_runner_server::QueueRunnerServer;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;

use crate::agents::FromAgent;

pub use attempts::{AttemptEntry, AttemptError, Attempts, UploadedOutput};
pub use auth::{TokenFileError, Tokens};
pub use store::{LocalStore, StoreConnection, StoreError};

use sessions::Sessions;

/// Accepted connections with `TCP_NODELAY` set: tonic does not apply its
/// own setting to a custom incoming stream, and without it small messages
/// (an assignment, a result's answer) wait for the peer's delayed ACK,
/// about 40 ms each.
fn incoming(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    TcpListenerStream::new(listener).map(|accepted| {
        let stream = accepted?;
        stream.set_nodelay(true)?;
        Ok(stream)
    })
}

/// Settings of the gRPC service.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Hydra's data directory (`HYDRA_DATA`); build logs go where
    /// [`crate::logs::log_path`] says, under `<data_dir>/build-logs/`.
    pub data_dir: PathBuf,
    /// How often agents are told to send heartbeats.
    pub heartbeat_interval: Duration,
    /// A session is dropped after this many intervals without a heartbeat.
    pub missed_heartbeats: u32,
    /// Largest gRPC message either side may send (and the service accepts).
    pub max_message_bytes: usize,
    /// Capacity of each agent's command channel (driver → agent) beyond
    /// one assignment per slot and per step it takes ahead.
    pub command_buffer: usize,
}

impl ServiceConfig {
    /// Defaults for production: 10 s heartbeats, dropped after 3 missed,
    /// 4 MiB messages, 16 queued commands per agent beyond its slots and
    /// steps ahead.
    pub fn new(data_dir: PathBuf) -> ServiceConfig {
        ServiceConfig {
            data_dir,
            heartbeat_interval: Duration::from_secs(10),
            missed_heartbeats: 3,
            max_message_bytes: 4 << 20,
            command_buffer: 16,
        }
    }

    fn session_timeout(&self) -> Duration {
        self.heartbeat_interval * self.missed_heartbeats.max(1)
    }
}

/// Why the service stopped.
#[derive(Debug, Error)]
pub enum ServeError {
    #[error("listening for agents on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("serving gRPC: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// State shared by every call.
struct Shared {
    config: ServiceConfig,
    store: LocalStore,
    attempts: Attempts,
    sessions: Sessions,
}

/// The `sluice.v1.QueueRunner` service. Build it with
/// [`QueueRunnerService::new`] and run it with [`QueueRunnerService::serve`].
#[derive(Clone)]
pub struct QueueRunnerService {
    shared: Arc<Shared>,
    tokens: Arc<Tokens>,
}

impl QueueRunnerService {
    /// `events` is the driver's inbox; `attempts` is the registry the
    /// driver fills before it sends an assignment; `store` is the queue
    /// runner's own Nix store.
    pub fn new(
        config: ServiceConfig,
        tokens: Tokens,
        store: LocalStore,
        attempts: Attempts,
        events: mpsc::Sender<FromAgent>,
    ) -> QueueRunnerService {
        QueueRunnerService {
            shared: Arc::new(Shared {
                config,
                store,
                attempts,
                sessions: Sessions::new(events),
            }),
            tokens: Arc::new(tokens),
        }
    }

    /// Serves agents on `listener` until `shutdown` completes. On shutdown
    /// every session is ended (the driver gets `Disconnected` for each
    /// connected agent) so that open work streams do not hold the server.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServeError> {
        let shared = self.shared.clone();
        let reaper = tokio::spawn(sessions::reap_forever(
            shared.clone(),
            shared.config.heartbeat_interval,
        ));
        let max = shared.config.max_message_bytes;
        let server = QueueRunnerServer::new(self.clone())
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
        let service = InterceptedService::new(server, auth::Authenticate::new(self.tokens));
        let keepalive = shared.config.heartbeat_interval;
        let result = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(keepalive))
            .http2_keepalive_timeout(Some(keepalive))
            .add_service(service)
            .serve_with_incoming_shutdown(incoming(listener), async {
                shutdown.await;
                shared
                    .sessions
                    .end_all("the queue runner is shutting down")
                    .await;
            })
            .await;
        reaper.abort();
        // Sessions that registered while shutting down.
        self.shared
            .sessions
            .end_all("the queue runner is shutting down")
            .await;
        result.map_err(ServeError::from)
    }

    /// Binds `addr` (port 0 picks a free one) and serves in a task until
    /// `shutdown` completes; returns the bound address and the task.
    pub async fn spawn(
        self,
        addr: SocketAddr,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(SocketAddr, JoinHandle<Result<(), ServeError>>), ServeError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind { addr, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| ServeError::Bind { addr, source })?;
        tracing::info!(%bound, "listening for builder agents");
        Ok((bound, tokio::spawn(self.serve(listener, shutdown))))
    }
}
