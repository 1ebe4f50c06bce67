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
    let finished = finish_builds(conn, &[BuildOutcome::Succeeded(finish.clone())]).await?;
    Ok(!finished.is_empty())
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
    let finished = finish_builds(conn, &[BuildOutcome::Failed(failure)]).await?;
    Ok(!finished.is_empty())
}

/// The `Builds` columns every finished build sets, checked.
struct FinishedColumns {
    build: i32,
    status: i32,
    start: i32,
    stop: i32,
    is_cached: i32,
}

impl FinishedColumns {
    fn of(outcome: &BuildOutcome) -> Result<FinishedColumns, ResultsError> {
        let (build, status, start, stop, is_cached) = match outcome {
            BuildOutcome::Succeeded(s) => {
                (s.build, s.status, s.start_time, s.stop_time, s.is_cached)
            }
            BuildOutcome::Failed(f) => (f.build, f.status, f.start_time, f.stop_time, f.is_cached),
        };
        let what = format!("finishing build {build} as {status}");
        let allowed = match outcome {
            BuildOutcome::Succeeded(_) => {
                matches!(status, Status::Success | Status::FailedWithOutput)
            }
            BuildOutcome::Failed(_) => !matches!(
                status,
                Status::Success
                    | Status::FailedWithOutput
                    | Status::CachedFailure
                    | Status::Resolved
            ),
        };
        if !allowed {
            return Err(invalid(
                &what,
                format!("status {} does not fit the outcome", status.code()),
            ));
        }
        Ok(FinishedColumns {
            build,
            status: status.code(),
            start: db_time(&what, "start time", start)?,
            stop: db_time(&what, "stop time", stop)?,
            is_cached: i32::from(is_cached),
        })
    }
}

/// Finishes a batch of builds in one transaction (a savepoint inside the
/// caller's) of a few statements, whatever the number of builds: all are
/// recorded or none. Returns the ids of the builds finished now, in the
/// order given, leaving out those that were no longer unfinished (nothing
/// is written for them). A build given twice is refused.
pub async fn finish_builds(
    conn: &mut PgConnection,
    outcomes: &[BuildOutcome],
) -> Result<Vec<i32>, ResultsError> {
    if outcomes.is_empty() {
        return Ok(Vec::new());
    }
    let what = match outcomes {
        [one] => format!("finishing build {}", one.build()),
        many => format!("finishing a batch of {} builds", many.len()),
    };
    let columns = outcomes
        .iter()
        .map(FinishedColumns::of)
        .collect::<Result<Vec<_>, _>>()?;
    let ids: std::collections::HashSet<i32> = columns.iter().map(|c| c.build).collect();
    if ids.len() != outcomes.len() {
        return Err(invalid(&what, "a build is finished twice in one batch"));
    }
    let int = |f: &dyn Fn(&FinishedColumns) -> i32| -> Vec<i32> { columns.iter().map(f).collect() };

    let mut tx = conn.begin().await.map_err(db_err(&what))?;
    // Sizes and the release name only for successes: a failure leaves
    // them as they were.
    let finished: Vec<i32> = sqlx::query_scalar(
        "update Builds b set finished = 1, buildStatus = u.status, startTime = u.startTime,
                stopTime = u.stopTime, isCachedBuild = u.isCached,
                notificationPendingSince = u.stopTime,
                size = case when u.success then u.size else b.size end,
                closureSize = case when u.success then u.closureSize else b.closureSize end,
                releaseName = case when u.success then u.releaseName else b.releaseName end
         from unnest($1::int4[], $2::int4[], $3::int4[], $4::int4[], $5::int4[], $6::bool[],
                     $7::int8[], $8::int8[], $9::text[])
              as u(id, status, startTime, stopTime, isCached, success, size, closureSize,
                   releaseName)
         where b.id = u.id and b.finished = 0
         returning b.id",
    )
    .bind(int(&|c| c.build))
    .bind(int(&|c| c.status))
    .bind(int(&|c| c.start))
    .bind(int(&|c| c.stop))
    .bind(int(&|c| c.is_cached))
    .bind(
        outcomes
            .iter()
            .map(|o| success(o).is_some())
            .collect::<Vec<bool>>(),
    )
    .bind(
        outcomes
            .iter()
            .map(|o| success(o).map(|s| db_size(s.size)))
            .collect::<Vec<Option<i64>>>(),
    )
    .bind(
        outcomes
            .iter()
            .map(|o| success(o).map(|s| db_size(s.closure_size)))
            .collect::<Vec<Option<i64>>>(),
    )
    .bind(
        outcomes
            .iter()
            .map(|o| success(o).and_then(|s| s.release_name.as_deref()))
            .collect::<Vec<Option<&str>>>(),
    )
    .fetch_all(&mut *tx)
    .await
    .map_err(db_err(&what))?;
    let now: std::collections::HashSet<i32> = finished.iter().copied().collect();
    let succeeded: Vec<&BuildFinish> = outcomes
        .iter()
        .filter_map(success)
        .filter(|s| now.contains(&s.build))
        .collect();
    if !succeeded.is_empty() {
        write_outputs(&mut tx, &succeeded, &what).await?;
        write_products(&mut tx, &succeeded, &what).await?;
        write_metrics(&mut tx, &succeeded, &what).await?;
    }
    tx.commit().await.map_err(db_err(&what))?;
    Ok(outcomes
        .iter()
        .map(BuildOutcome::build)
        .filter(|id| now.contains(id))
        .collect())
}

fn success(outcome: &BuildOutcome) -> Option<&BuildFinish> {
    match outcome {
        BuildOutcome::Succeeded(s) => Some(s),
        BuildOutcome::Failed(_) => None,
    }
}

/// Sets the paths of the `BuildOutputs` rows the evaluator inserted.
async fn write_outputs(
    conn: &mut PgConnection,
    builds: &[&BuildFinish],
    what: &str,
) -> Result<(), ResultsError> {
    let rows: Vec<(i32, &str, &str)> = builds
        .iter()
        .flat_map(|b| {
            b.outputs
                .iter()
                .map(|(n, p)| (b.build, n.as_str(), p.as_str()))
        })
        .collect();
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "update BuildOutputs o set path = u.path
         from unnest($1::int4[], $2::text[], $3::text[]) as u(build, name, path)
         where o.build = u.build and o.name = u.name",
    )
    .bind(rows.iter().map(|r| r.0).collect::<Vec<i32>>())
    .bind(rows.iter().map(|r| r.1).collect::<Vec<&str>>())
    .bind(rows.iter().map(|r| r.2).collect::<Vec<&str>>())
    .execute(&mut *conn)
    .await
    .map_err(db_err(&format!("recording the output paths of {what}")))?;
    Ok(())
}

/// Replaces the builds' products, numbered 1..n per build in the order
/// given.
async fn write_products(
    conn: &mut PgConnection,
    builds: &[&BuildFinish],
    what: &str,
) -> Result<(), ResultsError> {
    let what = format!("recording the products of {what}");
    sqlx::query("delete from BuildProducts where build = any($1::int4[])")
        .bind(builds.iter().map(|b| b.build).collect::<Vec<i32>>())
        .execute(&mut *conn)
        .await
        .map_err(db_err(&what))?;
    let mut rows: Vec<(i32, i32, &BuildProduct)> = Vec::new();
    for build in builds {
        for (i, product) in build.products.iter().enumerate() {
            let nr = i32::try_from(i + 1)
                .map_err(|_| invalid(&what, format!("{} products", build.products.len())))?;
            rows.push((build.build, nr, product));
        }
    }
    if rows.is_empty() {
        return Ok(());
    }
    let text = |f: &dyn Fn(&BuildProduct) -> &str| -> Vec<String> {
        rows.iter().map(|r| f(r.2).to_owned()).collect()
    };
    sqlx::query(
        "insert into BuildProducts (build, productnr, type, subtype, fileSize, sha256hash,
                                    path, name, defaultPath)
         select * from unnest($1::int4[], $2::int4[], $3::text[], $4::text[], $5::int8[],
                              $6::text[], $7::text[], $8::text[], $9::text[])",
    )
    .bind(rows.iter().map(|r| r.0).collect::<Vec<i32>>())
    .bind(rows.iter().map(|r| r.1).collect::<Vec<i32>>())
    .bind(text(&|p| &p.kind))
    .bind(text(&|p| &p.subtype))
    .bind(
        rows.iter()
            .map(|r| r.2.file.map(|f| db_size(f.size)))
            .collect::<Vec<Option<i64>>>(),
    )
    .bind(
        rows.iter()
            .map(|r| r.2.file.map(|f| f.sha256_hex()))
            .collect::<Vec<Option<String>>>(),
    )
    .bind(text(&|p| &p.path))
    .bind(text(&|p| &p.name))
    .bind(text(&|p| &p.default_path))
    .execute(&mut *conn)
    .await
    .map_err(db_err(&what))?;
    Ok(())
}

/// Replaces the builds' metrics (a name given twice keeps the last).
/// Metrics carry the build's project, jobset, job and queue time, copied
/// from `Builds` and `Jobsets` by the insert itself.
async fn write_metrics(
    conn: &mut PgConnection,
    builds: &[&BuildFinish],
    what: &str,
) -> Result<(), ResultsError> {
    let what = format!("recording the metrics of {what}");
    sqlx::query("delete from BuildMetrics where build = any($1::int4[])")
        .bind(builds.iter().map(|b| b.build).collect::<Vec<i32>>())
        .execute(&mut *conn)
        .await
        .map_err(db_err(&what))?;
    let mut rows: Vec<(i32, &BuildMetric)> = Vec::new();
    for build in builds {
        let by_name: BTreeMap<&str, &BuildMetric> =
            build.metrics.iter().map(|m| (m.name.as_str(), m)).collect();
        rows.extend(by_name.into_values().map(|m| (build.build, m)));
    }
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "insert into BuildMetrics (build, name, unit, value, project, jobset, job, timestamp)
         select b.id, u.name, u.unit, u.value, j.project, j.name, b.job, b.timestamp
         from unnest($1::int4[], $2::text[], $3::text[], $4::float8[])
                  as u(build, name, unit, value)
              join Builds b on b.id = u.build
              join Jobsets j on j.id = b.jobset_id",
    )
    .bind(rows.iter().map(|r| r.0).collect::<Vec<i32>>())
    .bind(
        rows.iter()
            .map(|r| r.1.name.as_str())
            .collect::<Vec<&str>>(),
    )
    .bind(
        rows.iter()
            .map(|r| r.1.unit.as_deref())
            .collect::<Vec<Option<&str>>>(),
    )
    .bind(rows.iter().map(|r| r.1.value).collect::<Vec<f64>>())
    .execute(&mut *conn)
    .await
    .map_err(db_err(&what))?;
    Ok(())
}
