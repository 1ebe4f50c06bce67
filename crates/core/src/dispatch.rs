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
fn key_of<O: StepOrder, K>(order: &O, class: &Class<K>, step: &Step, state: &StepState) -> O::Key {
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
        tries: state.tries,
    })
}

impl<O: StepOrder> Core<O> {
    /// Puts a step whose dependencies have all succeeded into its class's
    /// queue and wakes the machines that can build it.
    pub(crate) fn make_runnable(&mut self, step: &Arc<Step>) {
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

    /// Re-keys a runnable step after its priority changed. Machines need no
    /// wake-up: none that could build the step has a free slot.
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
        for id in dirty {
            let Some(machine) = self.machines.get_mut(&id) else {
                continue;
            };
            machine.dirty = false;
            while self.dispatch_one(id) {}
        }
    }

    /// Gives one free slot of machine `id` the most urgent step it can
    /// build. Returns false when there is no free slot or no such step.
    fn dispatch_one(&mut self, id: MachineId) -> bool {
        let Some(machine) = self.machines.get(&id) else {
            return false;
        };
        if !machine.has_free_slot() {
            return false;
        }
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
        let Some((class_id, head)) = best else {
            return false;
        };
        let Some(step) = self.classes.get_mut(class_id).pop_head(head.jobset) else {
            return false;
        };
        let (build, attempt) = {
            let mut state = step.state.lock();
            let build = state
                .lowest_direct_build()
                .unwrap_or(state.priority.lowest_build);
            self.counts.leave(state.phase);
            state.phase = Phase::Running { machine: id, build };
            self.counts.enter(state.phase);
            (build, state.tries + 1)
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
        self.disconnect_machine(spec.id);
        let mut machine = {
            let classes = &mut self.classes;
            Machine::new(spec, &mut |name| classes.intern_name(name))
        };
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

    /// Forgets a machine and retries the steps it was building. Returns
    /// false if it was not connected.
    pub(crate) fn disconnect_machine(&mut self, id: MachineId) -> bool {
        let Some(machine) = self.machines.remove(&id) else {
            return false;
        };
        let now = self.now;
        let grace = self.config.max_unsupported_time;
        for &class_id in &machine.classes {
            let class = self.classes.get_mut(class_id);
            class.machines.retain(|m| *m != id);
            if class.machines.is_empty() {
                class.unsupported_since = Some(now);
                if class.len() > 0 {
                    class.unsupported_check = Some(now.saturating_add(grace));
                }
            }
        }
        for slot in machine.running {
            self.charge(slot.build, slot.since);
            if let Some(step) = slot.step.upgrade() {
                self.attempt_failed(step, id, slot.build, StepFailure::Aborted, true);
            }
        }
        true
    }
}
