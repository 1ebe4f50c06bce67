//! The boundary between the gRPC service (which talks to builder agents)
//! and the driver (which owns the scheduling core).
//!
//! The gRPC layer converts protobuf messages into these plain types and
//! sends them to the driver as [`FromAgent`] values over one mpsc channel;
//! the driver answers each connected agent through the bounded
//! `mpsc::Sender<ToAgent>` it was handed in [`FromAgent::Connected`]. No
//! protobuf type crosses this boundary.
//!
//! Invariants: a [`MachineId`] names one agent (token and name) for the life
//! of the process, across its reconnections; an [`AttemptId`] names one attempt at one step
//! and is never reused, not even by a later run; every `Connected` is eventually followed by exactly
//! one `Disconnected` for the same machine.

use sluice_core::MachineId;
use tokio::sync::mpsc;

/// One attempt at building one step on one machine. Random, so it stays
/// unique across restarts of the queue runner; it is stored with its step
/// (`SluiceAttempts`) and is what the agent calls the step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AttemptId(pub uuid::Uuid);

impl AttemptId {
    /// A fresh id.
    pub fn new() -> AttemptId {
        AttemptId(uuid::Uuid::new_v4())
    }
}

impl Default for AttemptId {
    fn default() -> AttemptId {
        AttemptId::new()
    }
}

impl std::fmt::Display for AttemptId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "attempt {}", self.0.simple())
    }
}

/// What an agent announced when it registered.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentInfo {
    pub name: String,
    pub systems: Vec<String>,
    pub supported_features: Vec<String>,
    pub mandatory_features: Vec<String>,
    pub max_jobs: u32,
    /// Steps it takes ahead of its free slots (at most `max_jobs`).
    pub prefetch: u32,
    pub speed_factor: f32,
    pub total_mem_bytes: u64,
    /// It takes no new steps (it is stopping).
    pub draining: bool,
    /// The slots it pins steps to: (NUMA node, CPU list).
    pub slots: Vec<(u32, String)>,
    /// The machine's NUMA nodes: (node, CPU list).
    pub nodes: Vec<(u32, String)>,
}

/// Load figures from a heartbeat.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AgentLoad {
    /// Load averages over 1, 5 and 15 minutes.
    pub load: [f32; 3],
    pub mem_used_bytes: u64,
    /// Pressure stall information (the `some` lines).
    pub cpu_pressure: Pressure,
    pub memory_pressure: Pressure,
    pub io_pressure: Pressure,
    /// Free bytes where the agent's store is and where it builds (`None`:
    /// the agent could not read it).
    pub store_free_bytes: Option<u64>,
    pub build_dir_free_bytes: Option<u64>,
}

/// The share of time (percent) some task stalled on a resource, over 10,
/// 60 and 300 seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Pressure {
    pub avg10: f32,
    pub avg60: f32,
    pub avg300: f32,
}

/// Messages from the gRPC layer to the driver.
#[derive(Debug)]
pub enum FromAgent {
    /// An agent registered and opened its work stream.
    Connected {
        machine: MachineId,
        info: AgentInfo,
        commands: mpsc::Sender<ToAgent>,
        /// Attempts the agent still holds from earlier sessions.
        held: Vec<AttemptId>,
    },
    /// The session ended (stream closed, heartbeats stopped, or error).
    Disconnected {
        machine: MachineId,
    },
    Heartbeat {
        machine: MachineId,
        load: AgentLoad,
    },
    /// The agent stops taking steps (it is draining before it exits).
    Draining {
        machine: MachineId,
    },
    /// The attempt entered a busy phase (Hydra's `BuildSteps.busy` codes),
    /// holding the agent's pinned slot `slot` (an index into
    /// [`AgentInfo::slots`], unchecked) if it says so.
    Phase {
        machine: MachineId,
        attempt: AttemptId,
        busy: i32,
        slot: Option<u32>,
    },
    /// The attempt ended. For a success, every output in the report has
    /// already been uploaded, verified and imported into the queue
    /// runner's store by the gRPC layer.
    Finished {
        machine: MachineId,
        attempt: AttemptId,
        report: StepReport,
        /// Set to true once the result is committed; the agent is answered
        /// then. Dropped unset if the result is refused or never written.
        committed: tokio::sync::watch::Sender<bool>,
    },
}

/// Messages from the driver to one agent.
#[derive(Debug, Clone)]
pub enum ToAgent {
    Assign(Assignment),
    Cancel(AttemptId),
}

/// A store path with what an importing store needs to know about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathSummary {
    /// Full store path.
    pub path: String,
    /// `sha256:<nix-base32>`.
    pub nar_hash: String,
    pub nar_size: u64,
    pub references: Vec<String>,
    pub deriver: Option<String>,
    pub ca: Option<String>,
}

/// One step sent to an agent.
#[derive(Debug, Clone)]
pub struct Assignment {
    pub attempt: AttemptId,
    /// The derivation's store path, as it is named in the queue.
    pub drv_path: String,
    /// The basic derivation to build, as ATerm text: input derivations are
    /// already replaced by their output paths in `inputSrcs`.
    pub basic_drv: String,
    /// The closure of the build's inputs, in dependency order
    /// (references before referrers), when it has at most
    /// [`sluice_proto::MAX_INLINE_INPUTS`] paths. The agent fetches what
    /// it lacks.
    pub inputs: Vec<PathSummary>,
    /// Set, to the closure's size, when the closure is too large to go
    /// inline: `inputs` is empty, and the agent reads the closure with
    /// `InputClosure`, computed again from the basic derivation's input
    /// sources when it asks.
    pub streamed_inputs: Option<u64>,
    pub max_silent_time_s: u32,
    pub build_timeout_s: u32,
    pub max_log_bytes: u64,
    pub max_output_bytes: u64,
}

/// How an attempt ended, as the agent reported it (and the gRPC layer
/// checked it).
/// Whose fault a failed step is, as the agent classifies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Not said (an older agent): only status 3 counts as retryable.
    Unspecified,
    /// The step succeeded.
    None,
    /// The build's own fault: building it again gives the same result.
    Build,
    /// The machinery's fault: it may succeed elsewhere or later.
    Infrastructure,
    /// The agent never started the step: it costs no try.
    Refused,
}

impl StepReport {
    /// Whether the failure may go away when the step is tried again.
    pub fn is_retryable(&self) -> bool {
        match self.failure {
            FailureKind::Infrastructure | FailureKind::Refused => true,
            FailureKind::Build | FailureKind::None => false,
            FailureKind::Unspecified => self.status == 3,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// Hydra step status code: 0 succeeded, 1 failed, 3 aborted (retry),
    /// 7 timed out, 10 log limit, 11 output size limit, 12 not deterministic.
    pub status: i32,
    pub error_msg: String,
    pub times_built: u32,
    pub is_non_deterministic: bool,
    /// Unix seconds.
    pub start_time: i64,
    pub stop_time: i64,
    /// Output name → store path, for every output on success.
    pub outputs: Vec<(String, String)>,
    /// Milliseconds spent copying inputs and outputs.
    pub overhead_ms: u64,
    /// Whose fault a failure is, as the agent says.
    pub failure: FailureKind,
    /// The builder's exit status and the phases' timings, as the agent
    /// measured them; `None` when the queue runner made the report itself.
    pub run: Option<crate::db::results::StepRun>,
}
