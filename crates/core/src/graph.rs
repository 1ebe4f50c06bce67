//! The step graph: [`Step`]s and [`Build`]s, shaped by `Arc` and `Weak`.
//!
//! Ownership runs from builds down to the derivations they need: a build
//! holds an `Arc` to its top-level step, a step holds `Arc`s to its
//! *unfinished* dependencies, and everything else (reverse dependencies,
//! the index by derivation path, runnable queues, machine slots, retry
//! timers) holds `Weak`s. So a step lives exactly as long as some unfinished
//! build needs it, and dropping the last build that needs a sub-graph frees
//! it. The core releases steps through `Core::release` (in `core.rs`), which
//! walks the freed sub-graph iteratively to keep its own indexes and
//! counters in step; `Drop for Step` is iterative as well, so dropping a
//! long dependency chain never recurses deeply.
//!
//! Invariants kept by the core, checked by `Core::check_invariants` in
//! tests:
//! - a step is `Waiting` iff it has unfinished dependencies;
//! - a resolved step waits on exactly one dependency, the step of its
//!   resolved derivation, and is never runnable;
//! - `Step::state.priority` is the [`Priority::join`] over every unfinished
//!   build that needs the step;
//! - `Step::state.critical_path_ms` is the step's expected time plus the
//!   largest critical path among the steps that need it (see
//!   `critical_path.rs`);
//! - each step mutex is locked by one function at a time, never two step
//!   mutexes at once (the core is single-threaded; the mutex provides the
//!   interior mutability a shared `Arc` needs).

use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use crate::order::Priority;
use crate::queue::ClassId;
use crate::types::{BuildId, DrvPath, JobsetId, MachineId, Millis};

/// One derivation to build, shared by every build that needs it.
pub(crate) struct Step {
    pub drv_path: DrvPath,
    /// The (system, required features) queue this step belongs to.
    pub class: ClassId,
    pub state: Mutex<StepState>,
}

pub(crate) struct StepState {
    /// Unfinished dependencies; empty once runnable.
    pub deps: Vec<Arc<Step>>,
    /// Steps that need this one. May contain dead entries (pruned lazily).
    pub rdeps: Vec<Weak<Step>>,
    /// Builds whose top-level step this is. May contain dead entries.
    /// A boxed slice, not a `Vec`: most steps are no build's top, and the
    /// 8 bytes a `Vec` would add are the step's critical path.
    pub builds: Box<[Weak<Build>]>,
    pub priority: Priority,
    pub phase: Phase,
    /// Identifies the one live entry of this step in a runnable queue or in
    /// the retry timers; other entries for it are stale.
    pub ticket: u64,
    /// Failed attempts so far (saturating; tries are capped far lower).
    pub tries: u8,
    /// The machine of the last failed attempt (its id, 0 for none; 16
    /// bits beside `tries`, so a step does not grow, and a machine with a
    /// larger id is never avoided): a retry goes elsewhere when another
    /// machine is free.
    pub failed_on: u16,
    /// [`NEEDS_RESOLUTION`] and [`RESOLVED`], in the byte `tries` left
    /// free, so a step does not grow.
    flags: u8,
    /// How long this step is expected to take to build, in milliseconds
    /// (0 once resolved: its resolved derivation's step does the work).
    pub expected_ms: u32,
    /// The critical path: `expected_ms` plus the largest critical path of
    /// the steps that need this one (saturating). Kept exact by
    /// `critical_path.rs`.
    pub critical_path_ms: u32,
}

/// Its derivation has inputs whose paths are known only once built (see
/// [`crate::StepSpec::needs_resolution`]): once its dependencies are built
/// it is resolved, never dispatched. Set at creation.
const NEEDS_RESOLUTION: u8 = 1;
/// Resolved: its one dependency is the step of its resolved derivation,
/// and it completes as that step does.
const RESOLVED: u8 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Some dependency is unfinished.
    Waiting,
    /// In its class's runnable queue.
    Runnable { since: Millis },
    /// Waiting out a retry backoff.
    Delayed { until: Millis },
    /// Occupies a slot on `machine`, attempt recorded under `build`.
    Running { machine: MachineId, build: BuildId },
    /// Its dependencies are built and the driver is resolving it
    /// ([`crate::Command::Resolve`]).
    Resolving,
    /// Built or failed for good; no longer in the index.
    Finished,
}

impl Step {
    /// A waiting step; its critical path is its own expected time until
    /// steps that need it are added.
    pub fn new(drv_path: DrvPath, class: ClassId, deps: Vec<Arc<Step>>, expected_ms: u32) -> Step {
        Step {
            drv_path,
            class,
            state: Mutex::new(StepState {
                deps,
                rdeps: Vec::new(),
                builds: Box::default(),
                priority: Priority::NONE,
                phase: Phase::Waiting,
                ticket: 0,
                tries: 0,
                failed_on: 0,
                flags: 0,
                expected_ms,
                critical_path_ms: expected_ms,
            }),
        }
    }
}

impl StepState {
    pub fn needs_resolution(&self) -> bool {
        self.flags & NEEDS_RESOLUTION != 0
    }

    pub fn set_needs_resolution(&mut self, value: bool) {
        self.set_flag(NEEDS_RESOLUTION, value);
    }

    pub fn resolved(&self) -> bool {
        self.flags & RESOLVED != 0
    }

    pub fn set_resolved(&mut self, value: bool) {
        self.set_flag(RESOLVED, value);
    }

    fn set_flag(&mut self, flag: u8, value: bool) {
        if value {
            self.flags |= flag;
        } else {
            self.flags &= !flag;
        }
    }

    /// Adds a reverse dependency, dropping dead ones when the vector would
    /// grow, so the vector stays proportional to the live ones. Returns
    /// whether the vector grew (it has spare capacity then, which
    /// [`crate::Core::trim_dependents`] gives back later).
    pub fn add_rdep(&mut self, rdep: Weak<Step>) -> bool {
        let full = self.rdeps.len() == self.rdeps.capacity();
        if full {
            self.rdeps.retain(|r| r.strong_count() > 0);
        }
        let before = self.rdeps.capacity();
        self.rdeps.push(rdep);
        self.rdeps.capacity() != before
    }

    /// Drops dead reverse dependencies and gives back spare capacity.
    pub fn trim_rdeps(&mut self) {
        self.rdeps.retain(|r| r.strong_count() > 0);
        self.rdeps.shrink_to_fit();
    }

    /// Adds a build whose top-level step this is, dropping dead ones. Costs
    /// a copy of the live ones: a derivation is the top of few builds.
    pub fn add_build(&mut self, build: Weak<Build>) {
        let mut builds = std::mem::take(&mut self.builds).into_vec();
        builds.retain(|b| b.strong_count() > 0);
        builds.push(build);
        self.builds = builds.into_boxed_slice();
    }

    /// The lowest id among the live builds whose top-level step this is.
    pub fn lowest_direct_build(&self) -> Option<BuildId> {
        self.builds
            .iter()
            .filter_map(Weak::upgrade)
            .map(|b| b.id)
            .min()
    }
}

impl Drop for Step {
    /// Frees a chain of dependencies this step was the last owner of
    /// without recursion.
    fn drop(&mut self) {
        let mut orphans = std::mem::take(&mut self.state.get_mut().deps);
        while let Some(dep) = orphans.pop() {
            if let Some(mut dep) = Arc::into_inner(dep) {
                orphans.append(&mut dep.state.get_mut().deps);
            }
        }
    }
}

/// An unfinished build. Owned by the core's build table alone; steps refer
/// to it weakly.
pub(crate) struct Build {
    pub id: BuildId,
    pub jobset: JobsetId,
    pub local_priority: i32,
    pub top: Arc<Step>,
    global_priority: Mutex<i32>,
}

impl Build {
    pub fn new(
        id: BuildId,
        jobset: JobsetId,
        global_priority: i32,
        local_priority: i32,
        top: Arc<Step>,
    ) -> Build {
        Build {
            id,
            jobset,
            local_priority,
            top,
            global_priority: Mutex::new(global_priority),
        }
    }

    pub fn global_priority(&self) -> i32 {
        *self.global_priority.lock()
    }

    pub fn set_global_priority(&self, value: i32) {
        *self.global_priority.lock() = value;
    }

    pub fn priority(&self) -> Priority {
        Priority {
            global: self.global_priority(),
            local: self.local_priority,
            lowest_build: self.id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropping_a_long_chain_does_not_overflow_the_stack() {
        let mut head = Arc::new(Step::new(DrvPath::from("/0"), ClassId(0), Vec::new(), 0));
        for i in 1..200_000 {
            head = Arc::new(Step::new(
                DrvPath::from(format!("/{i}")),
                ClassId(0),
                vec![head],
                0,
            ));
        }
        let weak_tail = {
            let mut step = head.clone();
            loop {
                let next = step.state.lock().deps.first().cloned();
                match next {
                    Some(next) => step = next,
                    None => break Arc::downgrade(&step),
                }
            }
        };
        drop(head);
        assert!(weak_tail.upgrade().is_none(), "the whole chain was freed");
    }

    #[test]
    fn a_step_stays_small() {
        // 144 bytes on x86_64 today (plus 16 for the Arc counts); 270k
        // queued steps must fit in little memory.
        assert!(
            std::mem::size_of::<Step>() <= 144,
            "{}",
            std::mem::size_of::<Step>()
        );
    }
}
