//! The database side of the writes: a batch of them in one transaction,
//! holding their rows and their notifications together, in a few
//! statements per kind of write rather than a few per write.
//!
//! A [`Commit`] holds everything the write needs, already read from the
//! store and the filesystem, so that committing it again after a database
//! error repeats only database work and gives the same rows.
//!
//! Invariant: a batch either commits whole (rows and notifications,
//! which PostgreSQL delivers only on commit) or leaves nothing behind, so a
//! retry never duplicates a row or a notification.

use std::path::PathBuf;

use sqlx::{Connection, PgConnection};

use crate::db::is_transient;
use crate::db::notify::{self, Notification};
use crate::db::results::{
    self, BuildOutcome, ResultsError, StepPhase, StepResult, StepRow, StepState,
};

/// A write, ready to be committed (possibly more than once).
#[derive(Debug, Clone)]
pub(super) enum Commit {
    /// A new busy step row, with the attempt it belongs to; answers its
    /// step number.
    CreateStep {
        row: StepRow,
        first_for_build: bool,
        attempt: uuid::Uuid,
        /// Steps resolved into this derivation: their status-13 rows, in
        /// the same transaction as its row.
        resolutions: Vec<super::ResolutionRow>,
    },
    Phase {
        build: i32,
        stepnr: i32,
        phase: StepPhase,
    },
    FinishStep {
        build: i32,
        stepnr: i32,
        /// What its build time is kept under ([`results::build_time_name`]).
        time_name: String,
        result: StepResult,
        /// The step's log file, when it exists.
        log: Option<PathBuf>,
        /// Its output paths, when it failed for good: into `FailedPaths`.
        failed_paths: Vec<String>,
        realisations: Vec<results::Realisation>,
        /// Derivations resolved into this step's: their status-13 rows
        /// get its outputs.
        resolved_from: Vec<String>,
    },
    RecordResolution {
        resolution: super::ResolutionRow,
        realisations: Vec<results::Realisation>,
        outputs: Vec<(String, String)>,
    },
    /// A finished step row of its own (unsupported).
    InsertStep { row: StepRow },
    FinishBuilds {
        head: i32,
        /// Rows recording the failed step under the dependent builds.
        dependent_rows: Vec<StepRow>,
        outcomes: Vec<BuildOutcome>,
        /// A cached failure of this derivation (it is in `FailedPaths`):
        /// the rows are `propagatedFrom` the build it last failed under.
        cached_failure: Option<String>,
    },
    /// A build that cannot be built at all, with the row saying why.
    AbortBuild { row: StepRow, time: i64 },
}

impl Commit {
    /// The builds this write finishes.
    pub(super) fn finished_builds(&self) -> Vec<sluice_core::BuildId> {
        match self {
            Commit::FinishBuilds { outcomes, .. } => outcomes
                .iter()
                .map(|o| sluice_core::BuildId(o.build()))
                .collect(),
            Commit::AbortBuild { row, .. } => vec![sluice_core::BuildId(row.build)],
            _ => Vec::new(),
        }
    }

    /// The step whose phase this write sets or ends: a later one for the
    /// same step makes a phase update before it moot.
    pub(super) fn step(&self) -> Option<(i32, i32)> {
        match self {
            Commit::Phase { build, stepnr, .. } | Commit::FinishStep { build, stepnr, .. } => {
                Some((*build, *stepnr))
            }
            _ => None,
        }
    }

    /// The build a failure of this write is reported under.
    pub(super) fn build(&self) -> i32 {
        match self {
            Commit::CreateStep { row, .. }
            | Commit::InsertStep { row }
            | Commit::AbortBuild { row, .. } => row.build,
            Commit::Phase { build, .. } | Commit::FinishStep { build, .. } => *build,
            Commit::RecordResolution { resolution, .. } => resolution.row.build,
            Commit::FinishBuilds { head, .. } => *head,
        }
    }
}

/// Why a write did not commit.
#[derive(Debug, thiserror::Error)]
pub(super) enum CommitError {
    #[error("opening a transaction: {}", crate::db::describe_sqlx_error(.0))]
    Begin(#[source] sqlx::Error),
    #[error("committing: {}", crate::db::describe_sqlx_error(.0))]
    Commit(#[source] sqlx::Error),
    #[error(transparent)]
    Results(#[from] ResultsError),
    #[error(transparent)]
    Notify(#[from] notify::NotifyError),
}

impl CommitError {
    /// Whether trying again later may succeed: the connection or the
    /// server failed, not the write itself.
    pub(super) fn is_transient(&self) -> bool {
        match self {
            CommitError::Begin(e) | CommitError::Commit(e) => is_transient(e),
            CommitError::Results(ResultsError::Database { source, .. }) => is_transient(source),
            CommitError::Results(ResultsError::StepNumberContention { .. }) => true,
            CommitError::Results(_) => false,
            CommitError::Notify(notify::NotifyError::Database { source, .. }) => {
                is_transient(source)
            }
            CommitError::Notify(_) => false,
        }
    }
}

/// What a committed write answers: a new step's number.
pub(super) type Committed = Option<i32>;

/// Runs `commits` in one transaction on `conn` (group commit): all of
/// them commit, or none does.
///
/// The writes are made by kind, each kind in a few statements for the
/// whole batch (rows through `unnest`), in an order that keeps what the
/// writes' order means: new step rows first, then phases, finished steps,
/// resolutions, and last the finished builds, which read the step rows
/// before them. Writes of one kind never depend on each other's order,
/// but for step numbers, which follow the writes' order within a build.
/// The notifications go last, in the writes' order; PostgreSQL delivers
/// them on commit.
pub(super) async fn run_batch(
    conn: &mut PgConnection,
    commits: &[&Commit],
) -> Result<Vec<Committed>, CommitError> {
    let mut tx = conn.begin().await.map_err(CommitError::Begin)?;
    let mut batch = Batch {
        answers: vec![None; commits.len()],
        notifications: vec![Vec::new(); commits.len()],
    };
    batch.create_steps(&mut tx, commits).await?;
    batch.update_phases(&mut tx, commits).await?;
    batch.finish_steps(&mut tx, commits).await?;
    for commit in commits {
        if let Commit::RecordResolution {
            resolution: r,
            realisations,
            outputs,
        } = commit
        {
            results::record_resolution(&mut tx, &r.row, &r.resolved_drv, r.time).await?;
            results::record_realisations(&mut tx, realisations).await?;
            results::record_resolved_outputs(&mut tx, &r.row.drv_path, outputs).await?;
        }
    }
    batch.finish_builds(&mut tx, commits).await?;
    let notifications: Vec<Notification> = batch.notifications.into_iter().flatten().collect();
    notify::send(&mut tx, &notifications).await?;
    tx.commit().await.map_err(CommitError::Commit)?;
    Ok(batch.answers)
}

/// A batch being written: each write's answer and notifications, by its
/// place in the batch.
struct Batch {
    answers: Vec<Committed>,
    notifications: Vec<Vec<Notification>>,
}

impl Batch {
    /// The rows of new steps (busy ones with their attempts, and those
    /// recorded finished), numbered in the batch's order.
    async fn create_steps(
        &mut self,
        conn: &mut PgConnection,
        commits: &[&Commit],
    ) -> Result<(), CommitError> {
        let rows: Vec<(usize, &StepRow)> = commits
            .iter()
            .enumerate()
            .filter_map(|(i, commit)| match commit {
                Commit::CreateStep { row, .. }
                | Commit::InsertStep { row }
                | Commit::AbortBuild { row, .. } => Some((i, row)),
                _ => None,
            })
            .collect();
        let numbers =
            results::create_steps(conn, &rows.iter().map(|(_, row)| *row).collect::<Vec<_>>())
                .await?;
        let mut attempts = Vec::new();
        for (&(i, _), &stepnr) in rows.iter().zip(&numbers) {
            let Commit::CreateStep {
                row,
                first_for_build,
                attempt,
                resolutions,
            } = commits[i]
            else {
                continue;
            };
            for r in resolutions {
                results::record_resolution(conn, &r.row, &r.resolved_drv, r.time).await?;
            }
            attempts.push(results::AttemptRow {
                id: *attempt,
                build: row.build,
                stepnr,
                machine: row.machine.clone(),
                drv_path: row.drv_path.clone(),
                start_time: row.start_time.unwrap_or(0),
            });
            if *first_for_build {
                self.notifications[i].push(Notification::build_started(row.build));
            }
            self.notifications[i].push(Notification::step_started(row.build, stepnr));
            self.answers[i] = Some(stepnr);
        }
        results::record_attempts(conn, &attempts.iter().collect::<Vec<_>>()).await?;
        Ok(())
    }

    /// Phase updates; a step that finished meanwhile keeps its end.
    async fn update_phases(
        &mut self,
        conn: &mut PgConnection,
        commits: &[&Commit],
    ) -> Result<(), CommitError> {
        let phases: Vec<(i32, i32, StepPhase)> = commits
            .iter()
            .filter_map(|commit| match commit {
                Commit::Phase {
                    build,
                    stepnr,
                    phase,
                } => Some((*build, *stepnr, *phase)),
                _ => None,
            })
            .collect();
        results::update_step_phases(conn, &phases).await?;
        Ok(())
    }

    /// Finished steps: their rows, runs and outputs, build times,
    /// attempts forgotten, failed paths, and what content-addressed
    /// outputs became.
    async fn finish_steps(
        &mut self,
        conn: &mut PgConnection,
        commits: &[&Commit],
    ) -> Result<(), CommitError> {
        let mut finished = Vec::new();
        let mut times = Vec::new();
        let mut failed_paths = Vec::new();
        for (i, commit) in commits.iter().enumerate() {
            let Commit::FinishStep {
                build,
                stepnr,
                time_name,
                result,
                log,
                failed_paths: paths,
                ..
            } = commit
            else {
                continue;
            };
            finished.push((*build, *stepnr, result));
            if result.status == sluice_core::Status::Success {
                // The agent's own measure of the build, or the row's times.
                let ms = result.run.as_ref().map_or_else(
                    || u64::try_from(result.stop_time - result.start_time).unwrap_or(0) * 1000,
                    |run| run.build_ms,
                );
                times.push((time_name.as_str(), ms));
            }
            failed_paths.extend(paths.iter().cloned());
            self.notifications[i].push(Notification::step_finished(
                *build,
                *stepnr,
                log.as_deref(),
            )?);
        }
        if finished.is_empty() {
            return Ok(());
        }
        results::finish_steps(conn, &finished).await?;
        results::record_build_times(conn, &times).await?;
        let steps: Vec<(i32, i32)> = finished.iter().map(|(b, s, _)| (*b, *s)).collect();
        results::forget_attempts(conn, &steps).await?;
        results::insert_failed_paths(conn, &failed_paths).await?;
        for commit in commits {
            if let Commit::FinishStep {
                result,
                realisations,
                resolved_from,
                ..
            } = commit
            {
                results::record_realisations(conn, realisations).await?;
                for original in resolved_from {
                    results::record_resolved_outputs(conn, original, &result.outputs).await?;
                }
            }
        }
        Ok(())
    }

    /// Finished and aborted builds. Those that need no step rows of their
    /// own are finished together; each announces only the builds it
    /// really finished (one cancelled meanwhile keeps its own
    /// notification).
    async fn finish_builds(
        &mut self,
        conn: &mut PgConnection,
        commits: &[&Commit],
    ) -> Result<(), CommitError> {
        let mut together: Vec<BuildOutcome> = Vec::new();
        // The writes finished together, announced once they are: each
        // one's place, its head build and the builds it finishes. An
        // aborted build is a head with nothing else.
        let mut announced_later: Vec<(usize, i32, &[BuildOutcome])> = Vec::new();
        for (i, commit) in commits.iter().enumerate() {
            match commit {
                Commit::FinishBuilds {
                    head,
                    dependent_rows,
                    outcomes,
                    cached_failure,
                } if !dependent_rows.is_empty() || cached_failure.is_some() => {
                    write_dependent_rows(conn, *head, dependent_rows, cached_failure).await?;
                    let finished = results::finish_builds(conn, outcomes).await?;
                    self.notifications[i].extend(announce(*head, outcomes, &finished));
                }
                Commit::FinishBuilds { head, outcomes, .. } => {
                    together.extend(outcomes.iter().cloned());
                    announced_later.push((i, *head, outcomes));
                }
                Commit::AbortBuild { row, time } => {
                    together.push(BuildOutcome::Failed(results::BuildFailure {
                        build: row.build,
                        status: sluice_core::Status::Aborted,
                        start_time: *time,
                        stop_time: *time,
                        is_cached: false,
                    }));
                    announced_later.push((i, row.build, &[]));
                }
                _ => {}
            }
        }
        let finished = results::finish_builds(conn, &together).await?;
        for (i, head, outcomes) in announced_later {
            self.notifications[i].extend(announce(head, outcomes, &finished));
        }
        Ok(())
    }
}

/// The rows recording a failed step under the builds that depend on it:
/// copies of the attempt that really failed under `head` (its own status,
/// error and machine, never the builds' status 2), or, for a cached
/// failure, rows `propagatedFrom` the build it last failed under.
async fn write_dependent_rows(
    conn: &mut PgConnection,
    head: i32,
    dependent_rows: &[StepRow],
    cached_failure: &Option<String>,
) -> Result<(), CommitError> {
    let propagated_from = match cached_failure {
        Some(drv) => results::last_failure_of(conn, drv).await?,
        None => None,
    };
    let source = match (cached_failure, dependent_rows.first()) {
        (None, Some(row)) => results::finished_step_of(conn, head, &row.drv_path).await?,
        _ => None,
    };
    let mut rows = Vec::with_capacity(dependent_rows.len());
    for row in dependent_rows {
        let mut row = row.clone();
        if cached_failure.is_some() {
            row.propagated_from = propagated_from.filter(|b| *b != row.build);
        } else if results::finished_step_of(conn, row.build, &row.drv_path)
            .await?
            .is_some()
        {
            // Already recorded under this build (an unsupported step has a
            // row per build): one row, not two.
            continue;
        } else if let Some((status, error_msg, machine)) = &source {
            row.state = StepState::Finished(super::status_from_code(*status));
            row.error_msg = error_msg.clone();
            row.machine = machine.clone();
        }
        rows.push(row);
    }
    results::create_steps(conn, &rows.iter().collect::<Vec<_>>()).await?;
    Ok(())
}

/// The `build_finished` notifications of a write that finished `outcomes`
/// under `head`: of those in `finished`, the head first when it is one.
fn announce(head: i32, outcomes: &[BuildOutcome], finished: &[i32]) -> Vec<Notification> {
    let dependents: Vec<i32> = outcomes
        .iter()
        .map(BuildOutcome::build)
        .filter(|id| *id != head && finished.contains(id))
        .collect();
    let announced = if finished.contains(&head) {
        Some(head)
    } else {
        dependents.first().copied()
    };
    match announced {
        Some(announced) => {
            let rest: Vec<i32> = dependents
                .into_iter()
                .filter(|id| *id != announced)
                .collect();
            Notification::build_finished(announced, &rest)
        }
        None => Vec::new(),
    }
}
