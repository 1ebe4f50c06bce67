//! What happens when a step ends (success, retry, final failure,
//! unsupported), when a build is cancelled or bumped, and how freed steps
//! leave the core.
//!
//! Hydra's failure semantics (from its queue runner's `fail_step`): every
//! unfinished build that needs the failed step finishes with it; a build
//! whose top-level derivation is not the failed one gets `DepFailed` when
//! the step `Failed`, and the step's own status otherwise (timeouts,
//! aborts and unsupported steps propagate as they are). A build whose
//! top-level step was resolved into the failed one counts as its own:
//! it gets the step's status. The head of the group is the build the
//! failed attempt was recorded under.
//!
//! Invariant: steps leave the core only through [`Core::release`], which
//! keeps the index, the per-phase counters and the machine slots in step
//! with the graph; after builds are removed, [`Core::recompute_priorities`]
//! restores exact priorities on the steps that survived, and
//! [`Core::lower_critical_paths`] exact critical paths.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Weak};

use crate::command::{BuildFinished, Command, DependentBuild, EventError};
use crate::graph::{Build, Phase, Step};
use crate::order::{Priority, StepOrder};
use crate::types::{BuildId, MachineId, Status, StepFailure};
use crate::Core;

impl<O: StepOrder> Core<O> {
    /// The step's outputs are valid: finish the builds it was the top of
    /// and wake the steps that waited for it.
    pub(crate) fn step_succeeded(&mut self, step: Arc<Step>) {
        let (rdeps, builds) = {
            let mut state = step.state.lock();
            self.counts.leave(state.phase);
            state.phase = Phase::Finished;
            (
                std::mem::take(&mut state.rdeps),
                std::mem::take(&mut state.builds),
            )
        };
        self.counts.steps_done += 1;
        self.unindex(&step);

        let mut finished: Vec<Arc<Build>> = builds.iter().filter_map(Weak::upgrade).collect();
        finished.sort_by_key(|b| b.id);
        let mut survivors = Vec::new();
        for build in finished {
            self.builds.remove(&build.id);
            self.counts.record_build_finished(Status::Success);
            self.out.push(Command::BuildFinished(BuildFinished {
                build: build.id,
                status: Status::Success,
                cached: false,
                failed_step: None,
                dependents: Vec::new(),
            }));
            self.forget_build(build, &mut survivors);
        }

        let mut completed = Vec::new();
        for parent in rdeps.iter().filter_map(Weak::upgrade) {
            let (now_runnable, resolved) = {
                let mut state = parent.state.lock();
                state.deps.retain(|dep| !Arc::ptr_eq(dep, &step));
                (
                    state.deps.is_empty() && state.phase == Phase::Waiting,
                    state.resolved(),
                )
            };
            if now_runnable && resolved {
                // Its resolved derivation is built: so is it.
                completed.push(parent);
            } else if now_runnable {
                self.make_runnable(&parent);
            }
        }
        // The builds that finished needed nothing but this step, so no
        // other step's priority changed; `survivors` holds at most `step`.
        // No critical path changed either: those of steps above never
        // depend on those below.
        survivors.clear();
        self.release(step, &mut survivors);
        for original in completed {
            self.step_succeeded(original);
        }
    }

    /// An attempt failed: retry after a backoff if the failure allows it
    /// and tries remain, else fail the step for good.
    pub(crate) fn attempt_failed(
        &mut self,
        step: Arc<Step>,
        machine: MachineId,
        build: BuildId,
        failure: StepFailure,
        can_retry: bool,
    ) {
        let tries = {
            let mut state = step.state.lock();
            state.tries = state.tries.saturating_add(1);
            state.failed_on = u16::try_from(machine.0).unwrap_or(0);
            u32::from(state.tries)
        };
        if !can_retry || tries >= self.config.max_tries {
            self.fail_step(step, failure.status(), Some(build), false);
            return;
        }
        let not_before = self.now.saturating_add(self.config.retry_delay(tries));
        self.counts.retries += 1;
        self.out.push(Command::StepRequeued {
            drv_path: step.drv_path.clone(),
            machine,
            build,
            tries,
            not_before,
        });
        if not_before <= self.now {
            self.make_runnable(&step);
            return;
        }
        let ticket = self.next_ticket();
        {
            let mut state = step.state.lock();
            self.counts.leave(state.phase);
            state.phase = Phase::Delayed { until: not_before };
            self.counts.enter(state.phase);
            state.ticket = ticket;
        }
        self.retries
            .insert((not_before, ticket), Arc::downgrade(&step));
    }

    /// The machine would not take the step: it is runnable again at once,
    /// with its tries unchanged. It goes to another machine if one is free
    /// for it (as a retry does).
    pub(crate) fn attempt_refused(&mut self, step: Arc<Step>, machine: MachineId) {
        step.state.lock().failed_on = u16::try_from(machine.0).unwrap_or(0);
        self.counts.refusals += 1;
        self.make_runnable(&step);
    }

    /// Fails `step` for good with `status` and finishes every build that
    /// needs it. `head` is the build the failed attempt was recorded under.
    pub(crate) fn fail_step(
        &mut self,
        step: Arc<Step>,
        status: Status,
        head: Option<BuildId>,
        unsupported: bool,
    ) {
        {
            let mut state = step.state.lock();
            self.counts.leave(state.phase);
            state.phase = Phase::Finished;
        }
        self.unindex(&step);
        if unsupported {
            self.counts.steps_unsupported += 1;
        } else {
            self.counts.steps_failed += 1;
        }

        let builds = dependent_builds(&step);
        let direct_head = step.state.lock().lowest_direct_build();
        let head = head
            .filter(|id| builds.contains_key(id))
            .or(direct_head)
            .or_else(|| builds.keys().next().copied());
        let status_of = |build: &Build| {
            if status == Status::Failed
                && build.top.drv_path != step.drv_path
                && !crate::resolution::resolves_to(&build.top, &step)
            {
                Status::DepFailed
            } else {
                status
            }
        };
        if let Some(head) = head {
            let mut dependents = Vec::new();
            let mut head_status = status;
            for (&id, build) in &builds {
                if id == head {
                    head_status = status_of(build);
                } else {
                    dependents.push(DependentBuild {
                        build: id,
                        status: status_of(build),
                    });
                }
            }
            if unsupported {
                let mut ids = vec![head];
                ids.extend(dependents.iter().map(|d| d.build));
                self.out.push(Command::StepUnsupported {
                    drv_path: step.drv_path.clone(),
                    builds: ids,
                });
            }
            self.counts.record_build_finished(head_status);
            for dependent in &dependents {
                self.counts.record_build_finished(dependent.status);
            }
            self.out.push(Command::BuildFinished(BuildFinished {
                build: head,
                status: head_status,
                cached: false,
                failed_step: Some(step.drv_path.clone()),
                dependents,
            }));
        }

        let mut survivors = Vec::new();
        for (id, build) in builds {
            self.builds.remove(&id);
            self.forget_build(build, &mut survivors);
        }
        self.release(step, &mut survivors);
        self.lower_critical_paths(&survivors);
        self.recompute_priorities(survivors);
    }

    /// Fails the runnable steps of classes no machine could build for the
    /// whole grace period.
    pub(crate) fn fail_unsupported_steps(&mut self) {
        let now = self.now;
        let grace = self.config.max_unsupported_time;
        let due: Vec<_> = self
            .classes
            .iter()
            .filter(|(_, class)| class.unsupported_check.is_some_and(|at| at <= now))
            .map(|(id, _)| id)
            .collect();
        for class_id in due {
            let class = self.classes.get_mut(class_id);
            let Some(class_since) = class
                .unsupported_since
                .filter(|_| class.machines.is_empty())
            else {
                class.unsupported_check = None;
                continue;
            };
            let mut next_check = None;
            let doomed = class.drain_live_where(|step| {
                let Phase::Runnable { since } = step.state.lock().phase else {
                    return false;
                };
                let deadline = since.max(class_since).saturating_add(grace);
                if deadline <= now {
                    return true;
                }
                next_check =
                    Some(next_check.map_or(deadline, |at: crate::Millis| at.min(deadline)));
                false
            });
            class.unsupported_check = next_check;
            for step in doomed {
                self.fail_step(step, Status::Unsupported, None, true);
            }
        }
    }

    pub(crate) fn cancel_build(&mut self, id: BuildId) {
        let Some(build) = self.builds.remove(&id) else {
            self.reject(EventError::UnknownBuild(id));
            return;
        };
        let mut survivors = Vec::new();
        self.forget_build(build, &mut survivors);
        self.lower_critical_paths(&survivors);
        self.recompute_priorities(survivors);
    }

    pub(crate) fn bump_build(&mut self, id: BuildId, global_priority: i32) {
        let Some(build) = self.builds.get(&id) else {
            self.reject(EventError::UnknownBuild(id));
            return;
        };
        let old = build.global_priority();
        build.set_global_priority(global_priority);
        let (top, priority) = (build.top.clone(), build.priority());
        if global_priority >= old {
            self.propagate_priority(top, priority);
        } else {
            self.recompute_priorities(vec![Arc::downgrade(&top)]);
        }
    }

    /// Drops a build already removed from the build table, releasing its
    /// top-level step.
    pub(crate) fn forget_build(&mut self, build: Arc<Build>, survivors: &mut Vec<Weak<Step>>) {
        match Arc::into_inner(build) {
            Some(build) => self.release(build.top, survivors),
            None => debug_assert!(false, "a build is owned by the build table alone"),
        }
    }

    /// Drops one strong reference to `step`. If it was the last, the step
    /// and every dependency only it kept alive are freed: their index
    /// entries go, running ones are cancelled, counters are updated. Steps
    /// that stay alive are pushed to `survivors`.
    pub(crate) fn release(&mut self, step: Arc<Step>, survivors: &mut Vec<Weak<Step>>) {
        let mut pending = vec![step];
        while let Some(step) = pending.pop() {
            let weak = Arc::downgrade(&step);
            let Some(mut step) = Arc::into_inner(step) else {
                survivors.push(weak);
                continue;
            };
            // Its entry, if it was still indexed (a finished step is not).
            self.index.remove(step.drv_path.as_str(), weak.as_ptr());
            let state = step.state.get_mut();
            self.counts.leave(state.phase);
            match state.phase {
                Phase::Runnable { .. } => self.classes.get_mut(step.class).mark_stale(),
                Phase::Running { machine, build } => {
                    // No cancel for a machine that is gone (we may be in the
                    // middle of handling its disconnection).
                    let had_slot = self
                        .machines
                        .get_mut(&machine)
                        .and_then(|m| m.take_slot(step.drv_path.as_str()))
                        .is_some();
                    if had_slot {
                        self.out.push(Command::CancelStep {
                            drv_path: step.drv_path.clone(),
                            machine,
                            build,
                        });
                        self.mark_dirty(machine);
                    }
                }
                Phase::Waiting | Phase::Delayed { .. } | Phase::Resolving | Phase::Finished => {}
            }
            pending.append(&mut state.deps);
        }
    }

    /// Restores exact priorities after builds stopped needing `roots` (the
    /// steps that lost a build or a parent): recomputes each root from the
    /// builds and parents that still need it, and, only where a priority
    /// changed, its dependencies in turn. A step may be recomputed more than
    /// once, but always after its parents' last change, so the result is the
    /// exact join; the cost is the reverse dependencies of the steps
    /// examined, and stops where nothing changes.
    pub(crate) fn recompute_priorities(&mut self, roots: Vec<Weak<Step>>) {
        let mut pending: Vec<Arc<Step>> = roots.iter().filter_map(Weak::upgrade).collect();
        while let Some(step) = pending.pop() {
            let (builds, parents): (Vec<_>, Vec<_>) = {
                let state = step.state.lock();
                (
                    state.builds.iter().filter_map(Weak::upgrade).collect(),
                    state.rdeps.iter().filter_map(Weak::upgrade).collect(),
                )
            };
            let mut priority = Priority::NONE;
            for build in &builds {
                priority = priority.join(build.priority());
            }
            for parent in &parents {
                priority = priority.join(parent.state.lock().priority);
            }
            let requeue = {
                let mut state = step.state.lock();
                if state.priority == priority {
                    continue;
                }
                state.priority = priority;
                pending.extend(state.deps.iter().cloned());
                matches!(state.phase, Phase::Runnable { .. })
            };
            if requeue {
                self.requeue(&step);
            }
        }
    }
}

/// Every unfinished build that needs `step`, directly or through other
/// steps, by id.
pub(crate) fn dependent_builds(step: &Arc<Step>) -> BTreeMap<BuildId, Arc<Build>> {
    let mut builds = BTreeMap::new();
    let mut seen: HashSet<*const Step> = HashSet::from([Arc::as_ptr(step)]);
    let mut pending = vec![step.clone()];
    while let Some(step) = pending.pop() {
        let state = step.state.lock();
        for build in state.builds.iter().filter_map(Weak::upgrade) {
            builds.insert(build.id, build);
        }
        for parent in state.rdeps.iter().filter_map(Weak::upgrade) {
            if seen.insert(Arc::as_ptr(&parent)) {
                pending.push(parent);
            }
        }
    }
    builds
}
