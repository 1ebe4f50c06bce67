//! Moving steps into runnable queues and out onto machine slots, and
//! keeping the machine ↔ class compatibility lists current.
//!
//! A dispatch pass only visits "dirty" machines: those that connected,
//! freed a slot, or can build a class that just got a runnable step. For
//! each free slot it compares the heads of the queues of the classes the
//! machine can build and takes the smallest key: the cost of one decision
//! does not depend on how many steps are queued. Faster machines are filled
//! first.
//!
//! Invariant (with `Core::handle`): after a pass, no machine has a free
//! slot while a queue of a class it can build has a live entry.

use std::sync::Arc;

use crate::command::Command;
use crate::event::MachineSpec;
use crate::graph::{Phase, Step, StepState};
use crate::machine::{Machine, Slot};
use crate::order::{StepOrder, StepView};
use crate::queue::{Class, ClassId, Head};
use crate::types::{BuildId, JobsetId, MachineId, StepFailure};
use crate::Core;

/// The order's key for a step in its current state.
pub(crate) fn key_of<O: StepOrder, K>(
    order: &O,
    class: &Class<K>,
    step: &Step,
    state: &StepState,
) -> O::Key {
    let runnable_since = match state.phase {
        Phase::Runnable { since } => since,
        _ => Default::default(),
    };
    order.key(&StepView {
        drv_path: &step.drv_path,
        system: &class.system,
        required_features: &class.features,
        priority: state.priority,
        runnable_since,
        tries: u32::from(state.tries),
        expected_ms: state.expected_ms,
        critical_path_ms: state.critical_path_ms,
    })
}

impl<O: StepOrder> Core<O> {
    /// Puts a step whose dependencies have all succeeded into its class's
    /// queue and wakes the machines that can build it.
    pub(crate) fn make_runnable(&mut self, step: &Arc<Step>) {
        if step.state.lock().needs_resolution() {
            self.start_resolution(step);
            return;
        }
        if !self.claims.is_empty() && self.take_claim(step) {
            return;
        }
        let ticket = self.next_ticket();
        let now = self.now;
        let (key, jobset) = {
            let mut state = step.state.lock();
            debug_assert!(state.deps.is_empty(), "runnable step with unfinished deps");
            self.counts.leave(state.phase);
            state.phase = Phase::Runnable { since: now };
            self.counts.enter(state.phase);
            state.ticket = ticket;
            let key = key_of(&self.order, self.classes.get(step.class), step, &state);
            (key, self.jobset_of(state.priority.lowest_build))
        };
        let class = self.classes.get_mut(step.class);
        class.push(key, ticket, jobset, Arc::downgrade(step));
        if class.machines.is_empty() {
            let deadline = now.saturating_add(self.config.max_unsupported_time);
            class.unsupported_check = Some(
                class
                    .unsupported_check
                    .map_or(deadline, |at| at.min(deadline)),
            );
        } else {
            for i in 0..class.machines.len() {
                let id = self.classes.get(step.class).machines[i];
                self.mark_dirty(id);
            }
        }
    }

    /// Re-keys a runnable step after its priority or critical path
    /// changed. Machines need no wake-up: none that could build the step
    /// has a free slot.
    pub(crate) fn requeue(&mut self, step: &Arc<Step>) {
        let ticket = self.next_ticket();
        let (key, jobset) = {
            let mut state = step.state.lock();
            if !matches!(state.phase, Phase::Runnable { .. }) {
                return;
            }
            state.ticket = ticket;
            let key = key_of(&self.order, self.classes.get(step.class), step, &state);
            (key, self.jobset_of(state.priority.lowest_build))
        };
        let class = self.classes.get_mut(step.class);
        class.push(key, ticket, jobset, Arc::downgrade(step));
        class.mark_stale();
    }

    /// The jobset a runnable step is queued under: that of the oldest
    /// build needing it (the build its priority names, always unfinished).
    fn jobset_of(&self, build: BuildId) -> JobsetId {
        self.builds
            .get(&build)
            .map_or(JobsetId(i32::MAX), |b| b.jobset)
    }

    pub(crate) fn mark_dirty(&mut self, id: MachineId) {
        if let Some(machine) = self.machines.get_mut(&id) {
            if !machine.dirty && machine.has_free_slot() {
                machine.dirty = true;
                self.dirty.push(id);
            }
        }
    }

    /// Fills the free slots of dirty machines, fastest machines first.
    pub(crate) fn dispatch(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_by(|a, b| {
            let speed = |id| {
                self.machines
                    .get(id)
                    .map_or(0.0, |m: &Machine| m.speed_factor)
            };
            speed(b).total_cmp(&speed(a)).then(a.cmp(b))
        });
        // Idle slots first, on every machine; then the steps held ahead
        // of them, so no step waits on a busy machine while another
        // machine that can build it has a slot idle.
        for id in &dirty {
            while self.dispatch_one(*id, Machine::has_idle_slot) {}
        }
        for id in dirty {
            let Some(machine) = self.machines.get_mut(&id) else {
                continue;
            };
            machine.dirty = false;
            while self.dispatch_one(id, Machine::has_free_slot) {}
        }
    }

    /// Gives one free slot of machine `id` (as `room` counts them) the
    /// most urgent step it can build. Returns false when there is no free
    /// slot or no such step.
    fn dispatch_one(&mut self, id: MachineId, room: fn(&Machine) -> bool) -> bool {
        let Some(machine) = self.machines.get(&id) else {
            return false;
        };
        if !room(machine) {
            return false;
        }
        let Some((class_id, head)) = self.best_for(id) else {
            return false;
        };
        let target = self.retry_elsewhere(class_id, &head, id).unwrap_or(id);
        let Some(step) = self.classes.get_mut(class_id).pop_head(head.jobset) else {
            return false;
        };
        let id = target;
        let (build, attempt) = {
            let mut state = step.state.lock();
            let build = state
                .lowest_direct_build()
                .unwrap_or(state.priority.lowest_build);
            self.counts.leave(state.phase);
            state.phase = Phase::Running { machine: id, build };
            self.counts.enter(state.phase);
            (build, u32::from(state.tries) + 1)
        };
        debug_assert!(
            self.builds.contains_key(&build),
            "dispatch for a finished build"
        );
        self.counts.dispatches += 1;
        if let Some(machine) = self.machines.get_mut(&id) {
            machine.running.push(Slot {
                drv_path: step.drv_path.clone(),
                step: Arc::downgrade(&step),
                build,
                since: self.now,
            });
        }
        self.out.push(Command::Dispatch {
            drv_path: step.drv_path.clone(),
            machine: id,
            build,
            attempt,
        });
        true
    }

    /// The head machine `id` would take: the best among the heads of the
    /// classes it can build.
    fn best_for(&mut self, id: MachineId) -> Option<(ClassId, Head<O::Key>)> {
        let machine = self.machines.get(&id)?;
        let mut best: Option<(ClassId, Head<O::Key>)> = None;
        let shares = &self.shares;
        for &class_id in &machine.classes {
            let class = self.classes.get_mut(class_id);
            if let Some(head) = class.best_head(|jobset| shares.rank(jobset)) {
                if best.as_ref().is_none_or(|(_, best)| head.before(best)) {
                    best = Some((class_id, head));
                }
            }
        }
        best
    }

    /// If the head `head` of `class_id` (which machine `id` is about to
    /// take) last failed on `id`, another machine with a free slot whose
    /// own best head is this same step, fastest first: the retry goes
    /// there, and no machine takes a step before a more urgent one.
    fn retry_elsewhere(
        &mut self,
        class_id: ClassId,
        head: &Head<O::Key>,
        id: MachineId,
    ) -> Option<MachineId> {
        let step = self.classes.get(class_id).peek_head(head.jobset)?;
        let failed_on = step.state.lock().failed_on;
        if failed_on == 0 || u64::from(failed_on) != id.0 {
            return None;
        }
        let mut others: Vec<(f32, MachineId)> = self
            .classes
            .get(class_id)
            .machines
            .iter()
            .filter(|other| **other != id)
            .filter_map(|other| self.machines.get(other))
            .filter(|m| m.has_idle_slot())
            .map(|m| (m.speed_factor, m.id))
            .collect();
        others.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        others.into_iter().map(|(_, other)| other).find(|other| {
            self.best_for(*other)
                .is_some_and(|(c, h)| c == class_id && h.jobset == head.jobset)
        })
    }

    /// Links a newly created class with the connected machines that can
    /// build it.
    pub(crate) fn attach_class(&mut self, class_id: ClassId) {
        let class = self.classes.get_mut(class_id);
        for machine in self.machines.values_mut() {
            if machine.can_build(class) {
                machine.classes.push(class_id);
                class.machines.push(machine.id);
            }
        }
        if !class.machines.is_empty() {
            class.unsupported_since = None;
            class.unsupported_check = None;
        }
    }

    pub(crate) fn connect_machine(&mut self, spec: MachineSpec) {
        // A detached machine coming back keeps the steps it runs; any other
        // machine of the same id is replaced, its steps retried.
        let carried = match self.machines.get(&spec.id) {
            Some(old) if old.detached => {
                let old = self.machines.remove(&spec.id);
                if let Some(old) = &old {
                    self.unlink_machine(old);
                }
                old
            }
            _ => {
                self.disconnect_machine(spec.id);
                None
            }
        };
        let mut machine = {
            let classes = &mut self.classes;
            Machine::new(spec, &mut |name| classes.intern_name(name))
        };
        if let Some(old) = carried {
            machine.running = old.running;
            machine.steps_done = old.steps_done;
            machine.steps_failed = old.steps_failed;
            // Never room for fewer steps than it holds.
            let held = machine.running.len();
            if held > machine.capacity() {
                let missing = u32::try_from(held - machine.capacity()).unwrap_or(u32::MAX);
                machine.max_jobs = machine.max_jobs.saturating_add(missing);
            }
        }
        for (class_id, class) in self.classes.iter_mut() {
            if machine.can_build(class) {
                machine.classes.push(class_id);
                class.machines.push(machine.id);
                class.unsupported_since = None;
                class.unsupported_check = None;
            }
        }
        let id = machine.id;
        self.machines.insert(id, machine);
        self.mark_dirty(id);
    }

    /// Removes a machine from its classes' lists; a class left without
    /// machines starts its unsupported grace period.
    fn unlink_machine(&mut self, machine: &Machine) {
        let now = self.now;
        let grace = self.config.max_unsupported_time;
        for &class_id in &machine.classes {
            let class = self.classes.get_mut(class_id);
            class.machines.retain(|m| *m != machine.id);
            if class.machines.is_empty() {
                class.unsupported_since = Some(now);
                if class.len() > 0 {
                    class.unsupported_check = Some(now.saturating_add(grace));
                }
            }
        }
    }

    /// Forgets a machine and retries the steps it was building. Returns
    /// false if it was not connected.
    pub(crate) fn disconnect_machine(&mut self, id: MachineId) -> bool {
        let Some(machine) = self.machines.remove(&id) else {
            return false;
        };
        self.unlink_machine(&machine);
        for slot in machine.running {
            self.charge(slot.build, slot.since);
            if let Some(step) = slot.step.upgrade() {
                self.attempt_failed(step, id, slot.build, StepFailure::Aborted, true);
            }
        }
        true
    }
}
