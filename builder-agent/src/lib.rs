//! The Sluice builder agent as a library: the `builder-agent` binary is a
//! thin front over [`run`], and tests run the agent in-process with it.
//!
//! An agent dials the queue runner over gRPC, checks the protocol version,
//! registers its capabilities, sends heartbeats with its load, and opens a
//! work stream. For each assignment it fetches the inputs its own Nix store
//! lacks, builds the derivation through its local Nix daemon while
//! streaming the log, uploads the outputs and reports the result. When the
//! connection drops it reconnects with capped exponential backoff and
//! registers again as a new session, announcing the steps it still holds:
//! builds go on while the connection is down, and their logs, outputs and
//! results reach the queue runner on the next session.
//!
//! - [`config`]: command line and resolved settings.
//! - `session`: one connection: registration, heartbeats, the work stream.
//! - `link`: the agent's jobs, and the current session they talk through.
//! - `job`: one assignment from start to report; `transfer`: NARs in and
//!   out; `logs`: the log stream.
//! - [`host`]: load, memory and pressure figures from `/proc`.
//! - `cgroup`: a cgroup per step, with the slot's cpuset, emptied when the
//!   step ends; `nix_store`: the store connection, placed in the step's
//!   cgroup, CPUs and memory nodes.
//!
//! Invariants: nothing the queue runner sends can panic the agent; every
//! channel is bounded except the one the Nix client's synchronous logger
//! feeds (bounded in practice by the build's log limit); a job that ends
//! or is cancelled, or an agent that stops, drops its daemon connection,
//! which makes the daemon stop the build; a result is forgotten only once
//! the queue runner acknowledged it (committed) or said the attempt is over.

mod cgroup;
pub mod config;
pub mod host;
mod job;
mod link;
mod logs;
mod nix_store;
mod session;
pub mod topology;
mod transfer;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

pub use config::{AgentConfig, Cli, ConfigError, LocalNix, LogFormat};

/// Why the agent stopped for good (anything else is retried).
#[derive(Debug, Error)]
pub enum AgentError {
    #[error("the queue runner refused this agent: {0}")]
    Refused(String),
}

/// Runs the agent until `shutdown` completes and the drain that follows is
/// over (`Ok`), or until the queue runner refuses it for good (a wrong
/// token, an incompatible protocol version, a registration it rejects).
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    run_until(config, shutdown, std::future::pending()).await
}

/// [`run`], with a second signal: when `drain` completes the agent takes
/// no new steps and lets those it runs finish (up to the drain timeout);
/// when `abort` completes, or the timeout passes, it stops them and
/// reports them aborted. It returns once nothing is left.
pub async fn run_until(
    config: AgentConfig,
    drain: impl Future<Output = ()>,
    abort: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let config = Arc::new(config);
    log_slots(&config);
    let mut backoff = Backoff::new(config.reconnect_min, config.reconnect_max);
    // Jobs outlive sessions; they are dropped (their builds stopped) only
    // when the agent stops.
    let mut jobs = link::Jobs::new(config.max_jobs, config.slots.clone(), step_cgroups(&config));
    let (link, _) = tokio::sync::watch::channel(None);
    let (draining, draining_rx) = tokio::sync::watch::channel(false);
    let mut deadline: Option<tokio::time::Instant> = None;
    tokio::pin!(drain, abort);
    loop {
        // The session future borrows the jobs; it is only polled here, so
        // a drain starting does not cut it short.
        let stop = {
            let session =
                session::run(&config, &mut backoff, &mut jobs, &link, draining_rx.clone());
            tokio::pin!(session);
            loop {
                tokio::select! {
                    ended = &mut session => break Stop::Ended(ended),
                    _ = &mut drain, if deadline.is_none() => {
                        deadline = Some(start_drain(&config, &draining));
                    }
                    _ = &mut abort => break Stop::Abort("a second signal"),
                    _ = sleep_until(deadline) => break Stop::Abort("the drain timeout passed"),
                }
            }
        };
        let ended = match stop {
            Stop::Abort(why) => return abort_jobs(&mut jobs, &link, why).await,
            Stop::Ended(ended) => ended,
        };
        match ended {
            session::Ended::Refused(why) => return Err(AgentError::Refused(why)),
            session::Ended::Drained => {
                tracing::info!("drained: every step is delivered; stopping");
                return Ok(());
            }
            session::Ended::Lost(why) => {
                let delay = backoff.next_delay();
                tracing::warn!(
                    "connection to the queue runner lost: {why}; reconnecting in {} ms",
                    delay.as_millis()
                );
                let sleep = tokio::time::sleep(delay);
                tokio::pin!(sleep);
                loop {
                    if deadline.is_some() && jobs.is_empty() {
                        tracing::info!("drained: every step is delivered; stopping");
                        return Ok(());
                    }
                    tokio::select! {
                        _ = &mut sleep => break,
                        _ = &mut drain, if deadline.is_none() => {
                            deadline = Some(start_drain(&config, &draining));
                        }
                        _ = &mut abort => return abort_jobs(&mut jobs, &link, "a second signal").await,
                        _ = sleep_until(deadline) => {
                            return abort_jobs(&mut jobs, &link, "the drain timeout passed").await
                        }
                        Some(done) = jobs.set.join_next_with_id(), if !jobs.set.is_empty() => {
                            jobs.reap(done)
                        }
                    }
                }
            }
        }
    }
}

/// Says once, at start, how steps are pinned.
fn log_slots(config: &AgentConfig) {
    let Some(layout) = &config.slots else {
        tracing::info!(
            max_jobs = config.max_jobs,
            "steps are not pinned (--pinning off, or more jobs than CPUs): they run on any CPU"
        );
        return;
    };
    let slots: Vec<String> = layout
        .slots
        .iter()
        .map(|s| {
            format!(
                "node {}: cpus {}",
                s.node,
                topology::format_cpu_list(&s.cpus)
            )
        })
        .collect();
    tracing::info!(?slots, "steps are pinned to slots");
    if matches!(config.store, LocalNix::Socket(_)) {
        tracing::warn!(
            "the builds run by the daemon at --store-socket are its children, not this agent's: \
             they get NIX_BUILD_CORES but not the slot's CPUs; leave --store-socket out to pin them"
        );
    }
}

/// Where steps' cgroups are made, if they can be: only builds that the
/// agent's own store child runs can be placed, and only on a host with a
/// cpuset controller. Says once when there is none.
fn step_cgroups(config: &AgentConfig) -> Option<cgroup::Cgroups> {
    if matches!(config.store, LocalNix::Socket(_)) {
        return None;
    }
    let root = config.cgroup_root.as_deref()?;
    match cgroup::Cgroups::setup(root, &config.proc_root) {
        Ok(cgroups) => {
            tracing::info!(
                hierarchy = ?cgroups.hierarchy(),
                dir = %cgroups.dir().display(),
                "each step runs in a cgroup of its own"
            );
            Some(cgroups)
        }
        Err(why) => {
            let pinned = if config.slots.is_some() {
                "steps are pinned by CPU affinity alone, and "
            } else {
                ""
            };
            tracing::warn!(
                "no cgroups for steps: {why}; {pinned}a build's processes are stopped through its process group only"
            );
            None
        }
    }
}

/// Why the loop around a session stopped.
enum Stop {
    Ended(session::Ended),
    Abort(&'static str),
}

/// Starts a drain; returns its deadline.
fn start_drain(
    config: &AgentConfig,
    draining: &tokio::sync::watch::Sender<bool>,
) -> tokio::time::Instant {
    tracing::info!(
        timeout_s = config.drain_timeout.as_secs(),
        "draining: no new steps; the running ones may finish"
    );
    draining.send_replace(true);
    tokio::time::Instant::now() + config.drain_timeout
}

/// Completes at `deadline`, or never without one.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Stops every job and reports its step aborted (retryable), as far as
/// the current session, if any, takes the reports within a few seconds.
async fn abort_jobs(
    jobs: &mut link::Jobs,
    link: &tokio::sync::watch::Sender<Option<Arc<session::SessionCtx>>>,
    why: &str,
) -> Result<(), AgentError> {
    let steps = jobs.abort_all();
    tracing::warn!(steps = steps.len(), "stopping the running steps: {why}");
    let ctx = link.borrow().clone();
    if let Some(ctx) = ctx {
        let mut reports = tokio::task::JoinSet::new();
        for step in steps {
            let ctx = ctx.clone();
            let why = format!("the agent stopped ({why})");
            reports.spawn(async move {
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    job::report_aborted(&ctx, &step, why),
                )
                .await;
            });
        }
        while reports.join_next().await.is_some() {}
    }
    Ok(())
}

/// Capped exponential backoff with jitter; reset once a session is up.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Backoff {
        let min = min.max(Duration::from_millis(1));
        Backoff {
            min,
            max: max.max(min),
            next: min,
        }
    }

    pub(crate) fn reset(&mut self) {
        self.next = self.min;
    }

    /// The delay before the next attempt: the current step plus up to a
    /// quarter of jitter, never above the cap; the step then doubles.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let jitter = base / 4 * (nanos % 1000) / 1000;
        (base + jitter).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(700));
        let delays: Vec<Duration> = (0..5).map(|_| b.next_delay()).collect();
        let ms = |d: &Duration| d.as_millis();
        assert!((100..=125).contains(&ms(&delays[0])), "{delays:?}");
        assert!((200..=250).contains(&ms(&delays[1])), "{delays:?}");
        assert!((400..=500).contains(&ms(&delays[2])), "{delays:?}");
        assert!(delays[3..].iter().all(|d| ms(d) == 700), "{delays:?}");
        b.reset();
        assert!(ms(&b.next_delay()) <= 125);
    }
}
