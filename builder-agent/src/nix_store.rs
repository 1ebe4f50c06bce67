//! The agent's connection to its own Nix store: a daemon socket, or a
//! `nix-daemon --stdio` child per connection, whose stderr goes to
//! `tracing` (see [`DaemonClient::spawn`]).
//!
//! Invariant: each job opens its own connection and owns it; dropping the
//! job drops the connection, and the daemon then interrupts whatever the
//! connection was doing (a build is killed), so cancelling needs no more
//! than dropping.

use sluice_nix::daemon::{ClientError, DaemonClient};

use crate::config::LocalNix;

/// Opens a connection to the agent's store.
pub(crate) async fn connect(store: &LocalNix) -> Result<DaemonClient, ClientError> {
    match store {
        LocalNix::Socket(path) => DaemonClient::connect(path).await,
        LocalNix::Stdio => {
            let mut cmd = tokio::process::Command::new("nix-daemon");
            cmd.arg("--stdio");
            DaemonClient::spawn(cmd).await
        }
    }
}
