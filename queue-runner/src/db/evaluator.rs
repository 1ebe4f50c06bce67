//! What an evaluator writes to queue builds, as `queue-runner submit`
//! does it: the project and jobset if missing, one `JobsetEvals` row, the
//! `Builds` rows with their `BuildOutputs`, and `builds_added`, all in one
//! transaction; and the state of those builds and the step that failed
//! each failed one, for `submit --wait`.

use sqlx::PgPool;

/// A build to queue, from its derivation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewBuild {
    pub job: String,
    /// The derivation's name.
    pub nix_name: String,
    pub drv_path: String,
    pub system: String,
    /// Output name → statically known path (`None` for floating outputs).
    pub outputs: Vec<(String, Option<String>)>,
    /// `Builds.maxsilent` and `Builds.timeout`, in seconds: what Hydra's
    /// evaluator takes from `meta.maxSilent` and `meta.timeout`.
    pub max_silent_s: i32,
    pub timeout_s: i32,
}

impl NewBuild {
    /// Hydra's defaults for `maxsilent` and `timeout`.
    pub const DEFAULT_LIMITS: (i32, i32) = (3600, 36000);
}

/// One build's state, for `--wait`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildState {
    pub id: i32,
    pub job: String,
    pub finished: bool,
    pub status: Option<i32>,
}

/// The `BuildSteps` row that explains how a build failed, for the report
/// of `submit --wait`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedStep {
    /// The build the row belongs to: the failed build itself, or, for a
    /// failure propagated to it (`propagatedFrom`), the build under which
    /// the step really ran and failed.
    pub build: i32,
    pub stepnr: i32,
    /// Full store path of the step's derivation.
    pub drv_path: String,
    /// `BuildSteps.status` (never NULL: only finished rows are chosen).
    pub status: i32,
    pub error_msg: Option<String>,
    /// The builder's host name; `""` when none.
    pub machine: String,
    /// Set when this row is itself a propagated one whose origin row was
    /// not found (its build was restarted or its rows are gone).
    pub propagated_from: Option<i32>,
}

/// How many `propagatedFrom` links [`failed_step`] follows at most; the
/// queue runner writes chains of one, so this only guards against cycles
/// in foreign data.
const MAX_PROPAGATION_HOPS: usize = 8;

type StepRowTuple = (i32, i32, String, i32, Option<String>, String, Option<i32>);

fn failed_step_of(row: StepRowTuple) -> FailedStep {
    let (build, stepnr, drv_path, status, error_msg, machine, propagated_from) = row;
    FailedStep {
        build,
        stepnr,
        drv_path,
        status,
        error_msg,
        machine,
        propagated_from,
    }
}

/// The step that failed `build`, or `None` if it has no such row (e.g. a
/// build cancelled before anything ran).
///
/// Among the build's finished rows, a failure (status other than 0 and
/// 13) wins over a retried abort (3), and a later attempt over an earlier
/// one; for a build that failed with output (6), the successful step of
/// its own derivation stands in, as that is the log that tells why. A row
/// propagated from another build (a dependency failure, or the same
/// derivation failing under an earlier build) is replaced by the failing
/// attempt of the same derivation under that build.
pub async fn failed_step(pool: &PgPool, build: i32) -> Result<Option<FailedStep>, sqlx::Error> {
    let row: Option<StepRowTuple> = sqlx::query_as(
        "select s.build, s.stepnr, s.drvPath, s.status, s.errorMsg, s.machine, s.propagatedFrom
         from BuildSteps s join Builds b on b.id = s.build
         where s.build = $1 and s.busy = 0 and s.status is not null and s.status != 13
           and (s.status != 0 or (b.buildStatus = 6 and s.drvPath = b.drvPath))
         order by s.status = 0, s.status = 3, s.stepnr desc
         limit 1",
    )
    .bind(build)
    .fetch_optional(pool)
    .await?;
    let Some(mut step) = row.map(failed_step_of) else {
        return Ok(None);
    };
    let mut seen = vec![build];
    for _ in 0..MAX_PROPAGATION_HOPS {
        let Some(origin) = step.propagated_from.filter(|b| !seen.contains(b)) else {
            break;
        };
        seen.push(origin);
        let row: Option<StepRowTuple> = sqlx::query_as(
            "select build, stepnr, drvPath, status, errorMsg, machine, propagatedFrom
             from BuildSteps
             where build = $1 and drvPath = $2 and busy = 0 and status is not null
               and status not in (0, 13)
             order by status = 3, stepnr desc
             limit 1",
        )
        .bind(origin)
        .bind(&step.drv_path)
        .fetch_optional(pool)
        .await?;
        match row {
            Some(row) => step = failed_step_of(row),
            None => break,
        }
    }
    Ok(Some(step))
}

/// Queues `builds` in `project`/`jobset` at time `now` (unix seconds);
/// returns their ids in order.
pub async fn queue_builds(
    pool: &PgPool,
    project: &str,
    jobset: &str,
    builds: &[NewBuild],
    now: i64,
) -> Result<Vec<i32>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "insert into Users (userName, emailAddress, password) values ('sluice', '', '!')
         on conflict do nothing",
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "insert into Projects (name, displayName, owner) values ($1, $1, 'sluice')
         on conflict do nothing",
    )
    .bind(project)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "insert into Jobsets (project, name, emailOverride, type, nixExprInput, nixExprPath)
         values ($1, $2, '', 0, 'src', 'default.nix') on conflict do nothing",
    )
    .bind(project)
    .bind(jobset)
    .execute(&mut *tx)
    .await?;
    let jobset_id: i32 =
        sqlx::query_scalar("select id from Jobsets where project = $1 and name = $2")
            .bind(project)
            .bind(jobset)
            .fetch_one(&mut *tx)
            .await?;
    let eval: i32 = sqlx::query_scalar(
        "insert into JobsetEvals (jobset_id, timestamp, checkoutTime, evalTime, hasNewBuilds, hash, nrBuilds, nrSucceeded)
         values ($1, $2, 0, 0, 1, $3, $4, 0) returning id",
    )
    .bind(jobset_id)
    .bind(now as i32)
    .bind(format!("sluice-submit-{now}"))
    .bind(builds.len() as i32)
    .fetch_one(&mut *tx)
    .await
    ?;
    let mut ids = Vec::new();
    for build in builds {
        let id: i32 = sqlx::query_scalar(
            "insert into Builds (finished, timestamp, jobset_id, job, nixName, drvPath, system,
                                 maxsilent, timeout, isCurrent, priority, globalPriority)
             values (0, $1, $2, $3, $4, $5, $6, $7, $8, 1, 100, 0) returning id",
        )
        .bind(now as i32)
        .bind(jobset_id)
        .bind(&build.job)
        .bind(&build.nix_name)
        .bind(&build.drv_path)
        .bind(&build.system)
        .bind(build.max_silent_s)
        .bind(build.timeout_s)
        .fetch_one(&mut *tx)
        .await?;
        for (name, path) in &build.outputs {
            sqlx::query("insert into BuildOutputs (build, name, path) values ($1, $2, $3)")
                .bind(id)
                .bind(name)
                .bind(path)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("insert into JobsetEvalMembers (eval, build, isNew) values ($1, $2, 1)")
            .bind(eval)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        ids.push(id);
    }
    let lowest = ids.iter().min().copied().unwrap_or(0);
    sqlx::query("select pg_notify('builds_added', $1)")
        .bind(lowest.to_string())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(ids)
}

/// The state of each build of `ids` that exists, by increasing id.
pub async fn build_states(pool: &PgPool, ids: &[i32]) -> Result<Vec<BuildState>, sqlx::Error> {
    let rows: Vec<(i32, String, i32, Option<i32>)> = sqlx::query_as(
        "select id, job, finished, buildStatus from Builds where id = any($1) order by id",
    )
    .bind(ids)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, job, finished, status)| BuildState {
            id,
            job,
            finished: finished != 0,
            status,
        })
        .collect())
}
