//! Builds queued several to one event (`BuildsQueued`, as the queue
//! runner loads them): a build may leave out the steps an earlier build of
//! the batch brings, and must still get them when that build creates none.

use super::scenarios::config;
use crate::{
    BuildId, BuildSpec, Command, Core, DrvPath, Event, HydraOrder, JobsetId, Millis, Status,
    StepSpec,
};

fn path(name: &str) -> DrvPath {
    DrvPath::from(format!("/nix/store/{name:a>32}-{name}.drv"))
}

fn spec(name: &str, inputs: &[&str], known_failed: bool) -> StepSpec {
    StepSpec {
        drv_path: path(name),
        system: "x86_64-linux".to_string(),
        required_features: Vec::new(),
        input_drvs: inputs.iter().map(|i| path(i)).collect(),
        known_failed,
        needs_resolution: false,
        expected_ms: None,
    }
}

fn build(id: i32, top: &str) -> BuildSpec {
    BuildSpec {
        id: BuildId(id),
        jobset: JobsetId(1),
        global_priority: 0,
        priority: 0,
        timestamp: 0,
        top_drv: path(top),
    }
}

#[test]
fn a_step_left_out_after_a_build_that_failed_at_once_is_still_created() {
    // a needs x (known to fail) and y; b needs y. Build 1 (a) brings x and
    // y and finishes at once as a cached failure, creating nothing; build
    // 2 (b) leaves y out, as an earlier build of the batch brought it.
    let mut core = Core::with_order(config(), HydraOrder);
    let commands = core.handle(
        Event::BuildsQueued {
            builds: vec![
                (
                    build(1, "a"),
                    vec![
                        spec("x", &[], true),
                        spec("y", &[], false),
                        spec("a", &["x", "y"], false),
                    ],
                ),
                (build(2, "b"), vec![spec("b", &["y"], false)]),
            ],
        },
        Millis::ZERO,
    );
    let finished: Vec<(BuildId, Status)> = commands
        .iter()
        .filter_map(|c| match c {
            Command::BuildFinished(f) => Some((f.build, f.status)),
            _ => None,
        })
        .collect();
    assert_eq!(finished, vec![(BuildId(1), Status::DepFailed)]);
    assert!(core.has_step(path("y").as_str()), "y is a step of build 2");
    assert!(core.has_step(path("b").as_str()));
    assert!(!core.has_step(path("x").as_str()));
    let stats = core.stats();
    assert_eq!((stats.steps_runnable, stats.steps_waiting), (1, 1));
}
