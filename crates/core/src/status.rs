//! Read-only reports for `/status`, `/status/machines` and metrics.
//!
//! Invariant: reports are computed from counters and per-machine state in
//! O(machines + classes); they never walk the step graph.

use crate::order::StepOrder;
use crate::types::{BuildId, DrvPath, MachineId, Millis};
use crate::Core;

/// Counters of the whole core. Step counts by phase cover the steps held
/// now; the `_done`/`_failed` totals count since the core was created.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Steps waiting for a dependency.
    pub steps_waiting: usize,
    /// Steps queued for a machine (`nrStepsRunnable`).
    pub steps_runnable: usize,
    /// Steps waiting out a retry backoff.
    pub steps_retry_pending: usize,
    /// Steps on a machine (`nrStepsBuilding`).
    pub steps_building: usize,
    /// Steps whose derivations the driver is resolving.
    pub steps_resolving: usize,
    /// Steps built successfully (`nrStepsDone`).
    pub steps_done: u64,
    /// Steps failed for good on a machine.
    pub steps_failed: u64,
    /// Steps failed as unsupported.
    pub steps_unsupported: u64,
    /// Attempts that were retried.
    pub retries: u64,
    /// Assignments machines refused (queued again without costing a try).
    pub refusals: u64,
    /// Steps sent to machines (attempts).
    pub dispatches: u64,
    /// Unfinished builds held.
    pub builds_queued: usize,
    /// Builds finished by the core (`nrBuildsDone`); cancelled builds are
    /// not counted.
    pub builds_done: u64,
    pub builds_succeeded: u64,
    pub builds_failed: u64,
    pub machines_total: usize,
    /// Machines with at least one busy slot (`machinesInUse`).
    pub machines_in_use: usize,
    pub slots_total: u64,
    pub slots_busy: usize,
    /// Distinct (system, required features) queues.
    pub step_classes: usize,
}

/// One machine, for `/status/machines`.
#[derive(Clone, Debug, PartialEq)]
pub struct MachineStats {
    pub id: MachineId,
    pub name: String,
    pub systems: Vec<String>,
    pub supported_features: Vec<String>,
    pub mandatory_features: Vec<String>,
    pub max_jobs: u32,
    pub speed_factor: f32,
    /// Steps in its slots, with when each started.
    pub running: Vec<(DrvPath, Millis)>,
    pub has_capacity: bool,
    pub steps_done: u64,
    pub steps_failed: u64,
}

impl<O: StepOrder> Core<O> {
    pub fn stats(&self) -> Stats {
        let counts = &self.counts;
        Stats {
            steps_waiting: counts.waiting,
            steps_resolving: counts.resolving,
            steps_runnable: counts.runnable,
            steps_retry_pending: counts.delayed,
            steps_building: counts.running,
            steps_done: counts.steps_done,
            steps_failed: counts.steps_failed,
            steps_unsupported: counts.steps_unsupported,
            retries: counts.retries,
            refusals: counts.refusals,
            dispatches: counts.dispatches,
            builds_queued: self.builds.len(),
            builds_done: counts.builds_done,
            builds_succeeded: counts.builds_succeeded,
            builds_failed: counts.builds_failed,
            machines_total: self.machines.len(),
            machines_in_use: self
                .machines
                .values()
                .filter(|m| !m.running.is_empty())
                .count(),
            slots_total: self.machines.values().map(|m| u64::from(m.max_jobs)).sum(),
            slots_busy: self.machines.values().map(|m| m.running.len()).sum(),
            step_classes: self.classes.iter().count(),
        }
    }

    pub fn machines(&self) -> Vec<MachineStats> {
        let names = |names: &[std::sync::Arc<str>]| names.iter().map(|n| n.to_string()).collect();
        self.machines
            .values()
            .map(|m| MachineStats {
                id: m.id,
                name: m.name.clone(),
                systems: names(&m.systems),
                supported_features: names(&m.supported_features),
                mandatory_features: names(&m.mandatory_features),
                max_jobs: m.max_jobs,
                speed_factor: m.speed_factor,
                running: m
                    .running
                    .iter()
                    .map(|slot| (slot.drv_path.clone(), slot.since))
                    .collect(),
                has_capacity: m.has_free_slot(),
                steps_done: m.steps_done,
                steps_failed: m.steps_failed,
            })
            .collect()
    }

    /// How many steps have left the index since the core started
    /// (finished or freed). While it stays the same, every step the core
    /// held at some earlier point is still held: a copy of the held paths
    /// taken then is still true, short only of the steps added since.
    pub fn steps_unindexed(&self) -> u64 {
        self.index.removed()
    }

    /// Whether the core holds a live step for `drv_path`.
    pub fn has_step(&self, drv_path: &str) -> bool {
        self.lookup(drv_path).is_some()
    }

    /// Whether the step of `drv_path` waits for its resolution
    /// ([`crate::Command::Resolve`]).
    pub fn is_resolving(&self, drv_path: &str) -> bool {
        self.lookup(drv_path)
            .is_some_and(|s| s.state.lock().phase == crate::graph::Phase::Resolving)
    }

    /// The unfinished builds that need the step of `drv_path` (directly or
    /// through other steps), by increasing id; empty if there is no such
    /// step. Costs a walk over the step's dependents.
    pub fn builds_needing(&self, drv_path: &str) -> Vec<BuildId> {
        self.lookup(drv_path)
            .map(|step| {
                crate::outcome::dependent_builds(&step)
                    .into_keys()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Derivations the core holds a step for (a full scan of the index).
    pub fn step_count(&self) -> usize {
        self.index
            .entries()
            .filter(|step| step.strong_count() > 0)
            .count()
    }
}
