//! What an evaluator writes to queue builds, as `queue-runner submit`
//! does it: the project and jobset if missing, one `JobsetEvals` row, the
//! `Builds` rows with their `BuildOutputs`, and `builds_added`, all in one
//! transaction; and the state of those builds, for `submit --wait`.

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
}

/// One build's state, for `--wait`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildState {
    pub id: i32,
    pub job: String,
    pub finished: bool,
    pub status: Option<i32>,
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
             values (0, $1, $2, $3, $4, $5, $6, 3600, 36000, 1, 100, 0) returning id",
        )
        .bind(now as i32)
        .bind(jobset_id)
        .bind(&build.job)
        .bind(&build.nix_name)
        .bind(&build.drv_path)
        .bind(&build.system)
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
