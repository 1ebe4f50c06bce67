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
