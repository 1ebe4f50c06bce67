//! The agent's connection to its own Nix store: a daemon socket, or a
//! child per connection that serves the store on its stdin and stdout
//! (`nix-daemon --stdio`, or a command of the operator's), whose stderr
//! goes to `tracing` (see [`DaemonClient::spawn`]).
//!
//! Invariant: each job opens its own connection and owns it; dropping the
//! job drops the connection, and the daemon then interrupts whatever the
//! connection was doing (a build is killed), so cancelling needs no more
//! than dropping. A child started for a pinned step gets the slot's CPU
//! affinity before it runs, so every build process it starts inherits it.

use sluice_nix::daemon::{ClientError, DaemonClient};

use crate::config::LocalNix;

/// Opens a connection to the agent's store; a child it starts runs on
/// `cpus` when given.
pub(crate) async fn connect(
    store: &LocalNix,
    cpus: Option<&[u32]>,
) -> Result<DaemonClient, ClientError> {
    let mut cmd = match store {
        LocalNix::Socket(path) => return DaemonClient::connect(path).await,
        LocalNix::Stdio => {
            let mut cmd = tokio::process::Command::new("nix-daemon");
            cmd.arg("--stdio");
            cmd
        }
        LocalNix::Command(command) => {
            let mut cmd = tokio::process::Command::new(&command.program);
            cmd.args(&command.args);
            cmd.envs(command.env.iter().map(|(k, v)| (k, v)));
            cmd
        }
    };
    if let Some(cpus) = cpus {
        pin(&mut cmd, cpus);
    }
    DaemonClient::spawn(cmd).await
}

/// Makes the child start on `cpus` (its affinity, inherited by everything
/// it starts).
fn pin(cmd: &mut tokio::process::Command, cpus: &[u32]) {
    use nix::sched::{sched_setaffinity, CpuSet};
    let mut set = CpuSet::new();
    for cpu in cpus {
        // A CPU beyond what CpuSet holds cannot be pinned to; skip it.
        let _ = set.set(*cpu as usize);
    }
    // SAFETY: between fork and exec the closure only makes one system
    // call on a value prepared before the fork; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
                .map_err(|e| std::io::Error::from_raw_os_error(e as i32))
        });
    }
}
