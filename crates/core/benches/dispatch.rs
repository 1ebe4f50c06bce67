//! Cost of one dispatch decision against the size of the queue, and memory
//! per step. Run with `cargo bench -p sluice-core`; prints figures.
//!
//! Setup: N runnable steps (one per build, random priorities) spread over
//! five classes (x86_64-linux, x86_64-linux+kvm, x86_64-linux+big,
//! aarch64-linux, builtin), and 8 machines with 4 slots each (5 x86_64 with
//! kvm, 2 aarch64, 1 x86_64 with mandatory "big"), all busy. One decision
//! is one `StepFinished` event: the slot frees, the build finishes, and the
//! core picks the most urgent step the machine can build from the heads of
//! its class queues. After each decision a fresh build is queued (untimed)
//! so the queue stays at N.
#![allow(clippy::disallowed_methods)] // the bench, not the core, reads the clock

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sluice_core::{
    BuildId, BuildSpec, Command, Config, Core, DrvPath, Event, JobsetId, MachineId, MachineSpec,
    Millis, StepOutcome, StepSpec,
};

/// Counts live heap bytes, to report memory per step.
struct CountingAllocator;

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new_size, Ordering::Relaxed);
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// A small deterministic generator (xorshift), so runs are comparable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> i32 {
        i32::try_from(self.next() % n).unwrap_or(0)
    }
}

const CLASSES: [(&str, &[&str]); 5] = [
    ("x86_64-linux", &[]),
    ("x86_64-linux", &["kvm"]),
    ("x86_64-linux", &["big"]),
    ("aarch64-linux", &[]),
    ("builtin", &[]),
];

fn drv_path(i: usize) -> DrvPath {
    // Realistic length: store dir, 32-character hash, name.
    DrvPath::from(format!("/nix/store/{i:0>32}-bench-package-{i}.drv"))
}

/// The `i` of `drv_path(i)`.
fn index_of(drv_path: &DrvPath) -> usize {
    let name = drv_path.as_str().trim_end_matches(".drv");
    let digits = name.rsplit('-').next().unwrap_or_default();
    digits
        .parse()
        .unwrap_or_else(|_| unreachable!("bench paths end in a number"))
}

fn one_step_build(i: usize, jobsets: usize, rng: &mut Rng) -> Event {
    let (system, features) = CLASSES[i % CLASSES.len()];
    let top = drv_path(i);
    Event::BuildQueued {
        build: BuildSpec {
            id: BuildId(i32::try_from(i).unwrap_or(i32::MAX)),
            jobset: JobsetId(i32::try_from(i % jobsets).unwrap_or(0)),
            global_priority: rng.below(3),
            priority: rng.below(10) - 5,
            timestamp: 0,
            top_drv: top.clone(),
        },
        steps: vec![StepSpec {
            drv_path: top,
            system: system.to_string(),
            required_features: features.iter().map(|f| f.to_string()).collect(),
            input_drvs: Vec::new(),
            known_failed: false,
            needs_resolution: false,
            expected_ms: None,
        }],
    }
}

fn machines() -> Vec<MachineSpec> {
    let strings = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    (0..8u64)
        .map(|i| {
            let (systems, supported, mandatory) = match i {
                0..=4 => (strings(&["x86_64-linux"]), strings(&["kvm"]), Vec::new()),
                5 | 6 => (strings(&["aarch64-linux"]), Vec::new(), Vec::new()),
                _ => (
                    strings(&["x86_64-linux"]),
                    strings(&["kvm"]),
                    strings(&["big"]),
                ),
            };
            MachineSpec {
                id: MachineId(i),
                name: format!("builder-{i}"),
                systems,
                supported_features: supported,
                mandatory_features: mandatory,
                max_jobs: 4,
                prefetch: 0,
                speed_factor: 1.0,
            }
        })
        .collect()
}

struct Figures {
    mean: Duration,
    p50: Duration,
    p99: Duration,
    max: Duration,
    ingest_per_step: Duration,
    bytes_per_queued_step: usize,
}

fn measure(queued: usize, jobsets: usize, decisions: usize) -> Figures {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut core = Core::new(Config::default());
    let mut now = Millis::ZERO;
    for jobset in 0..jobsets {
        let jobset = JobsetId(i32::try_from(jobset).unwrap_or(0));
        // Shares of 100 to 1,000: ranks differ between jobsets.
        let shares = 100 + 100 * (u32::try_from(jobset.0).unwrap_or(0) % 10);
        core.handle(Event::JobsetShares { jobset, shares }, now);
    }

    let bytes_before = LIVE_BYTES.load(Ordering::Relaxed);
    let started = Instant::now();
    for i in 0..queued {
        let commands = core.handle(one_step_build(i, jobsets, &mut rng), now);
        assert!(commands.is_empty(), "nothing to dispatch yet");
    }
    let ingest_per_step = started.elapsed() / u32::try_from(queued).unwrap_or(u32::MAX);
    let bytes_per_queued_step = (LIVE_BYTES.load(Ordering::Relaxed) - bytes_before) / queued;

    let mut running: VecDeque<(DrvPath, MachineId)> = VecDeque::new();
    let record = |commands: Vec<Command>, running: &mut VecDeque<(DrvPath, MachineId)>| {
        for command in commands {
            if let Command::Dispatch {
                drv_path, machine, ..
            } = command
            {
                running.push_back((drv_path, machine));
            }
        }
    };
    for spec in machines() {
        let commands = core.handle(Event::MachineConnected(spec), now);
        record(commands, &mut running);
    }
    assert_eq!(running.len(), 32, "every slot busy");

    let mut samples = Vec::with_capacity(decisions);
    // Refill each class with what it consumed, so no queue runs dry.
    let classes = CLASSES.len();
    let mut next_of_class: Vec<usize> = (0..classes)
        .map(|class| queued.div_ceil(classes) * classes + class)
        .collect();
    for _ in 0..decisions {
        let (drv_path, machine) = running
            .pop_front()
            .unwrap_or_else(|| unreachable!("32 slots stay busy"));
        let class = index_of(&drv_path) % classes;
        let event = Event::StepFinished {
            drv_path,
            machine,
            outcome: StepOutcome::Success,
        };
        // Steps take time, so the jobsets' share ranks move.
        now = Millis(now.0 + 7);
        let started = Instant::now();
        let commands = core.handle(event, now);
        samples.push(started.elapsed());
        let before = running.len();
        record(commands, &mut running);
        assert_eq!(running.len(), before + 1, "one decision, one dispatch");
        // Keep the queue at `queued` steps, outside the timed region.
        let commands = core.handle(one_step_build(next_of_class[class], jobsets, &mut rng), now);
        assert!(commands.is_empty());
        next_of_class[class] += classes;
    }
    assert_eq!(core.stats().steps_runnable, queued - 32);

    let total: Duration = samples.iter().sum();
    samples.sort();
    Figures {
        mean: total / u32::try_from(decisions).unwrap_or(u32::MAX),
        p50: samples[decisions / 2],
        p99: samples[decisions * 99 / 100],
        max: samples[decisions - 1],
        ingest_per_step,
        bytes_per_queued_step,
    }
}

/// Memory of a deep, wide graph of waiting steps (each step depends on up
/// to three earlier ones), as in a real closure.
fn bytes_per_waiting_step(steps: usize) -> usize {
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    let mut rng = Rng(42);
    let specs: Vec<StepSpec> = (0..steps)
        .map(|i| StepSpec {
            drv_path: drv_path(i),
            system: "x86_64-linux".to_string(),
            required_features: Vec::new(),
            input_drvs: (0..3)
                .filter(|_| i > 0)
                .map(|_| drv_path(usize::try_from(rng.next()).unwrap_or(0) % i))
                .collect(),
            known_failed: false,
            needs_resolution: false,
            expected_ms: None,
        })
        .collect();
    // One build on top of everything.
    let mut top = specs
        .last()
        .cloned()
        .unwrap_or_else(|| unreachable!("steps > 0"));
    top.drv_path = drv_path(steps);
    top.input_drvs = (0..steps).map(drv_path).collect();
    let mut all = specs;
    all.push(top.clone());
    let mut core = Core::new(Config::default());
    let event = Event::BuildQueued {
        build: BuildSpec {
            id: BuildId(1),
            jobset: JobsetId(1),
            global_priority: 0,
            priority: 0,
            timestamp: 0,
            top_drv: top.drv_path.clone(),
        },
        steps: all,
    };
    // The core keeps the event's derivation paths (shared with its index);
    // the rest of the event is freed when `handle` returns.
    let commands = core.handle(event, Millis::ZERO);
    assert!(commands.is_empty());
    let after = LIVE_BYTES.load(Ordering::Relaxed);
    let per_step = after.saturating_sub(before) / (steps + 1);
    drop(core);
    per_step
}

fn main() {
    println!(
        "dispatch decision cost (8 machines x 4 slots, 5 classes, queue kept at N, steps spread over J jobsets with shares):"
    );
    println!(
        "{:>9}  {:>4}  {:>10}  {:>10}  {:>10}  {:>10}  {:>14}  {:>16}",
        "queued", "J", "mean", "p50", "p99", "max", "ingest/step", "bytes/queued step"
    );
    // Medians: the mean and max include preemption by other processes.
    let mut medians = Vec::new();
    for (queued, jobsets) in [(1_000, 1), (10_000, 1), (100_000, 1), (100_000, 100)] {
        let figures = measure(queued, jobsets, 20_000);
        println!(
            "{:>9}  {:>4}  {:>10?}  {:>10?}  {:>10?}  {:>10?}  {:>14?}  {:>16}",
            queued,
            jobsets,
            figures.mean,
            figures.p50,
            figures.p99,
            figures.max,
            figures.ingest_per_step,
            figures.bytes_per_queued_step
        );
        medians.push(figures.p50);
    }
    let growth = medians[2].as_secs_f64() / medians[0].as_secs_f64();
    println!("median cost at 100k / at 1k queued: {growth:.2}x (a scan would be ~100x)");
    println!(
        "memory of a 100k-step waiting closure (with its index entry, deps and rdeps): {} bytes/step",
        bytes_per_waiting_step(100_000)
    );
}
