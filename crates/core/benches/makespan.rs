//! Makespan of a nixpkgs-shaped graph under each dispatch order. Run with
//! `cargo bench -p sluice-core --bench makespan`; prints figures.
//!
//! The graph is generated from a seed (deterministic): a bootstrap chain;
//! a wide middle where each derivation depends on the end of the bootstrap
//! (stdenv) and on a few earlier ones, popular old ones (libraries) or
//! recent ones (so chains form); and a fan-in top of derivations that
//! depend on many of the middle ones (tests, channels). Build times are
//! log-normal, heavy-tailed, capped at Hydra's 10 h timeout. Every top
//! derivation and a third of the others are jobs, numbered in an order
//! unrelated to the graph (Hydra's build ids follow the evaluation, by
//! attribute name), and all are queued before 16 machines of one slot
//! connect. Each dispatched step succeeds after its build time; the clock
//! jumps from one completion to the next. No IO, no sleeping: the core
//! itself decides everything.
//!
//! For each order it prints the makespan and its ratio to the lower bound
//! max(longest path, total work / 16). The critical-path order is run with
//! exact estimates (`expected_ms` = the build time), with estimates off by
//! a log-normal factor (σ = 0.7: half are off by more than 1.6x), and
//! with none (every step counts as `Config::expected_build_time`, so the
//! path is counted in steps).
#![allow(clippy::disallowed_methods)] // the bench, not the core, reads the clock

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use sluice_core::{
    BuildId, BuildSpec, Command, Config, ConfiguredOrder, Core, DrvPath, Event, JobsetId,
    MachineId, MachineSpec, Millis, StepOutcome, StepSpec,
};

const MACHINES: u64 = 16;
const BOOTSTRAP: usize = 30;
const MIDDLE: usize = 5_500;
const TOP: usize = 200;
/// Hydra's default build timeout.
const MAX_BUILD_MS: f64 = 36_000_000.0;

/// xorshift64*: small, deterministic, good enough for a workload.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: usize) -> usize {
        (self.unit() * n as f64) as usize
    }

    /// A standard normal deviate (Box-Muller).
    fn normal(&mut self) -> f64 {
        let u = 1.0 - self.unit();
        let v = self.unit();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    /// Log-normal milliseconds with the given median (seconds) and σ.
    fn build_ms(&mut self, median_s: f64, sigma: f64) -> u32 {
        let ms = median_s * 1000.0 * (sigma * self.normal()).exp();
        ms.clamp(1_000.0, MAX_BUILD_MS) as u32
    }
}

struct Graph {
    /// Build time of each derivation, in milliseconds.
    build_ms: Vec<u32>,
    /// Inputs of each derivation (earlier indices only).
    inputs: Vec<Vec<usize>>,
    /// Top derivations of the builds, by build id (1, 2, …).
    jobs: Vec<usize>,
}

/// A graph whose bootstrap steps take `bootstrap_median_s` (median).
fn generate(seed: u64, bootstrap_median_s: f64) -> Graph {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut build_ms = Vec::new();
    let mut inputs: Vec<Vec<usize>> = Vec::new();
    // Bootstrap: each stage needs the one before (compilers, libc).
    for i in 0..BOOTSTRAP {
        build_ms.push(rng.build_ms(bootstrap_median_s, 0.8));
        inputs.push(if i == 0 { Vec::new() } else { vec![i - 1] });
    }
    let stdenv = BOOTSTRAP - 1;
    // Middle: stdenv plus one to four earlier packages.
    for m in 0..MIDDLE {
        let mut deps = vec![stdenv];
        if m > 0 {
            for _ in 0..1 + rng.below(4) {
                let pick = if rng.unit() < 0.6 {
                    // Popular: old packages (libraries) far more often.
                    (rng.unit().powi(3) * m as f64) as usize
                } else {
                    // Recent: chains of packages built on each other.
                    m - 1 - rng.below(m.min(200))
                };
                deps.push(BOOTSTRAP + pick);
            }
        }
        deps.sort_unstable();
        deps.dedup();
        build_ms.push(rng.build_ms(30.0, 1.5));
        inputs.push(deps);
    }
    // Top: tests and channels needing many packages each.
    for _ in 0..TOP {
        let mut deps: Vec<usize> = (0..10 + rng.below(31))
            .map(|_| BOOTSTRAP + rng.below(MIDDLE))
            .collect();
        deps.sort_unstable();
        deps.dedup();
        build_ms.push(rng.build_ms(60.0, 1.0));
        inputs.push(deps);
    }
    let n = build_ms.len();
    let mut jobs: Vec<usize> = (BOOTSTRAP..n)
        .filter(|&i| i >= BOOTSTRAP + MIDDLE || rng.below(3) == 0)
        .collect();
    // Build ids in an order unrelated to the graph (Fisher-Yates).
    for i in (1..jobs.len()).rev() {
        let j = rng.below(i + 1);
        jobs.swap(i, j);
    }
    Graph {
        build_ms,
        inputs,
        jobs,
    }
}

impl Graph {
    /// The longest path through the graph, by build time.
    fn longest_path_ms(&self) -> u64 {
        // Inputs have lower indices: one pass from the top down.
        let mut path: Vec<u64> = self.build_ms.iter().map(|&ms| u64::from(ms)).collect();
        for i in (0..path.len()).rev() {
            for &input in &self.inputs[i] {
                path[input] = path[input].max(u64::from(self.build_ms[input]) + path[i]);
            }
        }
        path.into_iter().max().unwrap_or(0)
    }

    /// Work of the derivations some job needs.
    fn needed(&self) -> Vec<bool> {
        let mut needed = vec![false; self.build_ms.len()];
        let mut pending: Vec<usize> = self.jobs.clone();
        while let Some(i) = pending.pop() {
            if !needed[i] {
                needed[i] = true;
                pending.extend(&self.inputs[i]);
            }
        }
        needed
    }

    /// A lower bound that also sees cuts: for each derivation `v`, the
    /// work it needs (all of which precedes it) runs on the machines before
    /// it starts, and the work that needs it runs after it ends; each side
    /// also takes at least its longest path. So the makespan is at least
    /// `max(head(v), work below / m) + time(v) + max(tail(v), work above
    /// / m)` for every `v` (the bootstrap chain, before which nothing else
    /// can start, is such a cut), and at least total work / m.
    fn cut_bound_ms(&self, needed: &[bool], machines: u64) -> u64 {
        let n = self.build_ms.len();
        let words = n.div_ceil(64);
        let ms = |i: usize| u64::from(self.build_ms[i]);
        let work_of = |set: &[u64]| -> u64 {
            (0..n)
                .filter(|&i| set[i / 64] & (1 << (i % 64)) != 0)
                .map(ms)
                .sum()
        };
        let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
        for (d, inputs) in self.inputs.iter().enumerate() {
            if needed[d] {
                for &i in inputs {
                    dependents[i].push(d);
                }
            }
        }
        // Below: everything each derivation needs; inputs come first.
        let mut below = vec![0u64; n * words];
        let mut head = vec![0u64; n];
        for v in 0..n {
            for &i in &self.inputs[v] {
                head[v] = head[v].max(head[i] + ms(i));
                below[v * words + i / 64] |= 1 << (i % 64);
                for w in 0..words {
                    below[v * words + w] |= below[i * words + w];
                }
            }
        }
        // Above: everything that needs it; dependents come later.
        let mut above = vec![0u64; n * words];
        let mut tail = vec![0u64; n];
        for v in (0..n).rev() {
            for &d in &dependents[v] {
                tail[v] = tail[v].max(tail[d] + ms(d));
                above[v * words + d / 64] |= 1 << (d % 64);
                for w in 0..words {
                    above[v * words + w] |= above[d * words + w];
                }
            }
        }
        let total: u64 = (0..n).filter(|&i| needed[i]).map(ms).sum();
        let mut bound = total.div_ceil(machines);
        for v in (0..n).filter(|&v| needed[v]) {
            let before = head[v].max(work_of(&below[v * words..][..words]).div_ceil(machines));
            let after = tail[v].max(work_of(&above[v * words..][..words]).div_ceil(machines));
            bound = bound.max(before + ms(v) + after);
        }
        bound
    }

    fn closure(&self, top: usize, seen: &mut [u32], stamp: u32) -> Vec<usize> {
        let mut closure = Vec::new();
        let mut pending = vec![top];
        while let Some(i) = pending.pop() {
            if seen[i] != stamp {
                seen[i] = stamp;
                closure.push(i);
                pending.extend(&self.inputs[i]);
            }
        }
        closure
    }
}

/// How the driver estimates build times.
#[derive(Clone, Copy)]
enum Estimates {
    Exact,
    /// Off by a log-normal factor.
    Noisy,
    /// None known: the core's default for all.
    Unknown,
}

fn drv_path(i: usize) -> DrvPath {
    DrvPath::from(format!("/nix/store/{i:0>32}-package-{i}.drv"))
}

fn index_of(drv_path: &DrvPath) -> usize {
    let name = drv_path.as_str().trim_end_matches(".drv");
    let digits = name.rsplit('-').next().unwrap_or_default();
    digits
        .parse()
        .unwrap_or_else(|_| unreachable!("bench paths end in a number"))
}

struct Run {
    makespan_ms: u64,
    ingest: Duration,
    dispatches: u64,
}

fn simulate(graph: &Graph, order: ConfiguredOrder, estimates: Estimates, seed: u64) -> Run {
    let mut rng = Rng(seed ^ 0xD1B5_4A32_D192_ED03);
    let specs: Vec<StepSpec> = (0..graph.build_ms.len())
        .map(|i| StepSpec {
            drv_path: drv_path(i),
            system: "x86_64-linux".to_string(),
            required_features: Vec::new(),
            input_drvs: graph.inputs[i].iter().map(|&d| drv_path(d)).collect(),
            known_failed: false,
            needs_resolution: false,
            expected_ms: match estimates {
                Estimates::Exact => Some(graph.build_ms[i]),
                Estimates::Noisy => {
                    let factor = (0.7 * rng.normal()).exp();
                    Some((f64::from(graph.build_ms[i]) * factor) as u32)
                }
                Estimates::Unknown => None,
            },
        })
        .collect();
    let mut core = Core::with_order(Config::default(), order);
    let now = Millis::ZERO;

    let started = Instant::now();
    let mut seen = vec![0u32; specs.len()];
    for (n, &top) in graph.jobs.iter().enumerate() {
        let id = i32::try_from(n + 1).unwrap_or(i32::MAX);
        let closure = graph.closure(top, &mut seen, u32::try_from(n + 1).unwrap_or(0));
        let event = Event::BuildQueued {
            build: BuildSpec {
                id: BuildId(id),
                jobset: JobsetId(1),
                global_priority: 0,
                priority: 0,
                timestamp: 0,
                top_drv: drv_path(top),
            },
            steps: closure.into_iter().map(|i| specs[i].clone()).collect(),
        };
        let commands = core.handle(event, now);
        assert!(commands.is_empty(), "no machine yet");
    }
    let ingest = started.elapsed();

    // (done at, step, machine), earliest first.
    let mut running: BinaryHeap<Reverse<(u64, usize, u64)>> = BinaryHeap::new();
    let mut builds_finished = 0;
    let mut record =
        |commands: Vec<Command>, at: u64, running: &mut BinaryHeap<Reverse<(u64, usize, u64)>>| {
            for command in commands {
                match command {
                    Command::Dispatch {
                        drv_path, machine, ..
                    } => {
                        let i = index_of(&drv_path);
                        running.push(Reverse((at + u64::from(graph.build_ms[i]), i, machine.0)));
                    }
                    Command::BuildFinished(finished) => {
                        builds_finished += 1 + finished.dependents.len();
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        };
    for m in 0..MACHINES {
        let spec = MachineSpec {
            id: MachineId(m),
            name: format!("builder-{m}"),
            systems: vec!["x86_64-linux".to_string()],
            supported_features: Vec::new(),
            mandatory_features: Vec::new(),
            max_jobs: 1,
            prefetch: 0,
            speed_factor: 1.0,
        };
        record(
            core.handle(Event::MachineConnected(spec), now),
            0,
            &mut running,
        );
    }
    let mut makespan_ms = 0;
    while let Some(Reverse((at, i, machine))) = running.pop() {
        makespan_ms = at;
        let event = Event::StepFinished {
            drv_path: drv_path(i),
            machine: MachineId(machine),
            outcome: StepOutcome::Success,
        };
        record(core.handle(event, Millis(at)), at, &mut running);
    }
    assert_eq!(builds_finished, graph.jobs.len(), "every build finished");
    assert_eq!(core.stats().builds_queued, 0);
    Run {
        makespan_ms,
        ingest,
        dispatches: core.stats().dispatches,
    }
}

fn hours(ms: u64) -> String {
    format!("{:.2}h", ms as f64 / 3_600_000.0)
}

/// One table: six seeds, each order. Returns the worst ratios of the
/// critical-path order (exact estimates) to the bound and the cut bound,
/// and adds the time spent queueing builds (Hydra's order, critical path).
fn table(bootstrap_median_s: f64, ingest: &mut (Duration, Duration)) -> (f64, f64) {
    println!(
        "bootstrap steps of median {bootstrap_median_s} s; each order: makespan, its ratio to the bound / to the cut bound"
    );
    println!(
        "{:>4}  {:>5}  {:>6}  {:>7}  {:>7}  {:>7}  {:>7}  {:>20}  {:>20}  {:>20}  {:>20}",
        "seed",
        "steps",
        "builds",
        "work/16",
        "longest",
        "bound",
        "cut",
        "hydra",
        "cp exact",
        "cp noisy",
        "cp unknown"
    );
    let mut worst: (f64, f64) = (0.0, 0.0);
    for seed in 1..=6u64 {
        let graph = generate(seed, bootstrap_median_s);
        let needed = graph.needed();
        let work: u64 = (0..graph.build_ms.len())
            .filter(|&i| needed[i])
            .map(|i| u64::from(graph.build_ms[i]))
            .sum();
        let steps = needed.iter().filter(|n| **n).count();
        let longest = graph.longest_path_ms();
        let bound = longest.max(work.div_ceil(MACHINES));
        let cut = graph.cut_bound_ms(&needed, MACHINES);
        let runs = [
            (ConfiguredOrder::Hydra, Estimates::Exact),
            (ConfiguredOrder::CriticalPath, Estimates::Exact),
            (ConfiguredOrder::CriticalPath, Estimates::Noisy),
            (ConfiguredOrder::CriticalPath, Estimates::Unknown),
        ];
        let mut cells = Vec::new();
        for (i, (order, estimates)) in runs.into_iter().enumerate() {
            let run = simulate(&graph, order, estimates, seed);
            assert_eq!(run.dispatches as usize, steps, "each step built once");
            assert!(run.makespan_ms >= cut, "the cut bound is a lower bound");
            let ratio = run.makespan_ms as f64 / bound as f64;
            let cut_ratio = run.makespan_ms as f64 / cut as f64;
            if i == 0 {
                ingest.0 += run.ingest;
            }
            if i == 1 {
                ingest.1 += run.ingest;
                worst = (worst.0.max(ratio), worst.1.max(cut_ratio));
            }
            cells.push(format!(
                "{} {:.3}/{:.3}",
                hours(run.makespan_ms),
                ratio,
                cut_ratio
            ));
        }
        println!(
            "{seed:>4}  {steps:>5}  {:>6}  {:>7}  {:>7}  {:>7}  {:>7}  {:>20}  {:>20}  {:>20}  {:>20}",
            graph.jobs.len(),
            hours(work.div_ceil(MACHINES)),
            hours(longest),
            hours(bound),
            hours(cut),
            cells[0],
            cells[1],
            cells[2],
            cells[3]
        );
    }
    println!(
        "worst critical-path order (exact estimates): {:.3}x the bound, {:.3}x the cut bound",
        worst.0, worst.1
    );
    println!();
    worst
}

fn main() {
    println!(
        "makespan on {MACHINES} machines x 1 slot: a {BOOTSTRAP}-step bootstrap chain, {MIDDLE} middle steps, {TOP} fan-in tops"
    );
    println!(
        "bound = max(longest path, work/16); cut bound = that, and for each step the work and path before and after it (cut_bound_ms)"
    );
    println!();
    let mut ingest = (Duration::ZERO, Duration::ZERO);
    // A bootstrap as heavy as a real one next to a scaled-down package set:
    // nothing else can start for its first hour, which the plain bound
    // ignores. Then one ten times lighter.
    for bootstrap_median_s in [120.0, 12.0] {
        table(bootstrap_median_s, &mut ingest);
    }
    println!(
        "queueing every build, all runs: {:?} with Hydra's order, {:?} with the critical-path order",
        ingest.0, ingest.1
    );
}
