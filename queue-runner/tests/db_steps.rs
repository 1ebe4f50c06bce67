//! The queue runner's reads and writes of Hydra's tables, against a real
//! PostgreSQL: ingestion of queued builds, step rows under concurrency,
//! steps through their phases to finished or resolved, the start-up
//! clean-up of busy steps, and FailedPaths.

#[path = "db_results/common.rs"]
mod common;

use common::*;

use std::collections::BTreeSet;
use std::sync::Arc;

use sluice_core::Status;
use sluice_queue_runner::db::queue::{self, QueuedBuild};
use sluice_queue_runner::db::results::{
    self, ResultsError, StepKind, StepPhase, StepResult, StepRow, StepState,
};
use sqlx::{PgPool, Row};

#[tokio::test]
async fn queued_builds_load_once_with_their_outputs_and_jobset() {
    let (_pg, pool) = database().await;
    let mut conn = pool.acquire().await.expect("connection");
    let a = queue_build(&pool, "a", &[("out", Some(OUT)), ("doc", None)]).await;
    let done = queue_build(&pool, "done", &[("out", Some(OUT))]).await;
    let b = queue_build(&pool, "b", &[]).await;
    sqlx::query(
        "update Builds set finished = 1, buildStatus = 0, startTime = 1, stopTime = 1 where id = $1",
    )
    .bind(done)
    .execute(&pool)
    .await
    .expect("finish one");
    sqlx::query("update Builds set maxsilent = null, timeout = -5 where id = $1")
        .bind(b)
        .execute(&pool)
        .await
        .expect("odd limits");

    let loaded = queue::load_builds_after(&mut conn, 0, 100)
        .await
        .expect("load")
        .builds;
    let ids: Vec<i32> = loaded.iter().map(|b| b.id).collect();
    assert_eq!(ids, [a, b]);
    let jobset_id: i32 = sqlx::query_scalar("select id from Jobsets where name = 'j'")
        .fetch_one(&pool)
        .await
        .expect("jobset id");
    assert_eq!(
        loaded.first(),
        Some(&QueuedBuild {
            id: a,
            jobset_id,
            project: "p".into(),
            jobset: "j".into(),
            job: "a".into(),
            nix_name: Some("a-1.0".into()),
            drv_path: DRV.into(),
            system: "x86_64-linux".into(),
            max_silent_s: 3600,
            timeout_s: 36000,
            priority: 5,
            global_priority: 7,
            timestamp: i64::from(QUEUED_AT),
            outputs: vec![("doc".into(), None), ("out".into(), Some(OUT.into()))],
            scheduling_shares: 42,
        })
    );
    let second = loaded.get(1).expect("b");
    assert_eq!((second.max_silent_s, second.timeout_s), (3600, 0));
    assert!(second.outputs.is_empty());

    // Paging by id, and nothing new after the last.
    let first_page = queue::load_builds_after(&mut conn, 0, 1)
        .await
        .expect("page")
        .builds;
    assert_eq!(first_page.iter().map(|b| b.id).collect::<Vec<_>>(), [a]);
    assert!(queue::load_builds_after(&mut conn, b, 100)
        .await
        .expect("nothing new")
        .builds
        .is_empty());
    let c = queue_build(&pool, "c", &[]).await;
    let new = queue::load_builds_after(&mut conn, b, 100)
        .await
        .expect("new")
        .builds;
    assert_eq!(new.iter().map(|b| b.id).collect::<Vec<_>>(), [c]);

    // A restarted build keeps its lower id: found by the id diff.
    sqlx::query("update Builds set finished = 0, buildStatus = null where id = $1")
        .bind(done)
        .execute(&pool)
        .await
        .expect("restart");
    let ids = queue::unfinished_build_ids(&mut conn, c)
        .await
        .expect("ids");
    assert_eq!(ids, [a, done, b, c]);
    assert_eq!(
        queue::unfinished_build_ids(&mut conn, b)
            .await
            .expect("ids"),
        [a, done, b]
    );
    let restarted = queue::load_builds_by_ids(&mut conn, &[done, 999_999])
        .await
        .expect("by ids")
        .builds;
    assert_eq!(restarted.len(), 1);
    assert_eq!(restarted.first().map(|b| b.job.as_str()), Some("done"));
    assert!(queue::load_builds_by_ids(&mut conn, &[])
        .await
        .expect("none")
        .builds
        .is_empty());
}

// -------------------------------------------------------------------- steps

#[tokio::test]
async fn concurrent_step_inserts_get_distinct_gap_free_numbers() {
    let (_pg, pool) = database().await;
    let build = queue_build(&pool, "a", &[("out", Some(OUT))]).await;
    let other = queue_build(&pool, "b", &[("out", Some(OUT))]).await;

    // Autocommit inserts through the pool, many at once, on two builds.
    let mut tasks = Vec::new();
    for i in 0..100 {
        let pool = pool.clone();
        let target = if i % 4 == 0 { other } else { build };
        tasks.push(tokio::spawn(async move {
            let mut conn = pool.acquire().await.expect("connection");
            results::create_step(&mut conn, &busy_step(target)).await
        }));
    }
    for task in tasks {
        task.await.expect("task").expect("create_step");
    }
    assert_eq!(stepnrs(&pool, build).await, (1..=75).collect::<Vec<_>>());
    assert_eq!(stepnrs(&pool, other).await, (1..=25).collect::<Vec<_>>());
    let outputs: i64 = sqlx::query_scalar("select count(*) from BuildStepOutputs where build = $1")
        .bind(build)
        .fetch_one(&pool)
        .await
        .expect("outputs");
    assert_eq!(outputs, 75 * 2);

    // Inserts inside transactions whose snapshots all overlap: each waits
    // for the row it collides with and takes the next number.
    let n = 30;
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let mut tasks = Vec::new();
    for _ in 0..n {
        let pool = pool.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let mut tx = pool.begin().await.expect("begin");
            sqlx::query("select 1")
                .execute(&mut *tx)
                .await
                .expect("snapshot");
            barrier.wait().await;
            let stepnr = results::create_step(&mut tx, &busy_step(other))
                .await
                .expect("create_step in a transaction");
            tx.commit().await.expect("commit");
            stepnr
        }));
    }
    let mut got = BTreeSet::new();
    for task in tasks {
        assert!(got.insert(task.await.expect("task")), "a stepnr twice");
    }
    assert_eq!(got, (26..=55).collect::<BTreeSet<_>>());
    assert_eq!(stepnrs(&pool, other).await, (1..=55).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_step_goes_from_busy_through_phases_to_finished() {
    let (_pg, pool) = database().await;
    let mut conn = pool.acquire().await.expect("connection");
    let build = queue_build(&pool, "a", &[("out", Some(OUT)), ("doc", None)]).await;
    let stepnr = results::create_step(&mut conn, &busy_step(build))
        .await
        .expect("create");
    assert_eq!(stepnr, 1);

    let row = sqlx::query(
        "select type, drvPath, busy, status, startTime, stopTime, machine, system, propagatedFrom
         from BuildSteps where build = $1 and stepnr = $2",
    )
    .bind(build)
    .bind(stepnr)
    .fetch_one(&pool)
    .await
    .expect("row");
    assert_eq!(row.get::<i32, _>("type"), 0);
    assert_eq!(row.get::<String, _>("drvpath"), DRV);
    assert_eq!(row.get::<i32, _>("busy"), 1);
    assert_eq!(row.get::<Option<i32>, _>("status"), None);
    assert_eq!(row.get::<Option<i32>, _>("starttime"), Some(QUEUED_AT + 10));
    assert_eq!(row.get::<Option<i32>, _>("stoptime"), None);
    assert_eq!(row.get::<String, _>("machine"), "builder-1");
    assert_eq!(
        row.get::<Option<String>, _>("system").as_deref(),
        Some("x86_64-linux")
    );
    assert_eq!(row.get::<Option<i32>, _>("propagatedfrom"), None);

    results::update_step_phase(&mut conn, build, stepnr, StepPhase::Building)
        .await
        .expect("phase");
    let busy: i32 = sqlx::query_scalar("select busy from BuildSteps where build = $1")
        .bind(build)
        .fetch_one(&pool)
        .await
        .expect("busy");
    assert_eq!(busy, 30);

    let result = StepResult {
        status: Status::Success,
        error_msg: None,
        start_time: i64::from(QUEUED_AT) + 11,
        stop_time: i64::from(QUEUED_AT) + 20,
        machine: "builder-2".into(),
        overhead_ms: 0,
        times_built: 1,
        is_non_deterministic: false,
        outputs: vec![("out".into(), OUT.into()), ("doc".into(), DOC.into())],
        run: Some(results::StepRun {
            exit_code: Some(0),
            signal: None,
            fetch_ms: 12,
            build_ms: 9000,
            upload_ms: 34,
        }),
    };
    results::finish_step(&mut conn, build, stepnr, &result)
        .await
        .expect("finish");
    // The run's exit status and timings, in the same transaction.
    let run: (Option<i32>, Option<i32>, i64, i64, i64) = sqlx::query_as(
        "select exitCode, signal, fetchMs, buildMs, uploadMs from SluiceStepRuns
         where build = $1 and stepnr = $2",
    )
    .bind(build)
    .bind(stepnr)
    .fetch_one(&pool)
    .await
    .expect("the run's row");
    assert_eq!(run, (Some(0), None, 12, 9000, 34));
    let row = sqlx::query(
        "select busy, status, errorMsg, startTime, stopTime, machine, overhead, timesBuilt,
                isNonDeterministic
         from BuildSteps where build = $1 and stepnr = $2",
    )
    .bind(build)
    .bind(stepnr)
    .fetch_one(&pool)
    .await
    .expect("row");
    assert_eq!(row.get::<i32, _>("busy"), 0);
    assert_eq!(row.get::<Option<i32>, _>("status"), Some(0));
    assert_eq!(row.get::<Option<String>, _>("errormsg"), None);
    assert_eq!(row.get::<Option<i32>, _>("starttime"), Some(QUEUED_AT + 11));
    assert_eq!(row.get::<Option<i32>, _>("stoptime"), Some(QUEUED_AT + 20));
    assert_eq!(row.get::<String, _>("machine"), "builder-2");
    assert_eq!(row.get::<Option<i32>, _>("overhead"), None);
    assert_eq!(row.get::<Option<i32>, _>("timesbuilt"), Some(1));
    assert_eq!(row.get::<Option<bool>, _>("isnondeterministic"), None);
    let outputs: Vec<(String, Option<String>)> = sqlx::query_as(
        "select name, path from BuildStepOutputs where build = $1 and stepnr = $2 order by name",
    )
    .bind(build)
    .bind(stepnr)
    .fetch_all(&pool)
    .await
    .expect("outputs");
    assert_eq!(
        outputs,
        [
            ("doc".to_string(), Some(DOC.to_string())),
            ("out".to_string(), Some(OUT.to_string()))
        ]
    );

    // A finished step has no phase any more; a missing one is named.
    assert!(matches!(
        results::update_step_phase(&mut conn, build, stepnr, StepPhase::PostProcessing).await,
        Err(ResultsError::StepNotBusy { .. })
    ));
    assert!(matches!(
        results::finish_step(&mut conn, build, 99, &result).await,
        Err(ResultsError::NoSuchStep { stepnr: 99, .. })
    ));

    // A second attempt, failed non-deterministically after two builds.
    let second = results::create_step(&mut conn, &busy_step(build))
        .await
        .expect("second attempt");
    assert_eq!(second, 2);
    let failed = StepResult {
        status: Status::NotDeterministic,
        error_msg: Some("output differs".into()),
        overhead_ms: 1500,
        times_built: 2,
        is_non_deterministic: true,
        outputs: Vec::new(),
        ..result.clone()
    };
    results::finish_step(&mut conn, build, second, &failed)
        .await
        .expect("finish failed");
    let row = sqlx::query(
        "select status, errorMsg, overhead, timesBuilt, isNonDeterministic
         from BuildSteps where build = $1 and stepnr = 2",
    )
    .bind(build)
    .fetch_one(&pool)
    .await
    .expect("row");
    assert_eq!(row.get::<Option<i32>, _>("status"), Some(12));
    assert_eq!(
        row.get::<Option<String>, _>("errormsg").as_deref(),
        Some("output differs")
    );
    assert_eq!(row.get::<Option<i32>, _>("overhead"), Some(1500));
    assert_eq!(row.get::<Option<i32>, _>("timesbuilt"), Some(2));
    assert_eq!(row.get::<Option<bool>, _>("isnondeterministic"), Some(true));
    let unset: Option<String> = sqlx::query_scalar(
        "select path from BuildStepOutputs where build = $1 and stepnr = 2 and name = 'doc'",
    )
    .bind(build)
    .fetch_one(&pool)
    .await
    .expect("floating output stays unknown");
    assert_eq!(unset, None);
}

#[tokio::test]
async fn finished_and_resolved_steps() {
    let (_pg, pool) = database().await;
    let mut conn = pool.acquire().await.expect("connection");
    let head = queue_build(&pool, "head", &[("out", Some(OUT))]).await;
    let dependent = queue_build(&pool, "dependent", &[("out", Some(OUT))]).await;

    // A propagated failure is recorded finished, with where it came from.
    let propagated = StepRow {
        state: StepState::Finished(Status::DepFailed),
        machine: String::new(),
        start_time: Some(i64::from(QUEUED_AT) + 5),
        stop_time: Some(i64::from(QUEUED_AT) + 5),
        propagated_from: Some(head),
        outputs: Vec::new(),
        ..busy_step(dependent)
    };
    let stepnr = results::create_step(&mut conn, &propagated)
        .await
        .expect("propagated");
    let row = sqlx::query(
        "select busy, status, machine, propagatedFrom, stopTime from BuildSteps
         where build = $1 and stepnr = $2",
    )
    .bind(dependent)
    .bind(stepnr)
    .fetch_one(&pool)
    .await
    .expect("row");
    assert_eq!(row.get::<i32, _>("busy"), 0);
    assert_eq!(row.get::<Option<i32>, _>("status"), Some(2));
    assert_eq!(row.get::<String, _>("machine"), "");
    assert_eq!(row.get::<Option<i32>, _>("propagatedfrom"), Some(head));
    assert_eq!(row.get::<Option<i32>, _>("stoptime"), Some(QUEUED_AT + 5));

    // A substitution step.
    let substituted = StepRow {
        step_type: StepKind::Substitution,
        state: StepState::Finished(Status::Success),
        ..propagated.clone()
    };
    let nr = results::create_step(&mut conn, &substituted)
        .await
        .expect("substitution");
    let kind: i32 =
        sqlx::query_scalar("select type from BuildSteps where build = $1 and stepnr = $2")
            .bind(dependent)
            .bind(nr)
            .fetch_one(&pool)
            .await
            .expect("type");
    assert_eq!(kind, 1);

    // Status 13 only comes with resolvedDrvPath.
    let resolved_row = StepRow {
        state: StepState::Finished(Status::Resolved),
        ..propagated.clone()
    };
    assert!(matches!(
        results::create_step(&mut conn, &resolved_row).await,
        Err(ResultsError::Invalid { .. })
    ));
    let stepnr = results::create_step(&mut conn, &busy_step(head))
        .await
        .expect("busy");
    assert!(matches!(
        results::mark_step_resolved(&mut conn, head, stepnr, "/nix/store/x.drv", 5).await,
        Err(ResultsError::Invalid { .. })
    ));
    let resolved = "dddddddddddddddddddddddddddddddd-hello.drv";
    results::mark_step_resolved(&mut conn, head, stepnr, resolved, i64::from(QUEUED_AT) + 30)
        .await
        .expect("resolved");
    let row = sqlx::query(
        "select busy, status, resolvedDrvPath, stopTime from BuildSteps where build = $1 and stepnr = $2",
    )
    .bind(head)
    .bind(stepnr)
    .fetch_one(&pool)
    .await
    .expect("row");
    assert_eq!(row.get::<i32, _>("busy"), 0);
    assert_eq!(row.get::<Option<i32>, _>("status"), Some(13));
    assert_eq!(
        row.get::<Option<String>, _>("resolveddrvpath").as_deref(),
        Some(resolved)
    );
    assert_eq!(row.get::<Option<i32>, _>("stoptime"), Some(QUEUED_AT + 30));
    let zero_time = StepRow {
        start_time: Some(0),
        ..busy_step(head)
    };
    assert!(matches!(
        results::create_step(&mut conn, &zero_time).await,
        Err(ResultsError::Invalid { .. })
    ));
}

#[tokio::test]
async fn busy_steps_of_a_previous_run_are_aborted_at_startup() {
    let (_pg, pool) = database().await;
    let mut conn = pool.acquire().await.expect("connection");
    let a = queue_build(&pool, "a", &[("out", Some(OUT))]).await;
    let b = queue_build(&pool, "b", &[("out", Some(OUT))]).await;
    for build in [a, a, b] {
        results::create_step(&mut conn, &busy_step(build))
            .await
            .expect("busy");
    }
    let done = StepRow {
        state: StepState::Finished(Status::Failed),
        error_msg: Some("builder failed".into()),
        stop_time: Some(i64::from(QUEUED_AT) + 12),
        ..busy_step(b)
    };
    let done_nr = results::create_step(&mut conn, &done).await.expect("done");
    results::update_step_phase(&mut conn, a, 2, StepPhase::ReceivingOutputs)
        .await
        .expect("phase");

    let now = i64::from(QUEUED_AT) + 100;
    let aborted = results::abort_busy_steps_at_startup(&mut conn, now)
        .await
        .expect("abort");
    assert_eq!(aborted, 3);
    let rows: Vec<StepSummary> = sqlx::query_as(
        "select build, stepnr, busy, status, stopTime, errorMsg from BuildSteps order by build, stepnr",
    )
    .fetch_all(&pool)
    .await
    .expect("rows");
    let msg = Some(results::ABORTED_AT_STARTUP_MSG.to_string());
    let stop = Some(QUEUED_AT + 100);
    assert_eq!(
        rows,
        [
            (a, 1, 0, Some(3), stop, msg.clone()),
            (a, 2, 0, Some(3), stop, msg.clone()),
            (b, 1, 0, Some(3), stop, msg.clone()),
            (
                b,
                done_nr,
                0,
                Some(1),
                Some(QUEUED_AT + 12),
                Some("builder failed".into())
            ),
        ]
    );
    assert_eq!(
        results::abort_busy_steps_at_startup(&mut conn, now)
            .await
            .expect("again"),
        0
    );
}

// ------------------------------------------------------------------- builds

async fn failed_paths(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar("select path from FailedPaths order by path")
        .fetch_all(pool)
        .await
        .expect("failed paths")
}

#[tokio::test]
async fn failed_paths_are_idempotent_even_concurrently() {
    let (_pg, pool) = database().await;
    let mut conn = pool.acquire().await.expect("connection");
    let paths: Vec<String> = (0..20)
        .map(|i| format!("/nix/store/{i:0>32}-failed"))
        .collect();

    results::insert_failed_paths(&mut conn, &[])
        .await
        .expect("none");
    let with_duplicates: Vec<String> = paths
        .iter()
        .take(5)
        .chain(paths.iter().take(5))
        .cloned()
        .collect();
    results::insert_failed_paths(&mut conn, &with_duplicates)
        .await
        .expect("duplicates in one call");
    results::insert_failed_paths(&mut conn, &with_duplicates)
        .await
        .expect("the same again");
    assert_eq!(failed_paths(&pool).await, paths.get(..5).expect("5"));

    // Many transactions inserting overlapping sets at the same moment.
    let n = 24;
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let mut tasks = Vec::new();
    for i in 0..n {
        let pool = pool.clone();
        let barrier = barrier.clone();
        let mine: Vec<String> = paths
            .iter()
            .skip(i % 7)
            .step_by(1 + i % 3)
            .cloned()
            .collect();
        tasks.push(tokio::spawn(async move {
            let mut tx = pool.begin().await.expect("begin");
            barrier.wait().await;
            results::insert_failed_paths(&mut tx, &mine)
                .await
                .expect("concurrent insert");
            tx.commit().await.expect("commit");
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    assert_eq!(failed_paths(&pool).await, paths);
}

// ------------------------------------------------------------ notifications
