//! What the dashboard reads from the database, and the `SystemStatus` row
//! it and older web UIs share: the queue grouped by jobset and system, the
//! latest failed steps, the names of builds in progress; and the upsert of
//! the `queue-runner` status row.
//!
//! Invariants: the reads run in one read-only transaction whose statements
//! the server cuts off after the caller's budget; none grows with the
//! history of finished builds (the queue uses the partial index on
//! unfinished builds, the failures the index on `BuildSteps.stopTime`,
//! the names a list of ids).

use std::time::Duration;

use sqlx::PgPool;

/// Queued builds of one jobset for one system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedGroup {
    pub project: String,
    pub jobset: String,
    pub system: String,
    pub builds: i64,
}

/// A step that failed, as the web UI lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedStep {
    pub build: i32,
    pub stepnr: i32,
    pub project: String,
    pub jobset: String,
    pub job: String,
    pub drv_path: String,
    pub machine: String,
    /// Hydra's step status code.
    pub status: i32,
    pub error_msg: Option<String>,
    /// Unix seconds.
    pub stop_time: i64,
}

/// Who a build belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildName {
    pub project: String,
    pub jobset: String,
    pub job: String,
}

/// One read of the dashboard's database figures.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DashboardRead {
    pub queue: Vec<QueuedGroup>,
    pub failures: Vec<FailedStep>,
    /// Of the builds asked for, by id.
    pub names: Vec<(i32, BuildName)>,
}

/// Step statuses the dashboard lists as failures: failed, aborted, timed
/// out, unsupported, log and output limits, not deterministic (not
/// cancelled, cached failures, which point at the real one, or resolved).
pub const FAILURE_STATUSES: [i32; 7] = [1, 3, 7, 9, 10, 11, 12];

/// Reads the queue by jobset and system, the `failures` latest failed
/// steps, and the names of `builds`, each statement cut off by the server
/// after `budget`.
pub async fn read(
    pool: &PgPool,
    builds: &[i32],
    failures: i64,
    budget: Duration,
) -> Result<DashboardRead, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("set transaction read only")
        .execute(&mut *tx)
        .await?;
    sqlx::query("select set_config('statement_timeout', $1, true)")
        .bind(format!("{}ms", budget.as_millis().max(1)))
        .execute(&mut *tx)
        .await?;
    let queue: Vec<(String, String, String, i64)> = sqlx::query_as(
        "select j.project, j.name, b.system, count(*)
         from Builds b join Jobsets j on j.id = b.jobset_id
         where b.finished = 0
         group by j.project, j.name, b.system",
    )
    .fetch_all(&mut *tx)
    .await?;
    #[allow(clippy::type_complexity)]
    let failed: Vec<(
        i32,
        i32,
        String,
        String,
        String,
        Option<String>,
        Option<String>,
        i32,
        Option<String>,
        i32,
    )> = sqlx::query_as(
        "select s.build, s.stepnr, j.project, j.name, b.job, s.drvPath, s.machine,
                s.status, s.errorMsg, s.stopTime
         from BuildSteps s
         join Builds b on b.id = s.build
         join Jobsets j on j.id = b.jobset_id
         where s.startTime is not null and s.stopTime is not null
           and s.busy = 0 and s.status = any($1)
         order by s.stopTime desc, s.build desc, s.stepnr desc
         limit $2",
    )
    .bind(&FAILURE_STATUSES[..])
    .bind(failures)
    .fetch_all(&mut *tx)
    .await?;
    let names: Vec<(i32, String, String, String)> = if builds.is_empty() {
        Vec::new()
    } else {
        sqlx::query_as(
            "select b.id, j.project, j.name, b.job
             from Builds b join Jobsets j on j.id = b.jobset_id
             where b.id = any($1)",
        )
        .bind(builds)
        .fetch_all(&mut *tx)
        .await?
    };
    tx.commit().await?;
    Ok(DashboardRead {
        queue: queue
            .into_iter()
            .map(|(project, jobset, system, builds)| QueuedGroup {
                project,
                jobset,
                system,
                builds,
            })
            .collect(),
        failures: failed
            .into_iter()
            .map(
                |(build, stepnr, project, jobset, job, drv, machine, status, error, stop)| {
                    FailedStep {
                        build,
                        stepnr,
                        project,
                        jobset,
                        job,
                        drv_path: drv.unwrap_or_default(),
                        machine: machine.unwrap_or_default(),
                        status,
                        error_msg: error,
                        stop_time: i64::from(stop),
                    }
                },
            )
            .collect(),
        names: names
            .into_iter()
            .map(|(id, project, jobset, job)| {
                (
                    id,
                    BuildName {
                        project,
                        jobset,
                        job,
                    },
                )
            })
            .collect(),
    })
}

/// `SystemStatus.what` of the queue runner's row.
pub const STATUS_ROW: &str = "queue-runner";

/// Writes `status` (JSON text) as the `queue-runner` row of
/// `SystemStatus`, in one statement cut off by the server after `budget`.
pub async fn write_status(
    pool: &PgPool,
    status: &str,
    budget: Duration,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("select set_config('statement_timeout', $1, true)")
        .bind(format!("{}ms", budget.as_millis().max(1)))
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "insert into SystemStatus (what, status) values ($1, $2::json)
         on conflict (what) do update set status = excluded.status",
    )
    .bind(STATUS_ROW)
    .bind(status)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}
