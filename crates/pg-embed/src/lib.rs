//! A private PostgreSQL server, started from the system's PostgreSQL binaries.
//!
//! Used twice: by the queue runner when no `--database-url` is given (the
//! "embedded default", kept across restarts under its data dir), and by the
//! test harness (one throwaway server per test). The server listens on a
//! Unix socket only (`listen_addresses=''`), so parallel servers never fight
//! over a TCP port.
//!
//! PostgreSQL refuses to run as root. When the caller is root, the server
//! runs as an unprivileged user ([`RunAs`]) that owns the data directory.
//!
//! A server left running under the data directory by an earlier process
//! (whose owner was killed before it could stop it) is never run beside:
//! it is adopted or refused, as [`ExistingServer`] says. A stale
//! `postmaster.pid` of a server that is gone is removed ([`postmaster`]).
//! The server's log (`<data_dir>/server.log`) is appended to, never
//! truncated.
//!
//! Invariants: a [`PgServer`] value owns exactly one running postmaster and
//! stops it when dropped (also while a test panics); an existing data
//! directory is reused, never re-initialised.

pub mod postmaster;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::{chown, Gid, Pid, Uid, User};

/// What went wrong while finding, initialising or starting PostgreSQL.
/// Every message says what is missing and how to get it.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error(
        "PostgreSQL server binaries not found (looked for `initdb` and `postgres` in {searched}); \
         install them with `apt-get install -y postgresql`, or set SLUICE_PG_BIN to the directory that holds them"
    )]
    BinariesNotFound { searched: String },
    #[error(
        "the PostgreSQL server (pid {pid}) an earlier run left running exited while it was adopted"
    )]
    AdoptedServerExited { pid: i32 },
    #[error(
        "PostgreSQL refuses to run as root and user `{user}` does not exist; \
         create it with `useradd --system --no-create-home {user}` or choose another user"
    )]
    NoSuchUser { user: String },
    #[error(
        "PostgreSQL runs as `{user}`, which cannot reach {dir}: {blocking} is not searchable \
         for it; allow it (`chmod o+x {blocking}`) or choose a directory elsewhere"
    )]
    Unreachable {
        user: String,
        dir: PathBuf,
        blocking: PathBuf,
    },
    #[error("could not create user `{user}` for PostgreSQL: {detail}")]
    CreateUser { user: String, detail: String },
    #[error("{what} in {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {output}")]
    CommandFailed {
        command: String,
        status: String,
        output: String,
    },
    #[error(
        "a PostgreSQL server (pid {pid}) is already running on {data_dir}; \
         stop it with `kill -INT {pid}` (PostgreSQL's fast shutdown) and start again"
    )]
    AlreadyRunning { pid: i32, data_dir: PathBuf },
    #[error("PostgreSQL did not become ready within {seconds}s; its log {log} ends with: {tail}")]
    NotReady {
        seconds: u64,
        log: PathBuf,
        tail: String,
    },
}

/// Which user the server runs as when the caller is root.
#[derive(Debug, Clone)]
pub enum RunAs {
    /// An existing user; an error if it does not exist.
    Existing(String),
    /// A system user created with `useradd --system` if it does not exist.
    CreateIfMissing(String),
}

/// What to do when a server is already running on the data directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExistingServer {
    /// Fail with [`PgError::AlreadyRunning`].
    Refuse,
    /// Take it over: use it, and stop it like one we started. For a data
    /// directory that only one process uses at a time (the caller ensures
    /// it), where a running server can only be one its earlier owner left.
    Adopt,
}

/// How to start a server.
#[derive(Debug, Clone)]
pub struct PgConfig {
    /// Holds `PG_VERSION`, the cluster; created by `initdb` if absent.
    pub data_dir: PathBuf,
    /// Where the Unix socket and lock file go. Must be short: socket paths
    /// are limited to 107 bytes.
    pub socket_dir: PathBuf,
    /// Directory holding `initdb` and `postgres`; found automatically if `None`.
    pub bin_dir: Option<PathBuf>,
    /// The user to drop to when the caller is root.
    pub run_as: RunAs,
    /// `fsync=off`: for throwaway test servers only.
    pub unsafe_fast: bool,
    /// How long to wait for the server to accept connections.
    pub ready_timeout: Duration,
    /// A server already running on `data_dir`: refuse or adopt it.
    pub existing: ExistingServer,
}

impl PgConfig {
    pub fn new(data_dir: impl Into<PathBuf>, socket_dir: impl Into<PathBuf>) -> Self {
        PgConfig {
            data_dir: data_dir.into(),
            socket_dir: socket_dir.into(),
            bin_dir: None,
            run_as: RunAs::CreateIfMissing("sluice-postgres".into()),
            unsafe_fast: false,
            ready_timeout: Duration::from_secs(60),
            existing: ExistingServer::Refuse,
        }
    }
}

/// The postmaster a [`PgServer`] owns.
#[derive(Debug)]
enum Postmaster {
    /// Started by us.
    Child(Child),
    /// Left running by an earlier owner and adopted ([`ExistingServer::Adopt`]).
    Adopted(i32),
}

/// A running private PostgreSQL server. Stopped on drop.
#[derive(Debug)]
pub struct PgServer {
    child: Option<Postmaster>,
    socket_dir: PathBuf,
    data_dir: PathBuf,
    bin_dir: PathBuf,
    owner: Option<(Uid, Gid)>,
}

/// Finds the directory that holds `initdb` and `postgres`: `$SLUICE_PG_BIN`,
/// then the newest `/usr/lib/postgresql/*/bin`, then `$PATH`.
pub fn find_bin_dir() -> Result<PathBuf, PgError> {
    let mut searched = Vec::new();
    let has_both = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Some(dir) = std::env::var_os("SLUICE_PG_BIN") {
        let dir = PathBuf::from(dir);
        if has_both(&dir) {
            return Ok(dir);
        }
        searched.push(format!("$SLUICE_PG_BIN={}", dir.display()));
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((v, e.path().join("bin")))
        })
        .collect();
    versions.sort();
    searched.push("/usr/lib/postgresql/*/bin".into());
    if let Some((_, dir)) = versions.into_iter().rev().find(|(_, d)| has_both(d)) {
        return Ok(dir);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if has_both(&dir) {
                return Ok(dir);
            }
        }
    }
    searched.push("$PATH".into());
    Err(PgError::BinariesNotFound {
        searched: searched.join(", "),
    })
}

fn resolve_user(run_as: &RunAs) -> Result<Option<(Uid, Gid)>, PgError> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    let name = match run_as {
        RunAs::Existing(n) | RunAs::CreateIfMissing(n) => n.as_str(),
    };
    let lookup = |n: &str| User::from_name(n).ok().flatten();
    if let Some(u) = lookup(name) {
        return Ok(Some((u.uid, u.gid)));
    }
    let RunAs::CreateIfMissing(_) = run_as else {
        return Err(PgError::NoSuchUser { user: name.into() });
    };
    let out = Command::new("useradd")
        .args(["--system", "--user-group", "--no-create-home"])
        .args(["--shell", "/usr/sbin/nologin", name])
        .output()
        .map_err(|e| PgError::CreateUser {
            user: name.into(),
            detail: e.to_string(),
        })?;
    // Another process may have created it at the same time (exit code 9).
    match lookup(name) {
        Some(u) => Ok(Some((u.uid, u.gid))),
        None => Err(PgError::CreateUser {
            user: name.into(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        }),
    }
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PgError + 'a {
    move |source| PgError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Fails unless user `uid` (group `gid`) may traverse every existing
/// ancestor of `dir`: PostgreSQL, dropped to that user, could not reach
/// its directory otherwise, and would fail with a less helpful message.
fn check_reachable(dir: &Path, uid: Uid, gid: Gid, run_as: &RunAs) -> Result<(), PgError> {
    use std::os::unix::fs::MetadataExt;
    for ancestor in dir.ancestors().skip(1) {
        let Ok(meta) = fs::metadata(ancestor) else {
            continue; // created later, by us, traversable
        };
        let mode = meta.mode();
        let may = if meta.uid() == uid.as_raw() {
            mode & 0o100 != 0
        } else if meta.gid() == gid.as_raw() {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !may {
            let user = match run_as {
                RunAs::Existing(n) | RunAs::CreateIfMissing(n) => n.clone(),
            };
            return Err(PgError::Unreachable {
                user,
                dir: dir.to_path_buf(),
                blocking: ancestor.to_path_buf(),
            });
        }
    }
    Ok(())
}

fn make_owned_dir(dir: &Path, owner: Option<(Uid, Gid)>) -> Result<(), PgError> {
    fs::create_dir_all(dir).map_err(io("creating directory", dir))?;
    if let Some((uid, gid)) = owner {
        chown(dir, Some(uid), Some(gid)).map_err(|e| PgError::Io {
            what: "changing owner",
            path: dir.to_path_buf(),
            source: e.into(),
        })?;
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(io("setting permissions", dir))
}

fn command_as(program: PathBuf, owner: Option<(Uid, Gid)>) -> Command {
    let mut cmd = Command::new(program);
    if let Some((uid, gid)) = owner {
        // SAFETY: the closure runs in the forked child before exec and only
        // makes the setgroups/setgid/setuid system calls, which are
        // async-signal-safe; it allocates nothing and takes no locks.
        unsafe {
            cmd.pre_exec(move || {
                // Drop root's supplementary groups first, while still root.
                nix::unistd::setgroups(&[gid])?;
                nix::unistd::setgid(gid)?;
                nix::unistd::setuid(uid)?;
                Ok(())
            });
        }
    }
    // A server built with systemd support would report its own readiness
    // to the socket of the service that started it (a `Type=notify` queue
    // runner), which systemd refuses from a process not the main one.
    cmd.env_remove("PGDATA")
        .env_remove("NOTIFY_SOCKET")
        .env("LC_ALL", "C");
    cmd
}

impl PgServer {
    /// Initialises the cluster if needed and starts the server, waiting
    /// until it accepts connections.
    pub fn start(config: &PgConfig) -> Result<PgServer, PgError> {
        match Self::start_once(config) {
            // The server we adopted was on its way out (killed an instant
            // before, still exiting): its lock is stale now; start afresh.
            Err(PgError::AdoptedServerExited { pid }) => {
                tracing::warn!(
                    pid,
                    "the PostgreSQL server an earlier run left was exiting; starting a new one"
                );
                Self::start_once(config)
            }
            other => other,
        }
    }

    fn start_once(config: &PgConfig) -> Result<PgServer, PgError> {
        let bin_dir = match &config.bin_dir {
            Some(d) if d.join("initdb").is_file() && d.join("postgres").is_file() => d.clone(),
            Some(d) => {
                return Err(PgError::BinariesNotFound {
                    searched: d.display().to_string(),
                })
            }
            None => find_bin_dir()?,
        };
        let owner = resolve_user(&config.run_as)?;
        if let Some((uid, gid)) = owner {
            for dir in [&config.data_dir, &config.socket_dir] {
                check_reachable(dir, uid, gid, &config.run_as)?;
            }
        }
        make_owned_dir(&config.socket_dir, owner)?;
        if !config.data_dir.join("PG_VERSION").exists() {
            make_owned_dir(&config.data_dir, owner)?;
            let out = command_as(bin_dir.join("initdb"), owner)
                .arg("-D")
                .arg(&config.data_dir)
                .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
                .current_dir(&config.data_dir)
                .output()
                .map_err(io("running initdb", &bin_dir))?;
            if !out.status.success() {
                return Err(PgError::CommandFailed {
                    command: format!("initdb -D {}", config.data_dir.display()),
                    status: out.status.to_string(),
                    output: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                });
            }
        }
        let log_path = config.data_dir.join("server.log");
        let lock = postmaster::inspect(&config.data_dir);
        if !matches!(lock, postmaster::LockFile::Running { .. }) {
            // Both lock files, since PostgreSQL checks both.
            for stale in [
                lock.clone(),
                postmaster::inspect_socket_lock(&config.socket_dir),
            ] {
                if let postmaster::LockFile::Stale { pid, path } = stale {
                    tracing::info!(
                        path = %path.display(),
                        pid = ?pid,
                        "removing the stale lock file of a PostgreSQL server that is gone"
                    );
                    fs::remove_file(&path).map_err(io("removing stale lock file", &path))?;
                }
            }
        }
        match lock {
            postmaster::LockFile::Absent | postmaster::LockFile::Stale { .. } => {}
            postmaster::LockFile::Running { pid } => match config.existing {
                ExistingServer::Refuse => {
                    return Err(PgError::AlreadyRunning {
                        pid,
                        data_dir: config.data_dir.clone(),
                    })
                }
                ExistingServer::Adopt => {
                    tracing::warn!(
                        pid,
                        data_dir = %config.data_dir.display(),
                        "adopting the PostgreSQL server an earlier run left running; \
                         it is stopped on shutdown like one started now"
                    );
                    let mut server = PgServer {
                        child: Some(Postmaster::Adopted(pid)),
                        socket_dir: config.socket_dir.clone(),
                        data_dir: config.data_dir.clone(),
                        bin_dir,
                        owner,
                    };
                    return match server.wait_ready(config.ready_timeout, &log_path) {
                        Ok(()) => Ok(server),
                        Err(_) if !postmaster::is_alive(pid) => {
                            Err(PgError::AdoptedServerExited { pid })
                        }
                        Err(e) => Err(e),
                    };
                }
            },
        }
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io("opening log", &log_path))?;
        if let Some((uid, gid)) = owner {
            let _ = chown(&log_path, Some(uid), Some(gid));
        }
        // A marker between runs, so an operator can tell them apart.
        let _ = writeln!(
            log,
            "---- sluice: starting postgres (pid {}) ----",
            std::process::id()
        );
        let log_err = log.try_clone().map_err(io("opening log", &log_path))?;
        let mut cmd = command_as(bin_dir.join("postgres"), owner);
        cmd.arg("-D")
            .arg(&config.data_dir)
            .arg("-k")
            .arg(&config.socket_dir)
            .args(["-c", "listen_addresses=", "-c", "max_connections=200"])
            .current_dir(&config.data_dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        if config.unsafe_fast {
            cmd.args(["-c", "fsync=off", "-c", "synchronous_commit=off"]);
            cmd.args(["-c", "full_page_writes=off"]);
        }
        let child = cmd.spawn().map_err(io("starting postgres", &bin_dir))?;
        let mut server = PgServer {
            child: Some(Postmaster::Child(child)),
            socket_dir: config.socket_dir.clone(),
            data_dir: config.data_dir.clone(),
            bin_dir,
            owner,
        };
        server.wait_ready(config.ready_timeout, &log_path)?;
        Ok(server)
    }

    fn wait_ready(&mut self, timeout: Duration, log_path: &Path) -> Result<(), PgError> {
        let deadline = Instant::now() + timeout;
        let pg_isready = self.bin_dir.join("pg_isready");
        loop {
            // Our server exited: fail, and never mistake another server
            // answering on the socket for ours.
            let exited = match self.child.as_mut() {
                Some(Postmaster::Child(child)) => child
                    .try_wait()
                    .ok()
                    .flatten()
                    .map(|status| status.to_string()),
                Some(Postmaster::Adopted(pid)) => {
                    (!postmaster::is_alive(*pid)).then(|| "exited".to_string())
                }
                None => Some("not running".to_string()),
            };
            if let Some(status) = exited {
                self.child = None;
                return Err(PgError::CommandFailed {
                    command: format!("postgres -D {}", self.data_dir.display()),
                    status,
                    output: log_tail(log_path),
                });
            }
            let ready = if pg_isready.is_file() {
                Command::new(&pg_isready)
                    .arg("-h")
                    .arg(&self.socket_dir)
                    .args(["-U", "postgres", "-q"])
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false)
            } else {
                self.socket_dir.join(".s.PGSQL.5432").exists()
            };
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(PgError::NotReady {
                    seconds: timeout.as_secs(),
                    log: log_path.to_path_buf(),
                    tail: log_tail(log_path),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The socket directory, for `host=` in connection strings.
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// A `postgres://` URL for database `db` on this server.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres@localhost/{db}?host={}",
            self.socket_dir.display()
        )
    }

    /// Creates database `name` unless it exists.
    pub fn create_database(&self, name: &str) -> Result<(), PgError> {
        let out = command_as(self.bin_dir.join("createdb"), self.owner)
            .arg("-h")
            .arg(&self.socket_dir)
            .args(["-U", "postgres", name])
            .output()
            .map_err(io("running createdb", &self.bin_dir))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || stderr.contains("already exists") {
            Ok(())
        } else {
            Err(PgError::CommandFailed {
                command: format!("createdb {name}"),
                status: out.status.to_string(),
                output: stderr.trim().to_string(),
            })
        }
    }

    /// Stops the server (fast shutdown) and waits for it to exit.
    pub fn stop(&mut self) {
        const GRACE: Duration = Duration::from_secs(20);
        match self.child.take() {
            None => {}
            // SIGINT is PostgreSQL's "fast shutdown".
            Some(Postmaster::Adopted(pid)) => postmaster::stop_pid(pid, Signal::SIGINT, GRACE),
            Some(Postmaster::Child(mut child)) => {
                if let Ok(pid) = i32::try_from(child.id()) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGINT);
                }
                let deadline = Instant::now() + GRACE;
                loop {
                    match child.try_wait() {
                        Ok(Some(_)) | Err(_) => break,
                        Ok(None) if Instant::now() > deadline => {
                            let _ = child.kill();
                            let _ = child.wait();
                            break;
                        }
                        Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            }
        }
    }

    /// Whether the postmaster is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(Postmaster::Child(c)) => matches!(c.try_wait(), Ok(None)),
            Some(Postmaster::Adopted(pid)) => postmaster::is_alive(*pid),
            None => false,
        }
    }

    /// The postmaster's pid while it runs.
    pub fn pid(&self) -> Option<i32> {
        match self.child.as_ref()? {
            Postmaster::Child(c) => i32::try_from(c.id()).ok(),
            Postmaster::Adopted(pid) => Some(*pid),
        }
    }

    /// Whether this server was left running by an earlier owner and adopted.
    pub fn was_adopted(&self) -> bool {
        matches!(self.child, Some(Postmaster::Adopted(_)))
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn log_tail(path: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = fs::File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    let lines: Vec<&str> = s.lines().rev().take(5).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// Makes `dir` (and so its contents) reachable by `owner`: PostgreSQL running
/// as an unprivileged user must be able to traverse to its data directory.
pub fn make_traversable(dir: &Path) -> Result<(), PgError> {
    let meta = fs::metadata(dir).map_err(io("reading metadata", dir))?;
    let mut perms = meta.permissions();
    perms.set_mode(perms.mode() | 0o711);
    fs::set_permissions(dir, perms).map_err(io("setting permissions", dir))
}
