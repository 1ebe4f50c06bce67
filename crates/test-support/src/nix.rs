//! Nix for tests: configuration, unique derivations, private daemons and
//! isolated stores.
//!
//! Nix is configured only through the `NIX_CONFIG` environment variable of
//! the processes we spawn ([`NIX_CONFIG`]): root builds without build users,
//! no sandbox, no substituters, content-addressed derivations enabled.
//! Nothing in `/etc` is touched.
//!
//! Invariants: every derivation written through [`NixEnv::instantiate`]
//! carries the environment's nonce in its name, so two test runs (or two
//! tests) never share a `.drv` or an output path; every spawned daemon is
//! killed with its whole process group on drop. A daemon's stderr goes to
//! a log file next to its socket, not to the test's output: its workers
//! print an error each time a client closes a connection early (as the
//! readiness check does), which is expected. The log is shown when the
//! daemon does not come up, and when it is dropped by a failing test.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// The `NIX_CONFIG` every Nix process in tests runs with.
pub const NIX_CONFIG: &str = "build-users-group =\nsandbox = false\nsubstituters =\nexperimental-features = nix-command ca-derivations\n";

/// Checks that the Nix tools are installed, and says how to get them if not.
pub fn require_nix() -> Result<(), String> {
    require_nix_on(std::env::var_os("PATH").as_deref())
}

/// [`require_nix`] for a given `PATH` value.
pub fn require_nix_on(path: Option<&std::ffi::OsStr>) -> Result<(), String> {
    let found = |prog: &str| {
        path.map(|p| std::env::split_paths(p).any(|d| d.join(prog).is_file()))
            .unwrap_or(false)
    };
    let missing: Vec<&str> = ["nix-instantiate", "nix-store", "nix-daemon", "nix"]
        .into_iter()
        .filter(|p| !found(p))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "Nix is not installed ({} not on PATH); install it with `apt-get install -y nix-bin` \
             (Nix 2.8 or newer), or run the README's test command, which installs it",
            missing.join(", ")
        ));
    }
    if !Path::new("/nix").is_dir() {
        return Err("/nix does not exist; `apt-get install -y nix-bin` creates it".into());
    }
    Ok(())
}

fn require_nix_or_panic() {
    if let Err(e) = require_nix() {
        panic!("test harness: {e}");
    }
}

/// Something that can start Nix commands against some store: the host's
/// store ([`NixEnv`]) or an [`IsolatedStore`].
pub trait NixCommands {
    /// A command for `program` (e.g. `nix-store`) configured for tests.
    fn command(&self, program: &str) -> Command;
}

fn configured(program: &str) -> Command {
    let mut cmd = Command::new(program);
    // `NIX_REMOTE=local` on purpose: with the store left to "auto", a Nix
    // that cannot yet write a fresh store's state directory falls back to
    // the daemon socket, and a daemon's worker would then connect to its
    // own daemon, forever.
    cmd.env("NIX_CONFIG", NIX_CONFIG)
        .env("NIX_REMOTE", "local")
        .env_remove("NIX_DAEMON_SOCKET_PATH");
    cmd
}

/// A per-test Nix environment on the host's store.
pub struct NixEnv {
    dir: tempfile::TempDir,
    nonce: String,
}

impl Default for NixEnv {
    fn default() -> Self {
        Self::new()
    }
}

impl NixEnv {
    /// Panics with install instructions if Nix is missing.
    pub fn new() -> NixEnv {
        require_nix_or_panic();
        let dir = tempfile::Builder::new()
            .prefix("sluice-nix-")
            .tempdir()
            .expect("test harness: creating a temp dir for Nix expressions");
        let nonce = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        NixEnv { dir, nonce }
    }

    /// The string that makes this environment's derivations unique.
    pub fn nonce(&self) -> &str {
        &self.nonce
    }

    /// A scratch directory that lives as long as the environment.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `expr` into a file in which `nonce` and `mkDrv` are in scope.
    ///
    /// `mkDrv attrs` is `derivation` with `system = builtins.currentSystem`
    /// and `builder = "/bin/sh"` as defaults, and with the nonce appended to
    /// `name` (so `mkDrv { name = "a"; args = ["-c" "echo hi > $out"]; }`).
    pub fn write_expr(&self, expr: &str) -> PathBuf {
        let text = format!(
            "{{ nonce ? \"{nonce}\" }}:\nlet\n  mkDrv = args: derivation ({{ system = builtins.currentSystem; builder = \"/bin/sh\"; }} // args // {{ name = \"${{args.name}}-${{nonce}}\"; }});\nin\n{expr}\n",
            nonce = self.nonce
        );
        let path = self
            .dir
            .path()
            .join(format!("expr-{}.nix", uuid::Uuid::new_v4().simple()));
        std::fs::write(&path, text).expect("test harness: writing a Nix expression");
        path
    }

    /// Instantiates `attrs` of `expr` (see [`NixEnv::write_expr`]) in the
    /// host's store and returns the `.drv` paths, one per attribute.
    pub fn instantiate(&self, expr: &str, attrs: &[&str]) -> Vec<String> {
        self.instantiate_in(self, expr, attrs)
    }

    /// Like [`NixEnv::instantiate`], in the store that `store` commands see.
    pub fn instantiate_in(
        &self,
        store: &dyn NixCommands,
        expr: &str,
        attrs: &[&str],
    ) -> Vec<String> {
        let file = self.write_expr(expr);
        attrs
            .iter()
            .map(|attr| {
                let out = run(store
                    .command("nix-instantiate")
                    .arg(&file)
                    .args(["-A", attr]));
                let path = out.lines().last().unwrap_or_default().trim().to_string();
                assert!(
                    path.ends_with(".drv"),
                    "test harness: nix-instantiate -A {attr} printed no .drv path: {out:?}"
                );
                path
            })
            .collect()
    }

    /// Builds `drv` with `nix-store --realise` and returns its output paths.
    pub fn realise(&self, drv: &str) -> Vec<String> {
        realise_in(self, drv)
    }
}

impl NixCommands for NixEnv {
    fn command(&self, program: &str) -> Command {
        configured(program)
    }
}

/// Builds `drv` in the store that `store` commands see; returns its outputs.
pub fn realise_in(store: &dyn NixCommands, drv: &str) -> Vec<String> {
    run(store.command("nix-store").args(["--realise", drv]))
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// Runs `cmd`, panicking with its stderr unless it succeeds; returns stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("test harness: cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "test harness: {cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("test harness: command printed non-UTF-8")
}

/// A store of its own: commands run in a private mount namespace in which
/// an initially empty directory is bind-mounted over `/nix`. Needs root.
pub struct IsolatedStore {
    dir: tempfile::TempDir,
}

impl Default for IsolatedStore {
    fn default() -> Self {
        Self::new()
    }
}

impl IsolatedStore {
    pub fn new() -> IsolatedStore {
        require_nix_or_panic();
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "test harness: an isolated store needs root (mount namespaces and bind mounts)"
        );
        let dir = tempfile::Builder::new()
            .prefix("sluice-store-")
            .tempdir()
            .expect("test harness: creating a temp dir for an isolated store");
        std::fs::create_dir(dir.path().join("nix")).expect("test harness: creating store root");
        IsolatedStore { dir }
    }

    /// The directory that this store's processes see as `/nix`.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("nix")
    }

    /// A path as seen from outside, e.g. `/nix/store/...` → `<root>/store/...`.
    pub fn host_path(&self, path: &str) -> PathBuf {
        let rel = path.strip_prefix("/nix/").unwrap_or(path);
        self.root().join(rel)
    }

    /// Starts a `nix-daemon` serving this store on a socket outside it.
    ///
    /// The store is initialised first: otherwise the daemon's first
    /// workers race to create its directories and symlinks, and one of
    /// them dies with "File exists", resetting its client's connection.
    pub fn start_daemon(&self) -> NixDaemon {
        run(self.command("nix-store").arg("--init"));
        NixDaemon::start_with(self)
    }
}

impl NixCommands for IsolatedStore {
    fn command(&self, program: &str) -> Command {
        let mut cmd = configured("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg("mount --bind \"$0\" /nix && exec \"$@\"")
            .arg(self.root())
            .arg(program);
        cmd
    }
}

/// A private `nix-daemon` on its own socket. Killed (with its process
/// group, i.e. its per-connection workers and builds) on drop. What it
/// prints goes to [`NixDaemon::log_path`].
pub struct NixDaemon {
    child: Child,
    dir: tempfile::TempDir,
}

/// The name of a daemon's log file, next to its socket.
const DAEMON_LOG: &str = "daemon.log";

/// How many lines of a daemon's log a failing test shows.
const LOG_LINES_SHOWN: usize = 50;

impl NixDaemon {
    /// A daemon serving the host's store.
    pub fn start() -> NixDaemon {
        require_nix_or_panic();
        Self::start_with(&HostStore)
    }

    fn start_with(store: &dyn NixCommands) -> NixDaemon {
        let dir = tempfile::Builder::new()
            .prefix("sluice-daemon-")
            .tempdir()
            .expect("test harness: creating a temp dir for a daemon socket");
        let socket = dir.path().join("socket");
        let log_path = dir.path().join(DAEMON_LOG);
        let log = std::fs::File::create(&log_path).unwrap_or_else(|e| {
            panic!(
                "test harness: creating the daemon log {}: {e}",
                log_path.display()
            )
        });
        let mut cmd = store.command("nix-daemon");
        cmd.env("NIX_DAEMON_SOCKET_PATH", &socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("test harness: cannot start nix-daemon: {e}"));
        let mut daemon = NixDaemon { child, dir };
        // The socket file appears just before the daemon listens on it:
        // wait until a connection is accepted, not until the file exists.
        let up = crate::wait_until(Duration::from_secs(30), || {
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
                || matches!(daemon.child.try_wait(), Ok(Some(_)))
        });
        assert!(
            up && std::os::unix::net::UnixStream::connect(&socket).is_ok(),
            "test harness: nix-daemon is not accepting connections on {}; its log:\n{}",
            socket.display(),
            daemon.log()
        );
        daemon
    }

    /// The Unix socket the daemon listens on.
    pub fn socket_path(&self) -> PathBuf {
        self.dir.path().join("socket")
    }

    /// The file the daemon's stderr goes to.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join(DAEMON_LOG)
    }

    /// What the daemon has printed so far.
    pub fn log(&self) -> String {
        std::fs::read(self.log_path())
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_else(|e| format!("(cannot read {}: {e})", self.log_path().display()))
    }

    /// A `--store` URI for this daemon.
    pub fn store_uri(&self) -> String {
        format!("unix://{}", self.socket_path().display())
    }
}

impl Drop for NixDaemon {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = self.child.wait();
        if std::thread::panicking() {
            // The test failed: what the daemon said may tell why. Printed
            // from the test's thread, so the test's output shows it.
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let shown = &lines[lines.len().saturating_sub(LOG_LINES_SHOWN)..];
            eprintln!(
                "test harness: the last {} lines of the log of the nix-daemon on {}:\n{}",
                shown.len(),
                self.socket_path().display(),
                shown.join("\n")
            );
        }
    }
}

struct HostStore;

impl NixCommands for HostStore {
    fn command(&self, program: &str) -> Command {
        configured(program)
    }
}
