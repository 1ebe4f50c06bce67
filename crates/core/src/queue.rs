//! Runnable queues, one per step class (system + required features), each
//! split by jobset.
//!
//! A [`Class`] holds the runnable steps of one (system, required features)
//! pair, one queue per jobset ordered by their [`crate::StepOrder`] key,
//! and the connected machines able to build them. A free slot only looks
//! at the heads of the queues of the classes its machine can build, so one
//! dispatch decision costs O(classes of the machine × jobsets with
//! runnable steps there × log queue length), however many steps are
//! queued. Among the heads, the highest global priority goes first, then
//! the jobset that used least of its scheduling shares
//! ([`crate::shares`]), then the order's key.
//!
//! Deletion is lazy: an entry is live only while its step is alive,
//! `Runnable`, and carries the entry's ticket. Re-keying a step (its
//! priority changed) inserts a new entry with a new ticket and leaves the
//! old one stale; stale entries are dropped when they reach the head, or in
//! one sweep once they outnumber the live ones.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Weak};

use crate::graph::{Phase, Step};
use crate::types::{JobsetId, MachineId, Millis};

/// Index of a [`Class`] in [`Classes`]; classes are never removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct ClassId(pub u32);

pub(crate) struct Class<K> {
    pub system: Arc<str>,
    /// Sorted, deduplicated.
    pub features: Box<[Arc<str>]>,
    /// Per jobset; a jobset with no entry left has no queue.
    queues: BTreeMap<JobsetId, BTreeMap<(K, u64), Weak<Step>>>,
    /// Entries over all the jobsets' queues.
    len: usize,
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

/// The most urgent head of a class's queues, as [`Class::best_head`]
/// found it.
#[derive(Clone, Debug)]
pub(crate) struct Head<K> {
    pub jobset: JobsetId,
    pub global: i32,
    pub rank: f64,
    pub key: (K, u64),
}

impl<K: Ord> Head<K> {
    /// Whether `self` goes before `other`: higher global priority, then
    /// the lower share rank, then the smaller key.
    pub fn before(&self, other: &Head<K>) -> bool {
        other
            .global
            .cmp(&self.global)
            .then(self.rank.total_cmp(&other.rank))
            .then_with(|| self.key.cmp(&other.key))
            .is_lt()
    }
}

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
            queues: BTreeMap::new(),
            len: 0,
            stale: 0,
            machines: Vec::new(),
            unsupported_since: Some(now),
            unsupported_check: None,
        }
    }

    pub fn push(&mut self, key: K, ticket: u64, jobset: JobsetId, step: Weak<Step>) {
        if self
            .queues
            .entry(jobset)
            .or_default()
            .insert((key, ticket), step)
            .is_none()
        {
            self.len += 1;
        }
    }

    /// Records that one entry went stale (its step was re-keyed or freed).
    pub fn mark_stale(&mut self) {
        self.stale += 1;
        if self.stale >= MIN_STALE_FOR_SWEEP && self.stale * 2 > self.len {
            self.retain_live(|_| true);
        }
    }

    /// Keeps the live entries `keep` selects, drops the rest; returns the
    /// live ones dropped. Costs a pass over every queue.
    fn retain_live(&mut self, mut keep: impl FnMut(&Arc<Step>) -> bool) -> Vec<Arc<Step>> {
        let mut dropped = Vec::new();
        for queue in self.queues.values_mut() {
            queue.retain(|(_, ticket), step| match live_step(*ticket, step) {
                None => false,
                Some(step) if keep(&step) => true,
                Some(step) => {
                    dropped.push(step);
                    false
                }
            });
        }
        self.queues.retain(|_, queue| !queue.is_empty());
        self.len = self.queues.values().map(BTreeMap::len).sum();
        self.stale = 0;
        dropped
    }

    /// The most urgent live head over the jobsets' queues (see [`Head`]),
    /// dropping stale entries before each head. `rank` gives a jobset's
    /// share rank.
    pub fn best_head(&mut self, rank: impl Fn(JobsetId) -> f64) -> Option<Head<K>> {
        let mut best: Option<Head<K>> = None;
        let mut emptied = Vec::new();
        for (&jobset, queue) in self.queues.iter_mut() {
            let mut global = None;
            while let Some(entry) = queue.first_entry() {
                if let Some(step) = live_step(entry.key().1, entry.get()) {
                    global = Some(step.state.lock().priority.global);
                    break;
                }
                entry.remove();
                self.len = self.len.saturating_sub(1);
                self.stale = self.stale.saturating_sub(1);
            }
            let (Some(global), Some((key, _))) = (global, queue.first_key_value()) else {
                emptied.push(jobset);
                continue;
            };
            let head = Head {
                jobset,
                global,
                rank: rank(jobset),
                key: key.clone(),
            };
            if best.as_ref().is_none_or(|b| head.before(b)) {
                best = Some(head);
            }
        }
        for jobset in emptied {
            self.queues.remove(&jobset);
        }
        best
    }

    /// Removes the first entry of `jobset`'s queue; call right after
    /// [`Class::best_head`] named it, when the entry is known live.
    /// The first step of `jobset`'s queue (live right after `best_head`).
    pub fn peek_head(&self, jobset: JobsetId) -> Option<Arc<Step>> {
        self.queues
            .get(&jobset)?
            .first_key_value()
            .and_then(|(_, step)| step.upgrade())
    }

    pub fn pop_head(&mut self, jobset: JobsetId) -> Option<Arc<Step>> {
        let queue = self.queues.get_mut(&jobset)?;
        let popped = queue.pop_first();
        if queue.is_empty() {
            self.queues.remove(&jobset);
        }
        let (_, step) = popped?;
        self.len = self.len.saturating_sub(1);
        step.upgrade()
    }

    /// Removes and returns the live entries `doomed` selects; drops stale
    /// entries on the way. Costs a pass over every queue.
    pub fn drain_live_where(
        &mut self,
        mut doomed: impl FnMut(&Arc<Step>) -> bool,
    ) -> Vec<Arc<Step>> {
        self.retain_live(|step| !doomed(step))
    }

    /// Entries, including stale ones.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The live steps, jobset by jobset, each in key order (tests only: a
    /// full scan).
    #[cfg(test)]
    pub fn live_steps(&self) -> Vec<Arc<Step>> {
        self.live_entries()
            .into_iter()
            .map(|(_, step)| step)
            .collect()
    }

    /// The live entries with their keys, jobset by jobset, each in key
    /// order (tests only: a full scan).
    #[cfg(test)]
    pub fn live_entries(&self) -> Vec<(K, Arc<Step>)> {
        self.queues
            .values()
            .flat_map(|queue| queue.iter())
            .filter_map(|((key, ticket), step)| {
                live_step(*ticket, step).map(|step| (key.clone(), step))
            })
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
