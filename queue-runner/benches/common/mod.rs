//! What the queue runner's benches share: the line that names the machine
//! their figures come from, a fixed-seed generator for generated DAGs,
//! percentiles, reading the derivations a bench instantiated, and what a
//! simulated agent needs to speak `sluice.v1` (a client that presents the
//! token, a session opened as `builder-agent` opens one, its assignments,
//! and retrying what the queue runner answered `Unavailable`). Included
//! with `#[path]` by each bench.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use sluice_nix::derivation::Derivation;
use sluice_nix::store_path::StoreDir;
use sluice_proto::v1 as pb;
use sluice_proto::v1::queue_runner_client::QueueRunnerClient;
use sluice_proto::PROTOCOL_VERSION;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// Prints `title` and the machine (nproc and the CPU model), so figures
/// from different machines are not compared blindly.
pub fn print_machine(title: &str) {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    println!("{title}");
    println!("machine: nproc {cpus}, CPU {model}");
}

/// A fixed-seed xorshift generator: the same DAG shape every run.
pub struct XorShift(pub u64);

impl XorShift {
    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// p50/p90/p99/max of `samples`, in milliseconds (nearest rank).
pub fn print_figures(label: &str, samples: &[Duration]) {
    if samples.is_empty() {
        println!("{label}: no samples");
        return;
    }
    let mut sorted = samples.to_vec();
    sorted.sort();
    let n = sorted.len();
    let rank = |q: f64| sorted[((q * n as f64).ceil() as usize).clamp(1, n) - 1];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mean = sorted.iter().sum::<Duration>() / u32::try_from(n).unwrap_or(u32::MAX);
    println!(
        "{label}: n={n}  p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms  (mean {:.2} ms)",
        ms(rank(0.50)),
        ms(rank(0.90)),
        ms(rank(0.99)),
        ms(sorted[n - 1]),
        ms(mean)
    );
}

/// The derivation at `drv_path`, which the bench instantiated.
pub fn read_drv(drv_path: &str) -> Derivation {
    let dir = StoreDir::default();
    let path = dir
        .parse_path(drv_path)
        .expect("a store path from nix-instantiate");
    let text = std::fs::read(drv_path).expect("reading a .drv the bench instantiated");
    Derivation::parse_drv_file(&dir, &path, &text).expect("parsing a .drv the bench instantiated")
}

/// Adds the bearer token to every call.
#[derive(Clone)]
pub struct Bearer(MetadataValue<Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// A `sluice.v1` client presenting an agent's token.
pub type Client = QueueRunnerClient<InterceptedService<Channel, Bearer>>;

/// Dials the queue runner's gRPC port at `addr` (one HTTP/2 connection,
/// as an agent has) with `token`.
pub async fn connect(addr: SocketAddr, token: &str) -> Client {
    let token: MetadataValue<Ascii> = format!("Bearer {token}")
        .parse()
        .expect("the token is a valid header value");
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .expect("a valid queue runner URL")
        .connect()
        .await
        .expect("connecting to the queue runner's gRPC port");
    QueueRunnerClient::with_interceptor(channel, Bearer(token))
}

/// Retries of an agent call the queue runner refused as `Unavailable`.
pub const MAX_RETRIES: u32 = 20;

/// Calls `call` until it succeeds or fails with something other than
/// `Unavailable` (the queue runner's answer when it could not reach its
/// own store for the moment), at most [`MAX_RETRIES`] times more; counts
/// the retries in `retries`.
pub async fn retrying<T, F, Fut>(mut call: F, retries: &mut u32) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let mut left = MAX_RETRIES;
    loop {
        match call().await {
            Err(status) if status.code() == tonic::Code::Unavailable && left > 0 => {
                left -= 1;
                *retries += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => return other,
        }
    }
}

/// What a simulated agent registers as.
pub struct Registration<'a> {
    /// The agent version it presents (the bench's name).
    pub agent_version: &'a str,
    pub name: &'a str,
    /// The system it builds for, besides `builtin`.
    pub system: &'a str,
    pub max_jobs: u32,
    /// Steps it takes ahead of its free slots.
    pub prefetch: u32,
    /// Room for events not yet sent on the work stream.
    pub events: usize,
}

/// A simulated agent's session with the queue runner.
pub struct Session {
    pub client: Client,
    pub id: String,
    /// Events for the work stream, which stays open while this is held.
    pub events: mpsc::Sender<pb::AgentEvent>,
    /// What the queue runner sends on the work stream.
    pub commands: tonic::Streaming<pb::RunnerCommand>,
    /// Heartbeats at the interval the queue runner asked for (100 ms at
    /// the least), until aborted.
    pub heartbeats: JoinHandle<()>,
}

/// Opens a session as `builder-agent` does, at the queue runner's gRPC port
/// `addr` with `token`: `Version`, `Register`, the work stream (`Hello`
/// first), and heartbeats.
pub async fn open_session(addr: SocketAddr, token: &str, agent: Registration<'_>) -> Session {
    let mut client = connect(addr, token).await;
    let version = client
        .version(pb::VersionRequest {
            protocol_version: PROTOCOL_VERSION,
            agent_version: agent.agent_version.into(),
        })
        .await
        .expect("the Version call")
        .into_inner();
    assert_eq!(
        version.protocol_version, PROTOCOL_VERSION,
        "protocol version"
    );
    let registered = client
        .register(pb::RegisterRequest {
            name: agent.name.to_owned(),
            systems: vec![agent.system.to_owned(), "builtin".into()],
            supported_features: vec![],
            mandatory_features: vec![],
            max_jobs: agent.max_jobs,
            speed_factor: 1.0,
            total_mem_bytes: 1 << 30,
            draining: false,
            slots: vec![],
            prefetch: agent.prefetch,
            nodes: vec![],
        })
        .await
        .expect("the Register call")
        .into_inner();
    let id = registered.session_id;

    let (events, events_rx) = mpsc::channel(agent.events);
    events
        .send(pb::AgentEvent {
            session_id: id.clone(),
            event: Some(pb::agent_event::Event::Hello(pb::Hello::default())),
        })
        .await
        .expect("queueing Hello");
    let commands = client
        .work(ReceiverStream::new(events_rx))
        .await
        .expect("opening the work stream")
        .into_inner();

    let heartbeats = {
        let mut client = client.clone();
        let session = id.clone();
        let interval = Duration::from_millis(u64::from(registered.heartbeat_interval_ms).max(100));
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            loop {
                ticks.tick().await;
                let beat = pb::HeartbeatRequest {
                    session_id: session.clone(),
                    ..Default::default()
                };
                if let Err(status) = client.heartbeat(beat).await {
                    eprintln!("sim agent: heartbeat failed: {status}");
                }
            }
        })
    };
    Session {
        client,
        id,
        events,
        commands,
        heartbeats,
    }
}

/// The next assignment on the work stream, other commands skipped; `None`
/// once the stream ends.
pub async fn next_assignment(
    commands: &mut tonic::Streaming<pb::RunnerCommand>,
) -> Result<Option<pb::Assignment>, String> {
    loop {
        match commands.message().await {
            Ok(Some(pb::RunnerCommand {
                command: Some(pb::runner_command::Command::Assign(a)),
            })) => return Ok(Some(a)),
            Ok(Some(_)) => continue,
            Ok(None) => return Ok(None),
            Err(status) => return Err(format!("the work stream failed: {status}")),
        }
    }
}
