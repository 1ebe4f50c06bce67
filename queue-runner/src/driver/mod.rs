//! The driver: the one task that owns the scheduling core.
//!
//! Everything that happens reaches it as a [`DriverEvent`] on one channel:
//! agent messages from the gRPC layer, database notifications, batches of
//! builds loaded from PostgreSQL and the store, and the outcome of
//! background work it started. It turns them into core events, calls
//! `Core::handle`, and executes the returned commands: database writes go
//! to the ordered [`writer`] task, assignments are prepared by short-lived
//! tasks ([`prepare`]) and sent to the agent's channel.
//!
//! Invariants: only this task touches the `Core`; the driver never awaits
//! the database or the store itself (background tasks do and answer with
//! events), so a slow query never delays a dispatch decision; every
//! attempt's `BuildSteps` row is written by the writer in the order the
//! driver asked, so a step's row exists before it is finished, and a build's
//! steps are finished before the build.

mod load;
mod postprocess;
mod prepare;
pub mod writer;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_core::{
    BuildId, Command, Config, Core, DrvPath, Event, MachineId, MachineSpec, Millis, StepFailure,
    StepOutcome,
};
use tokio::sync::{mpsc, watch};

use crate::agents::{AgentInfo, AgentLoad, AttemptId, FromAgent, StepReport, ToAgent};
use crate::db::queue::QueuedBuild;
use crate::ingest::ClosureDrv;
use crate::status::{MachineStatus, StatusSnapshot};
use crate::store::Store;
use writer::{WriteJob, Writer};

/// Everything the driver reacts to.
#[derive(Debug)]
pub enum DriverEvent {
    Agent(FromAgent),
    /// A PostgreSQL notification on one of the channels we listen to.
    Notification(String),
    /// New builds with their closures (see [`load`]).
    Loaded(load::LoadedBatch),
    /// Held builds that are finished or gone from the database.
    BuildsGone(Vec<BuildId>),
    /// Held builds whose `globalPriority` changed.
    BuildsBumped(Vec<(BuildId, i32)>),
    /// The attempt's `BuildSteps` row exists (`stepnr > 0`) and its
    /// assignment is ready, or preparing it failed.
    Prepared {
        attempt: AttemptId,
        stepnr: i32,
        assignment: Box<Result<(crate::agents::Assignment, AttemptEntry), String>>,
    },
    /// The listener lost the database and reconnected: notifications may
    /// have been missed, so look at the queue again.
    Resync,
    /// The writer found the database gone, or back.
    Database(writer::DatabaseHealth),
    /// The writer is done with these finished builds' rows (committed, or
    /// refused for good).
    BuildsWritten(Vec<BuildId>),
    Shutdown,
}

/// How the writer's queue was flushed at shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flushed {
    /// Every queued write was executed.
    Done { pending: usize, took: Duration },
    /// The timeout passed first; the writes still queued are lost.
    TimedOut { pending: usize, after: Duration },
}

/// Settings the driver needs besides the core's.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    pub core: Config,
    pub data_dir: std::path::PathBuf,
    pub max_log_bytes: u64,
    pub max_output_bytes: u64,
    /// How many builds one load reads at most.
    pub load_batch: i64,
    /// How long [`Driver::run`] waits at shutdown for pending writes.
    pub shutdown_timeout: Duration,
    /// Writes queued for the writer at most; past that the driver keeps
    /// the rest in order and dispatches nothing until they drain.
    pub max_pending_writes: usize,
}

/// One attempt at a step, from dispatch to its end.
#[derive(Debug, Clone)]
struct Attempt {
    drv_path: DrvPath,
    machine: MachineId,
    build: BuildId,
    machine_name: String,
    /// `None` until the `BuildSteps` row exists.
    stepnr: Option<i32>,
    started_unix: i64,
}

#[derive(Debug, Clone)]
struct BuiltStep {
    outputs: Vec<(String, String)>,
    start_time: i64,
    stop_time: i64,
}

struct Machine {
    info: AgentInfo,
    commands: mpsc::Sender<ToAgent>,
    load: AgentLoad,
    running: usize,
    steps_done: u64,
    build_ms_total: u64,
}

/// Counters for `/status`, beyond the core's.
#[derive(Debug, Default, Clone)]
struct Counters {
    queue_wakeups: u64,
    dispatcher_wakeups: u64,
    dispatch_time_ms: u64,
    builds_done: u64,
    steps_done: u64,
}

use crate::grpc::AttemptEntry;
/// The shared registry of running attempts, for the gRPC layer.
pub use crate::grpc::Attempts;

pub struct Driver {
    core: Core,
    config: DriverConfig,
    clock: Instant,
    started_unix: i64,
    events: mpsc::Receiver<DriverEvent>,
    me: mpsc::Sender<DriverEvent>,
    pool: sqlx::PgPool,
    store: Store,
    writer: mpsc::Sender<WriteJob>,
    writer_task: tokio::task::JoinHandle<()>,
    /// Writes that found the writer's queue full, in order: they go before
    /// any later write. While any wait, dispatches and loads wait too.
    write_backlog: std::collections::VecDeque<WriteJob>,
    /// Dispatches the core made while writes were backlogged, started
    /// once the backlog drains (at most one per free slot).
    deferred_dispatches: std::collections::VecDeque<(DrvPath, MachineId, BuildId)>,
    attempts_shared: Attempts,
    machines: HashMap<MachineId, Machine>,
    attempts: HashMap<AttemptId, Attempt>,
    by_step: HashMap<(DrvPath, MachineId), AttemptId>,
    builds: HashMap<BuildId, Arc<QueuedBuild>>,
    closure: HashMap<DrvPath, ClosureDrv>,
    /// Output paths and times of steps that succeeded, for the builds they
    /// finish and for floating content-addressed inputs of later steps.
    built_outputs: HashMap<DrvPath, BuiltStep>,
    started_builds: HashSet<BuildId>,
    /// Builds finished here whose rows a load may not see yet: `false`
    /// until the writer has written them ([`DriverEvent::BuildsWritten`]),
    /// `true` after, until the next load starts (a load in flight may have
    /// read them before). A load must not take them for queued ones.
    recently_finished: HashMap<BuildId, bool>,
    next_attempt: u64,
    loader: load::Loader,
    counters: Counters,
    /// As the writer last reported it.
    database: writer::DatabaseHealth,
    status: watch::Sender<StatusSnapshot>,
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Driver {
    /// Creates the driver and the ordered writer task. `events` is the
    /// receiving end of the channel whose senders the gRPC layer and the
    /// listener hold.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: DriverConfig,
        pool: sqlx::PgPool,
        store: Store,
        attempts_shared: Attempts,
        me: mpsc::Sender<DriverEvent>,
        events: mpsc::Receiver<DriverEvent>,
        status: watch::Sender<StatusSnapshot>,
    ) -> Driver {
        let (writer, writer_task) = Writer::spawn(
            pool.clone(),
            store.clone(),
            config.data_dir.clone(),
            me.clone(),
            config.max_pending_writes,
        );
        Driver {
            core: Core::new(config.core.clone()),
            loader: load::Loader::new(config.load_batch),
            config,
            clock: Instant::now(),
            started_unix: unix_now(),
            events,
            me,
            pool,
            store,
            writer,
            writer_task,
            write_backlog: Default::default(),
            deferred_dispatches: Default::default(),
            attempts_shared,
            machines: HashMap::new(),
            attempts: HashMap::new(),
            by_step: HashMap::new(),
            builds: HashMap::new(),
            closure: HashMap::new(),
            built_outputs: HashMap::new(),
            started_builds: HashSet::new(),
            recently_finished: Default::default(),
            next_attempt: 1,
            counters: Counters::default(),
            database: writer::DatabaseHealth::Up,
            status,
        }
    }

    fn now(&self) -> Millis {
        Millis(self.clock.elapsed().as_millis() as u64)
    }

    /// Runs until [`DriverEvent::Shutdown`] or until every sender is gone,
    /// then stops taking work and flushes the writer (see [`Driver::flush`]).
    pub async fn run(mut self) -> Flushed {
        self.serve().await;
        self.publish_status();
        self.flush().await
    }

    async fn serve(&mut self) {
        self.load_new();
        loop {
            let deadline = self.core.next_deadline();
            let sleep_for = deadline
                .map(|d| Duration::from_millis(d.0.saturating_sub(self.now().0)))
                .unwrap_or(Duration::from_secs(3600));
            let writer = self.writer.clone();
            let backlogged = !self.write_backlog.is_empty();
            let event = tokio::select! {
                e = self.events.recv() => e,
                _ = tokio::time::sleep(sleep_for) => {
                    self.apply(Event::Tick);
                    self.publish_status();
                    continue;
                }
                permit = writer.reserve(), if backlogged => {
                    if let (Ok(permit), Some(job)) = (permit, self.write_backlog.pop_front()) {
                        permit.send(job);
                    }
                    self.drain_backlog();
                    self.publish_status();
                    continue;
                }
            };
            match event {
                None | Some(DriverEvent::Shutdown) => return,
                Some(event) => self.on_event(event),
            }
            // Drain what is already queued before publishing.
            while let Ok(event) = self.events.try_recv() {
                if matches!(event, DriverEvent::Shutdown) {
                    return;
                }
                self.on_event(event);
            }
            self.publish_status();
        }
    }

    /// Waits, up to the configured shutdown timeout, for the writer to
    /// commit what is queued. No new write is queued by the driver after
    /// this starts; background tasks still holding a sender (a preparation
    /// in flight) may add theirs until they end.
    async fn flush(self) -> Flushed {
        let pending = self.writer.max_capacity() - self.writer.capacity();
        let Driver {
            writer,
            writer_task,
            config,
            ..
        } = self;
        drop(writer);
        let started = Instant::now();
        match tokio::time::timeout(config.shutdown_timeout, writer_task).await {
            Ok(_) => Flushed::Done {
                pending,
                took: started.elapsed(),
            },
            Err(_) => Flushed::TimedOut {
                pending,
                after: config.shutdown_timeout,
            },
        }
    }

    fn on_event(&mut self, event: DriverEvent) {
        match event {
            DriverEvent::Agent(msg) => self.on_agent(msg),
            DriverEvent::Notification(channel) => self.on_notification(&channel),
            DriverEvent::Loaded(batch) => self.on_loaded(batch),
            DriverEvent::BuildsGone(ids) => {
                for id in ids {
                    if self.builds.contains_key(&id) {
                        self.builds.remove(&id);
                        self.apply(Event::BuildCancelled { build: id });
                    }
                }
            }
            DriverEvent::BuildsBumped(changes) => {
                for (id, global_priority) in changes {
                    if self.builds.contains_key(&id) {
                        self.apply(Event::BuildBumped {
                            build: id,
                            global_priority,
                        });
                    }
                }
            }
            DriverEvent::Prepared {
                attempt,
                stepnr,
                assignment,
            } => self.on_prepared(attempt, stepnr, *assignment),
            DriverEvent::Resync => {
                self.prune();
                self.load_new();
                self.load_restarted();
                self.check_held_builds(true);
            }
            DriverEvent::Database(health) => self.database = health,
            DriverEvent::BuildsWritten(ids) => {
                for id in ids {
                    if let Some(written) = self.recently_finished.get_mut(&id) {
                        *written = true;
                    }
                }
            }
            DriverEvent::Shutdown => {}
        }
    }

    fn on_notification(&mut self, channel: &str) {
        self.counters.queue_wakeups += 1;
        match channel {
            "builds_added" => self.load_new(),
            "builds_restarted" => self.load_restarted(),
            "builds_cancelled" | "builds_deleted" => self.check_held_builds(false),
            "builds_bumped" => self.check_held_builds(true),
            // Scheduling shares are not used by the core yet.
            "jobset_shares_changed" => {}
            other => tracing::debug!(channel = other, "ignoring notification"),
        }
    }

    /// Feeds one event to the core and executes what it answers.
    fn apply(&mut self, event: Event) {
        let started = Instant::now();
        let commands = self.core.handle(event, self.now());
        self.counters.dispatcher_wakeups += 1;
        for command in commands {
            self.execute(command);
        }
        self.counters.dispatch_time_ms += started.elapsed().as_millis() as u64;
    }

    fn execute(&mut self, command: Command) {
        match command {
            Command::Dispatch {
                drv_path,
                machine,
                build,
                attempt: _,
            } => self.dispatch(drv_path, machine, build),
            Command::CancelStep {
                drv_path, machine, ..
            } => {
                self.deferred_dispatches
                    .retain(|(d, m, _)| !(*d == drv_path && *m == machine));
                if let Some(id) = self.by_step.remove(&(drv_path, machine)) {
                    if let Some(m) = self.machines.get(&machine) {
                        let _ = m.commands.try_send(ToAgent::Cancel(id));
                    }
                    self.end_attempt(id, 4, "cancelled: no build needs this step any more");
                }
            }
            Command::StepRequeued { .. } => {
                // The failed attempt's row was finished when it ended.
            }
            Command::StepUnsupported { drv_path, builds } => {
                let system = self
                    .closure
                    .get(&drv_path)
                    .map(|c| c.spec.system.clone())
                    .unwrap_or_default();
                for build in builds {
                    self.send_write(WriteJob::UnsupportedStep {
                        build,
                        drv_path: drv_path.as_str().to_string(),
                        system: system.clone(),
                        time: unix_now(),
                    });
                }
            }
            Command::BuildFinished(finished) => self.build_finished(finished),
            Command::EventRejected(err) => tracing::warn!(%err, "event rejected by the core"),
        }
    }

    /// Queues a write for the writer, in order. When its queue is full the
    /// write waits in the driver's backlog (never in a task of its own),
    /// and so does every later one; dispatching and loading pause until
    /// the backlog has drained ([`Driver::drain_backlog`]).
    fn send_write(&mut self, job: WriteJob) {
        if !self.write_backlog.is_empty() {
            self.write_backlog.push_back(job);
            return;
        }
        match self.writer.try_send(job) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(job)) => {
                tracing::warn!(
                    "the database writer is behind: dispatching pauses until its queue drains"
                );
                self.write_backlog.push_back(job);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::error!("the database writer stopped; results are not being recorded");
            }
        }
    }

    /// Moves backlogged writes into the writer's queue while it has room;
    /// once none wait, starts the dispatches and loads that waited.
    fn drain_backlog(&mut self) {
        while let Some(job) = self.write_backlog.pop_front() {
            match self.writer.try_send(job) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(job)) => {
                    self.write_backlog.push_front(job);
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    tracing::error!("the database writer stopped; results are not being recorded");
                    self.write_backlog.clear();
                }
            }
        }
        tracing::info!("the database writer caught up: dispatching again");
        while let Some((drv_path, machine, build)) = self.deferred_dispatches.pop_front() {
            self.dispatch(drv_path, machine, build);
            if !self.write_backlog.is_empty() {
                return;
            }
        }
        self.start_load();
    }

    fn on_agent(&mut self, msg: FromAgent) {
        match msg {
            FromAgent::Connected {
                machine,
                info,
                commands,
            } => {
                let spec = MachineSpec {
                    id: machine,
                    name: info.name.clone(),
                    systems: info.systems.clone(),
                    supported_features: info.supported_features.clone(),
                    mandatory_features: info.mandatory_features.clone(),
                    max_jobs: info.max_jobs,
                    speed_factor: info.speed_factor,
                };
                self.machines.insert(
                    machine,
                    Machine {
                        info,
                        commands,
                        load: AgentLoad::default(),
                        running: 0,
                        steps_done: 0,
                        build_ms_total: 0,
                    },
                );
                self.apply(Event::MachineConnected(spec));
            }
            FromAgent::Disconnected { machine } => {
                if self.machines.remove(&machine).is_none() {
                    return;
                }
                let gone: Vec<AttemptId> = self
                    .attempts
                    .iter()
                    .filter(|(_, a)| a.machine == machine)
                    .map(|(id, _)| *id)
                    .collect();
                for id in gone {
                    self.end_attempt(id, 3, "the builder disconnected");
                }
                self.by_step.retain(|(_, m), _| *m != machine);
                self.deferred_dispatches.retain(|(_, m, _)| *m != machine);
                self.apply(Event::MachineDisconnected { machine });
            }
            FromAgent::Heartbeat { machine, load } => {
                if let Some(m) = self.machines.get_mut(&machine) {
                    m.load = load;
                }
            }
            FromAgent::Phase {
                machine,
                attempt,
                busy,
            } => {
                if let Some(a) = self.attempts.get(&attempt) {
                    if a.machine == machine {
                        if let Some(stepnr) = a.stepnr {
                            self.send_write(WriteJob::Phase {
                                build: a.build,
                                stepnr,
                                busy,
                            });
                        }
                    }
                }
            }
            FromAgent::Finished {
                machine,
                attempt,
                report,
            } => self.on_finished(machine, attempt, report),
        }
    }

    fn on_finished(&mut self, machine: MachineId, attempt: AttemptId, report: StepReport) {
        let Some(a) = self.attempts.get(&attempt) else {
            tracing::warn!(%attempt, "result for an unknown attempt");
            return;
        };
        if a.machine != machine {
            tracing::warn!(%attempt, %machine, "result from a machine that does not run it");
            return;
        }
        // The assignment is sent only once the row exists, so a result
        // for an attempt without a row is a lie.
        if a.stepnr.is_none() {
            tracing::warn!(%attempt, "result for an attempt that was never assigned");
            return;
        }
        self.complete(attempt, report);
    }

    /// Records the end of an attempt and tells the core.
    fn complete(&mut self, attempt: AttemptId, report: StepReport) {
        let Some(a) = self.attempts.remove(&attempt) else {
            return;
        };
        let _ = self.attempts_shared.remove(attempt);
        self.by_step.remove(&(a.drv_path.clone(), a.machine));
        if let Some(m) = self.machines.get_mut(&a.machine) {
            m.running = m.running.saturating_sub(1);
            m.steps_done += 1;
            let ms = (report.stop_time - report.start_time).max(0) as u64 * 1000;
            m.build_ms_total += ms;
        }
        self.counters.steps_done += 1;
        let outcome = outcome_of(report.status);
        if report.status == 0 {
            self.built_outputs.insert(
                a.drv_path.clone(),
                BuiltStep {
                    outputs: report.outputs.clone(),
                    start_time: report.start_time,
                    stop_time: report.stop_time,
                },
            );
        }
        if let Some(stepnr) = a.stepnr {
            let failed_paths = if fails_for_good(report.status) {
                self.closure
                    .get(&a.drv_path)
                    .map(|c| c.outputs.values().flatten().cloned().collect())
                    .unwrap_or_default()
            } else {
                Vec::new()
            };
            self.send_write(WriteJob::FinishStep {
                build: a.build,
                stepnr,
                drv_path: a.drv_path.as_str().to_string(),
                machine: a.machine_name.clone(),
                report,
                failed_paths,
            });
        }
        let succeeded = outcome == StepOutcome::Success;
        self.apply(Event::StepFinished {
            drv_path: a.drv_path.clone(),
            machine: a.machine,
            outcome,
        });
        if succeeded {
            // The builds this step finished were recorded by the call
            // above; only a floating output's path is needed later (by
            // dependents, to resolve their inputs).
            let floating = self
                .closure
                .get(&a.drv_path)
                .is_some_and(|c| c.outputs.values().any(Option::is_none));
            if !floating {
                self.built_outputs.remove(&a.drv_path);
            }
            self.closure.remove(&a.drv_path);
        }
    }

    /// Drops what the driver keeps about derivations the core no longer
    /// holds a step for (steps of failed or cancelled builds), so memory
    /// follows the queue, not the history.
    fn prune(&mut self) {
        let core = &self.core;
        self.closure.retain(|drv, _| core.has_step(drv.as_str()));
        if self.builds.is_empty() {
            self.built_outputs.clear();
        }
        let live: HashSet<BuildId> = self.builds.keys().copied().collect();
        self.started_builds.retain(|b| live.contains(b));
    }

    /// Ends an attempt the driver itself gives up on (cancel, disconnect,
    /// preparation failure), recording `status` with `error`.
    fn end_attempt(&mut self, attempt: AttemptId, status: i32, error: &str) {
        let Some(a) = self.attempts.remove(&attempt) else {
            return;
        };
        let _ = self.attempts_shared.remove(attempt);
        if let Some(m) = self.machines.get_mut(&a.machine) {
            m.running = m.running.saturating_sub(1);
        }
        if let Some(stepnr) = a.stepnr {
            let now = unix_now();
            self.send_write(WriteJob::FinishStep {
                build: a.build,
                stepnr,
                drv_path: a.drv_path.as_str().to_string(),
                machine: a.machine_name.clone(),
                report: StepReport {
                    status,
                    error_msg: error.to_string(),
                    times_built: 0,
                    is_non_deterministic: false,
                    start_time: a.started_unix,
                    stop_time: now,
                    outputs: Vec::new(),
                    overhead_ms: 0,
                },
                failed_paths: Vec::new(),
            });
        }
    }

    fn dispatch(&mut self, drv_path: DrvPath, machine: MachineId, build: BuildId) {
        if !self.write_backlog.is_empty() {
            self.deferred_dispatches
                .push_back((drv_path, machine, build));
            return;
        }
        let id = AttemptId(self.next_attempt);
        self.next_attempt += 1;
        let Some(m) = self.machines.get_mut(&machine) else {
            return;
        };
        m.running += 1;
        let machine_name = m.info.name.clone();
        let first_for_build = self.started_builds.insert(build);
        let outputs = self
            .closure
            .get(&drv_path)
            .map(|c| c.outputs.clone())
            .unwrap_or_default();
        let system = self
            .closure
            .get(&drv_path)
            .map(|c| c.spec.system.clone())
            .unwrap_or_default();
        let started_unix = unix_now();
        self.attempts.insert(
            id,
            Attempt {
                drv_path: drv_path.clone(),
                machine,
                build,
                machine_name: machine_name.clone(),
                stepnr: None,
                started_unix,
            },
        );
        self.by_step.insert((drv_path.clone(), machine), id);
        let realised = self.realised_inputs(&drv_path);
        let job = prepare::Preparation {
            attempt: id,
            machine,
            build,
            drv_path: drv_path.as_str().to_string(),
            system,
            machine_name,
            outputs,
            first_for_build,
            started_unix,
            realised,
            max_log_bytes: self.config.max_log_bytes,
            max_output_bytes: self.config.max_output_bytes,
            timeouts: self
                .builds
                .get(&build)
                .map(|b| (b.max_silent_s, b.timeout_s))
                .unwrap_or((3600, 36000)),
        };
        let writer = self.writer.clone();
        let store = self.store.clone();
        let me = self.me.clone();
        tokio::spawn(prepare::run(job, writer, store, me));
    }

    /// Output paths built by this run for the input derivations of
    /// `drv_path`: what a floating content-addressed input resolves to.
    fn realised_inputs(&self, drv_path: &DrvPath) -> HashMap<(String, String), String> {
        let mut out = HashMap::new();
        let Some(step) = self.closure.get(drv_path) else {
            return out;
        };
        for input in &step.spec.input_drvs {
            if let Some(built) = self.built_outputs.get(input) {
                for (name, path) in &built.outputs {
                    out.insert((input.as_str().to_string(), name.clone()), path.clone());
                }
            }
        }
        out
    }

    fn on_prepared(
        &mut self,
        attempt: AttemptId,
        stepnr: i32,
        assignment: Result<(crate::agents::Assignment, AttemptEntry), String>,
    ) {
        let Some(a) = self.attempts.get_mut(&attempt) else {
            // Cancelled or disconnected meanwhile; its row (if any) was
            // finished without a step number, so finish it now.
            if stepnr > 0 {
                tracing::debug!(%attempt, "prepared after the attempt ended");
            }
            return;
        };
        if stepnr > 0 {
            a.stepnr = Some(stepnr);
        }
        let machine = a.machine;
        let started = a.started_unix;
        let sent = assignment.and_then(|(assignment, entry)| {
            self.attempts_shared
                .register(attempt, entry)
                .map_err(|e| e.to_string())?;
            let commands = self
                .machines
                .get(&machine)
                .map(|m| m.commands.clone())
                .ok_or_else(|| "the builder went away".to_string())?;
            commands
                .try_send(ToAgent::Assign(assignment))
                .map_err(|_| "the builder's command queue is full or closed".to_string())
        });
        if let Err(error) = sent {
            let report = StepReport {
                status: 3,
                error_msg: error,
                times_built: 0,
                is_non_deterministic: false,
                start_time: started,
                stop_time: unix_now(),
                outputs: Vec::new(),
                overhead_ms: 0,
            };
            self.complete(attempt, report);
        }
    }

    fn build_finished(&mut self, finished: sluice_core::BuildFinished) {
        let mut ids = vec![(finished.build, finished.status)];
        ids.extend(finished.dependents.iter().map(|d| (d.build, d.status)));
        let mut builds = Vec::new();
        for (id, status) in ids {
            let Some(build) = self.builds.remove(&id) else {
                continue;
            };
            self.started_builds.remove(&id);
            self.recently_finished.insert(id, false);
            self.counters.builds_done += 1;
            let top = DrvPath::from(build.drv_path.as_str());
            let built = self.built_outputs.get(&top);
            builds.push(writer::FinishedBuild {
                build: build.clone(),
                status: status.code(),
                outputs: built.map(|b| b.outputs.clone()),
                times: built.map(|b| (b.start_time, b.stop_time)),
            });
        }
        if builds.is_empty() {
            return;
        }
        self.send_write(WriteJob::FinishBuilds {
            head: finished.build,
            cached: finished.cached,
            failed_step: finished.failed_step.map(|d| d.as_str().to_string()),
            builds,
            time: unix_now(),
        });
        // Forget closure details nobody needs any more.
        if self.builds.is_empty() {
            self.prune();
        }
    }

    fn publish_status(&mut self) {
        let stats = self.core.stats();
        let machines = self
            .machines
            .iter()
            .map(|(id, m)| MachineStatus {
                id: id.0,
                hostname: m.info.name.clone(),
                systems: m.info.systems.clone(),
                max_jobs: m.info.max_jobs,
                speed_factor: m.info.speed_factor,
                supported_features: m.info.supported_features.clone(),
                mandatory_features: m.info.mandatory_features.clone(),
                running: m.running,
                total_mem: m.info.total_mem_bytes,
                load: m.load.clone(),
                steps_done: m.steps_done,
                avg_step_build_ms: m.build_ms_total.checked_div(m.steps_done).unwrap_or(0),
            })
            .collect();
        let snapshot = StatusSnapshot {
            started_unix: self.started_unix,
            uptime_s: self.clock.elapsed().as_secs(),
            core: stats,
            builds_queued: self.builds.len(),
            queue_wakeups: self.counters.queue_wakeups,
            dispatcher_wakeups: self.counters.dispatcher_wakeups,
            dispatch_time_ms: self.counters.dispatch_time_ms,
            builds_done: self.counters.builds_done,
            steps_done: self.counters.steps_done,
            machines,
            database_down_since: match self.database {
                writer::DatabaseHealth::Up => None,
                writer::DatabaseHealth::Down { since_unix } => Some(since_unix),
            },
            pending_writes: self.writer.max_capacity() - self.writer.capacity()
                + self.write_backlog.len(),
        };
        let _ = self.status.send(snapshot);
    }
}

/// Whether a step status is a failure of the build itself, which building
/// again will not fix: its outputs go into `FailedPaths` (Hydra's rule).
fn fails_for_good(status: i32) -> bool {
    matches!(status, 1 | 7 | 10 | 11)
}

/// A Hydra step status from an agent, as the core's outcome.
fn outcome_of(status: i32) -> StepOutcome {
    let failed = |failure, can_retry| StepOutcome::Failed { failure, can_retry };
    match status {
        0 => StepOutcome::Success,
        1 => failed(StepFailure::Failed, false),
        7 => failed(StepFailure::TimedOut, false),
        10 => failed(StepFailure::LogLimitExceeded, false),
        11 => failed(StepFailure::NarSizeLimitExceeded, false),
        12 => failed(StepFailure::NotDeterministic, false),
        // 3 and anything unexpected: infrastructure trouble, retried.
        _ => failed(StepFailure::Aborted, true),
    }
}
