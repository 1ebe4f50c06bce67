//! Finishing builds: the result columns of `Builds`, `BuildOutputs`
//! paths, `BuildProducts` and `BuildMetrics`.

use super::*;

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
