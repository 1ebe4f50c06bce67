//! A throwaway PostgreSQL server per test.
//!
//! The server lives in a fresh temporary directory, listens only on a Unix
//! socket inside it, runs with `fsync=off`, and runs as the unprivileged
//! user `nobody` when the tests run as root (override with
//! `SLUICE_TEST_PG_USER`). Dropping [`TestPg`] stops the server and removes
//! the directory.

use std::path::Path;

use sluice_pg_embed::{make_traversable, PgConfig, PgServer, RunAs};

/// A running throwaway server with one database, `sluice`.
pub struct TestPg {
    // Field order matters: the server stops before its directory goes.
    server: PgServer,
    config: PgConfig,
    dir: tempfile::TempDir,
}

impl TestPg {
    /// Starts a server and creates the database `sluice`.
    ///
    /// Panics with what is missing and how to install it if PostgreSQL
    /// cannot be started.
    pub fn start() -> TestPg {
        match Self::try_start() {
            Ok(pg) => pg,
            Err(e) => panic!("test harness: cannot start a throwaway PostgreSQL: {e}"),
        }
    }

    /// Like [`TestPg::start`], returning the error instead of panicking.
    pub fn try_start() -> Result<TestPg, sluice_pg_embed::PgError> {
        // Short path: the socket path must stay under 107 bytes.
        let dir = tempfile::Builder::new()
            .prefix("sluice-pg-")
            .tempdir_in("/tmp")
            .map_err(|source| sluice_pg_embed::PgError::Io {
                what: "creating temp dir",
                path: "/tmp".into(),
                source,
            })?;
        make_traversable(dir.path())?;
        let user = std::env::var("SLUICE_TEST_PG_USER").unwrap_or_else(|_| "nobody".into());
        let mut config = PgConfig::new(dir.path().join("data"), dir.path().join("sock"));
        config.run_as = RunAs::Existing(user);
        config.unsafe_fast = true;
        let server = PgServer::start(&config)?;
        server.create_database("sluice")?;
        Ok(TestPg {
            server,
            config,
            dir,
        })
    }

    /// URL of the `sluice` database.
    pub fn url(&self) -> String {
        self.server.url("sluice")
    }

    /// URL of another database on this server, created if missing.
    pub fn database_url(&self, name: &str) -> String {
        if let Err(e) = self.server.create_database(name) {
            panic!("test harness: creating database {name}: {e}");
        }
        self.server.url(name)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops the server now, as a database outage would; the directory stays.
    pub fn server_mut(&mut self) -> &mut PgServer {
        &mut self.server
    }

    /// Stops the server (fast shutdown: clients are disconnected), as an
    /// outage would. [`TestPg::start_again`] ends the outage.
    pub fn stop(&mut self) {
        self.server.stop();
    }

    /// Starts the server again on the same data and socket, so the same
    /// URLs work again.
    pub fn start_again(&mut self) {
        self.server.stop();
        self.server = PgServer::start(&self.config)
            .unwrap_or_else(|e| panic!("test harness: restarting PostgreSQL: {e}"));
    }
}
