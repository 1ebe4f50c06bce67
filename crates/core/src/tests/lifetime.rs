//! Steps live exactly as long as an unfinished build needs them.

use std::sync::{Arc, Weak};

use crate::graph::Step;
use crate::sim::{drv, Sim};
use crate::Config;

fn weak_step(sim: &Sim, name: &str) -> Weak<Step> {
    let step = sim
        .core
        .lookup(drv(name).as_str())
        .unwrap_or_else(|| panic!("{name} has a step"));
    Arc::downgrade(&step)
}

const GRAPH: &str = "
    base: x86_64-linux
    left: x86_64-linux <- base
    right: x86_64-linux <- base
";

#[test]
fn a_step_is_freed_when_the_last_build_needing_it_goes() {
    let mut sim = Sim::new(GRAPH, Config::default());
    sim.run("queue #1 left\nqueue #2 right");
    assert_eq!(sim.core.steps_unindexed(), 0, "steps were only added");
    let (base, left, right) = (
        weak_step(&sim, "base"),
        weak_step(&sim, "left"),
        weak_step(&sim, "right"),
    );

    sim.run("cancel #1");
    assert!(left.upgrade().is_none(), "left was only needed by #1");
    assert!(base.upgrade().is_some(), "#2 still needs base");
    assert!(sim.core.lookup(drv("left").as_str()).is_none());
    assert_eq!(sim.core.index.len(), 2, "the index forgets freed steps");
    assert_eq!(sim.core.steps_unindexed(), 1, "one step left the index");

    sim.run("cancel #2");
    assert!(right.upgrade().is_none());
    assert!(base.upgrade().is_none());
    assert!(sim.core.index.is_empty());
    assert_eq!(
        sim.core.stats().steps_runnable + sim.core.stats().steps_waiting,
        0
    );
}

#[test]
fn a_built_step_is_freed_and_a_failed_closure_with_it() {
    let mut sim = Sim::new(GRAPH, Config::default());
    sim.run(
        "
        connect m1 x86_64-linux
        queue #1 left
        > dispatch base -> m1 for #1
        ",
    );
    let (base, left) = (weak_step(&sim, "base"), weak_step(&sim, "left"));
    let unindexed = sim.core.steps_unindexed();
    sim.run("ok base\n> dispatch left -> m1 for #1");
    assert_eq!(
        sim.core.steps_unindexed(),
        unindexed + 1,
        "a built step leaves the index"
    );
    assert!(
        base.upgrade().is_none(),
        "a built step is dropped by its parents"
    );
    sim.run("fail left\n> finished #1 failed by left");
    assert!(left.upgrade().is_none());
    assert!(sim.core.index.is_empty());
    assert!(sim.core.builds.is_empty());
}

#[test]
fn a_late_build_shares_the_live_step_instead_of_creating_one() {
    let mut sim = Sim::new(GRAPH, Config::default());
    sim.run("queue #1 left");
    let base = weak_step(&sim, "base");
    sim.run("queue #2 right");
    let again = weak_step(&sim, "base");
    assert!(Weak::ptr_eq(&base, &again));
    let rdeps = base.upgrade().map(|b| b.state.lock().rdeps.len());
    assert_eq!(rdeps, Some(2));
}

#[test]
fn the_index_finds_steps_by_the_path_they_hold() {
    let mut sim = Sim::new(GRAPH, Config::default());
    sim.run("queue #1 left");
    let step = sim.core.lookup(drv("base").as_str()).unwrap();
    // Looked up by a path in another allocation: equal strings match.
    let copy = String::from(drv("base").as_str());
    let found = sim.core.index.get(&copy).unwrap();
    assert!(Arc::ptr_eq(&found, &step));
    assert!(sim.core.index.get(&format!("{copy}x")).is_none());
    // Removing by another step's pointer leaves the entry.
    assert!(!sim.core.index.remove(&copy, std::ptr::null()));
    assert!(sim.core.index.get(&copy).is_some());
}

#[test]
fn trimming_gives_back_spare_dependents_and_drops_dead_ones() {
    let mut graph = String::from("base: x86_64-linux\n");
    for i in 0..5 {
        graph.push_str(&format!("d{i}: x86_64-linux <- base\n"));
    }
    let mut sim = Sim::new(&graph, Config::default());
    for i in 0..5 {
        sim.run(&format!("queue #{} d{i}", i + 1));
    }
    let base = weak_step(&sim, "base").upgrade().expect("base is held");
    let rdeps = |base: &Arc<Step>| {
        let state = base.state.lock();
        (state.rdeps.len(), state.rdeps.capacity())
    };
    // Five pushes one at a time: the vector doubled past five.
    assert_eq!(rdeps(&base).0, 5);
    assert!(rdeps(&base).1 > 5, "{:?}", rdeps(&base));
    assert!(!sim.core.grown.is_empty());

    let d0 = weak_step(&sim, "d0").upgrade().expect("d0 is held");
    let deps = {
        let state = d0.state.lock();
        (state.deps.len(), state.deps.capacity())
    };
    assert_eq!(deps, (1, 1), "a step's dependencies have no spare room");

    sim.run("cancel #5");
    sim.core.trim_dependents();
    assert_eq!(rdeps(&base), (4, 4), "no spare room, no dead entry");
    assert!(sim.core.grown.is_empty());
    sim.core.check_invariants().expect("invariants hold");
}
