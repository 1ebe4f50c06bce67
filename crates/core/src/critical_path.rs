//! Each held step's critical path: the longest expected build time from the
//! step to the top of the graph, through the steps that need it.
//!
//! `cp(s) = expected(s) + max(cp(d) for each unfinished step d needing s)`,
//! just `expected(s)` when no step needs it, in milliseconds, saturating.
//! [`crate::CriticalPathOrder`] dispatches the longest first, so the long
//! chains of work start early.
//!
//! Invariant: every held step's `critical_path_ms` is exactly that value,
//! and a runnable step is queued under the key computed with it (both
//! checked from scratch after every event in tests). Values flow from
//! dependents down to their dependencies, so only a step that gains or
//! loses a dependent changes, and with it only steps below it:
//! - a step that finishes changes nothing: its dependencies are built, and
//!   no value above it depends on its own;
//! - the new steps of a queued build have only new dependents: their values
//!   are computed in one pass, dependents first; the existing steps they
//!   depend on can only rise ([`Core::raise_critical_paths`]);
//! - a cancelled or failed build frees steps; the steps they needed that
//!   survive can only fall ([`Core::lower_critical_paths`]).
//!
//! Both walks visit only the region that can change, found from the values
//! themselves, and change each step there once: never the whole graph, and
//! never the same step again and again as a naive propagation would on a
//! ladder of diamonds. A raise takes the largest rises first; a fall
//! recomputes its region dependents first.

use std::collections::{BinaryHeap, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Weak};

use crate::dispatch::key_of;
use crate::graph::{Phase, Step, StepState};
use crate::order::StepOrder;
use crate::Core;

impl<O: StepOrder> Core<O> {
    /// Computes the critical paths of a batch of new steps, `created` in
    /// creation order (dependencies first), whose dependents are all in the
    /// batch; then raises the existing steps they depend on. Call before
    /// any of them is queued.
    pub(crate) fn critical_paths_of_new_steps(&mut self, created: &[Arc<Step>]) {
        let new: HashSet<*const Step> = created.iter().map(Arc::as_ptr).collect();
        let mut raised: HashMap<*const Step, (Arc<Step>, u32)> = HashMap::new();
        // Dependents first: each step's value is final when it is reached.
        for step in created.iter().rev() {
            let (value, deps) = {
                let state = step.state.lock();
                (state.critical_path_ms, state.deps.clone())
            };
            for dep in deps {
                let mut state = dep.state.lock();
                let candidate = state.expected_ms.saturating_add(value);
                if new.contains(&Arc::as_ptr(&dep)) {
                    state.critical_path_ms = state.critical_path_ms.max(candidate);
                    continue;
                }
                drop(state);
                let entry = raised.entry(Arc::as_ptr(&dep)).or_insert((dep, 0));
                entry.1 = entry.1.max(candidate);
            }
        }
        self.raise_critical_paths(raised.into_values().collect());
    }

    /// Raises each seed's critical path to at least the value given with it
    /// (it gained a dependent), and the steps below accordingly.
    ///
    /// A step's rise is exact from its dependents' rises: with old values,
    /// `rise(s) = max(0, max over dependents d of rise(d) - slack(d, s))`,
    /// where `slack(d, s) = cp(s) - expected(s) - cp(d) >= 0`. Rises only
    /// shrink along edges, so, taken largest first (as Dijkstra's
    /// algorithm takes the nearest), each step's rise is final when it is
    /// taken: the walk visits only steps that do rise, and their direct
    /// dependencies, each step raised once.
    pub(crate) fn raise_critical_paths(&mut self, seeds: Vec<(Arc<Step>, u32)>) {
        // The largest rise found so far for each step not yet raised.
        let mut best: PtrMap<(Arc<Step>, u32)> = PtrMap::default();
        let mut heap: BinaryHeap<(u32, usize)> = BinaryHeap::new();
        let offer = |best: &mut PtrMap<(Arc<Step>, u32)>,
                     heap: &mut BinaryHeap<(u32, usize)>,
                     step: Arc<Step>,
                     rise: u32| {
            let key = Arc::as_ptr(&step) as usize;
            match best.get_mut(&key) {
                Some(entry) if entry.1 >= rise => return,
                Some(entry) => entry.1 = rise,
                None => {
                    best.insert(key, (step, rise));
                }
            }
            heap.push((rise, key));
        };
        for (step, value) in seeds {
            let current = step.state.lock().critical_path_ms;
            if value > current {
                offer(&mut best, &mut heap, step, value - current);
            }
        }
        let mut rekey = Vec::new();
        while let Some((rise, key)) = heap.pop() {
            let Some((step, best_rise)) = best.get(&key) else {
                continue;
            };
            if rise < *best_rise {
                continue; // a stale entry: a larger rise was offered since
            }
            let step = step.clone();
            best.remove(&key);
            let (value, deps) = {
                let mut state = step.state.lock();
                let value = state.critical_path_ms.saturating_add(rise);
                if self.set_critical_path(&step, &mut state, value) {
                    rekey.push(step.clone());
                }
                (value, state.deps.clone())
            };
            for dep in deps {
                let rise = {
                    let state = dep.state.lock();
                    state
                        .expected_ms
                        .saturating_add(value)
                        .saturating_sub(state.critical_path_ms)
                };
                if rise > 0 {
                    offer(&mut best, &mut heap, dep, rise);
                }
            }
        }
        for step in rekey {
            self.requeue(&step);
        }
    }

    /// Restores exact critical paths after `roots` (the steps that
    /// survived the freeing of some of their dependents) lost dependents.
    ///
    /// A step can fall only if it lost a dependent or a dependent on a
    /// tight edge (`cp(dep) = expected(dep) + cp(dependent)`) fell; the
    /// region reachable from the roots through tight edges is found first,
    /// then ordered (dependents first, over every edge inside it), then
    /// each step in it is recomputed once from its remaining dependents.
    pub(crate) fn lower_critical_paths(&mut self, roots: &[Weak<Step>]) {
        let roots: Vec<Arc<Step>> = roots.iter().filter_map(Weak::upgrade).collect();
        if roots.is_empty() {
            return;
        }
        let reachable = post_order(roots, |dependent_path, _, dep| {
            dep.critical_path_ms == dep.expected_ms.saturating_add(dependent_path)
        });
        let region: HashSet<*const Step> = reachable.iter().map(Arc::as_ptr).collect();
        let order = post_order(reachable, |_, dep, _| {
            region.contains(&std::ptr::from_ref(dep))
        });
        let mut rekey = Vec::new();
        for step in order.iter().rev() {
            let dependents: Vec<Arc<Step>> = step
                .state
                .lock()
                .rdeps
                .iter()
                .filter_map(Weak::upgrade)
                .collect();
            let longest = dependents
                .iter()
                .map(|d| d.state.lock().critical_path_ms)
                .max()
                .unwrap_or(0);
            let mut state = step.state.lock();
            let value = state.expected_ms.saturating_add(longest);
            if self.set_critical_path(step, &mut state, value) {
                rekey.push(step.clone());
            }
        }
        for step in rekey {
            self.requeue(&step);
        }
    }

    /// Gives a step (resolved just now) a new expected time, keeping its
    /// critical path exact. It must have no dependencies.
    pub(crate) fn set_expected(&mut self, step: &Arc<Step>, expected_ms: u32) {
        let dependents: Vec<Arc<Step>> = {
            let mut state = step.state.lock();
            debug_assert!(
                state.deps.is_empty(),
                "the steps below would keep stale values"
            );
            state.expected_ms = expected_ms;
            state.rdeps.iter().filter_map(Weak::upgrade).collect()
        };
        let longest = dependents
            .iter()
            .map(|d| d.state.lock().critical_path_ms)
            .max()
            .unwrap_or(0);
        let rekey = {
            let mut state = step.state.lock();
            self.set_critical_path(step, &mut state, expected_ms.saturating_add(longest))
        };
        if rekey {
            self.requeue(step);
        }
    }

    /// Sets a step's critical path. Returns whether it is runnable and its
    /// key changed (then the caller must requeue it, after unlocking).
    fn set_critical_path(&self, step: &Step, state: &mut StepState, value: u32) -> bool {
        if state.critical_path_ms == value {
            return false;
        }
        let runnable = matches!(state.phase, Phase::Runnable { .. });
        let class = self.classes.get(step.class);
        let before = runnable.then(|| key_of(&self.order, class, step, state));
        state.critical_path_ms = value;
        before.is_some_and(|before| before != key_of(&self.order, class, step, state))
    }
}

/// The steps reachable from `roots` through the dependency edges `follow`
/// accepts, in depth-first post-order: on every followed edge the
/// dependency comes before its dependent. `follow(cp, dep, dep_state)`
/// is asked about an edge from a dependent whose critical path is `cp`;
/// it sees values as they were before the walk (the walk changes nothing).
/// Each step's mutex is locked alone.
fn post_order(
    roots: Vec<Arc<Step>>,
    mut follow: impl FnMut(u32, &Step, &StepState) -> bool,
) -> Vec<Arc<Step>> {
    let mut visited: HashSet<*const Step> = HashSet::new();
    let mut order = Vec::new();
    let mut children = |step: &Arc<Step>| -> Vec<Arc<Step>> {
        let (value, deps) = {
            let state = step.state.lock();
            (state.critical_path_ms, state.deps.clone())
        };
        deps.into_iter()
            .filter(|dep| follow(value, dep, &dep.state.lock()))
            .collect()
    };
    // (step, its followed dependencies not yet entered)
    let mut stack: Vec<(Arc<Step>, Vec<Arc<Step>>)> = Vec::new();
    for root in roots {
        if !visited.insert(Arc::as_ptr(&root)) {
            continue;
        }
        let next = children(&root);
        stack.push((root, next));
        while let Some((_, pending)) = stack.last_mut() {
            match pending.pop() {
                Some(child) => {
                    if visited.insert(Arc::as_ptr(&child)) {
                        let next = children(&child);
                        stack.push((child, next));
                    }
                }
                None => {
                    if let Some((step, _)) = stack.pop() {
                        order.push(step);
                    }
                }
            }
        }
    }
    order
}

/// Hashes a step's address: addresses are unique and already spread, so
/// one multiplication mixes them enough (SipHash was a fifth of the time
/// spent raising critical paths at farm scale).
#[derive(Default)]
struct PtrHasher(u64);

impl Hasher for PtrHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_usize(&mut self, n: usize) {
        self.0 = (n as u64)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(29);
    }
}

/// A map keyed by a step's address.
type PtrMap<V> = HashMap<usize, V, BuildHasherDefault<PtrHasher>>;
