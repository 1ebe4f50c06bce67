//! Scripted scenarios of steps whose derivations are resolved before they
//! are built (content-addressed inputs): the resolved derivation becomes a
//! step of its own, shared when two steps resolve to it (early cutoff),
//! skipped when its outputs are known, and its failure is the failure of
//! the steps resolved into it.

use super::scenarios::config;
use crate::sim::Sim;

/// `b` and `c` are content-addressed and use `a`'s output; both resolve
/// to `rb`. `d` uses `b`.
const CA: &str = "
    a: x86_64-linux
    b: x86_64-linux !resolve <- a
    c: x86_64-linux !resolve <- a
    d: x86_64-linux !resolve <- b
    rb: x86_64-linux
    rd: x86_64-linux
";

#[test]
fn a_step_is_resolved_once_its_inputs_are_built_and_completes_with_its_resolved_step() {
    let mut sim = Sim::new(CA, config());
    sim.run(
        "
        connect m1 x86_64-linux
        queue #1 b
        > dispatch a -> m1 for #1
        ok a
        > resolve b for #1
        resolved b -> rb
        > dispatch rb -> m1 for #1
        ok rb
        > finished #1 succeeded
        ",
    );
}

#[test]
fn two_steps_resolving_to_one_derivation_share_its_step_which_is_built_once() {
    let mut sim = Sim::new(CA, config());
    sim.run(
        "
        connect m1 x86_64-linux slots=2
        queue #1 b
        > dispatch a -> m1 for #1
        queue #2 c
        ok a
        > resolve b for #1
        > resolve c for #2
        resolved b -> rb
        > dispatch rb -> m1 for #1
        resolved c -> rb
        ok rb
        > finished #1 succeeded
        > finished #2 succeeded
        ",
    );
}

#[test]
fn a_resolved_derivation_whose_outputs_are_known_is_not_built() {
    let mut sim = Sim::new(CA, config());
    sim.run(
        "
        connect m1 x86_64-linux
        valid a
        queue #1 d
        > resolve b for #1
        resolved b valid
        > resolve d for #1
        resolved d -> rd
        > dispatch rd -> m1 for #1
        ok rd
        > finished #1 succeeded
        ",
    );
}

#[test]
fn the_resolved_steps_failure_fails_the_build_of_its_original_and_dep_fails_the_rest() {
    let mut sim = Sim::new(CA, config());
    sim.run(
        "
        connect m1 x86_64-linux
        valid a
        queue #1 b
        > resolve b for #1
        queue #2 d
        resolved b -> rb
        > dispatch rb -> m1 for #1
        fail rb
        > finished #1 failed, #2 dep-failed by rb
        ",
    );
}

#[test]
fn a_step_that_cannot_be_resolved_fails_for_good() {
    let mut sim = Sim::new(CA, config());
    sim.run(
        "
        connect m1 x86_64-linux
        valid a
        queue #1 d
        > resolve b for #1
        resolved b fails
        > finished #1 aborted by b
        ",
    );
}

#[test]
fn a_resolution_for_a_step_not_being_resolved_is_rejected() {
    let mut sim = Sim::new(CA, config());
    sim.run(
        "
        connect m1 x86_64-linux
        queue #1 b
        > dispatch a -> m1 for #1
        resolved b valid
        > rejected: resolving step b: the step is not being resolved
        ",
    );
}

#[test]
fn cancelling_the_build_cancels_the_resolved_step_it_runs() {
    let mut sim = Sim::new(CA, config());
    sim.run(
        "
        connect m1 x86_64-linux
        valid a
        queue #1 b
        > resolve b for #1
        resolved b -> rb
        > dispatch rb -> m1 for #1
        cancel #1
        > cancel rb on m1
        ",
    );
}
