//! Ingestion: reading queued builds (`Builds` with `finished = 0`), their
//! `BuildOutputs` and their jobset, as the evaluator left them.
//!
//! Invariants: these queries only read, and none walks the history of
//! finished builds from its start. [`load_builds_after`] walks the primary
//! key from a given id, so repeated calls never revisit builds the caller
//! already holds; [`unfinished_build_ids`] uses the partial index on unfinished
//! builds and returns ids only, for the caller to diff against what it
//! holds (a restarted build keeps its old, lower id).
//!
//! For callers:
//! - At start-up, list [`unfinished_build_ids`] up to `i32::MAX` and load
//!   them with [`load_builds_by_ids`] in chunks: `load_builds_after(0, …)`
//!   would walk the primary key across every finished build in history.
//! - Ids are allocated when an evaluator inserts, not when it commits, so a
//!   build may become visible after one with a higher id was loaded.
//!   [`load_builds_after`] alone misses it; the diff with
//!   [`unfinished_build_ids`] (on `builds_restarted`, and now and then)
//!   picks it up.

use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Postgres, Row};

/// Hydra's column defaults, used when the evaluator wrote NULL.
const DEFAULT_MAX_SILENT_S: i32 = 3600;
const DEFAULT_TIMEOUT_S: i32 = 36000;

/// A queued build with what the queue runner needs to schedule it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueuedBuild {
    pub id: i32,
    pub jobset_id: i32,
    pub project: String,
    pub jobset: String,
    pub job: String,
    /// `Builds.nixName`; may be NULL in the schema.
    pub nix_name: Option<String>,
    /// The full store path of the top-level derivation.
    pub drv_path: String,
    pub system: String,
    /// `maxsilent` in seconds; NULL reads as Hydra's default (3600) and a
    /// negative value as 0.
    pub max_silent_s: u32,
    /// `timeout` in seconds; NULL reads as Hydra's default (36000) and a
    /// negative value as 0.
    pub timeout_s: u32,
    /// `Builds.priority` (meta.schedulingPriority); higher first.
    pub priority: i32,
    /// `Builds.globalPriority`; higher first.
    pub global_priority: i32,
    /// Unix seconds when queued.
    pub timestamp: i64,
    /// `(output name, path)` sorted by name; the path is `None` for a
    /// floating content-addressed output.
    pub outputs: Vec<(String, Option<String>)>,
    /// `Jobsets.schedulingShares` (positive by a check constraint).
    pub scheduling_shares: u32,
}

/// Why queued builds could not be read.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("{what}: {}", super::describe_sqlx_error(.source))]
    Database {
        what: String,
        #[source]
        source: sqlx::Error,
    },
}

fn db_err(what: impl Into<String>) -> impl FnOnce(sqlx::Error) -> QueueError {
    let what = what.into();
    move |source| QueueError::Database { what, source }
}

/// One statement: the build, its jobset, and its outputs as two arrays
/// sorted by name (each an index lookup on `BuildOutputs`' primary key).
const SELECT_BUILDS: &str = "
    select b.id, b.jobset_id, j.project, j.name as jobset, b.job, b.nixName,
           b.drvPath, b.system, b.maxsilent, b.timeout, b.priority,
           b.globalPriority, b.timestamp, j.schedulingShares,
           array(select o.name from BuildOutputs o where o.build = b.id order by o.name)
               as output_names,
           array(select o.path from BuildOutputs o where o.build = b.id order by o.name)
               as output_paths
    from Builds b join Jobsets j on j.id = b.jobset_id";

fn build_from_row(row: &PgRow) -> Result<QueuedBuild, sqlx::Error> {
    let seconds = |v: Option<i32>, default: i32| u32::try_from(v.unwrap_or(default)).unwrap_or(0);
    let names: Vec<String> = row.try_get("output_names")?;
    let paths: Vec<Option<String>> = row.try_get("output_paths")?;
    Ok(QueuedBuild {
        id: row.try_get("id")?,
        jobset_id: row.try_get("jobset_id")?,
        project: row.try_get("project")?,
        jobset: row.try_get("jobset")?,
        job: row.try_get("job")?,
        nix_name: row.try_get("nixname")?,
        drv_path: row.try_get("drvpath")?,
        system: row.try_get("system")?,
        max_silent_s: seconds(row.try_get("maxsilent")?, DEFAULT_MAX_SILENT_S),
        timeout_s: seconds(row.try_get("timeout")?, DEFAULT_TIMEOUT_S),
        priority: row.try_get("priority")?,
        global_priority: row.try_get("globalpriority")?,
        timestamp: i64::from(row.try_get::<i32, _>("timestamp")?),
        outputs: names.into_iter().zip(paths).collect(),
        scheduling_shares: u32::try_from(row.try_get::<i32, _>("schedulingshares")?)
            .unwrap_or(1)
            .max(1),
    })
}

/// Queued builds as loaded: the rows that decoded, and those that did not.
#[derive(Debug, Default)]
pub struct LoadedBuilds {
    pub builds: Vec<QueuedBuild>,
    /// A row that cannot be read as a build (a NULL or a value out of
    /// range where the contract has none): its id, and what the row's
    /// `drvPath` was if it could be read, with the reason. Such a build is
    /// aborted; the others load.
    pub undecodable: Vec<UndecodableBuild>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UndecodableBuild {
    pub id: i32,
    pub drv_path: String,
    pub error: String,
}

async fn fetch_builds(
    conn: &mut PgConnection,
    query: sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments>,
    what: String,
) -> Result<LoadedBuilds, QueueError> {
    let rows = query.fetch_all(&mut *conn).await;
    let rows = rows.map_err(db_err(what.clone()))?;
    let mut loaded = LoadedBuilds::default();
    for row in &rows {
        match build_from_row(row) {
            Ok(build) => loaded.builds.push(build),
            Err(e) => {
                // The id is the primary key: never NULL.
                let id: i32 = row.try_get("id").map_err(db_err(what.clone()))?;
                let drv_path = row
                    .try_get::<Option<String>, _>("drvpath")
                    .ok()
                    .flatten()
                    .unwrap_or_default();
                loaded.undecodable.push(UndecodableBuild {
                    id,
                    drv_path,
                    error: format!(
                        "the Builds row cannot be read: {}",
                        super::describe_sqlx_error(&e)
                    ),
                });
            }
        }
    }
    Ok(loaded)
}

/// Up to `limit` unfinished builds with an id above `after_id`, by
/// increasing id. Call again with the last id returned until fewer than
/// `limit` come back.
pub async fn load_builds_after(
    conn: &mut PgConnection,
    after_id: i32,
    limit: u32,
) -> Result<LoadedBuilds, QueueError> {
    let sql = format!("{SELECT_BUILDS} where b.finished = 0 and b.id > $1 order by b.id limit $2");
    let query = sqlx::query(&sql).bind(after_id).bind(i64::from(limit));
    fetch_builds(
        conn,
        query,
        format!("loading queued builds after build {after_id}"),
    )
    .await
}

/// The unfinished builds among `ids`, by increasing id; ids of builds that
/// are finished or gone are left out.
pub async fn load_builds_by_ids(
    conn: &mut PgConnection,
    ids: &[i32],
) -> Result<LoadedBuilds, QueueError> {
    if ids.is_empty() {
        return Ok(LoadedBuilds::default());
    }
    let sql = format!("{SELECT_BUILDS} where b.finished = 0 and b.id = any($1) order by b.id");
    let query = sqlx::query(&sql).bind(ids);
    let what = match ids {
        [one] => format!("loading queued build {one}"),
        _ => format!("loading {} queued builds", ids.len()),
    };
    fetch_builds(conn, query, what).await
}

/// The ids of all unfinished builds up to and including `up_to_id`, by
/// increasing id. Uses the partial index on unfinished builds: the cost is
/// proportional to the queue, not to the history.
pub async fn unfinished_build_ids(
    conn: &mut PgConnection,
    up_to_id: i32,
) -> Result<Vec<i32>, QueueError> {
    let what = format!("listing unfinished builds up to build {up_to_id}");
    sqlx::query_scalar("select id from Builds where finished = 0 and id <= $1 order by id")
        .bind(up_to_id)
        .fetch_all(&mut *conn)
        .await
        .map_err(db_err(what))
}
