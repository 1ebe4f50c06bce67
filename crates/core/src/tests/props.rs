//! Invariants under random DAGs and random event sequences.
//!
//! The simulation checks every command as it happens (no step dispatched
//! before its inputs are built, none twice at once, only to a compatible
//! machine with a free slot, every build finished once) and the core's own
//! invariants after every event (among them: each step's critical path
//! equals one computed from scratch, and each runnable step is queued under
//! its current key), under Hydra's order and the critical-path order. At
//! the end a capable machine joins and every build must finish.

use std::collections::BTreeSet;
use std::time::Duration;

use proptest::prelude::*;

use crate::sim::{Dag, Node, Sim};
use crate::{BuildId, Config, ConfiguredOrder, Core, StepFailure, StepOrder, StepOutcome};

const SYSTEMS: [&str; 3] = ["x86_64-linux", "aarch64-linux", "builtin"];
const FEATURES: [&str; 2] = ["big", "kvm"];

fn pick(mask: u8, names: &[&str]) -> Vec<String> {
    names
        .iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, n)| n.to_string())
        .collect()
}

/// Expected build times: unknown, zero, short, long, and one that
/// saturates any sum.
const EXPECTED_MS: [Option<u32>; 5] = [None, Some(0), Some(1_000), Some(90_000), Some(u32::MAX)];

/// A random DAG: node `i` may depend on nodes before it.
fn dag() -> impl Strategy<Value = (Dag, BTreeSet<String>)> {
    prop::collection::vec(
        (
            0usize..3,
            0u8..4,
            prop::collection::vec(any::<usize>(), 0..4),
            prop::bool::weighted(0.15),
            prop::sample::select(&EXPECTED_MS[..]),
        ),
        1..16,
    )
    .prop_map(|nodes| {
        let mut dag = Dag::default();
        let mut valid = BTreeSet::new();
        for (i, (system, features, inputs, is_valid, expected_ms)) in nodes.into_iter().enumerate()
        {
            let name = format!("n{i}");
            let mut inputs: Vec<String> = if i == 0 {
                Vec::new()
            } else {
                inputs.into_iter().map(|j| format!("n{}", j % i)).collect()
            };
            inputs.sort();
            inputs.dedup();
            // Some steps with inputs are content-addressed: resolved once
            // their inputs are built.
            let needs_resolution = !inputs.is_empty() && i % 3 == 0;
            dag.nodes.insert(
                name.clone(),
                Node {
                    system: SYSTEMS[system].to_string(),
                    features: pick(features, &FEATURES),
                    inputs,
                    needs_resolution,
                    expected_ms,
                },
            );
            if is_valid {
                valid.insert(name);
            }
        }
        (dag, valid)
    })
}

#[derive(Clone, Debug)]
enum Action {
    Connect {
        slot: u8,
        systems: u8,
        features: u8,
        mandatory: u8,
        jobs: u32,
    },
    Disconnect {
        slot: u8,
    },
    /// The connection drops (the machine keeps its steps), or comes back.
    Detach {
        slot: u8,
        back: bool,
    },
    Queue {
        top: usize,
        global: i8,
        priority: i8,
    },
    /// Several builds in one `BuildsQueued`.
    QueueBatch {
        tops: Vec<usize>,
    },
    Succeed {
        pick: usize,
    },
    Fail {
        pick: usize,
        kind: u8,
    },
    Advance {
        secs: u16,
    },
    Cancel {
        pick: usize,
    },
    Bump {
        pick: usize,
        global: i8,
    },
    StaleReport {
        node: usize,
        slot: u8,
    },
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        2 => (0u8..3, 1u8..4, 0u8..4, 0u8..4, 0u32..3).prop_map(|(slot, systems, features, mandatory, jobs)| {
            Action::Connect { slot, systems, features, mandatory, jobs }
        }),
        2 => (0u8..3).prop_map(|slot| Action::Disconnect { slot }),
        2 => (0u8..3, any::<bool>()).prop_map(|(slot, back)| Action::Detach { slot, back }),
        3 => (any::<usize>(), -2i8..3, -2i8..3).prop_map(|(top, global, priority)| Action::Queue { top, global, priority }),
        1 => proptest::collection::vec(any::<usize>(), 1..4).prop_map(|tops| Action::QueueBatch { tops }),
        4 => any::<usize>().prop_map(|pick| Action::Succeed { pick }),
        2 => (any::<usize>(), 0u8..5).prop_map(|(pick, kind)| Action::Fail { pick, kind }),
        2 => (0u16..200).prop_map(|secs| Action::Advance { secs }),
        1 => any::<usize>().prop_map(|pick| Action::Cancel { pick }),
        1 => (any::<usize>(), -2i8..5).prop_map(|(pick, global)| Action::Bump { pick, global }),
        1 => (any::<usize>(), 0u8..3).prop_map(|(node, slot)| Action::StaleReport { node, slot }),
    ]
}

/// Random tunables: single-attempt steps, immediate retries and a zero
/// grace period are all legal.
fn config() -> impl Strategy<Value = Config> {
    (1u32..4, 0u64..200, 0u64..30, 0u64..3).prop_map(|(max_tries, grace, retry, expected)| Config {
        max_unsupported_time: Duration::from_secs(grace),
        max_tries,
        retry_interval: Duration::from_secs(retry),
        retry_backoff: 2.0,
        share_window: std::time::Duration::from_secs(3600),
        expected_build_time: Duration::from_secs(expected * 30),
    })
}

fn nth<T: Clone>(items: impl IntoIterator<Item = T>, pick: usize) -> Option<T> {
    let items: Vec<T> = items.into_iter().collect();
    (!items.is_empty()).then(|| items[pick % items.len()].clone())
}

fn apply<O: StepOrder>(sim: &mut Sim<O>, action: Action, next_build: &mut i32) {
    match action {
        Action::Connect {
            slot,
            systems,
            features,
            mandatory,
            jobs,
        } => sim.connect(
            &format!("m{slot}"),
            pick(systems, &SYSTEMS[..2]),
            pick(features, &FEATURES),
            pick(mandatory, &FEATURES),
            // Some machines hold steps ahead of their slots.
            (jobs, u32::from(slot % 2)),
            1.0 + f32::from(slot),
        ),
        Action::Disconnect { slot } => sim.disconnect(&format!("m{slot}")),
        Action::Detach { slot, back } => {
            let name = format!("m{slot}");
            if sim.machines.contains_key(&name) {
                sim.act(&format!(
                    "{} {name}",
                    if back { "reattach" } else { "detach" }
                ));
            }
        }
        Action::Queue {
            top,
            global,
            priority,
        } => {
            let Some(top) = nth(sim.dag.nodes.keys().cloned(), top) else {
                return;
            };
            *next_build += 1;
            sim.queue(BuildId(*next_build), &top, global.into(), priority.into());
        }
        Action::QueueBatch { tops } => {
            let tops: Vec<String> = tops
                .into_iter()
                .filter_map(|top| nth(sim.dag.nodes.keys().cloned(), top))
                .collect();
            let builds: Vec<(BuildId, &str)> = tops
                .iter()
                .map(|top| {
                    *next_build += 1;
                    (BuildId(*next_build), top.as_str())
                })
                .collect();
            sim.queue_batch(&builds);
        }
        Action::Succeed { pick } => {
            if let Some(step) = nth(sim.running.keys().cloned(), pick) {
                sim.finish(&step, StepOutcome::Success);
            }
        }
        Action::Fail { pick, kind } => {
            if let Some(step) = nth(sim.running.keys().cloned(), pick) {
                let (failure, can_retry) = match kind {
                    0 => (StepFailure::Failed, false),
                    1 => (StepFailure::TimedOut, false),
                    2 => (StepFailure::Aborted, true),
                    3 => (StepFailure::Aborted, false),
                    _ => {
                        sim.finish(&step, StepOutcome::Refused);
                        return;
                    }
                };
                sim.finish(&step, StepOutcome::Failed { failure, can_retry });
            }
        }
        Action::Advance { secs } => sim.advance(Duration::from_secs(secs.into())),
        Action::Cancel { pick } => {
            if let Some(build) = nth(sim.queued.keys().copied(), pick) {
                sim.cancel(build);
            }
        }
        Action::Bump { pick, global } => {
            if let Some(build) = nth(sim.queued.keys().copied(), pick) {
                sim.act(&format!("bump {build} {global}"));
            }
        }
        Action::StaleReport { node, slot } => {
            let machine = format!("m{slot}");
            let Some(node) = nth(sim.dag.nodes.keys().cloned(), node) else {
                return;
            };
            let really_running = sim.running.get(&node).is_some_and(|(m, _)| *m == machine);
            if sim.machines.contains_key(&machine) && !really_running {
                sim.act(&format!("report {machine} {node} ok"));
                let rejected = sim
                    .trace
                    .last()
                    .is_some_and(|line| line.starts_with("rejected:"));
                assert!(
                    rejected,
                    "a result for a step not running there is rejected"
                );
            }
        }
    }
    sim.trace.clear();
}

proptest! {
    // 512 cases unless PROPTEST_CASES says otherwise.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(512),
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_histories_keep_the_invariants_and_every_build_finishes(
        (dag, valid) in dag(),
        config in config(),
        order in prop::sample::select(&ConfiguredOrder::ALL[..]),
        actions in prop::collection::vec(action(), 0..60),
    ) {
        let mut sim = Sim::with_core(dag, Core::with_order(config, order));
        sim.valid = valid;
        sim.check_hydra_order = order == ConfiguredOrder::Hydra;
        let mut next_build = 0;
        for action in actions {
            apply(&mut sim, action, &mut next_build);
        }
        prop_assert!(sim.drain(10_000), "builds left unfinished: {:?}", sim.queued);
        let stats = sim.core.stats();
        prop_assert_eq!(stats.builds_queued, 0);
        prop_assert_eq!(sim.core.step_count(), 0, "every step freed");
        prop_assert!(sim.core.index.is_empty());
        prop_assert_eq!(
            stats.steps_waiting + stats.steps_runnable + stats.steps_retry_pending + stats.steps_building,
            0
        );
        let finished = sim.finished.len() + sim.cancelled.len();
        prop_assert_eq!(finished, usize::try_from(next_build).unwrap_or(0));
    }
}
