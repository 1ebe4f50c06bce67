//! A full, slow consistency check of a [`Core`], for tests: every invariant
//! stated in the module docs, recomputed from scratch.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::dispatch::key_of;
use crate::graph::{Phase, Step};
use crate::order::{Priority, StepOrder};
use crate::Core;

impl<O: StepOrder> Core<O> {
    /// Returns the first violated invariant.
    pub(crate) fn check_invariants(&self) -> Result<(), String> {
        // Live steps are exactly those reachable from unfinished builds,
        // and their priority is the join over those builds.
        let mut live: HashMap<*const Step, Arc<Step>> = HashMap::new();
        let mut expected: HashMap<*const Step, Priority> = HashMap::new();
        for build in self.builds.values() {
            let mut seen = HashSet::new();
            let mut pending = vec![build.top.clone()];
            while let Some(step) = pending.pop() {
                if !seen.insert(Arc::as_ptr(&step)) {
                    continue;
                }
                let entry = expected.entry(Arc::as_ptr(&step)).or_insert(Priority::NONE);
                *entry = entry.join(build.priority());
                pending.extend(step.state.lock().deps.iter().cloned());
                live.insert(Arc::as_ptr(&step), step);
            }
        }

        let mut index_live = 0;
        for entry in self.index.entries() {
            let Some(step) = entry.upgrade() else {
                return Err("index keeps a dead entry".into());
            };
            let path = &step.drv_path;
            if !self
                .index
                .get(path.as_str())
                .is_some_and(|found| Arc::ptr_eq(&found, &step))
            {
                return Err(format!("index entry {path} is not found by its path"));
            }
            if !live.contains_key(&Arc::as_ptr(&step)) {
                return Err(format!("step {path} is alive but no build needs it"));
            }
            index_live += 1;
        }
        if index_live != live.len() {
            return Err(format!(
                "{} live steps but {index_live} indexed",
                live.len()
            ));
        }

        // Critical paths, from scratch: a step's expected time plus the
        // longest critical path among the live steps that need it.
        let mut dependents: HashMap<*const Step, Vec<*const Step>> = HashMap::new();
        for (ptr, step) in &live {
            for dep in &step.state.lock().deps {
                dependents.entry(Arc::as_ptr(dep)).or_default().push(*ptr);
            }
        }
        let mut paths: HashMap<*const Step, u32> = HashMap::new();
        for ptr in live.keys() {
            critical_path(*ptr, &live, &dependents, &mut paths);
        }
        for (ptr, step) in &live {
            let held = step.state.lock().critical_path_ms;
            if held != paths[ptr] {
                return Err(format!(
                    "{}: critical path {held} ms, expected {} ms",
                    step.drv_path, paths[ptr]
                ));
            }
        }

        // A runnable step is queued under the key of its current state.
        let mut runnable_in_queues: HashSet<*const Step> = HashSet::new();
        for (_, class) in self.classes.iter() {
            for (key, step) in class.live_entries() {
                let current = key_of(&self.order, class, &step, &step.state.lock());
                if key != current {
                    return Err(format!("{}: queued under a stale key", step.drv_path));
                }
                runnable_in_queues.insert(Arc::as_ptr(&step));
            }
        }
        let retry_tickets: HashSet<u64> = self.retries.keys().map(|(_, ticket)| *ticket).collect();
        let (mut waiting, mut runnable, mut delayed, mut running, mut resolving) = (0, 0, 0, 0, 0);
        for (ptr, step) in &live {
            let state = step.state.lock();
            let name = &step.drv_path;
            if state.priority != expected[ptr] {
                return Err(format!(
                    "{name}: priority {:?}, expected {:?}",
                    state.priority, expected[ptr]
                ));
            }
            if (state.phase == Phase::Waiting) == state.deps.is_empty() {
                return Err(format!(
                    "{name}: phase {:?} with {} deps",
                    state.phase,
                    state.deps.len()
                ));
            }
            match state.phase {
                Phase::Waiting => waiting += 1,
                Phase::Runnable { .. } => {
                    runnable += 1;
                    if !runnable_in_queues.contains(ptr) {
                        return Err(format!("{name}: runnable but not queued"));
                    }
                }
                Phase::Delayed { until } => {
                    delayed += 1;
                    if !retry_tickets.contains(&state.ticket) || until <= self.now {
                        return Err(format!("{name}: retry timer missing or overdue"));
                    }
                }
                Phase::Running { machine, build } => {
                    running += 1;
                    let slot = self
                        .machines
                        .get(&machine)
                        .and_then(|m| m.running.iter().find(|s| s.drv_path == *name));
                    match slot {
                        Some(slot)
                            if std::ptr::eq(slot.step.as_ptr(), *ptr) && slot.build == build => {}
                        _ => return Err(format!("{name}: running on {machine} without its slot")),
                    }
                    // `build` may have finished since (cancelled while
                    // another build still needs the step): the attempt stays
                    // recorded under it.
                }
                Phase::Resolving => {
                    resolving += 1;
                    if !state.needs_resolution() {
                        return Err(format!("{name}: resolving a step that needs no resolution"));
                    }
                }
                Phase::Finished => return Err(format!("{name}: finished but still needed")),
            }
            if state.resolved() && state.deps.len() != 1 {
                return Err(format!("{name}: resolved with {} deps", state.deps.len()));
            }
        }
        let counted = (
            self.counts.waiting,
            self.counts.runnable,
            self.counts.delayed,
            self.counts.running,
            self.counts.resolving,
        );
        if counted != (waiting, runnable, delayed, running, resolving) {
            return Err(format!(
                "phase counters {counted:?}, actual {:?}",
                (waiting, runnable, delayed, running, resolving)
            ));
        }

        for machine in self.machines.values() {
            if machine.running.len() > machine.capacity() {
                return Err(format!("{} runs more than its slots", machine.id));
            }
            for slot in &machine.running {
                let Some(step) = slot.step.upgrade() else {
                    return Err(format!(
                        "{} keeps a slot for freed {}",
                        machine.id, slot.drv_path
                    ));
                };
                let phase = step.state.lock().phase;
                if phase
                    != (Phase::Running {
                        machine: machine.id,
                        build: slot.build,
                    })
                {
                    return Err(format!(
                        "{}: slot for {} in phase {phase:?}",
                        machine.id, slot.drv_path
                    ));
                }
            }
            for (class_id, class) in self.classes.iter() {
                let listed = machine.classes.contains(&class_id);
                if listed != machine.can_build(class)
                    || listed != class.machines.contains(&machine.id)
                {
                    return Err(format!(
                        "{}: stale compatibility with {}",
                        machine.id, class.system
                    ));
                }
                if listed && machine.has_free_slot() && !class.live_steps().is_empty() {
                    return Err(format!(
                        "{} has a free slot while {} steps wait",
                        machine.id, class.system
                    ));
                }
            }
        }
        for (_, class) in self.classes.iter() {
            if class.machines.is_empty() != class.unsupported_since.is_some() {
                return Err(format!(
                    "class {}: unsupported_since out of date",
                    class.system
                ));
            }
        }
        Ok(())
    }
}

/// The critical path of `ptr` from scratch (memoised in `paths`), walking
/// up through `dependents` without recursion.
fn critical_path(
    ptr: *const Step,
    live: &HashMap<*const Step, Arc<Step>>,
    dependents: &HashMap<*const Step, Vec<*const Step>>,
    paths: &mut HashMap<*const Step, u32>,
) -> u32 {
    let mut pending = vec![ptr];
    while let Some(&top) = pending.last() {
        if paths.contains_key(&top) {
            pending.pop();
            continue;
        }
        let above = dependents.get(&top).map_or(&[][..], Vec::as_slice);
        let missing: Vec<*const Step> = above
            .iter()
            .filter(|d| !paths.contains_key(*d))
            .copied()
            .collect();
        if missing.is_empty() {
            let longest = above.iter().map(|d| paths[d]).max().unwrap_or(0);
            let expected = live[&top].state.lock().expected_ms;
            paths.insert(top, expected.saturating_add(longest));
            pending.pop();
        } else {
            pending.extend(missing);
        }
    }
    paths[&ptr]
}
