//! What a data directory's `postmaster.pid` says about a server that may
//! still be running there, and processes we watch by pid alone.
//!
//! PostgreSQL writes `postmaster.pid` when it starts and removes it when it
//! stops cleanly. A server whose parent was killed keeps running (and keeps
//! the file); a server that was itself killed leaves the file behind
//! (stale). Its first line is the postmaster's pid, its second the data
//! directory.
//!
//! Invariant: a pid is believed to be a running server of this data
//! directory only when a live, non-zombie process with that pid is named
//! `postgres`; anything else makes the file stale. The same holds for the
//! lock file beside the server's socket.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The state of a data directory's lock file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockFile {
    /// No `postmaster.pid`: no server runs there.
    Absent,
    /// A file naming a process that is gone (or is not PostgreSQL).
    Stale { pid: Option<i32>, path: PathBuf },
    /// A server is running on this data directory.
    Running { pid: i32 },
}

/// Reads `<data_dir>/postmaster.pid` and checks the process it names.
pub fn inspect(data_dir: &Path) -> LockFile {
    inspect_file(data_dir.join("postmaster.pid"))
}

/// The same for the lock file PostgreSQL keeps beside its Unix socket
/// (`<socket_dir>/.s.PGSQL.5432.lock`), which names the postmaster too.
/// PostgreSQL takes a zombie for a live server there, so a stale one must
/// be removed before a start.
pub fn inspect_socket_lock(socket_dir: &Path) -> LockFile {
    inspect_file(socket_dir.join(".s.PGSQL.5432.lock"))
}

fn inspect_file(path: PathBuf) -> LockFile {
    let Ok(text) = fs::read_to_string(&path) else {
        return if path.exists() {
            LockFile::Stale { pid: None, path }
        } else {
            LockFile::Absent
        };
    };
    let pid = text
        .lines()
        .next()
        .and_then(|l| l.trim().parse::<i32>().ok());
    match pid {
        Some(pid) if pid > 0 && is_live_postgres(pid) => LockFile::Running { pid },
        pid => LockFile::Stale { pid, path },
    }
}

/// Whether `pid` is a live (not zombie) process whose name is `postgres`.
fn is_live_postgres(pid: i32) -> bool {
    is_alive(pid)
        && fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|comm| comm.trim() == "postgres")
            .unwrap_or(false)
}

/// Whether `pid` exists and is not a zombie. A process we may not signal
/// (`EPERM`) exists.
pub fn is_alive(pid: i32) -> bool {
    match kill(Pid::from_raw(pid), None) {
        Ok(()) | Err(Errno::EPERM) => {}
        Err(_) => return false,
    }
    // Field 3 of /proc/<pid>/stat is the state; it follows the
    // parenthesised command name, which may itself contain spaces.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Sends `signal` to `pid` and waits up to `grace` for it to exit; then
/// kills it. For processes that are not our children.
pub fn stop_pid(pid: i32, signal: Signal, grace: Duration) {
    let _ = kill(Pid::from_raw(pid), signal);
    let deadline = Instant::now() + grace;
    while is_alive(pid) {
        if Instant::now() > deadline {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_file_is_absent_and_a_dead_pid_is_stale() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert_eq!(inspect(dir.path()), LockFile::Absent);

        // A child that has exited and been reaped: its pid names nobody.
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let pid = child.id() as i32;
        child.wait().expect("reap");
        fs::write(
            dir.path().join("postmaster.pid"),
            format!("{pid}\n{}\n", dir.path().display()),
        )
        .expect("write");
        assert!(matches!(inspect(dir.path()), LockFile::Stale { pid: Some(p), .. } if p == pid));

        fs::write(dir.path().join("postmaster.pid"), "garbage\n").expect("write");
        assert!(matches!(
            inspect(dir.path()),
            LockFile::Stale { pid: None, .. }
        ));
    }

    #[test]
    fn a_live_process_that_is_not_postgres_is_stale() {
        let dir = tempfile::tempdir().expect("temp dir");
        // This test process is alive, but it is not a postgres.
        fs::write(
            dir.path().join("postmaster.pid"),
            format!("{}\n", std::process::id()),
        )
        .expect("write");
        assert!(matches!(inspect(dir.path()), LockFile::Stale { .. }));
        assert!(is_alive(std::process::id() as i32));
    }
}
