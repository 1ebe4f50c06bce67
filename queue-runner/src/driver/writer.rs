//! The ordered database writer: one task that executes the driver's
//! writes one after another, so that a step's row exists before it is
//! finished and a build's steps are finished before the build, and that
//! sends the notifications only after the rows they announce are committed.
//!
//! Invariant: a failed write is logged with the build and step it concerns
//! and never stops the writer; the queue of jobs is bounded.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use sluice_core::BuildId;
use tokio::sync::{mpsc, oneshot};

use crate::agents::StepReport;
use crate::db::queue::QueuedBuild;
use crate::db::results::{StepKind, StepPhase, StepRow, StepState};
use crate::db::{notify, results};
use crate::store::Store;
use sluice_core::Status;

/// A build the core finished, with what the writer needs to record it.
#[derive(Debug)]
pub struct FinishedBuild {
    pub build: Arc<QueuedBuild>,
    /// Hydra build status code.
    pub status: i32,
    /// Output paths reported by the step that built the top derivation;
    /// `None` for a cached build (the paths come from `BuildOutputs`).
    pub outputs: Option<Vec<(String, String)>>,
    /// Start and stop (unix seconds) of the attempt that built the top
    /// derivation, when this run built it.
    pub times: Option<(i64, i64)>,
}

#[derive(Debug)]
pub enum WriteJob {
    CreateStep {
        build: i32,
        drv_path: String,
        system: String,
        machine: String,
        outputs: BTreeMap<String, Option<String>>,
        start_time: i64,
        first_for_build: bool,
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
    },
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

pub struct Writer {
    pool: sqlx::PgPool,
    store: Store,
    data_dir: PathBuf,
}

/// Room for this many queued writes before the driver's sends wait.
const QUEUE: usize = 4096;

impl Writer {
    /// Starts the writer task. It runs until every sender is dropped and
    /// the queue is empty, then the returned handle completes: awaiting it
    /// after dropping the senders flushes the queue.
    pub fn spawn(
        pool: sqlx::PgPool,
        store: Store,
        data_dir: PathBuf,
    ) -> (mpsc::Sender<WriteJob>, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel(QUEUE);
        let writer = Writer {
            pool,
            store,
            data_dir,
        };
        let task = tokio::spawn(async move {
            while let Some(job) = rx.recv().await {
                writer.execute(job).await;
            }
        });
        (tx, task)
    }

    async fn execute(&self, job: WriteJob) {
        // One connection per job; a database outage makes each job fail
        // with a logged error until the pool reconnects.
        let mut conn = match self.pool.acquire().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::error!(error = %crate::db::describe_sqlx_error(&e), "no database connection for a write");
                if let WriteJob::CreateStep { reply, .. } = job {
                    let _ = reply.send(Err(crate::db::describe_sqlx_error(&e)));
                }
                return;
            }
        };
        let conn: &mut sqlx::PgConnection = &mut conn;
        match job {
            WriteJob::CreateStep {
                build,
                drv_path,
                system,
                machine,
                outputs,
                start_time,
                first_for_build,
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
                let result = match results::create_step(conn, &row).await {
                    Ok(stepnr) => {
                        if first_for_build {
                            log_err(notify::build_started(conn, build).await, build);
                        }
                        log_err(notify::step_started(conn, build, stepnr).await, build);
                        Ok(stepnr)
                    }
                    Err(e) => Err(e.to_string()),
                };
                let _ = reply.send(result);
            }
            WriteJob::Phase {
                build,
                stepnr,
                busy,
            } => {
                if let Some(phase) = u32::try_from(busy).ok().and_then(StepPhase::from_code) {
                    let r = results::update_step_phase(conn, build.0, stepnr, phase).await;
                    log_err(r, build.0);
                }
            }
            WriteJob::FinishStep {
                build,
                stepnr,
                drv_path,
                machine,
                report,
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
                };
                log_err(
                    results::finish_step(conn, build.0, stepnr, &result).await,
                    build.0,
                );
                let log = crate::logs::log_path(&self.data_dir, &drv_path)
                    .ok()
                    .filter(|p| p.exists());
                let r = notify::step_finished(conn, build.0, stepnr, log.as_deref()).await;
                log_err(r, build.0);
            }
            WriteJob::UnsupportedStep {
                build,
                drv_path,
                system,
                time,
            } => {
                let row = StepRow {
                    build: build.0,
                    step_type: StepKind::Build,
                    drv_path,
                    system,
                    machine: String::new(),
                    state: StepState::Finished(Status::Unsupported),
                    error_msg: Some(
                        "no connected machine can build this system and feature set".into(),
                    ),
                    start_time: Some(time),
                    stop_time: Some(time),
                    propagated_from: None,
                    outputs: Vec::new(),
                };
                log_err(results::create_step(conn, &row).await.map(|_| ()), build.0);
            }
            WriteJob::FinishBuilds {
                head,
                cached,
                failed_step,
                builds,
                time,
            } => {
                self.finish_builds(conn, head, cached, failed_step, builds, time)
                    .await
            }
            WriteJob::AbortBuild {
                build,
                drv_path,
                error,
                time,
            } => {
                let row = StepRow {
                    build,
                    step_type: StepKind::Build,
                    drv_path,
                    system: String::new(),
                    machine: String::new(),
                    state: StepState::Finished(Status::Aborted),
                    error_msg: Some(error),
                    start_time: Some(time),
                    stop_time: Some(time),
                    propagated_from: None,
                    outputs: Vec::new(),
                };
                log_err(results::create_step(conn, &row).await.map(|_| ()), build);
                let r =
                    results::finish_build_failure(conn, build, Status::Aborted, time, time, false)
                        .await
                        .map(|_| ());
                log_err(r, build);
                log_err(notify::build_finished(conn, build, &[]).await, build);
            }
        }
    }

    async fn finish_builds(
        &self,
        conn: &mut sqlx::PgConnection,
        head: BuildId,
        cached: bool,
        failed_step: Option<String>,
        builds: Vec<FinishedBuild>,
        time: i64,
    ) {
        let mut dependents = Vec::new();
        let mut outcomes = Vec::new();
        for finished in &builds {
            let id = finished.build.id;
            if id != head.0 {
                dependents.push(id);
            }
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
            if let (Some(drv), true) = (&failed_step, id != head.0) {
                // The step failed under the head build; record it here as
                // propagated from there.
                let row = StepRow {
                    build: id,
                    step_type: StepKind::Build,
                    drv_path: drv.clone(),
                    system: String::new(),
                    machine: String::new(),
                    state: StepState::Finished(status_from_code(finished.status)),
                    error_msg: None,
                    start_time: Some(stop),
                    stop_time: Some(stop),
                    propagated_from: Some(head.0),
                    outputs: Vec::new(),
                };
                log_err(results::create_step(conn, &row).await.map(|_| ()), id);
            }
            outcomes.push(results::BuildOutcome::Failed(results::BuildFailure {
                build: id,
                status: status_from_code(finished.status),
                start_time: start,
                stop_time: stop,
                is_cached: cached,
            }));
        }
        // Only builds this batch really finished are announced: one that
        // was cancelled meanwhile keeps its own notification.
        let finished = match results::finish_builds(conn, &outcomes).await {
            Ok(ids) => ids,
            Err(e) => {
                tracing::error!(build = head.0, error = %e, "finishing builds failed");
                return;
            }
        };
        let dependents: Vec<i32> = dependents
            .into_iter()
            .filter(|id| finished.contains(id))
            .collect();
        let announce_head = if finished.contains(&head.0) {
            Some(head.0)
        } else {
            dependents.first().copied()
        };
        if let Some(announced) = announce_head {
            let rest: Vec<i32> = dependents
                .into_iter()
                .filter(|id| *id != announced)
                .collect();
            log_err(
                notify::build_finished(conn, announced, &rest).await,
                announced,
            );
        }
    }
}

fn log_err<E: std::fmt::Display>(r: Result<(), E>, build: i32) {
    if let Err(e) = r {
        tracing::error!(build, error = %e, "database write failed");
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
