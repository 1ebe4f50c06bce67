//! The queue runner's store connections come in two pools: one for
//! control work (loading closures, preparing assignments, checking
//! results) and one for agents' NAR transfers. An agent that stalls an
//! upload holds a transfer connection, never one that dispatch needs.
//! The real driver, PostgreSQL and gRPC; a hand-driven client stands in
//! for the stalling agent.

#![allow(clippy::unwrap_used)]

#[path = "e2e/harness.rs"]
mod harness;

#[path = "raw/mod.rs"]
mod raw;

use std::time::Duration;

use harness::{Deployment, TOKEN};
use sluice_nix::derivation::Derivation;
use sluice_nix::store_path::StoreDir;
use sluice_proto::v1 as pb;

const JOBS: &str = r#"{
  a = mkDrv { PATH = "/usr/bin:/bin"; name = "a"; args = [ "-c" "echo a > $out" ]; };
  b = mkDrv { PATH = "/usr/bin:/bin"; name = "b"; args = [ "-c" "echo b > $out" ]; };
}"#;

async fn next_assignment(commands: &mut tonic::Streaming<pb::RunnerCommand>) -> pb::Assignment {
    loop {
        let command = tokio::time::timeout(Duration::from_secs(30), commands.message())
            .await
            .expect("an assignment within 30 s")
            .unwrap()
            .unwrap();
        if let Some(pb::runner_command::Command::Assign(a)) = command.command {
            return a;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_stalling_an_upload_never_stalls_dispatch() {
    // One connection in each pool: were they one pool, the stalled upload
    // would hold the only connection, and nothing more would be prepared.
    let d = Deployment::start_with(|c| {
        c.store_connections = 1;
        c.transfer_connections = 1;
    })
    .await;
    let mut client = raw::connect(format!("http://{}", d.bound.grpc), TOKEN).await;
    let system = sluice_builder_agent::host::nix_system().await;
    let (session, _events, mut commands) = raw::open_session(
        &mut client,
        pb::RegisterRequest {
            name: "staller".into(),
            systems: vec![system],
            max_jobs: 2,
            speed_factor: 1.0,
            ..Default::default()
        },
    )
    .await;

    let first = d.submit_attrs(JOBS, &["a"]).await;
    let a = next_assignment(&mut commands).await;
    let dir = StoreDir::default();
    let drv_path = dir.parse_path(&a.drv_path).unwrap();
    let drv = Derivation::parse_drv_file(&dir, &drv_path, &a.drv).unwrap();
    let (name, output) = drv.outputs.iter().next().unwrap();
    let out = output.path(&dir, &drv.name, name).unwrap().unwrap();
    // The upload's header, then nothing: the queue runner imports from a
    // stream that never ends, holding its transfer connection.
    let (parts, parts_rx) = tokio::sync::mpsc::channel(1);
    parts
        .send(pb::NarUpload {
            part: Some(pb::nar_upload::Part::Header(pb::UploadHeader {
                session_id: session.clone(),
                step_id: a.step_id.clone(),
                output_name: name.clone(),
                info: Some(pb::StorePathInfo {
                    path: dir.print(&out),
                    nar_hash: format!("sha256:{}", "0".repeat(52)),
                    nar_size: 1 << 20,
                    references: vec![],
                    deriver: a.drv_path.clone(),
                    ca: String::new(),
                }),
            })),
        })
        .await
        .unwrap();
    let mut uploader = client.clone();
    let upload = tokio::spawn(async move {
        uploader
            .upload_nar(tokio_stream::wrappers::ReceiverStream::new(parts_rx))
            .await
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!upload.is_finished(), "the upload is stalled, not refused");

    // A new build is loaded and its step prepared and assigned meanwhile.
    let second = d.submit_attrs(JOBS, &["b"]).await;
    let b = next_assignment(&mut commands).await;
    assert_ne!(a.drv_path, b.drv_path);
    assert_ne!(first, second);
    drop(parts);
    upload.abort();
    d.stop().await;
}
