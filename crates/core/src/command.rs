//! What the core asks the driver to do: the [`Command`] enum.
//!
//! Commands are returned in the order the driver must execute them; for
//! one step, [`Command::StepUnsupported`] precedes the
//! [`Command::BuildFinished`] it causes. The core has already updated its
//! own state when it returns a command: the driver executes, it does not
//! confirm.

use crate::types::{BuildId, DrvPath, MachineId, Millis, Status};

#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// Send the step to the machine. `build` is the build the attempt is
    /// recorded under (`BuildSteps.build`): the build whose top-level step
    /// this is if there is one, else the oldest build needing it. `attempt`
    /// counts from 1.
    Dispatch {
        drv_path: DrvPath,
        machine: MachineId,
        build: BuildId,
        attempt: u32,
    },
    /// A claimed step ([`crate::Event::StepClaimed`]) is now running on
    /// `machine`, in the attempt its agent already runs: send nothing.
    Adopt {
        drv_path: DrvPath,
        machine: MachineId,
        build: BuildId,
    },
    /// A claim could not be honoured (the machine is gone or full, or the
    /// step is not runnable): stop the agent's attempt; the step is
    /// scheduled as usual.
    AdoptionRefused {
        drv_path: DrvPath,
        machine: MachineId,
    },
    /// Stop building the step: no unfinished build needs it any more. Its
    /// slot is already free in the core; a later `StepFinished` for it is
    /// rejected.
    CancelStep {
        drv_path: DrvPath,
        machine: MachineId,
        build: BuildId,
    },
    /// Every dependency of the step is built, and its derivation needs
    /// resolving: resolve it and answer with [`crate::Event::StepResolved`].
    /// `build` is the build to record the resolution under (a
    /// `BuildSteps` row with status 13).
    Resolve { drv_path: DrvPath, build: BuildId },
    /// An attempt failed in a way worth retrying (or its machine went
    /// away); the step will be runnable again at `not_before`. `build` is
    /// the build the failed attempt was recorded under.
    StepRequeued {
        drv_path: DrvPath,
        machine: MachineId,
        build: BuildId,
        tries: u32,
        not_before: Millis,
    },
    /// No connected machine could build the step for the whole grace
    /// period. Record a `BuildSteps` row with status 9 for each of `builds`
    /// (the head build of the following `BuildFinished` first); the
    /// `BuildFinished` for them follows.
    StepUnsupported {
        drv_path: DrvPath,
        builds: Vec<BuildId>,
    },
    /// Builds finished together; see [`BuildFinished`].
    BuildFinished(BuildFinished),
    /// An event made no sense in the current state and was ignored.
    EventRejected(EventError),
}

/// One or more builds finished because of one step (or because their
/// outputs were already valid). Notify `build_finished` with `build` as the
/// head and the ids of `dependents` after it.
#[derive(Clone, Debug, PartialEq)]
pub struct BuildFinished {
    /// The head build: for a failure, the build the failed attempt was
    /// recorded under (`BuildSteps.propagatedFrom` of the others).
    pub build: BuildId,
    pub status: Status,
    /// `isCachedBuild`: nothing was built for this build by this run.
    pub cached: bool,
    /// The step whose failure finished these builds; `None` on success.
    pub failed_step: Option<DrvPath>,
    /// The other builds that finished with the head, by increasing id. For
    /// a failure: record a `BuildSteps` row for `failed_step` with
    /// `propagatedFrom = build` for each of them.
    pub dependents: Vec<DependentBuild>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DependentBuild {
    pub build: BuildId,
    /// `DepFailed` for builds whose top-level step is not the failed step
    /// when it failed with `Failed`; the step's own status otherwise.
    pub status: Status,
}

/// Why an event was ignored. Variants are what a driver may branch on:
/// a race it expected, or a misbehaving builder.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("queueing build {0}: the build is already queued")]
    BuildAlreadyQueued(BuildId),
    #[error("queueing build {build}: derivation {drv_path} is on a dependency cycle; the build is aborted")]
    DependencyCycle { build: BuildId, drv_path: DrvPath },
    #[error("updating build {0}: no such unfinished build")]
    UnknownBuild(BuildId),
    #[error("{0}: no such connected machine")]
    UnknownMachine(MachineId),
    #[error("resolving step {drv_path}: the step is not being resolved")]
    StepNotResolving { drv_path: DrvPath },
    #[error("finishing step {drv_path} on {machine}: the step is not running there")]
    StepNotRunning {
        drv_path: DrvPath,
        machine: MachineId,
    },
}
