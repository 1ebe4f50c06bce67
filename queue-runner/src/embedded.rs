//! The embedded default database: a private PostgreSQL that the queue
//! runner starts itself under its data directory when no database URL is
//! given, and keeps across restarts.
//!
//! Layout: `<data_dir>/postgres/` holds the cluster; the Unix socket goes to
//! `<data_dir>/postgres-socket/`, or to a short directory under `/tmp` when
//! that path would be too long for a socket. When run as root, the server
//! runs as the system user `sluice-postgres`, created if missing.
//!
//! Invariants: one queue runner at a time uses a data directory (it holds
//! an exclusive `flock` on `<data_dir>/queue-runner.lock` while it runs),
//! so a server found running there at start can only be one an earlier run
//! left behind when it was killed: it is adopted, said so in the log, and
//! stopped on shutdown like one started now. The server's pid is published
//! for [`stop_now`], which a second shutdown signal calls.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

use nix::fcntl::{Flock, FlockArg};
use sluice_pg_embed::{make_traversable, ExistingServer, PgConfig, PgError, PgServer, RunAs};

/// Why the embedded database could not be started.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error(
        "another queue runner{holder} is using the data directory {dir}; \
         stop it first, or give this one another --data-dir"
    )]
    DataDirInUse { dir: PathBuf, holder: String },
    #[error("locking the data directory {dir}: {cause}")]
    Lock { dir: PathBuf, cause: String },
    #[error(transparent)]
    Pg(#[from] PgError),
}

/// The pid of the running embedded postmaster, 0 when there is none.
static POSTMASTER: AtomicI32 = AtomicI32::new(0);

/// Asks the embedded PostgreSQL, if one runs, to shut down fast, without
/// waiting: for a process that is about to exit at once.
pub fn stop_now() {
    let pid = POSTMASTER.swap(0, Ordering::SeqCst);
    if pid > 0 {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGINT,
        );
    }
}

/// The database the queue runner uses inside the embedded server.
pub const DATABASE: &str = "hydra";

/// A running embedded server; stopped on drop, before the data directory's
/// lock is released (fields drop in order).
pub struct Embedded {
    server: PgServer,
    _lock: Flock<std::fs::File>,
}

impl Drop for Embedded {
    fn drop(&mut self) {
        POSTMASTER.store(0, Ordering::SeqCst);
        self.server.stop();
    }
}

/// Takes the data directory's lock, recording our pid in it.
fn lock_data_dir(data_dir: &Path) -> Result<Flock<std::fs::File>, EmbeddedError> {
    let path = data_dir.join("queue-runner.lock");
    let lock_err = |cause: String| EmbeddedError::Lock {
        dir: data_dir.into(),
        cause,
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| lock_err(e.to_string()))?;
    let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            let holder = std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| t.trim().parse::<u32>().ok())
                .map(|pid| format!(" (pid {pid})"))
                .unwrap_or_default();
            return Err(EmbeddedError::DataDirInUse {
                dir: data_dir.into(),
                holder,
            });
        }
        Err((_, e)) => return Err(lock_err(e.to_string())),
    };
    lock.set_len(0).map_err(|e| lock_err(e.to_string()))?;
    writeln!(lock, "{}", std::process::id()).map_err(|e| lock_err(e.to_string()))?;
    Ok(lock)
}

impl Embedded {
    /// Starts (initialising on first use) the server under `data_dir`, or
    /// adopts the one an earlier run left running there.
    pub fn start(data_dir: &Path) -> Result<Embedded, EmbeddedError> {
        std::fs::create_dir_all(data_dir).map_err(|source| PgError::Io {
            what: "creating the data directory",
            path: data_dir.into(),
            source,
        })?;
        let data_dir = data_dir.canonicalize().map_err(|source| PgError::Io {
            what: "resolving the data directory",
            path: data_dir.into(),
            source,
        })?;
        let lock = lock_data_dir(&data_dir)?;
        make_traversable(&data_dir)?;
        let mut config = PgConfig::new(data_dir.join("postgres"), socket_dir(&data_dir));
        config.run_as = RunAs::CreateIfMissing("sluice-postgres".into());
        config.existing = ExistingServer::Adopt;
        let server = PgServer::start(&config)?;
        POSTMASTER.store(server.pid().unwrap_or(0), Ordering::SeqCst);
        let embedded = Embedded {
            server,
            _lock: lock,
        };
        embedded.server.create_database(DATABASE)?;
        Ok(embedded)
    }

    /// Whether the server was left running by an earlier run and adopted.
    pub fn was_adopted(&self) -> bool {
        self.server.was_adopted()
    }

    pub fn url(&self) -> String {
        self.server.url(DATABASE)
    }
}

/// A socket directory whose socket path fits in `sun_path` (107 bytes).
fn socket_dir(data_dir: &Path) -> PathBuf {
    let preferred = data_dir.join("postgres-socket");
    if preferred.as_os_str().len() + "/.s.PGSQL.5432".len() < 100 {
        return preferred;
    }
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    data_dir.hash(&mut h);
    PathBuf::from(format!("/tmp/sluice-pg-{:016x}", h.finish()))
}

/// The URL of the embedded database of a queue runner running with
/// `data_dir`, if its socket is there.
pub fn url_if_running(data_dir: &Path) -> Option<String> {
    let data_dir = data_dir.canonicalize().ok()?;
    let dir = socket_dir(&data_dir);
    dir.join(".s.PGSQL.5432").exists().then(|| {
        format!(
            "postgres://postgres@localhost/{DATABASE}?host={}",
            dir.display()
        )
    })
}
