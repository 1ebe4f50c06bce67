//! Real Nix substitutes what the uploader writes: paths with references,
//! a self-reference and content addresses are built in the host's store,
//! uploaded through a real `nix-daemon` to a `file://` cache, and a fresh
//! isolated store fetches them with signatures required. A wrong key, a
//! tampered `.narinfo` and an unsigned cache are refused. Needs root.

#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::time::Duration;

use sluice_binary_cache::{
    BinaryCache, CacheConfig, Compression, DaemonNarSource, Destination, RetryPolicy, SecretKey,
    UploadError,
};
use sluice_test_support::nix::{NixCommands, NixDaemon};
use support::*;

fn cache_at(
    dir: &Path,
    daemon: &NixDaemon,
    key: Option<&KeyPair>,
    compression: Compression,
) -> BinaryCache<DaemonNarSource> {
    let destination = Destination::parse(&format!("file://{}", dir.display())).unwrap();
    let mut config = CacheConfig::new(destination);
    config.compression = compression;
    config.signing_key = key.map(|k| SecretKey::from_file(&k.secret_file()).unwrap());
    config.retry = RetryPolicy {
        attempts: 2,
        first_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(10),
    };
    BinaryCache::new(config, DaemonNarSource::new(daemon.socket_path())).unwrap()
}

/// Nix refused the substitute because no trusted key signed it.
fn refused_for_its_signature(out: &std::process::Output) {
    assert!(!out.status.success(), "{}", output_text(out));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("is not signed by any of the keys in 'trusted-public-keys'"),
        "{}",
        output_text(out)
    );
}

fn narinfo(cache: &Path, path: &str) -> String {
    let hash = store_path(path).hash_part().to_owned();
    std::fs::read_to_string(cache.join(format!("{hash}.narinfo")))
        .unwrap_or_else(|e| panic!("the .narinfo of {path}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_store_substitutes_every_compression_with_signatures_required() {
    let built = Built::new();
    let daemon = NixDaemon::start();
    let key = KeyPair::generate("sluice-test-1");
    let roots = [built.out("top"), built.out("ca")];
    let mut closure: Vec<String> = roots.iter().flat_map(|r| built.closure(r)).collect();
    closure.sort();
    closure.dedup();
    assert_eq!(
        closure.len(),
        5,
        "leaf, mid, greeting, top, ca: {closure:?}"
    );

    for compression in [Compression::Zstd, Compression::Xz, Compression::None] {
        let dir = tempfile::tempdir().unwrap();
        let cache = cache_at(dir.path(), &daemon, Some(&key), compression);
        let report = cache
            .upload_closure(roots.iter().map(|r| store_path(r)))
            .await
            .unwrap();
        assert_eq!(report.uploaded.len(), 5, "{compression}: {report:?}");
        assert_eq!(
            report.checked, 5,
            "{compression}: every path looked up once"
        );

        let info = std::fs::read_to_string(dir.path().join("nix-cache-info")).unwrap();
        assert_eq!(
            info,
            "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n"
        );
        let top = narinfo(dir.path(), &built.out("top"));
        assert!(
            top.contains(&format!("Compression: {}\n", compression.name())),
            "{top}"
        );
        let url = top
            .lines()
            .find_map(|l| l.strip_prefix("URL: "))
            .unwrap()
            .to_owned();
        assert!(
            url.ends_with(&format!(".nar{}", compression.extension())),
            "{url}"
        );
        assert!(dir.path().join(&url).is_file(), "{url} is in the cache");
        let deriver = store_path(&built.drv("top")).base_name().to_owned();
        assert!(top.contains(&format!("Deriver: {deriver}\n")), "{top}");
        let ca = narinfo(dir.path(), &built.out("ca"));
        assert!(ca.contains("\nCA: fixed:r:sha256:"), "{ca}");
        let greeting = closure.iter().find(|p| p.contains("greeting")).unwrap();
        assert!(
            narinfo(dir.path(), greeting).contains("\nCA: text:sha256:"),
            "builtins.toFile is text-addressed"
        );

        let client = fresh_store();
        let out = substitute(&client, dir.path(), &key.public, &roots);
        assert!(out.status.success(), "{compression}: {}", output_text(&out));
        command(
            client
                .command("nix-store")
                .arg("--verify-path")
                .args(&closure),
        );
        for path in &closure {
            assert!(client.host_path(path).exists(), "{path} substituted");
        }
        let text = std::fs::read_to_string(client.host_path(&built.out("top"))).unwrap();
        assert!(text.contains(&built.out("mid")), "{text}");
        let refs =
            command(
                client
                    .command("nix-store")
                    .args(["-q", "--references", &built.out("mid")]),
            );
        assert_eq!(refs.trim(), built.out("leaf"), "references survive");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nix_2_26_substitutes_a_zstd_cache() {
    let built = Built::new();
    let daemon = NixDaemon::start();
    let key = KeyPair::generate("sluice-test-1");
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_at(dir.path(), &daemon, Some(&key), Compression::Zstd);
    cache
        .upload_closure([store_path(&built.out("top"))])
        .await
        .unwrap();
    let client = fresh_store();
    let out = substitute(
        &client.nix_226(),
        dir.path(),
        &key.public,
        &[built.out("top")],
    );
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(client.host_path(&built.out("leaf")).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_key_a_tampered_narinfo_or_no_signature_is_refused() {
    let built = Built::new();
    let daemon = NixDaemon::start();
    let (key, other) = (
        KeyPair::generate("sluice-test-1"),
        KeyPair::generate("sluice-test-2"),
    );
    let top = built.out("top");
    let dir = tempfile::tempdir().unwrap();
    cache_at(dir.path(), &daemon, Some(&key), Compression::Zstd)
        .upload_closure([store_path(&top)])
        .await
        .unwrap();

    // Another key trusted.
    let client = fresh_store();
    let out = substitute(
        &client,
        dir.path(),
        &other.public,
        std::slice::from_ref(&top),
    );
    refused_for_its_signature(&out);
    assert!(!client.host_path(&top).exists());

    // The right key, but the .narinfo of `top` claims another size.
    let hash = store_path(&top).hash_part().to_owned();
    let file = dir.path().join(format!("{hash}.narinfo"));
    let original = std::fs::read_to_string(&file).unwrap();
    let tampered = original.replace("\nNarSize: ", "\nNarSize: 1");
    assert_ne!(tampered, original);
    std::fs::write(&file, tampered).unwrap();
    let client = fresh_store();
    let out = substitute(&client, dir.path(), &key.public, std::slice::from_ref(&top));
    refused_for_its_signature(&out);
    assert!(!client.host_path(&top).exists());
    std::fs::write(&file, &original).unwrap();
    let out = substitute(&client, dir.path(), &key.public, std::slice::from_ref(&top));
    assert!(out.status.success(), "restored: {}", output_text(&out));

    // An unsigned cache.
    let unsigned = tempfile::tempdir().unwrap();
    cache_at(unsigned.path(), &daemon, None, Compression::Zstd)
        .upload_closure([store_path(&top)])
        .await
        .unwrap();
    assert!(!narinfo(unsigned.path(), &top).contains("Sig:"));
    let client = fresh_store();
    let out = substitute(
        &client,
        unsigned.path(),
        &key.public,
        std::slice::from_ref(&top),
    );
    refused_for_its_signature(&out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_signature_is_the_one_nix_makes() {
    let built = Built::new();
    let daemon = NixDaemon::start();
    let key = KeyPair::generate("sluice-test-1");
    let dir = tempfile::tempdir().unwrap();
    let top = built.out("top");
    cache_at(dir.path(), &daemon, Some(&key), Compression::Xz)
        .upload_closure([store_path(&top)])
        .await
        .unwrap();
    let ours: Vec<String> = narinfo(dir.path(), &top)
        .lines()
        .filter_map(|l| l.strip_prefix("Sig: "))
        .map(str::to_owned)
        .collect();
    assert_eq!(ours.len(), 1, "{ours:?}");
    // Nix signs the same path in the host's store (Ed25519 signatures
    // are deterministic: the same key and message give the same bytes).
    command(
        built
            .env
            .command("nix")
            .args(["store", "sign", "--key-file"])
            .arg(key.secret_file())
            .arg(&top),
    );
    let json = command(
        built
            .env
            .command("nix")
            .args(["path-info", "--sigs", "--json", &top]),
    );
    assert!(
        json.contains(&ours[0]),
        "Nix signed {json}, we wrote {ours:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_upload_looks_up_the_roots_and_uploads_nothing() {
    let built = Built::new();
    let daemon = NixDaemon::start();
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_at(dir.path(), &daemon, None, Compression::Zstd);

    // `mid` (with `leaf`) first: `top` then adds itself and `greeting`.
    let first = cache
        .upload_closure([store_path(&built.out("mid"))])
        .await
        .unwrap();
    let names = |r: &sluice_binary_cache::UploadReport| -> Vec<String> {
        r.uploaded.iter().map(|p| p.name().to_owned()).collect()
    };
    let nonce = built.env.nonce().to_owned();
    assert_eq!(
        names(&first),
        [format!("leaf-{nonce}"), format!("mid-{nonce}")],
        "dependencies first"
    );
    let second = cache
        .upload_closure([store_path(&built.out("top"))])
        .await
        .unwrap();
    let mut got = names(&second);
    got.sort();
    assert_eq!(got, [format!("greeting-{nonce}"), format!("top-{nonce}")]);
    assert_eq!(second.present, 1, "mid, remembered: {second:?}");
    assert_eq!(second.checked, 2, "top and greeting: {second:?}");

    // All of it again, from the same uploader: nothing is even looked up.
    let again = cache
        .upload_closure([store_path(&built.out("top"))])
        .await
        .unwrap();
    assert!(again.uploaded.is_empty(), "{again:?}");
    assert_eq!((again.checked, again.present), (0, 1), "{again:?}");

    // From a new one: the root's .narinfo is looked up, and that is all.
    let fresh = cache_at(dir.path(), &daemon, None, Compression::Zstd);
    let report = fresh
        .upload_closure([
            store_path(&built.out("top")),
            store_path(&built.out("leaf")),
        ])
        .await
        .unwrap();
    assert!(report.uploaded.is_empty(), "{report:?}");
    assert_eq!((report.checked, report.present), (2, 2), "{report:?}");
    let files = std::fs::read_dir(dir.path().join("nar")).unwrap().count();
    assert_eq!(files, 4, "one NAR per path");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_narinfo_write_holds_back_its_dependents_and_a_retry_completes() {
    let built = Built::new();
    let daemon = NixDaemon::start();
    let key = KeyPair::generate("sluice-test-1");
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_at(dir.path(), &daemon, Some(&key), Compression::Zstd);
    let (leaf, mid, top) = (built.out("leaf"), built.out("mid"), built.out("top"));
    // A directory where `mid`'s .narinfo goes: writing it fails.
    let blocker = dir
        .path()
        .join(format!("{}.narinfo", store_path(&mid).hash_part()));
    std::fs::create_dir_all(blocker.join("x")).unwrap();

    let err = cache
        .upload_closure([store_path(&top)])
        .await
        .expect_err("mid's .narinfo cannot be written");
    assert!(matches!(err, UploadError::Cache(_)), "{err}");
    assert!(err.to_string().contains(".narinfo"), "{err}");
    let has = |p: &str| {
        dir.path()
            .join(format!("{}.narinfo", store_path(p).hash_part()))
            .is_file()
    };
    assert!(has(&leaf), "leaf needs nothing, so it is complete");
    assert!(!has(&mid), "mid failed");
    assert!(!has(&top), "top must wait for mid");

    std::fs::remove_dir_all(&blocker).unwrap();
    let report = cache.upload_closure([store_path(&top)]).await.unwrap();
    let mut names: Vec<&str> = report.uploaded.iter().map(|p| p.name()).collect();
    names.sort();
    assert_eq!(names.len(), 2, "mid and top: {names:?}");
    assert_eq!(
        report.nars_reused, 2,
        "their NARs were uploaded the first time"
    );
    let client = fresh_store();
    let out = substitute(&client, dir.path(), &key.public, std::slice::from_ref(&top));
    assert!(out.status.success(), "{}", output_text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_missing_from_the_store_is_a_permanent_error() {
    let daemon = NixDaemon::start();
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_at(dir.path(), &daemon, None, Compression::Zstd);
    let ghost = store_path("/nix/store/00000000000000000000000000000000-sluice-ghost");
    let err = cache
        .upload_closure([ghost])
        .await
        .expect_err("not in the store");
    assert!(!err.is_transient(), "{err}");
    assert!(err.to_string().contains("sluice-ghost"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_logs_are_where_nix_log_finds_them() {
    let built = Built::new();
    let daemon = NixDaemon::start();
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_at(dir.path(), &daemon, None, Compression::Zstd);
    let drv = built.drv("top");
    let log = b"building top\nsluice log line\n".to_vec();
    cache.upload_log(&store_path(&drv), &log[..]).await.unwrap();
    let key = format!("log/{}", store_path(&drv).base_name());
    assert_eq!(std::fs::read(dir.path().join(&key)).unwrap(), log, "plain");
    // `nix log` of an output finds its deriver in the output's .narinfo,
    // then the log under the deriver's name.
    cache
        .upload_closure([store_path(&built.out("top"))])
        .await
        .unwrap();
    let printed = command(
        built
            .env
            .command("nix")
            .args(["log", "--store"])
            .arg(format!("file://{}", dir.path().display()))
            .arg(built.out("top")),
    );
    assert!(
        printed.contains("sluice log line"),
        "nix log printed {printed:?}"
    );

    let err = cache
        .upload_log(&store_path(&built.out("top")), &log[..])
        .await
        .expect_err("not a derivation");
    assert!(err.to_string().contains("not a derivation"), "{err}");
}
