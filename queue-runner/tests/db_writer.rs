//! The ordered writer against a real PostgreSQL: writes that queue while
//! it is busy commit together (group commit), and a write the database
//! refuses for good costs only itself, never the writes it was batched
//! with. And the build times it records for critical-path order.

#[path = "db_results/common.rs"]
mod common;

use common::*;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use sluice_queue_runner::agents::AttemptId;
use sluice_queue_runner::driver::writer::{OnCommit, WriteJob, Writer};
use sluice_queue_runner::driver::DriverEvent;
use sluice_queue_runner::grpc::{LocalStore, StoreConnection};
use sluice_queue_runner::store::Store;
use sqlx::PgPool;
use tempfile::TempDir;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// A writer on `pool` with a queue of 64, and what it needs kept while it
/// runs (its data directory, the driver's inbox). Its store has no daemon:
/// the writes these tests make (step rows, phases, finished steps, aborted
/// builds) never read the store.
fn spawn_writer(
    pool: &PgPool,
) -> (
    mpsc::Sender<WriteJob>,
    JoinHandle<()>,
    (TempDir, mpsc::Receiver<DriverEvent>),
) {
    let data_dir = tempfile::tempdir().expect("data dir");
    let store = Store::new(LocalStore::new(
        StoreConnection::Socket(data_dir.path().join("no-daemon")),
        1,
    ));
    let (events, events_rx) = mpsc::channel(16);
    let (writer, task, _in_flight) = Writer::spawn(
        pool.clone(),
        store,
        data_dir.path().to_path_buf(),
        events,
        64,
    );
    (writer, task, (data_dir, events_rx))
}

fn create_step(build: i32) -> (WriteJob, oneshot::Receiver<Result<i32, String>>) {
    let (reply, answer) = oneshot::channel();
    let job = WriteJob::CreateStep {
        attempt: AttemptId::new(),
        build,
        drv_path: DRV.into(),
        system: "x86_64-linux".into(),
        machine: "m".into(),
        outputs: BTreeMap::new(),
        start_time: 1_700_000_000,
        first_for_build: false,
        resolutions: Vec::new(),
        reply,
    };
    (job, answer)
}

#[tokio::test(flavor = "current_thread")]
async fn a_write_refused_in_a_batch_costs_only_itself() {
    let (_pg, pool) = database().await;
    let build = queue_build(&pool, "a", &[("out", Some(OUT))]).await;
    let (writer, task, _kept) = spawn_writer(&pool);
    // Queued before the writer task first runs (one thread, no await
    // yet): it takes them as one batch.
    let (first, first_answer) = create_step(build);
    let (bad, bad_answer) = create_step(build + 1000);
    let (second, second_answer) = create_step(build);
    let after = Arc::new(AtomicBool::new(false));
    let ran = after.clone();
    for job in [
        first,
        bad,
        second,
        WriteJob::AfterCommit(OnCommit(Box::new(move || {
            ran.store(true, Ordering::SeqCst)
        }))),
    ] {
        writer.try_send(job).expect("room in the queue");
    }
    drop(writer);
    task.await
        .expect("the writer ends once its queue is drained");

    assert_eq!(first_answer.await.expect("answered"), Ok(1));
    let refused = bad_answer.await.expect("answered");
    assert!(
        refused.is_err(),
        "a step of a build that does not exist: {refused:?}"
    );
    assert_eq!(second_answer.await.expect("answered"), Ok(2));
    assert!(after.load(Ordering::SeqCst), "the action after them ran");
    let rows: Vec<i32> =
        sqlx::query_scalar("select stepnr from BuildSteps where build = $1 order by stepnr")
            .bind(build)
            .fetch_all(&pool)
            .await
            .expect("rows");
    assert_eq!(rows, [1, 2]);
}

#[tokio::test]
async fn build_times_are_a_moving_average_per_name_read_by_point_queries() {
    use sluice_queue_runner::db::results::{lookup_build_times, record_build_time};
    let (_pg, pool) = database().await;
    let mut conn = pool.acquire().await.expect("connection");
    record_build_time(&mut conn, "hello", 4000)
        .await
        .expect("record");
    record_build_time(&mut conn, "hello", 8000)
        .await
        .expect("record");
    record_build_time(&mut conn, "gcc", 600_000)
        .await
        .expect("record");
    let times = lookup_build_times(&mut conn, &["hello", "gcc", "never-built"])
        .await
        .expect("lookup");
    // The second time weighs a quarter.
    assert_eq!(times.get("hello"), Some(&5000));
    assert_eq!(times.get("gcc"), Some(&600_000));
    assert_eq!(times.get("never-built"), None);
    // More names than one query sends: every chunk is asked.
    let many: Vec<String> = (0..9000).map(|i| format!("unknown-{i}")).collect();
    let mut names: Vec<&str> = many.iter().map(String::as_str).collect();
    names.insert(5000, "gcc");
    names.push("hello");
    let times = lookup_build_times(&mut conn, &names).await.expect("lookup");
    assert_eq!(times.len(), 2);
    assert_eq!(times.get("gcc"), Some(&600_000));
    assert_eq!(times.get("hello"), Some(&5000));
}

fn finish_step(build: i32, stepnr: i32, build_ms: u64) -> WriteJob {
    use sluice_queue_runner::agents::{FailureKind, StepReport};
    use sluice_queue_runner::db::results::StepRun;
    WriteJob::FinishStep {
        build: sluice_core::BuildId(build),
        stepnr,
        drv_path: DRV.into(),
        machine: "m".into(),
        report: StepReport {
            status: 0,
            error_msg: String::new(),
            times_built: 1,
            is_non_deterministic: false,
            start_time: 1_700_000_000,
            stop_time: 1_700_000_010,
            outputs: vec![("out".into(), OUT.into())],
            overhead_ms: 0,
            failure: FailureKind::None,
            run: Some(StepRun {
                exit_code: Some(0),
                build_ms,
                ..StepRun::default()
            }),
        },
        failed_paths: Vec::new(),
        realisations: Vec::new(),
        resolved_from: Vec::new(),
    }
}

/// Writes of every common kind, queued together so that they commit as one
/// batch (written kind by kind, a few statements each), leave the rows and
/// send the notifications, in order, that they would one by one.
#[tokio::test(flavor = "current_thread")]
async fn a_mixed_batch_writes_what_its_writes_would_one_by_one() {
    use sqlx::postgres::PgListener;
    let (pg, pool) = database().await;
    let a = queue_build(&pool, "a", &[("out", Some(OUT))]).await;
    let b = queue_build(&pool, "b", &[("out", Some(OUT))]).await;
    let c = queue_build(&pool, "c", &[("out", Some(OUT))]).await;
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
    let (writer, task, _kept) = spawn_writer(&pool);
    let (mut first_a, first_a_answer) = create_step(a);
    if let WriteJob::CreateStep {
        first_for_build, ..
    } = &mut first_a
    {
        *first_for_build = true;
    }
    let (first_b, first_b_answer) = create_step(b);
    let (second_a, second_a_answer) = create_step(a);
    let jobs = [
        first_a,
        first_b,
        second_a,
        WriteJob::Phase {
            build: sluice_core::BuildId(b),
            stepnr: 1,
            busy: 30,
        },
        // The numbers the creates above are given: steps of one build
        // are numbered in the batch's order.
        finish_step(a, 1, 4000),
        finish_step(a, 2, 8000),
        WriteJob::AbortBuild {
            build: c,
            drv_path: DRV.into(),
            error: "unreadable".into(),
            time: 1_700_000_020,
        },
    ];
    for job in jobs {
        writer.try_send(job).expect("room in the queue");
    }
    drop(writer);
    task.await.expect("the writer drains its queue");
    assert_eq!(first_a_answer.await.expect("answered"), Ok(1));
    assert_eq!(first_b_answer.await.expect("answered"), Ok(1));
    assert_eq!(second_a_answer.await.expect("answered"), Ok(2));

    let steps: Vec<(i32, i32, i32, Option<i32>)> =
        sqlx::query_as("select build, stepnr, busy, status from BuildSteps order by build, stepnr")
            .fetch_all(&pool)
            .await
            .expect("steps");
    assert_eq!(
        steps,
        [
            (a, 1, 0, Some(0)),
            (a, 2, 0, Some(0)),
            (b, 1, 30, None),
            (c, 1, 0, Some(3)),
        ]
    );
    let outputs: Vec<(i32, i32, Option<String>)> =
        sqlx::query_as("select build, stepnr, path from BuildStepOutputs order by build, stepnr")
            .fetch_all(&pool)
            .await
            .expect("outputs");
    assert_eq!(
        outputs,
        [(a, 1, Some(OUT.to_string())), (a, 2, Some(OUT.to_string()))]
    );
    let attempts: Vec<(i32, i32)> = sqlx::query_as("select build, stepnr from SluiceAttempts")
        .fetch_all(&pool)
        .await
        .expect("attempts");
    assert_eq!(attempts, [(b, 1)], "finished steps forget their attempts");
    let runs: Vec<(i32, i32, i64)> =
        sqlx::query_as("select build, stepnr, buildMs from SluiceStepRuns order by stepnr")
            .fetch_all(&pool)
            .await
            .expect("runs");
    assert_eq!(runs, [(a, 1, 4000), (a, 2, 8000)]);
    // Two samples of one name in one batch: as if recorded one by one.
    let times: Vec<(String, i64, i32)> =
        sqlx::query_as("select name, avgMs, samples from SluiceBuildTimes")
            .fetch_all(&pool)
            .await
            .expect("times");
    assert_eq!(times, [("hello".to_string(), 5000, 2)]);
    let finished: Vec<(i32, i32, Option<i32>)> =
        sqlx::query_as("select id, finished, buildStatus from Builds order by id")
            .fetch_all(&pool)
            .await
            .expect("builds");
    assert_eq!(finished, [(a, 0, None), (b, 0, None), (c, 1, Some(3))]);

    let mut seen = Vec::new();
    for _ in 0..7 {
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), listener.recv())
            .await
            .expect("a notification within 10s")
            .expect("recv");
        seen.push((n.channel().to_string(), n.payload().to_string()));
    }
    let expected = [
        ("build_started", format!("{a}")),
        ("step_started", format!("{a}\t1")),
        ("step_started", format!("{b}\t1")),
        ("step_started", format!("{a}\t2")),
        ("step_finished", format!("{a}\t1\t-")),
        ("step_finished", format!("{a}\t2\t-")),
        ("build_finished", format!("{c}")),
    ]
    .map(|(c, p)| (c.to_string(), p));
    assert_eq!(seen, expected);
}
