//! Results into Hydra's tables: `BuildSteps` and `BuildStepOutputs` as
//! steps run and finish, the result columns of `Builds` with
//! `BuildOutputs`, `BuildProducts` and `BuildMetrics` when builds finish,
//! and `FailedPaths`. Exactly what the contract names, and nothing of
//! Hydra's tables beyond it.
//!
//! Invariants:
//! - `stepnr` is `max + 1` per build, allocated by the insert itself and
//!   retried on conflict, so concurrent inserts for one build (from any
//!   number of connections, inside transactions or not) get distinct,
//!   gap-free numbers.
//! - A busy step has a phase and a NULL status; a finished one has busy 0
//!   and a status. Status 13 is only ever written together with
//!   `resolvedDrvPath` ([`mark_step_resolved`]).
//! - A build is finished at most once: the update requires `finished = 0`,
//!   so a build cancelled meanwhile is left alone and reported as such.
//!   Finishing sets `startTime` and `stopTime` (both non-zero, checked here
//!   before the database's constraint would refuse them) and
//!   `notificationPendingSince = stopTime`.
//! - Every function that writes several statements runs them in one
//!   transaction, or in a savepoint when the caller's connection is already
//!   in one; callers that finish a batch of builds use [`finish_builds`] or
//!   their own transaction around these calls, with the notifications.

use std::collections::BTreeMap;

use sluice_core::Status;
use sqlx::{Connection, PgConnection};

use crate::nix_support::{BuildMetric, BuildProduct};

/// `BuildSteps.type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepKind {
    Build = 0,
    Substitution = 1,
}

/// `BuildSteps.busy` of a busy step, as the web UI renders it. Not busy
/// (0) is not a phase: a step leaves its phases by finishing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepPhase {
    Preparing = 1,
    Connecting = 10,
    SendingInputs = 20,
    Building = 30,
    WaitingForLocalSlot = 35,
    ReceivingOutputs = 40,
    PostProcessing = 50,
}

impl StepPhase {
    pub fn code(self) -> i32 {
        self as i32
    }

    /// The phase of a `busy` code, e.g. as an agent reports it; `None` for
    /// 0 and for codes the UI does not know.
    pub fn from_code(code: u32) -> Option<StepPhase> {
        Some(match code {
            1 => StepPhase::Preparing,
            10 => StepPhase::Connecting,
            20 => StepPhase::SendingInputs,
            30 => StepPhase::Building,
            35 => StepPhase::WaitingForLocalSlot,
            40 => StepPhase::ReceivingOutputs,
            50 => StepPhase::PostProcessing,
            _ => return None,
        })
    }
}

/// How a step row starts its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepState {
    /// Running: `busy` = the phase, `status` NULL.
    Busy(StepPhase),
    /// Recorded already finished (a cached or propagated failure, an
    /// unsupported step, a substitution): `busy` 0. Not
    /// [`Status::Resolved`], which needs [`mark_step_resolved`].
    Finished(Status),
}

/// A new `BuildSteps` row and its `BuildStepOutputs`.
#[derive(Clone, Debug, PartialEq)]
pub struct StepRow {
    pub build: i32,
    pub step_type: StepKind,
    /// Full store path.
    pub drv_path: String,
    pub system: String,
    /// The builder's host name; `""` when none.
    pub machine: String,
    pub state: StepState,
    pub error_msg: Option<String>,
    /// Unix seconds; when given, positive.
    pub start_time: Option<i64>,
    pub stop_time: Option<i64>,
    /// For a cached or dependency failure: the build whose step really
    /// failed.
    pub propagated_from: Option<i32>,
    /// `(output name, path)`; the path is `None` for a floating
    /// content-addressed output not yet built.
    pub outputs: Vec<(String, Option<String>)>,
}

/// How an attempt at a step ended.
#[derive(Clone, Debug, PartialEq)]
pub struct StepResult {
    /// Not [`Status::Resolved`] (see [`mark_step_resolved`]).
    pub status: Status,
    pub error_msg: Option<String>,
    /// Unix seconds, positive.
    pub start_time: i64,
    pub stop_time: i64,
    pub machine: String,
    /// Milliseconds spent copying inputs and outputs; 0 is written as
    /// NULL, as Hydra does.
    pub overhead_ms: u64,
    /// How many times the derivation was built (more than once when
    /// checking determinism); 0 is written as NULL, as Hydra does.
    pub times_built: u32,
    /// Written only when `times_built > 1`, as Hydra does (NULL otherwise).
    pub is_non_deterministic: bool,
    /// `(output name, path)` now known, typically all outputs on success;
    /// sets `BuildStepOutputs.path` (inserting the row if missing).
    pub outputs: Vec<(String, String)>,
}

/// A build whose top-level step succeeded (or whose outputs were already
/// valid), for [`finish_build_success`].
#[derive(Clone, Debug, PartialEq)]
pub struct BuildFinish {
    pub build: i32,
    /// [`Status::Success`] or [`Status::FailedWithOutput`] (see
    /// [`crate::nix_support::NixSupport::build_status`]).
    pub status: Status,
    /// Unix seconds, positive.
    pub start_time: i64,
    pub stop_time: i64,
    pub is_cached: bool,
    /// NAR size of the outputs, and of their closure.
    pub size: u64,
    pub closure_size: u64,
    pub release_name: Option<String>,
    /// `(output name, path)`: only `BuildOutputs.path` is updated, for the
    /// rows the evaluator inserted.
    pub outputs: Vec<(String, String)>,
    /// Replace the build's products; numbered 1..n in this order.
    pub products: Vec<BuildProduct>,
    /// Replace the build's metrics; a repeated name keeps the last.
    pub metrics: Vec<BuildMetric>,
}

/// A build that finished without success, for [`finish_builds`] (see
/// [`finish_build_failure`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BuildFailure {
    pub build: i32,
    /// A build status other than success (0), failed with output (6),
    /// cached failure (8, steps only) and resolved (13, steps only).
    pub status: Status,
    /// Unix seconds, positive.
    pub start_time: i64,
    pub stop_time: i64,
    pub is_cached: bool,
}

/// One build of a batch given to [`finish_builds`].
#[derive(Clone, Debug, PartialEq)]
pub enum BuildOutcome {
    Succeeded(BuildFinish),
    Failed(BuildFailure),
}

impl BuildOutcome {
    pub fn build(&self) -> i32 {
        match self {
            BuildOutcome::Succeeded(s) => s.build,
            BuildOutcome::Failed(f) => f.build,
        }
    }
}

/// Why a result was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum ResultsError {
    #[error("{what}: {}", super::describe_sqlx_error(.source))]
    Database {
        what: String,
        #[source]
        source: sqlx::Error,
    },
    /// The caller passed something the contract does not allow; nothing
    /// was written.
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
    #[error("{op} step {stepnr} of build {build}: no such step")]
    NoSuchStep {
        op: &'static str,
        build: i32,
        stepnr: i32,
    },
    /// The step finished or was aborted meanwhile.
    #[error("updating the phase of step {stepnr} of build {build}: the step is not busy")]
    StepNotBusy { build: i32, stepnr: i32 },
    #[error("creating a step of build {build}: no free step number after {attempts} attempts")]
    StepNumberContention { build: i32, attempts: u32 },
}

fn db_err(what: &str) -> impl FnOnce(sqlx::Error) -> ResultsError + '_ {
    move |source| ResultsError::Database {
        what: what.to_owned(),
        source,
    }
}

fn invalid(what: &str, reason: impl Into<String>) -> ResultsError {
    ResultsError::Invalid {
        what: what.to_owned(),
        reason: reason.into(),
    }
}

/// A time for an `integer` column: positive and within 32 bits.
fn db_time(what: &str, field: &str, secs: i64) -> Result<i32, ResultsError> {
    match i32::try_from(secs) {
        Ok(t) if t > 0 => Ok(t),
        _ => Err(invalid(
            what,
            format!("{field} {secs} is not a positive 32-bit unix time"),
        )),
    }
}

fn db_time_opt(what: &str, field: &str, secs: Option<i64>) -> Result<Option<i32>, ResultsError> {
    secs.map(|s| db_time(what, field, s)).transpose()
}

/// A byte count for a `bigint` column.
fn db_size(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

/// How many times [`create_step`] retries a step number taken by a
/// concurrent insert. Each retry follows a commit of another insert for
/// the same build, so this bounds the concurrency it tolerates.
const STEPNR_ATTEMPTS: u32 = 10_000;

/// Inserts a step with the next free `stepnr` of its build, and its
/// outputs; returns the `stepnr`.
///
/// The number is `max(stepnr) + 1`, computed by the insert; an insert that
/// loses the race to a concurrent one (whose row it waits for) does nothing
/// and is retried with a fresh snapshot. Inside a caller's transaction
/// (where a savepoint is used) this needs READ COMMITTED, PostgreSQL's
/// default.
pub async fn create_step(conn: &mut PgConnection, step: &StepRow) -> Result<i32, ResultsError> {
    let what = format!("creating a step of build {}", step.build);
    let (busy, status) = match step.state {
        StepState::Busy(phase) => (phase.code(), None),
        StepState::Finished(Status::Resolved) => {
            return Err(invalid(
                &what,
                "a resolved step is recorded with mark_step_resolved",
            ))
        }
        StepState::Finished(status) => (0, Some(status.code())),
    };
    let start = db_time_opt(&what, "start time", step.start_time)?;
    let stop = db_time_opt(&what, "stop time", step.stop_time)?;

    let mut tx = conn.begin().await.map_err(db_err(&what))?;
    let mut stepnr = None;
    for _ in 0..STEPNR_ATTEMPTS {
        stepnr = sqlx::query_scalar(
            "insert into BuildSteps (build, stepnr, type, drvPath, busy, status, errorMsg,
                                     startTime, stopTime, machine, system, propagatedFrom)
             select $1, coalesce(max(stepnr), 0) + 1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11
             from BuildSteps where build = $1
             on conflict do nothing
             returning stepnr",
        )
        .bind(step.build)
        .bind(step.step_type as i32)
        .bind(&step.drv_path)
        .bind(busy)
        .bind(status)
        .bind(&step.error_msg)
        .bind(start)
        .bind(stop)
        .bind(&step.machine)
        .bind(&step.system)
        .bind(step.propagated_from)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_err(&what))?;
        if stepnr.is_some() {
            break;
        }
    }
    let stepnr = stepnr.ok_or(ResultsError::StepNumberContention {
        build: step.build,
        attempts: STEPNR_ATTEMPTS,
    })?;

    if !step.outputs.is_empty() {
        let (names, paths): (Vec<&str>, Vec<Option<&str>>) = step
            .outputs
            .iter()
            .map(|(name, path)| (name.as_str(), path.as_deref()))
            .unzip();
        sqlx::query(
            "insert into BuildStepOutputs (build, stepnr, name, path)
             select $1, $2, u.name, u.path from unnest($3::text[], $4::text[]) as u(name, path)",
        )
        .bind(step.build)
        .bind(stepnr)
        .bind(names)
        .bind(paths)
        .execute(&mut *tx)
        .await
        .map_err(db_err(&format!(
            "recording the outputs of step {stepnr} of build {}",
            step.build
        )))?;
    }
    tx.commit().await.map_err(db_err(&what))?;
    Ok(stepnr)
}

/// Moves a busy step to another phase. [`ResultsError::StepNotBusy`] if it
/// is no longer busy (finished, or aborted meanwhile).
pub async fn update_step_phase(
    conn: &mut PgConnection,
    build: i32,
    stepnr: i32,
    phase: StepPhase,
) -> Result<(), ResultsError> {
    let what = format!("updating the phase of step {stepnr} of build {build}");
    let done = sqlx::query(
        "update BuildSteps set busy = $3
         where build = $1 and stepnr = $2 and busy != 0 and status is null",
    )
    .bind(build)
    .bind(stepnr)
    .bind(phase.code())
    .execute(&mut *conn)
    .await
    .map_err(db_err(&what))?;
    if done.rows_affected() == 0 {
        return Err(ResultsError::StepNotBusy { build, stepnr });
    }
    Ok(())
}

/// Records how an attempt ended: `busy = 0` and the result's columns, and
/// the output paths it made known.
pub async fn finish_step(
    conn: &mut PgConnection,
    build: i32,
    stepnr: i32,
    result: &StepResult,
) -> Result<(), ResultsError> {
    let what = format!("finishing step {stepnr} of build {build}");
    if result.status == Status::Resolved {
        return Err(invalid(
            &what,
            "a resolved step is recorded with mark_step_resolved",
        ));
    }
    let start = db_time(&what, "start time", result.start_time)?;
    let stop = db_time(&what, "stop time", result.stop_time)?;
    // Hydra's encoding: no overhead and never built are NULL, and
    // determinism is only known after more than one build.
    let overhead =
        (result.overhead_ms > 0).then(|| i32::try_from(result.overhead_ms).unwrap_or(i32::MAX));
    let times_built =
        (result.times_built > 0).then(|| i32::try_from(result.times_built).unwrap_or(i32::MAX));
    let non_deterministic = (result.times_built > 1).then_some(result.is_non_deterministic);

    let mut tx = conn.begin().await.map_err(db_err(&what))?;
    let done = sqlx::query(
        "update BuildSteps set busy = 0, status = $3, errorMsg = $4, startTime = $5,
                stopTime = $6, machine = $7, overhead = $8, timesBuilt = $9,
                isNonDeterministic = $10
         where build = $1 and stepnr = $2",
    )
    .bind(build)
    .bind(stepnr)
    .bind(result.status.code())
    .bind(&result.error_msg)
    .bind(start)
    .bind(stop)
    .bind(&result.machine)
    .bind(overhead)
    .bind(times_built)
    .bind(non_deterministic)
    .execute(&mut *tx)
    .await
    .map_err(db_err(&what))?;
    if done.rows_affected() == 0 {
        return Err(ResultsError::NoSuchStep {
            op: "finishing",
            build,
            stepnr,
        });
    }
    if !result.outputs.is_empty() {
        let (names, paths): (Vec<&str>, Vec<&str>) = result
            .outputs
            .iter()
            .map(|(name, path)| (name.as_str(), path.as_str()))
            .unzip();
        sqlx::query(
            "insert into BuildStepOutputs (build, stepnr, name, path)
             select $1, $2, u.name, u.path from unnest($3::text[], $4::text[]) as u(name, path)
             on conflict (build, stepnr, name) do update set path = excluded.path",
        )
        .bind(build)
        .bind(stepnr)
        .bind(names)
        .bind(paths)
        .execute(&mut *tx)
        .await
        .map_err(db_err(&what))?;
    }
    tx.commit().await.map_err(db_err(&what))?;
    Ok(())
}

/// Records that the step's derivation was rewritten into the resolved
/// derivation `resolved_drv` (a base name, `<hash>-<name>.drv`, without
/// the store directory): status 13 and `resolvedDrvPath` together, busy 0.
pub async fn mark_step_resolved(
    conn: &mut PgConnection,
    build: i32,
    stepnr: i32,
    resolved_drv: &str,
    stop_time: i64,
) -> Result<(), ResultsError> {
    let what = format!("marking step {stepnr} of build {build} resolved");
    if resolved_drv.is_empty() || resolved_drv.contains('/') || !resolved_drv.ends_with(".drv") {
        return Err(invalid(
            &what,
            format!("{resolved_drv:?} is not a derivation base name"),
        ));
    }
    let stop = db_time(&what, "stop time", stop_time)?;
    let done = sqlx::query(
        "update BuildSteps set busy = 0, status = 13, resolvedDrvPath = $3, stopTime = $4
         where build = $1 and stepnr = $2",
    )
    .bind(build)
    .bind(stepnr)
    .bind(resolved_drv)
    .bind(stop)
    .execute(&mut *conn)
    .await
    .map_err(db_err(&what))?;
    if done.rows_affected() == 0 {
        return Err(ResultsError::NoSuchStep {
            op: "marking resolved",
            build,
            stepnr,
        });
    }
    Ok(())
}

/// What [`abort_busy_steps_at_startup`] writes into `errorMsg` of steps
/// that had none.
pub const ABORTED_AT_STARTUP_MSG: &str =
    "aborted: the queue runner stopped while this step was running";

/// Steps a previous run left busy can never finish: mark them aborted, as
/// Hydra does at start-up (`busy = 0`, status 3), with `stopTime = now`
/// (Hydra's C++ runner writes NULL there) and an error message if they had
/// none. Returns how many steps were aborted.
pub async fn abort_busy_steps_at_startup(
    conn: &mut PgConnection,
    now: i64,
) -> Result<u64, ResultsError> {
    let what = "aborting the steps a previous run left busy";
    let now = db_time(what, "the current time", now)?;
    // A busy row with resolvedDrvPath cannot take status 3 (the check
    // constraint); it keeps the only status it may have.
    let done = sqlx::query(
        "update BuildSteps set busy = 0,
                status = case when resolvedDrvPath is null then 3 else 13 end,
                stopTime = $1,
                errorMsg = coalesce(errorMsg, $2)
         where busy != 0",
    )
    .bind(now)
    .bind(ABORTED_AT_STARTUP_MSG)
    .execute(&mut *conn)
    .await
    .map_err(db_err(what))?;
    Ok(done.rows_affected())
}

/// Records output paths known to fail. Idempotent, also for duplicates in
/// `paths` and for concurrent inserts of the same path: Hydra's rule on
/// `FailedPaths` only swallows a path already committed, so the insert also
/// says `on conflict do nothing` (which PostgreSQL allows next to a `do
/// instead nothing` rule).
pub async fn insert_failed_paths(
    conn: &mut PgConnection,
    paths: &[String],
) -> Result<(), ResultsError> {
    if paths.is_empty() {
        return Ok(());
    }
    let what = match paths {
        [one] => format!("recording failed path {one}"),
        many => format!("recording {} failed paths", many.len()),
    };
    sqlx::query("insert into FailedPaths (path) select unnest($1::text[]) on conflict do nothing")
        .bind(paths)
        .execute(conn)
        .await
        .map_err(db_err(&what))?;
    Ok(())
}

/// Finishes a build that succeeded: the result columns of `Builds`
/// (`finished = 1`, `notificationPendingSince = stopTime`), the paths of
/// its `BuildOutputs`, and its products and metrics (replacing any from an
/// earlier run), in one transaction. Returns `false`, writing nothing, if
/// the build was no longer unfinished (cancelled, or finished elsewhere).
pub async fn finish_build_success(
    conn: &mut PgConnection,
    finish: &BuildFinish,
) -> Result<bool, ResultsError> {
    let what = format!("finishing build {} as succeeded", finish.build);
    let mut tx = conn.begin().await.map_err(db_err(&what))?;
    let finished = finish_success_on(&mut tx, finish).await?;
    tx.commit().await.map_err(db_err(&what))?;
    Ok(finished)
}

/// [`finish_build_success`] on a connection already in a transaction.
async fn finish_success_on(
    conn: &mut PgConnection,
    finish: &BuildFinish,
) -> Result<bool, ResultsError> {
    let build = finish.build;
    let what = format!("finishing build {build} as succeeded");
    if !matches!(finish.status, Status::Success | Status::FailedWithOutput) {
        return Err(invalid(
            &what,
            format!("status {} is not a success", finish.status.code()),
        ));
    }
    let start = db_time(&what, "start time", finish.start_time)?;
    let stop = db_time(&what, "stop time", finish.stop_time)?;

    let done = sqlx::query(
        "update Builds set finished = 1, buildStatus = $2, startTime = $3, stopTime = $4,
                size = $5, closureSize = $6, releaseName = $7, isCachedBuild = $8,
                notificationPendingSince = $4
         where id = $1 and finished = 0",
    )
    .bind(build)
    .bind(finish.status.code())
    .bind(start)
    .bind(stop)
    .bind(db_size(finish.size))
    .bind(db_size(finish.closure_size))
    .bind(&finish.release_name)
    .bind(i32::from(finish.is_cached))
    .execute(&mut *conn)
    .await
    .map_err(db_err(&what))?;
    if done.rows_affected() == 0 {
        // Nothing was written.
        return Ok(false);
    }

    if !finish.outputs.is_empty() {
        let (names, paths): (Vec<&str>, Vec<&str>) = finish
            .outputs
            .iter()
            .map(|(name, path)| (name.as_str(), path.as_str()))
            .unzip();
        sqlx::query(
            "update BuildOutputs o set path = u.path
             from unnest($2::text[], $3::text[]) as u(name, path)
             where o.build = $1 and o.name = u.name",
        )
        .bind(build)
        .bind(names)
        .bind(paths)
        .execute(&mut *conn)
        .await
        .map_err(db_err(&format!(
            "recording the output paths of build {build}"
        )))?;
    }

    write_products(conn, build, &finish.products).await?;
    write_metrics(conn, build, &finish.metrics).await?;
    Ok(true)
}

async fn write_products(
    conn: &mut PgConnection,
    build: i32,
    products: &[BuildProduct],
) -> Result<(), ResultsError> {
    let what = format!("recording the products of build {build}");
    sqlx::query("delete from BuildProducts where build = $1")
        .bind(build)
        .execute(&mut *conn)
        .await
        .map_err(db_err(&what))?;
    if products.is_empty() {
        return Ok(());
    }
    let count = i32::try_from(products.len())
        .map_err(|_| invalid(&what, format!("{} products", products.len())))?;
    let numbers: Vec<i32> = (1..=count).collect();
    let kinds: Vec<&str> = products.iter().map(|p| p.kind.as_str()).collect();
    let subtypes: Vec<&str> = products.iter().map(|p| p.subtype.as_str()).collect();
    let sizes: Vec<Option<i64>> = products
        .iter()
        .map(|p| p.file.map(|f| db_size(f.size)))
        .collect();
    let hashes: Vec<Option<String>> = products
        .iter()
        .map(|p| p.file.map(|f| f.sha256_hex()))
        .collect();
    let paths: Vec<&str> = products.iter().map(|p| p.path.as_str()).collect();
    let names: Vec<&str> = products.iter().map(|p| p.name.as_str()).collect();
    let defaults: Vec<&str> = products.iter().map(|p| p.default_path.as_str()).collect();
    sqlx::query(
        "insert into BuildProducts (build, productnr, type, subtype, fileSize, sha256hash,
                                    path, name, defaultPath)
         select $1, u.nr, u.type, u.subtype, u.size, u.hash, u.path, u.name, u.default_path
         from unnest($2::int4[], $3::text[], $4::text[], $5::int8[], $6::text[], $7::text[],
                     $8::text[], $9::text[])
              as u(nr, type, subtype, size, hash, path, name, default_path)",
    )
    .bind(build)
    .bind(numbers)
    .bind(kinds)
    .bind(subtypes)
    .bind(sizes)
    .bind(hashes)
    .bind(paths)
    .bind(names)
    .bind(defaults)
    .execute(&mut *conn)
    .await
    .map_err(db_err(&what))?;
    Ok(())
}

/// Metrics carry the build's project, jobset, job and queue time, copied
/// from `Builds` and `Jobsets` by the insert itself.
async fn write_metrics(
    conn: &mut PgConnection,
    build: i32,
    metrics: &[BuildMetric],
) -> Result<(), ResultsError> {
    let what = format!("recording the metrics of build {build}");
    sqlx::query("delete from BuildMetrics where build = $1")
        .bind(build)
        .execute(&mut *conn)
        .await
        .map_err(db_err(&what))?;
    let by_name: BTreeMap<&str, &BuildMetric> =
        metrics.iter().map(|m| (m.name.as_str(), m)).collect();
    if by_name.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = by_name.keys().copied().collect();
    let units: Vec<Option<&str>> = by_name.values().map(|m| m.unit.as_deref()).collect();
    let values: Vec<f64> = by_name.values().map(|m| m.value).collect();
    sqlx::query(
        "insert into BuildMetrics (build, name, unit, value, project, jobset, job, timestamp)
         select b.id, u.name, u.unit, u.value, j.project, j.name, b.job, b.timestamp
         from Builds b join Jobsets j on j.id = b.jobset_id,
              unnest($2::text[], $3::text[], $4::float8[]) as u(name, unit, value)
         where b.id = $1",
    )
    .bind(build)
    .bind(names)
    .bind(units)
    .bind(values)
    .execute(&mut *conn)
    .await
    .map_err(db_err(&what))?;
    Ok(())
}

/// Finishes a build that failed, was aborted, timed out, …: `status`
/// (a build status other than 0, 6, and the step-only 8 and 13), the
/// times, `isCachedBuild`, `finished = 1` and `notificationPendingSince =
/// stop_time`. Returns `false`, writing nothing, if the build was no
/// longer unfinished.
pub async fn finish_build_failure(
    conn: &mut PgConnection,
    build: i32,
    status: Status,
    start_time: i64,
    stop_time: i64,
    is_cached: bool,
) -> Result<bool, ResultsError> {
    let failure = BuildFailure {
        build,
        status,
        start_time,
        stop_time,
        is_cached,
    };
    finish_failure_on(conn, &failure).await
}

async fn finish_failure_on(
    conn: &mut PgConnection,
    failure: &BuildFailure,
) -> Result<bool, ResultsError> {
    let BuildFailure {
        build,
        status,
        start_time,
        stop_time,
        is_cached,
    } = *failure;
    let what = format!("finishing build {build} as {status}");
    if matches!(
        status,
        Status::Success | Status::FailedWithOutput | Status::CachedFailure | Status::Resolved
    ) {
        return Err(invalid(
            &what,
            format!("status {} is not a build failure", status.code()),
        ));
    }
    let start = db_time(&what, "start time", start_time)?;
    let stop = db_time(&what, "stop time", stop_time)?;
    let done = sqlx::query(
        "update Builds set finished = 1, buildStatus = $2, startTime = $3, stopTime = $4,
                isCachedBuild = $5, notificationPendingSince = $4
         where id = $1 and finished = 0",
    )
    .bind(build)
    .bind(status.code())
    .bind(start)
    .bind(stop)
    .bind(i32::from(is_cached))
    .execute(conn)
    .await
    .map_err(db_err(&what))?;
    Ok(done.rows_affected() == 1)
}

/// Finishes a batch of builds in one transaction (a savepoint inside the
/// caller's): all are recorded or none. Returns the ids of the builds
/// finished now, in the order given, leaving out those that were no longer
/// unfinished.
pub async fn finish_builds(
    conn: &mut PgConnection,
    outcomes: &[BuildOutcome],
) -> Result<Vec<i32>, ResultsError> {
    let what = format!("finishing a batch of {} builds", outcomes.len());
    let mut tx = conn.begin().await.map_err(db_err(&what))?;
    let mut finished = Vec::with_capacity(outcomes.len());
    for outcome in outcomes {
        let now = match outcome {
            BuildOutcome::Succeeded(s) => finish_success_on(&mut tx, s).await?,
            BuildOutcome::Failed(f) => finish_failure_on(&mut tx, f).await?,
        };
        if now {
            finished.push(outcome.build());
        }
    }
    tx.commit().await.map_err(db_err(&what))?;
    Ok(finished)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_round_trip_through_their_codes() {
        for phase in [
            StepPhase::Preparing,
            StepPhase::Connecting,
            StepPhase::SendingInputs,
            StepPhase::Building,
            StepPhase::WaitingForLocalSlot,
            StepPhase::ReceivingOutputs,
            StepPhase::PostProcessing,
        ] {
            let code = u32::try_from(phase.code()).expect("positive");
            assert_eq!(StepPhase::from_code(code), Some(phase));
        }
        assert_eq!(StepPhase::from_code(0), None);
        assert_eq!(StepPhase::from_code(2), None);
        assert_eq!(StepPhase::from_code(u32::MAX), None);
    }

    #[test]
    fn times_must_be_positive_32_bit() {
        assert_eq!(db_time("t", "start", 1).ok(), Some(1));
        assert!(db_time("t", "start", 0).is_err());
        assert!(db_time("t", "start", -5).is_err());
        assert!(db_time("t", "start", i64::from(i32::MAX) + 1).is_err());
    }
}
