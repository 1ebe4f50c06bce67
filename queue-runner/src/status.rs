//! What `/status`, `/status/machines` and `/metrics` show: a snapshot the
//! driver publishes after each batch of events, so the HTTP server never
//! touches the driver's state.

use sluice_core::Stats;

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
    pub machines: Vec<MachineStatus>,
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
    pub steps_done: u64,
    pub avg_step_build_ms: u64,
    /// The agent is draining: it finishes its steps and takes no new ones.
    pub draining: bool,
    /// Why it gets no new steps for now (pressure, disk), if it does not.
    pub paused: Option<String>,
    /// Its slots: (NUMA node, CPU list).
    pub slots: Vec<(u32, String)>,
}
