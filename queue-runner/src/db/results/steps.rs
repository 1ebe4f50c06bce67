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

/// How many times [`create_steps`] retries a step number taken by a
/// concurrent insert. Each retry follows a commit of another insert for
/// the same build, so this bounds the concurrency it tolerates.
const STEPNR_ATTEMPTS: u32 = 10_000;

/// Inserts a step with the next free `stepnr` of its build, and its
/// outputs; returns the `stepnr`. See [`create_steps`].
pub async fn create_step(conn: &mut PgConnection, step: &StepRow) -> Result<i32, ResultsError> {
    let numbers = create_steps(conn, &[step]).await?;
    numbers.into_iter().next().ok_or_else(|| {
        invalid(
            &format!("creating a step of build {}", step.build),
            "no step number came back",
        )
    })
}

/// The columns of a new `BuildSteps` row, checked.
struct NewStepColumns {
    busy: i32,
    status: Option<i32>,
    start: Option<i32>,
    stop: Option<i32>,
}

impl NewStepColumns {
    fn of(step: &StepRow) -> Result<NewStepColumns, ResultsError> {
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
        Ok(NewStepColumns {
            busy,
            status,
            start: db_time_opt(&what, "start time", step.start_time)?,
            stop: db_time_opt(&what, "stop time", step.stop_time)?,
        })
    }
}

/// Inserts `steps`, each with the next free `stepnr` of its build (steps of
/// one build are numbered in the order given), and their outputs, in one
/// transaction (a savepoint inside the caller's); returns their step
/// numbers, in order. A handful of statements, whatever the number of
/// steps.
///
/// A number is `max(stepnr) + 1` (plus the step's place among the batch's
/// steps of its build), computed by the insert. A step whose number a
/// concurrent insert took meanwhile (its row is waited for) is left out and
/// numbered again from a fresh snapshot. Inside a caller's transaction this
/// needs READ COMMITTED, PostgreSQL's default.
pub async fn create_steps(
    conn: &mut PgConnection,
    steps: &[&StepRow],
) -> Result<Vec<i32>, ResultsError> {
    if steps.is_empty() {
        return Ok(Vec::new());
    }
    let columns = steps
        .iter()
        .map(|s| NewStepColumns::of(s))
        .collect::<Result<Vec<_>, _>>()?;
    let what = match steps {
        [one] => format!("creating a step of build {}", one.build),
        many => format!("creating {} steps", many.len()),
    };

    let mut tx = conn.begin().await.map_err(db_err(&what))?;
    let mut numbers: Vec<Option<i32>> = vec![None; steps.len()];
    let mut pending: Vec<usize> = (0..steps.len()).collect();
    for _ in 0..STEPNR_ATTEMPTS {
        let column = |f: &dyn Fn(usize) -> Option<i32>| -> Vec<Option<i32>> {
            pending.iter().map(|&i| f(i)).collect()
        };
        let text = |f: &dyn Fn(&StepRow) -> Option<&str>| -> Vec<Option<String>> {
            pending
                .iter()
                .map(|&i| f(steps[i]).map(str::to_owned))
                .collect()
        };
        let rows: Vec<(i64, i32)> = sqlx::query_as(
            "with input as (
                 select * from unnest($1::int4[], $2::int4[], $3::text[], $4::int4[], $5::int4[],
                                      $6::text[], $7::int4[], $8::int4[], $9::text[], $10::text[],
                                      $11::int4[]) with ordinality
                     as u(build, type, drvPath, busy, status, errorMsg, startTime, stopTime,
                          machine, system, propagatedFrom, ord)
             ), numbered as (
                 select i.*, coalesce((select max(s.stepnr) from BuildSteps s
                                       where s.build = i.build), 0)
                             + row_number() over (partition by i.build order by i.ord) as stepnr
                 from input i
             ), inserted as (
                 insert into BuildSteps (build, stepnr, type, drvPath, busy, status, errorMsg,
                                         startTime, stopTime, machine, system, propagatedFrom)
                 select build, stepnr, type, drvPath, busy, status, errorMsg, startTime,
                        stopTime, machine, system, propagatedFrom
                 from numbered
                 on conflict do nothing
                 returning build, stepnr
             )
             select n.ord, n.stepnr::int4 from numbered n
             join inserted i on i.build = n.build and i.stepnr = n.stepnr",
        )
        .bind(column(&|i| Some(steps[i].build)))
        .bind(column(&|i| Some(steps[i].step_type as i32)))
        .bind(text(&|s| Some(&s.drv_path)))
        .bind(column(&|i| Some(columns[i].busy)))
        .bind(column(&|i| columns[i].status))
        .bind(text(&|s| s.error_msg.as_deref()))
        .bind(column(&|i| columns[i].start))
        .bind(column(&|i| columns[i].stop))
        .bind(text(&|s| Some(&s.machine)))
        .bind(text(&|s| Some(&s.system)))
        .bind(column(&|i| steps[i].propagated_from))
        .fetch_all(&mut *tx)
        .await
        .map_err(db_err(&what))?;
        for (ord, stepnr) in rows {
            let slot = usize::try_from(ord - 1)
                .ok()
                .and_then(|k| pending.get(k).copied())
                .and_then(|i| numbers.get_mut(i));
            if let Some(slot) = slot {
                *slot = Some(stepnr);
            }
        }
        pending.retain(|&i| numbers[i].is_none());
        if pending.is_empty() {
            break;
        }
    }
    let numbers = numbers
        .into_iter()
        .zip(steps)
        .map(|(n, step)| {
            n.ok_or(ResultsError::StepNumberContention {
                build: step.build,
                attempts: STEPNR_ATTEMPTS,
            })
        })
        .collect::<Result<Vec<i32>, _>>()?;

    let mut outputs = OutputColumns::default();
    for (step, stepnr) in steps.iter().zip(&numbers) {
        for (name, path) in &step.outputs {
            outputs.push(step.build, *stepnr, name, path.as_deref());
        }
    }
    if !outputs.names.is_empty() {
        sqlx::query(
            "insert into BuildStepOutputs (build, stepnr, name, path)
             select * from unnest($1::int4[], $2::int4[], $3::text[], $4::text[])",
        )
        .bind(outputs.builds)
        .bind(outputs.stepnrs)
        .bind(outputs.names)
        .bind(outputs.paths)
        .execute(&mut *tx)
        .await
        .map_err(db_err(&format!("recording the outputs of {what}")))?;
    }
    tx.commit().await.map_err(db_err(&what))?;
    Ok(numbers)
}

/// `BuildStepOutputs` rows as the columns an `unnest` takes.
#[derive(Default)]
struct OutputColumns<'a> {
    builds: Vec<i32>,
    stepnrs: Vec<i32>,
    names: Vec<&'a str>,
    paths: Vec<Option<&'a str>>,
}

impl<'a> OutputColumns<'a> {
    fn push(&mut self, build: i32, stepnr: i32, name: &'a str, path: Option<&'a str>) {
        self.builds.push(build);
        self.stepnrs.push(stepnr);
        self.names.push(name);
        self.paths.push(path);
    }
}

/// Moves a busy step to another phase. [`ResultsError::StepNotBusy`] if it
/// is no longer busy (finished, or aborted meanwhile).
pub async fn update_step_phase(
    conn: &mut PgConnection,
    build: i32,
    stepnr: i32,
    phase: StepPhase,
) -> Result<(), ResultsError> {
    if update_step_phases(conn, &[(build, stepnr, phase)]).await? == 0 {
        return Err(ResultsError::StepNotBusy { build, stepnr });
    }
    Ok(())
}

/// Moves busy steps `(build, stepnr, phase)` to their phases, in one
/// statement; steps no longer busy are left alone. Returns how many moved.
/// A step given twice takes one of its phases.
pub async fn update_step_phases(
    conn: &mut PgConnection,
    phases: &[(i32, i32, StepPhase)],
) -> Result<u64, ResultsError> {
    if phases.is_empty() {
        return Ok(0);
    }
    let what = match phases {
        [(build, stepnr, _)] => format!("updating the phase of step {stepnr} of build {build}"),
        many => format!("updating the phases of {} steps", many.len()),
    };
    let builds: Vec<i32> = phases.iter().map(|p| p.0).collect();
    let stepnrs: Vec<i32> = phases.iter().map(|p| p.1).collect();
    let codes: Vec<i32> = phases.iter().map(|p| p.2.code()).collect();
    let done = sqlx::query(
        "update BuildSteps s set busy = u.busy
         from unnest($1::int4[], $2::int4[], $3::int4[]) as u(build, stepnr, busy)
         where s.build = u.build and s.stepnr = u.stepnr and s.busy != 0 and s.status is null",
    )
    .bind(builds)
    .bind(stepnrs)
    .bind(codes)
    .execute(&mut *conn)
    .await
    .map_err(db_err(&what))?;
    Ok(done.rows_affected())
}

/// Records how an attempt ended: `busy = 0` and the result's columns, and
/// the output paths it made known. See [`finish_steps`].
pub async fn finish_step(
    conn: &mut PgConnection,
    build: i32,
    stepnr: i32,
    result: &StepResult,
) -> Result<(), ResultsError> {
    finish_steps(conn, &[(build, stepnr, result)]).await
}

/// A finished step's columns, checked and in Hydra's encoding.
struct FinishColumns {
    start: i32,
    stop: i32,
    /// No overhead and never built are NULL, and determinism is only known
    /// after more than one build.
    overhead: Option<i32>,
    times_built: Option<i32>,
    non_deterministic: Option<bool>,
}

impl FinishColumns {
    fn of(build: i32, stepnr: i32, result: &StepResult) -> Result<FinishColumns, ResultsError> {
        let what = format!("finishing step {stepnr} of build {build}");
        if result.status == Status::Resolved {
            return Err(invalid(
                &what,
                "a resolved step is recorded with mark_step_resolved",
            ));
        }
        Ok(FinishColumns {
            start: db_time(&what, "start time", result.start_time)?,
            stop: db_time(&what, "stop time", result.stop_time)?,
            overhead: (result.overhead_ms > 0)
                .then(|| i32::try_from(result.overhead_ms).unwrap_or(i32::MAX)),
            times_built: (result.times_built > 0)
                .then(|| i32::try_from(result.times_built).unwrap_or(i32::MAX)),
            non_deterministic: (result.times_built > 1).then_some(result.is_non_deterministic),
        })
    }
}

/// Records how attempts `(build, stepnr, result)` ended, in one
/// transaction (a savepoint inside the caller's) of a few statements: each
/// row's `busy = 0` and result columns, its `SluiceStepRuns` row, and the
/// output paths it made known (a name given twice keeps the last path).
/// [`ResultsError::NoSuchStep`] if a row does not exist, and
/// [`ResultsError::Invalid`] if a step is given twice.
pub async fn finish_steps(
    conn: &mut PgConnection,
    finished: &[(i32, i32, &StepResult)],
) -> Result<(), ResultsError> {
    if finished.is_empty() {
        return Ok(());
    }
    let what = match finished {
        [(build, stepnr, _)] => format!("finishing step {stepnr} of build {build}"),
        many => format!("finishing {} steps", many.len()),
    };
    let columns = finished
        .iter()
        .map(|(build, stepnr, result)| FinishColumns::of(*build, *stepnr, result))
        .collect::<Result<Vec<_>, _>>()?;
    let keys: std::collections::HashSet<(i32, i32)> =
        finished.iter().map(|(b, s, _)| (*b, *s)).collect();
    if keys.len() != finished.len() {
        return Err(invalid(&what, "a step is finished twice in one batch"));
    }

    let mut tx = conn.begin().await.map_err(db_err(&what))?;
    let int = |f: &dyn Fn(usize) -> Option<i32>| -> Vec<Option<i32>> {
        (0..finished.len()).map(f).collect()
    };
    let updated: Vec<(i32, i32)> = sqlx::query_as(
        "update BuildSteps s set busy = 0, status = u.status, errorMsg = u.errorMsg,
                startTime = u.startTime, stopTime = u.stopTime, machine = u.machine,
                overhead = u.overhead, timesBuilt = u.timesBuilt,
                isNonDeterministic = u.isNonDeterministic
         from unnest($1::int4[], $2::int4[], $3::int4[], $4::text[], $5::int4[], $6::int4[],
                     $7::text[], $8::int4[], $9::int4[], $10::bool[])
              as u(build, stepnr, status, errorMsg, startTime, stopTime, machine, overhead,
                   timesBuilt, isNonDeterministic)
         where s.build = u.build and s.stepnr = u.stepnr
         returning s.build, s.stepnr",
    )
    .bind(int(&|i| Some(finished[i].0)))
    .bind(int(&|i| Some(finished[i].1)))
    .bind(int(&|i| Some(finished[i].2.status.code())))
    .bind(
        finished
            .iter()
            .map(|f| f.2.error_msg.as_deref())
            .collect::<Vec<_>>(),
    )
    .bind(int(&|i| Some(columns[i].start)))
    .bind(int(&|i| Some(columns[i].stop)))
    .bind(
        finished
            .iter()
            .map(|f| f.2.machine.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(int(&|i| columns[i].overhead))
    .bind(int(&|i| columns[i].times_built))
    .bind(
        columns
            .iter()
            .map(|c| c.non_deterministic)
            .collect::<Vec<_>>(),
    )
    .fetch_all(&mut *tx)
    .await
    .map_err(db_err(&what))?;
    if updated.len() != finished.len() {
        let updated: std::collections::HashSet<(i32, i32)> = updated.into_iter().collect();
        let (build, stepnr) = finished
            .iter()
            .map(|(b, s, _)| (*b, *s))
            .find(|key| !updated.contains(key))
            .unwrap_or((0, 0));
        return Err(ResultsError::NoSuchStep {
            op: "finishing",
            build,
            stepnr,
        });
    }

    let runs: Vec<(i32, i32, &StepRun)> = finished
        .iter()
        .filter_map(|(b, s, r)| r.run.as_ref().map(|run| (*b, *s, run)))
        .collect();
    if !runs.is_empty() {
        let ms = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let big =
            |f: &dyn Fn(&StepRun) -> u64| -> Vec<i64> { runs.iter().map(|r| ms(f(r.2))).collect() };
        sqlx::query(
            "insert into SluiceStepRuns (build, stepnr, exitCode, signal, fetchMs, buildMs,
                                         uploadMs)
             select * from unnest($1::int4[], $2::int4[], $3::int4[], $4::int4[], $5::int8[],
                                  $6::int8[], $7::int8[])
             on conflict (build, stepnr) do update set exitCode = excluded.exitCode,
                signal = excluded.signal, fetchMs = excluded.fetchMs,
                buildMs = excluded.buildMs, uploadMs = excluded.uploadMs",
        )
        .bind(runs.iter().map(|r| r.0).collect::<Vec<_>>())
        .bind(runs.iter().map(|r| r.1).collect::<Vec<_>>())
        .bind(runs.iter().map(|r| r.2.exit_code).collect::<Vec<_>>())
        .bind(runs.iter().map(|r| r.2.signal).collect::<Vec<_>>())
        .bind(big(&|r| r.fetch_ms))
        .bind(big(&|r| r.build_ms))
        .bind(big(&|r| r.upload_ms))
        .execute(&mut *tx)
        .await
        .map_err(db_err(&format!("recording how {what} ran")))?;
    }

    let mut outputs = OutputColumns::default();
    for (build, stepnr, result) in finished {
        let by_name: BTreeMap<&str, &str> = result
            .outputs
            .iter()
            .map(|(name, path)| (name.as_str(), path.as_str()))
            .collect();
        for (name, path) in by_name {
            outputs.push(*build, *stepnr, name, Some(path));
        }
    }
    if !outputs.names.is_empty() {
        sqlx::query(
            "insert into BuildStepOutputs (build, stepnr, name, path)
             select * from unnest($1::int4[], $2::int4[], $3::text[], $4::text[])
             on conflict (build, stepnr, name) do update set path = excluded.path",
        )
        .bind(outputs.builds)
        .bind(outputs.stepnrs)
        .bind(outputs.names)
        .bind(outputs.paths)
        .execute(&mut *tx)
        .await
        .map_err(db_err(&format!("recording the outputs of {what}")))?;
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
    let mut failed = std::collections::HashSet::new();
    for chunk in paths.chunks(super::LOOKUP_CHUNK) {
        let found: Vec<String> =
            sqlx::query_scalar("select path from FailedPaths where path = any($1::text[])")
                .bind(chunk)
                .fetch_all(&mut *conn)
                .await
                .map_err(db_err("reading FailedPaths"))?;
        failed.extend(found);
    }
    Ok(failed)
}

/// Forgets the cached failures recorded under the `.drv` paths of the
/// steps of `builds` (derivations with outputs known only once built go
/// into `FailedPaths` themselves): for queued builds that have step rows,
/// which were restarted, what the web UI's restart does for the output
/// paths it can name. Returns how many it forgot.
pub async fn forget_failed_derivations(
    conn: &mut PgConnection,
    builds: &[i32],
) -> Result<u64, ResultsError> {
    if builds.is_empty() {
        return Ok(0);
    }
    let done = sqlx::query(
        "delete from FailedPaths where path in
           (select drvPath from BuildSteps where build = any($1) and drvPath like '%.drv')",
    )
    .bind(builds)
    .execute(&mut *conn)
    .await
    .map_err(db_err("forgetting restarted builds' failed derivations"))?;
    Ok(done.rows_affected())
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
