//! `BuildSteps`, `BuildStepOutputs` and `FailedPaths`: steps as they
//! run, finish or are resolved.

use super::*;

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

impl StepRow {
    /// A build step of `build` that ran on no machine and is finished at
    /// `time` with `status`: what records an unsupported, aborted or
    /// propagated step. Other fields are set with struct update syntax.
    pub fn finished(build: i32, drv_path: String, status: Status, time: i64) -> StepRow {
        StepRow {
            build,
            step_type: StepKind::Build,
            drv_path,
            system: String::new(),
            machine: String::new(),
            state: StepState::Finished(status),
            error_msg: None,
            start_time: Some(time),
            stop_time: Some(time),
            propagated_from: None,
            outputs: Vec::new(),
        }
    }
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
    /// How the agent's run went (`SluiceStepRuns`); `None` for a step no
    /// agent ran.
    pub run: Option<StepRun>,
}

/// How an agent's run of a step went: the builder's exact exit status and
/// the milliseconds of each phase.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepRun {
    /// The builder's exit code, when it exited.
    pub exit_code: Option<i32>,
    /// The signal that killed the builder, when one did.
    pub signal: Option<i32>,
    pub fetch_ms: u64,
    pub build_ms: u64,
    pub upload_ms: u64,
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
    if let Some(run) = &result.run {
        let ms = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        sqlx::query(
            "insert into SluiceStepRuns (build, stepnr, exitCode, signal, fetchMs, buildMs, uploadMs)
             values ($1, $2, $3, $4, $5, $6, $7)
             on conflict (build, stepnr) do update set exitCode = excluded.exitCode,
                signal = excluded.signal, fetchMs = excluded.fetchMs,
                buildMs = excluded.buildMs, uploadMs = excluded.uploadMs",
        )
        .bind(build)
        .bind(stepnr)
        .bind(run.exit_code)
        .bind(run.signal)
        .bind(ms(run.fetch_ms))
        .bind(ms(run.build_ms))
        .bind(ms(run.upload_ms))
        .execute(&mut *tx)
        .await
        .map_err(db_err(&what))?;
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

/// Steps a previous run left busy, and that no agent can still be running
/// (they have no `SluiceAttempts` row), can never finish: mark them
/// aborted, as Hydra does at start-up (`busy = 0`, status 3), with `stopTime = now`
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
         where busy != 0
           and not exists (select 1 from SluiceAttempts a
                           where a.build = BuildSteps.build and a.stepnr = BuildSteps.stepnr)",
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

/// Which of `paths` are in `FailedPaths`: one indexed query (the table's
/// primary key) for a whole batch.
pub async fn failed_paths_among(
    conn: &mut PgConnection,
    paths: &[String],
) -> Result<std::collections::HashSet<String>, ResultsError> {
    if paths.is_empty() {
        return Ok(Default::default());
    }
    let found: Vec<String> =
        sqlx::query_scalar("select path from FailedPaths where path = any($1::text[])")
            .bind(paths)
            .fetch_all(conn)
            .await
            .map_err(db_err("reading FailedPaths"))?;
    Ok(found.into_iter().collect())
}

/// The build under which `drv_path` last failed for good (its own step
/// row with status 1, 7, 10 or 11), if one records it: what a cached
/// failure of it is `propagatedFrom`.
pub async fn last_failure_of(
    conn: &mut PgConnection,
    drv_path: &str,
) -> Result<Option<i32>, ResultsError> {
    sqlx::query_scalar(
        "select build from BuildSteps
         where drvPath = $1 and busy = 0 and status in (1, 7, 10, 11) and propagatedFrom is null
         order by build desc, stepnr desc limit 1",
    )
    .bind(drv_path)
    .fetch_optional(conn)
    .await
    .map_err(db_err("finding the last failure of a step"))
}

/// The last finished row of `drv_path` under `build`: its status, error
/// message and machine. What a dependent build's row copies from the
/// attempt that really failed.
pub async fn finished_step_of(
    conn: &mut PgConnection,
    build: i32,
    drv_path: &str,
) -> Result<Option<(i32, Option<String>, String)>, ResultsError> {
    sqlx::query_as(
        "select status, errorMsg, machine from BuildSteps
         where build = $1 and drvPath = $2 and busy = 0 and status is not null
         order by stepnr desc limit 1",
    )
    .bind(build)
    .bind(drv_path)
    .fetch_optional(conn)
    .await
    .map_err(db_err("reading a finished step"))
}
