//! Work that outlives a connection or a restart of the queue runner.
//!
//! - A machine whose connection dropped is *detached*: it keeps the steps
//!   it runs, since its agent goes on building them, but takes no new
//!   ones. It either comes back (`MachineConnected` with the same id,
//!   which keeps its slots) or is given up (`MachineDisconnected`, which
//!   retries its steps).
//! - After a restart the driver learns from reconnecting agents which
//!   attempts they still run. It *claims* each such step for its machine
//!   before the step is loaded; when the step becomes runnable it goes
//!   straight into that machine's slot ([`Command::Adopt`]) instead of a
//!   queue. A claim that cannot be honoured is answered with
//!   [`Command::AdoptionRefused`], and the step is queued as usual.
//!
//! Invariant: a claimed step is never dispatched to another machine while
//! its claim stands; a claim is consumed by the step becoming runnable or
//! withdrawn by the driver.

use std::sync::Arc;

use crate::command::{Command, EventError};
use crate::graph::{Phase, Step};
use crate::machine::Slot;
use crate::order::StepOrder;
use crate::types::{DrvPath, MachineId};
use crate::Core;

impl<O: StepOrder> Core<O> {
    /// Stops giving `id` new steps; its running steps stay.
    pub(crate) fn detach_machine(&mut self, id: MachineId) {
        match self.machines.get_mut(&id) {
            Some(machine) => machine.detached = true,
            None => self.reject(EventError::UnknownMachine(id)),
        }
    }

    /// Reserves the step `drv_path` (not loaded yet, or not yet runnable)
    /// for `machine`, whose agent still runs an attempt at it.
    pub(crate) fn claim(&mut self, drv_path: DrvPath, machine: MachineId) {
        if let Some(step) = self.lookup(drv_path.as_str()) {
            let runnable = matches!(step.state.lock().phase, Phase::Runnable { .. });
            if !runnable || !self.adopt(&step, machine) {
                self.out
                    .push(Command::AdoptionRefused { drv_path, machine });
            }
            return;
        }
        self.claims.insert(drv_path, machine);
    }

    /// Drops the claim on `drv_path`, if it still stands.
    pub(crate) fn withdraw_claim(&mut self, drv_path: &DrvPath) {
        self.claims.remove(drv_path.as_str());
    }

    /// Called for a step that just became runnable: if it is claimed, puts
    /// it into the claiming machine's slot. Returns whether it did.
    pub(crate) fn take_claim(&mut self, step: &Arc<Step>) -> bool {
        let Some(machine) = self.claims.remove(step.drv_path.as_str()) else {
            return false;
        };
        if self.adopt(step, machine) {
            return true;
        }
        self.out.push(Command::AdoptionRefused {
            drv_path: step.drv_path.clone(),
            machine,
        });
        false
    }

    /// Moves a runnable step into a slot of `machine` without a dispatch.
    fn adopt(&mut self, step: &Arc<Step>, machine_id: MachineId) -> bool {
        let Some(machine) = self.machines.get(&machine_id) else {
            return false;
        };
        if machine.detached || machine.running.len() >= machine.capacity() {
            return false;
        }
        let (build, was_queued) = {
            let mut state = step.state.lock();
            let was_queued = matches!(state.phase, Phase::Runnable { .. });
            let build = state
                .lowest_direct_build()
                .unwrap_or(state.priority.lowest_build);
            self.counts.leave(state.phase);
            state.phase = Phase::Running {
                machine: machine_id,
                build,
            };
            self.counts.enter(state.phase);
            (build, was_queued)
        };
        if was_queued {
            // Its queue entry is stale now (the phase is no longer
            // runnable) and is skipped or swept.
            self.classes.get_mut(step.class).mark_stale();
        }
        if let Some(machine) = self.machines.get_mut(&machine_id) {
            machine.running.push(Slot {
                drv_path: step.drv_path.clone(),
                step: Arc::downgrade(step),
                build,
                since: self.now,
            });
        }
        self.out.push(Command::Adopt {
            drv_path: step.drv_path.clone(),
            machine: machine_id,
            build,
        });
        true
    }
}
