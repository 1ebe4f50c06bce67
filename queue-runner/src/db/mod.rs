//! The PostgreSQL adapter.
//!
//! This module alone knows SQL and sqlx rows; it converts rows into core
//! types at its edge. Connection failures become a [`ConnectError`] whose
//! message fits one line and names the server and the cause, never the
//! password.

pub mod dashboard;
pub mod evaluator;
pub mod held;
pub mod migrate;
pub mod notify;
pub mod queue;
pub mod results;

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::ConnectOptions;

/// Why a connection to the database could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid database URL {url}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("cannot connect to PostgreSQL at {server}: {cause}")]
    Unreachable { server: String, cause: String },
    #[error("cannot connect to PostgreSQL at {server}: timed out after {seconds}s")]
    Timeout { server: String, seconds: u64 },
}

/// The URL with any password replaced by `***`, for messages and logs.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        // Unparseable: show no more than the scheme, so that a password in
        // a malformed URL never reaches a log.
        Err(_) => match url.split_once("://") {
            Some((scheme, _)) => format!("{scheme}://…"),
            None => "(not a URL)".into(),
        },
    }
}

/// Where a URL points, as a person would name it: `host:port` or the
/// socket directory.
pub fn describe_server(url: &str) -> String {
    let Ok(u) = url::Url::parse(url) else {
        return redact_url(url);
    };
    if let Some((_, dir)) = u.query_pairs().find(|(k, _)| k == "host") {
        return format!("socket directory {dir}");
    }
    let host = u.host_str().unwrap_or("localhost");
    let port = u.port().unwrap_or(5432);
    let db = u.path().trim_start_matches('/');
    if db.is_empty() {
        format!("{host}:{port}")
    } else {
        format!("{host}:{port} (database {db})")
    }
}

/// How long any one statement may run (PostgreSQL's `statement_timeout`).
pub const STATEMENT_TIMEOUT: &str = "60s";

/// Parses a `postgres://` URL into connection options.
pub fn connect_options(url: &str) -> Result<PgConnectOptions, ConnectError> {
    let bad = |reason: String| ConnectError::BadUrl {
        url: redact_url(url),
        reason,
    };
    let parsed = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
    if !matches!(parsed.scheme(), "postgres" | "postgresql") {
        return Err(bad(format!(
            "scheme must be postgres:// or postgresql://, not {}://",
            parsed.scheme()
        )));
    }
    let options = PgConnectOptions::from_str(url).map_err(|e| bad(one_line(&e.to_string())))?;
    // No statement of ours may run away (a plan gone wrong scanning a
    // whole table): each is cut off after a minute, and the error says so.
    Ok(options
        .log_statements(tracing::log::LevelFilter::Trace)
        .options([("statement_timeout", STATEMENT_TIMEOUT)]))
}

/// Opens one connection, failing within `timeout`.
pub async fn connect(url: &str, timeout: Duration) -> Result<PgConnection, ConnectError> {
    let options = connect_options(url)?;
    let server = describe_server(url);
    match tokio::time::timeout(timeout, options.connect()).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(ConnectError::Unreachable {
            server,
            cause: describe_sqlx_error(&e),
        }),
        Err(_) => Err(ConnectError::Timeout {
            server,
            seconds: timeout.as_secs(),
        }),
    }
}

/// A connection pool, failing within `timeout` if no first connection can
/// be made, and at once if the server refuses it: the first connection is
/// tried once, outside the pool, whose own connect retries until its
/// timeout whatever the error.
pub async fn pool(url: &str, max: u32, timeout: Duration) -> Result<sqlx::PgPool, ConnectError> {
    let first = connect(url, timeout).await?;
    let _ = sqlx::Connection::close(first).await;
    let options = connect_options(url)?;
    let server = describe_server(url);
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(timeout)
        .connect_with(options)
        .await
        .map_err(|e| match e {
            sqlx::Error::PoolTimedOut => ConnectError::Timeout {
                server,
                seconds: timeout.as_secs(),
            },
            e => ConnectError::Unreachable {
                server,
                cause: describe_sqlx_error(&e),
            },
        })
}

/// Whether an operation that failed with `e` may succeed if tried again:
/// the connection or the server failed (I/O, a closed or exhausted pool,
/// a protocol break, SQLSTATE classes 08 connection, 53 resources, 57
/// operator intervention such as a shutdown, 40 serialisation or
/// deadlock), not the statement itself.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| ["08", "53", "57", "40"].iter().any(|c| code.starts_with(c))),
        _ => false,
    }
}

/// The cause of a sqlx error in one line, without sqlx's wrapping.
pub fn describe_sqlx_error(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => one_line(db.message()),
        sqlx::Error::Io(io) => one_line(&io.to_string()),
        sqlx::Error::Tls(t) => format!("TLS: {}", one_line(&t.to_string())),
        other => one_line(&other.to_string()),
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
