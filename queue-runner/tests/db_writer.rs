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
use sluice_queue_runner::grpc::{LocalStore, StoreConnection};
use sluice_queue_runner::store::Store;
use tokio::sync::{mpsc, oneshot};

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
    let data_dir = tempfile::tempdir().expect("data dir");
    // Step rows never touch the store.
    let store = Store::new(LocalStore::new(
        StoreConnection::Socket(data_dir.path().join("no-daemon")),
        1,
    ));
    let (events, _events_rx) = mpsc::channel(16);
    let (writer, task) = Writer::spawn(
        pool.clone(),
        store,
        data_dir.path().to_path_buf(),
        events,
        64,
    );
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
}
