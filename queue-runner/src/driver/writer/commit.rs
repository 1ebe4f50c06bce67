//! The database side of each write: one transaction per write, holding its
//! rows and its notifications together.
//!
//! A [`Commit`] holds everything the write needs, already read from the
//! store and the filesystem, so that committing it again after a database
//! error repeats only database work and gives the same rows.
//!
//! Invariant: a [`Commit`] either commits whole (rows and notifications,
//! which PostgreSQL delivers only on commit) or leaves nothing behind, so a
//! retry never duplicates a row or a notification.

use std::path::PathBuf;

use sqlx::{Connection, PgConnection};

use crate::db::results::{
    self, BuildOutcome, ResultsError, StepPhase, StepResult, StepRow, StepState,
};
use crate::db::{is_transient, notify};

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
pub(super) async fn run_batch(
    conn: &mut PgConnection,
    commits: &[&Commit],
) -> Result<Vec<Committed>, CommitError> {
    let mut tx = conn.begin().await.map_err(CommitError::Begin)?;
    let mut answers = Vec::with_capacity(commits.len());
    for commit in commits {
        answers.push(write(&mut tx, commit).await?);
    }
    tx.commit().await.map_err(CommitError::Commit)?;
    Ok(answers)
}

async fn write(conn: &mut PgConnection, commit: &Commit) -> Result<Committed, CommitError> {
    match commit {
        Commit::CreateStep {
            row,
            first_for_build,
            attempt,
            resolutions,
        } => {
            let stepnr = results::create_step(conn, row).await?;
            for r in resolutions {
                results::record_resolution(conn, &r.row, &r.resolved_drv, r.time).await?;
            }
            results::record_attempt(
                conn,
                &results::AttemptRow {
                    id: *attempt,
                    build: row.build,
                    stepnr,
                    machine: row.machine.clone(),
                    drv_path: row.drv_path.clone(),
                    start_time: row.start_time.unwrap_or(0),
                },
            )
            .await?;
            if *first_for_build {
                notify::build_started(conn, row.build).await?;
            }
            notify::step_started(conn, row.build, stepnr).await?;
            Ok(Some(stepnr))
        }
        Commit::Phase {
            build,
            stepnr,
            phase,
        } => match results::update_step_phase(conn, *build, *stepnr, *phase).await {
            // The step finished meanwhile: its phase no longer matters.
            Err(ResultsError::StepNotBusy { .. }) => Ok(None),
            other => other.map(|()| None).map_err(CommitError::from),
        },
        Commit::FinishStep {
            build,
            stepnr,
            time_name,
            result,
            log,
            failed_paths,
            realisations,
            resolved_from,
        } => {
            results::finish_step(conn, *build, *stepnr, result).await?;
            if result.status == sluice_core::Status::Success {
                // The agent's own measure of the build, or the row's times.
                let ms = result.run.as_ref().map_or_else(
                    || u64::try_from(result.stop_time - result.start_time).unwrap_or(0) * 1000,
                    |run| run.build_ms,
                );
                results::record_build_time(conn, time_name, ms).await?;
            }
            results::forget_attempt(conn, *build, *stepnr).await?;
            results::insert_failed_paths(conn, failed_paths).await?;
            results::record_realisations(conn, realisations).await?;
            for original in resolved_from {
                results::record_resolved_outputs(conn, original, &result.outputs).await?;
            }
            notify::step_finished(conn, *build, *stepnr, log.as_deref()).await?;
            Ok(None)
        }
        Commit::RecordResolution {
            resolution: r,
            realisations,
            outputs,
        } => {
            results::record_resolution(conn, &r.row, &r.resolved_drv, r.time).await?;
            results::record_realisations(conn, realisations).await?;
            results::record_resolved_outputs(conn, &r.row.drv_path, outputs).await?;
            Ok(None)
        }
        Commit::InsertStep { row } => {
            results::create_step(conn, row).await?;
            Ok(None)
        }
        Commit::FinishBuilds {
            head,
            dependent_rows,
            outcomes,
            cached_failure,
        } => {
            let propagated_from = match cached_failure {
                Some(drv) => results::last_failure_of(conn, drv).await?,
                None => None,
            };
            // The attempt that really failed, under the head build: the
            // dependents' rows say what it said (its own status, error and
            // machine), never the builds' status 2.
            let source = match (cached_failure, dependent_rows.first()) {
                (None, Some(row)) => results::finished_step_of(conn, *head, &row.drv_path).await?,
                _ => None,
            };
            for row in dependent_rows {
                let mut row = row.clone();
                if cached_failure.is_some() {
                    row.propagated_from = propagated_from.filter(|b| *b != row.build);
                } else if results::finished_step_of(conn, row.build, &row.drv_path)
                    .await?
                    .is_some()
                {
                    // Already recorded under this build (an unsupported
                    // step has a row per build): one row, not two.
                    continue;
                } else if let Some((status, error_msg, machine)) = &source {
                    row.state = StepState::Finished(super::status_from_code(*status));
                    row.error_msg = error_msg.clone();
                    row.machine = machine.clone();
                }
                results::create_step(conn, &row).await?;
            }
            // Only builds this write really finished are announced: one
            // that was cancelled meanwhile keeps its own notification.
            let finished = results::finish_builds(conn, outcomes).await?;
            let dependents: Vec<i32> = outcomes
                .iter()
                .map(BuildOutcome::build)
                .filter(|id| id != head && finished.contains(id))
                .collect();
            let announced = if finished.contains(head) {
                Some(*head)
            } else {
                dependents.first().copied()
            };
            if let Some(announced) = announced {
                let rest: Vec<i32> = dependents
                    .into_iter()
                    .filter(|id| *id != announced)
                    .collect();
                notify::build_finished(conn, announced, &rest).await?;
            }
            Ok(None)
        }
        Commit::AbortBuild { row, time } => {
            results::create_step(conn, row).await?;
            let finished = results::finish_build_failure(
                conn,
                row.build,
                sluice_core::Status::Aborted,
                *time,
                *time,
                false,
            )
            .await?;
            if finished {
                notify::build_finished(conn, row.build, &[]).await?;
            }
            Ok(None)
        }
    }
}
