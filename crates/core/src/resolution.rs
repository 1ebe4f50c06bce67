//! Steps whose derivations must be resolved before they are built: a
//! content-addressed derivation with input derivations, or one whose
//! outputs are deferred because an input is content-addressed.
//!
//! Once every dependency of such a step is built, the core asks the driver
//! to resolve it ([`Command::Resolve`]) instead of queueing it. The driver
//! answers with [`Event::StepResolved`](crate::Event::StepResolved):
//! - a resolved derivation to build: the step of that derivation (shared if
//!   one exists, else new) becomes the step's one dependency, and the step
//!   waits for it, marked resolved; when it succeeds, so does the step, with
//!   its builds and dependents; when it fails, the step's builds fail with
//!   its status, as if the step itself had failed;
//! - its outputs are already valid (early cutoff): the step succeeds;
//! - it cannot be resolved: the step fails for good.
//!
//! Invariants: a step that needs resolution is never queued or dispatched;
//! a resolved step has exactly one dependency, never itself; the resolved
//! derivation's step inherits the resolved step's priority and critical
//! path like any dependency, while the resolved step itself expects no
//! time of its own (its resolved derivation's step does the work, with the
//! original's estimate unless the resolution brought one).

use std::sync::Arc;

use crate::command::{Command, EventError};
use crate::event::Resolution;
use crate::graph::{Phase, Step};
use crate::order::StepOrder;
use crate::types::DrvPath;
use crate::Core;

/// Whether `original` was resolved into `resolved`.
pub(crate) fn resolves_to(original: &Arc<Step>, resolved: &Arc<Step>) -> bool {
    let state = original.state.lock();
    state.resolved() && state.deps.iter().any(|d| Arc::ptr_eq(d, resolved))
}

impl<O: StepOrder> Core<O> {
    /// Asks the driver to resolve `step`, whose dependencies are all built.
    pub(crate) fn start_resolution(&mut self, step: &Arc<Step>) {
        let build = {
            let mut state = step.state.lock();
            debug_assert!(
                state.deps.is_empty(),
                "resolving a step with unfinished deps"
            );
            self.counts.leave(state.phase);
            state.phase = Phase::Resolving;
            self.counts.enter(state.phase);
            state
                .lowest_direct_build()
                .unwrap_or(state.priority.lowest_build)
        };
        self.out.push(Command::Resolve {
            drv_path: step.drv_path.clone(),
            build,
        });
    }

    pub(crate) fn step_resolved(&mut self, drv_path: &DrvPath, resolution: Resolution) {
        let Some(step) = self
            .lookup(drv_path.as_str())
            .filter(|s| s.state.lock().phase == Phase::Resolving)
        else {
            self.reject(EventError::StepNotResolving {
                drv_path: drv_path.clone(),
            });
            return;
        };
        match resolution {
            Resolution::Valid => self.step_succeeded(step),
            Resolution::Failed(failure) => self.fail_step(step, failure.status(), None, false),
            Resolution::Step(mut spec) => {
                let existing = self.lookup(spec.drv_path.as_str());
                if existing.as_ref().is_some_and(|e| Arc::ptr_eq(e, &step)) || spec.needs_resolution
                {
                    // A derivation cannot resolve to itself, nor to one that
                    // needs resolving again: the driver erred.
                    self.fail_step(step, crate::Status::Aborted, None, false);
                    return;
                }
                // The resolved derivation does the original's work: it
                // takes the original's estimate unless it has its own, and
                // the original expects no time of its own any more.
                let original_expected = step.state.lock().expected_ms;
                spec.expected_ms = spec.expected_ms.or(Some(original_expected));
                self.set_expected(&step, 0);
                let (resolved, is_new) = match existing {
                    Some(existing) => (existing, false),
                    None => {
                        let created = self.create_steps(&[&spec]);
                        self.critical_paths_of_new_steps(&created);
                        let Some(created) = created.into_iter().next() else {
                            return;
                        };
                        (created, true)
                    }
                };
                let priority = {
                    let mut state = step.state.lock();
                    self.counts.leave(state.phase);
                    state.phase = Phase::Waiting;
                    self.counts.enter(state.phase);
                    state.set_resolved(true);
                    state.deps = vec![resolved.clone()];
                    state.priority
                };
                if resolved.state.lock().add_rdep(Arc::downgrade(&step)) {
                    self.grown.push(Arc::downgrade(&resolved));
                }
                self.propagate_priority(resolved.clone(), priority);
                let path = step.state.lock().critical_path_ms;
                let raised = resolved.state.lock().expected_ms.saturating_add(path);
                self.raise_critical_paths(vec![(resolved.clone(), raised)]);
                let runnable = {
                    let state = resolved.state.lock();
                    is_new && state.deps.is_empty() && state.phase == Phase::Waiting
                };
                if runnable {
                    self.make_runnable(&resolved);
                }
            }
        }
    }
}
