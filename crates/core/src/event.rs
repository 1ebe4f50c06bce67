//! Everything that can happen to the core: the closed [`Event`] enum and the
//! plain data it carries.
//!
//! Events are converted from database rows, store reads and gRPC messages by
//! the driver; nothing here knows those formats. Input that reaches the core
//! from a builder may be wrong or hostile: the core never panics on an event,
//! it answers a nonsensical one with [`crate::Command::EventRejected`].

use crate::types::{BuildId, DrvPath, JobsetId, MachineId, StepFailure};

/// One input to [`crate::Core::handle`].
#[derive(Clone, Debug)]
pub enum Event {
    /// A queued build and the derivations it needs built.
    ///
    /// Contract: `steps` holds every derivation of the build's closure whose
    /// outputs are not all valid in the store, and only those. An input
    /// derivation absent from `steps` counts as already built. So a build
    /// whose `top_drv` is absent from `steps` (and not already a step of
    /// another build) finishes at once as a cached success, and one that
    /// needs a step marked `known_failed` (and whose top is not already a
    /// step of another build) as a cached failure.
    BuildQueued {
        build: BuildSpec,
        steps: Vec<StepSpec>,
    },
    /// Several queued builds at once, as [`Event::BuildQueued`] each, in
    /// order: a build's `steps` may leave out the steps an earlier build
    /// of the batch brings. The same as queueing them one by one, but the
    /// critical paths of the new steps are computed once for the whole
    /// batch: one build at a time, each new build raises the region below
    /// it again, which at farm scale is most of the graph each time.
    BuildsQueued {
        builds: Vec<(BuildSpec, Vec<StepSpec>)>,
    },
    /// The build was cancelled in the database (`builds_cancelled`): forget
    /// it. Steps no other build needs are dropped; running ones are
    /// cancelled with [`crate::Command::CancelStep`].
    BuildCancelled { build: BuildId },
    /// The build's `globalPriority` changed (`builds_bumped`).
    BuildBumped {
        build: BuildId,
        global_priority: i32,
    },
    /// A builder connected. Reusing the id of a connected machine first
    /// disconnects the old one.
    MachineConnected(MachineSpec),
    /// A builder went away: its running steps are aborted (status 3) and
    /// retried like any infrastructure failure.
    MachineDisconnected { machine: MachineId },
    /// A builder's connection dropped but its agent may still be building:
    /// it keeps its running steps and gets no new ones until a
    /// `MachineConnected` with the same id reattaches it (keeping them) or
    /// a `MachineDisconnected` gives it up.
    MachineDetached { machine: MachineId },
    /// After a restart, `machine`'s agent reports it still runs an attempt
    /// at `drv_path`. When the step is (or becomes) runnable it is put in
    /// that machine's slot with [`crate::Command::Adopt`] rather than
    /// dispatched; if that cannot be, [`crate::Command::AdoptionRefused`].
    StepClaimed {
        drv_path: DrvPath,
        machine: MachineId,
    },
    /// The driver gives up on a claim that was not used yet.
    ClaimWithdrawn { drv_path: DrvPath },
    /// The driver resolved a step it was asked to with
    /// [`crate::Command::Resolve`].
    StepResolved {
        drv_path: DrvPath,
        resolution: Resolution,
    },
    /// A builder reports the end of an attempt at a step it was given with
    /// [`crate::Command::Dispatch`].
    StepFinished {
        drv_path: DrvPath,
        machine: MachineId,
        outcome: StepOutcome,
    },
    /// A jobset's scheduling shares (`Jobsets.schedulingShares`), when
    /// first seen and when `jobset_shares_changed` says they changed.
    JobsetShares { jobset: JobsetId, shares: u32 },
    /// Time passed. Retries whose backoff ended become runnable; steps that
    /// stayed unsupported for the grace period fail. Every event does this
    /// too; `Tick` is for when nothing else happens (see
    /// [`crate::Core::next_deadline`]).
    Tick,
}

/// A build as the evaluator queued it.
#[derive(Clone, Debug)]
pub struct BuildSpec {
    pub id: BuildId,
    /// Its build time counts against this jobset's scheduling shares.
    pub jobset: JobsetId,
    /// `Builds.globalPriority`.
    pub global_priority: i32,
    /// `Builds.priority`.
    pub priority: i32,
    /// `Builds.timestamp`: unix seconds when queued. The oldest build is
    /// found by id (ids grow with queue time, as in Hydra); the core does
    /// not use this yet.
    pub timestamp: i64,
    pub top_drv: DrvPath,
}

/// One derivation to build, as read from the store.
#[derive(Clone, Debug)]
pub struct StepSpec {
    pub drv_path: DrvPath,
    /// The derivation's `system`; `"builtin"` is built by any machine.
    pub system: String,
    /// `requiredSystemFeatures`.
    pub required_features: Vec<String>,
    /// The input derivations (all of them: those whose outputs are valid are
    /// simply absent from the event's `steps`).
    pub input_drvs: Vec<DrvPath>,
    /// An output is known to fail (in `FailedPaths`): a build that needs
    /// this step finishes at once as a cached failure, and nothing is
    /// dispatched for it.
    pub known_failed: bool,
    /// Its derivation must be resolved before it is built: some of its
    /// inputs' paths are known only once they are built (content-addressed
    /// inputs, or its own outputs are deferred). Once its dependencies are
    /// built the core asks for [`crate::Command::Resolve`] instead of
    /// dispatching it.
    pub needs_resolution: bool,
    /// How long the derivation is expected to take to build, in
    /// milliseconds (from the history of its builds); `None` when unknown,
    /// then [`crate::Config::expected_build_time`] is used. It feeds the
    /// critical path ([`crate::StepView::critical_path_ms`]). A derivation
    /// that already has a step keeps the estimate it was given first; a
    /// resolved derivation without one takes that of the step resolved
    /// into it.
    pub expected_ms: Option<u32>,
}

/// How a step's resolution came out.
#[derive(Clone, Debug)]
pub enum Resolution {
    /// Build this derivation (the resolved one, whose inputs are all plain
    /// paths) in its place; the step completes as that one does. A step
    /// that already exists for it is shared.
    Step(StepSpec),
    /// The resolved derivation's outputs are already valid: the step
    /// succeeds at once (early cutoff).
    Valid,
    /// It cannot be resolved: the step fails for good with `failure`.
    Failed(StepFailure),
}

/// A builder's capabilities.
#[derive(Clone, Debug)]
pub struct MachineSpec {
    pub id: MachineId,
    /// Host name, for `BuildSteps.machine` and `/status/machines`.
    pub name: String,
    pub systems: Vec<String>,
    pub supported_features: Vec<String>,
    /// Features a step must require to be sent here (implicitly supported).
    pub mandatory_features: Vec<String>,
    /// Number of slots: steps it builds at once.
    pub max_jobs: u32,
    /// Steps it takes ahead of its free slots (it holds them until a slot
    /// frees), so that a slot never waits a round trip for its next step.
    /// They are assigned only once every machine that can build them has
    /// its slots full.
    pub prefetch: u32,
    /// Faster machines are filled first.
    pub speed_factor: f32,
}

/// How an attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepOutcome {
    /// The outputs are now valid in the queue runner's store.
    Success,
    /// The attempt failed. With `can_retry` (infrastructure trouble), the
    /// step is tried again after a backoff until `Config::max_tries`.
    Failed {
        failure: StepFailure,
        can_retry: bool,
    },
    /// The machine would not take the assignment (it began to drain, or
    /// is full): the step is queued again at once, and the attempt costs
    /// no try and no backoff.
    Refused,
}
