//! The dispatch order is pluggable.

use crate::sim::{Dag, Sim};
use crate::{Config, Core, DrvPath, StepOrder, StepView};

/// Dispatches by derivation path, ignoring priorities: enough to show that
/// the core orders by the plugged-in key and nothing else.
struct ByPath;

impl StepOrder for ByPath {
    type Key = DrvPath;

    fn key(&self, step: &StepView<'_>) -> DrvPath {
        step.drv_path.clone()
    }
}

#[test]
fn a_plugged_in_order_decides_what_goes_first() {
    let dag = Dag::parse("c: x86_64-linux\na: x86_64-linux\nb: x86_64-linux");
    let mut sim = Sim::with_core(dag, Core::with_order(Config::default(), ByPath));
    sim.run(
        "
        queue #1 c global=9
        queue #2 b prio=9
        queue #3 a
        connect m1 x86_64-linux
        > dispatch a -> m1 for #3
        ok a
        > finished #3 succeeded
        > dispatch b -> m1 for #2
        ok b
        > finished #2 succeeded
        > dispatch c -> m1 for #1
        ",
    );
}
