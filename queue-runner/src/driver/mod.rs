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
//! The room is split by concern: [`attempts`] (dispatch to result),
//! [`machines`] (agents and the status snapshot), [`resume`] (leases of
//! disconnected agents, attempts adopted after a restart), [`builds`] (finished
//! builds), [`load`] (queued builds in), [`resolve`] (content-addressed
//! steps resolved into fresh ones), [`backlog`] (writes out, with
//! backpressure), [`upload`] (outputs and logs into the binary cache
//! before successful builds are written finished) and the [`writer`] task
//! itself.
//!
//! Invariants: only this task touches the `Core`; the driver never awaits
//! the database or the store itself (background tasks do and answer with
//! events), so a slow query never delays a dispatch decision; every
//! attempt's `BuildSteps` row is written by the writer in the order the
//! driver asked, so a step's row exists before it is finished, and a build's
//! steps are finished before the build; with a binary cache, a successful
//! build is written finished only after its outputs are in the cache.

mod attempts;
mod backlog;
mod builds;
mod load;
mod machines;
mod postprocess;
mod prepare;
pub mod resolve;
mod resume;
pub mod upload;
pub mod writer;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_core::{
    BuildId, Command, Config, ConfiguredOrder, Core, DrvPath, Event, MachineId, MachineSpec,
    Millis, StepFailure, StepOutcome,
};
use tokio::sync::{mpsc, watch};

use crate::agents::{AgentInfo, AgentLoad, AttemptId, FailureKind, FromAgent, StepReport, ToAgent};
use crate::ingest::HeldDrv;
use crate::status::{MachineStatus, StatusSnapshot};
use crate::store::Store;
use attempts::Attempt;
pub use builds::HeldBuild;
use machines::Machine;
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
    /// Every jobset's scheduling shares, read after `jobset_shares_changed`.
    JobsetShares(Vec<(i32, u32)>),
    /// A step's resolution is done (see [`resolve`]).
    Resolved(Box<resolve::Resolved>),
    /// A resolution that failed for want of the database or the store is
    /// due again.
    ResolveAgain {
        drv_path: DrvPath,
        build: BuildId,
    },
    /// A binary cache upload ended (see [`upload`]).
    Uploaded(upload::Uploaded),
    /// A failed upload is due to be tried again.
    UploadDue(upload::UploadId),
    /// A build log's upload to the binary cache ended.
    LogUploaded(upload::LogUploaded),
    Shutdown,
}

/// What woke the driver's loop. It lives on the stack for one turn of the
/// loop, so its size does not matter and boxing the event would only add an
/// allocation per event.
#[allow(clippy::large_enum_variant)]
enum Wake {
    Event(Option<DriverEvent>),
    /// The core's next deadline passed.
    Timer,
    /// The writer took one backlogged write; more may fit.
    WriterRoom,
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
    /// How long a disconnected agent keeps its attempts, and how long a
    /// restart waits for agents to report theirs.
    pub lease: Duration,
    /// An agent above this CPU pressure (percent) gets no new steps; 0: off.
    pub max_cpu_pressure: f32,
    /// An agent with less free disk (MiB) gets no new steps; 0: off.
    pub min_free_disk_mb: u64,
    /// The order of runnable steps.
    pub order: ConfiguredOrder,
}

#[derive(Debug, Clone)]
struct BuiltStep {
    outputs: Vec<(String, String)>,
    start_time: i64,
    stop_time: i64,
}

/// Counters for `/status`, beyond the core's.
#[derive(Debug, Default, Clone)]
struct Counters {
    queue_wakeups: u64,
    dispatcher_wakeups: u64,
    dispatch_time_ms: u64,
    builds_done: u64,
    steps_done: u64,
    /// Builds handed to the core by loads.
    builds_read: u64,
    /// The most failed tries any step had when it was queued again.
    max_tries: u32,
    /// Of the attempts that ran on a machine: milliseconds from dispatch
    /// to result, and building as their agents measured it.
    step_ms_total: u64,
    build_ms_total: u64,
}

use crate::grpc::AttemptEntry;
/// The shared registry of running attempts, for the gRPC layer.
pub use crate::grpc::Attempts;

pub struct Driver {
    core: Core<ConfiguredOrder>,
    config: DriverConfig,
    clock: Instant,
    started_unix: i64,
    events: mpsc::Receiver<DriverEvent>,
    me: mpsc::Sender<DriverEvent>,
    pool: sqlx::PgPool,
    store: Store,
    writer: mpsc::Sender<WriteJob>,
    /// Writes the writer took from its queue and has not committed yet.
    writer_in_flight: writer::InFlight,
    writer_task: tokio::task::JoinHandle<()>,
    /// Writes that found the writer's queue full, in order: they go before
    /// any later write. While any wait, dispatches and loads wait too.
    write_backlog: std::collections::VecDeque<WriteJob>,
    /// Dispatches the core made while writes were backlogged, started
    /// once the backlog drains (at most one per free slot).
    deferred_dispatches: std::collections::VecDeque<(DrvPath, MachineId, BuildId)>,
    /// While a loaded batch is being queued: its dispatches wait until
    /// every build of the batch is known, so a step's limits are the
    /// largest among all the builds that need it.
    hold_dispatches: bool,
    attempts_shared: Attempts,
    machines: HashMap<MachineId, Machine>,
    attempts: HashMap<AttemptId, Attempt>,
    by_step: HashMap<(DrvPath, MachineId), AttemptId>,
    /// Attempts that ended before their row had a number, with the status
    /// and reason to finish it with once it has.
    ended_before_row: HashMap<AttemptId, (Attempt, i32, String)>,
    builds: HashMap<BuildId, HeldBuild>,
    /// What dispatch and results need of each derivation the core holds
    /// a step for (one compact entry each; see `HeldDrv`).
    closure: crate::drv_table::DrvTable<HeldDrv>,
    /// Systems, interned for `closure` (which holds their indexes).
    systems: Vec<Arc<str>>,
    /// Output paths and times of steps that succeeded (or whose outputs a
    /// resolution or a load found recorded), for the builds they finish.
    built_outputs: HashMap<DrvPath, BuiltStep>,
    started_builds: HashSet<BuildId>,
    /// Builds finished here whose rows a load may not see yet: `false`
    /// until the writer has written them ([`DriverEvent::BuildsWritten`]),
    /// `true` after, until the next load starts (a load in flight may have
    /// read them before). A load must not take them for queued ones.
    recently_finished: HashMap<BuildId, bool>,
    /// The wait after a restart for agents to report their attempts.
    resume: Option<resume::Resuming>,
    /// Attempts claimed in the core for their machine, until the core
    /// adopts the step or refuses.
    claimed: HashMap<(DrvPath, MachineId), AttemptId>,
    loader: load::Loader,
    counters: Counters,
    /// As the writer last reported it.
    database: writer::DatabaseHealth,
    /// The scheduling shares the core was told, per jobset id.
    jobset_shares: HashMap<i32, u32>,
    /// Steps resolved into derivations not built yet.
    resolutions: resolve::Resolutions,
    /// Hashes modulo of the derivations read so far (realisation keys).
    hashes: crate::ca::Hashes,
    /// The binary cache, if one is configured ([`Driver::upload_to`]).
    uploads: Option<upload::Uploads>,
    status: watch::Sender<StatusSnapshot>,
    /// The list of attempts last published, and when it was made.
    running_published: Option<(Instant, std::sync::Arc<Vec<crate::status::RunningStep>>)>,
    /// A snapshot went out with that list after attempts may have changed:
    /// publish again once it is [`crate::status::RUNNING_REFRESH`] old.
    running_stale: bool,
}

impl Driver {
    /// The system of a held derivation ("" if it is not held).
    fn held_system(&self, drv_path: &DrvPath) -> String {
        self.closure
            .get(drv_path)
            .and_then(|held| self.systems.get(held.system()))
            .map(|s| s.to_string())
            .unwrap_or_default()
    }
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
        let (writer, writer_task, writer_in_flight) = Writer::spawn(
            pool.clone(),
            store.clone(),
            config.data_dir.clone(),
            me.clone(),
            config.max_pending_writes,
        );
        Driver {
            core: Core::with_order(config.core.clone(), config.order),
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
            writer_in_flight,
            write_backlog: Default::default(),
            deferred_dispatches: Default::default(),
            hold_dispatches: false,
            attempts_shared,
            machines: HashMap::new(),
            attempts: HashMap::new(),
            by_step: HashMap::new(),
            ended_before_row: HashMap::new(),
            builds: HashMap::new(),
            closure: crate::drv_table::DrvTable::default(),
            systems: Vec::new(),
            built_outputs: HashMap::new(),
            started_builds: HashSet::new(),
            recently_finished: Default::default(),
            resume: None,
            claimed: HashMap::new(),
            counters: Counters::default(),
            database: writer::DatabaseHealth::Up,
            jobset_shares: HashMap::new(),
            resolutions: Default::default(),
            hashes: Default::default(),
            uploads: None,
            status,
            running_published: None,
            running_stale: false,
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
        // Builds waiting for an upload stay unfinished: the next start
        // finishes them (see `upload`).
        if let Some(uploads) = self.uploads.take() {
            uploads.stop();
        }
        self.flush().await
    }

    async fn serve(&mut self) {
        self.load_new();
        loop {
            let deadline = self.core.next_deadline();
            let core_sleep = deadline
                .map(|d| Duration::from_millis(d.0.saturating_sub(self.now().0)))
                .unwrap_or(Duration::from_secs(3600));
            let lease_sleep = self
                .next_lease_deadline()
                .map(|at| at.saturating_duration_since(Instant::now()))
                .unwrap_or(Duration::from_secs(3600));
            let mut sleep_for = core_sleep.min(lease_sleep);
            if let (true, Some((at, _))) = (self.running_stale, &self.running_published) {
                sleep_for =
                    sleep_for.min(crate::status::RUNNING_REFRESH.saturating_sub(at.elapsed()));
            }
            let backlogged = !self.write_backlog.is_empty();
            // The handlers only touch fields the futures do not borrow;
            // the rest happens after the select.
            let wake = tokio::select! {
                e = self.events.recv() => Wake::Event(e),
                _ = tokio::time::sleep(sleep_for) => Wake::Timer,
                permit = self.writer.reserve(), if backlogged => {
                    if let (Ok(permit), Some(job)) = (permit, self.write_backlog.pop_front()) {
                        permit.send(job);
                    }
                    Wake::WriterRoom
                }
            };
            match wake {
                Wake::Event(None | Some(DriverEvent::Shutdown)) => return,
                Wake::Event(Some(event)) => self.on_event(event),
                Wake::Timer => {
                    self.expire_leases();
                    self.apply(Event::Tick);
                    self.publish_status();
                    continue;
                }
                Wake::WriterRoom => {
                    self.drain_backlog();
                    self.publish_status();
                    continue;
                }
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
                    if let Some(build) = self.builds.get_mut(&id) {
                        build.global_priority = global_priority;
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
            DriverEvent::JobsetShares(shares) => {
                for (jobset, shares) in shares {
                    self.set_jobset_shares(jobset, shares);
                }
            }
            DriverEvent::BuildsWritten(ids) => {
                for id in ids {
                    if let Some(written) = self.recently_finished.get_mut(&id) {
                        *written = true;
                    }
                }
            }
            DriverEvent::Resolved(resolved) => self.on_resolved(*resolved),
            DriverEvent::ResolveAgain { drv_path, build } => {
                if self.core.is_resolving(drv_path.as_str()) {
                    self.resolve(drv_path, build);
                }
            }
            DriverEvent::Uploaded(done) => self.on_uploaded(done),
            DriverEvent::UploadDue(id) => self.on_upload_due(id),
            DriverEvent::LogUploaded(outcome) => self.on_log_uploaded(outcome),
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
            "jobset_shares_changed" => self.reload_jobset_shares(),
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
            Command::Adopt {
                drv_path, machine, ..
            } => self.adopt(drv_path, machine),
            Command::AdoptionRefused { drv_path, machine } => self.refuse_adoption(
                drv_path,
                machine,
                "it is not runnable, or its builder is gone or has no free slot",
            ),
            Command::StepRequeued { tries, .. } => {
                // The failed attempt's row was finished when it ended.
                self.counters.max_tries = self.counters.max_tries.max(tries);
            }
            Command::StepUnsupported { drv_path, builds } => {
                let system = self.held_system(&drv_path);
                for build in builds {
                    self.send_write(WriteJob::UnsupportedStep {
                        build,
                        drv_path: drv_path.as_str().to_string(),
                        system: system.clone(),
                        time: unix_now(),
                    });
                }
            }
            Command::Resolve { drv_path, build } => self.resolve(drv_path, build),
            Command::BuildFinished(finished) => self.build_finished(finished),
            Command::EventRejected(err) => tracing::warn!(%err, "event rejected by the core"),
        }
    }
}
