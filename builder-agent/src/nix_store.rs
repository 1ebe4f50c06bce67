//! The agent's connection to its own Nix store: a daemon socket, or a
//! child per connection that serves the store on its stdin and stdout
//! (`nix-daemon --stdio`, or a command of the operator's), whose stderr
//! goes to `tracing` (see [`DaemonClient::spawn`]).
//!
//! Invariant: each job opens its own connection and owns it; dropping the
//! job drops the connection, and the daemon then interrupts whatever the
//! connection was doing (a build is killed), so cancelling needs no more
//! than dropping. A child started for a step is placed before it runs, so
//! every build process it starts inherits the placement: it enters the
//! step's cgroup, takes the slot's CPU affinity, and binds its memory to
//! the slot's nodes (on a machine of several nodes). Dropping the step's
//! cgroup kills whatever is left in it.

use sluice_nix::daemon::{ClientError, DaemonClient};

use crate::cgroup::{Cgroups, StepCgroup};
use crate::config::LocalNix;

/// Where a step's store child and its builds run.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Placement<'a> {
    /// The slot's CPUs; `None`: not pinned.
    pub(crate) cpus: Option<&'a [u32]>,
    /// The NUMA nodes its memory is bound to; empty: not bound.
    pub(crate) mems: &'a [u32],
    /// Where its cgroup is made; `None`: no cgroup.
    pub(crate) cgroups: Option<&'a Cgroups>,
}

/// A connection to the store, with the cgroup of the child serving it (if
/// any): drop the cgroup only when the connection is no longer needed.
pub(crate) struct StoreConn {
    pub(crate) nix: DaemonClient,
    pub(crate) cgroup: Option<StepCgroup>,
}

/// Opens a connection to the agent's store; a child it starts is placed
/// as `placement` says.
pub(crate) async fn connect(
    store: &LocalNix,
    placement: Placement<'_>,
) -> Result<StoreConn, ClientError> {
    let mut cmd = match store {
        LocalNix::Socket(path) => {
            return Ok(StoreConn {
                nix: DaemonClient::connect(path).await?,
                cgroup: None,
            })
        }
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
    let cgroup = placement.cgroups.and_then(|c| {
        c.step(placement.cpus, placement.mems)
            .map_err(|e| {
                tracing::warn!("cannot make the step's cgroup, running it without one: {e}")
            })
            .ok()
    });
    if let Some(cgroup) = &cgroup {
        let enter = cgroup.enter_fn();
        // SAFETY: `enter` makes three system calls on a path prepared
        // before the fork; it allocates nothing.
        unsafe {
            cmd.pre_exec(enter);
        }
    }
    if let Some(cpus) = placement.cpus {
        pin(&mut cmd, cpus);
    }
    if !placement.mems.is_empty() {
        bind_memory(&mut cmd, placement.mems);
    }
    let nix = DaemonClient::spawn(cmd).await?;
    Ok(StoreConn { nix, cgroup })
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

/// The kernel's node mask for `nodes`: bit `n` of word `n / 64`.
pub(crate) fn node_mask(nodes: &[u32]) -> Vec<libc::c_ulong> {
    let bits = libc::c_ulong::BITS;
    let words = nodes.iter().max().map_or(0, |m| m / bits + 1) as usize;
    let mut mask = vec![0; words];
    for n in nodes {
        mask[(n / bits) as usize] |= 1 << (n % bits);
    }
    mask
}

/// Makes the child's memory (and that of everything it starts) come from
/// `nodes` only (`set_mempolicy(MPOL_BIND)`).
pub(crate) fn bind_memory(cmd: &mut tokio::process::Command, nodes: &[u32]) {
    const MPOL_BIND: libc::c_long = 2;
    let mask = node_mask(nodes);
    // The kernel reads `maxnode - 1` bits.
    let maxnode = mask.len() as libc::c_ulong * libc::c_ulong::from(libc::c_ulong::BITS) + 1;
    // SAFETY: the closure makes one system call with a mask prepared
    // before the fork and owned by the closure; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            let r = libc::syscall(libc::SYS_set_mempolicy, MPOL_BIND, mask.as_ptr(), maxnode);
            if r == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_masks_set_one_bit_per_node() {
        assert_eq!(node_mask(&[]), Vec::<libc::c_ulong>::new());
        assert_eq!(node_mask(&[0]), [1]);
        assert_eq!(node_mask(&[1, 3]), [0b1010]);
        assert_eq!(node_mask(&[64, 0]), [1, 1]);
    }

    /// The binding reaches the child: its mappings show the policy.
    #[tokio::test]
    async fn a_child_bound_to_node_0_has_its_memory_bound_there() {
        let mut cmd = tokio::process::Command::new("cat");
        cmd.arg("/proc/self/numa_maps")
            .stdout(std::process::Stdio::piped());
        bind_memory(&mut cmd, &[0]);
        let out = cmd.output().await.expect("running cat");
        assert!(out.status.success(), "{out:?}");
        let maps = String::from_utf8_lossy(&out.stdout);
        assert!(
            maps.lines().any(|l| l.contains(" bind:0 ")),
            "no mapping bound to node 0:\n{maps}"
        );
    }
}
