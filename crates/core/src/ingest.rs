//! Attaching a queued build and its derivation closure to the step graph.
//!
//! A derivation that already has a live step is shared, never duplicated:
//! a second build needing it adds a reference, and the step's priority
//! becomes the join of both builds'. New steps are created dependencies
//! first, so every step is created with all its unfinished dependencies in
//! place. Priorities are propagated from the build's top-level step
//! downwards, stopping where nothing changes; that is exact because a
//! dependency's priority always covers each of its parents'. Critical
//! paths are computed for the new steps, dependents first, and raised
//! below them (`critical_path.rs`) before any new step is queued.
//!
//! Invariant: the graph is only modified once the closure is known to be
//! acyclic; a cyclic closure (which Nix cannot produce) aborts the build
//! without touching the graph.

use std::sync::Arc;

use crate::command::{BuildFinished, Command, EventError};
use crate::event::{BuildSpec, StepSpec};
use crate::graph::{Build, Phase, Step};
use crate::order::{Priority, StepOrder};
use crate::types::{DrvPath, PathMap, Status};
use crate::Core;

impl<O: StepOrder> Core<O> {
    /// Queues `builds` in order; then computes the critical paths of all
    /// the steps they created at once, and only then queues the runnable
    /// ones (their keys depend on those paths).
    pub(crate) fn queue_builds(&mut self, builds: Vec<(BuildSpec, Vec<StepSpec>)>) {
        let (specs, steps): (Vec<BuildSpec>, Vec<Vec<StepSpec>>) = builds.into_iter().unzip();
        // Every step of the batch, whichever build brought it.
        let mut by_path: PathMap<&str, &StepSpec> = PathMap::default();
        for step in steps.iter().flatten() {
            by_path.entry(step.drv_path.as_str()).or_insert(step);
        }
        let mut created = Vec::new();
        for spec in specs {
            self.attach_build(spec, &by_path, &mut created);
        }
        self.critical_paths_of_new_steps(&created);
        self.trim_dependents_if_due();
        for step in created {
            let runnable = {
                let state = step.state.lock();
                state.deps.is_empty() && state.phase == Phase::Waiting
            };
            if runnable {
                self.make_runnable(&step);
            }
        }
    }

    /// Attaches one build to the graph, appending the steps it creates to
    /// `created` (dependencies first), which the caller gives critical
    /// paths and queues.
    fn attach_build(
        &mut self,
        spec: BuildSpec,
        by_path: &PathMap<&str, &StepSpec>,
        created: &mut Vec<Arc<Step>>,
    ) {
        if self.builds.contains_key(&spec.id) {
            self.reject(EventError::BuildAlreadyQueued(spec.id));
            return;
        }
        let (top, new_steps) = match self.lookup(spec.top_drv.as_str()) {
            Some(top) => (top, Vec::new()),
            None => {
                if !by_path.contains_key(spec.top_drv.as_str()) {
                    self.finish_without_steps(&spec, Status::Success, true);
                    return;
                }
                match creation_order(&spec.top_drv, by_path, |drv| self.lookup(drv).is_some()) {
                    Ok(order) => {
                        if let Some(failed) = known_failure(&spec.top_drv, &order) {
                            let failed = failed.clone();
                            self.finish_cached_failure(&spec, &failed);
                            return;
                        }
                        let created = self.create_steps(&order);
                        // The top is always last in `order`, so this
                        // `else` is unreachable; finish rather than panic.
                        let Some(top) = created.last().cloned() else {
                            self.finish_without_steps(&spec, Status::Success, true);
                            return;
                        };
                        (top, created)
                    }
                    Err(drv_path) => {
                        self.reject(EventError::DependencyCycle {
                            build: spec.id,
                            drv_path,
                        });
                        self.finish_without_steps(&spec, Status::Aborted, false);
                        return;
                    }
                }
            }
        };
        let build = Arc::new(Build::new(
            spec.id,
            spec.jobset,
            spec.global_priority,
            spec.priority,
            top.clone(),
        ));
        top.state.lock().add_build(Arc::downgrade(&build));
        let priority = build.priority();
        self.builds.insert(spec.id, build);
        self.propagate_priority(top, priority);
        created.extend(new_steps);
    }

    /// A build that needs no step: cached (outputs valid) or aborted.
    fn finish_without_steps(&mut self, spec: &BuildSpec, status: Status, cached: bool) {
        self.counts.record_build_finished(status);
        self.out.push(Command::BuildFinished(BuildFinished {
            build: spec.id,
            status,
            cached,
            failed_step: None,
            dependents: Vec::new(),
        }));
    }

    /// A build that needs a step known to fail: it finishes at once, with
    /// `Failed` if that step is its top and `DepFailed` otherwise, cached,
    /// and the graph untouched.
    fn finish_cached_failure(&mut self, spec: &BuildSpec, failed: &DrvPath) {
        let status = if *failed == spec.top_drv {
            Status::Failed
        } else {
            Status::DepFailed
        };
        self.counts.record_build_finished(status);
        self.out.push(Command::BuildFinished(BuildFinished {
            build: spec.id,
            status,
            cached: true,
            failed_step: Some(failed.clone()),
            dependents: Vec::new(),
        }));
    }

    /// Creates the steps of `order` (dependencies first), the top-level
    /// step last. Only the top's future build will own the new steps: the
    /// caller must attach the top to a build before dropping the result,
    /// and give them their critical paths
    /// ([`Core::critical_paths_of_new_steps`]) before queueing them.
    pub(crate) fn create_steps(&mut self, order: &[&StepSpec]) -> Vec<Arc<Step>> {
        let mut created: Vec<Arc<Step>> = Vec::with_capacity(order.len());
        for spec in order {
            let (class, is_new) =
                self.classes
                    .intern(&spec.system, &spec.required_features, self.now);
            if is_new {
                self.attach_class(class);
            }
            // Room for every input at once (a `filter_map` would grow the
            // vector by doubling), and no spare room once built: the
            // vector is kept as long as the step.
            let mut deps: Vec<Arc<Step>> = Vec::with_capacity(spec.input_drvs.len());
            deps.extend(
                spec.input_drvs
                    .iter()
                    .filter_map(|input| self.lookup(input.as_str())),
            );
            deps.sort_by_key(Arc::as_ptr);
            deps.dedup_by(|a, b| Arc::ptr_eq(a, b));
            deps.shrink_to_fit();
            let expected_ms = self.config.expected_ms(spec.expected_ms);
            // Each dependency learns of the step as it is made, so the
            // dependencies are not copied for the purpose.
            let grown = &mut self.grown;
            let step = Arc::new_cyclic(|me| {
                for dep in &deps {
                    if dep.state.lock().add_rdep(me.clone()) {
                        grown.push(Arc::downgrade(dep));
                    }
                }
                let mut step = Step::new(spec.drv_path.clone(), class, deps, expected_ms);
                step.state
                    .get_mut()
                    .set_needs_resolution(spec.needs_resolution);
                step
            });
            self.index.insert(&step);
            self.counts.enter(Phase::Waiting);
            created.push(step);
        }
        created
    }

    /// Joins `priority` into `top` and everything below it, stopping at
    /// steps it does not change; re-keys runnable steps that changed.
    pub(crate) fn propagate_priority(&mut self, top: Arc<Step>, priority: Priority) {
        let mut pending = vec![top];
        let mut changed_runnable = Vec::new();
        while let Some(step) = pending.pop() {
            let mut state = step.state.lock();
            let joined = state.priority.join(priority);
            if joined == state.priority {
                continue;
            }
            state.priority = joined;
            pending.extend(state.deps.iter().cloned());
            let runnable = matches!(state.phase, Phase::Runnable { .. });
            drop(state);
            if runnable {
                changed_runnable.push(step);
            }
        }
        for step in changed_runnable {
            self.requeue(&step);
        }
    }
}

/// The specs to create, dependencies before dependents, for the closure of
/// `top` without the derivations that already have a step (`exists`) and
/// those absent from `specs` (already valid). Fails with a derivation on a
/// dependency cycle.
fn creation_order<'a>(
    top: &'a DrvPath,
    specs: &PathMap<&'a str, &'a StepSpec>,
    exists: impl Fn(&str) -> bool,
) -> Result<Vec<&'a StepSpec>, DrvPath> {
    enum Mark {
        Open,
        Done,
    }
    let mut marks: PathMap<&str, Mark> = PathMap::default();
    let mut order = Vec::new();
    // (derivation, children already pushed)
    let mut stack: Vec<(&'a str, bool)> = vec![(top.as_str(), false)];
    while let Some((drv, leaving)) = stack.pop() {
        let Some(&spec) = specs.get(drv) else {
            continue;
        };
        if leaving {
            marks.insert(drv, Mark::Done);
            order.push(spec);
            continue;
        }
        match marks.get(drv) {
            Some(Mark::Done) => continue,
            // Every open derivation is on the current path: a back edge.
            Some(Mark::Open) => return Err(spec.drv_path.clone()),
            None => {}
        }
        if exists(drv) {
            marks.insert(drv, Mark::Done);
            continue;
        }
        marks.insert(drv, Mark::Open);
        stack.push((drv, true));
        for input in &spec.input_drvs {
            stack.push((input.as_str(), false));
        }
    }
    Ok(order)
}

/// The step known to fail that the build of `top` needs, if any: `top`
/// itself first, else the first marked one in `steps` (the steps it would
/// create, all of which it needs).
fn known_failure<'a>(top: &DrvPath, steps: &[&'a StepSpec]) -> Option<&'a DrvPath> {
    let failed = || steps.iter().filter(|s| s.known_failed);
    failed()
        .find(|s| s.drv_path == *top)
        .or_else(|| failed().next())
        .map(|s| &s.drv_path)
}
