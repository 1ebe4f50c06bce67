//! `builder-agent`: runs on a build machine, dials the queue runner and
//! builds the steps it is given with the local Nix. A thin front over the
//! `sluice_builder_agent` library.
//!
//! Errors reach the user as one line on stderr and a non-zero exit code.
//! SIGTERM or SIGINT drains the agent (see `--drain-timeout-s`); a second
//! one stops the running steps at once.
//!
//! Under systemd (`Type=notify`) the agent reports `READY=1` once it runs:
//! its settings are checked (token read, topology read) and it starts to
//! dial. Not once it has registered: an agent is meant to run while its
//! queue runner is away (it redials with backoff, and its builds go on),
//! so a start job that waited for the queue runner would hold up boot and
//! fail the unit whenever the queue runner is down. A queue runner that
//! refuses the agent still fails it: the agent then exits 1. The first
//! signal reports `STOPPING=1`.

use std::process::ExitCode;

use clap::Parser;
use sluice_builder_agent::{Cli, LogFormat};

/// mimalloc: the derivation parser allocates many small strings, and
/// glibc's malloc was a quarter of its time (see `cargo bench -p
/// sluice-nix --bench derivations`, which uses the same allocator).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Counts SIGTERM and SIGINT into `count`.
async fn count_signals(count: tokio::sync::watch::Sender<u32>) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    loop {
        tokio::select! {
            r = tokio::signal::ctrl_c() => if r.is_err() { std::future::pending::<()>().await },
            Some(()) = async { match term.as_mut() { Some(t) => t.recv().await, None => None } } => {}
        }
        count.send_modify(|n| *n += 1);
    }
}

/// Completes once `n` signals have arrived.
async fn signals(mut count: tokio::sync::watch::Receiver<u32>, n: u32) {
    let _ = count.wait_for(|seen| *seen >= n).await;
}

/// Logs to stderr at info and above unless `RUST_LOG` says otherwise;
/// colour only on a terminal.
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
}

/// Tells systemd how the agent is doing (nothing without
/// `$NOTIFY_SOCKET`). A failure is logged, never fatal.
fn notify_systemd(state: &str) {
    if let Err(e) = sluice_sd_notify::notify(state) {
        tracing::warn!("cannot notify systemd: {e}");
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let config = match cli.resolve().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        name = config.name,
        systems = ?config.systems,
        max_jobs = config.max_jobs,
        queue_runner = config.queue_runner,
        "builder agent starting"
    );
    // The first signal drains, a second one stops the running steps.
    let (count, counted) = tokio::sync::watch::channel(0);
    tokio::spawn(count_signals(count));
    let first = signals(counted.clone(), 1);
    let drain = async move {
        first.await;
        notify_systemd(sluice_sd_notify::STOPPING);
    };
    let abort = signals(counted, 2);
    notify_systemd(&format!(
        "{}\nSTATUS=dialing {}",
        sluice_sd_notify::READY,
        config.queue_runner
    ));
    match sluice_builder_agent::run_until(config, drain, abort).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
