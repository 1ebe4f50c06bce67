//! Critical paths kept up to date as builds come and go, the queue
//! re-keyed when they change, and the critical-path order finishing a DAG
//! sooner than Hydra's. (Every `Sim` event also checks each value against
//! one computed from scratch.)

use std::collections::BTreeMap;

use super::scenarios::config;
use crate::sim::{drv, Dag, Sim};
use crate::{Config, ConfiguredOrder, Core, CriticalPathOrder, StepOrder};

/// Expected times in seconds (`~N`). Critical paths: e 1, d 101, c 6,
/// b 121, a 131.
const GRAPH: &str = "
    a: x86_64-linux ~10
    b: x86_64-linux ~20 <- a
    c: x86_64-linux ~5 <- a
    d: x86_64-linux ~100 <- b
    e: x86_64-linux ~1 <- c d
";

fn critical_path_sim(dag: &str) -> Sim<CriticalPathOrder> {
    Sim::with_core(
        Dag::parse(dag),
        Core::with_order(config(), CriticalPathOrder),
    )
}

/// The critical path of every held step, in seconds.
fn paths<O: StepOrder>(sim: &Sim<O>) -> BTreeMap<String, u32> {
    sim.dag
        .nodes
        .keys()
        .filter_map(|name| {
            let step = sim.core.lookup(drv(name).as_str())?;
            let ms = step.state.lock().critical_path_ms;
            Some((name.clone(), ms / 1000))
        })
        .collect()
}

fn expect(pairs: &[(&str, u32)]) -> BTreeMap<String, u32> {
    pairs.iter().map(|(n, s)| (n.to_string(), *s)).collect()
}

#[test]
fn values_are_the_same_whatever_order_the_builds_come_in() {
    let all = expect(&[("a", 131), ("b", 121), ("c", 6), ("d", 101), ("e", 1)]);
    for script in [
        // The whole closure at once.
        "queue #1 e",
        // Bottom up: every build raises what lies below it.
        "queue #1 a\nqueue #2 b\nqueue #3 c\nqueue #4 d\nqueue #5 e",
        // Top down: later builds find their steps there already.
        "queue #1 e\nqueue #2 d\nqueue #3 c\nqueue #4 b\nqueue #5 a",
        // The short side first, then the long one, then what joins them.
        "queue #1 c\nqueue #2 d\nqueue #3 e",
        // Bottom up, then top down, each in one event: the critical paths
        // are computed once for the batch.
        "queue-batch #1 a #2 b #3 c #4 d #5 e",
        "queue-batch #1 e #2 d #3 c #4 b #5 a",
        // A batch on top of what is held.
        "queue #1 c\nqueue-batch #2 d #3 e",
    ] {
        let mut sim = critical_path_sim(GRAPH);
        sim.run(script);
        assert_eq!(paths(&sim), all, "after {script:?}");
    }
}

#[test]
fn a_shared_dependency_takes_the_longest_of_its_dependents() {
    let mut sim = critical_path_sim(GRAPH);
    sim.run("queue #1 c");
    assert_eq!(paths(&sim), expect(&[("a", 15), ("c", 5)]));
    sim.run("queue #2 b");
    assert_eq!(paths(&sim), expect(&[("a", 30), ("b", 20), ("c", 5)]));
    sim.run("queue #3 d");
    assert_eq!(
        paths(&sim),
        expect(&[("a", 130), ("b", 120), ("c", 5), ("d", 100)])
    );
}

#[test]
fn a_cancelled_build_lowers_what_it_alone_made_long() {
    let mut sim = critical_path_sim(GRAPH);
    sim.run("queue #1 c\nqueue #2 e");
    assert_eq!(paths(&sim)["a"], 131);
    sim.run("cancel #2");
    assert_eq!(paths(&sim), expect(&[("a", 15), ("c", 5)]));
    sim.run("queue #3 d");
    assert_eq!(paths(&sim)["a"], 130, "raised again");
}

#[test]
fn a_failed_build_lowers_what_it_alone_made_long() {
    let mut sim = critical_path_sim(
        "
        base: x86_64-linux ~10
        x: aarch64-linux ~1
        long: x86_64-linux ~100 <- base x
        short: x86_64-linux ~5 <- base
        ",
    );
    sim.run("queue #1 long\nqueue #2 short");
    assert_eq!(paths(&sim)["base"], 110);
    sim.run(
        "
        connect arm aarch64-linux
        > dispatch x -> arm for #1
        fail x
        > finished #1 dep-failed by x
        ",
    );
    assert_eq!(paths(&sim), expect(&[("base", 15), ("short", 5)]));
}

#[test]
fn a_resolved_step_passes_its_expected_time_to_its_resolved_derivation() {
    let dag = "
        dep: x86_64-linux ~5
        o: x86_64-linux !resolve ~50 <- dep
        top: x86_64-linux ~10 <- o
        r: x86_64-linux
        r2: x86_64-linux ~30
    ";
    for (resolved_to, expected) in [("r", 60), ("r2", 40)] {
        let mut sim = critical_path_sim(dag);
        sim.run(
            "
            connect m1 x86_64-linux
            queue #1 top
            > dispatch dep -> m1 for #1
            ok dep
            > resolve o for #1
            ",
        );
        assert_eq!(paths(&sim), expect(&[("o", 60), ("top", 10)]));
        sim.run(&format!(
            "resolved o -> {resolved_to}\n> dispatch {resolved_to} -> m1 for #1"
        ));
        assert_eq!(
            paths(&sim),
            expect(&[("o", 10), (resolved_to, expected), ("top", 10)]),
            "resolved to {resolved_to}: no time of its own, the work is below"
        );
    }
}

/// `blocker` keeps the one slot busy while `p` (older build) and `q` are
/// queued with equal critical paths; `top` then makes `q`'s path long.
const REKEY: &str = "
    blocker: x86_64-linux ~1
    p: x86_64-linux ~10
    q: x86_64-linux ~10
    top: x86_64-linux ~100 <- q
";

#[test]
fn a_queued_step_whose_path_grows_is_re_keyed_and_goes_first() {
    let mut sim = critical_path_sim(REKEY);
    sim.run(
        "
        connect m1 x86_64-linux
        queue #1 blocker
        > dispatch blocker -> m1 for #1
        queue #2 p
        queue #3 q
        queue #4 top
        ok blocker
        > finished #1 succeeded
        > dispatch q -> m1 for #3
        ",
    );
}

#[test]
fn a_queued_step_whose_path_shrinks_is_re_keyed_and_waits() {
    let mut sim = critical_path_sim(REKEY);
    sim.run(
        "
        connect m1 x86_64-linux
        queue #1 blocker
        > dispatch blocker -> m1 for #1
        queue #2 p
        queue #3 q
        queue #4 top
        cancel #4
        ok blocker
        > finished #1 succeeded
        > dispatch p -> m1 for #2
        ",
    );
}

/// Four short builds queued before a chain of three: Hydra's order takes
/// the older builds first and leaves the chain to run alone at the end.
const CHAIN_AND_SHORTS: &str = "
    s1: x86_64-linux ~10
    s2: x86_64-linux ~10
    s3: x86_64-linux ~10
    s4: x86_64-linux ~10
    c1: x86_64-linux ~10
    c2: x86_64-linux ~10 <- c1
    c3: x86_64-linux ~10 <- c2
";

fn makespan(order: ConfiguredOrder) -> u64 {
    let core = Core::with_order(config(), order);
    let mut sim = Sim::with_core(Dag::parse(CHAIN_AND_SHORTS), core);
    sim.check_hydra_order = order == ConfiguredOrder::Hydra;
    for action in [
        "queue #1 s1",
        "queue #2 s2",
        "queue #3 s3",
        "queue #4 s4",
        "queue #5 c3",
        "connect m1 x86_64-linux",
        "connect m2 x86_64-linux",
    ] {
        sim.act(action);
    }
    sim.run_timed(1_000).0 / 1000
}

#[test]
fn the_critical_path_order_finishes_a_dag_sooner_than_hydras() {
    // 70 s of work on two slots, a 30 s chain: 40 s is the best possible.
    assert_eq!(makespan("hydra".parse().unwrap()), 50);
    assert_eq!(makespan("critical-path".parse().unwrap()), 40);
}

#[test]
fn the_critical_path_order_starts_the_chain_first() {
    let mut sim = critical_path_sim(CHAIN_AND_SHORTS);
    sim.run(
        "
        queue #1 s1
        queue #2 s2
        queue #3 s3
        queue #4 s4
        queue #5 c3
        connect m1 x86_64-linux
        > dispatch c1 -> m1 for #5
        connect m2 x86_64-linux
        > dispatch s1 -> m2 for #1
        ok c1
        > dispatch c2 -> m1 for #5
        ok s1
        > finished #1 succeeded
        > dispatch s2 -> m2 for #2
        # c3, s3 and s4 all have 10 s left: the older builds go first.
        ok c2
        > dispatch s3 -> m1 for #3
        ok s2
        > finished #2 succeeded
        > dispatch s4 -> m2 for #4
        ok s3
        > finished #3 succeeded
        > dispatch c3 -> m1 for #5
        ",
    );
}

#[test]
fn an_unknown_expected_time_counts_as_the_configured_default() {
    let mut sim = Sim::with_core(
        Dag::parse("a: x86_64-linux\nb: x86_64-linux ~1 <- a"),
        Core::with_order(
            Config {
                expected_build_time: std::time::Duration::from_secs(7),
                ..config()
            },
            CriticalPathOrder,
        ),
    );
    sim.run("queue #1 b");
    assert_eq!(paths(&sim), expect(&[("a", 8), ("b", 1)]));
}
