//! The core's heap per held step at farm scale. Run with `cargo bench -p
//! sluice-core --bench memory`; prints figures. `SLUICE_BENCH_STEPS` and
//! `SLUICE_BENCH_BUILDS` change the size (default 270,000 derivations and
//! 100,000 builds), and `SLUICE_BENCH_LOAD_BATCH` the builds per event
//! (default 250, the queue runner's default `load-batch`).
//!
//! The graph has the shape of the queue runner's scale bench (a bootstrap
//! chain, then derivations with 10 to 30 inputs, half of them among the
//! first 1% as stdenv's are, half anywhere before); the last derivations
//! are the builds' tops. The builds are queued as the driver queues them:
//! 250 to an event, each with only the steps of its closure that the core
//! does not hold yet. A counting
//! allocator measures the bytes allocated and not freed once every build is
//! held, with the step specs already dropped, as the driver drops them.
//! This is the core's share of the queue runner's memory; the queue
//! runner's `scale` bench measures the whole process.
#![allow(clippy::disallowed_methods)] // the bench, not the core, reads the clock

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use sluice_core::{
    BuildId, BuildSpec, Config, ConfiguredOrder, Core, DrvPath, Event, JobsetId, Millis, StepSpec,
};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's guarantees are passed on.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's guarantees are passed on.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's guarantees are passed on.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            LIVE.fetch_add(new_size, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const BOOTSTRAP: usize = 20;
/// Builds per event, as the queue runner loads them by default
/// (`load-batch`).
const LOAD_BATCH: usize = 250;

struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn drv_path(i: usize) -> String {
    // As long as a real one: 32 hash characters and a name.
    format!("/nix/store/{i:0>32}-n{i}-bench1234.drv")
}

fn main() {
    let steps = env_usize("SLUICE_BENCH_STEPS", 270_000).max(BOOTSTRAP + 1);
    let load_batch = env_usize("SLUICE_BENCH_LOAD_BATCH", LOAD_BATCH).max(1);
    let builds = env_usize("SLUICE_BENCH_BUILDS", 100_000).min(steps);
    let mut rng = XorShift(0x5ca1_ab1e_0000_0001);
    let mut inputs: Vec<Vec<u32>> = Vec::with_capacity(steps);
    for i in 0..steps {
        let mut picked: BTreeSet<usize> = BTreeSet::new();
        if i > 0 && i < BOOTSTRAP {
            picked.insert(i - 1);
        } else if i >= BOOTSTRAP {
            picked.insert(BOOTSTRAP - 1);
            let wanted = 10 + rng.below(21) as usize;
            let popular = (i / 100).max(BOOTSTRAP);
            for k in 0..wanted {
                let pick = if k % 2 == 0 {
                    rng.below(popular as u64) as usize
                } else {
                    rng.below(i as u64) as usize
                };
                picked.insert(pick);
            }
        }
        inputs.push(picked.into_iter().map(|j| j as u32).collect());
    }
    for order in [ConfiguredOrder::CriticalPath, ConfiguredOrder::Hydra] {
        let name = order.to_string();
        let before = LIVE.load(Ordering::Relaxed);
        let started = Instant::now();
        let mut core = Core::with_order(Config::default(), order);
        let mut held = vec![false; steps];
        let mut batch = Vec::new();
        for (n, top) in (steps - builds..steps).enumerate() {
            // The closure's steps not held yet, inputs first.
            let mut closure = Vec::new();
            let mut stack = vec![(top, 0usize)];
            if !held[top] {
                held[top] = true;
                while let Some((at, next)) = stack.last().copied() {
                    match inputs[at].get(next) {
                        Some(&input) => {
                            if let Some(frame) = stack.last_mut() {
                                frame.1 += 1;
                            }
                            let input = input as usize;
                            if !held[input] {
                                held[input] = true;
                                stack.push((input, 0));
                            }
                        }
                        None => {
                            stack.pop();
                            closure.push(at);
                        }
                    }
                }
            }
            let specs = closure
                .into_iter()
                .map(|i| StepSpec {
                    drv_path: DrvPath::from(drv_path(i)),
                    system: "x86_64-linux".to_string(),
                    required_features: Vec::new(),
                    input_drvs: inputs[i]
                        .iter()
                        .map(|&d| DrvPath::from(drv_path(d as usize)))
                        .collect(),
                    known_failed: false,
                    needs_resolution: false,
                    expected_ms: None,
                })
                .collect();
            batch.push((
                BuildSpec {
                    id: BuildId(i32::try_from(n + 1).unwrap_or(i32::MAX)),
                    jobset: JobsetId(1),
                    global_priority: 0,
                    priority: 0,
                    timestamp: 0,
                    top_drv: DrvPath::from(drv_path(top)),
                },
                specs,
            ));
            if batch.len() == load_batch || n + 1 == builds {
                let event = Event::BuildsQueued {
                    builds: std::mem::take(&mut batch),
                };
                let commands = core.handle(event, Millis::ZERO);
                assert!(commands.is_empty(), "no machine, nothing to do");
            }
        }
        let took = started.elapsed();
        let held_steps = core.stats().steps_waiting + core.stats().steps_runnable;
        let bytes = LIVE.load(Ordering::Relaxed) - before;
        println!(
            "{name}: {builds} builds ({load_batch} per event), {held_steps} steps held in {:.2} s; core heap {:.1} MiB = {:.0} bytes per held step",
            took.as_secs_f64(),
            bytes as f64 / 1048576.0,
            bytes as f64 / held_steps.max(1) as f64
        );
        drop(core);
    }
}
