//! [`Core`]: the scheduling state machine. One owner feeds it [`Event`]s
//! with the current time and executes the [`Command`]s it returns.
//!
//! Each call to [`Core::handle`] applies the event, then fires the timers
//! due by `now` (retry backoffs, unsupported grace periods), then runs one
//! dispatch pass over the machines that may have gained work (a slot freed,
//! a machine connected, a step of a class they build became runnable).
//! The event goes first so that a result that arrived by `now` counts
//! before a timer can cancel the step it is about.
//!
//! Invariants:
//! - time passed to `handle` never goes backwards; an earlier `now` is
//!   treated as the latest one seen;
//! - after `handle` returns, no machine has a free slot while a runnable
//!   step it can build is queued;
//! - a step is dispatched only once all its dependencies succeeded, and is
//!   in at most one slot at a time;
//! - a step's priority is exactly the join over the unfinished builds that
//!   need it (so the build a dispatch is recorded under is always
//!   unfinished);
//! - a step's critical path is exactly its expected time plus the largest
//!   critical path among the steps that need it (`critical_path.rs`), and
//!   a runnable step is queued under the key of its current state.
//!
//! The work is split by topic: `ingest.rs` adds builds, `critical_path.rs`
//! keeps critical paths, `dispatch.rs` moves steps through queues and
//! slots, `outcome.rs` handles results, cancellation and freeing,
//! `resolution.rs` puts resolved derivations in place of the steps that
//! need them, `status.rs` reports.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Weak};

use crate::command::{Command, EventError};
use crate::config::Config;
use crate::event::{Event, StepOutcome};
use crate::graph::{Build, Phase, Step};
use crate::index::StepIndex;
use crate::machine::Machine;
use crate::order::{HydraOrder, StepOrder};
use crate::queue::Classes;
use crate::shares::Shares;
use crate::types::{BuildId, DrvPath, MachineId, Millis, PathMap, Status};

/// The scheduling core. `O` decides which runnable step goes first.
pub struct Core<O: StepOrder = HydraOrder> {
    pub(crate) config: Config,
    pub(crate) order: O,
    pub(crate) now: Millis,
    /// Every live step by derivation path; entries of freed steps are
    /// removed when they are freed.
    pub(crate) index: StepIndex,
    /// Unfinished builds; the only strong owner of each [`Build`].
    pub(crate) builds: HashMap<BuildId, Arc<Build>>,
    pub(crate) classes: Classes<O::Key>,
    pub(crate) machines: BTreeMap<MachineId, Machine>,
    /// Steps waiting out a retry backoff, by (end of backoff, ticket).
    pub(crate) retries: BTreeMap<(Millis, u64), Weak<Step>>,
    /// Machines to consider in the next dispatch pass.
    pub(crate) dirty: Vec<MachineId>,
    pub(crate) last_ticket: u64,
    pub(crate) counts: Counts,
    /// Jobsets' scheduling shares and recent build time.
    pub(crate) shares: Shares,
    /// Steps reserved for the machine whose agent still runs an attempt
    /// at them (see `resume.rs`).
    pub(crate) claims: PathMap<DrvPath, MachineId>,
    /// Steps whose vector of dependents grew (so has spare capacity)
    /// since the last [`Core::trim_dependents`]; may repeat a step.
    pub(crate) grown: Vec<Weak<Step>>,
    pub(crate) out: Vec<Command>,
}

/// Counters behind [`crate::Stats`]. The per-phase counts cover live steps.
#[derive(Clone, Debug, Default)]
pub(crate) struct Counts {
    pub waiting: usize,
    pub runnable: usize,
    pub delayed: usize,
    pub running: usize,
    pub resolving: usize,
    pub steps_done: u64,
    pub steps_failed: u64,
    pub steps_unsupported: u64,
    pub retries: u64,
    pub refusals: u64,
    pub dispatches: u64,
    pub builds_done: u64,
    pub builds_succeeded: u64,
    pub builds_failed: u64,
}

impl Counts {
    fn slot(&mut self, phase: Phase) -> Option<&mut usize> {
        match phase {
            Phase::Waiting => Some(&mut self.waiting),
            Phase::Runnable { .. } => Some(&mut self.runnable),
            Phase::Delayed { .. } => Some(&mut self.delayed),
            Phase::Running { .. } => Some(&mut self.running),
            Phase::Resolving => Some(&mut self.resolving),
            Phase::Finished => None,
        }
    }

    /// A live step entered `phase`.
    pub fn enter(&mut self, phase: Phase) {
        if let Some(count) = self.slot(phase) {
            *count += 1;
        }
    }

    /// A step left `phase` (for another phase, or by being freed).
    pub fn leave(&mut self, phase: Phase) {
        if let Some(count) = self.slot(phase) {
            *count = count.saturating_sub(1);
        }
    }

    pub fn record_build_finished(&mut self, status: Status) {
        self.builds_done += 1;
        if status == Status::Success {
            self.builds_succeeded += 1;
        } else {
            self.builds_failed += 1;
        }
    }
}

impl Core<HydraOrder> {
    /// A core with Hydra's dispatch order.
    pub fn new(config: Config) -> Self {
        Core::with_order(config, HydraOrder)
    }
}

impl<O: StepOrder> Core<O> {
    pub fn with_order(config: Config, order: O) -> Self {
        Core {
            config,
            order,
            now: Millis::ZERO,
            index: StepIndex::default(),
            builds: HashMap::new(),
            classes: Classes::new(),
            machines: BTreeMap::new(),
            retries: BTreeMap::new(),
            dirty: Vec::new(),
            last_ticket: 0,
            counts: Counts::default(),
            shares: Shares::default(),
            claims: PathMap::default(),
            grown: Vec::new(),
            out: Vec::new(),
        }
    }

    /// Applies one event at time `now` and returns what the driver must do,
    /// in order.
    pub fn handle(&mut self, event: Event, now: Millis) -> Vec<Command> {
        self.now = self.now.max(now);
        self.shares.expire(self.now, self.config.share_window);
        match event {
            Event::BuildQueued { build, steps } => self.queue_builds(vec![(build, steps)]),
            Event::BuildsQueued { builds } => self.queue_builds(builds),
            Event::BuildCancelled { build } => self.cancel_build(build),
            Event::BuildBumped {
                build,
                global_priority,
            } => self.bump_build(build, global_priority),
            Event::MachineConnected(spec) => self.connect_machine(spec),
            Event::MachineDisconnected { machine } => {
                if !self.disconnect_machine(machine) {
                    self.reject(EventError::UnknownMachine(machine));
                }
            }
            Event::StepFinished {
                drv_path,
                machine,
                outcome,
            } => self.step_finished(&drv_path, machine, outcome),
            Event::MachineDetached { machine } => self.detach_machine(machine),
            Event::StepClaimed { drv_path, machine } => self.claim(drv_path, machine),
            Event::ClaimWithdrawn { drv_path } => self.withdraw_claim(&drv_path),
            Event::StepResolved {
                drv_path,
                resolution,
            } => self.step_resolved(&drv_path, resolution),
            Event::JobsetShares { jobset, shares } => self.shares.set(jobset, shares),
            Event::Tick => {}
        }
        self.fire_timers();
        self.dispatch();
        std::mem::take(&mut self.out)
    }

    /// When the core next needs a [`Event::Tick`] if nothing else happens:
    /// the end of the earliest retry backoff or unsupported grace period.
    pub fn next_deadline(&self) -> Option<Millis> {
        let retry = self.retries.keys().next().map(|(at, _)| *at);
        let unsupported = self
            .classes
            .iter()
            .filter_map(|(_, class)| class.unsupported_check)
            .min();
        match (retry, unsupported) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The latest time seen.
    pub fn now(&self) -> Millis {
        self.now
    }

    pub(crate) fn reject(&mut self, error: EventError) {
        self.out.push(Command::EventRejected(error));
    }

    pub(crate) fn next_ticket(&mut self) -> u64 {
        self.last_ticket += 1;
        self.last_ticket
    }

    /// Gives back the spare capacity of the vectors of dependents that grew
    /// since the last call, and drops their dead entries. Costs the length
    /// of those vectors: call it when a run of queued builds is complete
    /// (the driver does once a load has read every queued build), not per
    /// build, or the next dependent added to a popular step reallocates
    /// and scans its whole vector again. The core calls it itself once
    /// more steps grew than it holds, so the list stays bounded.
    pub fn trim_dependents(&mut self) {
        let grown: Vec<Arc<Step>> = std::mem::take(&mut self.grown)
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        let mut done: std::collections::HashSet<*const Step> =
            std::collections::HashSet::with_capacity(grown.len());
        for step in &grown {
            if done.insert(Arc::as_ptr(step)) {
                step.state.lock().trim_rdeps();
            }
        }
        self.index.sweep();
    }

    pub(crate) fn trim_dependents_if_due(&mut self) {
        if self.grown.len() > self.index.len().max(4096) {
            self.trim_dependents();
        }
    }

    /// The live step for a derivation, if the core holds one.
    pub(crate) fn lookup(&self, drv_path: &str) -> Option<Arc<Step>> {
        self.index.get(drv_path)
    }

    /// Removes `step`'s own index entry (not that of a newer step for the
    /// same derivation).
    pub(crate) fn unindex(&mut self, step: &Arc<Step>) {
        self.index.remove(step.drv_path.as_str(), Arc::as_ptr(step));
    }

    fn fire_timers(&mut self) {
        while let Some(entry) = self.retries.first_entry() {
            let (until, ticket) = *entry.key();
            if until > self.now {
                break;
            }
            let step = entry.remove();
            let Some(step) = step.upgrade() else { continue };
            let due = {
                let state = step.state.lock();
                matches!(state.phase, Phase::Delayed { .. }) && state.ticket == ticket
            };
            if due {
                self.make_runnable(&step);
            }
        }
        self.fail_unsupported_steps();
    }

    /// Charges the build time of an attempt for `build` that ran since
    /// `since` to the build's jobset.
    pub(crate) fn charge(&mut self, build: BuildId, since: Millis) {
        if let Some(jobset) = self.builds.get(&build).map(|b| b.jobset) {
            self.shares.charge(jobset, since, self.now);
        }
    }

    fn step_finished(&mut self, drv_path: &DrvPath, machine_id: MachineId, outcome: StepOutcome) {
        let Some(machine) = self.machines.get_mut(&machine_id) else {
            self.reject(EventError::UnknownMachine(machine_id));
            return;
        };
        let Some(slot) = machine.take_slot(drv_path.as_str()) else {
            self.reject(EventError::StepNotRunning {
                drv_path: drv_path.clone(),
                machine: machine_id,
            });
            return;
        };
        match outcome {
            StepOutcome::Success => machine.steps_done += 1,
            StepOutcome::Failed { .. } => machine.steps_failed += 1,
            StepOutcome::Refused => {}
        }
        if outcome != StepOutcome::Refused {
            self.charge(slot.build, slot.since);
        }
        self.mark_dirty(machine_id);
        // A slot whose step was freed is removed at once (see `release`), so
        // this only fails if that invariant is broken; then there is nothing
        // left to update.
        let Some(step) = slot.step.upgrade() else {
            return;
        };
        match outcome {
            StepOutcome::Success => self.step_succeeded(step),
            StepOutcome::Failed { failure, can_retry } => {
                self.attempt_failed(step, machine_id, slot.build, failure, can_retry)
            }
            StepOutcome::Refused => self.attempt_refused(step, machine_id),
        }
    }
}
