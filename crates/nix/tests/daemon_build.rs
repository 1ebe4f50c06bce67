//! `BuildDerivation` against real Nix daemons, Nix 2.8 (protocol 1.34) and
//! Nix 2.26 (protocol 1.38): outputs come back, failures and timeouts carry
//! their status, log lines arrive while the build runs, and
//! content-addressed builds give realisations that can be queried and
//! registered. Each test is a function of the version, run once for each.

mod daemon_common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use daemon_common::{connect, export_nar, read_drv, store_path};
use sluice_nix::daemon::{
    BuildMode, BuildResult, BuildStatus, ClientOptions, DaemonClient, DrvOutput, LogEvent,
    Realisation,
};
use sluice_nix::derivation::{BasicDerivation, DerivationOutput};
use sluice_nix::hash::Hash;
use sluice_nix::nar;
use sluice_nix::store_path::{StoreDir, StorePath};
use sluice_test_support::nix::{run, IsolatedStore, NixCommands, NixDaemon, NixEnv, NixVersion};

/// Instantiates `{ drv = mkDrv { name = …; args = [ "-c" script ]; } }` and
/// returns its path and basic derivation.
fn drv_for(env: &NixEnv, name: &str, script: &str) -> (StorePath, BasicDerivation) {
    let expr = format!(
        "{{ drv = mkDrv {{ name = \"{name}\"; args = [ \"-c\" ''export PATH=/usr/bin:/bin; {script}'' ]; }}; }}"
    );
    let path = env.instantiate(&expr, &["drv"]).remove(0);
    let (path, drv) = read_drv(&path);
    (path, drv.into_basic().0)
}

async fn build(
    client: &mut DaemonClient,
    drv_path: &StorePath,
    drv: &BasicDerivation,
) -> BuildResult {
    client
        .build_derivation(drv_path, drv, BuildMode::Normal)
        .await
        .expect("buildDerivation answers")
}

async fn built_outputs_come_back_from_an_empty_store(version: NixVersion) {
    let env = NixEnv::new();
    let expr = r#"{ drv = mkDrv {
      name = "two-outputs";
      outputs = [ "out" "dev" ];
      args = [ "-c" "export PATH=/usr/bin:/bin; mkdir $out; echo hello > $out/greeting; echo $out > $dev" ];
    }; }"#;
    let (drv_path, drv) = read_drv(&env.instantiate(expr, &["drv"])[0]);
    let drv = drv.into_basic().0;
    let store = IsolatedStore::new();
    let daemon = store.start_daemon_version(version);
    let mut client = connect(&daemon).await;

    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let result = build(&mut client, &drv_path, &drv).await;
    assert_eq!(result.status, BuildStatus::Built, "{result:?}");
    assert!(result.error_msg.is_empty());
    assert_eq!(result.times_built, 1);
    assert!(!result.is_non_deterministic);
    assert!(
        result.start_time >= started && result.stop_time >= result.start_time,
        "{result:?}"
    );
    // Protocol 1.34 has no CPU times; 1.37+ has optional ones, which Nix
    // measures only when it runs builds in cgroups (`use-cgroups`, off here).
    assert_eq!(
        (result.cpu_user, result.cpu_system),
        (None, None),
        "{result:?}"
    );

    let expected: BTreeMap<String, StorePath> = drv
        .outputs
        .iter()
        .map(|(name, o)| match o {
            DerivationOutput::InputAddressed { path } => (name.clone(), path.clone()),
            other => panic!("unexpected output kind {other:?}"),
        })
        .collect();
    let got: BTreeMap<String, StorePath> = result
        .built_outputs
        .iter()
        .map(|(name, o)| (name.clone(), o.out_path.clone()))
        .collect();
    assert_eq!(got, expected);

    let out = &expected["out"];
    let info = client
        .query_path_info(out)
        .await
        .expect("info")
        .expect("valid");
    let bytes = export_nar(&mut client, out).await;
    assert_eq!(Hash::sha256(&bytes), info.nar_hash);
    let restored = env.dir().join("restored");
    nar::restore_path(&bytes[..], &restored).expect("restoring the output");
    assert_eq!(
        std::fs::read_to_string(restored.join("greeting")).expect("greeting"),
        "hello\n"
    );
    let dev =
        std::fs::read_to_string(store.host_path(&StoreDir::default().print(&expected["dev"])))
            .expect("dev output");
    assert_eq!(dev.trim(), StoreDir::default().print(out));
}

async fn a_failing_build_reports_its_status_and_message(version: NixVersion) {
    let env = NixEnv::new();
    let (drv_path, drv) = drv_for(&env, "fails", "echo about to fail; exit 3");
    let store = IsolatedStore::new();
    let daemon = store.start_daemon_version(version);
    let mut client = connect(&daemon).await;
    let result = build(&mut client, &drv_path, &drv).await;
    assert_eq!(result.status, BuildStatus::PermanentFailure, "{result:?}");
    assert!(!result.is_success());
    assert!(
        result.error_msg.contains("exit code 3"),
        "message: {:?}",
        result.error_msg
    );
    assert!(result.built_outputs.is_empty());
    // The connection goes on.
    assert!(!client.is_valid_path(&drv_path).await.expect("still usable"));
}

async fn build_limits_set_through_options_give_their_statuses(version: NixVersion) {
    let env = NixEnv::new();
    let store = IsolatedStore::new();
    let daemon = store.start_daemon_version(version);
    let mut client = connect(&daemon).await;

    let (silent, silent_drv) = drv_for(&env, "silent", "echo going quiet; sleep 30; touch $out");
    client
        .set_options(&ClientOptions {
            max_silent_time: 1,
            ..ClientOptions::default()
        })
        .await
        .expect("setOptions");
    let begun = Instant::now();
    let result = build(&mut client, &silent, &silent_drv).await;
    assert_eq!(result.status, BuildStatus::TimedOut, "{result:?}");
    assert!(
        result.error_msg.contains("silence"),
        "{:?}",
        result.error_msg
    );
    assert!(
        begun.elapsed() < Duration::from_secs(25),
        "killed by the limit, not by finishing"
    );

    let (chatty, chatty_drv) = drv_for(
        &env,
        "chatty",
        "for i in $(seq 100); do echo tick $i; sleep 0.2; done; touch $out",
    );
    client
        .set_options(&ClientOptions {
            build_timeout: Some(1),
            ..ClientOptions::default()
        })
        .await
        .expect("setOptions");
    let result = build(&mut client, &chatty, &chatty_drv).await;
    assert_eq!(result.status, BuildStatus::TimedOut, "{result:?}");
    assert!(
        result.error_msg.contains("timed out"),
        "{:?}",
        result.error_msg
    );

    let (loud, loud_drv) = drv_for(&env, "loud", "seq 10000; touch $out");
    client
        .set_options(&ClientOptions {
            max_log_size: Some(1000),
            ..ClientOptions::default()
        })
        .await
        .expect("setOptions");
    let result = build(&mut client, &loud, &loud_drv).await;
    assert_eq!(result.status, BuildStatus::LogLimitExceeded, "{result:?}");
}

async fn log_lines_arrive_while_the_build_runs(version: NixVersion) {
    let env = NixEnv::new();
    let (drv_path, drv) = drv_for(
        &env,
        "logs",
        "echo first line; sleep 2; echo second line; touch $out",
    );
    let store = IsolatedStore::new();
    let daemon = store.start_daemon_version(version);
    let mut client = connect(&daemon).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<LogEvent>();
    client.log_to(tx);

    let mut first_at = None;
    let mut lines = Vec::new();
    let result = {
        let build = client.build_derivation(&drv_path, &drv, BuildMode::Normal);
        tokio::pin!(build);
        loop {
            tokio::select! {
                Some(ev) = rx.recv() => {
                    if let Some(line) = ev.build_log_line() {
                        if line == "first line" {
                            first_at.get_or_insert_with(Instant::now);
                        }
                        lines.push(line.to_owned());
                    }
                }
                res = &mut build => break res.expect("buildDerivation"),
            }
        }
    };
    let done_at = Instant::now();
    assert!(result.is_success(), "{result:?}");
    while let Ok(ev) = rx.try_recv() {
        if let Some(line) = ev.build_log_line() {
            lines.push(line.to_owned());
        }
    }
    assert_eq!(lines, ["first line", "second line"]);
    let first_at = first_at.expect("the first line arrived before the result");
    assert!(
        done_at.duration_since(first_at) >= Duration::from_millis(1500),
        "the first line arrived only {:?} before the result",
        done_at.duration_since(first_at)
    );
}

const CA_EXPR: &str = r#"{ ca = mkDrv {
  name = "ca";
  __contentAddressed = true;
  outputHashMode = "recursive";
  outputHashAlgo = "sha256";
  args = [ "-c" "echo ${nonce} > $out" ];
}; }"#;

async fn content_addressed_builds_and_realisations(version: NixVersion) {
    let env = NixEnv::new();
    let drv = env.instantiate(CA_EXPR, &["ca"]).remove(0);
    let (drv_path, parsed) = read_drv(&drv);
    let basic = parsed.into_basic().0;

    // Built through BuildDerivation in an empty store.
    let store = IsolatedStore::new();
    let daemon = store.start_daemon_version(version);
    let mut client = connect(&daemon).await;
    let result = build(&mut client, &drv_path, &basic).await;
    assert_eq!(result.status, BuildStatus::Built, "{result:?}");
    let built = &result.built_outputs["out"];
    let legacy_id = built
        .legacy_id
        .clone()
        .expect("realisation ids come without the path feature");

    // Nix builds it to the same path, with the same realisation id.
    let host_out = store_path(&env.realise(&drv)[0]);
    assert_eq!(built.out_path, host_out);
    let file = env.write_expr(CA_EXPR);
    let json = run(env
        .command("nix")
        .args(["realisation", "info", "--json", "-f"])
        .arg(&file)
        .arg("ca"));
    let json: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(json[0]["id"].as_str(), Some(legacy_id.as_str()));

    let (hash, output) = legacy_id.split_once('!').expect("<hash>!<output>");
    let id = DrvOutput::ByHash {
        drv_hash: Hash::parse_prefixed(hash).expect("a hash"),
        output: output.to_owned(),
    };
    assert_eq!(id.legacy_id().as_deref(), Some(legacy_id.as_str()));

    // Queried from the host daemon, which registered it when building.
    let host = NixDaemon::start_version(version);
    let mut host_client = connect(&host).await;
    let real = host_client
        .query_realisation(&id)
        .await
        .expect("queryRealisation")
        .expect("the host knows the realisation");
    assert_eq!(real.out_path, host_out);
    let unknown = DrvOutput::ByHash {
        drv_hash: Hash::sha256(b"nothing"),
        output: "out".into(),
    };
    assert_eq!(
        host_client
            .query_realisation(&unknown)
            .await
            .expect("query"),
        None
    );
    let by_path = DrvOutput::ByPath {
        drv_path: drv_path.clone(),
        output: "out".into(),
    };
    assert!(
        host_client.query_realisation(&by_path).await.is_err(),
        "no path ids without realisation-with-path-not-hash"
    );
    assert!(host_client.is_open());

    // Registered by hand in another empty store, after importing the path.
    let info = host_client
        .query_path_info(&host_out)
        .await
        .expect("info")
        .expect("valid");
    let bytes = export_nar(&mut host_client, &host_out).await;
    let other = IsolatedStore::new();
    let other_daemon = other.start_daemon_version(version);
    let mut other_client = connect(&other_daemon).await;
    assert_eq!(
        other_client.query_realisation(&id).await.expect("query"),
        None
    );
    other_client
        .add_to_store_nar(&info, &mut &bytes[..], false, true)
        .await
        .expect("import");
    let realisation = Realisation {
        id: id.clone(),
        out_path: host_out.clone(),
        signatures: BTreeSet::new(),
        dependent_realisations: BTreeMap::new(),
    };
    other_client
        .register_drv_output(&realisation)
        .await
        .expect("registerDrvOutput");
    let back = other_client
        .query_realisation(&id)
        .await
        .expect("query")
        .expect("registered");
    assert_eq!(back, realisation);
}

#[tokio::test]
async fn built_outputs_come_back_from_an_empty_store_on_nix_2_8() {
    built_outputs_come_back_from_an_empty_store(NixVersion::Nix2_8).await;
}

#[tokio::test]
async fn built_outputs_come_back_from_an_empty_store_on_nix_2_26() {
    built_outputs_come_back_from_an_empty_store(NixVersion::Nix2_26).await;
}

#[tokio::test]
async fn a_failing_build_reports_its_status_and_message_on_nix_2_8() {
    a_failing_build_reports_its_status_and_message(NixVersion::Nix2_8).await;
}

#[tokio::test]
async fn a_failing_build_reports_its_status_and_message_on_nix_2_26() {
    a_failing_build_reports_its_status_and_message(NixVersion::Nix2_26).await;
}

#[tokio::test]
async fn build_limits_set_through_options_give_their_statuses_on_nix_2_8() {
    build_limits_set_through_options_give_their_statuses(NixVersion::Nix2_8).await;
}

#[tokio::test]
async fn build_limits_set_through_options_give_their_statuses_on_nix_2_26() {
    build_limits_set_through_options_give_their_statuses(NixVersion::Nix2_26).await;
}

#[tokio::test]
async fn log_lines_arrive_while_the_build_runs_on_nix_2_8() {
    log_lines_arrive_while_the_build_runs(NixVersion::Nix2_8).await;
}

#[tokio::test]
async fn log_lines_arrive_while_the_build_runs_on_nix_2_26() {
    log_lines_arrive_while_the_build_runs(NixVersion::Nix2_26).await;
}

#[tokio::test]
async fn content_addressed_builds_and_realisations_on_nix_2_8() {
    content_addressed_builds_and_realisations(NixVersion::Nix2_8).await;
}

#[tokio::test]
async fn content_addressed_builds_and_realisations_on_nix_2_26() {
    content_addressed_builds_and_realisations(NixVersion::Nix2_26).await;
}
