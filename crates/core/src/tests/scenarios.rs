//! Scripted scenarios: a DAG, a fleet, a script of events, and the exact
//! trace each event must produce.

use std::time::Duration;

use crate::sim::Sim;
use crate::Config;

pub(super) fn config() -> Config {
    Config {
        max_unsupported_time: Duration::from_secs(120),
        max_tries: 3,
        retry_interval: Duration::from_secs(60),
        retry_backoff: 2.0,
        share_window: std::time::Duration::from_secs(3600),
        expected_build_time: Duration::from_secs(60),
    }
}

pub(super) const DIAMOND: &str = "
    a: x86_64-linux
    b: x86_64-linux <- a
    c: x86_64-linux <- a
    d: x86_64-linux <- b c
";

#[test]
fn diamond_is_built_bottom_up_one_slot() {
    let mut sim = Sim::new(DIAMOND, config());
    sim.run(
        "
        connect m1 x86_64-linux
        queue #1 d
        > dispatch a -> m1 for #1
        ok a
        > dispatch c -> m1 for #1
        ok c
        > dispatch b -> m1 for #1
        ok b
        > dispatch d -> m1 for #1
        ok d
        > finished #1 succeeded
        ",
    );
    assert_eq!(sim.core.stats().steps_done, 4);
    assert_eq!(sim.core.step_count(), 0, "finished steps are freed");
}

#[test]
fn diamond_sides_build_in_parallel_once_the_base_is_done() {
    let mut sim = Sim::new(DIAMOND, config());
    sim.run(
        "
        queue #1 d
        connect m1 x86_64-linux slots=4
        > dispatch a -> m1 for #1
        ok a
        > dispatch c -> m1 for #1
        > dispatch b -> m1 for #1
        ok b
        ok c
        > dispatch d -> m1 for #1
        ok d
        > finished #1 succeeded
        ",
    );
}

#[test]
fn a_dependency_shared_by_builds_is_built_once() {
    let mut sim = Sim::new(
        "
        lib: x86_64-linux
        app1: x86_64-linux <- lib
        app2: x86_64-linux <- lib
        app3: x86_64-linux <- lib
        ",
        config(),
    );
    sim.run(
        "
        connect m1 x86_64-linux slots=2
        queue #1 app1
        > dispatch lib -> m1 for #1
        queue #2 app2
        ok lib
        > dispatch app1 -> m1 for #1
        > dispatch app2 -> m1 for #2
        ok app1
        > finished #1 succeeded
        # lib's outputs are valid now: the driver leaves it out of #3.
        queue #3 app3
        > dispatch app3 -> m1 for #3
        ok app2
        > finished #2 succeeded
        ok app3
        > finished #3 succeeded
        ",
    );
    assert_eq!(sim.core.stats().dispatches, 4);
}

#[test]
fn a_build_whose_outputs_are_valid_finishes_cached() {
    let mut sim = Sim::new(DIAMOND, config());
    sim.run(
        "
        valid a b c d
        queue #1 d
        > finished #1 succeeded (cached)
        ",
    );
    assert_eq!(sim.core.stats().builds_succeeded, 1);
}

#[test]
fn the_builds_needing_a_step_include_those_needing_it_through_others() {
    let mut sim = Sim::new(DIAMOND, config());
    sim.run(
        "
        queue #1 d
        queue #2 b
        queue #3 c
        ",
    );
    let ids = |drv: &str| -> Vec<u64> {
        sim.core
            .builds_needing(crate::sim::drv(drv).as_str())
            .into_iter()
            .map(|b| b.0 as u64)
            .collect()
    };
    assert_eq!(ids("a"), vec![1, 2, 3]);
    assert_eq!(ids("b"), vec![1, 2]);
    assert_eq!(ids("d"), vec![1]);
    assert!(ids("nothing").is_empty());
}

#[test]
fn a_build_needing_a_known_failure_finishes_cached_without_dispatch() {
    let mut sim = Sim::new(DIAMOND, config());
    sim.run(
        "
        connect m1 x86_64-linux
        failed b
        queue #1 d
        > finished #1 dep-failed (cached) by b
        queue #2 b
        > finished #2 failed (cached) by b
        queue #3 c
        > dispatch a -> m1 for #3
        ",
    );
    assert_eq!(sim.core.step_count(), 2, "only #3's steps exist");
}

#[test]
fn global_priority_then_build_priority_then_oldest_build() {
    let mut sim = Sim::new(
        "
        p1: x86_64-linux
        p2: x86_64-linux
        p3: x86_64-linux
        p4: x86_64-linux
        ",
        config(),
    );
    sim.run(
        "
        queue #1 p1
        queue #2 p2 prio=5
        queue #3 p3 global=1
        queue #4 p4
        connect m1 x86_64-linux
        > dispatch p3 -> m1 for #3
        bump #4 10
        ok p3
        > finished #3 succeeded
        > dispatch p4 -> m1 for #4
        ok p4
        > finished #4 succeeded
        > dispatch p2 -> m1 for #2
        ok p2
        > finished #2 succeeded
        > dispatch p1 -> m1 for #1
        ",
    );
}

#[test]
fn a_shared_step_takes_the_highest_priority_of_its_builds_and_loses_it_again() {
    let queue_four_builds = |then: &str| {
        let mut sim = Sim::new(
            "
            low: x86_64-linux
            mid: x86_64-linux
            shared: x86_64-linux
            urgent: x86_64-linux <- shared
            ",
            config(),
        );
        sim.run("queue #1 low\nqueue #2 mid prio=1\nqueue #3 shared\nqueue #4 urgent global=5");
        sim.run(then);
    };
    // The urgent build lifts `shared`, which is recorded under #3, the
    // build whose top it is.
    queue_four_builds(
        "
        connect m1 x86_64-linux
        > dispatch shared -> m1 for #3
        ",
    );
    // Bumping #4 down again restores the plain order.
    queue_four_builds(
        "
        bump #4 0
        connect m1 x86_64-linux
        > dispatch mid -> m1 for #2
        ",
    );
    // So does cancelling it.
    queue_four_builds(
        "
        cancel #4
        connect m1 x86_64-linux
        > dispatch mid -> m1 for #2
        ",
    );
}

#[test]
fn machines_get_only_steps_matching_system_features_and_mandatory_features() {
    let mut sim = Sim::new(
        "
        plain: x86_64-linux
        kvm: x86_64-linux kvm
        big: x86_64-linux big
        bigkvm: x86_64-linux big kvm
        arm: aarch64-linux
        bi: builtin
        ",
        config(),
    );
    sim.run(
        "
        connect fast x86_64-linux features=kvm slots=4 speed=2
        connect huge x86_64-linux mandatory=big features=kvm slots=4
        queue #1 plain
        > dispatch plain -> fast for #1
        queue #2 kvm
        > dispatch kvm -> fast for #2
        queue #3 big
        > dispatch big -> huge for #3
        queue #4 bigkvm
        > dispatch bigkvm -> huge for #4
        queue #5 arm
        queue #6 bi
        > dispatch bi -> fast for #6
        connect pi aarch64-linux
        > dispatch arm -> pi for #5
        ",
    );
}

#[test]
fn faster_machines_are_filled_first() {
    let mut sim = Sim::new("a: x86_64-linux\nb: x86_64-linux", config());
    sim.run(
        "
        queue #1 a
        queue #2 b
        connect slow x86_64-linux speed=1
        > dispatch a -> slow for #1
        disconnect slow
        > requeue a from slow (try 1) until 60s
        connect slow x86_64-linux speed=1
        > dispatch b -> slow for #2
        connect fast x86_64-linux speed=3
        advance 60
        > dispatch a -> fast for #1 (attempt 2)
        ",
    );
}

#[test]
fn a_step_no_machine_can_build_fails_as_unsupported_after_the_grace_period() {
    let mut sim = Sim::new(
        "
        arm: aarch64-linux
        app: x86_64-linux <- arm
        tool: x86_64-linux <- arm
        ",
        config(),
    );
    sim.run(
        "
        connect m1 x86_64-linux
        queue #1 app
        queue #2 tool
        queue #3 arm
        advance 119
        advance 1
        > unsupported arm: #3 #1 #2
        > finished #3 unsupported, #1 unsupported, #2 unsupported by arm
        ",
    );
    assert_eq!(sim.core.stats().steps_unsupported, 1);
    assert_eq!(sim.core.step_count(), 0);
    assert_eq!(sim.core.next_deadline(), None);
}

#[test]
fn a_machine_connecting_within_the_grace_period_saves_the_step() {
    let mut sim = Sim::new("arm: aarch64-linux", config());
    sim.run(
        "
        queue #1 arm
        advance 100
        connect pi aarch64-linux
        > dispatch arm -> pi for #1
        advance 500
        ",
    );
}

#[test]
fn the_grace_period_restarts_when_the_last_capable_machine_leaves() {
    let mut sim = Sim::new("arm: aarch64-linux", config());
    sim.run(
        "
        connect pi aarch64-linux
        queue #1 arm
        > dispatch arm -> pi for #1
        advance 10
        disconnect pi
        > requeue arm from pi (try 1) until 70s
        # runnable again at 70 s; unsupported 120 s later.
        advance 60
        advance 119
        advance 1
        > unsupported arm: #1
        > finished #1 unsupported by arm
        ",
    );
    assert_eq!(sim.core.next_deadline(), None);
}

#[test]
fn a_failure_finishes_every_build_that_needs_the_step() {
    let mut sim = Sim::new(
        "
        a: x86_64-linux
        b: x86_64-linux <- a
        c: x86_64-linux <- b
        x: x86_64-linux <- a
        y: x86_64-linux
        ",
        config(),
    );
    sim.run(
        "
        queue #1 c
        queue #2 b
        queue #3 x
        queue #4 a
        queue #5 y
        connect m1 x86_64-linux slots=2
        > dispatch a -> m1 for #4
        > dispatch y -> m1 for #5
        fail a
        > finished #4 failed, #1 dep-failed, #2 dep-failed, #3 dep-failed by a
        ok y
        > finished #5 succeeded
        ",
    );
    let stats = sim.core.stats();
    assert_eq!((stats.builds_failed, stats.builds_succeeded), (4, 1));
    assert_eq!(sim.core.step_count(), 0);
}

#[test]
fn a_timeout_propagates_as_a_timeout_like_hydra() {
    let mut sim = Sim::new(DIAMOND, config());
    sim.run(
        "
        connect m1 x86_64-linux
        queue #1 d
        > dispatch a -> m1 for #1
        queue #2 b
        fail a timed-out
        > finished #1 timed-out, #2 timed-out by a
        ",
    );
}

#[test]
fn a_failure_cancels_running_steps_only_the_failed_builds_needed() {
    let mut sim = Sim::new(
        "
        a: x86_64-linux
        z: x86_64-linux
        w: x86_64-linux
        top: x86_64-linux <- a z w
        other: x86_64-linux <- w
        ",
        config(),
    );
    sim.run(
        "
        connect m1 x86_64-linux slots=3
        queue #1 top
        > dispatch w -> m1 for #1
        > dispatch z -> m1 for #1
        > dispatch a -> m1 for #1
        queue #2 other
        fail a
        > finished #1 dep-failed by a
        > cancel z on m1
        report m1 z ok
        > rejected: finishing step z on machine 1: the step is not running there
        ok w
        > dispatch other -> m1 for #2
        ",
    );
}

#[test]
fn retryable_failures_back_off_then_fail_after_max_tries() {
    let mut sim = Sim::new("a: x86_64-linux\nb: x86_64-linux <- a", config());
    sim.run(
        "
        connect m1 x86_64-linux
        queue #1 b
        > dispatch a -> m1 for #1
        fail a aborted retry
        > requeue a from m1 (try 1) until 60s
        advance 59
        advance 1
        > dispatch a -> m1 for #1 (attempt 2)
        fail a aborted retry
        > requeue a from m1 (try 2) until 180s
        advance 120
        > dispatch a -> m1 for #1 (attempt 3)
        fail a aborted retry
        > finished #1 aborted by a
        ",
    );
    assert_eq!(sim.core.stats().retries, 2);
}

#[test]
fn a_disconnected_machines_steps_are_requeued_and_built_elsewhere() {
    let mut sim = Sim::new(DIAMOND, config());
    sim.run(
        "
        connect m1 x86_64-linux slots=2
        queue #1 d
        > dispatch a -> m1 for #1
        ok a
        > dispatch c -> m1 for #1
        > dispatch b -> m1 for #1
        connect m2 x86_64-linux
        disconnect m1
        > requeue c from m1 (try 1) until 60s
        > requeue b from m1 (try 1) until 60s
        advance 60
        > dispatch c -> m2 for #1 (attempt 2)
        ok c
        > dispatch b -> m2 for #1 (attempt 2)
        ok b
        > dispatch d -> m2 for #1
        ok d
        > finished #1 succeeded
        ",
    );
}

#[test]
fn cancelling_a_build_cancels_its_running_steps_unless_another_build_needs_them() {
    let mut sim = Sim::new(DIAMOND, config());
    sim.run(
        "
        connect m1 x86_64-linux
        queue #1 d
        > dispatch a -> m1 for #1
        queue #2 c
        cancel #1
        ok a
        > dispatch c -> m1 for #2
        cancel #2
        > cancel c on m1
        cancel #2
        > rejected: updating build #2: no such unfinished build
        ",
    );
    assert_eq!(sim.core.step_count(), 0);
    assert_eq!(
        sim.core.stats().builds_done,
        0,
        "cancelled builds are not 'done'"
    );
}

#[test]
fn nonsensical_events_are_rejected_without_harm() {
    let mut sim = Sim::new(
        "x: x86_64-linux <- y\ny: x86_64-linux <- x\nok: x86_64-linux",
        config(),
    );
    sim.run(
        "
        queue #1 x
        > rejected: queueing build #1: derivation x is on a dependency cycle; the build is aborted
        > finished #1 aborted
        connect m1 x86_64-linux
        queue #2 ok
        > dispatch ok -> m1 for #2
        report m1 x ok
        > rejected: finishing step x on machine 1: the step is not running there
        disconnect nobody
        ",
    );
    let rejected = sim.core.handle(
        crate::Event::BuildQueued {
            build: crate::BuildSpec {
                id: crate::BuildId(2),
                jobset: crate::JobsetId(1),
                global_priority: 0,
                priority: 0,
                timestamp: 0,
                top_drv: crate::sim::drv("ok"),
            },
            steps: Vec::new(),
        },
        sim.now,
    );
    assert_eq!(
        rejected,
        vec![crate::Command::EventRejected(
            crate::EventError::BuildAlreadyQueued(crate::BuildId(2))
        )]
    );
}

#[test]
fn time_going_backwards_is_treated_as_the_latest_time() {
    let mut sim = Sim::new("a: x86_64-linux", config());
    sim.run(
        "
        connect m1 x86_64-linux
        queue #1 a
        > dispatch a -> m1 for #1
        advance 30
        fail a aborted retry
        > requeue a from m1 (try 1) until 90s
        ",
    );
    // A driver clock glitch must not fire the retry early or panic.
    sim.now = crate::Millis::ZERO;
    sim.run("tick");
    assert_eq!(sim.core.now(), crate::Millis::from_secs(30));
    assert_eq!(sim.core.next_deadline(), Some(crate::Millis::from_secs(90)));
}

#[test]
fn stats_count_steps_builds_and_machines() {
    let mut sim = Sim::new(DIAMOND, config());
    sim.run(
        "
        connect m1 x86_64-linux slots=2
        connect m2 aarch64-linux
        queue #1 d
        > dispatch a -> m1 for #1
        ok a
        > dispatch c -> m1 for #1
        > dispatch b -> m1 for #1
        ok c
        ",
    );
    let stats = sim.core.stats();
    assert_eq!(
        (
            stats.steps_waiting,
            stats.steps_runnable,
            stats.steps_building,
            stats.steps_done
        ),
        (1, 0, 1, 2)
    );
    assert_eq!((stats.builds_queued, stats.builds_done), (1, 0));
    assert_eq!(
        (
            stats.machines_total,
            stats.machines_in_use,
            stats.slots_total,
            stats.slots_busy
        ),
        (2, 1, 3, 1)
    );
    let machines = sim.core.machines();
    assert_eq!(machines[0].name, "m1");
    assert_eq!(machines[0].steps_done, 2);
    assert_eq!(machines[0].running.len(), 1);
    assert!(machines[0].has_capacity);
    assert_eq!(machines[1].systems, vec!["aarch64-linux".to_string()]);
}

#[test]
fn a_free_slot_takes_the_most_urgent_head_across_the_classes_its_machine_builds() {
    let mut sim = Sim::new(
        "
        plain: x86_64-linux
        kvm: x86_64-linux kvm
        bi: builtin
        ",
        config(),
    );
    sim.run(
        "
        queue #1 plain prio=1
        queue #2 kvm prio=3
        queue #3 bi prio=2
        connect m1 x86_64-linux features=kvm
        > dispatch kvm -> m1 for #2
        ok kvm
        > finished #2 succeeded
        > dispatch bi -> m1 for #3
        ok bi
        > finished #3 succeeded
        > dispatch plain -> m1 for #1
        ",
    );
}

#[test]
fn a_disconnect_that_exhausts_the_tries_finishes_the_build_without_cancelling_on_the_lost_machine()
{
    let mut sim = Sim::new(
        "
        a: x86_64-linux
        b: x86_64-linux
        top: x86_64-linux <- a b
        ",
        Config {
            max_tries: 1,
            ..config()
        },
    );
    sim.run(
        "
        connect m1 x86_64-linux slots=2
        queue #1 top
        > dispatch b -> m1 for #1
        > dispatch a -> m1 for #1
        disconnect m1
        > finished #1 aborted by b
        ",
    );
    assert_eq!(sim.core.step_count(), 0);
}

const TWO_JOBSETS: &str = "
    a1: x86_64-linux
    a2: x86_64-linux
    a3: x86_64-linux
    b1: x86_64-linux
    b2: x86_64-linux
    b3: x86_64-linux
";

#[test]
fn jobsets_with_equal_shares_take_turns_on_one_machine() {
    let mut sim = Sim::new(TWO_JOBSETS, config());
    sim.run(
        "
        queue #1 a1 jobset=1
        queue #2 a2 jobset=1
        queue #3 a3 jobset=1
        queue #4 b1 jobset=2
        queue #5 b2 jobset=2
        queue #6 b3 jobset=2
        connect m1 x86_64-linux
        > dispatch a1 -> m1 for #1
        advance 10
        ok a1
        > finished #1 succeeded
        > dispatch b1 -> m1 for #4
        advance 10
        ok b1
        > finished #4 succeeded
        > dispatch a2 -> m1 for #2
        advance 10
        ok a2
        > finished #2 succeeded
        > dispatch b2 -> m1 for #5
        ",
    );
}

#[test]
fn global_priority_still_beats_shares() {
    let mut sim = Sim::new(TWO_JOBSETS, config());
    sim.run(
        "
        queue #1 a1 jobset=1
        queue #2 a2 jobset=1
        queue #4 b1 jobset=2
        connect m1 x86_64-linux
        > dispatch a1 -> m1 for #1
        bump #2 5
        advance 10
        ok a1
        > finished #1 succeeded
        > dispatch a2 -> m1 for #2
        ",
    );
}

#[test]
fn build_time_follows_the_shares() {
    let mut dag = String::new();
    for i in 0..40 {
        dag += &format!("a{i}: x86_64-linux\nb{i}: x86_64-linux\n");
    }
    let mut sim = Sim::new(&dag, config());
    sim.act("shares 1 300");
    sim.act("shares 2 100");
    for i in 0..40 {
        sim.act(&format!("queue #{} a{i} jobset=1", 2 * i + 1));
        sim.act(&format!("queue #{} b{i} jobset=2", 2 * i + 2));
    }
    sim.act("connect m1 x86_64-linux");
    let mut built = (0, 0);
    for _ in 0..40 {
        let running: Vec<String> = sim.running.keys().cloned().collect();
        let [step] = running.as_slice() else {
            panic!("one step at a time: {running:?}");
        };
        if step.starts_with('a') {
            built.0 += 1;
        } else {
            built.1 += 1;
        }
        sim.act("advance 10");
        sim.act(&format!("ok {step}"));
    }
    assert_eq!(built, (30, 10), "300:100 shares give 3:1 of the time");
}
