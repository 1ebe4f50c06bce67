//! The daemon client against real Nix daemons, Nix 2.8 (protocol 1.34)
//! and Nix 2.26 (protocol 1.38): handshake, queries (pipelined too), NAR export and import
//! into an empty isolated store, text paths, builds by path, GC roots, the
//! stdio transport, and cancellation by dropping a request. Each test is a
//! function of the version, run once for each.

mod daemon_common;

use std::collections::BTreeSet;
use std::time::Duration;

use daemon_common::{
    connect, eventually, export_nar, process_gone, protocol, read_drv, spawn_stdio, spawn_stdio_on,
    store_path,
};
use sluice_nix::daemon::{
    BuildMode, BuildStatus, ClientError, DaemonClient, DerivedPath, OutputsSpec, PathInfo, Trust,
};
use sluice_nix::derivation::DerivationOutput;
use sluice_nix::hash::Hash;
use sluice_nix::store_path::StoreDir;
use sluice_test_support::nix::{
    run, IsolatedStore, Nix226Store, NixCommands, NixDaemon, NixEnv, NixVersion,
};

async fn handshake_and_queries(version: NixVersion) {
    let env = NixEnv::new();
    let daemon = NixDaemon::start_version(version);
    let mut client = connect(&daemon).await;
    let info = client.info().clone();
    assert_eq!(info.version, protocol(version));
    assert_eq!(info.daemon_version, protocol(version));
    let nix_version = info.nix_version.as_deref().expect("1.33+ sends it");
    assert!(
        nix_version.starts_with(&format!("{}.", version.release())),
        "{version} says it is {nix_version}"
    );
    assert!(info.features.is_empty(), "{:?}", info.features);
    match version {
        NixVersion::Nix2_8 => assert_eq!(info.trust, None, "protocol 1.34 does not say"),
        // Root is trusted.
        NixVersion::Nix2_26 => assert_eq!(info.trust, Some(Trust::Trusted)),
    }
    assert!(!client.realisations_by_path());

    let drv = env.instantiate(
        r#"{ a = mkDrv { name = "q"; args = [ "-c" "echo ${nonce} > $out" ]; }; }"#,
        &["a"],
    );
    let out = store_path(&env.realise(&drv[0])[0]);
    let missing = store_path("/nix/store/00000000000000000000000000000000-sluice-missing");

    assert!(client.is_valid_path(&out).await.expect("isValidPath"));
    assert!(!client.is_valid_path(&missing).await.expect("isValidPath"));
    let valid = client
        .query_valid_paths([&out, &missing], false)
        .await
        .expect("queryValidPaths");
    assert_eq!(valid, BTreeSet::from([out.clone()]));
    assert_eq!(
        client
            .query_path_info(&missing)
            .await
            .expect("queryPathInfo"),
        None
    );

    let info = client
        .query_path_info(&out)
        .await
        .expect("queryPathInfo")
        .expect("a built path is valid");
    let json =
        run(env
            .command("nix")
            .args(["path-info", "--json", &StoreDir::default().print(&out)]));
    let json: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    let nix_hash =
        Hash::parse_any(json[0]["narHash"].as_str().expect("narHash"), None).expect("hash");
    assert_eq!(info.nar_hash, nix_hash);
    assert_eq!(Some(info.nar_size), json[0]["narSize"].as_u64());
    assert_eq!(info.deriver, Some(store_path(&drv[0])));
    assert!(info.ultimate);
    assert!(info.references.is_empty());

    // Pipelined: one reply per path, in order, the same as one by one;
    // a batch far larger than a socket buffer's worth of replies does not
    // deadlock, and the connection stays usable.
    let batch: Vec<_> = (0..2000)
        .map(|i| {
            if i % 2 == 0 {
                out.clone()
            } else {
                missing.clone()
            }
        })
        .collect();
    let infos = client
        .query_path_infos(&batch)
        .await
        .expect("pipelined queryPathInfo");
    assert_eq!(infos.len(), batch.len());
    for (i, got) in infos.iter().enumerate() {
        assert_eq!(got.as_ref(), (i % 2 == 0).then_some(&info), "reply {i}");
    }
    assert_eq!(
        client.query_path_infos(&[]).await.expect("empty batch"),
        vec![]
    );
    assert!(client.is_valid_path(&out).await.expect("isValidPath after"));
}

#[tokio::test]
async fn handshake_and_queries_against_nix_2_8() {
    handshake_and_queries(NixVersion::Nix2_8).await;
}

#[tokio::test]
async fn handshake_and_queries_against_nix_2_26() {
    handshake_and_queries(NixVersion::Nix2_26).await;
}

/// Builds `a` (no references) and `b` (referring to `a`) in the host store.
fn two_paths(env: &NixEnv) -> (String, String) {
    let drvs = env.instantiate(
        r#"rec {
          a = mkDrv { name = "imp-a"; args = [ "-c" "echo ${nonce} > $out" ]; };
          b = mkDrv { name = "imp-b"; args = [ "-c" "export PATH=/usr/bin:/bin; mkdir $out; echo ${a} > $out/ref; ln -s ref $out/link" ]; };
        }"#,
        &["a", "b"],
    );
    let b = env.realise(&drvs[1]).remove(0);
    let a = env.realise(&drvs[0]).remove(0);
    (a, b)
}

async fn nar_imported_into_an_empty_store_is_valid_there(version: NixVersion) {
    let env = NixEnv::new();
    let (a, b) = two_paths(&env);
    let (a, b) = (store_path(&a), store_path(&b));
    let host = NixDaemon::start_version(version);
    let mut host_client = connect(&host).await;
    let info_a = host_client
        .query_path_info(&a)
        .await
        .expect("info")
        .expect("valid");
    let info_b = host_client
        .query_path_info(&b)
        .await
        .expect("info")
        .expect("valid");
    assert_eq!(info_b.references, BTreeSet::from([a.clone()]));
    let nar_a = export_nar(&mut host_client, &a).await;
    let nar_b = export_nar(&mut host_client, &b).await;
    assert_eq!(
        Hash::sha256(&nar_b),
        info_b.nar_hash,
        "narFromPath gives the registered NAR"
    );
    assert_eq!(nar_b.len() as u64, info_b.nar_size);

    let store = IsolatedStore::new();
    let daemon = store.start_daemon_version(version);
    let mut client = connect(&daemon).await;
    assert!(!client.is_valid_path(&a).await.expect("isValidPath"));

    // `b` before its reference: the daemon refuses, and the connection
    // stays usable.
    let err = client
        .add_to_store_nar(&info_b, &mut &nar_b[..], false, true)
        .await
        .expect_err("importing a path before its references");
    assert!(err.remote().is_some(), "a daemon error, not {err:?}");
    assert!(client.is_open());

    client
        .add_to_store_nar(&info_a, &mut &nar_a[..], false, true)
        .await
        .expect("importing a");
    client
        .add_to_store_nar(&info_b, &mut &nar_b[..], false, true)
        .await
        .expect("importing b");
    let got = client
        .query_path_info(&b)
        .await
        .expect("info")
        .expect("b is valid now");
    assert_eq!(got.nar_hash, info_b.nar_hash);
    assert_eq!(got.nar_size, info_b.nar_size);
    assert_eq!(got.references, BTreeSet::from([a.clone()]));
    assert_eq!(export_nar(&mut client, &b).await, nar_b);

    // Nix itself agrees, and the files are there.
    let b_full = StoreDir::default().print(&b);
    run(store
        .command("nix-store")
        .args(["--check-validity", &b_full]));
    run(store.command("nix-store").args(["--verify-path", &b_full]));
    assert!(store.host_path(&format!("{b_full}/ref")).is_file());

    // A NAR that does not match its info is refused.
    let mut wrong = info_a.clone();
    wrong.path = store_path("/nix/store/00000000000000000000000000000000-wrong");
    wrong.nar_hash = Hash::sha256(b"not this");
    let err = client
        .add_to_store_nar(&wrong, &mut &nar_a[..], false, true)
        .await
        .expect_err("a hash mismatch");
    assert!(err.remote().is_some(), "a daemon error, not {err:?}");
    assert!(client.is_valid_path(&a).await.expect("still usable"));
}

#[tokio::test]
async fn nar_imported_into_an_empty_store_is_valid_there_on_nix_2_8() {
    nar_imported_into_an_empty_store_is_valid_there(NixVersion::Nix2_8).await;
}

#[tokio::test]
async fn nar_imported_into_an_empty_store_is_valid_there_on_nix_2_26() {
    nar_imported_into_an_empty_store_is_valid_there(NixVersion::Nix2_26).await;
}

async fn nar_of_an_invalid_path_is_an_error(version: NixVersion) {
    let daemon = NixDaemon::start_version(version);
    let mut client = connect(&daemon).await;
    let missing = store_path("/nix/store/00000000000000000000000000000000-sluice-missing");
    let mut sink = Vec::new();
    let err = client
        .nar_from_path(&missing, &mut sink)
        .await
        .expect_err("no NAR for an invalid path");
    assert!(err.remote().is_some(), "the daemon's message, not {err:?}");
    assert!(sink.is_empty());
}

#[tokio::test]
async fn nar_of_an_invalid_path_is_an_error_on_nix_2_8() {
    nar_of_an_invalid_path_is_an_error(NixVersion::Nix2_8).await;
}

#[tokio::test]
async fn nar_of_an_invalid_path_is_an_error_on_nix_2_26() {
    nar_of_an_invalid_path_is_an_error(NixVersion::Nix2_26).await;
}

async fn text_paths_and_builds_by_path_in_an_isolated_store(version: NixVersion) {
    let env = NixEnv::new();
    let drvs = env.instantiate(
        r#"{
          ok = mkDrv { name = "by-path"; args = [ "-c" "echo ${nonce} > $out" ]; };
          bad = mkDrv { name = "by-path-bad"; args = [ "-c" "exit 1" ]; };
        }"#,
        &["ok", "bad"],
    );
    let store = IsolatedStore::new();
    let daemon = store.start_daemon_version(version);
    let mut client = connect(&daemon).await;

    let mut added = Vec::new();
    for drv_path in &drvs {
        let (path, drv) = read_drv(drv_path);
        let text = std::fs::read(drv_path).expect("reading the .drv");
        let name = path.name().to_owned();
        let info: PathInfo = client
            .add_text_to_store(&name, &text, &BTreeSet::new())
            .await
            .expect("addToStore text");
        assert_eq!(info.path, path, "the daemon computes Nix's .drv path");
        assert!(info
            .ca
            .as_deref()
            .is_some_and(|ca| ca.starts_with("text:sha256:")));
        assert_eq!(
            info.nar_size as usize,
            8 * 14 + text.len().div_ceil(8) * 8,
            "a one-file NAR"
        );
        added.push((path, drv));
    }
    let (ok_path, ok_drv) = &added[0];
    let DerivationOutput::InputAddressed { path: out } = &ok_drv.outputs["out"] else {
        panic!("an input-addressed derivation")
    };

    let wanted = DerivedPath::Built {
        drv_path: ok_path.clone(),
        outputs: OutputsSpec::All,
    };
    client
        .build_paths(std::slice::from_ref(&wanted), BuildMode::Normal)
        .await
        .expect("buildPaths");
    assert!(client.is_valid_path(out).await.expect("isValidPath"));

    let results = client
        .build_paths_with_results(
            &[
                DerivedPath::Built {
                    drv_path: ok_path.clone(),
                    outputs: OutputsSpec::Names(BTreeSet::from(["out".to_owned()])),
                },
                DerivedPath::Opaque(out.clone()),
            ],
            BuildMode::Normal,
        )
        .await
        .expect("buildPathsWithResults");
    assert_eq!(results.len(), 2);
    // Nix 2.8 answers in its own order, not the request's.
    let built = results
        .iter()
        .find(|r| matches!(r.path, DerivedPath::Built { .. }))
        .expect("a result for the derivation");
    assert!(built.result.is_success(), "{built:?}");
    assert_eq!(built.result.built_outputs["out"].out_path, *out);
    let opaque = results
        .iter()
        .find(|r| r.path == DerivedPath::Opaque(out.clone()))
        .expect("a result for the path");
    assert_eq!(opaque.result.status, BuildStatus::AlreadyValid);

    let bad = DerivedPath::Built {
        drv_path: added[1].0.clone(),
        outputs: OutputsSpec::All,
    };
    let err = client
        .build_paths(std::slice::from_ref(&bad), BuildMode::Normal)
        .await
        .expect_err("a failing build");
    assert!(err.remote().is_some(), "{err:?}");
    let results = client
        .build_paths_with_results(&[bad], BuildMode::Normal)
        .await
        .expect("results even for failures");
    assert_eq!(results[0].result.status, BuildStatus::PermanentFailure);

    // Roots.
    client.ensure_path(out).await.expect("ensurePath");
    client.add_temp_root(out).await.expect("addTempRoot");
    let link = env.dir().join("root-link");
    std::os::unix::fs::symlink(StoreDir::default().print(out), &link).expect("symlink");
    client
        .add_indirect_root(&link)
        .await
        .expect("addIndirectRoot");
    let auto = store.host_path("/nix/var/nix/gcroots/auto");
    let registered = std::fs::read_dir(&auto)
        .expect("gcroots/auto exists")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .any(|target| target == link);
    assert!(registered, "the indirect root points at our link");
    let perm = env.dir().join("perm");
    match version {
        NixVersion::Nix2_8 => {
            let err = client
                .add_perm_root(out, &perm)
                .await
                .expect_err("AddPermRoot needs 1.37");
            assert!(matches!(err, ClientError::Unsupported { .. }), "{err:?}");
            assert!(
                client.is_open(),
                "refusing locally does not close the connection"
            );
        }
        NixVersion::Nix2_26 => {
            let root = client.add_perm_root(out, &perm).await.expect("addPermRoot");
            assert_eq!(std::path::Path::new(&root), perm);
            assert_eq!(
                std::fs::read_link(&perm).expect("the root is a symlink"),
                std::path::Path::new(&StoreDir::default().print(out))
            );
            let registered = std::fs::read_dir(&auto)
                .expect("gcroots/auto exists")
                .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .any(|target| target == perm);
            assert!(registered, "the permanent root is registered");
        }
    }
}

#[tokio::test]
async fn text_paths_and_builds_by_path_in_an_isolated_store_on_nix_2_8() {
    text_paths_and_builds_by_path_in_an_isolated_store(NixVersion::Nix2_8).await;
}

#[tokio::test]
async fn text_paths_and_builds_by_path_in_an_isolated_store_on_nix_2_26() {
    text_paths_and_builds_by_path_in_an_isolated_store(NixVersion::Nix2_26).await;
}

async fn stdio_transport_serves_the_store(version: NixVersion) {
    let env = NixEnv::new();
    let store = IsolatedStore::new();
    let mut client = spawn_stdio_on(&store, version).await;
    assert_eq!(client.version(), protocol(version));
    let info = client
        .add_text_to_store(
            &format!("hello-{}", env.nonce()),
            b"hello\n",
            &BTreeSet::new(),
        )
        .await
        .expect("addToStore over stdio");
    assert!(client.is_valid_path(&info.path).await.expect("isValidPath"));
    let full = StoreDir::default().print(&info.path);
    assert_eq!(
        std::fs::read(store.host_path(&full)).expect("the file is in the isolated store"),
        b"hello\n"
    );
    client.close(Duration::from_secs(10)).await;
    run(store.command("nix-store").args(["--check-validity", &full]));
}

#[tokio::test]
async fn stdio_transport_serves_the_store_on_nix_2_8() {
    stdio_transport_serves_the_store(NixVersion::Nix2_8).await;
}

#[tokio::test]
async fn stdio_transport_serves_the_store_on_nix_2_26() {
    stdio_transport_serves_the_store(NixVersion::Nix2_26).await;
}

async fn dropping_a_build_request_cancels_the_build(version: NixVersion) {
    let env = NixEnv::new();
    let pid_file = env.dir().join("builder.pid");
    let expr = format!(
        r#"{{ slow = mkDrv {{ name = "slow"; args = [ "-c" "echo $$ > {}; echo started; exec /bin/sleep 120" ]; }}; }}"#,
        pid_file.display()
    );
    let drv = env.instantiate(&expr, &["slow"]);
    let (drv_path, drv) = read_drv(&drv[0]);
    let (basic, _) = drv.into_basic();

    for transport in ["socket", "stdio"] {
        let _ = std::fs::remove_file(&pid_file);
        let daemon;
        let mut client: DaemonClient = if transport == "socket" {
            daemon = Some(NixDaemon::start_version(version));
            connect(daemon.as_ref().expect("daemon")).await
        } else {
            daemon = None;
            match version {
                NixVersion::Nix2_8 => spawn_stdio(&env).await,
                NixVersion::Nix2_26 => spawn_stdio(&Nix226Store::host()).await,
            }
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        client.log_to(tx);
        {
            let build = client.build_derivation(&drv_path, &basic, BuildMode::Normal);
            tokio::pin!(build);
            let started = tokio::time::timeout(Duration::from_secs(60), async {
                loop {
                    tokio::select! {
                        ev = rx.recv() => {
                            let ev = ev.expect("log channel open");
                            if ev.build_log_line() == Some("started") {
                                break;
                            }
                        }
                        res = &mut build => panic!("{transport}: the build ended early: {res:?}"),
                    }
                }
            })
            .await;
            assert!(started.is_ok(), "{transport}: the builder did not start");
        } // The request future is dropped here.
        assert!(
            !client.is_open(),
            "{transport}: a cancelled request closes the connection"
        );
        let err = client.is_valid_path(&drv_path).await.expect_err("closed");
        assert!(matches!(err, ClientError::Closed { .. }), "{err:?}");

        let pid: u32 = std::fs::read_to_string(&pid_file)
            .expect("the builder wrote its pid")
            .trim()
            .parse()
            .expect("a pid");
        assert!(
            eventually(Duration::from_secs(30), || process_gone(pid)).await,
            "{transport}: the builder (pid {pid}) still runs after cancellation"
        );
        drop(daemon);
    }
}

#[tokio::test]
async fn dropping_a_build_request_cancels_the_build_on_nix_2_8() {
    dropping_a_build_request_cancels_the_build(NixVersion::Nix2_8).await;
}

#[tokio::test]
async fn dropping_a_build_request_cancels_the_build_on_nix_2_26() {
    dropping_a_build_request_cancels_the_build(NixVersion::Nix2_26).await;
}
