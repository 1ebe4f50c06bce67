//! `SluiceRealisations`: the output paths of content-addressed and
//! deferred derivations' outputs, keyed as Nix's `DrvOutput` (hash modulo
//! and output name).
//!
//! Invariants: a realisation, once recorded, never changes (a later one
//! for the same key is ignored, as Nix ignores it); every read is a point
//! query on the primary key, one round trip for any number of keys.

use std::collections::HashMap;

use sqlx::PgConnection;

use super::{db_err, ResultsError};

/// One built output of a derivation whose output paths are not static.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Realisation {
    /// The derivation's hash modulo with outputs masked, `sha256:<base16>`.
    pub drv_hash: String,
    pub output: String,
    pub out_path: String,
    /// The derivation whose build recorded it.
    pub drv_path: String,
}

/// Records `realisations`; one already recorded for a key is kept.
pub async fn record_realisations(
    conn: &mut PgConnection,
    realisations: &[Realisation],
) -> Result<(), ResultsError> {
    if realisations.is_empty() {
        return Ok(());
    }
    let column =
        |f: fn(&Realisation) -> &str| -> Vec<&str> { realisations.iter().map(f).collect() };
    sqlx::query(
        "insert into SluiceRealisations (drvHash, outputName, outPath, drvPath)
         select * from unnest($1::text[], $2::text[], $3::text[], $4::text[])
         on conflict (drvHash, outputName) do nothing",
    )
    .bind(column(|r| &r.drv_hash))
    .bind(column(|r| &r.output))
    .bind(column(|r| &r.out_path))
    .bind(column(|r| &r.drv_path))
    .execute(&mut *conn)
    .await
    .map_err(db_err("recording realisations"))?;
    Ok(())
}

/// The recorded output paths of `keys` (hash, output name); keys nobody
/// recorded are absent.
pub async fn lookup_realisations(
    conn: &mut PgConnection,
    keys: &[(String, String)],
) -> Result<HashMap<(String, String), String>, ResultsError> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let (hashes, outputs): (Vec<&str>, Vec<&str>) =
        keys.iter().map(|(h, o)| (h.as_str(), o.as_str())).unzip();
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "select r.drvHash, r.outputName, r.outPath
         from unnest($1::text[], $2::text[]) as k(drvHash, outputName)
         join SluiceRealisations r using (drvHash, outputName)",
    )
    .bind(hashes)
    .bind(outputs)
    .fetch_all(&mut *conn)
    .await
    .map_err(db_err("looking realisations up"))?;
    Ok(rows.into_iter().map(|(h, o, p)| ((h, o), p)).collect())
}

/// Records, under `build`, that its step for `drv_path` was resolved into
/// `resolved_drv` (a base name): a finished row with status 13 and
/// `resolvedDrvPath`, with its outputs (paths unknown yet). A row already
/// recording this resolution under `build` is kept (a restart resolving
/// again adds none). Returns the row's `stepnr`.
pub async fn record_resolution(
    conn: &mut PgConnection,
    row: &super::StepRow,
    resolved_drv: &str,
    time: i64,
) -> Result<i32, ResultsError> {
    use sqlx::Connection;
    let what = format!(
        "recording the resolution of {} under build {}",
        row.drv_path, row.build
    );
    let mut tx = conn.begin().await.map_err(db_err(&what))?;
    let existing: Option<i32> = sqlx::query_scalar(
        "select stepnr from BuildSteps where drvPath = $1 and build = $2 and status = 13
         order by stepnr limit 1",
    )
    .bind(&row.drv_path)
    .bind(row.build)
    .fetch_optional(&mut *tx)
    .await
    .map_err(db_err(&what))?;
    let stepnr = match existing {
        Some(stepnr) => stepnr,
        None => {
            let stepnr = super::create_step(&mut tx, row).await?;
            super::mark_step_resolved(&mut tx, row.build, stepnr, resolved_drv, time).await?;
            stepnr
        }
    };
    tx.commit().await.map_err(db_err(&what))?;
    Ok(stepnr)
}

/// Sets the output paths of every status-13 row of `drv_path` (in any
/// build): its resolved derivation was built, with these outputs.
pub async fn record_resolved_outputs(
    conn: &mut PgConnection,
    drv_path: &str,
    outputs: &[(String, String)],
) -> Result<(), ResultsError> {
    if outputs.is_empty() {
        return Ok(());
    }
    let (names, paths): (Vec<&str>, Vec<&str>) = outputs
        .iter()
        .map(|(n, p)| (n.as_str(), p.as_str()))
        .unzip();
    sqlx::query(
        "insert into BuildStepOutputs (build, stepnr, name, path)
         select s.build, s.stepnr, u.name, u.path
         from BuildSteps s, unnest($2::text[], $3::text[]) as u(name, path)
         where s.drvPath = $1 and s.status = 13
         on conflict (build, stepnr, name) do update set path = excluded.path",
    )
    .bind(drv_path)
    .bind(names)
    .bind(paths)
    .execute(&mut *conn)
    .await
    .map_err(db_err("recording the outputs of resolved steps"))?;
    Ok(())
}
