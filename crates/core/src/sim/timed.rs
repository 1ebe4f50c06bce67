//! Timed runs: every dispatched step succeeds after its expected time (the
//! DAG's `~SECONDS`), the clock jumps from one completion to the next, and
//! the run ends when no build is left: the makespan of an order.

use crate::{Millis, StepOrder, StepOutcome};

use super::Sim;

impl<O: StepOrder> Sim<O> {
    /// Builds everything queued, each step taking its expected time (or
    /// `default_ms`); returns when the last build finished. Panics if
    /// builds remain while nothing runs (no machine can build them).
    pub fn run_timed(&mut self, default_ms: u32) -> Millis {
        while !self.queued.is_empty() {
            let next = self
                .running
                .keys()
                .map(|step| {
                    let took = self.dag.nodes[step].expected_ms.unwrap_or(default_ms);
                    let started = self.started.get(step).copied().unwrap_or(Millis::ZERO);
                    (Millis(started.0 + u64::from(took)), step.clone())
                })
                .min();
            let Some((done, step)) = next else {
                panic!("builds left but nothing running: {:?}", self.queued);
            };
            self.now = self.now.max(done);
            self.started.remove(&step);
            self.finish(&step, StepOutcome::Success);
        }
        self.now
    }
}
