//! `SluiceAttempts`: which attempt (the id its agent knows) each busy step
//! row belongs to, so that a restarted queue runner can adopt the attempts
//! agents still run rather than abort them.
//!
//! Invariant: a row exists from the transaction that creates its busy
//! `BuildSteps` row to the one that finishes it; [`forget`] runs in the
//! latter.

use sqlx::PgConnection;
use uuid::Uuid;

use super::{db_err, db_time, ResultsError};

/// An attempt a previous run left in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRow {
    pub id: Uuid,
    pub build: i32,
    pub stepnr: i32,
    pub machine: String,
    pub drv_path: String,
    pub start_time: i64,
}

/// Records that step `stepnr` of `build` is attempt `id` on `machine`.
pub async fn record_attempt(conn: &mut PgConnection, row: &AttemptRow) -> Result<(), ResultsError> {
    let what = format!(
        "recording the attempt of step {} of build {}",
        row.stepnr, row.build
    );
    let start = db_time(&what, "start time", row.start_time)?;
    sqlx::query(
        "insert into SluiceAttempts (id, build, stepnr, machine, drvPath, startTime)
         values ($1, $2, $3, $4, $5, $6)",
    )
    .bind(row.id)
    .bind(row.build)
    .bind(row.stepnr)
    .bind(&row.machine)
    .bind(&row.drv_path)
    .bind(start)
    .execute(&mut *conn)
    .await
    .map_err(db_err(&what))?;
    Ok(())
}

/// Forgets the attempt of step `stepnr` of `build`, if any.
pub async fn forget_attempt(
    conn: &mut PgConnection,
    build: i32,
    stepnr: i32,
) -> Result<(), ResultsError> {
    sqlx::query("delete from SluiceAttempts where build = $1 and stepnr = $2")
        .bind(build)
        .bind(stepnr)
        .execute(&mut *conn)
        .await
        .map_err(db_err(&format!(
            "forgetting the attempt of step {stepnr} of build {build}"
        )))?;
    Ok(())
}

/// The attempts whose step rows are still busy: what agents may still be
/// running. Rows of steps that are no longer busy are deleted.
pub async fn attempts_in_progress(
    conn: &mut PgConnection,
) -> Result<Vec<AttemptRow>, ResultsError> {
    let what = "reading the attempts a previous run left in progress";
    sqlx::query(
        "delete from SluiceAttempts a using BuildSteps s
         where s.build = a.build and s.stepnr = a.stepnr and s.busy = 0",
    )
    .execute(&mut *conn)
    .await
    .map_err(db_err(what))?;
    let rows: Vec<(Uuid, i32, i32, String, String, i32)> = sqlx::query_as(
        "select a.id, a.build, a.stepnr, a.machine, a.drvPath, a.startTime
         from SluiceAttempts a join BuildSteps s on s.build = a.build and s.stepnr = a.stepnr
         where s.busy != 0
         order by a.build, a.stepnr",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(db_err(what))?;
    Ok(rows
        .into_iter()
        .map(|(id, build, stepnr, machine, drv_path, start)| AttemptRow {
            id,
            build,
            stepnr,
            machine,
            drv_path,
            start_time: i64::from(start),
        })
        .collect())
}
