//! The index of live steps by derivation path.
//!
//! A hash table of `Weak<Step>`s alone, hashed by the path each step
//! holds: the path is stored once, in its step, and an entry costs 8 bytes
//! and a control byte. (A map from path to `Weak` costs 24 bytes and a
//! control byte per entry: 8 MiB more at 270,000 steps, in a table that
//! is half empty after it doubles.)
//!
//! Invariant: every entry is a live step, under the hash of its own path.
//! The core removes a step's entry when the step finishes or is freed
//! ([`StepIndex::remove`] matches by pointer, so it works on an entry
//! whose step has just died). A dead entry left by mistake is never
//! returned, and [`StepIndex::sweep`] drops it.

use std::hash::BuildHasher;
use std::sync::{Arc, Weak};

use crate::graph::Step;
use crate::types::PathHasher;

#[derive(Default)]
pub(crate) struct StepIndex {
    table: hashbrown::HashTable<Weak<Step>>,
    hasher: PathHasher,
    /// Entries removed so far (see [`StepIndex::removed`]).
    removed: u64,
}

impl StepIndex {
    fn hash(&self, drv_path: &str) -> u64 {
        self.hasher.hash_one(drv_path)
    }

    /// How an entry is hashed again when the table grows (a dead entry,
    /// which cannot be, goes anywhere: it is never matched by path).
    fn rehasher(hasher: &PathHasher) -> impl Fn(&Weak<Step>) -> u64 + '_ {
        |entry| {
            entry
                .upgrade()
                .map_or(0, |step| hasher.hash_one(step.drv_path.as_str()))
        }
    }

    /// The live step indexed for `drv_path`.
    pub fn get(&self, drv_path: &str) -> Option<Arc<Step>> {
        let hash = self.hash(drv_path);
        let mut found = None;
        self.table.find(hash, |entry| match entry.upgrade() {
            Some(step) if step.drv_path.as_str() == drv_path => {
                found = Some(step);
                true
            }
            _ => false,
        });
        found
    }

    /// Indexes `step` under its path, in place of any step indexed there.
    pub fn insert(&mut self, step: &Arc<Step>) {
        let hash = self.hash(step.drv_path.as_str());
        let weak = Arc::downgrade(step);
        let path = step.drv_path.as_str();
        match self.table.find_mut(hash, |entry| {
            entry
                .upgrade()
                .is_some_and(|other| other.drv_path.as_str() == path)
        }) {
            Some(entry) => {
                *entry = weak;
                self.removed += 1;
            }
            None => {
                self.table
                    .insert_unique(hash, weak, Self::rehasher(&self.hasher));
            }
        }
    }

    /// Removes the entry of the step at `step` (alive or just freed),
    /// indexed under `drv_path`; an entry of another step for the same
    /// path stays. Says whether there was one.
    pub fn remove(&mut self, drv_path: &str, step: *const Step) -> bool {
        let hash = self.hash(drv_path);
        match self
            .table
            .find_entry(hash, |entry| std::ptr::eq(entry.as_ptr(), step))
        {
            Ok(entry) => {
                entry.remove();
                self.removed += 1;
                true
            }
            Err(_) => false,
        }
    }

    /// Drops dead entries (there should be none).
    pub fn sweep(&mut self) {
        let before = self.table.len();
        self.table.retain(|entry| entry.strong_count() > 0);
        self.removed += (before - self.table.len()) as u64;
    }

    /// How many entries have been removed since the index was created: a
    /// set of paths taken from the index while this stays the same has
    /// lost none of its steps.
    pub fn removed(&self) -> u64 {
        self.removed
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Every entry, live or not.
    pub fn entries(&self) -> impl Iterator<Item = &Weak<Step>> {
        self.table.iter()
    }
}
