//! `SluiceAttempts`: which attempt (the id its agent knows) each busy step
//! row belongs to, so that a restarted queue runner can adopt the attempts
//! agents still run rather than abort them.
//!
//! Invariant: a row exists from the transaction that creates its busy
//! `BuildSteps` row to the one that finishes it; [`forget_attempts`] runs in the
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
    record_attempts(conn, &[row]).await
}

/// Records attempts, in one statement.
pub async fn record_attempts(
    conn: &mut PgConnection,
    rows: &[&AttemptRow],
) -> Result<(), ResultsError> {
    let what = match rows {
        [] => return Ok(()),
        [row] => format!(
            "recording the attempt of step {} of build {}",
            row.stepnr, row.build
        ),
        many => format!("recording {} attempts", many.len()),
    };
    let starts = rows
        .iter()
        .map(|row| db_time(&what, "start time", row.start_time))
        .collect::<Result<Vec<i32>, _>>()?;
    sqlx::query(
        "insert into SluiceAttempts (id, build, stepnr, machine, drvPath, startTime)
         select * from unnest($1::uuid[], $2::int4[], $3::int4[], $4::text[], $5::text[],
                              $6::int4[])",
    )
    .bind(rows.iter().map(|r| r.id).collect::<Vec<Uuid>>())
    .bind(rows.iter().map(|r| r.build).collect::<Vec<i32>>())
    .bind(rows.iter().map(|r| r.stepnr).collect::<Vec<i32>>())
    .bind(rows.iter().map(|r| r.machine.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.drv_path.as_str()).collect::<Vec<_>>())
    .bind(starts)
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
    forget_attempts(conn, &[(build, stepnr)]).await
}

/// Forgets the attempts of steps `(build, stepnr)`, those that exist, in
/// one statement.
pub async fn forget_attempts(
    conn: &mut PgConnection,
    steps: &[(i32, i32)],
) -> Result<(), ResultsError> {
    let what = match steps {
        [] => return Ok(()),
        [(build, stepnr)] => format!("forgetting the attempt of step {stepnr} of build {build}"),
        many => format!("forgetting {} attempts", many.len()),
    };
    sqlx::query(
        "delete from SluiceAttempts a
         using unnest($1::int4[], $2::int4[]) as u(build, stepnr)
         where a.build = u.build and a.stepnr = u.stepnr",
    )
    .bind(steps.iter().map(|s| s.0).collect::<Vec<i32>>())
    .bind(steps.iter().map(|s| s.1).collect::<Vec<i32>>())
    .execute(&mut *conn)
    .await
    .map_err(db_err(&what))?;
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
