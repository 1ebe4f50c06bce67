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
//! killed with its whole process group on drop, and so is every process in
//! its mount namespace when it has one of its own (an isolated store's, or
//! Nix 2.26's): a daemon's per-connection workers start sessions of their
//! own, leaving its process group, and one that outlives its store (a
//! temp dir, deleted after the test) can spin forever on the vanished
//! database. A daemon's stderr goes to
//! a log file next to its socket, not to the test's output: its workers
//! print an error each time a client closes a connection early (as the
//! readiness check does), which is expected. The log is shown when the
//! daemon does not come up, and when it is dropped by a failing test.
//!
//! Two Nix versions ([`NixVersion`]): the system's (Nix 2.8, protocol
//! 1.34, on `PATH`) and Nix 2.26 (protocol 1.38), Debian trixie's `nix-bin`
//! in a chroot that `scripts/install-nix-2.26.sh` sets up at
//! [`trixie_root`]. Both serve the same stores: a Nix 2.26 command runs in
//! a private mount namespace in which the store directory is bind-mounted
//! over the chroot's `/nix` ([`Nix226Store`]), so paths, sockets and files
//! are the same inside and outside. Daemons of either version come from
//! [`NixDaemon::start_version`] and [`IsolatedStore::start_daemon_version`].

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

/// A Nix release the tests run against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NixVersion {
    /// The system's Nix (Debian 12's `nix-bin`, 2.8.0, protocol 1.34).
    Nix2_8,
    /// Debian trixie's `nix-bin` (2.26.x, protocol 1.38) in the chroot at
    /// [`trixie_root`].
    Nix2_26,
}

impl NixVersion {
    /// The worker protocol its daemon speaks, `(major, minor)`.
    pub fn protocol(self) -> (u8, u8) {
        match self {
            NixVersion::Nix2_8 => (1, 34),
            NixVersion::Nix2_26 => (1, 38),
        }
    }

    /// The prefix of the version its daemon reports (`2.8.0`, `2.26.3`).
    pub fn release(self) -> &'static str {
        match self {
            NixVersion::Nix2_8 => "2.8",
            NixVersion::Nix2_26 => "2.26",
        }
    }

    /// Checks that this version is installed, and says how to get it if not.
    pub fn require(self) -> Result<(), String> {
        match self {
            NixVersion::Nix2_8 => require_nix(),
            NixVersion::Nix2_26 => require_nix_2_26(),
        }
    }

    fn require_or_panic(self) {
        if let Err(e) = self.require() {
            panic!("test harness: {e}");
        }
    }
}

impl std::fmt::Display for NixVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Nix {}", self.release())
    }
}

/// The variable that moves the Nix 2.26 chroot away from [`TRIXIE_ROOT`].
pub const TRIXIE_ROOT_VAR: &str = "SLUICE_TRIXIE_ROOT";

/// Where `scripts/install-nix-2.26.sh` puts the Debian trixie chroot.
pub const TRIXIE_ROOT: &str = "/srv/trixie";

/// The chroot with Nix 2.26: `$SLUICE_TRIXIE_ROOT`, or `/srv/trixie`.
pub fn trixie_root() -> PathBuf {
    std::env::var_os(TRIXIE_ROOT_VAR)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(TRIXIE_ROOT))
}

/// Checks that the Nix 2.26 chroot is set up, and says how to set it up if
/// not.
pub fn require_nix_2_26() -> Result<(), String> {
    require_nix_2_26_in(&trixie_root())
}

/// [`require_nix_2_26`] for the chroot at `root`.
pub fn require_nix_2_26_in(root: &Path) -> Result<(), String> {
    let how = format!(
        "set it up with `scripts/install-nix-2.26.sh` as root (it debootstraps Debian trixie \
         into {TRIXIE_ROOT} or ${TRIXIE_ROOT_VAR} and installs its nix-bin; about a minute), \
         or run the README's test command, which does"
    );
    let version = installed_nix_bin(root).map_err(|e| {
        format!(
            "Nix 2.26 is not set up: {e} (the chroot is {}); {how}",
            root.display()
        )
    })?;
    if !version.starts_with("2.26.") {
        return Err(format!(
            "Nix 2.26 is not set up: the chroot {} has nix-bin {version}, not 2.26; \
             remove it and {how}",
            root.display()
        ));
    }
    for dir in ["nix", "proc", "dev", "tmp"] {
        if !root.join(dir).is_dir() {
            return Err(format!(
                "Nix 2.26 is not set up: the chroot {} has no /{dir}; {how}",
                root.display()
            ));
        }
    }
    Ok(())
}

/// The version of `nix-bin` that dpkg installed in the chroot at `root`.
fn installed_nix_bin(root: &Path) -> Result<String, String> {
    if !root.join("usr/bin/nix-daemon").is_file() {
        return Err("there is no usr/bin/nix-daemon in it".into());
    }
    let status_file = root.join("var/lib/dpkg/status");
    let status = std::fs::read_to_string(&status_file)
        .map_err(|e| format!("cannot read {}: {e}", status_file.display()))?;
    status
        .split("\n\n")
        .find(|stanza| stanza.lines().any(|l| l == "Package: nix-bin"))
        .filter(|stanza| stanza.lines().any(|l| l == "Status: install ok installed"))
        .and_then(|stanza| stanza.lines().find_map(|l| l.strip_prefix("Version: ")))
        .map(str::to_owned)
        .ok_or_else(|| "dpkg has no nix-bin installed in it".into())
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
    dir: StoreRoot,
}

/// Where an [`IsolatedStore`] lives: a temp dir removed with it, or a
/// directory kept for later runs.
#[derive(Debug)]
enum StoreRoot {
    Temp(tempfile::TempDir),
    Kept(PathBuf),
}

impl StoreRoot {
    fn path(&self) -> &Path {
        match self {
            StoreRoot::Temp(dir) => dir.path(),
            StoreRoot::Kept(dir) => dir,
        }
    }
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
        IsolatedStore {
            dir: StoreRoot::Temp(dir),
        }
    }

    /// An isolated store in `dir` (its `nix/` subdirectory), created if
    /// missing and kept when dropped: for benches that reuse a store they
    /// took long to fill.
    pub fn kept_at(dir: &Path) -> IsolatedStore {
        require_nix_or_panic();
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "test harness: an isolated store needs root (mount namespaces and bind mounts)"
        );
        std::fs::create_dir_all(dir.join("nix")).expect("test harness: creating store root");
        IsolatedStore {
            dir: StoreRoot::Kept(dir.to_path_buf()),
        }
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
        self.start_daemon_version(NixVersion::Nix2_8)
    }

    /// [`IsolatedStore::start_daemon`] with Nix 2.26's daemon.
    pub fn start_daemon_226(&self) -> NixDaemon {
        self.start_daemon_version(NixVersion::Nix2_26)
    }

    /// [`IsolatedStore::start_daemon`] with the daemon of `version`.
    pub fn start_daemon_version(&self, version: NixVersion) -> NixDaemon {
        version.require_or_panic();
        // Always by Nix 2.8, for Nix 2.8 commands (the tests' own) to open
        // the store while a Nix 2.26 daemon serves it: Nix 2.26 creates a
        // store without the `ca-schema` file, and Nix 2.8 (with
        // ca-derivations) then waits for the store's big lock exclusively
        // to migrate, while every 2.26 worker holds it shared.
        run(self.command("nix-store").arg("--init"));
        match version {
            NixVersion::Nix2_8 => NixDaemon::start_with(self),
            NixVersion::Nix2_26 => {
                // Nix 2.26 then migrates the database to its own schema
                // (its `SchemaMigrations`), once: left to the daemon, every
                // worker that opens the fresh store races to insert the
                // same migration, and the losers die with "UNIQUE
                // constraint failed", resetting their clients.
                let nix_226 = self.nix_226();
                run(nix_226.command("nix-store").arg("--init"));
                NixDaemon::start_with(&nix_226)
            }
        }
    }

    /// Nix 2.26's commands on this store.
    pub fn nix_226(&self) -> Nix226Store {
        Nix226Store::on(self.root())
    }
}

/// Nix 2.26's commands on a store: each runs in a private mount namespace
/// in which the store directory is bind-mounted over the chroot's `/nix`,
/// with `/proc`, `/dev` (recursively: builds need `/dev/pts`) and the
/// system's temp directory bound at the same paths inside, then is
/// `chroot`ed into [`trixie_root`]. Sockets and scratch files in temp
/// directories are therefore at the same paths on both sides, and so are
/// store paths. Needs root.
#[derive(Debug, Clone)]
pub struct Nix226Store {
    store: PathBuf,
    root: PathBuf,
}

impl Nix226Store {
    /// Nix 2.26 on the host's store, `/nix`.
    pub fn host() -> Nix226Store {
        Nix226Store::on(PathBuf::from("/nix"))
    }

    /// Nix 2.26 on the store whose `/nix` is the directory `store`.
    pub fn on(store: PathBuf) -> Nix226Store {
        NixVersion::Nix2_26.require_or_panic();
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "test harness: Nix 2.26 runs in a chroot, which needs root (mount namespaces and bind mounts)"
        );
        Nix226Store {
            store,
            root: trixie_root(),
        }
    }
}

/// Mounts what a Nix 2.26 command needs into the chroot `$0`, then runs
/// `$2...` in it. `$1` is the store directory, `$TMPDIR_OUTSIDE` the
/// temp directory to show at the same path.
const CHROOT_SCRIPT: &str = r#"root=$0 store=$1; shift
mkdir -p "$root$TMPDIR_OUTSIDE" &&
mount --bind "$store" "$root/nix" &&
mount --bind /proc "$root/proc" &&
mount --rbind /dev "$root/dev" &&
mount --bind "$TMPDIR_OUTSIDE" "$root$TMPDIR_OUTSIDE" &&
unset TMPDIR_OUTSIDE &&
exec chroot "$root" "$@""#;

impl NixCommands for Nix226Store {
    fn command(&self, program: &str) -> Command {
        let mut cmd = configured("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(CHROOT_SCRIPT)
            .arg(&self.root)
            .arg(&self.store)
            .arg(program)
            .env("TMPDIR_OUTSIDE", std::env::temp_dir());
        cmd
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
    /// The daemon's mount namespace, if not the test's own.
    mount_ns: Option<PathBuf>,
}

/// The name of a daemon's log file, next to its socket.
const DAEMON_LOG: &str = "daemon.log";

/// How many lines of a daemon's log a failing test shows.
const LOG_LINES_SHOWN: usize = 50;

impl NixDaemon {
    /// A daemon serving the host's store.
    pub fn start() -> NixDaemon {
        Self::start_version(NixVersion::Nix2_8)
    }

    /// A Nix 2.26 daemon serving the host's store. Needs root.
    pub fn start_226() -> NixDaemon {
        Self::start_version(NixVersion::Nix2_26)
    }

    /// A daemon of `version` serving the host's store.
    pub fn start_version(version: NixVersion) -> NixDaemon {
        version.require_or_panic();
        match version {
            NixVersion::Nix2_8 => Self::start_with(&HostStore),
            NixVersion::Nix2_26 => Self::start_with(&Nix226Store::host()),
        }
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
        let mut daemon = NixDaemon {
            child,
            dir,
            mount_ns: None,
        };
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
        // Accepting connections, the daemon is past its `unshare`.
        daemon.mount_ns = mount_namespace(&daemon.child.id().to_string())
            .filter(|ns| mount_namespace("self").as_ref() != Some(ns));
        daemon
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
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
        // Who is in the namespace, taken while the daemon keeps it alive
        // (so its number still names it, and no other test's). Everything
        // found is stopped first, and looked for again, so nothing forks
        // unseen between the look and the kill.
        // Never signal a pid the daemon no longer holds (it exited, and
        // was reaped).
        let running = matches!(self.child.try_wait(), Ok(None));
        let daemon_pid = i32::try_from(self.child.id()).ok().filter(|_| running);
        if let Some(pid) = daemon_pid {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGSTOP);
            // A signal is delivered when the process next runs: until it
            // shows as stopped it may still fork.
            wait_stopped(pid);
        }
        let in_namespace = self.mount_ns.as_deref().map(|ns| {
            let mut found = processes_in(ns);
            for pid in &found {
                let _ = nix::sys::signal::kill(Pid::from_raw(*pid), Signal::SIGSTOP);
                // The pid may have exited and been reused between the look
                // and the signal: a process elsewhere goes on at once.
                if mount_namespace(&pid.to_string()).as_deref() != Some(ns) {
                    let _ = nix::sys::signal::kill(Pid::from_raw(*pid), Signal::SIGCONT);
                }
            }
            for pid in &found {
                wait_stopped(*pid);
            }
            found.retain(|pid| mount_namespace(&pid.to_string()).as_deref() == Some(ns));
            found.extend(processes_in(ns));
            found
        });
        if let Some(pid) = daemon_pid {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = self.child.wait();
        if let (Some(ns), Some(ours)) = (&self.mount_ns, in_namespace) {
            kill_mount_namespace(ns, ours);
        }
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

/// The mount namespace of process `pid` (`self` for ours), as the kernel
/// names it (`mnt:[4026531840]`); `None` once it has exited.
fn mount_namespace(pid: &str) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok()
}

/// The processes in mount namespace `ns`.
fn processes_in(ns: &Path) -> std::collections::HashSet<i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| mount_namespace(&pid.to_string()).as_deref() == Some(ns))
        .collect()
}

/// Kills `ours`, the processes that were in the mount namespace `ns`, and
/// any process they start there; returns once none is left, or after
/// 10 s. Once they are all gone the kernel may give the namespace's number
/// to another namespace, whose processes (not started by ours) are spared.
/// (A process's start time says nothing here: a process may enter a new
/// namespace long after it started.)
fn kill_mount_namespace(ns: &Path, mut ours: std::collections::HashSet<i32>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut found = false;
        for pid in processes_in(ns) {
            if ours.contains(&pid) || parent_of(pid).is_some_and(|p| ours.contains(&p)) {
                ours.insert(pid);
                found = true;
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        if !found || std::time::Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits (up to 2 s) until process `pid` is stopped, or gone.
fn wait_stopped(pid: i32) {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                let (_, rest) = stat.rsplit_once(')')?;
                rest.split_whitespace().next().map(str::to_owned)
            });
        match state.as_deref() {
            None | Some("T" | "t" | "Z" | "X") => return,
            Some(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// The parent of process `pid`, from `/proc/<pid>/stat`.
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

struct HostStore;

impl NixCommands for HostStore {
    fn command(&self, program: &str) -> Command {
        configured(program)
    }
}
