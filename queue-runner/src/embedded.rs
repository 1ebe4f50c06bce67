//! The embedded default database: a private PostgreSQL that the queue
//! runner starts itself under its data directory when no database URL is
//! given, and keeps across restarts.
//!
//! Layout: `<data_dir>/postgres/` holds the cluster; the Unix socket goes to
//! `<data_dir>/postgres-socket/`, or to a short directory under `/tmp` when
//! that path would be too long for a socket. When run as root, the server
//! runs as the system user `sluice-postgres`, created if missing.

use std::path::{Path, PathBuf};

use sluice_pg_embed::{make_traversable, PgConfig, PgError, PgServer, RunAs};

/// The database the queue runner uses inside the embedded server.
pub const DATABASE: &str = "hydra";

/// A running embedded server; stopped on drop.
pub struct Embedded {
    server: PgServer,
}

impl Embedded {
    /// Starts (initialising on first use) the server under `data_dir`.
    pub fn start(data_dir: &Path) -> Result<Embedded, PgError> {
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
        make_traversable(&data_dir)?;
        let mut config = PgConfig::new(data_dir.join("postgres"), socket_dir(&data_dir));
        config.run_as = RunAs::CreateIfMissing("sluice-postgres".into());
        let server = PgServer::start(&config)?;
        server.create_database(DATABASE)?;
        Ok(Embedded { server })
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
