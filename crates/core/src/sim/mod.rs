//! A simulated world for testing the core without IO or sleeps: a DAG of
//! derivations, a fleet of simulated builders, a simulated clock, and a
//! trace of what the core asked for.
//!
//! Scenarios read like data: [`Dag::parse`] takes lines such as
//! `d: x86_64-linux big <- b c`, and [`Sim::run`] takes a script of actions,
//! each followed by the trace lines (`> …`) it must produce, exactly.
//!
//! [`Sim::run_timed`] instead lets each step take its expected time and
//! builds everything queued, for the makespan of an order.
//!
//! Every command the core returns is checked against the simulated world
//! (a step is dispatched only to a connected, compatible machine with a
//! free slot, only once its inputs are valid, never twice at once; a build
//! finishes once), and `Core::check_invariants` runs after every event.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::{
    BuildFinished, BuildId, BuildSpec, Command, Config, Core, Event, JobsetId, MachineId,
    MachineSpec, Millis, Status, StepFailure, StepOrder, StepOutcome,
};

mod dag;
mod timed;

use dag::short;
pub(crate) use dag::{drv, name, Dag, Node};

#[derive(Clone, Debug)]
pub(crate) struct SimMachine {
    pub id: MachineId,
    pub spec: MachineSpec,
}

/// The simulated world around one core.
pub(crate) struct Sim<O: StepOrder = crate::HydraOrder> {
    pub core: Core<O>,
    pub dag: Dag,
    pub now: Millis,
    /// Derivations whose outputs are valid in the simulated store.
    pub valid: BTreeSet<String>,
    /// Derivations whose outputs are known to fail (`FailedPaths`).
    pub known_failed: BTreeSet<String>,
    pub machines: BTreeMap<String, SimMachine>,
    /// Every machine id ever connected, with its name.
    names: BTreeMap<MachineId, String>,
    next_machine: u64,
    /// Derivation → (machine name, build) for every step being built.
    pub running: BTreeMap<String, (String, BuildId)>,
    /// When each step being built was dispatched (for timed runs).
    pub started: BTreeMap<String, Millis>,
    /// Unfinished builds the core was told about, with their top.
    pub queued: BTreeMap<BuildId, String>,
    pub finished: BTreeMap<BuildId, Status>,
    pub cancelled: BTreeSet<BuildId>,
    /// Machines whose connection dropped (they keep their steps).
    pub detached: BTreeSet<String>,
    /// (global, local) priority of each queued build, as the core was told.
    priorities: BTreeMap<BuildId, (i32, i32)>,
    /// Each queued build's jobset.
    jobsets: BTreeMap<BuildId, JobsetId>,
    /// Steps waiting out a retry backoff, until when.
    delayed: BTreeMap<String, Millis>,
    /// Steps the core asked to resolve, not answered yet.
    pub resolving: BTreeSet<String>,
    /// Each resolved step's resolved derivation.
    pub resolved: BTreeMap<String, String>,
    /// Whether to check each dispatch against a model of Hydra's order
    /// (true for cores with [`crate::HydraOrder`]).
    pub check_hydra_order: bool,
    pub trace: Vec<String>,
}

impl Sim {
    pub fn new(dag: &str, config: Config) -> Sim {
        let mut sim = Sim::with_core(Dag::parse(dag), Core::new(config));
        sim.check_hydra_order = true;
        sim
    }
}

impl<O: StepOrder> Sim<O> {
    pub fn with_core(dag: Dag, core: Core<O>) -> Sim<O> {
        Sim {
            core,
            dag,
            now: Millis::ZERO,
            valid: BTreeSet::new(),
            known_failed: BTreeSet::new(),
            machines: BTreeMap::new(),
            names: BTreeMap::new(),
            next_machine: 1,
            running: BTreeMap::new(),
            started: BTreeMap::new(),
            queued: BTreeMap::new(),
            finished: BTreeMap::new(),
            cancelled: BTreeSet::new(),
            detached: BTreeSet::new(),
            priorities: BTreeMap::new(),
            jobsets: BTreeMap::new(),
            delayed: BTreeMap::new(),
            resolving: BTreeSet::new(),
            resolved: BTreeMap::new(),
            check_hydra_order: false,
            trace: Vec::new(),
        }
    }

    /// Runs a script: one action a line, each followed by the exact trace
    /// lines (`> …`) it produces. See [`Sim::act`] for the actions.
    pub fn run(&mut self, script: &str) {
        let mut steps: Vec<(String, Vec<String>)> = Vec::new();
        for line in script.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(expected) = line.strip_prefix('>') {
                let (_, lines) = steps.last_mut().expect("a `>` line follows an action");
                lines.push(expected.trim().to_string());
            } else {
                steps.push((line.to_string(), Vec::new()));
            }
        }
        for (action, expected) in steps {
            self.act(&action);
            let produced = std::mem::take(&mut self.trace);
            assert_eq!(produced, expected, "trace after `{action}`");
        }
    }

    /// Performs one scripted action:
    /// - `connect NAME SYSTEM[,SYSTEM…] [slots=N] [features=F,…] [mandatory=F,…] [speed=X]`
    /// - `disconnect NAME`
    /// - `detach NAME` / `reattach NAME` (a dropped connection and its
    ///   return, same machine id)
    /// - `claim DRV NAME` / `withdraw DRV` (an attempt an agent still runs
    ///   after a restart)
    /// - `valid DRV…` (outputs already in the store)
    /// - `failed DRV…` (outputs known to fail: `FailedPaths`)
    /// - `queue #ID TOP [global=N] [prio=N] [jobset=N]` (jobset 1 by default)
    /// - `shares JOBSET N`
    /// - `ok DRV` / `fail DRV [STATUS] [retry]` (for the machine building it)
    /// - `report NAME DRV ok` (a result from a machine, believed or not)
    /// - `resolved DRV -> DRV2` (build DRV2, a node of the DAG, in its
    ///   place), `resolved DRV valid` (early cutoff), `resolved DRV fails`
    /// - `cancel #ID`, `bump #ID GLOBAL`
    /// - `advance SECONDS` (then a tick), `tick`
    pub fn act(&mut self, action: &str) {
        let words: Vec<&str> = action.split_whitespace().collect();
        let option = |key: &str| {
            words
                .iter()
                .find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        };
        let list = |key: &str| -> Vec<String> {
            option(key)
                .map(|v| v.split(',').map(str::to_string).collect())
                .unwrap_or_default()
        };
        let build = |word: &str| BuildId(word.trim_start_matches('#').parse().expect("a build id"));
        match words.as_slice() {
            ["connect", name, systems, ..] => {
                let slots = option("slots").map_or(1, |v| v.parse().expect("slots"));
                let speed = option("speed").map_or(1.0, |v| v.parse().expect("speed"));
                let prefetch = option("prefetch").map_or(0, |v| v.parse().expect("prefetch"));
                self.connect(
                    name,
                    systems.split(',').map(str::to_string).collect(),
                    list("features"),
                    list("mandatory"),
                    (slots, prefetch),
                    speed,
                );
            }
            ["disconnect", name] => self.disconnect(name),
            ["detach", name] => {
                let machine = self.machines[*name].id;
                self.detached.insert(name.to_string());
                self.handle(Event::MachineDetached { machine });
            }
            ["reattach", name] => {
                let spec = self.machines[*name].spec.clone();
                if !self.detached.remove(*name) {
                    // Connecting a connected machine again replaces it:
                    // its steps are retried.
                    self.running.retain(|_, (m, _)| m != name);
                }
                self.handle(Event::MachineConnected(spec));
            }
            ["claim", drv_name, name] => {
                let machine = self.machines[*name].id;
                self.handle(Event::StepClaimed {
                    drv_path: drv(drv_name),
                    machine,
                });
            }
            ["withdraw", drv_name] => self.handle(Event::ClaimWithdrawn {
                drv_path: drv(drv_name),
            }),
            ["valid", names @ ..] => self.valid.extend(names.iter().map(|n| n.to_string())),
            ["failed", names @ ..] => self
                .known_failed
                .extend(names.iter().map(|n| n.to_string())),
            ["queue", id, top, ..] => {
                let global = option("global").map_or(0, |v| v.parse().expect("global"));
                let prio = option("prio").map_or(0, |v| v.parse().expect("prio"));
                let jobset = option("jobset").map_or(1, |v| v.parse().expect("jobset"));
                self.queue_in(build(id), top, global, prio, JobsetId(jobset));
            }
            ["queue-batch", rest @ ..] => {
                // `queue-batch #1 a #2 b`: builds queued in one event.
                let builds: Vec<(BuildId, &str)> = rest
                    .chunks(2)
                    .map(|pair| match pair {
                        [id, top] => (build(id), *top),
                        _ => panic!("queue-batch takes pairs of a build and a top"),
                    })
                    .collect();
                self.queue_batch(&builds);
            }
            ["shares", jobset, n] => {
                self.handle(Event::JobsetShares {
                    jobset: JobsetId(jobset.parse().expect("a jobset id")),
                    shares: n.parse().expect("a number of shares"),
                });
            }
            ["ok", drv] => self.finish(drv, StepOutcome::Success),
            ["refuse", drv] => self.finish(drv, StepOutcome::Refused),
            ["fail", drv, rest @ ..] => {
                let failure = match rest.first().copied() {
                    None | Some("failed") | Some("retry") => StepFailure::Failed,
                    Some("aborted") => StepFailure::Aborted,
                    Some("timed-out") => StepFailure::TimedOut,
                    Some(other) => panic!("unknown failure {other}"),
                };
                let can_retry = rest.contains(&"retry");
                self.finish(drv, StepOutcome::Failed { failure, can_retry });
            }
            ["report", machine, drv_name, "ok"] => {
                let machine = self.machines[*machine].id;
                self.handle(Event::StepFinished {
                    drv_path: drv(drv_name),
                    machine,
                    outcome: StepOutcome::Success,
                });
            }
            ["resolved", drv_name, "->", to] => {
                assert!(
                    self.resolving.remove(*drv_name),
                    "{drv_name} is not resolving"
                );
                self.resolved.insert(drv_name.to_string(), to.to_string());
                let spec = self.dag.spec(to);
                self.handle(Event::StepResolved {
                    drv_path: drv(drv_name),
                    resolution: crate::Resolution::Step(spec),
                });
            }
            ["resolved", drv_name, "valid"] => {
                self.resolving.remove(*drv_name);
                self.valid.insert(drv_name.to_string());
                self.handle(Event::StepResolved {
                    drv_path: drv(drv_name),
                    resolution: crate::Resolution::Valid,
                });
            }
            ["resolved", drv_name, "fails"] => {
                self.resolving.remove(*drv_name);
                self.handle(Event::StepResolved {
                    drv_path: drv(drv_name),
                    resolution: crate::Resolution::Failed(StepFailure::Aborted),
                });
            }
            ["cancel", id] => self.cancel(build(id)),
            ["bump", id, global] => {
                let global_priority = global.parse().expect("a priority");
                if let Some((g, _)) = self.priorities.get_mut(&build(id)) {
                    *g = global_priority;
                }
                self.handle(Event::BuildBumped {
                    build: build(id),
                    global_priority,
                });
            }
            ["advance", secs] => self.advance(Duration::from_secs(
                secs.trim_end_matches('s').parse().expect("seconds"),
            )),
            ["tick"] => self.handle(Event::Tick),
            _ => panic!("unknown action `{action}`"),
        }
    }

    pub fn connect(
        &mut self,
        name: &str,
        systems: Vec<String>,
        supported_features: Vec<String>,
        mandatory_features: Vec<String>,
        (max_jobs, prefetch): (u32, u32),
        speed_factor: f32,
    ) {
        self.disconnect(name);
        let id = MachineId(self.next_machine);
        self.next_machine += 1;
        let spec = MachineSpec {
            id,
            name: name.to_string(),
            systems,
            supported_features,
            mandatory_features,
            max_jobs,
            prefetch,
            speed_factor,
        };
        self.machines.insert(
            name.to_string(),
            SimMachine {
                id,
                spec: spec.clone(),
            },
        );
        self.names.insert(id, name.to_string());
        self.handle(Event::MachineConnected(spec));
    }

    pub fn disconnect(&mut self, name: &str) {
        let Some(machine) = self.machines.remove(name) else {
            return;
        };
        self.detached.remove(name);
        self.running.retain(|_, (m, _)| m != name);
        self.handle(Event::MachineDisconnected {
            machine: machine.id,
        });
    }

    pub fn queue(&mut self, id: BuildId, top: &str, global_priority: i32, priority: i32) {
        self.queue_in(id, top, global_priority, priority, JobsetId(1));
    }

    pub fn queue_in(
        &mut self,
        id: BuildId,
        top: &str,
        global_priority: i32,
        priority: i32,
        jobset: JobsetId,
    ) {
        let steps = self.dag.step_specs(top, &self.valid, &self.known_failed);
        self.queued.insert(id, top.to_string());
        self.priorities.insert(id, (global_priority, priority));
        self.jobsets.insert(id, jobset);
        self.handle(Event::BuildQueued {
            build: BuildSpec {
                id,
                jobset,
                global_priority,
                priority,
                timestamp: 0,
                top_drv: drv(top),
            },
            steps,
        });
    }

    /// Queues `builds` (each with its top) in one [`Event::BuildsQueued`],
    /// at priority 0 in jobset 1.
    pub fn queue_batch(&mut self, builds: &[(BuildId, &str)]) {
        let mut event = Vec::new();
        for &(id, top) in builds {
            let steps = self.dag.step_specs(top, &self.valid, &self.known_failed);
            self.queued.insert(id, top.to_string());
            self.priorities.insert(id, (0, 0));
            self.jobsets.insert(id, JobsetId(1));
            event.push((
                BuildSpec {
                    id,
                    jobset: JobsetId(1),
                    global_priority: 0,
                    priority: 0,
                    timestamp: 0,
                    top_drv: drv(top),
                },
                steps,
            ));
        }
        self.handle(Event::BuildsQueued { builds: event });
    }

    /// The machine building `drv_name` reports `outcome`.
    pub fn finish(&mut self, drv_name: &str, outcome: StepOutcome) {
        let (machine, _) = self
            .running
            .remove(drv_name)
            .unwrap_or_else(|| panic!("{drv_name} is not running"));
        if outcome == StepOutcome::Success {
            self.valid.insert(drv_name.to_string());
            // What was resolved into it is built with it.
            let originals: Vec<String> = self
                .resolved
                .iter()
                .filter(|(_, to)| *to == drv_name)
                .map(|(from, _)| from.clone())
                .collect();
            self.valid.extend(originals);
        }
        let machine = self.machines[&machine].id;
        self.handle(Event::StepFinished {
            drv_path: drv(drv_name),
            machine,
            outcome,
        });
    }

    pub fn cancel(&mut self, id: BuildId) {
        if self.queued.remove(&id).is_some() {
            self.cancelled.insert(id);
        }
        self.handle(Event::BuildCancelled { build: id });
    }

    pub fn advance(&mut self, by: Duration) {
        self.now = self.now.saturating_add(by);
        self.handle(Event::Tick);
    }

    pub fn handle(&mut self, event: Event) {
        let commands = self.core.handle(event, self.now);
        for command in commands {
            self.observe(command);
        }
        // A step being resolved that no build needs any more is gone.
        let resolving = std::mem::take(&mut self.resolving);
        self.resolving = resolving
            .into_iter()
            .filter(|s| {
                self.queued
                    .values()
                    .any(|top| self.closure_with_resolved(top).contains(s))
            })
            .collect();
        if let Err(broken) = self.core.check_invariants() {
            panic!("core invariant broken: {broken}");
        }
    }

    fn machine_name(&self, id: MachineId) -> String {
        self.names
            .get(&id)
            .cloned()
            .unwrap_or_else(|| format!("unknown-{}", id.0))
    }

    /// Checks one command against the world, applies it, and traces it.
    fn observe(&mut self, command: Command) {
        let line = match command {
            Command::Dispatch {
                drv_path,
                machine,
                build,
                attempt,
            } => {
                let step = name(&drv_path);
                let machine_name = self.machine_name(machine);
                self.check_dispatch(&step, &machine_name, build);
                if self.check_hydra_order {
                    self.check_hydra_order(&step, &machine_name);
                }
                self.delayed.remove(&step);
                self.started.insert(step.clone(), self.now);
                self.running
                    .insert(step.clone(), (machine_name.clone(), build));
                let attempt = if attempt > 1 {
                    format!(" (attempt {attempt})")
                } else {
                    String::new()
                };
                format!("dispatch {step} -> {machine_name} for {build}{attempt}")
            }
            Command::CancelStep {
                drv_path, machine, ..
            } => {
                let step = name(&drv_path);
                let machine_name = self.machine_name(machine);
                let was = self.running.remove(&step);
                assert_eq!(
                    was.map(|(m, _)| m),
                    Some(machine_name.clone()),
                    "cancelled {step} was running"
                );
                format!("cancel {step} on {machine_name}")
            }
            Command::StepRequeued {
                drv_path,
                machine,
                tries,
                not_before,
                ..
            } => {
                let step = name(&drv_path);
                assert!(
                    !self.running.contains_key(&step),
                    "requeued {step} still running"
                );
                self.delayed.insert(step.clone(), not_before);
                format!(
                    "requeue {step} from {} (try {tries}) until {not_before}",
                    self.machine_name(machine)
                )
            }
            Command::Adopt {
                drv_path,
                machine,
                build,
            } => {
                let step = name(&drv_path);
                let machine_name = self.machine_name(machine);
                self.check_dispatch(&step, &machine_name, build);
                self.delayed.remove(&step);
                self.running
                    .insert(step.clone(), (machine_name.clone(), build));
                format!("adopt {step} on {machine_name} for {build}")
            }
            Command::AdoptionRefused { drv_path, machine } => {
                format!(
                    "refuse adoption of {} on {}",
                    name(&drv_path),
                    self.machine_name(machine)
                )
            }
            Command::StepUnsupported { drv_path, builds } => {
                let builds: Vec<String> = builds.iter().map(|b| b.to_string()).collect();
                format!("unsupported {}: {}", name(&drv_path), builds.join(" "))
            }
            Command::Resolve { drv_path, build } => {
                let step = name(&drv_path);
                assert!(
                    self.dag.nodes[&step].needs_resolution,
                    "{step} needs no resolution"
                );
                for input in &self.dag.nodes[&step].inputs {
                    assert!(
                        self.valid.contains(input),
                        "{step} resolved before its input {input} was built"
                    );
                }
                assert!(
                    !self.resolving.contains(&step) || !self.resolved.contains_key(&step),
                    "{step} resolved twice"
                );
                self.resolving.insert(step.clone());
                format!("resolve {step} for {build}")
            }
            Command::BuildFinished(finished) => self.check_finished(&finished),
            Command::EventRejected(error) => format!("rejected: {}", short(&error.to_string())),
        };
        self.trace.push(line);
    }

    /// The steps `top` needs built: its closure, not descending into
    /// derivations whose outputs are valid.
    fn needed(&self, top: &str) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut pending = vec![top.to_string()];
        while let Some(name) = pending.pop() {
            if !self.valid.contains(&name) && seen.insert(name.clone()) {
                pending.extend(self.dag.nodes[&name].inputs.iter().cloned());
                pending.extend(self.resolved.get(&name).cloned());
            }
        }
        seen
    }

    /// `top`'s closure, with what its steps were resolved into.
    fn closure_with_resolved(&self, top: &str) -> BTreeSet<String> {
        let mut closure = self.dag.closure(top);
        let resolved: Vec<String> = closure
            .iter()
            .filter_map(|n| self.resolved.get(n).cloned())
            .collect();
        closure.extend(resolved);
        closure
    }

    /// The compatibility rule, modelled independently of the core.
    fn can_build(machine: &MachineSpec, node: &Node) -> bool {
        let has = |list: &[String], x: &String| list.contains(x);
        machine.max_jobs > 0
            && (node.system == "builtin" || has(&machine.systems, &node.system))
            && node
                .features
                .iter()
                .all(|f| has(&machine.supported_features, f) || has(&machine.mandatory_features, f))
            && machine
                .mandatory_features
                .iter()
                .all(|f| has(&node.features, f))
    }

    /// Hydra's order, modelled independently of the core: no step the
    /// machine could have taken instead had a higher global priority, nor
    /// was more urgent and of the same jobset (across jobsets of equal
    /// global priority the scheduling shares decide).
    fn check_hydra_order(&self, step: &str, machine_name: &str) {
        // Per needed step: (highest global, highest local, oldest build).
        let mut keys: BTreeMap<String, (i32, i32, i32)> = BTreeMap::new();
        for (&build, top) in &self.queued {
            let (global, local) = self.priorities[&build];
            for name in self.needed(top) {
                let key = keys.entry(name).or_insert((i32::MIN, i32::MIN, i32::MAX));
                *key = (key.0.max(global), key.1.max(local), key.2.min(build.0));
            }
        }
        let urgency =
            |key: (i32, i32, i32)| (std::cmp::Reverse(key.0), std::cmp::Reverse(key.1), key.2);
        let Some(&chosen) = keys.get(step) else {
            panic!("{step} dispatched but no queued build needs it")
        };
        let jobset = |key: (i32, i32, i32)| self.jobsets.get(&BuildId(key.2)).copied();
        let machine = &self.machines[machine_name].spec;
        for (other, &key) in &keys {
            let node = &self.dag.nodes[other];
            let runnable = other != step
                && !node.needs_resolution
                && !self.running.contains_key(other)
                && node.inputs.iter().all(|i| self.valid.contains(i))
                && self
                    .delayed
                    .get(other)
                    .is_none_or(|until| *until <= self.now);
            if runnable && Self::can_build(machine, node) {
                assert!(
                    key.0 <= chosen.0,
                    "{step} {chosen:?} sent to {machine_name} before {other} {key:?} of a higher global priority"
                );
                if key.0 == chosen.0 && jobset(key) == jobset(chosen) {
                    assert!(
                        urgency(key) >= urgency(chosen),
                        "{step} {chosen:?} sent to {machine_name} before more urgent {other} {key:?}"
                    );
                }
            }
        }
    }

    fn check_dispatch(&self, step: &str, machine_name: &str, build: BuildId) {
        assert!(
            !self.running.contains_key(step),
            "{step} dispatched twice at once"
        );
        assert!(
            !self.valid.contains(step),
            "{step} dispatched although built"
        );
        let node = &self.dag.nodes[step];
        for input in &node.inputs {
            assert!(
                self.valid.contains(input),
                "{step} dispatched before its input {input} was built"
            );
        }
        let machine = &self.machines[machine_name].spec;
        let busy = self
            .running
            .values()
            .filter(|(m, _)| m == machine_name)
            .count();
        assert!(
            busy < (machine.max_jobs + machine.prefetch) as usize,
            "{machine_name} has no free slot for {step}"
        );
        assert!(
            Self::can_build(machine, node),
            "{step} sent to {machine_name}, which cannot build it"
        );
        let top = self
            .queued
            .get(&build)
            .unwrap_or_else(|| panic!("{step} dispatched for finished {build}"));
        assert!(
            self.closure_with_resolved(top).contains(step),
            "{build} does not need {step}"
        );
        assert!(
            !self.dag.nodes[step].needs_resolution,
            "{step} dispatched without being resolved"
        );
    }

    fn check_finished(&mut self, finished: &BuildFinished) -> String {
        let BuildFinished {
            build,
            status,
            cached,
            failed_step,
            dependents,
        } = finished;
        let all = std::iter::once((*build, *status))
            .chain(dependents.iter().map(|d| (d.build, d.status)));
        let mut parts = Vec::new();
        for (id, status) in all {
            let top = self
                .queued
                .remove(&id)
                .unwrap_or_else(|| panic!("{id} finished but was not queued (or finished twice)"));
            self.finished.insert(id, status);
            match failed_step {
                None if status == Status::Success => {
                    assert!(
                        self.valid.contains(&top) || *cached,
                        "{id} succeeded without its top built"
                    )
                }
                None => {}
                Some(step) => assert!(
                    self.closure_with_resolved(&top).contains(&name(step)),
                    "{id} failed by {} which it does not need",
                    name(step)
                ),
            }
            parts.push(format!("{id} {status}"));
        }
        let mut line = format!("finished {}", parts.join(", "));
        if *cached {
            line.push_str(" (cached)");
        }
        if let Some(step) = failed_step {
            line.push_str(&format!(" by {}", name(step)));
        }
        line
    }

    /// Connects a machine that can build anything, then succeeds every
    /// running step and lets time pass until no build is left. Returns
    /// false if builds remain after `max_rounds`.
    pub fn drain(&mut self, max_rounds: usize) -> bool {
        let systems: BTreeSet<String> = self.dag.nodes.values().map(|n| n.system.clone()).collect();
        let features: BTreeSet<String> = self
            .dag
            .nodes
            .values()
            .flat_map(|n| n.features.clone())
            .collect();
        self.connect(
            "drain",
            systems.into_iter().collect(),
            features.into_iter().collect(),
            Vec::new(),
            (4, 0),
            1.0,
        );
        for _ in 0..max_rounds {
            if self.queued.is_empty() {
                return true;
            }
            if let Some(step) = self.resolving.iter().next().cloned() {
                self.act(&format!("resolved {step} valid"));
                continue;
            }
            match self.running.keys().next().cloned() {
                Some(step) => self.finish(&step, StepOutcome::Success),
                None => self.advance(Duration::from_secs(3600)),
            }
        }
        self.queued.is_empty()
    }
}
