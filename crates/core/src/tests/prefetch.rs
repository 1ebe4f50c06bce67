//! Steps held ahead of a machine's slots, and assignments a machine
//! refuses: scripted scenarios on the simulated fleet.

use super::scenarios::config;
use crate::sim::Sim;

#[test]
fn a_refused_assignment_is_queued_again_at_once_without_costing_a_try() {
    let mut sim = Sim::new("a: x86_64-linux", config());
    sim.run(
        "
        connect m1 x86_64-linux
        queue #1 a
        > dispatch a -> m1 for #1
        refuse a
        > dispatch a -> m1 for #1
        ok a
        > finished #1 succeeded
        ",
    );
    assert_eq!(sim.core.stats().retries, 0);
    assert_eq!(sim.core.stats().refusals, 1);
}

#[test]
fn a_refused_step_goes_to_another_machine_with_an_idle_slot() {
    let mut sim = Sim::new("a: x86_64-linux\nb: x86_64-linux", config());
    sim.run(
        "
        connect m1 x86_64-linux speed=2
        queue #1 a
        > dispatch a -> m1 for #1
        connect m2 x86_64-linux
        refuse a
        > dispatch a -> m2 for #1
        ",
    );
}

#[test]
fn steps_go_ahead_to_a_busy_machine_only_once_every_slot_is_busy() {
    let mut sim = Sim::new(
        "a: x86_64-linux\nb: x86_64-linux\nc: x86_64-linux\nd: x86_64-linux\ne: x86_64-linux",
        config(),
    );
    sim.run(
        "
        connect m1 x86_64-linux speed=2 prefetch=1
        connect m2 x86_64-linux prefetch=1
        queue #1 a
        > dispatch a -> m1 for #1
        queue #2 b
        > dispatch b -> m2 for #2
        queue #3 c
        > dispatch c -> m1 for #3
        queue #4 d
        > dispatch d -> m2 for #4
        queue #5 e
        ok a
        > finished #1 succeeded
        > dispatch e -> m1 for #5
        ",
    );
}
