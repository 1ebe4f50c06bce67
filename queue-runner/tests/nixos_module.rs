//! The NixOS module (`nixos/module.nix`) and the flake, evaluated with the
//! system's Nix and nixpkgs' `lib` (`nixos/eval-test.nix` declares the few
//! NixOS options the module sets). The units carry the settings that were
//! set, the flags and the TOML file they hand the binaries are accepted by
//! the binaries' own parsers, bad values are refused, and the flake parses
//! with the outputs it promises. The VM tests of `nixos-tests/` need a
//! full nixpkgs and run elsewhere (see the README).
//!
//! nixpkgs' `lib` is found at `$SLUICE_NIXPKGS_LIB`, else beside the
//! repository (`../shared/nixpkgs-lib/lib`), else at
//! `/work/shared/nixpkgs-lib/lib`; without it the tests fail and say so.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::{Args, ValueEnum};
use serde_json::Value;
use sluice_queue_runner::config::{ServeConfig, Settings};

/// Settings and flags another part of issue 9 adds to `serve` (the binary
/// cache). While `serve` lacks them the module's are checked by name
/// only; once it has them, like every other.
const LANDING: [&str; 3] = [
    "binary-cache",
    "signing-key-file",
    "binary-cache-compression",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_owned()
}

fn nixpkgs_lib() -> PathBuf {
    let candidates = std::env::var_os("SLUICE_NIXPKGS_LIB")
        .map(PathBuf::from)
        .into_iter()
        .chain([
            repo().join("../shared/nixpkgs-lib/lib"),
            PathBuf::from("/work/shared/nixpkgs-lib/lib"),
        ]);
    let mut tried = Vec::new();
    for dir in candidates {
        if dir.join("modules.nix").is_file() {
            return dir;
        }
        tried.push(dir.display().to_string());
    }
    panic!(
        "nixpkgs' lib not found (tried {}): clone github.com/nix-community/nixpkgs.lib \
         and set SLUICE_NIXPKGS_LIB to its lib/ directory",
        tried.join(", ")
    );
}

/// A case of `nixos/eval-test.nix`: its JSON, or Nix's error message.
fn eval(case: &str) -> Result<Value, String> {
    eval_with(case, &[])
}

/// [`eval`], with more arguments of `eval-test.nix` (Nix expressions).
fn eval_with(case: &str, args: &[(&str, &str)]) -> Result<Value, String> {
    let lib = nixpkgs_lib();
    let mut command = Command::new("nix-instantiate");
    for (name, value) in args {
        command.args(["--arg", name, value]);
    }
    let out = command
        .args(["--eval", "--strict", "--json"])
        .arg("--argstr")
        .arg("nixpkgsLib")
        .arg(&lib)
        .args(["-A", case])
        .arg(repo().join("nixos/eval-test.nix"))
        .output()
        .expect("running nix-instantiate (scripts/install-deps.sh installs it)");
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).expect("nix-instantiate printed JSON"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn evaluated(case: &str) -> Value {
    eval(case).unwrap_or_else(|e| panic!("evaluating case {case}: {e}"))
}

/// An ExecStart line split as systemd splits it: double-quoted words with
/// `\\` and `\"` escapes, then `%%` and `$$` made literal again.
fn exec_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek() == Some(&' ') {
            chars.next();
        }
        let Some(first) = chars.next() else {
            return words;
        };
        let mut word = String::new();
        if first == '"' {
            loop {
                match chars.next().expect("a closing quote") {
                    '"' => break,
                    '\\' => word.push(chars.next().expect("an escaped character")),
                    c => word.push(c),
                }
            }
        } else {
            word.push(first);
            while let Some(c) = chars.next_if(|c| *c != ' ') {
                word.push(c);
            }
        }
        words.push(word.replace("%%", "%").replace("$$", "$"));
    }
}

fn serve_flags() -> BTreeSet<String> {
    Settings::augment_args(clap::Command::new("serve"))
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_owned))
        .collect()
}

/// Parses the arguments after `serve` as `serve` does (its settings and
/// `--config`), leaving out the flags of [`LANDING`] it does not know yet.
fn parse_serve_args(args: &[String]) -> clap::ArgMatches {
    let known = serve_flags();
    let mut kept = vec!["serve".to_owned()];
    let mut words = args.iter();
    while let Some(word) = words.next() {
        let landing = word
            .strip_prefix("--")
            .is_some_and(|flag| LANDING.contains(&flag) && !known.contains(flag));
        if landing {
            words.next();
        } else {
            kept.push(word.clone());
        }
    }
    let command = Settings::augment_args(clap::Command::new("serve"))
        .arg(clap::Arg::new("config").long("config"));
    command
        .try_get_matches_from(&kept)
        .unwrap_or_else(|e| panic!("serve refuses {kept:?}: {e}"))
}

/// The rendered settings as `serve` reads its TOML file, leaving out the
/// keys of [`LANDING`] it does not know yet.
fn read_settings(settings: &Value) -> Settings {
    let mut table: toml::Table = toml::Value::try_from(settings)
        .expect("the settings are TOML values")
        .try_into()
        .expect("a table");
    let known = serve_flags();
    for key in LANDING {
        if !known.contains(key) {
            table.remove(key);
        }
    }
    let text = toml::to_string(&table).expect("renders as TOML");
    toml::from_str(&text).unwrap_or_else(|e| panic!("serve refuses its config file:\n{text}\n{e}"))
}

fn service<'a>(summary: &'a Value, which: &str) -> &'a Value {
    &summary[which]["unit"]["serviceConfig"]
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("a list: {value}"))
        .iter()
        .map(|v| v.as_str().expect("a string"))
        .collect()
}

#[test]
fn the_queue_runner_unit_runs_serve_with_the_rendered_settings() {
    let s = evaluated("realistic");
    let unit = service(&s, "queueRunner");
    assert_eq!(unit["Type"], "notify");
    assert_eq!(unit["Restart"], "on-failure");
    assert_eq!(unit["KillSignal"], "SIGTERM");
    assert_eq!(unit["KillMode"], "mixed");
    assert_eq!(unit["TimeoutStopSec"], 50 + 30, "shutdown-timeout-s + 30");
    assert_eq!(unit["User"], "sluice");
    assert_eq!(unit["StateDirectory"], "sluice");
    assert_eq!(unit["ProtectSystem"], "strict");
    assert_eq!(unit["NoNewPrivileges"], true);
    assert_eq!(unit["PrivateTmp"], true);
    assert_eq!(unit["EnvironmentFile"], "/run/secrets/sluice-env");

    let config_file = s["queueRunner"]["configFile"].as_str().expect("a path");
    let hash = s["queueRunner"]["settingsHash"].as_str().expect("a hash");
    assert!(
        config_file.ends_with(&format!("/{hash}-sluice-queue-runner.toml")),
        "{config_file} is not rendered from the settings"
    );
    let words = exec_words(unit["ExecStart"].as_str().expect("ExecStart"));
    assert_eq!(
        words,
        [
            "/nix/store/00000000000000000000000000000000-sluice-0.1.0/bin/queue-runner",
            "--log-format",
            "json",
            "serve",
            "--config",
            config_file,
            "--agent-token-file",
            "%d/agent-token-file",
            "--signing-key-file",
            "%d/signing-key-file",
        ]
    );
    sluice_queue_runner::logging::LogFormat::from_str(&words[2], false).expect("a log format");
    let matches = parse_serve_args(&words[4..]);
    assert_eq!(
        matches.get_one::<String>("config").map(String::as_str),
        Some(config_file)
    );
    // The secrets reach the service as credentials, never through the store.
    assert_eq!(
        strings(&unit["LoadCredential"]),
        [
            "agent-token-file:/run/secrets/agent-tokens",
            "signing-key-file:/run/secrets/cache-key"
        ]
    );

    let settings = &s["queueRunner"]["settings"];
    assert_eq!(settings["binary-cache"], "file:///srv/binary-cache");
    assert_eq!(settings["binary-cache-compression"], "xz");
    assert_eq!(
        settings["database-url"],
        "postgres://sluice@localhost/sluice?host=/run/postgresql"
    );
    // The file:// cache is made, and writable despite ProtectSystem.
    assert!(strings(&unit["ReadWritePaths"]).contains(&"/srv/binary-cache"));
    assert!(strings(&s["tmpfiles"]).contains(&"d /srv/binary-cache 0750 sluice sluice - -"));

    // `serve` reads the file into the settings that were set.
    let file = read_settings(settings);
    let cli = Settings {
        agent_token_file: Some("/run/credentials/x/agent-token-file".into()),
        ..Settings::default()
    };
    let config = ServeConfig::resolve(file, cli).expect("serve resolves its settings");
    assert_eq!(config.grpc_listen.to_string(), "0.0.0.0:50051");
    assert_eq!(config.lease.as_secs(), 45);
    assert_eq!(config.shutdown_timeout.as_secs(), 50);
    assert_eq!(config.max_cpu_pressure, 80.0);
    assert_eq!(config.dispatch_order, sluice_core::ConfiguredOrder::Hydra);
    assert_eq!(config.status_interval.as_secs(), 10);
    assert_eq!(
        config.store_socket.as_deref(),
        Some(Path::new("/nix/var/nix/daemon-socket/socket"))
    );

    // PostgreSQL on the machine, started first; the gRPC port open; the
    // queue runner trusted by the daemon it adds outputs through.
    let after = strings(&s["queueRunner"]["unit"]["after"]);
    assert!(after.contains(&"postgresql.service") && after.contains(&"nix-daemon.socket"));
    assert_eq!(
        strings(&s["queueRunner"]["unit"]["requires"]),
        ["postgresql.service"]
    );
    assert_eq!(s["postgresql"]["enable"], true);
    assert_eq!(strings(&s["postgresql"]["ensureDatabases"]), ["sluice"]);
    assert_eq!(s["firewallPorts"], serde_json::json!([50051]));
    assert_eq!(strings(&s["trustedUsers"]), ["sluice"]);
    // Environment set elsewhere merges in; no embedded database.
    let env = &s["queueRunner"]["unit"]["environment"];
    assert_eq!(env["RUST_LOG"], "info,sluice_queue_runner=debug");
    assert!(env.get("SLUICE_PG_BIN").is_none(), "{env}");
}

#[test]
fn the_agent_unit_passes_flags_the_agent_accepts() {
    let s = evaluated("realistic");
    let unit = service(&s, "builderAgent");
    assert_eq!(unit["Type"], "notify");
    assert_eq!(unit["Restart"], "on-failure");
    assert_eq!(unit["KillSignal"], "SIGTERM");
    assert_eq!(unit["KillMode"], "mixed", "the builds must outlive SIGTERM");
    assert_eq!(unit["TimeoutStopSec"], 1800 + 60, "drain-timeout-s + 60");
    assert_eq!(unit["Delegate"], true);
    assert_eq!(unit["User"], "root");
    assert_eq!(unit["StateDirectory"], "sluice-builder-agent");
    assert_eq!(unit["PrivateTmp"], true);
    assert_eq!(unit["NoNewPrivileges"], true);
    for relaxed in [
        "ProtectKernelTunables",
        "ProtectControlGroups",
        "PrivateDevices",
        "SystemCallFilter",
        "RestrictNamespaces",
        "MemoryDenyWriteExecute",
    ] {
        assert!(unit.get(relaxed).is_none(), "{relaxed} would break builds");
    }

    let words = exec_words(unit["ExecStart"].as_str().expect("ExecStart"));
    assert_eq!(
        words[0],
        "/nix/store/00000000000000000000000000000000-sluice-0.1.0/bin/builder-agent"
    );
    let cli = <sluice_builder_agent::Cli as clap::Parser>::try_parse_from(&words)
        .unwrap_or_else(|e| panic!("builder-agent refuses {words:?}: {e}"));
    assert_eq!(cli.queue_runner, "http://runner.example.org:50051");
    assert_eq!(cli.token_file, Path::new("/run/secrets/agent-token"));
    assert_eq!(cli.name.as_deref(), Some("builder-7"));
    assert_eq!(cli.systems, ["x86_64-linux", "i686-linux"]);
    assert_eq!(cli.features, ["kvm", "big-parallel"]);
    assert!(cli.mandatory_features.is_empty());
    assert_eq!(
        (cli.slots, cli.cpus_per_slot, cli.max_jobs, cli.prefetch),
        (Some(4), Some(8), Some(4), Some(2))
    );
    assert_eq!(cli.pinning, sluice_builder_agent::config::Pinning::On);
    assert_eq!(cli.speed_factor, 1.5);
    assert_eq!(cli.drain_timeout_s, 1800);
    assert_eq!(cli.log_format, sluice_builder_agent::LogFormat::Text);
}

#[test]
fn without_a_database_url_the_queue_runner_starts_its_own() {
    let s = evaluated("minimal");
    let unit = service(&s, "queueRunner");
    let env = &s["queueRunner"]["unit"]["environment"];
    assert_eq!(
        env["SLUICE_PG_BIN"],
        "/nix/store/00000000000000000000000000000000-postgresql-17/bin"
    );
    assert_eq!(unit["MemoryDenyWriteExecute"], true);
    assert_eq!(unit["TimeoutStopSec"], 30 + 30);
    assert!(s["postgresql"].as_object().expect("an attrset").is_empty());
    assert_eq!(s["users"]["sluice"]["home"], "/var/lib/sluice");
    assert_eq!(strings(&s["trustedUsers"]), ["sluice"]);
    let settings = &s["queueRunner"]["settings"];
    assert!(settings.get("database-url").is_none(), "{settings}");
    let config = ServeConfig::resolve(
        read_settings(settings),
        Settings {
            agent_token_file: Some("t".into()),
            ..Settings::default()
        },
    )
    .expect("resolves");
    assert!(config.database_url.is_none());
    assert_eq!(config.data_dir, Path::new("/var/lib/sluice"));

    let agent = service(&s, "builderAgent");
    assert_eq!(agent["TimeoutStopSec"], 600 + 60);
    let words = exec_words(agent["ExecStart"].as_str().expect("ExecStart"));
    let cli = <sluice_builder_agent::Cli as clap::Parser>::try_parse_from(&words)
        .unwrap_or_else(|e| panic!("builder-agent refuses {words:?}: {e}"));
    assert!(cli.systems.is_empty() && cli.slots.is_none() && cli.store_socket.is_none());
}

#[test]
fn as_root_the_queue_runner_serves_the_store_itself_with_less_hardening() {
    let s = evaluated("root");
    let unit = service(&s, "queueRunner");
    assert_eq!(unit["User"], "root");
    assert_eq!(unit["ProtectSystem"], "full");
    assert!(unit.get("SystemCallFilter").is_none() && unit.get("StateDirectory").is_none());
    assert!(s["queueRunner"]["settings"].get("store-socket").is_none());
    assert!(strings(&s["trustedUsers"]).is_empty());
    assert!(s["users"].as_object().expect("an attrset").is_empty());
    // A data directory outside /var/lib is made and writable.
    assert_eq!(unit["WorkingDirectory"], "/srv/sluice");
    assert!(strings(&s["tmpfiles"]).contains(&"d /srv/sluice 0750 root sluice - -"));

    // A PostgreSQL with a JIT needs writable and executable memory.
    let jit = evaluated("jit");
    assert_eq!(
        service(&jit, "queueRunner")["MemoryDenyWriteExecute"],
        false
    );
}

#[test]
fn the_readmes_module_example_evaluates_as_printed() {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    let marker = "evaluates this block with the module, as printed)";
    let rest = &readme[readme.find(marker).expect("the example's marker")..];
    let open = rest.find("```nix\n").expect("a nix block") + "```nix\n".len();
    let close = rest[open..].find("```").expect("its end");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("ci.nix");
    std::fs::write(&file, &rest[open..open + close]).expect("write");

    let s = eval_with("example", &[("example", file.to_str().expect("utf-8"))])
        .unwrap_or_else(|e| panic!("the README's example: {e}"));
    let words = exec_words(
        service(&s, "queueRunner")["ExecStart"]
            .as_str()
            .expect("ExecStart"),
    );
    assert!(
        words.contains(&"%d/signing-key-file".to_owned()),
        "{words:?}"
    );
    parse_serve_args(&words[4..]);
    let settings = &s["queueRunner"]["settings"];
    assert_eq!(
        settings["binary-cache"],
        "file:///var/lib/sluice/binary-cache"
    );
    read_settings(settings);
    assert_eq!(s["firewallPorts"], serde_json::json!([50051]));
    let words = exec_words(
        service(&s, "builderAgent")["ExecStart"]
            .as_str()
            .expect("ExecStart"),
    );
    let cli = <sluice_builder_agent::Cli as clap::Parser>::try_parse_from(&words)
        .unwrap_or_else(|e| panic!("builder-agent refuses {words:?}: {e}"));
    assert_eq!(cli.features, ["kvm", "big-parallel"]);
}

#[test]
fn bad_values_and_contradictions_are_refused() {
    let cases = [
        (
            "bad.maxJobsType",
            "services.sluice.builderAgent.settings.max-jobs' is not of type",
        ),
        (
            "bad.dispatchOrder",
            "services.sluice.queueRunner.settings.dispatch-order' is not of type",
        ),
        ("bad.storeWithoutRoot", "needs user = \"root\""),
        ("bad.stopBeforeDrain", "must be"),
        ("bad.slotsAlone", "go together"),
    ];
    for (case, expected) in cases {
        let err = eval(case).expect_err(case);
        let err = err.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(err.contains(expected), "{case}: {err}");
    }
}

/// Runs `nix` with flakes on a copy of the flake's files (a `path:` flake
/// of the whole worktree would copy its target directory into the store),
/// with nixpkgs replaced by the local `lib`: enough to lock the flake and
/// list its outputs, without a network.
fn nix_flake(dir: &Path, args: &[&str]) -> Value {
    let flake = format!("path:{}", dir.display());
    let out = Command::new("nix")
        .args(["--extra-experimental-features", "nix-command flakes"])
        .args(args.iter().map(|a| a.replace("FLAKE", &flake)))
        .args([
            "--json",
            "--no-write-lock-file",
            "--override-input",
            "nixpkgs",
        ])
        .arg(format!("path:{}", nixpkgs_lib().display()))
        .output()
        .expect("running nix");
    assert!(
        out.status.success(),
        "nix {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("nix printed JSON")
}

#[test]
fn the_flake_parses_and_has_its_outputs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let status = Command::new("cp")
        .arg("-r")
        .args(["flake.nix", "nixos", "nixos-tests"].map(|f| repo().join(f)))
        .arg(dir.path())
        .status()
        .expect("cp");
    assert!(status.success());

    let metadata = nix_flake(dir.path(), &["flake", "metadata", "FLAKE"]);
    assert!(metadata["description"]
        .as_str()
        .is_some_and(|d| d.contains("Hydra")));
    let nixpkgs = &metadata["locks"]["nodes"]["nixpkgs"]["original"];
    assert_eq!(
        (&nixpkgs["owner"], &nixpkgs["repo"]),
        (&"NixOS".into(), &"nixpkgs".into())
    );
    let root_inputs = &metadata["locks"]["nodes"]["root"]["inputs"];
    assert_eq!(
        root_inputs.as_object().map(|o| o.len()),
        Some(1),
        "nixpkgs only"
    );

    let names = "builtins.mapAttrs (_: builtins.attrNames)";
    let systems = serde_json::json!(["aarch64-linux", "x86_64-linux"]);
    for (output, expected) in [
        (
            "packages",
            serde_json::json!(["builder-agent", "default", "queue-runner"]),
        ),
        ("devShells", serde_json::json!(["default"])),
        (
            "checks",
            serde_json::json!([
                "default",
                "sluice-binary-cache",
                "sluice-builder-reboot",
                "sluice-farm"
            ]),
        ),
    ] {
        let per_system = nix_flake(
            dir.path(),
            &["eval", &format!("FLAKE#{output}"), "--apply", names],
        );
        let keys: Vec<&String> = per_system.as_object().expect("systems").keys().collect();
        assert_eq!(serde_json::json!(keys), systems, "{output}");
        for (system, got) in per_system.as_object().expect("systems") {
            assert_eq!(got, &expected, "{output}.{system}");
        }
    }
    let modules = nix_flake(
        dir.path(),
        &[
            "eval",
            "FLAKE#nixosModules",
            "--apply",
            "builtins.attrNames",
        ],
    );
    assert_eq!(
        modules,
        serde_json::json!(["default", "sluice", "sluice-without-packages"])
    );
}
