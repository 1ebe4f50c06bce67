//! What the queue runner's benches share: the line that names the machine
//! their figures come from, a fixed-seed generator for generated DAGs,
//! percentiles, and what a simulated agent needs to speak `sluice.v1` (a
//! client that presents the token, and retrying what the queue runner
//! answered `Unavailable`). Included with `#[path]` by each bench.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use sluice_proto::v1::queue_runner_client::QueueRunnerClient;
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
