//! The queue runner's writes of Hydra's tables, against a real
//! PostgreSQL: finishing builds with every column the contract names,
//! batches of finished builds, the notifications a listener receives, and
//! that the futures can run on spawned tasks.

#[path = "db_results/common.rs"]
mod common;

use common::*;

use std::path::Path;
use std::time::Duration;

use sluice_core::Status;
use sluice_queue_runner::db::notify::{self, MAX_PAYLOAD_BYTES};
use sluice_queue_runner::db::queue::{self};
use sluice_queue_runner::db::results::{
    self, BuildFailure, BuildFinish, BuildOutcome, ResultsError, StepPhase,
};
use sluice_queue_runner::nix_support::{BuildMetric, BuildProduct, RegularFile};
use sqlx::postgres::PgListener;
use sqlx::{PgPool, Row};

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
        let _ = sluice_queue_runner::db::migrate::migrate(&mut conn).await;
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
