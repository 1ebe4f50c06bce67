//! Scripted scenarios of work that outlives a connection or a restart:
//! detached machines, claims adopted after a restart, and retries sent to
//! another machine.

use super::scenarios::{config, DIAMOND};
use crate::sim::Sim;

#[test]
fn a_detached_machine_keeps_its_steps_and_takes_no_new_ones_until_it_returns() {
    let mut sim = Sim::new(DIAMOND, config());
    sim.run(
        "
        connect m1 x86_64-linux slots=2
        queue #1 d
        > dispatch a -> m1 for #1
        ok a
        > dispatch c -> m1 for #1
        > dispatch b -> m1 for #1
        detach m1
        # c ends while the connection is down: the result still counts.
        ok c
        reattach m1
        ok b
        > dispatch d -> m1 for #1
        ok d
        > finished #1 succeeded
        ",
    );
}

#[test]
fn a_detached_machine_gets_nothing_new_and_loses_its_steps_when_given_up() {
    let mut sim = Sim::new(DIAMOND, config());
    sim.run(
        "
        connect m1 x86_64-linux slots=2
        queue #1 d
        > dispatch a -> m1 for #1
        detach m1
        connect m2 x86_64-linux
        disconnect m1
        > requeue a from m1 (try 1) until 60s
        advance 60
        > dispatch a -> m2 for #1 (attempt 2)
        ",
    );
}

#[test]
fn a_claimed_step_is_adopted_by_its_machine_when_loaded_and_never_dispatched_elsewhere() {
    let mut sim = Sim::new(DIAMOND, config());
    sim.run(
        "
        valid a
        connect m2 x86_64-linux speed=4
        connect m1 x86_64-linux slots=2
        claim b m1
        queue #1 d
        > adopt b on m1 for #1
        > dispatch c -> m2 for #1
        ok b
        ok c
        > dispatch d -> m2 for #1
        ok d
        > finished #1 succeeded
        ",
    );
}

#[test]
fn a_claim_that_cannot_be_honoured_is_refused_and_the_step_is_scheduled() {
    let mut sim = Sim::new(DIAMOND, config());
    sim.run(
        "
        valid a
        connect m1 x86_64-linux
        connect m2 x86_64-linux
        # d cannot run before b and c: the claim is refused when made.
        queue #1 d
        > dispatch c -> m1 for #1
        > dispatch b -> m2 for #1
        claim d m1
        > refuse adoption of d on m1
        ok b
        ok c
        > dispatch d -> m1 for #1
        ok d
        > finished #1 succeeded
        ",
    );
}

#[test]
fn a_claim_for_a_full_or_gone_machine_is_refused_and_a_withdrawn_one_is_forgotten() {
    let mut sim = Sim::new(DIAMOND, config());
    sim.run(
        "
        valid a
        connect m1 x86_64-linux
        claim b m1
        claim c m1
        withdraw c
        queue #1 d
        > adopt b on m1 for #1
        connect m2 x86_64-linux
        > dispatch c -> m2 for #1
        ",
    );
    let mut sim = Sim::new(DIAMOND, config());
    sim.run(
        "
        valid a
        connect m1 x86_64-linux
        claim b m1
        claim c m1
        # One slot: the step made runnable first gets it.
        queue #1 d
        > adopt c on m1 for #1
        > refuse adoption of b on m1
        connect m2 x86_64-linux
        > dispatch b -> m2 for #1
        ",
    );
}

#[test]
fn a_retry_goes_to_another_free_machine_and_stays_if_there_is_none() {
    let mut sim = Sim::new(
        "
        a: x86_64-linux
        b: x86_64-linux
        ",
        config(),
    );
    sim.run(
        "
        connect m1 x86_64-linux speed=2
        queue #1 a
        > dispatch a -> m1 for #1
        connect m2 x86_64-linux
        fail a aborted retry
        > requeue a from m1 (try 1) until 60s
        advance 60
        > dispatch a -> m2 for #1 (attempt 2)
        # No other machine is free: the retry takes the one it failed on.
        queue #2 b
        > dispatch b -> m1 for #2
        fail a aborted retry
        > requeue a from m2 (try 2) until 180s
        fail b aborted retry
        > requeue b from m1 (try 1) until 120s
        advance 60
        > dispatch b -> m2 for #2 (attempt 2)
        advance 60
        > dispatch a -> m1 for #1 (attempt 3)
        ",
    );
}
