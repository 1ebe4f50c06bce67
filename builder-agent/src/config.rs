//! The agent's command line ([`Cli`]) and the settings it resolves to
//! ([`AgentConfig`]): the token read from its file, the name and systems
//! filled in from the host when not given.
//!
//! Invariant: an [`AgentConfig`] is complete and checked (a token, at
//! least one system, at least one job slot); the session code never
//! re-validates it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use thiserror::Error;

/// Builds Nix derivations for a Sluice queue runner: dials it over gRPC,
/// registers, receives steps, fetches their missing inputs, builds them
/// with the local Nix, streams the log, and uploads the outputs.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "builder-agent",
    version,
    after_help = "Logging: info and above by default, on stderr. RUST_LOG picks other levels, \
                  e.g. RUST_LOG=debug.\n\n\
                  Examples (a test runs each `$ ` line as printed):\n  \
                  $ builder-agent --queue-runner http://127.0.0.1:50051 --token-file ./agent-tokens --max-jobs 2"
)]
pub struct Cli {
    /// Log line format: text (coloured only on a terminal) or json (one
    /// object per line)
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// The queue runner's gRPC address, e.g. http://queue-runner.example:50051
    #[arg(long, value_name = "URL")]
    pub queue_runner: String,

    /// File holding this agent's token: its first line that is neither empty
    /// nor a '#' comment (of a `name:token` line, the part after the ':')
    #[arg(long, value_name = "FILE")]
    pub token_file: PathBuf,

    /// The name the queue runner shows for this machine [default: the host name]
    #[arg(long)]
    pub name: Option<String>,

    /// Systems this machine builds for [default: the local Nix's system
    /// (builtins.currentSystem) and `builtin`]
    #[arg(long, num_args = 1.., value_name = "SYSTEM")]
    pub systems: Vec<String>,

    /// Features this machine supports (e.g. kvm big-parallel)
    #[arg(long, num_args = 1.., value_name = "FEATURE")]
    pub features: Vec<String>,

    /// Features a step must require to be built here
    #[arg(long, num_args = 1.., value_name = "FEATURE")]
    pub mandatory_features: Vec<String>,

    /// How many steps to build at once [default: the number of slots, or 1
    /// with --pinning off]. Without --slots, more jobs than NUMA nodes
    /// share the CPUs out evenly; more jobs than CPUs are not pinned
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_jobs: Option<u32>,

    /// Steps to take ahead of the free slots, so a slot that frees starts
    /// its next step without waiting for the queue runner (at most
    /// --max-jobs; 0: none) [default: --max-jobs, one per slot]. The
    /// queue runner sends them only while no other agent that could build
    /// them has a slot idle
    #[arg(long, value_name = "N")]
    pub prefetch: Option<u32>,

    /// Pin each step's whole process tree to a slot of the machine (its
    /// CPU affinity and NIX_BUILD_CORES). Builds that a daemon given with
    /// --store-socket runs are not its children and keep the daemon's CPUs
    #[arg(long, value_enum, default_value_t = Pinning::On)]
    pub pinning: Pinning,

    /// Divide the machine into this many slots (with --cpus-per-slot)
    /// instead of one slot per NUMA node
    #[arg(long, requires = "cpus_per_slot", value_name = "N")]
    pub slots: Option<u32>,

    /// CPUs in each of the --slots slots, taken node by node
    #[arg(long, requires = "slots", value_name = "M")]
    pub cpus_per_slot: Option<u32>,

    /// Where sysfs is: the NUMA nodes and CPUs are read under it
    #[arg(long, default_value = "/sys", value_name = "DIR")]
    pub sysfs_root: PathBuf,

    /// Where the cgroup hierarchies are mounted. A step whose store daemon
    /// is the agent's child (no --store-socket) runs in a cgroup of its own
    /// there, with its slot's CPUs, and whatever is left in it when the
    /// step ends is killed. Needs cgroup v2 with the cpuset controller
    /// (delegated to the agent, as systemd's Delegate=yes does) or cgroup
    /// v1's cpuset; without either, affinity alone pins the steps
    #[arg(long, default_value = "/sys/fs/cgroup", value_name = "DIR")]
    pub cgroup_root: PathBuf,

    /// Relative speed, used by the queue runner to prefer faster machines
    #[arg(long, default_value_t = 1.0)]
    pub speed_factor: f32,

    /// The Nix daemon socket of the store to build in [default: start
    /// `nix-daemon --stdio`, which as root serves the local store itself]
    #[arg(long, value_name = "PATH")]
    pub store_socket: Option<PathBuf>,

    /// First delay before reconnecting after the connection drops, in ms
    #[arg(long, default_value_t = 500, value_name = "MS")]
    pub reconnect_min_ms: u64,

    /// Longest delay between reconnection attempts, in ms (the delay
    /// doubles from the first up to this)
    #[arg(long, default_value_t = 60_000, value_name = "MS")]
    pub reconnect_max_ms: u64,

    /// The store's real directory. The free space of its filesystem is
    /// sent with every heartbeat, and the queue runner's
    /// --min-free-disk-mb pauses the agent when it runs low
    #[arg(long, default_value = "/nix/store", value_name = "DIR")]
    pub store_dir: PathBuf,

    /// Where builds make their temporary directories: the Nix daemon's
    /// `build-dir`, else its TMPDIR. The free space of its filesystem is
    /// sent with every heartbeat, like --store-dir's [default: $TMPDIR,
    /// else /tmp]
    #[arg(long, value_name = "DIR")]
    pub build_dir: Option<PathBuf>,

    /// On SIGTERM or SIGINT the agent drains: it takes no new steps, lets
    /// those it runs finish and delivers their results, then exits 0. Past
    /// this many seconds, or on a second signal, it stops them and reports
    /// them aborted (the queue runner retries them elsewhere)
    #[arg(long, default_value_t = 600, value_name = "SECONDS")]
    pub drain_timeout_s: u64,
}

/// Whether steps are pinned to slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Pinning {
    /// Each step runs on the CPUs of a slot of its own.
    On,
    /// Steps run wherever the kernel puts them.
    Off,
}

/// The format of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// How the agent reaches its own Nix store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalNix {
    /// A daemon socket.
    Socket(PathBuf),
    /// `nix-daemon --stdio`, started per connection with the agent's
    /// environment.
    Stdio,
    /// Another command that serves a store on its stdin and stdout (the
    /// daemon protocol), started per connection: `nix-daemon --stdio`
    /// inside a private mount namespace, say. Its builds are its children,
    /// so they are pinned like those of `Stdio`.
    Command(DaemonCommand),
}

/// A command line, with environment variables to set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonCommand {
    pub program: PathBuf,
    pub args: Vec<std::ffi::OsString>,
    pub env: Vec<(std::ffi::OsString, std::ffi::OsString)>,
}

/// Everything the agent runs with.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub queue_runner: String,
    pub token: String,
    pub name: String,
    pub systems: Vec<String>,
    pub features: Vec<String>,
    pub mandatory_features: Vec<String>,
    pub max_jobs: u32,
    /// Steps taken ahead of the free slots (at most `max_jobs`).
    pub prefetch: u32,
    /// The slots steps are pinned to; `None`: no pinning.
    pub slots: Option<crate::topology::Layout>,
    /// The machine's NUMA nodes, reported at registration; `None`: they
    /// could not be read.
    pub topology: Option<crate::topology::Topology>,
    pub speed_factor: f32,
    pub store: LocalNix,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Where `/proc` is (load, memory and pressure figures).
    pub proc_root: PathBuf,
    /// Where the cgroup hierarchies are; `None`: no cgroups.
    pub cgroup_root: Option<PathBuf>,
    /// How long a drain lets running steps finish.
    pub drain_timeout: Duration,
    /// Where the store's files are, and where builds run: heartbeats carry
    /// the free space of their filesystems.
    pub store_dir: PathBuf,
    pub build_dir: PathBuf,
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("reading the token file '{path}': {source}")]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the token file '{0}' has no token")]
    NoToken(PathBuf),
    #[error("--systems: give at least one system")]
    NoSystems,
    #[error("the machine's topology: {0}")]
    Topology(#[from] crate::topology::TopologyError),
    #[error("--max-jobs {max_jobs} is more than the {slots} slots of --slots: give more slots, or --pinning off")]
    MoreJobsThanSlots { max_jobs: u32, slots: usize },
    #[error("{flag} '{}': its free space cannot be read: {source}", path.display())]
    DiskDir {
        flag: &'static str,
        path: PathBuf,
        source: nix::Error,
    },
}

/// The slots and the number of jobs for a pinned agent:
/// - `--slots N --cpus-per-slot M`: that layout; `--max-jobs` (default N)
///   may not exceed it;
/// - otherwise one slot per NUMA node, unless `--max-jobs` asks for more
///   jobs than nodes: then that many slots, the CPUs shared out evenly;
/// - more jobs than CPUs cannot each have CPUs of their own: no pinning.
fn layout_for(
    topology: &crate::topology::Topology,
    explicit: Option<(u32, u32)>,
    max_jobs: Option<u32>,
) -> Result<(Option<crate::topology::Layout>, u32), ConfigError> {
    use crate::topology::Layout;
    let slots_of = |layout: &Layout| u32::try_from(layout.slots.len()).unwrap_or(u32::MAX);
    if let Some((n, m)) = explicit {
        let layout = Layout::explicit(topology, n, m)?;
        let slots = slots_of(&layout);
        return match max_jobs {
            Some(jobs) if jobs > slots => Err(ConfigError::MoreJobsThanSlots {
                max_jobs: jobs,
                slots: layout.slots.len(),
            }),
            jobs => Ok((Some(layout), jobs.unwrap_or(slots))),
        };
    }
    let per_node = Layout::per_node(topology);
    let nodes = slots_of(&per_node);
    let cpus = u32::try_from(topology.cpu_count()).unwrap_or(u32::MAX);
    Ok(match max_jobs {
        None => (Some(per_node), nodes.max(1)),
        Some(jobs) if jobs <= nodes => (Some(per_node), jobs),
        Some(jobs) if jobs <= cpus => (Some(Layout::explicit(topology, jobs, cpus / jobs)?), jobs),
        Some(jobs) => (None, jobs),
    })
}

/// The token in a token file: its first non-empty line, after the first
/// ':' if it is a `name:token` line.
pub fn read_token(path: &Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::TokenFile {
        path: path.to_owned(),
        source,
    })?;
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .ok_or_else(|| ConfigError::NoToken(path.to_owned()))?;
    let token = line.split_once(':').map_or(line, |(_, t)| t).trim();
    if token.is_empty() {
        return Err(ConfigError::NoToken(path.to_owned()));
    }
    Ok(token.to_owned())
}

impl Cli {
    /// Reads the token and fills in the defaults from the host.
    pub async fn resolve(self) -> Result<AgentConfig, ConfigError> {
        let token = read_token(&self.token_file)?;
        let name = match self.name {
            Some(n) => n,
            None => crate::host::hostname(Path::new("/proc")),
        };
        let systems = if self.systems.is_empty() {
            vec![crate::host::nix_system().await, "builtin".to_owned()]
        } else {
            self.systems
        };
        if systems.iter().all(|s| s.trim().is_empty()) {
            return Err(ConfigError::NoSystems);
        }
        let topology = crate::topology::Topology::read(&self.sysfs_root);
        let (slots, max_jobs, topology) = match (self.pinning, topology) {
            (Pinning::On, topology) => {
                let topology = topology?;
                let (slots, max_jobs) =
                    layout_for(&topology, self.slots.zip(self.cpus_per_slot), self.max_jobs)?;
                (slots, max_jobs, Some(topology))
            }
            // Reported only: an agent that does not pin does not need it.
            (Pinning::Off, topology) => {
                let topology = topology
                    .map_err(|e| tracing::warn!("the machine's NUMA topology is not reported: {e}"))
                    .ok();
                (None, self.max_jobs.unwrap_or(1), topology)
            }
        };
        let build_dir = self.build_dir.unwrap_or_else(std::env::temp_dir);
        for (flag, path) in [
            ("--store-dir", &self.store_dir),
            ("--build-dir", &build_dir),
        ] {
            crate::host::free_bytes(path).map_err(|source| ConfigError::DiskDir {
                flag,
                path: path.clone(),
                source,
            })?;
        }
        Ok(AgentConfig {
            queue_runner: self.queue_runner,
            token,
            name,
            systems,
            features: self.features,
            mandatory_features: self.mandatory_features,
            max_jobs,
            prefetch: self.prefetch.unwrap_or(max_jobs).min(max_jobs),
            slots,
            topology,
            speed_factor: self.speed_factor,
            store: match self.store_socket {
                Some(p) => LocalNix::Socket(p),
                None => LocalNix::Stdio,
            },
            reconnect_min: Duration::from_millis(self.reconnect_min_ms),
            reconnect_max: Duration::from_millis(self.reconnect_max_ms),
            proc_root: PathBuf::from("/proc"),
            cgroup_root: Some(self.cgroup_root),
            drain_timeout: Duration::from_secs(self.drain_timeout_s),
            store_dir: self.store_dir,
            build_dir,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_and_defaults_parse() {
        let cli = Cli::try_parse_from([
            "builder-agent",
            "--queue-runner",
            "http://127.0.0.1:1",
            "--token-file",
            "/t",
            "--systems",
            "x86_64-linux",
            "builtin",
            "--features",
            "kvm",
        ])
        .expect("parses");
        assert_eq!(cli.systems, ["x86_64-linux", "builtin"]);
        assert_eq!(cli.features, ["kvm"]);
        assert_eq!(cli.max_jobs, None);
        assert_eq!(cli.pinning, Pinning::On);
        assert!(Cli::try_parse_from(["builder-agent", "--token-file", "/t"]).is_err());
        // --slots and --cpus-per-slot go together.
        assert!(Cli::try_parse_from([
            "builder-agent",
            "--queue-runner",
            "u",
            "--token-file",
            "/t",
            "--slots",
            "2"
        ])
        .is_err());
        assert!(Cli::try_parse_from([
            "builder-agent",
            "--queue-runner",
            "u",
            "--token-file",
            "/t",
            "--max-jobs",
            "0"
        ])
        .is_err());
    }

    #[test]
    fn the_token_is_the_first_line_or_its_part_after_the_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("token");
        std::fs::write(&file, "\n# comment\nbuilder1:secret-token-value\nother\n").expect("write");
        assert_eq!(read_token(&file).expect("token"), "secret-token-value");
        std::fs::write(&file, "  plain-token  \n").expect("write");
        assert_eq!(read_token(&file).expect("token"), "plain-token");
        std::fs::write(&file, "\n\n").expect("write");
        assert!(matches!(read_token(&file), Err(ConfigError::NoToken(_))));
        assert!(read_token(&dir.path().join("missing")).is_err());
    }

    /// A token file and a fake sysfs with one node of CPUs 0-3.
    fn fixture() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("token"), "a-token-of-sixteen-chars\n").expect("token");
        let node = dir.path().join("sys/devices/system/node/node0");
        std::fs::create_dir_all(&node).expect("sysfs");
        std::fs::write(node.join("cpulist"), "0-3\n").expect("cpulist");
        dir
    }

    async fn resolve(dir: &Path, extra: &[&str]) -> Result<AgentConfig, ConfigError> {
        let token = dir.join("token");
        let sys = dir.join("sys");
        let mut args = vec![
            "builder-agent",
            "--queue-runner",
            "http://127.0.0.1:1",
            "--systems",
            "x86_64-linux",
            "--token-file",
            token.to_str().expect("utf-8"),
            "--sysfs-root",
            sys.to_str().expect("utf-8"),
        ];
        if !extra.contains(&"--store-dir") {
            args.extend_from_slice(&["--store-dir", sys.to_str().expect("utf-8")]);
        }
        args.extend_from_slice(extra);
        Cli::try_parse_from(args).expect("parses").resolve().await
    }

    #[tokio::test]
    async fn the_disk_directories_must_be_readable_at_start() {
        let dir = fixture();
        let config = resolve(dir.path(), &[]).await.expect("resolves");
        assert_eq!(config.store_dir, dir.path().join("sys"));
        assert_eq!(config.build_dir, std::env::temp_dir());
        let missing = dir.path().join("missing");
        let missing = missing.to_str().expect("utf-8");
        for flag in ["--store-dir", "--build-dir"] {
            let error = resolve(dir.path(), &[flag, missing])
                .await
                .expect_err("a missing directory");
            assert!(
                matches!(&error, ConfigError::DiskDir { flag: f, .. } if *f == flag),
                "{error}"
            );
            let message = error.to_string();
            assert!(message.contains(missing), "{message}");
        }
    }

    #[tokio::test]
    async fn max_jobs_follows_the_slots_and_may_not_exceed_them() {
        let dir = fixture();
        let one_node = resolve(dir.path(), &[]).await.expect("resolves");
        assert_eq!(one_node.max_jobs, 1);
        assert_eq!(one_node.slots.expect("pinned").slots[0].cpus, [0, 1, 2, 3]);
        let four = resolve(dir.path(), &["--slots", "4", "--cpus-per-slot", "1"])
            .await
            .expect("resolves");
        assert_eq!(four.max_jobs, 4);
        // More jobs than nodes: the CPUs are shared out; more than CPUs:
        // no pinning.
        let two = resolve(dir.path(), &["--max-jobs", "2"])
            .await
            .expect("resolves");
        let cpus: Vec<Vec<u32>> = two
            .slots
            .expect("pinned")
            .slots
            .into_iter()
            .map(|s| s.cpus)
            .collect();
        assert_eq!((two.max_jobs, cpus), (2, vec![vec![0, 1], vec![2, 3]]));
        let many = resolve(dir.path(), &["--max-jobs", "5"])
            .await
            .expect("resolves");
        assert_eq!((many.max_jobs, many.slots), (5, None));
        let args = ["--slots", "2", "--cpus-per-slot", "1", "--max-jobs", "3"];
        assert!(matches!(
            resolve(dir.path(), &args).await,
            Err(ConfigError::MoreJobsThanSlots {
                max_jobs: 3,
                slots: 2
            })
        ));
        assert!(matches!(
            resolve(dir.path(), &["--slots", "3", "--cpus-per-slot", "2"]).await,
            Err(ConfigError::Topology(_))
        ));
        let off = resolve(dir.path(), &["--pinning", "off", "--max-jobs", "3"])
            .await
            .expect("resolves");
        assert_eq!((off.max_jobs, off.slots), (3, None));
    }
}
