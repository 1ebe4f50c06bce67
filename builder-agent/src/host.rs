//! What the agent tells the queue runner about its machine: its name, its
//! Nix system, and load figures for heartbeats, read from `/proc`.
//!
//! Every reader takes the root of the `/proc` tree as a parameter, so
//! tests can use a fake tree. Invariant: a missing or malformed file gives
//! zeros (or a fallback), never an error: heartbeats must go on on hosts
//! without pressure stall information or with an odd `/proc`.

use std::path::Path;
use std::time::Duration;

/// Load figures of the machine.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HostLoad {
    /// Load averages over 1, 5 and 15 minutes.
    pub load: [f32; 3],
    pub mem_total_bytes: u64,
    pub mem_used_bytes: u64,
    /// The `some` lines of `/proc/pressure/{cpu,memory,io}` (zeros when
    /// absent).
    pub cpu_pressure: Pressure,
    pub memory_pressure: Pressure,
    pub io_pressure: Pressure,
}

/// One `some` line of a pressure file: the share of time (percent) some
/// task stalled, over 10, 60 and 300 seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Pressure {
    pub avg10: f32,
    pub avg60: f32,
    pub avg300: f32,
}

/// Reads the current figures under `proc_root`.
pub fn load(proc_root: &Path) -> HostLoad {
    let read = |rel: &str| std::fs::read_to_string(proc_root.join(rel)).unwrap_or_default();
    let (total, available) = parse_meminfo(&read("meminfo"));
    HostLoad {
        load: parse_loadavg(&read("loadavg")).unwrap_or_default(),
        mem_total_bytes: total,
        mem_used_bytes: total.saturating_sub(available),
        cpu_pressure: parse_pressure(&read("pressure/cpu")).unwrap_or_default(),
        memory_pressure: parse_pressure(&read("pressure/memory")).unwrap_or_default(),
        io_pressure: parse_pressure(&read("pressure/io")).unwrap_or_default(),
    }
}

/// The load averages over 1, 5 and 15 minutes: the first three fields of
/// `/proc/loadavg`.
pub fn parse_loadavg(text: &str) -> Option<[f32; 3]> {
    let mut fields = text
        .split_whitespace()
        .map(|f| f.parse::<f32>().ok().filter(|x| x.is_finite()));
    Some([fields.next()??, fields.next()??, fields.next()??])
}

/// `(MemTotal, MemAvailable)` in bytes from `/proc/meminfo` (kB there).
pub fn parse_meminfo(text: &str) -> (u64, u64) {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kb| kb.saturating_mul(1024))
    };
    (field("MemTotal"), field("MemAvailable"))
}

/// The averages of the `some` line of a `/proc/pressure/*` file; `None`
/// without one, or when its `avg10` is missing or malformed (a missing
/// `avg60` or `avg300` reads as 0).
pub fn parse_pressure(text: &str) -> Option<Pressure> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    let avg = |key: &str| {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))?
            .parse::<f32>()
            .ok()
            .filter(|x| x.is_finite())
    };
    Some(Pressure {
        avg10: avg("avg10")?,
        avg60: avg("avg60").unwrap_or(0.0),
        avg300: avg("avg300").unwrap_or(0.0),
    })
}

/// Free bytes, for unprivileged users, on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> Result<u64, nix::Error> {
    let st = nix::sys::statvfs::statvfs(path)?;
    Ok(st.blocks_available().saturating_mul(st.fragment_size()))
}

/// The host name, from `<proc_root>/sys/kernel/hostname`.
pub fn hostname(proc_root: &Path) -> String {
    std::fs::read_to_string(proc_root.join("sys/kernel/hostname"))
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "builder-agent".to_owned())
}

/// The local Nix's `builtins.currentSystem`, or, if Nix cannot be asked,
/// the system this binary was compiled for.
pub async fn nix_system() -> String {
    let asked = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new("nix-instantiate")
            .args(["--eval", "--expr", "builtins.currentSystem"])
            .stdin(std::process::Stdio::null())
            .output(),
    )
    .await;
    if let Ok(Ok(out)) = asked {
        let text = String::from_utf8_lossy(&out.stdout);
        let system = text.trim().trim_matches('"');
        if out.status.success() && !system.is_empty() {
            return system.to_owned();
        }
    }
    let fallback = compiled_system();
    tracing::warn!("could not ask Nix for its system; assuming {fallback}");
    fallback
}

/// Nix's name for the platform this binary was built for.
fn compiled_system() -> String {
    let arch = match std::env::consts::ARCH {
        "x86" => "i686",
        other => other,
    };
    let os = match std::env::consts::OS {
        "macos" => "darwin",
        other => other,
    };
    format!("{arch}-{os}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_parse() {
        assert_eq!(
            parse_loadavg("0.52 0.58 0.59 1/467 12345\n"),
            Some([0.52, 0.58, 0.59])
        );
        assert_eq!(parse_loadavg(""), None);
        assert_eq!(parse_loadavg("0.52 x 0.59"), None);
        assert_eq!(
            parse_meminfo(
                "MemTotal:       16303368 kB\nMemFree: 1 kB\nMemAvailable:   8000000 kB\n"
            ),
            (16303368 * 1024, 8000000 * 1024)
        );
        assert_eq!(parse_meminfo("garbage"), (0, 0));
        assert_eq!(
            parse_pressure(
                "some avg10=1.25 avg60=0.50 avg300=0.10 total=123\nfull avg10=9.00 avg60=0 avg300=0 total=1\n"
            ),
            Some(Pressure {
                avg10: 1.25,
                avg60: 0.5,
                avg300: 0.1
            })
        );
        assert_eq!(parse_pressure("full avg10=1.00"), None);
        assert_eq!(parse_pressure("some avg60=1.00"), None);
    }

    #[test]
    fn a_fake_proc_tree_gives_its_figures_and_a_missing_one_zeros() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("pressure")).expect("mkdir");
        std::fs::write(root.join("loadavg"), "2.00 1.00 0.50 1/1 1\n").expect("write");
        std::fs::write(
            root.join("meminfo"),
            "MemTotal: 100 kB\nMemAvailable: 40 kB\n",
        )
        .expect("write");
        std::fs::write(
            root.join("pressure/io"),
            "some avg10=3.50 avg60=0 avg300=0 total=0\n",
        )
        .expect("write");
        let load = load(root);
        assert_eq!(load.load, [2.0, 1.0, 0.5]);
        assert_eq!(load.mem_total_bytes, 102_400);
        assert_eq!(load.mem_used_bytes, 61_440);
        assert_eq!(load.io_pressure.avg10, 3.5);
        assert_eq!(load.cpu_pressure, Pressure::default());
        assert_eq!(super::load(&root.join("nowhere")), HostLoad::default());
    }
}
