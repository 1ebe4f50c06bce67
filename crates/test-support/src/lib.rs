//! The test harness: real services, started per test and torn down after.
//!
//! - [`pg::TestPg`]: a throwaway PostgreSQL on a Unix socket.
//! - [`nix::NixEnv`]: Nix configured through `NIX_CONFIG`, and `.drv` files
//!   whose names are unique to the test run.
//! - [`nix::NixDaemon`]: a private `nix-daemon` on its own socket.
//! - [`nix::IsolatedStore`]: processes that see their own, initially empty, `/nix`.
//!
//! Every helper panics with a message that says exactly what is missing and
//! how to get it when the service cannot be started: in a test, a panic with
//! a clear message is the right failure. Every helper cleans up on drop,
//! including while a failing test unwinds.

#![allow(clippy::unwrap_used)]

pub mod nix;
pub mod pg;
pub mod s3;

/// Polls `cond` until it is true or `timeout` passes; returns whether it
/// became true. For waiting on a condition with a deadline instead of
/// sleeping and hoping.
pub fn wait_until(timeout: std::time::Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `GET path` from the HTTP server at `addr` (HTTP/1.0, so the server
/// closes the connection after the answer); the body, or why it failed.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    Ok(out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or(out))
}
