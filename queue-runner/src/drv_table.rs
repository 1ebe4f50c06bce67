//! [`DrvTable`]: a map from derivation path to a value, for the driver's
//! one entry per held step (270,000 of them in a big queue).
//!
//! The entries sit densely in a vector; the hash table holds only their
//! 4-byte positions. A `HashMap<DrvPath, V>` keeps whole entries in its
//! table, which is between 44% and 87% full: at 270,000 entries of 32
//! bytes it takes 17 MiB, where this takes 11 MiB.
//!
//! Invariant: `slots` holds each position of `entries` exactly once, under
//! the hash of that entry's path.

use std::borrow::Borrow;
use std::hash::BuildHasher;

use sluice_core::{DrvPath, PathHasher};

pub struct DrvTable<V> {
    entries: Vec<(DrvPath, V)>,
    slots: hashbrown::HashTable<u32>,
    hasher: PathHasher,
}

impl<V> Default for DrvTable<V> {
    fn default() -> Self {
        DrvTable {
            entries: Vec::new(),
            slots: hashbrown::HashTable::new(),
            hasher: PathHasher::default(),
        }
    }
}

/// A position in `entries`.
fn pos(slot: u32) -> usize {
    slot as usize
}

/// The slot of position `i`: every position fits, as `insert` refuses an
/// entry past `u32::MAX`.
fn slot(i: usize) -> u32 {
    i as u32
}

/// How a slot is hashed again when the table grows: by its entry's path.
fn rehasher<'a, V>(
    entries: &'a [(DrvPath, V)],
    hasher: &'a PathHasher,
) -> impl Fn(&u32) -> u64 + 'a {
    move |&s| hasher.hash_one(entries[pos(s)].0.as_str())
}

impl<V> DrvTable<V> {
    fn hash(&self, drv_path: &str) -> u64 {
        self.hasher.hash_one(drv_path)
    }

    fn find(&self, drv_path: &str) -> Option<usize> {
        let entries = &self.entries;
        self.slots
            .find(self.hash(drv_path), |&slot| {
                entries[pos(slot)].0.as_str() == drv_path
            })
            .map(|&slot| pos(slot))
    }

    pub fn get(&self, drv_path: &(impl Borrow<str> + ?Sized)) -> Option<&V> {
        self.find(drv_path.borrow()).map(|i| &self.entries[i].1)
    }

    pub fn contains_key(&self, drv_path: &(impl Borrow<str> + ?Sized)) -> bool {
        self.find(drv_path.borrow()).is_some()
    }

    /// Sets the value for `drv_path`; returns the one it replaces.
    pub fn insert(&mut self, drv_path: DrvPath, value: V) -> Option<V> {
        if let Some(i) = self.find(drv_path.as_str()) {
            return Some(std::mem::replace(&mut self.entries[i].1, value));
        }
        let Ok(new_slot) = u32::try_from(self.entries.len()) else {
            // Four billion held derivations: never in a queue that fits
            // in memory.
            panic!("DrvTable: more than u32::MAX entries");
        };
        let hash = self.hash(drv_path.as_str());
        self.entries.push((drv_path, value));
        self.slots
            .insert_unique(hash, new_slot, rehasher(&self.entries, &self.hasher));
        None
    }

    pub fn remove(&mut self, drv_path: &(impl Borrow<str> + ?Sized)) -> Option<V> {
        let drv_path: &str = drv_path.borrow();
        let hash = self.hash(drv_path);
        let entries = &self.entries;
        let found = self
            .slots
            .find_entry(hash, |&slot| entries[pos(slot)].0.as_str() == drv_path)
            .ok()?;
        let (removed, _) = found.remove();
        let i = pos(removed);
        let last = self.entries.len() - 1;
        if i != last {
            // The last entry moves to `i`: its slot follows.
            let moved = self.hash(self.entries[last].0.as_str());
            if let Some(s) = self.slots.find_mut(moved, |&s| s == slot(last)) {
                *s = slot(i);
            }
        }
        Some(self.entries.swap_remove(i).1)
    }

    /// Keeps the entries `keep` says yes to.
    pub fn retain(&mut self, mut keep: impl FnMut(&DrvPath, &V) -> bool) {
        let before = self.entries.len();
        self.entries.retain(|(path, value)| keep(path, value));
        if self.entries.len() == before {
            return;
        }
        self.entries.shrink_to_fit();
        self.slots.clear();
        self.slots.shrink_to(self.entries.len(), |_| 0);
        let (entries, hasher) = (&self.entries, &self.hasher);
        for (i, (path, _)) in entries.iter().enumerate() {
            self.slots.insert_unique(
                hasher.hash_one(path.as_str()),
                slot(i),
                rehasher(entries, hasher),
            );
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn keys(&self) -> impl Iterator<Item = &DrvPath> {
        self.entries.iter().map(|(path, _)| path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(i: usize) -> DrvPath {
        DrvPath::from(format!("/nix/store/{i:0>32}-n{i}.drv"))
    }

    /// Every operation, checked against a `HashMap` doing the same.
    #[test]
    fn behaves_as_a_map_through_inserts_removals_and_retains() {
        let mut table = DrvTable::default();
        let mut model = std::collections::HashMap::new();
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for round in 0..20_000usize {
            let key = path((next() % 3000) as usize);
            match next() % 4 {
                0 | 1 => assert_eq!(
                    table.insert(key.clone(), round),
                    model.insert(key.clone(), round)
                ),
                2 => assert_eq!(table.remove(key.as_str()), model.remove(&key)),
                _ => assert_eq!(table.get(key.as_str()), model.get(&key)),
            }
            if round % 5000 == 4999 {
                table.retain(|_, v| v % 3 != 0);
                model.retain(|_, v| *v % 3 != 0);
            }
            assert_eq!(table.len(), model.len());
        }
        for i in 0..3000 {
            let key = path(i);
            assert_eq!(table.get(key.as_str()), model.get(&key), "{key}");
            assert_eq!(table.contains_key(key.as_str()), model.contains_key(&key));
        }
        let mut keys: Vec<&str> = table.keys().map(DrvPath::as_str).collect();
        keys.sort_unstable();
        let mut expected: Vec<&str> = model.keys().map(DrvPath::as_str).collect();
        expected.sort_unstable();
        assert_eq!(keys, expected);
        assert!(table.get("/nix/store/absent.drv").is_none());
        assert!(table.remove("/nix/store/absent.drv").is_none());
    }
}
