//! Connected builders and their slots.
//!
//! A [`Machine`] knows the classes it can build (kept up to date as
//! machines and classes appear) and the steps occupying its slots. A slot
//! refers to its step weakly: when no build needs the step any more the step
//! is freed and the core cancels the slot.
//!
//! Invariants: `running.len() <= max_jobs + prefetch` (steps beyond
//! `max_jobs` wait on the machine for a slot); a step is in at most one slot
//! of one machine, and it is there iff its phase is `Running` on that
//! machine.

use std::sync::{Arc, Weak};

use crate::event::MachineSpec;
use crate::graph::Step;
use crate::queue::{Class, ClassId};
use crate::types::{BuildId, DrvPath, MachineId, Millis};

pub(crate) struct Machine {
    pub id: MachineId,
    pub name: String,
    pub systems: Box<[Arc<str>]>,
    pub supported_features: Box<[Arc<str>]>,
    pub mandatory_features: Box<[Arc<str>]>,
    pub max_jobs: u32,
    /// Steps held ahead of the slots (see `MachineSpec::prefetch`).
    pub prefetch: u32,
    pub speed_factor: f32,
    /// Classes this machine can build (empty when it has no slots).
    pub classes: Vec<ClassId>,
    pub running: Vec<Slot>,
    /// Queued for a dispatch pass.
    pub dirty: bool,
    pub steps_done: u64,
    pub steps_failed: u64,
    /// Its connection dropped: it keeps the steps it runs (they may still
    /// finish) but takes no new ones until it reattaches.
    pub detached: bool,
}

/// One busy slot.
pub(crate) struct Slot {
    pub drv_path: DrvPath,
    pub step: Weak<Step>,
    /// The build the attempt is recorded under.
    pub build: BuildId,
    pub since: Millis,
}

impl Machine {
    pub fn new(spec: MachineSpec, intern: &mut impl FnMut(&str) -> Arc<str>) -> Machine {
        let mut names = |names: &[String]| -> Box<[Arc<str>]> {
            let mut names: Vec<Arc<str>> = names.iter().map(|n| intern(n)).collect();
            names.sort();
            names.dedup();
            names.into_boxed_slice()
        };
        Machine {
            id: spec.id,
            systems: names(&spec.systems),
            supported_features: names(&spec.supported_features),
            mandatory_features: names(&spec.mandatory_features),
            name: spec.name,
            max_jobs: spec.max_jobs,
            prefetch: spec.prefetch,
            speed_factor: spec.speed_factor,
            classes: Vec::new(),
            running: Vec::new(),
            dirty: false,
            steps_done: 0,
            steps_failed: 0,
            detached: false,
        }
    }

    /// Whether this machine may build steps of `class`: it has a slot, runs
    /// the class's system (any machine runs `builtin`), supports every
    /// required feature (mandatory features count as supported), and the
    /// class requires every one of its mandatory features.
    pub fn can_build<K>(&self, class: &Class<K>) -> bool {
        self.max_jobs > 0
            && (&*class.system == "builtin" || self.systems.contains(&class.system))
            && class.features.iter().all(|feature| {
                self.supported_features.contains(feature)
                    || self.mandatory_features.contains(feature)
            })
            && self
                .mandatory_features
                .iter()
                .all(|feature| class.features.contains(feature))
    }

    /// Whether it takes another step: a free slot, or room ahead of them.
    pub fn has_free_slot(&self) -> bool {
        self.has_room(self.capacity())
    }

    /// Whether it has a slot that would start a step at once.
    pub fn has_idle_slot(&self) -> bool {
        self.has_room(self.max_jobs as usize)
    }

    /// Steps it may hold: its slots and those held ahead of them.
    pub fn capacity(&self) -> usize {
        if self.max_jobs == 0 {
            return 0;
        }
        self.max_jobs as usize + self.prefetch as usize
    }

    fn has_room(&self, limit: usize) -> bool {
        !self.detached && self.running.len() < limit
    }

    /// Removes and returns the slot running `drv_path`.
    pub fn take_slot(&mut self, drv_path: &str) -> Option<Slot> {
        let index = self
            .running
            .iter()
            .position(|slot| slot.drv_path.as_str() == drv_path)?;
        Some(self.running.swap_remove(index))
    }
}
