//! Agents that lie or talk nonsense, against the whole queue runner (the
//! real driver, PostgreSQL and gRPC): a hand-driven client stands in for
//! the agent, so it can say what no real agent would.

#![allow(clippy::unwrap_used)]

#[path = "e2e/harness.rs"]
mod harness;

#[path = "raw/mod.rs"]
mod raw;

use std::time::Duration;

use harness::{http_get, Deployment, TOKEN};
use raw::Raw;
use sluice_proto::v1 as pb;

async fn raw_client(d: &Deployment) -> Raw {
    raw::connect(format!("http://{}", d.bound.grpc), TOKEN).await
}

/// Registers for the local system and opens the work stream.
async fn session(
    client: &mut Raw,
) -> (
    String,
    tokio::sync::mpsc::Sender<pb::AgentEvent>,
    tonic::Streaming<pb::RunnerCommand>,
) {
    let system = sluice_builder_agent::host::nix_system().await;
    let request = pb::RegisterRequest {
        name: "liar".into(),
        systems: vec![system],
        max_jobs: 1,
        speed_factor: 1.0,
        ..Default::default()
    };
    raw::open_session(client, request).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_times_from_an_agent_are_replaced_by_the_queue_runners_clock() {
    let d = Deployment::start().await;
    let mut client = raw_client(&d).await;
    let (session, _keep, mut commands) = session(&mut client).await;
    let drvs = d.env.instantiate(
        r#"{ x = mkDrv { name = "lied-about"; args = [ "-c" "echo hi > $out" ]; }; }"#,
        &["x"],
    );
    let before = sluice_queue_runner::driver::unix_now();
    let ids = d.submit(&[("x".into(), drvs[0].clone())]).await;

    let assignment = tokio::time::timeout(Duration::from_secs(30), commands.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Some(pb::runner_command::Command::Assign(assignment)) = assignment.command else {
        panic!("expected an assignment, got {assignment:?}");
    };
    client
        .report_result(pb::StepResult {
            session_id: session.clone(),
            step_id: assignment.step_id.clone(),
            status: 1,
            error_msg: "builder failed".into(),
            start_time: i64::MIN,
            stop_time: i64::MAX,
            ..Default::default()
        })
        .await
        .unwrap();

    let statuses = d.wait_finished(&ids, 30).await;
    assert_eq!(statuses[&ids[0]], 1);
    let after = sluice_queue_runner::driver::unix_now();
    let (start, stop): (i32, i32) =
        sqlx::query_as("select startTime, stopTime from BuildSteps where build = $1")
            .bind(ids[0])
            .fetch_one(&d.pool)
            .await
            .unwrap();
    let (start, stop) = (i64::from(start), i64::from(stop));
    assert!(
        before <= start && start <= stop && stop <= after,
        "{before} <= {start} <= {stop} <= {after}"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_grpc_port_leaves_the_queue_runner_serving() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let d = Deployment::start().await;
    for garbage in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0xffu8; 4096][..],
        &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x04\x01\xff\xff\xff\xff"[..],
    ] {
        let mut s = tokio::net::TcpStream::connect(d.bound.grpc).await.unwrap();
        let _ = s.write_all(garbage).await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut sink)).await;
    }
    // Still serving agents and the web UI.
    let mut client = raw_client(&d).await;
    let (_session, _keep, _commands) = session(&mut client).await;
    let status = http_get(d.bound.http, "/status").await.unwrap();
    assert!(status.contains("\"status\":\"up\""), "{status}");
    d.stop().await;
}

/// Waits for the next assignment on `commands`.
async fn next_assignment(commands: &mut tonic::Streaming<pb::RunnerCommand>) -> pb::Assignment {
    loop {
        let command = tokio::time::timeout(Duration::from_secs(30), commands.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Some(pb::runner_command::Command::Assign(a)) = command.command {
            return a;
        }
    }
}

async fn fail(client: &mut Raw, session: &str, step: &str, status: u32, kind: pb::FailureKind) {
    client
        .report_result(pb::StepResult {
            session_id: session.to_owned(),
            step_id: step.to_owned(),
            status,
            error_msg: format!("said {status} as {kind:?}"),
            failure: kind.into(),
            ..Default::default()
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_word_decides_whether_a_failure_is_retried() {
    let d = Deployment::start().await;
    let mut client = raw_client(&d).await;
    let (session, _keep, mut commands) = session(&mut client).await;
    let drvs = d.env.instantiate(
        r#"{ x = mkDrv { name = "machinery"; args = [ "-c" "echo > $out" ]; };
             y = mkDrv { name = "broken"; args = [ "-c" "echo > $out" ]; }; }"#,
        &["x", "y"],
    );
    let ids = d.submit(&[("machinery".into(), drvs[0].clone())]).await;

    // Status 1, but the machinery's fault: aborted and tried again.
    let first = next_assignment(&mut commands).await;
    fail(
        &mut client,
        &session,
        &first.step_id,
        1,
        pb::FailureKind::Infrastructure,
    )
    .await;
    let again = next_assignment(&mut commands).await;
    assert_eq!(again.drv_path, first.drv_path, "retried");
    fail(
        &mut client,
        &session,
        &again.step_id,
        1,
        pb::FailureKind::Build,
    )
    .await;
    let statuses = d.wait_finished(&ids, 30).await;
    assert_eq!(statuses[&ids[0]], 1);
    let rows: Vec<Option<i32>> =
        sqlx::query_scalar("select status from BuildSteps where build = $1 order by stepnr")
            .bind(ids[0])
            .fetch_all(&d.pool)
            .await
            .unwrap();
    assert_eq!(rows, vec![Some(3), Some(1)]);

    // Status 3, but the build's own fault: not tried again.
    let ids = d.submit(&[("broken".into(), drvs[1].clone())]).await;
    let only = next_assignment(&mut commands).await;
    fail(
        &mut client,
        &session,
        &only.step_id,
        3,
        pb::FailureKind::Build,
    )
    .await;
    let statuses = d.wait_finished(&ids, 30).await;
    assert_eq!(statuses[&ids[0]], 3);
    let steps: i64 = sqlx::query_scalar("select count(*) from BuildSteps where build = $1")
        .bind(ids[0])
        .fetch_one(&d.pool)
        .await
        .unwrap();
    assert_eq!(steps, 1, "no second attempt");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_log_that_is_not_utf8_is_cut_at_the_limit() {
    // The harness's log limit is 1 MiB.
    let d = Deployment::start().await;
    let mut client = raw_client(&d).await;
    let (session, _keep, mut commands) = session(&mut client).await;
    let drvs = d.env.instantiate(
        r#"{ x = mkDrv { name = "noisy"; args = [ "-c" "echo > $out" ]; }; }"#,
        &["x"],
    );
    let ids = d.submit(&[("noisy".into(), drvs[0].clone())]).await;
    let assignment = next_assignment(&mut commands).await;

    // 4 MiB of bytes that are no UTF-8 at all, in 64 KiB chunks.
    let chunk: Vec<u8> = (0..65_536u32).map(|i| 0x80 | (i % 0x7f) as u8).collect();
    let chunks: Vec<pb::LogChunk> = (0..64u64)
        .map(|i| pb::LogChunk {
            session_id: session.clone(),
            step_id: assignment.step_id.clone(),
            data: chunk.clone(),
            offset: i * chunk.len() as u64,
        })
        .collect();
    client.stream_log(tokio_stream::iter(chunks)).await.unwrap();
    fail(
        &mut client,
        &session,
        &assignment.step_id,
        10,
        pb::FailureKind::Build,
    )
    .await;

    let statuses = d.wait_finished(&ids, 30).await;
    assert_eq!(statuses[&ids[0]], 10);
    let log = sluice_queue_runner::logs::log_path(d.data_dir.path(), &drvs[0]).unwrap();
    let size = std::fs::metadata(&log).unwrap().len();
    assert!(size > 0 && size <= 1 << 20, "log of {size} bytes");
    // Still serving.
    let status = http_get(d.bound.http, "/status").await.unwrap();
    assert!(status.contains("\"status\":\"up\""), "{status}");
    d.stop().await;
}
