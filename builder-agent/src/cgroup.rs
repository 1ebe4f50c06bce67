//! A cgroup of its own for each step whose store daemon is the agent's
//! child: it carries the slot's cpuset, and it holds every process the
//! build starts, so that when the step ends all of them are killed, even
//! one that left the build's process group.
//!
//! Two hierarchies are handled, under a root that is a parameter (normally
//! `/sys/fs/cgroup`), so tests can use fake trees:
//! - cgroup v2 with the cpuset controller, at the root or at `unified/`
//!   (hybrid hosts). The agent's own cgroup must be delegated to it (as
//!   systemd's `Delegate=yes` does); unless it is the root, the agent moves
//!   itself into a leaf `sluice-agent` so that its cgroup may have children
//!   with controllers (cgroup v2 lets only leaves hold processes).
//! - cgroup v1's cpuset controller, at `cpuset/`.
//!
//! Layout: `<agent's cgroup>/sluice-<pid>-<n>/step-<k>`, one parent per
//! agent instance (tests run several in one process). A parent left by an
//! agent that died is emptied and removed when the next agent starts.
//!
//! Invariants: a step's daemon child moves itself into its step cgroup
//! before it runs (in `pre_exec`), so everything it forks starts there; a
//! dropped [`StepCgroup`] has every process in it killed, and its directory
//! removed once they are gone.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::topology::format_cpu_list;

/// Which kind of cgroup hierarchy steps are placed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hierarchy {
    V2,
    V1Cpuset,
}

/// Where this agent makes its steps' cgroups.
#[derive(Debug)]
pub(crate) struct Cgroups {
    hierarchy: Hierarchy,
    /// This agent's directory, holding one cgroup per step.
    parent: PathBuf,
    next: AtomicU64,
}

/// Distinguishes the agents of one process.
static INSTANCE: AtomicU64 = AtomicU64::new(0);

/// The cgroup path of `controller` (`None`: the v2 line) in the contents
/// of a `/proc/<pid>/cgroup` file.
fn own_path(proc_cgroup: &str, controller: Option<&str>) -> Option<String> {
    proc_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let found = match controller {
            None => id == "0" && controllers.is_empty(),
            Some(c) => controllers.split(',').any(|x| x == c),
        };
        found.then(|| path.to_owned())
    })
}

fn join(root: &Path, cgroup_path: &str) -> PathBuf {
    root.join(cgroup_path.trim_start_matches('/'))
}

fn read(path: &Path) -> io::Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

fn write(path: &Path, value: &str) -> io::Result<()> {
    std::fs::write(path, value).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("writing '{value}' to {}: {e}", path.display()),
        )
    })
}

impl Cgroups {
    /// Finds a hierarchy with the cpuset controller under `root` and makes
    /// this agent's directory in its own cgroup there (read from
    /// `<proc_root>/self/cgroup`). The error says why there is none.
    pub(crate) fn setup(root: &Path, proc_root: &Path) -> Result<Cgroups, String> {
        let own = read(&proc_root.join("self/cgroup")).map_err(|e| e.to_string())?;
        let unified = [root.to_path_buf(), root.join("unified")]
            .into_iter()
            .find(|d| d.join("cgroup.controllers").is_file());
        let v2_cpuset = unified.filter(|d| {
            std::fs::read_to_string(d.join("cgroup.controllers"))
                .is_ok_and(|c| c.split_whitespace().any(|x| x == "cpuset"))
        });
        let (hierarchy, own_dir) = if let Some(unified) = v2_cpuset {
            let path = own_path(&own, None)
                .ok_or_else(|| "no cgroup v2 line in /proc/self/cgroup".to_owned())?;
            (
                Hierarchy::V2,
                v2_own_dir(&unified, &path).map_err(|e| e.to_string())?,
            )
        } else if root.join("cpuset/cpuset.cpus").is_file() {
            let path = own_path(&own, Some("cpuset"))
                .ok_or_else(|| "no cpuset line in /proc/self/cgroup".to_owned())?;
            (Hierarchy::V1Cpuset, join(&root.join("cpuset"), &path))
        } else {
            return Err(format!(
                "neither cgroup v2 with the cpuset controller nor the cgroup v1 cpuset controller is under {}",
                root.display()
            ));
        };
        remove_stale(&own_dir);
        let parent = own_dir.join(format!(
            "sluice-{}-{}",
            std::process::id(),
            INSTANCE.fetch_add(1, Ordering::Relaxed)
        ));
        make_dir(hierarchy, &own_dir, &parent).map_err(|e| e.to_string())?;
        Ok(Cgroups {
            hierarchy,
            parent,
            next: AtomicU64::new(0),
        })
    }

    pub(crate) fn hierarchy(&self) -> Hierarchy {
        self.hierarchy
    }

    /// This agent's directory of step cgroups.
    pub(crate) fn dir(&self) -> &Path {
        &self.parent
    }

    /// A fresh cgroup for one step, with `cpus` and memory nodes `mems`
    /// (empty: as this agent's).
    pub(crate) fn step(&self, cpus: Option<&[u32]>, mems: &[u32]) -> io::Result<StepCgroup> {
        let dir = self.parent.join(format!(
            "step-{}",
            self.next.fetch_add(1, Ordering::Relaxed)
        ));
        make_dir(self.hierarchy, &self.parent, &dir)?;
        let cgroup = StepCgroup::at(dir)?;
        if let Some(cpus) = cpus {
            write(&cgroup.dir.join("cpuset.cpus"), &format_cpu_list(cpus))?;
        }
        if !mems.is_empty() {
            write(&cgroup.dir.join("cpuset.mems"), &format_cpu_list(mems))?;
        }
        Ok(cgroup)
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        // The steps' directories may still be going (each in a thread of
        // its own): this one is retried until they are.
        remove_when_empty(self.parent.clone());
    }
}

/// The cgroup v2 directory this agent's step parents go in: its own
/// cgroup, with the cpuset controller enabled for children. Unless that is
/// the root, the agent first moves into a leaf of it.
fn v2_own_dir(unified: &Path, path: &str) -> io::Result<PathBuf> {
    const LEAF: &str = "sluice-agent";
    let mut dir = join(unified, path);
    if dir.file_name().is_some_and(|n| n == LEAF) {
        // An agent of this process moved it there already.
        dir.pop();
    } else if path != "/" {
        let leaf = dir.join(LEAF);
        if !leaf.is_dir() {
            std::fs::create_dir(&leaf)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", leaf.display())))?;
        }
        write(&leaf.join("cgroup.procs"), &std::process::id().to_string())?;
    }
    let control = dir.join("cgroup.subtree_control");
    let enabled = read(&control)?;
    if !enabled.split_whitespace().any(|c| c == "cpuset") {
        write(&control, "+cpuset").map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "{e} (is the agent's cgroup delegated to it, as systemd's Delegate=yes does?)"
                ),
            )
        })?;
    }
    Ok(dir)
}

/// Makes cgroup `dir` under `parent`, ready for processes (v1 cpuset
/// needs its CPUs and memory nodes set first; v2 needs the controller
/// enabled for its children).
fn make_dir(hierarchy: Hierarchy, parent: &Path, dir: &Path) -> io::Result<()> {
    std::fs::create_dir(dir)
        .map_err(|e| io::Error::new(e.kind(), format!("creating {}: {e}", dir.display())))?;
    match hierarchy {
        Hierarchy::V1Cpuset => {
            for file in ["cpuset.cpus", "cpuset.mems"] {
                let value = read(&parent.join(file))?;
                write(&dir.join(file), value.trim())?;
            }
        }
        Hierarchy::V2 => {
            // Only the agent's parent has children; a step cgroup has none.
            if dir
                .file_name()
                .is_some_and(|n| n.as_bytes().starts_with(b"sluice-"))
            {
                write(&dir.join("cgroup.subtree_control"), "+cpuset")?;
            }
        }
    }
    Ok(())
}

/// Empties and removes the step parents of agents that are gone (their
/// pid no longer runs), with whatever their builds left.
fn remove_stale(own_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(own_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("sluice-"))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<i32>().ok())
        else {
            continue;
        };
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
        if alive {
            continue;
        }
        let parent = entry.path();
        tracing::warn!(dir = %parent.display(), "removing the step cgroups of an agent that is gone, with what they held");
        if let Ok(steps) = std::fs::read_dir(&parent) {
            for step in steps.flatten().filter(|s| s.path().is_dir()) {
                kill_all(&step.path(), None);
                remove_when_empty(step.path());
            }
        }
        remove_when_empty(parent);
    }
}

/// One step's cgroup. Dropping it kills every process in it and removes it.
#[derive(Debug)]
pub(crate) struct StepCgroup {
    dir: PathBuf,
    /// `<dir>/cgroup.procs`, ready for `pre_exec`.
    procs: CString,
}

impl StepCgroup {
    fn at(dir: PathBuf) -> io::Result<StepCgroup> {
        let procs = CString::new(dir.join("cgroup.procs").as_os_str().as_bytes())
            .map_err(|_| io::Error::other("a cgroup path with a NUL byte"))?;
        Ok(StepCgroup { dir, procs })
    }

    #[cfg(test)]
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// For `pre_exec`: moves the calling process into this cgroup. It
    /// makes three system calls and allocates nothing.
    pub(crate) fn enter_fn(&self) -> impl Fn() -> io::Result<()> + Send + Sync + 'static {
        let procs = self.procs.clone();
        move || {
            // SAFETY: `procs` is a valid NUL-terminated path; the buffer
            // written is a static byte string; the descriptor is closed.
            unsafe {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                // "0": the writing process itself.
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = io::Error::last_os_error();
                libc::close(fd);
                if written != 1 {
                    return Err(err);
                }
            }
            Ok(())
        }
    }

    /// Kills every process in the cgroup except `spare` (the store daemon
    /// still needed to read the outputs).
    pub(crate) fn kill_all_but(&self, spare: Option<u32>) {
        kill_all(&self.dir, spare);
    }
}

impl Drop for StepCgroup {
    fn drop(&mut self) {
        kill_all(&self.dir, None);
        remove_when_empty(self.dir.clone());
    }
}

fn pids(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Kills the processes in cgroup `dir` but `spare`, until none is left
/// (new ones may be forked meanwhile), for up to a second.
fn kill_all(dir: &Path, spare: Option<u32>) {
    let spare = spare.and_then(|p| i32::try_from(p).ok());
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let left: Vec<i32> = pids(dir)
            .into_iter()
            .filter(|p| Some(*p) != spare)
            .collect();
        if left.is_empty() {
            return;
        }
        for pid in &left {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if Instant::now() > deadline {
            tracing::warn!(dir = %dir.display(), left = left.len(), "processes of a step survive SIGKILL");
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Removes cgroup `dir` once its processes are gone (they take a moment
/// to exit), from a thread of its own, giving up after 30 s.
fn remove_when_empty(dir: PathBuf) {
    if std::fs::remove_dir(&dir).is_ok() {
        return;
    }
    let remove = move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match std::fs::remove_dir(&dir) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                Err(e) if Instant::now() > deadline => {
                    tracing::warn!(dir = %dir.display(), "cannot remove a step cgroup: {e}");
                    return;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    };
    let _ = std::thread::Builder::new()
        .name("cgroup-rmdir".into())
        .spawn(remove);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const HYBRID: &str =
        "9:name=systemd:/\n3:cpuset:/build\n1:cpu,cpuacct:/x\n0::/system.slice/agent.service\n";

    #[test]
    fn own_cgroups_are_read_per_hierarchy() {
        assert_eq!(own_path(HYBRID, Some("cpuset")).as_deref(), Some("/build"));
        assert_eq!(own_path(HYBRID, Some("cpu")).as_deref(), Some("/x"));
        assert_eq!(
            own_path(HYBRID, None).as_deref(),
            Some("/system.slice/agent.service")
        );
        assert_eq!(own_path("0::/\n", Some("cpuset")), None);
    }

    /// A fake `/proc` whose `self/cgroup` says `text`.
    fn proc_with(text: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("self")).unwrap();
        std::fs::write(dir.path().join("self/cgroup"), text).unwrap();
        dir
    }

    #[test]
    fn on_cgroup_v2_the_agent_moves_into_a_leaf_and_steps_get_cpusets() {
        let root = tempfile::tempdir().unwrap();
        let own = root.path().join("system.slice/agent.service");
        std::fs::create_dir_all(&own).unwrap();
        std::fs::write(
            root.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        std::fs::write(own.join("cgroup.subtree_control"), "").unwrap();
        let proc = proc_with("0::/system.slice/agent.service\n");
        let cgroups = Cgroups::setup(root.path(), proc.path()).unwrap();
        assert_eq!(cgroups.hierarchy(), Hierarchy::V2);
        let leaf = std::fs::read_to_string(own.join("sluice-agent/cgroup.procs")).unwrap();
        assert_eq!(leaf, std::process::id().to_string());
        assert_eq!(
            read(&own.join("cgroup.subtree_control")).unwrap(),
            "+cpuset"
        );
        assert_eq!(cgroups.dir().parent(), Some(own.as_path()));
        assert_eq!(
            read(&cgroups.dir().join("cgroup.subtree_control")).unwrap(),
            "+cpuset"
        );
        let step = cgroups.step(Some(&[2, 3, 5]), &[1]).unwrap();
        assert!(step.dir().starts_with(cgroups.dir()));
        assert_eq!(read(&step.dir().join("cpuset.cpus")).unwrap(), "2-3,5");
        assert_eq!(read(&step.dir().join("cpuset.mems")).unwrap(), "1");
        // A second agent of the process finds its cgroup in the leaf.
        let again = proc_with("0::/system.slice/agent.service/sluice-agent\n");
        let second = Cgroups::setup(root.path(), again.path()).unwrap();
        assert_eq!(second.dir().parent(), Some(own.as_path()));
        assert_ne!(second.dir(), cgroups.dir());
    }

    #[test]
    fn on_cgroup_v1_a_step_inherits_the_agents_cpuset_until_given_its_own() {
        let root = tempfile::tempdir().unwrap();
        let own = root.path().join("cpuset/build");
        std::fs::create_dir_all(&own).unwrap();
        std::fs::write(root.path().join("cpuset/cpuset.cpus"), "0-7\n").unwrap();
        std::fs::write(own.join("cpuset.cpus"), "0-3\n").unwrap();
        std::fs::write(own.join("cpuset.mems"), "0-1\n").unwrap();
        // cgroup v2 without the cpuset controller (a hybrid host).
        std::fs::create_dir(root.path().join("unified")).unwrap();
        std::fs::write(root.path().join("unified/cgroup.controllers"), "").unwrap();
        let proc = proc_with(HYBRID);
        let cgroups = Cgroups::setup(root.path(), proc.path()).unwrap();
        assert_eq!(cgroups.hierarchy(), Hierarchy::V1Cpuset);
        assert_eq!(cgroups.dir().parent(), Some(own.as_path()));
        assert_eq!(read(&cgroups.dir().join("cpuset.cpus")).unwrap(), "0-3");
        let step = cgroups.step(Some(&[1]), &[]).unwrap();
        assert_eq!(read(&step.dir().join("cpuset.cpus")).unwrap(), "1");
        assert_eq!(read(&step.dir().join("cpuset.mems")).unwrap(), "0-1");
    }

    #[test]
    fn without_a_cpuset_controller_the_reason_names_the_root() {
        let root = tempfile::tempdir().unwrap();
        let proc = proc_with("0::/\n");
        let why = Cgroups::setup(root.path(), proc.path()).unwrap_err();
        assert!(why.contains(&root.path().display().to_string()), "{why}");
    }

    /// An agent killed with steps running (kill -9: no drop ran) leaves
    /// their cgroups, and whatever still runs in them; the next agent on
    /// the machine empties and removes them when it starts.
    #[test]
    fn cgroups_an_agent_killed_mid_step_left_are_emptied_by_the_next_one() {
        let root = Path::new("/sys/fs/cgroup");
        // A pid that is gone: an agent that died.
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        let dead = gone.id();
        gone.wait().unwrap();
        // Its parent and step cgroups, made as the dead agent made them.
        let own = Cgroups::setup(root, Path::new("/proc"))
            .expect("this machine has a cpuset controller (see test-environment.md)");
        let own_dir = own.dir().parent().unwrap().to_path_buf();
        let hierarchy = own.hierarchy();
        drop(own);
        let parent = own_dir.join(format!("sluice-{dead}-0"));
        make_dir(hierarchy, &own_dir, &parent).unwrap();
        let step_dir = parent.join("step-0");
        make_dir(hierarchy, &parent, &step_dir).unwrap();
        let step = StepCgroup::at(step_dir.clone()).unwrap();
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("1000");
        // SAFETY: as in `nix_store::connect`.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, step.enter_fn());
        }
        let mut orphan = cmd.spawn().unwrap();
        // The dead agent never dropped its cgroup.
        std::mem::forget(step);
        assert_eq!(pids(&step_dir), [i32::try_from(orphan.id()).unwrap()]);

        let next = Cgroups::setup(root, Path::new("/proc")).unwrap();
        let status = orphan.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "the orphan was killed"
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while parent.exists() {
            assert!(
                Instant::now() < deadline,
                "{} is still there",
                parent.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(next);
    }

    /// This machine's own cgroups (cgroup v1 cpuset, or v2 with it):
    /// a process placed in a step's cgroup runs on its CPU, and a child
    /// that left its process group is killed with the cgroup.
    #[test]
    fn a_real_step_cgroup_holds_its_processes_and_kills_them_all() {
        let cgroups = Cgroups::setup(Path::new("/sys/fs/cgroup"), Path::new("/proc"))
            .expect("this machine has a cpuset controller (see test-environment.md)");
        let step = cgroups.step(Some(&[1]), &[]).unwrap();
        let mut cmd = std::process::Command::new("sh");
        cmd.args([
            "-c",
            "setsid sleep 1000 >/dev/null 2>&1 </dev/null & echo $!; \
             grep Cpus_allowed_list /proc/self/status; exec sleep 1000",
        ])
        .stdout(std::process::Stdio::piped());
        // SAFETY: as in `nix_store::connect`.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, step.enter_fn());
        }
        let mut child = cmd.spawn().unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        let escaped: i32 = line.trim().parse().unwrap();
        line.clear();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert!(line.trim().ends_with("\t1"), "{line}");
        let mut held = pids(step.dir());
        held.sort_unstable();
        let shell = i32::try_from(child.id()).unwrap();
        assert!(held.contains(&shell) && held.contains(&escaped), "{held:?}");
        let dir = step.dir().to_path_buf();
        drop(step);
        let _ = child.wait();
        let gone = |pid: i32| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
                s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z'))
            })
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !gone(escaped) || dir.exists() {
            assert!(
                Instant::now() < deadline,
                "the escaped child or the cgroup is still there"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
