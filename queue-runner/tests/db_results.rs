//! The queue runner's reads and writes of Hydra's tables, against a real
//! PostgreSQL: ingestion of queued builds, step rows under concurrency,
//! finishing builds with every column the contract names, FailedPaths,
//! the start-up clean-up of busy steps, and the notifications a listener
//! receives.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sluice_core::Status;
use sluice_queue_runner::db::migrate;
use sluice_queue_runner::db::notify::{self, MAX_PAYLOAD_BYTES};
use sluice_queue_runner::db::queue::{self, QueuedBuild};
use sluice_queue_runner::db::results::{
    self, BuildFailure, BuildFinish, BuildOutcome, ResultsError, StepKind, StepPhase, StepResult,
    StepRow, StepState,
};
use sluice_queue_runner::nix_support::{BuildMetric, BuildProduct, RegularFile};
use sluice_test_support::pg::TestPg;
use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool, Row};

const DRV: &str = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-hello.drv";
const OUT: &str = "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-hello";
const DOC: &str = "/nix/store/cccccccccccccccccccccccccccccccc-hello-doc";
const QUEUED_AT: i32 = 1_700_000_000;

/// `(build, stepnr, busy, status, stopTime, errorMsg)`
type StepSummary = (i32, i32, i32, Option<i32>, Option<i32>, Option<String>);
/// `(id, finished, buildStatus, startTime, stopTime, isCachedBuild,
/// notificationPendingSince)`
type BuildSummary = (
    i32,
    i32,
    Option<i32>,
    Option<i32>,
    Option<i32>,
    Option<i32>,
    Option<i32>,
);
/// `BuildProducts` from `productnr` on.
type ProductRow = (
    i32,
    String,
    String,
    Option<i64>,
    Option<String>,
    Option<String>,
    String,
    Option<String>,
);
/// `(name, unit, value, project, jobset, job, timestamp)`
type MetricRow = (String, Option<String>, f64, String, String, String, i32);

/// A migrated database with a user, project `p` and jobset `j`, and a pool.
async fn database() -> (TestPg, PgPool) {
    let pg = TestPg::start();
    let mut conn = PgConnection::connect(&pg.url()).await.expect("connect");
    migrate::migrate(&mut conn).await.expect("migrate");
    sqlx::raw_sql(
        "insert into Users (userName, emailAddress, password) values ('alice', 'a@example.org', '!');
         insert into Projects (name, displayName, owner) values ('p', 'P', 'alice');
         insert into Jobsets (project, name, emailOverride, nixExprInput, nixExprPath, type, schedulingShares)
           values ('p', 'j', '', 'src', 'release.nix', 0, 42);",
    )
    .execute(&mut conn)
    .await
    .expect("project and jobset");
    let pool = PgPoolOptions::new()
        .max_connections(40)
        .connect(&pg.url())
        .await
        .expect("pool");
    (pg, pool)
}

/// Queues a build the way the evaluator does: the row and its outputs.
async fn queue_build(pool: &PgPool, job: &str, outputs: &[(&str, Option<&str>)]) -> i32 {
    let mut tx = pool.begin().await.expect("begin");
    let id: i32 = sqlx::query_scalar(
        "insert into Builds (finished, timestamp, jobset_id, job, nixName, drvPath, system,
                             priority, globalPriority)
         select 0, $1, id, $2, $2 || '-1.0', $3, 'x86_64-linux', 5, 7 from Jobsets where name = 'j'
         returning id",
    )
    .bind(QUEUED_AT)
    .bind(job)
    .bind(DRV)
    .fetch_one(&mut *tx)
    .await
    .expect("build");
    for (name, path) in outputs {
        sqlx::query("insert into BuildOutputs (build, name, path) values ($1, $2, $3)")
            .bind(id)
            .bind(name)
            .bind(path)
            .execute(&mut *tx)
            .await
            .expect("output");
    }
    tx.commit().await.expect("commit");
    id
}

fn busy_step(build: i32) -> StepRow {
    StepRow {
        build,
        step_type: StepKind::Build,
        drv_path: DRV.into(),
        system: "x86_64-linux".into(),
        machine: "builder-1".into(),
        state: StepState::Busy(StepPhase::Preparing),
        error_msg: None,
        start_time: Some(i64::from(QUEUED_AT) + 10),
        stop_time: None,
        propagated_from: None,
        outputs: vec![("out".into(), Some(OUT.into())), ("doc".into(), None)],
    }
}

// ---------------------------------------------------------------- ingestion

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
        .expect("load");
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
        .expect("page");
    assert_eq!(first_page.iter().map(|b| b.id).collect::<Vec<_>>(), [a]);
    assert!(queue::load_builds_after(&mut conn, b, 100)
        .await
        .expect("nothing new")
        .is_empty());
    let c = queue_build(&pool, "c", &[]).await;
    let new = queue::load_builds_after(&mut conn, b, 100)
        .await
        .expect("new");
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
        .expect("by ids");
    assert_eq!(restarted.len(), 1);
    assert_eq!(restarted.first().map(|b| b.job.as_str()), Some("done"));
    assert!(queue::load_builds_by_ids(&mut conn, &[])
        .await
        .expect("none")
        .is_empty());
}

// -------------------------------------------------------------------- steps

async fn stepnrs(pool: &PgPool, build: i32) -> Vec<i32> {
    sqlx::query_scalar("select stepnr from BuildSteps where build = $1 order by stepnr")
        .bind(build)
        .fetch_all(pool)
        .await
        .expect("stepnrs")
}

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
    };
    results::finish_step(&mut conn, build, stepnr, &result)
        .await
        .expect("finish");
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

fn product_file() -> BuildProduct {
    BuildProduct {
        kind: "file".into(),
        subtype: "binary-dist".into(),
        path: format!("{OUT}/dist/hello 1.0.tar.gz"),
        name: "hello 1.0.tar.gz".into(),
        default_path: String::new(),
        file: Some(RegularFile {
            size: 1234,
            sha256: [0xab; 32],
        }),
    }
}

fn product_dir() -> BuildProduct {
    BuildProduct {
        kind: "doc".into(),
        subtype: "manual".into(),
        path: DOC.into(),
        name: String::new(),
        default_path: "index.html".into(),
        file: None,
    }
}

fn success(build: i32) -> BuildFinish {
    BuildFinish {
        build,
        status: Status::FailedWithOutput,
        start_time: i64::from(QUEUED_AT) + 60,
        stop_time: i64::from(QUEUED_AT) + 120,
        is_cached: false,
        size: 5_000_000_000,
        closure_size: 7_000_000_000,
        release_name: Some("hello-1.0".into()),
        outputs: vec![("out".into(), OUT.into()), ("doc".into(), DOC.into())],
        products: vec![product_file(), product_dir()],
        metrics: vec![
            BuildMetric {
                name: "time".into(),
                value: 1.5,
                unit: Some("s".into()),
            },
            BuildMetric {
                name: "count".into(),
                value: 3.0,
                unit: None,
            },
            BuildMetric {
                name: "time".into(),
                value: 2.5,
                unit: Some("s".into()),
            },
        ],
    }
}

#[tokio::test]
async fn a_successful_build_gets_every_column_the_contract_names() {
    let (_pg, pool) = database().await;
    let mut conn = pool.acquire().await.expect("connection");
    let build = queue_build(&pool, "a", &[("out", Some(OUT)), ("doc", None)]).await;
    let untouched = queue_build(&pool, "b", &[("out", None)]).await;

    assert!(results::finish_build_success(&mut conn, &success(build))
        .await
        .expect("finish"));

    let row = sqlx::query(
        "select finished, buildStatus, startTime, stopTime, isCachedBuild, size, closureSize,
                releaseName, notificationPendingSince
         from Builds where id = $1",
    )
    .bind(build)
    .fetch_one(&pool)
    .await
    .expect("build");
    assert_eq!(row.get::<i32, _>("finished"), 1);
    assert_eq!(row.get::<Option<i32>, _>("buildstatus"), Some(6));
    assert_eq!(row.get::<Option<i32>, _>("starttime"), Some(QUEUED_AT + 60));
    assert_eq!(row.get::<Option<i32>, _>("stoptime"), Some(QUEUED_AT + 120));
    assert_eq!(row.get::<Option<i32>, _>("iscachedbuild"), Some(0));
    assert_eq!(row.get::<Option<i64>, _>("size"), Some(5_000_000_000));
    assert_eq!(
        row.get::<Option<i64>, _>("closuresize"),
        Some(7_000_000_000)
    );
    assert_eq!(
        row.get::<Option<String>, _>("releasename").as_deref(),
        Some("hello-1.0")
    );
    assert_eq!(
        row.get::<Option<i32>, _>("notificationpendingsince"),
        Some(QUEUED_AT + 120)
    );

    let outputs: Vec<(String, Option<String>)> =
        sqlx::query_as("select name, path from BuildOutputs where build = $1 order by name")
            .bind(build)
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

    let products: Vec<ProductRow> = sqlx::query_as(
        "select productnr, type, subtype, fileSize, sha256hash, path, name, defaultPath
             from BuildProducts where build = $1 order by productnr",
    )
    .bind(build)
    .fetch_all(&pool)
    .await
    .expect("products");
    assert_eq!(
        products,
        [
            (
                1,
                "file".to_string(),
                "binary-dist".to_string(),
                Some(1234),
                Some("ab".repeat(32)),
                Some(format!("{OUT}/dist/hello 1.0.tar.gz")),
                "hello 1.0.tar.gz".to_string(),
                Some(String::new()),
            ),
            (
                2,
                "doc".to_string(),
                "manual".to_string(),
                None,
                None,
                Some(DOC.to_string()),
                String::new(),
                Some("index.html".to_string()),
            ),
        ]
    );

    let metrics: Vec<MetricRow> = sqlx::query_as(
        "select name, unit, value, project, jobset, job, timestamp
         from BuildMetrics where build = $1 order by name",
    )
    .bind(build)
    .fetch_all(&pool)
    .await
    .expect("metrics");
    assert_eq!(
        metrics,
        [
            (
                "count".into(),
                None,
                3.0,
                "p".into(),
                "j".into(),
                "a".into(),
                QUEUED_AT
            ),
            (
                "time".into(),
                Some("s".into()),
                2.5,
                "p".into(),
                "j".into(),
                "a".into(),
                QUEUED_AT
            ),
        ]
    );

    // Nothing else was touched.
    let other: (i32, Option<String>) = sqlx::query_as(
        "select b.finished, o.path from Builds b join BuildOutputs o on o.build = b.id where b.id = $1",
    )
    .bind(untouched)
    .fetch_one(&pool)
    .await
    .expect("other build");
    assert_eq!(other, (0, None));

    // Finishing it again does nothing.
    let mut again = success(build);
    again.release_name = Some("other".into());
    assert!(!results::finish_build_success(&mut conn, &again)
        .await
        .expect("again"));
    let name: Option<String> = sqlx::query_scalar("select releaseName from Builds where id = $1")
        .bind(build)
        .fetch_one(&pool)
        .await
        .expect("name");
    assert_eq!(name.as_deref(), Some("hello-1.0"));

    // After a restart, finishing replaces products and metrics.
    sqlx::query("update Builds set finished = 0 where id = $1")
        .bind(build)
        .execute(&pool)
        .await
        .expect("restart");
    let mut rebuilt = success(build);
    rebuilt.status = Status::Success;
    rebuilt.is_cached = true;
    rebuilt.products = vec![product_dir()];
    rebuilt.metrics = Vec::new();
    assert!(results::finish_build_success(&mut conn, &rebuilt)
        .await
        .expect("rebuilt"));
    let counts: (i64, i64) = sqlx::query_as(
        "select (select count(*) from BuildProducts where build = $1),
                (select count(*) from BuildMetrics where build = $1)",
    )
    .bind(build)
    .fetch_one(&pool)
    .await
    .expect("counts");
    assert_eq!(counts, (1, 0));
    let productnr: i32 = sqlx::query_scalar("select productnr from BuildProducts where build = $1")
        .bind(build)
        .fetch_one(&pool)
        .await
        .expect("productnr");
    assert_eq!(productnr, 1);
    let (status, cached): (Option<i32>, Option<i32>) =
        sqlx::query_as("select buildStatus, isCachedBuild from Builds where id = $1")
            .bind(build)
            .fetch_one(&pool)
            .await
            .expect("status");
    assert_eq!((status, cached), (Some(0), Some(1)));
}

#[tokio::test]
async fn the_finished_constraint_is_checked_before_writing() {
    let (_pg, pool) = database().await;
    let mut conn = pool.acquire().await.expect("connection");
    let build = queue_build(&pool, "a", &[("out", Some(OUT))]).await;
    let mut zero_start = success(build);
    zero_start.start_time = 0;
    assert!(matches!(
        results::finish_build_success(&mut conn, &zero_start).await,
        Err(ResultsError::Invalid { .. })
    ));
    assert!(matches!(
        results::finish_build_failure(&mut conn, build, Status::Failed, 1, 0, false).await,
        Err(ResultsError::Invalid { .. })
    ));
    let mut not_success = success(build);
    not_success.status = Status::Failed;
    assert!(matches!(
        results::finish_build_success(&mut conn, &not_success).await,
        Err(ResultsError::Invalid { .. })
    ));
    for status in [
        Status::Success,
        Status::FailedWithOutput,
        Status::CachedFailure,
        Status::Resolved,
    ] {
        assert!(matches!(
            results::finish_build_failure(&mut conn, build, status, 1, 2, false).await,
            Err(ResultsError::Invalid { .. })
        ));
    }
    let finished: i32 = sqlx::query_scalar("select finished from Builds where id = $1")
        .bind(build)
        .fetch_one(&pool)
        .await
        .expect("finished");
    assert_eq!(finished, 0);
}

#[tokio::test]
async fn a_batch_of_finished_builds_is_one_transaction() {
    let (_pg, pool) = database().await;
    let mut conn = pool.acquire().await.expect("connection");
    let head = queue_build(&pool, "head", &[("out", Some(OUT))]).await;
    let dep = queue_build(&pool, "dep", &[("out", Some(OUT))]).await;
    let cancelled = queue_build(&pool, "cancelled", &[("out", Some(OUT))]).await;
    sqlx::query(
        "update Builds set finished = 1, buildStatus = 4, startTime = 1, stopTime = 1 where id = $1",
    )
    .bind(cancelled)
    .execute(&pool)
    .await
    .expect("cancel");
    let failure = |build, status| {
        BuildOutcome::Failed(BuildFailure {
            build,
            status,
            start_time: i64::from(QUEUED_AT) + 1,
            stop_time: i64::from(QUEUED_AT) + 2,
            is_cached: false,
        })
    };

    // An invalid member rolls back the members before it.
    let bad = [failure(head, Status::Failed), failure(dep, Status::Success)];
    assert!(results::finish_builds(&mut conn, &bad).await.is_err());
    let unfinished = queue::unfinished_build_ids(&mut conn, i32::MAX)
        .await
        .expect("ids");
    assert_eq!(unfinished, [head, dep]);

    let batch = [
        failure(head, Status::Failed),
        failure(dep, Status::DepFailed),
        failure(cancelled, Status::DepFailed),
    ];
    let finished = results::finish_builds(&mut conn, &batch)
        .await
        .expect("batch");
    assert_eq!(finished, [head, dep]);
    let rows: Vec<BuildSummary> = sqlx::query_as(
        "select id, finished, buildStatus, startTime, stopTime, isCachedBuild,
                    notificationPendingSince
             from Builds order by id",
    )
    .fetch_all(&pool)
    .await
    .expect("builds");
    let (start, stop) = (Some(QUEUED_AT + 1), Some(QUEUED_AT + 2));
    assert_eq!(
        rows,
        [
            (head, 1, Some(1), start, stop, Some(0), stop),
            (dep, 1, Some(2), start, stop, Some(0), stop),
            (cancelled, 1, Some(4), Some(1), Some(1), None, None),
        ]
    );

    // The caller's own transaction: steps, builds and notifications commit
    // together.
    let last = queue_build(&pool, "last", &[("out", Some(OUT))]).await;
    let mut tx = pool.begin().await.expect("begin");
    let stepnr = results::create_step(&mut tx, &busy_step(last))
        .await
        .expect("step");
    let finished = results::finish_builds(&mut tx, &[failure(last, Status::TimedOut)])
        .await
        .expect("in a transaction");
    assert_eq!(finished, [last]);
    tx.rollback().await.expect("rollback");
    assert_eq!(stepnrs(&pool, last).await, Vec::<i32>::new());
    assert_eq!(
        queue::unfinished_build_ids(&mut conn, i32::MAX)
            .await
            .expect("ids"),
        [last]
    );
    let _ = stepnr;
}

// -------------------------------------------------------------- FailedPaths

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

async fn next(listener: &mut PgListener) -> (String, String) {
    let n = tokio::time::timeout(Duration::from_secs(10), listener.recv())
        .await
        .expect("a notification within 10s")
        .expect("recv");
    (n.channel().to_string(), n.payload().to_string())
}

#[tokio::test]
async fn a_listener_receives_the_exact_payloads() {
    let (pg, pool) = database().await;
    let mut conn = pool.acquire().await.expect("connection");
    let mut listener = PgListener::connect(&pg.url()).await.expect("listener");
    listener
        .listen_all([
            "build_started",
            "step_started",
            "step_finished",
            "build_finished",
        ])
        .await
        .expect("listen");

    notify::build_started(&mut conn, 17)
        .await
        .expect("build_started");
    notify::step_started(&mut conn, 17, 3)
        .await
        .expect("step_started");
    notify::step_finished(&mut conn, 17, 3, None)
        .await
        .expect("step_finished without log");
    let log = Path::new("/var/lib/hydra/build-logs/aa/aaaa-hello.drv");
    notify::step_finished(&mut conn, 17, 4, Some(log))
        .await
        .expect("step_finished");
    notify::build_finished(&mut conn, 17, &[18, 19])
        .await
        .expect("build_finished");

    assert_eq!(
        next(&mut listener).await,
        ("build_started".into(), "17".into())
    );
    assert_eq!(
        next(&mut listener).await,
        ("step_started".into(), "17\t3".into())
    );
    assert_eq!(
        next(&mut listener).await,
        ("step_finished".into(), "17\t3\t-".into())
    );
    assert_eq!(
        next(&mut listener).await,
        ("step_finished".into(), format!("17\t4\t{}", log.display()))
    );
    assert_eq!(
        next(&mut listener).await,
        ("build_finished".into(), "17\t18\t19".into())
    );

    // Thousands of dependents: several notifications, each under the limit
    // and headed by the build, together listing every dependent once.
    let dependents: Vec<i32> = (1_000_000..1_003_000).collect();
    let mut tx = pool.begin().await.expect("begin");
    notify::build_finished(&mut tx, 17, &dependents)
        .await
        .expect("long build_finished");
    tx.commit().await.expect("commit");
    let expected = notify::build_finished_payloads(17, &dependents);
    assert!(expected.len() >= 3, "{}", expected.len());
    let mut seen = Vec::new();
    for want in &expected {
        let (channel, payload) = next(&mut listener).await;
        assert_eq!(channel, "build_finished");
        assert_eq!(&payload, want);
        assert!(payload.len() <= MAX_PAYLOAD_BYTES);
        let mut ids = payload.split('\t');
        assert_eq!(ids.next(), Some("17"));
        seen.extend(ids.map(|id| id.parse::<i32>().expect("id")));
    }
    assert_eq!(seen, dependents);
}

/// The driver runs these on spawned tasks, on pooled connections or inside
/// transactions: the futures must be `Send` (checked at compile time).
#[allow(dead_code)]
fn futures_are_send(pool: PgPool) {
    fn send<T: Send>(_: T) {}
    send(async move {
        let log = Path::new("/log");
        let mut conn = pool.acquire().await.expect("connection");
        let _ = results::create_step(&mut conn, &busy_step(1)).await;
        let _ = results::update_step_phase(&mut conn, 1, 1, StepPhase::Building).await;
        let _ = results::finish_build_success(&mut conn, &success(1)).await;
        let _ = results::finish_build_failure(&mut conn, 1, Status::Failed, 1, 1, false).await;
        let _ = results::insert_failed_paths(&mut conn, &[]).await;
        let _ = results::abort_busy_steps_at_startup(&mut conn, 1).await;
        let _ = queue::load_builds_after(&mut conn, 0, 1).await;
        let _ = queue::load_builds_by_ids(&mut conn, &[1]).await;
        let _ = queue::unfinished_build_ids(&mut conn, 0).await;
        let _ = notify::build_started(&mut conn, 1).await;
        let _ = notify::step_finished(&mut conn, 1, 1, Some(log)).await;
        let _ = notify::build_finished(&mut conn, 1, &[]).await;

        let mut tx = pool.begin().await.expect("begin");
        let _ = results::create_step(&mut tx, &busy_step(1)).await;
        let _ = results::finish_step(&mut tx, 1, 1, &busy_result()).await;
        let _ = results::mark_step_resolved(&mut tx, 1, 1, "x.drv", 1).await;
        let _ = results::finish_builds(&mut tx, &[]).await;
        let _ = results::insert_failed_paths(&mut tx, &[]).await;
        let _ = notify::step_started(&mut tx, 1, 1).await;
        let _ = notify::step_finished(&mut tx, 1, 1, None).await;
        let _ = notify::build_finished(&mut tx, 1, &[2]).await;
        let _ = tx.commit().await;
    });
}

fn busy_result() -> StepResult {
    StepResult {
        status: Status::Success,
        error_msg: None,
        start_time: 1,
        stop_time: 1,
        machine: String::new(),
        overhead_ms: 0,
        times_built: 0,
        is_non_deterministic: false,
        outputs: Vec::new(),
    }
}
