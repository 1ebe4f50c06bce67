//! The README's commands and every `--help` example, run exactly as
//! printed: each in a private network namespace (so the fixed ports
//! 50051 and 9198 are ours alone) and a private, empty Nix store, with the
//! executables this test run built first on `PATH`.

#![allow(clippy::unwrap_used)]

mod cli;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use cli::*;
use sluice_test_support::nix::NIX_CONFIG;

/// How long one sandboxed script may take before it is killed.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(600);

/// The fenced ```sh block of `markdown` that follows the line `after`.
fn block_after<'a>(markdown: &'a str, after: &str) -> &'a str {
    let start = markdown
        .find(after)
        .unwrap_or_else(|| panic!("no {after:?} in the README"));
    let rest = &markdown[start..];
    let open = rest.find("```sh\n").unwrap() + "```sh\n".len();
    let close = rest[open..].find("```").unwrap();
    &rest[open..open + close]
}

/// The `$ ` lines of a command's `--help`.
fn help_examples(args: &[&str]) -> Vec<String> {
    let program = if args.first() == Some(&"builder-agent") {
        builder_agent()
    } else {
        QUEUE_RUNNER.into()
    };
    let args = if args.first() == Some(&"builder-agent") {
        &args[1..]
    } else {
        args
    };
    let out = Command::new(program)
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("$ "))
        .map(str::to_owned)
        .collect()
}

/// Runs `script` with bash in `workdir`, inside a new mount and network
/// namespace: loopback up, an empty store bound over `/nix`, our
/// executables first on `PATH`. Kills it after [`SCRIPT_TIMEOUT`].
fn run_sandboxed(workdir: &Path, script: &str) -> Output {
    let store = tempfile::Builder::new()
        .prefix("sluice-store-")
        .tempdir()
        .unwrap();
    let prelude = r#"
set -euo pipefail
ip link set lo up
mount --bind "$SANDBOX_STORE" /nix
nix-store --init
export PATH="$SANDBOX_BIN:$PATH"
cd "$SANDBOX_WORKDIR"
"#;
    let child = Command::new("unshare")
        .args(["--mount", "--net", "--propagation", "private", "--"])
        .args(["timeout", "--signal=KILL"])
        .arg(SCRIPT_TIMEOUT.as_secs().to_string())
        .args(["bash", "-c"])
        .arg(format!("{prelude}\n{script}"))
        .env("SANDBOX_STORE", store.path())
        .env("SANDBOX_BIN", bin_dir())
        .env("SANDBOX_WORKDIR", workdir)
        .env("NIX_CONFIG", NIX_CONFIG)
        .env("NIX_REMOTE", "local")
        .env_remove("DATABASE_URL")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.wait_with_output().unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "exit: {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A working directory as the README's walkthrough expects: the
/// repository's `examples/`.
fn workdir() -> tempfile::TempDir {
    let dir = data_dir();
    // Searchable by the user the embedded PostgreSQL runs as, as a home
    // directory usually is.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .unwrap();
    let examples = dir.path().join("examples");
    std::fs::create_dir(&examples).unwrap();
    for entry in std::fs::read_dir(repo_root().join("examples")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), examples.join(entry.file_name())).unwrap();
    }
    dir
}

#[test]
fn the_readme_walkthrough_runs_as_printed() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let block = block_after(&readme, "Then (a test runs this block exactly as printed");
    let dir = workdir();
    let _leftovers = StopLeftovers(dir.path().join("sluice-data"));

    let out = run_sandboxed(dir.path(), block);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(all.contains("all 1 builds succeeded"), "{all}");
    // The operator can follow it: the agent's arrival is in the log.
    let connected = all
        .lines()
        .find(|l| l.contains("agent connected"))
        .unwrap_or_else(|| panic!("no 'agent connected' line:\n{all}"));
    assert!(
        connected.contains("slots=2") && connected.contains("systems="),
        "{connected}"
    );
    // Stopped with SIGTERM: its embedded PostgreSQL went with it.
    assert!(all.contains("the embedded PostgreSQL stopped"), "{all}");
    assert!(postmasters_of(&dir.path().join("sluice-data")).is_empty());
}

#[test]
fn the_readme_main_job_runs() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let block = block_after(&readme, "Run the main job on one machine");
    assert_eq!(block.trim(), "scripts/run-example.sh");
    let data = data_dir();
    let _leftovers = StopLeftovers(data.path().to_path_buf());

    let script = format!(
        "cd {root}\nSLUICE_BIN_DIR=\"$SANDBOX_BIN\" SLUICE_DATA={data} {block}",
        root = repo_root().display(),
        data = data.path().display(),
    );
    let out = run_sandboxed(data.path(), &script);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(all.contains("all 4 builds succeeded"), "{all}");
    assert!(postmasters_of(data.path()).is_empty(), "{all}");
}

#[test]
fn every_help_example_runs_as_printed() {
    let serve = help_examples(&["serve"]);
    let migrate = help_examples(&["migrate"]);
    let submit = help_examples(&["submit"]);
    let agent = help_examples(&["builder-agent"]);
    assert_eq!(
        (serve.len(), migrate.len(), submit.len(), agent.len()),
        (2, 1, 2, 1),
        "{serve:?} {migrate:?} {submit:?} {agent:?}"
    );
    let up = "until curl -fs http://127.0.0.1:9198/status >/dev/null; do sleep 1; done";
    let script = format!(
        r#"
head -c 24 /dev/urandom | base64 > agent-tokens
{serve0} &
qr=$!
{agent0} &
ag=$!
{up}
{migrate0}
{submit0}
{submit1}
kill -TERM $qr $ag; wait $qr; wait $ag || true
{serve1} &
qr=$!
{up}
kill -TERM $qr; wait $qr
echo "every example ran"
"#,
        serve0 = serve[0],
        serve1 = serve[1],
        agent0 = agent[0],
        migrate0 = migrate[0],
        submit0 = submit[0],
        submit1 = submit[1],
    );
    let dir = workdir();
    let _leftovers = StopLeftovers(dir.path().join("sluice-data"));
    let out = run_sandboxed(dir.path(), &script);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(all.contains("every example ran"), "{all}");
    assert_eq!(all.matches("all 1 builds succeeded").count(), 2, "{all}");
    assert!(postmasters_of(&dir.path().join("sluice-data")).is_empty());
}
