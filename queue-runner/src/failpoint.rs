//! Test hooks: named points where the queue runner stops dead, as if
//! killed, so tests can check that what it committed until then is enough
//! to carry on after a restart. Armed only through the environment
//! variable `SLUICE_FAILPOINTS` (names separated by commas); nothing is
//! armed in normal operation.
//!
//! - `abort-after-resolution`: right after a step's resolution is
//!   committed, before its resolved derivation is dispatched.
//! - `abort-mid-load`: right after a loaded batch of builds is applied
//!   while more queued builds are left to read (the next batch is being
//!   read then).

/// Whether the failpoint `name` is armed.
pub fn armed(name: &str) -> bool {
    std::env::var("SLUICE_FAILPOINTS")
        .map(|v| v.split(',').any(|p| p.trim() == name))
        .unwrap_or(false)
}

/// Stops the process at once (SIGABRT), saying which failpoint did it.
pub fn abort(name: &str) -> ! {
    eprintln!("failpoint {name}: stopping the queue runner dead");
    std::process::abort()
}
