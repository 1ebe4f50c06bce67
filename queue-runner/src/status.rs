//! What `/status`, `/status/machines`, `/metrics`, the dashboard and the
//! `SystemStatus` row show: a snapshot the driver publishes after each
//! batch of events, so none of them ever touches the driver's state.
//!
//! Invariant: a snapshot's size grows with the machines and the attempts
//! in progress, never with the queue.

use sluice_core::{DrvPath, Stats};

use crate::agents::AgentLoad;

#[derive(Debug, Clone, Default)]
pub struct StatusSnapshot {
    pub started_unix: i64,
    pub uptime_s: u64,
    pub core: Stats,
    pub builds_queued: usize,
    pub queue_wakeups: u64,
    pub dispatcher_wakeups: u64,
    pub dispatch_time_ms: u64,
    pub builds_done: u64,
    pub steps_done: u64,
    /// Builds handed to the scheduler by loads (`nrBuildsRead`).
    pub builds_read: u64,
    /// The most failed tries a step had when it was queued again
    /// (`maxNrRetries`).
    pub max_tries: u32,
    /// Of the attempts that ran on a machine: milliseconds from dispatch
    /// to result, and building alone as their agents measured it.
    pub step_ms_total: u64,
    pub build_ms_total: u64,
    pub machines: Vec<MachineStatus>,
    /// Every attempt in progress (being prepared, sent, or adopted after
    /// a restart). Shared between snapshots and rebuilt at most every
    /// [`RUNNING_REFRESH`], so a busy driver does not copy a thousand
    /// attempts per batch of events; a snapshot's list is at most that
    /// old.
    pub running: std::sync::Arc<Vec<RunningStep>>,
    /// Since when (unix seconds) writes to the database have been failing.
    pub database_down_since: Option<i64>,
    /// Writes queued and not yet committed.
    pub pending_writes: usize,
    /// Binary cache uploads; `None` without a cache.
    pub uploads: Option<UploadStatus>,
}

/// What `/status` shows of the binary cache uploads.
#[derive(Debug, Clone, Default)]
pub struct UploadStatus {
    /// Uploads not done yet (waiting, running, or waiting to retry).
    pub pending: usize,
    /// Successful builds not written finished until their upload is done.
    pub builds_waiting: usize,
    /// When (unix seconds) the oldest pending upload was asked for.
    pub oldest_pending_since: Option<i64>,
    /// Uploads done, and store paths they uploaded (the rest were there).
    pub done: u64,
    pub paths_uploaded: u64,
    /// Failed tries (each is tried again), and the last one's error.
    pub failures: u64,
    pub last_error: Option<String>,
    pub logs_uploaded: u64,
    /// Build logs given up on.
    pub logs_failed: u64,
}

#[derive(Debug, Clone, Default)]
pub struct MachineStatus {
    pub id: u64,
    pub hostname: String,
    pub systems: Vec<String>,
    pub max_jobs: u32,
    pub speed_factor: f32,
    pub supported_features: Vec<String>,
    pub mandatory_features: Vec<String>,
    pub running: usize,
    pub total_mem: u64,
    pub load: AgentLoad,
    /// Attempts that ran here and ended, and their milliseconds from
    /// dispatch to result and building alone.
    pub steps_done: u64,
    pub step_ms_total: u64,
    pub build_ms_total: u64,
    /// Since when (unix seconds) none of its slots is taken.
    pub idle_since: i64,
    /// When (unix seconds; 0: never) an attempt here last failed for the
    /// machinery's reasons, and how many did in a row.
    pub last_failure: i64,
    pub consecutive_failures: u64,
    /// Its last heartbeat or connection (unix seconds).
    pub last_heard_unix: i64,
    /// It has a session now; a machine without one is kept while it
    /// holds attempts (its lease).
    pub connected: bool,
    /// The agent is draining: it finishes its steps and takes no new ones.
    pub draining: bool,
    /// Why it gets no new steps for now (pressure, disk), if it does not.
    pub paused: Option<String>,
    /// Its slots: (NUMA node, CPU list).
    pub slots: Vec<(u32, String)>,
    /// Its machine's NUMA nodes: (node, CPU list).
    pub nodes: Vec<(u32, String)>,
}

/// How old the list of attempts in a snapshot may be.
pub const RUNNING_REFRESH: std::time::Duration = std::time::Duration::from_millis(250);

/// One attempt in progress.
#[derive(Debug, Clone)]
pub struct RunningStep {
    /// [`MachineStatus::id`] of its machine.
    pub machine: u64,
    pub build: i32,
    /// `None` while its `BuildSteps` row is being created.
    pub stepnr: Option<i32>,
    pub drv_path: DrvPath,
    /// When it was dispatched (unix seconds, our clock).
    pub started_unix: i64,
    /// Its phase as last reported (Hydra's `BuildSteps.busy` code; 0:
    /// not reported since it was adopted after a restart).
    pub busy: i32,
    /// The machine's pinned slot it holds (an index into
    /// [`MachineStatus::slots`]), if its agent said so.
    pub slot: Option<u32>,
}

/// How the web UI names a `BuildSteps.busy` phase.
pub fn phase_name(busy: i32) -> &'static str {
    match busy {
        0 => "running",
        1 => "preparing",
        10 => "connecting",
        20 => "sending inputs",
        30 => "building",
        35 => "waiting for a local slot",
        40 => "receiving outputs",
        50 => "post-processing",
        _ => "busy",
    }
}
