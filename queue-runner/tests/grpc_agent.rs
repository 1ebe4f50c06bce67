//! The gRPC service against real builder agents (in-process, with stores
//! of their own) and against a hand-driven client that lies: real gRPC
//! over TCP, real Nix daemons, the host's store as the queue runner's.
//!
//! The test plays the driver: it reads `FromAgent` events, registers
//! attempts and sends assignments.

mod support;

#[path = "raw/mod.rs"]
mod raw;

use std::path::Path;
use std::time::Duration;

use raw::Raw;
use sluice_nix::daemon::DaemonClient;
use sluice_proto::v1 as pb;
use sluice_queue_runner::agents::{AttemptId, FromAgent, ToAgent};
use sluice_queue_runner::grpc::ServiceConfig;
use sluice_test_support::nix::{IsolatedStore, NixDaemon, NixEnv};
use support::*;
use tonic::Code;

const DAG: &str = r#"rec {
  leaf = mkDrv {
    name = "leaf";
    args = [ "-c" "export PATH=/usr/bin:/bin; echo leaf-content > $out" ];
  };
  dep = mkDrv {
    name = "dep";
    inherit leaf;
    args = [ "-c" "export PATH=/usr/bin:/bin; mkdir $out; echo dep-content > $out/content; echo $leaf > $out/leaf-path" ];
  };
  top = mkDrv {
    name = "top";
    inherit dep;
    args = [ "-c" "export PATH=/usr/bin:/bin; echo building top; echo second line; mkdir $out; cat $dep/content > $out/from-dep; echo $dep > $out/dep-path" ];
  };
  fails = mkDrv {
    name = "fails";
    inherit dep;
    args = [ "-c" "export PATH=/usr/bin:/bin; echo about to fail; cat $dep/content; exit 3" ];
  };
  quick = mkDrv {
    name = "quick";
    args = [ "-c" "export PATH=/usr/bin:/bin; echo quick > $out" ];
  };
}"#;

/// Connects to an agent's daemon, retrying while it starts listening.
async fn connect(daemon: &NixDaemon) -> DaemonClient {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match DaemonClient::connect(&daemon.socket_path()).await {
            Ok(c) => return c,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("connecting to the agent's daemon: {e}"),
        }
    }
}

async fn raw_client(runner: &Runner, token: &str) -> Raw {
    raw::connect(runner.url(), token).await
}

fn register_request(name: &str) -> pb::RegisterRequest {
    pb::RegisterRequest {
        name: name.into(),
        systems: vec!["x86_64-linux".into()],
        max_jobs: 1,
        speed_factor: 1.0,
        ..Default::default()
    }
}

/// Registers and opens the work stream; returns the session id, the
/// sender that keeps the stream open, and the command stream.
async fn raw_session(
    client: &mut Raw,
    name: &str,
) -> (
    String,
    tokio::sync::mpsc::Sender<pb::AgentEvent>,
    tonic::Streaming<pb::RunnerCommand>,
) {
    raw::open_session(client, register_request(name)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_with_an_empty_store_fetches_inputs_builds_and_uploads() {
    let env = NixEnv::new();
    let drvs = env.instantiate(DAG, &["dep", "top", "leaf"]);
    // Built in the queue runner's store: dep, and leaf, which dep refers to.
    let dep_out = env.realise(&drvs[0]).remove(0);
    let leaf_out = output_of(&drvs[2]);
    let top_out = output_of(&drvs[1]);
    let system = system_of(&drvs[1]);

    let mut runner = Runner::start().await;
    let agent_store = IsolatedStore::new();
    let daemon = agent_store.start_daemon();
    assert!(
        !in_store(&agent_store, &dep_out),
        "the agent's store starts empty"
    );
    let (stop, agent) = start_agent(agent_config(&runner, &daemon, &system));

    let (machine, info, commands) = runner.connected().await;
    assert_eq!(info.name, "test-agent");
    assert_eq!(info.systems, [system.as_str(), "builtin"]);
    assert_eq!(info.max_jobs, 2);

    let attempt = AttemptId(uuid::Uuid::from_u128(1));
    let a = assignment(&runner.store, &drvs[1], attempt).await;
    let inputs: Vec<&str> = a.inputs.iter().map(|i| i.path.as_str()).collect();
    assert_eq!(
        inputs,
        [leaf_out.as_str(), dep_out.as_str()],
        "dependency order"
    );
    runner.assign(machine, &commands, a).await;
    let (phases, report) = runner.finished(attempt, 120).await;

    assert_eq!(report.status, 0, "{report:?}");
    assert_eq!(report.outputs, [("out".to_owned(), top_out.clone())]);
    assert_eq!(report.times_built, 1);
    assert!(report.start_time > 0 && report.stop_time >= report.start_time);
    assert_eq!(phases, [20, 30, 40]);

    // The inputs were fetched into the agent's store (leaf before dep,
    // which refers to it) and the build ran there.
    assert!(in_store(&agent_store, &leaf_out));
    assert!(in_store(&agent_store, &dep_out));
    let built = agent_store.host_path(&top_out);
    assert_eq!(
        std::fs::read_to_string(built.join("from-dep")).expect("built in the agent's store"),
        "dep-content\n"
    );

    // The output is valid in the queue runner's store, as the agent declared.
    let out = store_path(&top_out);
    let agent_info = connect(&daemon)
        .await
        .query_path_info(&out)
        .await
        .expect("query")
        .expect("valid in the agent's store");
    let runner_info = runner
        .store
        .client()
        .await
        .expect("store")
        .query_path_info(&out)
        .await
        .expect("query")
        .expect("valid in the queue runner's store");
    assert_eq!(runner_info.nar_hash, agent_info.nar_hash);
    assert_eq!(runner_info.nar_size, agent_info.nar_size);
    assert!(runner_info.references.contains(&store_path(&dep_out)));
    let entry = runner
        .attempts
        .get(attempt)
        .expect("attempt still registered");
    assert_eq!(entry.uploaded()["out"].nar_hash, agent_info.nar_hash);
    assert_eq!(
        std::fs::read_to_string(Path::new(&top_out).join("from-dep")).expect("imported"),
        "dep-content\n"
    );

    let log = runner.log_of(&drvs[1]);
    assert!(log.contains("building top\nsecond line\n"), "log: {log:?}");

    runner.attempts.remove(attempt);
    let _ = stop.send(());
    agent
        .await
        .expect("agent task")
        .expect("agent stops cleanly");
    runner.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_build_reports_status_1_with_its_log() {
    let env = NixEnv::new();
    let drvs = env.instantiate(DAG, &["dep", "fails"]);
    env.realise(&drvs[0]);
    let mut runner = Runner::start().await;
    let agent_store = IsolatedStore::new();
    let daemon = agent_store.start_daemon();
    let (stop, agent) = start_agent(agent_config(&runner, &daemon, &system_of(&drvs[1])));
    let (machine, _, commands) = runner.connected().await;

    let attempt = AttemptId(uuid::Uuid::from_u128(5));
    let a = assignment(&runner.store, &drvs[1], attempt).await;
    runner.assign(machine, &commands, a).await;
    let (phases, report) = runner.finished(attempt, 120).await;
    assert_eq!(report.status, 1, "{report:?}");
    assert!(
        report.error_msg.contains("exit code 3"),
        "{:?}",
        report.error_msg
    );
    assert!(report.outputs.is_empty());
    assert_eq!(phases, [20, 30]);
    let log = runner.log_of(&drvs[1]);
    assert!(log.contains("about to fail\ndep-content\n"), "log: {log:?}");

    let _ = stop.send(());
    agent
        .await
        .expect("agent task")
        .expect("agent stops cleanly");
    runner.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_or_protocol_version_is_refused() {
    let runner = Runner::start().await;
    let mut liar = raw_client(&runner, "not-the-right-token-at-all").await;
    let version = pb::VersionRequest {
        protocol_version: sluice_proto::PROTOCOL_VERSION,
        agent_version: "test".into(),
    };
    let status = liar.version(version.clone()).await.expect_err("refused");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let status = liar
        .register(register_request("liar"))
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::Unauthenticated);

    let mut honest = raw_client(&runner, TOKEN).await;
    honest.version(version.clone()).await.expect("accepted");
    let status = honest
        .version(pb::VersionRequest {
            protocol_version: sluice_proto::PROTOCOL_VERSION + 1,
            ..version
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("protocol version"), "{status:?}");

    // A real agent with a wrong token gives up instead of retrying forever.
    let store = IsolatedStore::new();
    let daemon = store.start_daemon();
    let mut config = agent_config(&runner, &daemon, "x86_64-linux");
    config.token = "not-the-right-token-at-all".into();
    let ended = tokio::time::timeout(
        Duration::from_secs(30),
        sluice_builder_agent::run(config, std::future::pending()),
    )
    .await
    .expect("the agent gives up");
    let err = ended.expect_err("refused");
    assert!(err.to_string().contains("unknown agent token"), "{err}");
}

fn step_id(attempt: AttemptId) -> String {
    attempt.0.simple().to_string()
}

async fn upload(
    client: &mut Raw,
    header: pb::UploadHeader,
    chunks: Vec<Vec<u8>>,
) -> Result<(), tonic::Status> {
    let mut parts = vec![pb::NarUpload {
        part: Some(pb::nar_upload::Part::Header(header)),
    }];
    parts.extend(chunks.into_iter().map(|c| pb::NarUpload {
        part: Some(pb::nar_upload::Part::Data(c)),
    }));
    client
        .upload_nar(tokio_stream::iter(parts))
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn uploads_that_lie_are_refused_and_nothing_is_recorded() {
    let env = NixEnv::new();
    let drvs = env.instantiate(DAG, &["quick", "dep"]);
    let dep_out = env.realise(&drvs[1]).remove(0);
    let target = output_of(&drvs[0]);
    let mut runner = Runner::start().await;
    let mut client = raw_client(&runner, TOKEN).await;
    let (session, _keep_open, _commands) = raw_session(&mut client, "uploader").await;
    let (machine, _, commands) = runner.connected().await;
    let attempt = AttemptId(uuid::Uuid::from_u128(7));
    let mut a = assignment(&runner.store, &drvs[0], attempt).await;
    a.max_log_bytes = 16;
    runner.assign(machine, &commands, a).await;

    // The log file stops at the assignment's limit; the rest is counted.
    let chunk = |data: &[u8], offset: u64| pb::LogChunk {
        session_id: session.clone(),
        step_id: step_id(attempt),
        data: data.to_vec(),
        offset,
    };
    let ack = client
        .stream_log(tokio_stream::iter(vec![
            chunk(b"0123456789", 0),
            chunk(b"abcdefghij", 10),
        ]))
        .await
        .expect("log accepted")
        .into_inner();
    assert_eq!(ack.bytes_received, 20);
    let ack = client
        .stream_log(tokio_stream::iter(vec![chunk(b"more", 20)]))
        .await
        .expect("a later stream resumes the log")
        .into_inner();
    assert_eq!(ack.bytes_received, 4);
    assert_eq!(runner.log_of(&drvs[0]), "0123456789abcdef");

    // A NAR of a made-up output.
    let tree = env.dir().join("fake-output");
    std::fs::create_dir(&tree).expect("mkdir");
    std::fs::write(tree.join("file"), "not what the builder would write\n").expect("write");
    let mut nar = Vec::new();
    let summary = sluice_nix::nar::dump_path(&tree, &mut nar).expect("nar");
    let good_info = pb::StorePathInfo {
        path: target.clone(),
        nar_hash: summary.nar_hash.format(sluice_nix::hash::Base::Nix32, true),
        nar_size: summary.nar_size,
        ..Default::default()
    };
    let header = |info: pb::StorePathInfo, output: &str| pb::UploadHeader {
        session_id: session.clone(),
        step_id: step_id(attempt),
        output_name: output.into(),
        info: Some(info),
    };
    let thirds: Vec<Vec<u8>> = nar.chunks(nar.len() / 3 + 1).map(<[u8]>::to_vec).collect();
    let valid = |runner: &Runner| {
        let store = runner.store.clone();
        let target = target.clone();
        async move {
            store
                .client()
                .await
                .expect("store")
                .is_valid_path(&store_path(&target))
                .await
                .expect("query")
        }
    };

    // Wrong hash, wrong size, too long, a foreign reference, a wrong output.
    let mut wrong_hash = good_info.clone();
    wrong_hash.nar_hash =
        sluice_nix::hash::Hash::sha256(b"other").format(sluice_nix::hash::Base::Nix32, true);
    let status = upload(&mut client, header(wrong_hash, "out"), thirds.clone())
        .await
        .expect_err("wrong hash refused");
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    assert!(status.message().contains("hash"), "{status:?}");
    let mut short = good_info.clone();
    short.nar_size -= 1;
    let status = upload(&mut client, header(short, "out"), thirds.clone())
        .await
        .expect_err("wrong size refused");
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    let mut long = good_info.clone();
    long.nar_size += 1;
    let status = upload(&mut client, header(long, "out"), thirds.clone())
        .await
        .expect_err("short NAR refused");
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    let mut stray = good_info.clone();
    stray.references = vec![dep_out.clone()];
    let status = upload(&mut client, header(stray, "out"), thirds.clone())
        .await
        .expect_err("stray reference refused");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let status = upload(
        &mut client,
        header(good_info.clone(), "dev"),
        thirds.clone(),
    )
    .await
    .expect_err("unknown output refused");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(!valid(&runner).await, "a refused NAR never becomes valid");
    let entry = runner.attempts.get(attempt).expect("attempt");
    assert!(entry.uploaded().is_empty(), "nothing recorded");

    // Success cannot be claimed without the upload.
    let result = pb::StepResult {
        session_id: session.clone(),
        step_id: step_id(attempt),
        status: 0,
        outputs: vec![pb::BuildOutput {
            name: "out".into(),
            path: target.clone(),
        }],
        ..Default::default()
    };
    let status = client
        .report_result(result.clone())
        .await
        .expect_err("not uploaded");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");

    // Another session may touch none of this attempt.
    let mut other = raw_client(&runner, TOKEN).await;
    let other_session = other
        .register(register_request("other"))
        .await
        .expect("register")
        .into_inner()
        .session_id;
    let mut foreign = header(good_info.clone(), "out");
    foreign.session_id = other_session.clone();
    let status = upload(&mut other, foreign, thirds.clone())
        .await
        .expect_err("foreign upload");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let status = other
        .fetch_paths(pb::FetchPathsRequest {
            session_id: other_session.clone(),
            step_id: step_id(attempt),
            paths: vec![],
        })
        .await
        .expect_err("foreign fetch");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let log = pb::LogChunk {
        session_id: other_session,
        step_id: step_id(attempt),
        data: b"lies\n".to_vec(),
        offset: 0,
    };
    let status = other
        .stream_log(tokio_stream::iter(vec![log]))
        .await
        .expect_err("foreign log");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    // The owner may fetch only the input closure.
    let status = client
        .fetch_paths(pb::FetchPathsRequest {
            session_id: session.clone(),
            step_id: step_id(attempt),
            paths: vec![dep_out.clone()],
        })
        .await
        .expect_err("not an input");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // The honest upload goes through, then the report. A deriver that is
    // not the attempt's derivation changes nothing: the attempt's is
    // recorded.
    let lying_deriver = pb::StorePathInfo {
        deriver: drvs[1].clone(),
        ..good_info.clone()
    };
    upload(&mut client, header(lying_deriver, "out"), thirds)
        .await
        .expect("the right NAR is accepted");
    assert!(valid(&runner).await);
    let info = runner
        .store
        .client()
        .await
        .expect("store")
        .query_path_info(&store_path(&target))
        .await
        .expect("query")
        .expect("valid");
    assert_eq!(info.nar_hash, summary.nar_hash);
    assert_eq!(info.deriver, Some(store_path(&drvs[0])));
    let entry = runner.attempts.get(attempt).expect("attempt");
    assert_eq!(entry.uploaded()["out"].nar_hash, summary.nar_hash);
    // The answer comes once the driver has the result committed.
    let reporting = tokio::spawn({
        let mut client = client.clone();
        let result = result.clone();
        async move { client.report_result(result).await }
    });
    let (_, report) = runner.finished(attempt, 10).await;
    reporting
        .await
        .expect("the report task")
        .expect("report accepted once committed");
    assert_eq!(report.status, 0);
    assert_eq!(report.outputs, [("out".to_owned(), target.clone())]);
    // Reported again (as an agent that missed the answer would): answered
    // as the first, and nothing is recorded twice.
    client
        .report_result(result)
        .await
        .expect("a repeated report is answered like the first");
    assert!(
        tokio::time::timeout(Duration::from_millis(500), runner.finished(attempt, 1))
            .await
            .is_err(),
        "the driver hears of a result once"
    );
    runner.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_without_heartbeats_is_dropped() {
    let data_dir = tempfile::tempdir().expect("tempdir");
    let mut config = ServiceConfig::new(data_dir.path().join("data"));
    config.heartbeat_interval = Duration::from_millis(200);
    config.missed_heartbeats = 2;
    let mut runner = Runner::start_with(config, data_dir).await;
    let mut client = raw_client(&runner, TOKEN).await;
    let started = std::time::Instant::now();
    let (session, _keep_open, mut commands) = raw_session(&mut client, "silent").await;
    // Held: a driver that drops an agent's command channel ends its session.
    let (machine, _, _driver_holds) = runner.connected().await;
    match runner.next_event(10).await {
        FromAgent::Disconnected { machine: m } => assert_eq!(m, machine),
        other => panic!("expected Disconnected, got {other:?}"),
    }
    let elapsed = started.elapsed();
    let ended = tokio::time::timeout(Duration::from_secs(5), commands.message())
        .await
        .expect("the work stream ends");
    let status = ended.expect_err("ended with a reason");
    assert!(status.message().contains("no heartbeat"), "{status:?}");
    // Two missed 200 ms intervals.
    assert!(elapsed >= Duration::from_millis(400), "{elapsed:?}");
    let status = client
        .heartbeat(pb::HeartbeatRequest {
            session_id: session,
            ..Default::default()
        })
        .await
        .expect_err("the session is gone");
    assert_eq!(status.code(), Code::NotFound);
    runner.stop().await;
}

/// The driver never waits on an agent's command channel: an assignment
/// that finds it full is given up as aborted. An idle agent is sent a step
/// for each slot and each step it takes ahead at once, so they must all
/// fit, even before the agent reads any (on one thread, nothing forwards
/// them while they are sent).
#[tokio::test(flavor = "current_thread")]
async fn an_agent_s_command_channel_takes_a_step_for_every_slot_and_step_ahead() {
    let mut runner = Runner::start().await;
    let mut client = raw_client(&runner, TOKEN).await;
    let (slots, ahead) = (64, 64);
    let request = pb::RegisterRequest {
        max_jobs: slots,
        prefetch: ahead,
        ..register_request("wide")
    };
    let (_session, _keep_open, mut commands) = raw::open_session(&mut client, request).await;
    let (_machine, _, driver_commands) = runner.connected().await;
    let attempts: Vec<AttemptId> = (0..slots + ahead).map(|_| AttemptId::new()).collect();
    for (i, attempt) in attempts.iter().enumerate() {
        let assignment = sluice_queue_runner::agents::Assignment {
            attempt: *attempt,
            drv_path: format!("/nix/store/00000000000000000000000000000000-step-{i}.drv"),
            basic_drv: String::new(),
            inputs: vec![],
            streamed_inputs: None,
            max_silent_time_s: 60,
            build_timeout_s: 60,
            max_log_bytes: 1 << 20,
            max_output_bytes: 1 << 20,
        };
        driver_commands
            .try_send(ToAgent::Assign(assignment))
            .unwrap_or_else(|e| panic!("assignment {i} of {} did not fit: {e}", attempts.len()));
    }
    for attempt in &attempts {
        let command = tokio::time::timeout(Duration::from_secs(10), commands.message())
            .await
            .expect("the assignments arrive")
            .expect("the work stream is open")
            .expect("a command");
        match command.command {
            Some(pb::runner_command::Command::Assign(a)) => {
                assert_eq!(a.step_id, step_id(*attempt), "in order")
            }
            other => panic!("expected an assignment, got {other:?}"),
        }
    }
    runner.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_reconnects_after_the_queue_runner_restarts() {
    let env = NixEnv::new();
    let drvs = env.instantiate(DAG, &["quick"]);
    let mut runner = Runner::start().await;
    let agent_store = IsolatedStore::new();
    let daemon = agent_store.start_daemon();
    let (stop, agent) = start_agent(agent_config(&runner, &daemon, &system_of(&drvs[0])));
    let (first, _, _) = runner.connected().await;

    runner.stop().await;
    loop {
        match runner.next_event(10).await {
            FromAgent::Disconnected { machine } => {
                assert_eq!(machine, first);
                break;
            }
            FromAgent::Heartbeat { .. } => {}
            other => panic!("expected Disconnected, got {other:?}"),
        }
    }
    runner.restart().await;
    let (machine, _, commands) = runner.connected().await;
    let attempt = AttemptId(uuid::Uuid::from_u128(1));
    let a = assignment(&runner.store, &drvs[0], attempt).await;
    runner.assign(machine, &commands, a).await;
    let (_, report) = runner.finished(attempt, 120).await;
    assert_eq!(report.status, 0, "{report:?}");

    let _ = stop.send(());
    agent
        .await
        .expect("agent task")
        .expect("agent stops cleanly");
    runner.stop().await;
}

/// Whether process `pid` is gone (or a zombie).
fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_build_is_killed_and_frees_its_slot() {
    let env = NixEnv::new();
    let pid_file = env.dir().join("builder.pid");
    let expr = format!(
        r#"{{
  slow = mkDrv {{ name = "slow"; args = [ "-c" "echo $$ > {pid}; exec /bin/sleep 120" ]; }};
  quick = mkDrv {{ name = "quick"; args = [ "-c" "echo quick > $out" ]; }};
}}"#,
        pid = pid_file.display()
    );
    let drvs = env.instantiate(&expr, &["slow", "quick"]);
    let mut runner = Runner::start().await;
    let agent_store = IsolatedStore::new();
    let daemon = agent_store.start_daemon();
    let mut config = agent_config(&runner, &daemon, &system_of(&drvs[0]));
    config.max_jobs = 1;
    let (stop, agent) = start_agent(config);
    let (machine, _, commands) = runner.connected().await;

    let slow = AttemptId(uuid::Uuid::from_u128(1));
    let a = assignment(&runner.store, &drvs[0], slow).await;
    runner.assign(machine, &commands, a).await;
    let building = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let FromAgent::Phase { busy: 30, .. } = runner.next_event(60).await {
                break;
            }
        }
    })
    .await;
    assert!(building.is_ok(), "the slow build started");
    let read_pid = || {
        std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
    };
    assert!(
        sluice_test_support::wait_until(Duration::from_secs(30), || read_pid().is_some()),
        "the builder wrote its pid"
    );
    let pid = read_pid().expect("pid");
    assert!(!process_gone(pid));

    commands.send(ToAgent::Cancel(slow)).await.expect("cancel");
    runner.attempts.remove(slow);
    assert!(
        sluice_test_support::wait_until(Duration::from_secs(30), || process_gone(pid)),
        "the cancelled builder was killed"
    );

    let quick = AttemptId(uuid::Uuid::from_u128(2));
    let a = assignment(&runner.store, &drvs[1], quick).await;
    runner.assign(machine, &commands, a).await;
    loop {
        match runner.next_event(60).await {
            FromAgent::Finished {
                attempt, report, ..
            } => {
                assert_eq!(attempt, quick, "the cancelled attempt reported: {report:?}");
                assert_eq!(report.status, 0, "{report:?}");
                break;
            }
            FromAgent::Disconnected { .. } => panic!("the agent disconnected"),
            _ => {}
        }
    }
    let _ = stop.send(());
    agent
        .await
        .expect("agent task")
        .expect("agent stops cleanly");
    runner.stop().await;
}
