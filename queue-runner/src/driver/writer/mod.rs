//! The ordered database writer: it commits the driver's writes in the
//! order they come, so that a step's row exists before it is finished and
//! a build's steps are finished before the build.
//!
//! It is two stages, two tasks. The prepare stage makes each write ready
//! ([`commit::Commit`]): what it needs from the store and the filesystem
//! (a build's sizes, products and metrics; a log file's existence) is read
//! once, for up to [`PREPARING`] writes at a time, and passed on in the
//! order the writes came. The commit stage commits what is ready in one
//! transaction with its notifications ([`commit`]): writes that queued
//! meanwhile go together, in order (group commit, at most [`MAX_BATCH`]),
//! a few statements per kind of write; a phase update that a later write
//! of the batch supersedes is left out. Replies and `AfterCommit` actions
//! run once the whole batch has committed.
//!
//! Invariants:
//! - A write that fails for a transient reason (the connection or the
//!   server failed) is retried, with backoff, until it commits: a result is
//!   never dropped because the database went away, and the writes behind
//!   it wait, so their order holds. A write the database refuses for good
//!   (a constraint, a bad value) is logged with its build and dropped.
//! - An outage is logged once when it starts and once when it ends, and
//!   reported to the driver ([`DriverEvent::Database`]) for `/status`.
//! - The queue of writes is bounded, and so are the writes taken from it
//!   and not yet committed ([`InFlight`]): a slow or absent database
//!   backs the queue up, where the driver sees it.

mod commit;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_core::BuildId;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};

use commit::Commit;

use super::HeldBuild;
use crate::agents::StepReport;
use crate::db::results;
use crate::db::results::{StepKind, StepPhase, StepRow, StepState};
use crate::store::Store;
use sluice_core::Status;

/// A build the core finished, with what the writer needs to record it.
#[derive(Debug)]
pub struct FinishedBuild {
    pub build: HeldBuild,
    /// Hydra build status code.
    pub status: i32,
    /// Output paths reported by the step that built the top derivation;
    /// `None` for a cached build (the paths come from `BuildOutputs`).
    pub outputs: Option<Vec<(String, String)>>,
    /// Start and stop (unix seconds) of the attempt that built the top
    /// derivation, when this run built it.
    pub times: Option<(i64, i64)>,
}

/// A step resolved into the derivation whose row is being created: its
/// status-13 row, written in the same transaction.
#[derive(Debug, Clone)]
pub struct ResolutionRow {
    pub row: StepRow,
    /// The resolved derivation's base name.
    pub resolved_drv: String,
    /// When it was resolved (unix seconds).
    pub time: i64,
}

/// Something to run once every write queued before it has committed
/// (an agent's result acknowledged, say). Dropped unrun only if the
/// writer stops first.
pub struct OnCommit(pub Box<dyn FnOnce() + Send>);

impl std::fmt::Debug for OnCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnCommit")
    }
}

#[derive(Debug)]
pub enum WriteJob {
    CreateStep {
        /// The attempt the row is created for, recorded with it.
        attempt: crate::agents::AttemptId,
        build: i32,
        drv_path: String,
        system: String,
        machine: String,
        outputs: BTreeMap<String, Option<String>>,
        start_time: i64,
        first_for_build: bool,
        /// Steps resolved into this derivation, recorded with its row.
        resolutions: Vec<ResolutionRow>,
        reply: oneshot::Sender<Result<i32, String>>,
    },
    Phase {
        build: BuildId,
        stepnr: i32,
        busy: i32,
    },
    FinishStep {
        build: BuildId,
        stepnr: i32,
        drv_path: String,
        machine: String,
        report: StepReport,
        /// The step's output paths when it failed for good (status 1, 7,
        /// 10 or 11): recorded in `FailedPaths` with the row.
        failed_paths: Vec<String>,
        /// What its content-addressed or deferred outputs (and those of
        /// the steps resolved into it) became: in the same transaction.
        realisations: Vec<results::Realisation>,
        /// Derivations resolved into this one: their status-13 rows get
        /// its outputs.
        resolved_from: Vec<String>,
    },
    /// A step resolved into another derivation: its status-13 row under
    /// `row.build` (unless one exists), and, when the resolved derivation
    /// is already built, what the step's outputs became.
    RecordResolution {
        resolution: ResolutionRow,
        realisations: Vec<results::Realisation>,
        /// The outputs, when already built (early cutoff).
        outputs: Vec<(String, String)>,
    },
    /// Runs once the writes before it are committed.
    AfterCommit(OnCommit),
    /// A finished row of its own (a step that could not be resolved).
    InsertStep { row: StepRow },
    UnsupportedStep {
        build: BuildId,
        drv_path: String,
        system: String,
        time: i64,
    },
    FinishBuilds {
        head: BuildId,
        cached: bool,
        failed_step: Option<String>,
        builds: Vec<FinishedBuild>,
        time: i64,
    },
    /// A build whose closure cannot be read: aborted with a step row that
    /// carries the reason.
    AbortBuild {
        build: i32,
        drv_path: String,
        error: String,
        time: i64,
    },
}

/// How many writes the writer has taken from its queue and not yet
/// committed (or dropped): being prepared, ready, or in a transaction. At
/// most the queue's size.
#[derive(Clone, Debug, Default)]
pub struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// The commit stage: batches prepared writes into transactions.
pub struct Writer {
    pool: sqlx::PgPool,
    events: mpsc::Sender<super::DriverEvent>,
    /// Since when the database has been failing, if it is.
    outage: Option<Instant>,
}

/// The prepare stage: turns jobs into [`Commit`]s, reading the store and
/// the filesystem. Cheap to clone; preparations run side by side.
#[derive(Clone)]
struct Preparer {
    store: Store,
    data_dir: PathBuf,
}

/// A job as the commit stage takes it, in the order the jobs came.
enum Prepared {
    Write(Box<Commit>, Option<Reply>),
    After(Box<dyn FnOnce() + Send>),
    /// Nothing to write.
    Nothing,
}

/// How many jobs are prepared at once. Their results still reach the
/// commit stage in the order the jobs came.
const PREPARING: usize = 32;

/// The most writes committed in one transaction.
pub const MAX_BATCH: usize = 128;

/// The first and the longest wait between tries of a write.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Where a new step's number (or why there is none) is sent.
type Reply = oneshot::Sender<Result<i32, String>>;

/// The database as the writer sees it, for `/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DatabaseHealth {
    #[default]
    Up,
    /// Writes have been failing since this unix time.
    Down { since_unix: i64 },
}

impl Writer {
    /// Starts the writer task. It runs until every sender is dropped and
    /// the queue is empty, then the returned handle completes: awaiting it
    /// after dropping the senders flushes the queue. `events` is the
    /// driver's inbox, told when the database goes away and comes back.
    /// `queue` writes wait in the channel at most, and `queue` more are
    /// being prepared or committed ([`InFlight`] counts those); beyond
    /// that the driver holds them back in order and stops dispatching
    /// (see `Driver::send_write`).
    pub fn spawn(
        pool: sqlx::PgPool,
        store: Store,
        data_dir: PathBuf,
        events: mpsc::Sender<super::DriverEvent>,
        queue: usize,
    ) -> (
        mpsc::Sender<WriteJob>,
        tokio::task::JoinHandle<()>,
        InFlight,
    ) {
        let queue = queue.max(1);
        let (tx, rx) = mpsc::channel(queue);
        let preparer = Preparer { store, data_dir };
        let in_flight = InFlight::default();
        // A write taken from the queue holds a permit until its batch has
        // committed: at most `queue` are being prepared or committed, so a
        // slow database backs the queue up, where the driver sees it.
        let permits = Arc::new(tokio::sync::Semaphore::new(queue));
        let (ready_tx, mut ready_rx) = mpsc::channel::<(Prepared, OwnedSemaphorePermit)>(queue);
        let counter = in_flight.clone();
        tokio::spawn(async move {
            use futures::StreamExt as _;
            let taken = futures::stream::unfold(
                (rx, permits, counter),
                |(mut rx, permits, counter)| async move {
                    let permit = permits.clone().acquire_owned().await.ok()?;
                    let job = rx.recv().await?;
                    counter.0.fetch_add(1, Ordering::SeqCst);
                    Some(((job, permit), (rx, permits, counter)))
                },
            );
            let prepared = taken
                .map(|(job, permit)| {
                    let preparer = preparer.clone();
                    async move { (preparer.prepare(job).await, permit) }
                })
                .buffered(PREPARING);
            let mut prepared = std::pin::pin!(prepared);
            while let Some(job) = prepared.next().await {
                if ready_tx.send(job).await.is_err() {
                    break;
                }
            }
        });
        let mut writer = Writer {
            pool,
            events,
            outage: None,
        };
        let counter = in_flight.clone();
        let task = tokio::spawn(async move {
            while let Some(job) = ready_rx.recv().await {
                let mut batch = vec![job];
                while batch.len() < MAX_BATCH {
                    match ready_rx.try_recv() {
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
                let waiting = ready_rx.len();
                let taken = batch.len();
                let (jobs, permits): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
                writer.execute_batch(jobs, waiting).await;
                drop(permits);
                counter.0.fetch_sub(taken, Ordering::SeqCst);
            }
        });
        (tx, task, in_flight)
    }

    /// Commits prepared jobs in one transaction, retrying transient
    /// failures; if the database refuses the batch for good, commits them
    /// one by one, so that only the write at fault is dropped. `waiting`
    /// is how many writes queue behind (for the log).
    async fn execute_batch(&mut self, jobs: Vec<Prepared>, waiting: usize) {
        let mut ready = Vec::with_capacity(jobs.len());
        let mut after = Vec::new();
        for job in jobs {
            match job {
                Prepared::Write(commit, reply) => ready.push((*commit, reply)),
                Prepared::After(run) => after.push(run),
                Prepared::Nothing => {}
            }
        }
        // A phase update that a later write of the batch supersedes (a
        // later phase, or the step's end) is left out.
        let mut later = std::collections::HashSet::new();
        let mut keep = vec![true; ready.len()];
        for (i, (commit, _)) in ready.iter().enumerate().rev() {
            if let Some(step) = commit.step() {
                if !later.insert(step) && matches!(commit, Commit::Phase { .. }) {
                    keep[i] = false;
                }
            }
        }
        let mut keep = keep.into_iter();
        ready.retain(|_| keep.next().unwrap_or(true));

        if !ready.is_empty() {
            let commits: Vec<&Commit> = ready.iter().map(|(c, _)| c).collect();
            match self.commit_retrying(&commits, waiting).await {
                Ok(answers) => {
                    for ((commit, reply), answer) in ready.into_iter().zip(answers) {
                        self.committed(&commit, reply, Ok(answer)).await;
                    }
                }
                Err(e) if ready.len() == 1 => {
                    for (commit, reply) in ready {
                        self.refused(&commit, reply, &e).await;
                    }
                }
                Err(e) => {
                    tracing::debug!(
                        error = %e,
                        writes = ready.len(),
                        "a batch of writes was refused; committing them one by one"
                    );
                    for (commit, reply) in ready {
                        match self.commit_retrying(&[&commit], waiting).await {
                            Ok(mut answer) => {
                                self.committed(&commit, reply, Ok(answer.pop().flatten()))
                                    .await
                            }
                            Err(e) => self.refused(&commit, reply, &e).await,
                        }
                    }
                }
            }
        }
        for run in after {
            run();
        }
    }

    /// A write the database refused for good: logged with its build and
    /// dropped; who waits for it is told why.
    async fn refused(&mut self, commit: &Commit, reply: Option<Reply>, e: &commit::CommitError) {
        tracing::error!(
            build = commit.build(),
            error = %e,
            "the database refused a write; it is dropped"
        );
        self.committed(commit, reply, Err(e.to_string())).await;
    }

    /// Commits `commits` in one transaction, retrying while the failure is
    /// transient (the database went away); a refusal for good is returned.
    async fn commit_retrying(
        &mut self,
        commits: &[&Commit],
        waiting: usize,
    ) -> Result<Vec<commit::Committed>, commit::CommitError> {
        let mut delay = RETRY_MIN;
        loop {
            let result = match self.pool.acquire().await {
                Ok(mut conn) => commit::run_batch(&mut conn, commits).await,
                Err(e) => Err(commit::CommitError::Begin(e)),
            };
            match result {
                Ok(answers) => {
                    self.database_up();
                    return Ok(answers);
                }
                Err(e) if e.is_transient() => {
                    self.database_down(&e, waiting);
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(RETRY_MAX);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Tells who waits for `commit` how it went: the driver of the builds
    /// it finished, the preparation of a new step its number.
    async fn committed(
        &mut self,
        commit: &Commit,
        reply: Option<Reply>,
        answer: Result<commit::Committed, String>,
    ) {
        const FAILPOINT: &str = "abort-after-resolution";
        if answer.is_ok()
            && matches!(commit, Commit::CreateStep { resolutions, .. } if !resolutions.is_empty())
            && crate::failpoint::armed(FAILPOINT)
        {
            crate::failpoint::abort(FAILPOINT);
        }
        let finished = commit.finished_builds();
        if !finished.is_empty() {
            let _ = self
                .events
                .send(super::DriverEvent::BuildsWritten(finished))
                .await;
        }
        if let Some(reply) = reply {
            let _ = reply.send(answer.and_then(|stepnr| {
                stepnr.ok_or_else(|| "no step number was allocated".to_string())
            }));
        }
    }

    fn database_down(&mut self, error: &commit::CommitError, waiting: usize) {
        if self.outage.is_some() {
            return;
        }
        self.outage = Some(Instant::now());
        tracing::warn!(
            error = %error,
            waiting,
            "the database is unreachable: results are kept and written when it is back"
        );
        let since_unix = super::unix_now();
        let _ = self
            .events
            .try_send(super::DriverEvent::Database(DatabaseHealth::Down {
                since_unix,
            }));
    }

    fn database_up(&mut self) {
        if let Some(since) = self.outage.take() {
            tracing::info!(
                down_for_ms = since.elapsed().as_millis() as u64,
                "the database is back; writing what waited"
            );
            let _ = self
                .events
                .try_send(super::DriverEvent::Database(DatabaseHealth::Up));
        }
    }
}

impl Preparer {
    /// Turns a job into a [`Commit`], reading what it needs from the store
    /// and the filesystem; splits off the reply a new step waits for. An
    /// `AfterCommit` action is passed on to the commit stage as it is;
    /// [`Prepared::Nothing`]: nothing to write (a phase code Hydra does
    /// not know).
    async fn prepare(&self, job: WriteJob) -> Prepared {
        let (commit, reply) = match job {
            WriteJob::AfterCommit(OnCommit(run)) => return Prepared::After(run),
            WriteJob::CreateStep {
                attempt,
                build,
                drv_path,
                system,
                machine,
                outputs,
                start_time,
                first_for_build,
                resolutions,
                reply,
            } => {
                let row = StepRow {
                    build,
                    step_type: StepKind::Build,
                    drv_path,
                    system,
                    machine,
                    state: StepState::Busy(StepPhase::Preparing),
                    error_msg: None,
                    start_time: Some(start_time),
                    stop_time: None,
                    propagated_from: None,
                    outputs: outputs.into_iter().collect(),
                };
                (
                    Commit::CreateStep {
                        row,
                        first_for_build,
                        attempt: attempt.0,
                        resolutions,
                    },
                    Some(reply),
                )
            }
            WriteJob::Phase {
                build,
                stepnr,
                busy,
            } => {
                let Some(phase) = u32::try_from(busy).ok().and_then(StepPhase::from_code) else {
                    return Prepared::Nothing;
                };
                (
                    Commit::Phase {
                        build: build.0,
                        stepnr,
                        phase,
                    },
                    None,
                )
            }
            WriteJob::FinishStep {
                build,
                stepnr,
                drv_path,
                machine,
                report,
                failed_paths,
                realisations,
                resolved_from,
            } => {
                let result = results::StepResult {
                    status: status_from_code(report.status),
                    error_msg: (!report.error_msg.is_empty()).then(|| report.error_msg.clone()),
                    start_time: report.start_time.max(1),
                    stop_time: report.stop_time.max(report.start_time).max(1),
                    machine,
                    overhead_ms: report.overhead_ms,
                    times_built: report.times_built,
                    is_non_deterministic: report.is_non_deterministic,
                    outputs: report.outputs.clone(),
                    run: report.run,
                };
                let log = crate::logs::log_path(&self.data_dir, &drv_path)
                    .ok()
                    .filter(|p| p.exists());
                (
                    Commit::FinishStep {
                        build: build.0,
                        stepnr,
                        time_name: results::build_time_name(&drv_path).to_owned(),
                        result,
                        log,
                        failed_paths,
                        realisations,
                        resolved_from,
                    },
                    None,
                )
            }
            WriteJob::InsertStep { row } => (Commit::InsertStep { row }, None),
            WriteJob::RecordResolution {
                resolution,
                realisations,
                outputs,
            } => (
                Commit::RecordResolution {
                    resolution,
                    realisations,
                    outputs,
                },
                None,
            ),
            WriteJob::UnsupportedStep {
                build,
                drv_path,
                system,
                time,
            } => {
                let row = StepRow {
                    system,
                    error_msg: Some(
                        "no connected machine can build this system and feature set".into(),
                    ),
                    ..StepRow::finished(build.0, drv_path, Status::Unsupported, time)
                };
                (Commit::InsertStep { row }, None)
            }
            WriteJob::FinishBuilds {
                head,
                cached,
                failed_step,
                builds,
                time,
            } => (
                self.ready_builds(head, cached, failed_step, builds, time)
                    .await,
                None,
            ),
            WriteJob::AbortBuild {
                build,
                drv_path,
                error,
                time,
            } => {
                let row = StepRow {
                    error_msg: Some(error),
                    ..StepRow::finished(build, drv_path, Status::Aborted, time)
                };
                (Commit::AbortBuild { row, time }, None)
            }
        };
        Prepared::Write(Box::new(commit), reply)
    }

    /// What finishing `builds` writes: each success post-processed from
    /// the store, each dependent failure with its row.
    async fn ready_builds(
        &self,
        head: BuildId,
        cached: bool,
        failed_step: Option<String>,
        builds: Vec<FinishedBuild>,
        time: i64,
    ) -> Commit {
        let mut dependent_rows = Vec::new();
        let mut outcomes = Vec::new();
        for finished in &builds {
            let id = finished.build.id;
            let (start, stop) = finished.times.unwrap_or((time, time));
            let (start, stop) = (start.max(1), stop.max(start).max(1));
            if finished.status == 0 {
                match super::postprocess::success(&self.store, finished, cached, start, stop).await
                {
                    Ok(finish) => outcomes.push(results::BuildOutcome::Succeeded(finish)),
                    Err(e) => {
                        tracing::error!(build = id, error = %e, "post-processing a build failed");
                        outcomes.push(results::BuildOutcome::Failed(results::BuildFailure {
                            build: id,
                            status: Status::Aborted,
                            start_time: start,
                            stop_time: stop,
                            is_cached: false,
                        }));
                    }
                }
                continue;
            }
            match (&failed_step, cached) {
                // A cached failure: every build gets a row saying so.
                (Some(drv), true) => dependent_rows.push(StepRow::finished(
                    id,
                    drv.clone(),
                    Status::CachedFailure,
                    stop,
                )),
                // The step failed under the head build; record it here as
                // propagated from there (status, error and machine are
                // copied from the head's row when committed). A step's
                // status is never 2: that one is for builds.
                (Some(drv), false) if id != head.0 => dependent_rows.push(StepRow {
                    propagated_from: Some(head.0),
                    ..StepRow::finished(
                        id,
                        drv.clone(),
                        match status_from_code(finished.status) {
                            Status::DepFailed => Status::Failed,
                            other => other,
                        },
                        stop,
                    )
                }),
                _ => {}
            }
            outcomes.push(results::BuildOutcome::Failed(results::BuildFailure {
                build: id,
                status: status_from_code(finished.status),
                start_time: start,
                stop_time: stop,
                is_cached: cached,
            }));
        }
        Commit::FinishBuilds {
            head: head.0,
            dependent_rows,
            outcomes,
            cached_failure: failed_step.filter(|_| cached),
        }
    }
}

/// The core's status for a Hydra code; unknown codes count as aborted.
pub fn status_from_code(code: i32) -> Status {
    match code {
        0 => Status::Success,
        1 => Status::Failed,
        2 => Status::DepFailed,
        4 => Status::Cancelled,
        6 => Status::FailedWithOutput,
        7 => Status::TimedOut,
        8 => Status::CachedFailure,
        9 => Status::Unsupported,
        10 => Status::LogLimitExceeded,
        11 => Status::NarSizeLimitExceeded,
        12 => Status::NotDeterministic,
        _ => Status::Aborted,
    }
}
