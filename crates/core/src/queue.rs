//! Runnable queues, one per step class (system + required features).
//!
//! A [`Class`] holds the runnable steps of one (system, required features)
//! pair ordered by their [`crate::StepOrder`] key, and the connected
//! machines able to build them. A free slot only looks at the heads of the
//! queues of the classes its machine can build, so one dispatch decision
//! costs O(classes of the machine × log queue length), however many steps
//! are queued.
//!
//! Deletion is lazy: an entry is live only while its step is alive,
//! `Runnable`, and carries the entry's ticket. Re-keying a step (its
//! priority changed) inserts a new entry with a new ticket and leaves the
//! old one stale; stale entries are dropped when they reach the head, or in
//! one sweep once they outnumber the live ones.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Weak};

use crate::graph::{Phase, Step};
use crate::types::{MachineId, Millis};

/// Index of a [`Class`] in [`Classes`]; classes are never removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct ClassId(pub u32);

pub(crate) struct Class<K> {
    pub system: Arc<str>,
    /// Sorted, deduplicated.
    pub features: Box<[Arc<str>]>,
    queue: BTreeMap<(K, u64), Weak<Step>>,
    /// Entries known to be stale (an estimate: never more than the truth).
    stale: usize,
    /// Connected machines with at least one slot that can build this class.
    pub machines: Vec<MachineId>,
    /// Since when no connected machine can build this class; `None` while
    /// one can.
    pub unsupported_since: Option<Millis>,
    /// When to look for steps of this class that have waited out the
    /// unsupported grace period; only set while `unsupported_since` is.
    pub unsupported_check: Option<Millis>,
}

/// Compaction threshold: sweep once this many entries are stale and they
/// outnumber the live ones.
const MIN_STALE_FOR_SWEEP: usize = 1024;

/// The step behind a queue entry, if the entry is live.
pub(crate) fn live_step(ticket: u64, step: &Weak<Step>) -> Option<Arc<Step>> {
    let step = step.upgrade()?;
    let live = {
        let state = step.state.lock();
        matches!(state.phase, Phase::Runnable { .. }) && state.ticket == ticket
    };
    live.then_some(step)
}

impl<K: Ord + Clone> Class<K> {
    fn new(system: Arc<str>, features: Box<[Arc<str>]>, now: Millis) -> Self {
        Class {
            system,
            features,
            queue: BTreeMap::new(),
            stale: 0,
            machines: Vec::new(),
            unsupported_since: Some(now),
            unsupported_check: None,
        }
    }

    pub fn push(&mut self, key: K, ticket: u64, step: Weak<Step>) {
        self.queue.insert((key, ticket), step);
    }

    /// Records that one entry went stale (its step was re-keyed or freed).
    pub fn mark_stale(&mut self) {
        self.stale += 1;
        if self.stale >= MIN_STALE_FOR_SWEEP && self.stale * 2 > self.queue.len() {
            self.queue
                .retain(|(_, ticket), step| live_step(*ticket, step).is_some());
            self.stale = 0;
        }
    }

    /// The key of the first live entry, dropping stale entries before it.
    pub fn head(&mut self) -> Option<&(K, u64)> {
        while let Some(entry) = self.queue.first_entry() {
            if live_step(entry.key().1, entry.get()).is_some() {
                break;
            }
            entry.remove();
            self.stale = self.stale.saturating_sub(1);
        }
        self.queue.first_key_value().map(|(key, _)| key)
    }

    /// Removes the first entry; call right after [`Class::head`] returned
    /// `Some`, when the entry is known live.
    pub fn pop_head(&mut self) -> Option<Arc<Step>> {
        self.queue.pop_first().and_then(|(_, step)| step.upgrade())
    }

    /// Removes and returns the live entries `doomed` selects; drops stale
    /// entries on the way. Costs a pass over the whole queue.
    pub fn drain_live_where(
        &mut self,
        mut doomed: impl FnMut(&Arc<Step>) -> bool,
    ) -> Vec<Arc<Step>> {
        let mut taken = Vec::new();
        self.queue
            .retain(|(_, ticket), step| match live_step(*ticket, step) {
                None => false,
                Some(step) if doomed(&step) => {
                    taken.push(step);
                    false
                }
                Some(_) => true,
            });
        self.stale = 0;
        taken
    }

    /// Entries, including stale ones.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// The live steps in dispatch order (tests only: a full scan).
    #[cfg(test)]
    pub fn live_steps(&self) -> Vec<Arc<Step>> {
        self.queue
            .iter()
            .filter_map(|((_, ticket), step)| live_step(*ticket, step))
            .collect()
    }
}

/// A class's identity: system and sorted required features.
type ClassName = (Arc<str>, Box<[Arc<str>]>);

/// All classes seen so far, with interned system and feature names.
pub(crate) struct Classes<K> {
    classes: Vec<Class<K>>,
    by_name: HashMap<ClassName, ClassId>,
    names: HashSet<Arc<str>>,
}

impl<K: Ord + Clone> Classes<K> {
    pub fn new() -> Self {
        Classes {
            classes: Vec::new(),
            by_name: HashMap::new(),
            names: HashSet::new(),
        }
    }

    /// One shared copy of a system or feature name.
    pub fn intern_name(&mut self, name: &str) -> Arc<str> {
        if let Some(interned) = self.names.get(name) {
            return interned.clone();
        }
        let interned: Arc<str> = name.into();
        self.names.insert(interned.clone());
        interned
    }

    /// The class of steps with this system and these required features,
    /// created if new (then `created` is true and the caller must attach
    /// the machines able to build it).
    pub fn intern(&mut self, system: &str, features: &[String], now: Millis) -> (ClassId, bool) {
        let system = self.intern_name(system);
        let mut features: Vec<Arc<str>> = features.iter().map(|f| self.intern_name(f)).collect();
        features.sort();
        features.dedup();
        let name: ClassName = (system, features.into_boxed_slice());
        if let Some(&id) = self.by_name.get(&name) {
            return (id, false);
        }
        let id = ClassId(u32::try_from(self.classes.len()).unwrap_or(u32::MAX));
        self.classes
            .push(Class::new(name.0.clone(), name.1.clone(), now));
        self.by_name.insert(name, id);
        (id, true)
    }

    pub fn get(&self, id: ClassId) -> &Class<K> {
        &self.classes[id.0 as usize]
    }

    pub fn get_mut(&mut self, id: ClassId) -> &mut Class<K> {
        &mut self.classes[id.0 as usize]
    }

    pub fn iter(&self) -> impl Iterator<Item = (ClassId, &Class<K>)> {
        (0u32..).map(ClassId).zip(self.classes.iter())
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (ClassId, &mut Class<K>)> {
        (0u32..).map(ClassId).zip(self.classes.iter_mut())
    }
}
