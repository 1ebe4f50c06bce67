//! What the binary cache tests share: a closure of real paths with
//! references, and clients substituting from a cache into a fresh,
//! isolated store. (They read the paths from a real `nix-daemon`'s socket
//! through [`sluice_binary_cache::DaemonNarSource`].)

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use sluice_nix::store_path::{StoreDir, StorePath};
use sluice_test_support::nix::{IsolatedStore, NixCommands, NixEnv};

/// `leaf`, a directory; `mid`, which refers to `leaf` (a symlink and a
/// file naming it); `top`, which refers to `mid`, to itself and to a text
/// file from `builtins.toFile` (content-addressed `text:`); and `ca`, a
/// floating content-addressed output that refers to `leaf`.
pub const CLOSURE: &str = r#"rec {
  greeting = builtins.toFile "greeting-${nonce}" "hello from the cache\n";
  leaf = mkDrv { name = "leaf"; PATH = "/usr/bin:/bin";
    args = [ "-c" "mkdir -p $out/bin && echo leaf > $out/data && printf '#!/bin/sh\necho hi\n' > $out/bin/hi && chmod +x $out/bin/hi" ]; };
  mid = mkDrv { name = "mid"; PATH = "/usr/bin:/bin"; inherit leaf;
    args = [ "-c" "mkdir $out && ln -s $leaf/data $out/link && echo $leaf > $out/ref" ]; };
  top = mkDrv { name = "top"; PATH = "/usr/bin:/bin"; inherit mid greeting;
    args = [ "-c" "echo $mid $greeting > $out && echo $out >> $out" ]; };
  ca = mkDrv { name = "ca"; PATH = "/usr/bin:/bin"; inherit leaf;
    __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256";
    args = [ "-c" "echo $leaf > $out" ]; };
}"#;

/// The closure built in the host's store.
pub struct Built {
    pub env: NixEnv,
    /// Attribute → `.drv` path and output path.
    pub drvs: Vec<(String, String)>,
    pub outs: Vec<(String, String)>,
}

impl Built {
    pub fn new() -> Built {
        let env = NixEnv::new();
        let attrs = ["leaf", "mid", "top", "ca"];
        let drvs = env.instantiate(CLOSURE, &attrs);
        let mut outs = Vec::new();
        for (attr, drv) in attrs.iter().zip(&drvs) {
            let out = env.realise(drv).remove(0);
            outs.push((attr.to_string(), out));
        }
        Built {
            drvs: attrs.iter().map(|a| a.to_string()).zip(drvs).collect(),
            outs,
            env,
        }
    }

    pub fn out(&self, attr: &str) -> String {
        self.outs
            .iter()
            .find(|(a, _)| a == attr)
            .map(|(_, o)| o.clone())
            .unwrap_or_else(|| panic!("no output for {attr}"))
    }

    pub fn drv(&self, attr: &str) -> String {
        self.drvs
            .iter()
            .find(|(a, _)| a == attr)
            .map(|(_, d)| d.clone())
            .unwrap_or_else(|| panic!("no drv for {attr}"))
    }

    /// The closure of `path` in the host's store, as `nix-store -qR` says.
    pub fn closure(&self, path: &str) -> Vec<String> {
        let out = sluice_test_support::nix::run(self.env.command("nix-store").args(["-qR", path]));
        let mut paths: Vec<String> = out.lines().map(str::to_owned).collect();
        paths.sort();
        paths
    }
}

pub fn store_path(printed: &str) -> StorePath {
    StoreDir::default()
        .parse_path(printed)
        .unwrap_or_else(|e| panic!("{printed}: {e}"))
}

/// A key pair made by `nix-store --generate-binary-cache-key`.
pub struct KeyPair {
    pub dir: tempfile::TempDir,
    pub public: String,
}

impl KeyPair {
    pub fn generate(name: &str) -> KeyPair {
        let dir = tempfile::tempdir().expect("temp dir");
        let (sk, pk) = (dir.path().join("secret"), dir.path().join("public"));
        sluice_test_support::nix::run(
            NixEnv::new()
                .command("nix-store")
                .arg("--generate-binary-cache-key")
                .arg(name)
                .arg(&sk)
                .arg(&pk),
        );
        let public = std::fs::read_to_string(&pk).expect("public key");
        KeyPair {
            dir,
            public: public.trim().to_owned(),
        }
    }

    pub fn secret_file(&self) -> PathBuf {
        self.dir.path().join("secret")
    }
}

/// `nix-store --realise paths` in a fresh store with `cache` as its only
/// substituter, signatures required and `public` trusted; the command's
/// output whether it succeeded or not.
pub fn substitute(
    client: &dyn NixCommands,
    cache: &Path,
    public: &str,
    paths: &[String],
) -> std::process::Output {
    let xdg = tempfile::tempdir().expect("temp dir");
    let mut cmd = client.command("nix-store");
    cmd.arg("--realise")
        .args(paths)
        .args(["--option", "substituters"])
        .arg(format!("file://{}", cache.display()))
        .args(["--option", "trusted-public-keys", public])
        .args(["--option", "require-sigs", "true"])
        // Nix's narinfo cache is per user: keep this run's to itself.
        .env("XDG_CACHE_HOME", xdg.path())
        .stdin(std::process::Stdio::null());
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

/// A fresh store, initialised.
pub fn fresh_store() -> IsolatedStore {
    let store = IsolatedStore::new();
    sluice_test_support::nix::run(store.command("nix-store").arg("--init"));
    store
}

pub fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn command(cmd: &mut Command) -> String {
    sluice_test_support::nix::run(cmd)
}
