//! A bounded map with approximately least-recently-used eviction, for
//! facts about store paths that never change once true (a valid path's
//! info, a derivation's static output paths): a cached value is never
//! stale, so the only question is how many to keep.
//!
//! Two generations of at most half the bound each: a hit in the old one
//! moves the entry to the young one, and a full young generation becomes
//! the old one (the old one is dropped). Invariant: it never holds more
//! than its bound; its lock is held only for map operations, never across
//! an `.await`.

use std::collections::HashMap;
use std::hash::Hash;

use parking_lot::Mutex;

pub struct BoundedCache<K, V> {
    half: usize,
    generations: Mutex<Generations<K, V>>,
}

struct Generations<K, V> {
    young: HashMap<K, V>,
    old: HashMap<K, V>,
}

impl<K: Hash + Eq, V> Generations<K, V> {
    fn insert(&mut self, half: usize, key: K, value: V) {
        if self.young.len() >= half {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(key, value);
    }
}

impl<K, V> std::fmt::Debug for BoundedCache<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.generations.lock();
        f.debug_struct("BoundedCache")
            .field("capacity", &(self.half * 2))
            .field("len", &(g.young.len() + g.old.len()))
            .finish()
    }
}

impl<K: Hash + Eq + Clone, V: Clone> BoundedCache<K, V> {
    /// A cache of at most `capacity` entries (at least 2).
    pub fn new(capacity: usize) -> Self {
        BoundedCache {
            half: (capacity / 2).max(1),
            generations: Mutex::new(Generations {
                young: HashMap::new(),
                old: HashMap::new(),
            }),
        }
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        let g = self.generations.lock();
        g.young.len() + g.old.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Passes the cached values of `keys` to `found`; returns the keys
    /// not cached.
    pub fn lookup(&self, keys: &[K], mut found: impl FnMut(V)) -> Vec<K> {
        let mut misses = Vec::new();
        let mut g = self.generations.lock();
        for key in keys {
            if let Some(value) = g.young.get(key) {
                found(value.clone());
            } else if let Some(value) = g.old.remove(key) {
                found(value.clone());
                g.insert(self.half, key.clone(), value);
            } else {
                misses.push(key.clone());
            }
        }
        misses
    }

    /// The cached value of `key`, if any.
    pub fn get(&self, key: &K) -> Option<V> {
        let mut value = None;
        self.lookup(std::slice::from_ref(key), |v| value = Some(v));
        value
    }

    pub fn insert(&self, entries: impl IntoIterator<Item = (K, V)>) {
        let mut g = self.generations.lock();
        for (key, value) in entries {
            g.insert(self.half, key, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::BoundedCache;

    #[test]
    fn holds_at_most_its_bound_and_keeps_what_is_used() {
        let cache: BoundedCache<u32, u32> = BoundedCache::new(4);
        cache.insert([(1, 10), (2, 20)]);
        // 1 and 2 become old when 3 arrives in a full young generation.
        cache.insert([(3, 30)]);
        assert_eq!(cache.get(&1), Some(10)); // moved back to the young one
        cache.insert([(4, 40)]); // young {3, 1} was full: old {3, 1}, 2 gone
        assert_eq!(cache.get(&2), None);
        assert_eq!(cache.get(&1), Some(10));
        assert!(cache.len() <= 4);
        let misses = cache.lookup(&[1, 5], |_| {});
        assert_eq!(misses, vec![5]);
    }
}
