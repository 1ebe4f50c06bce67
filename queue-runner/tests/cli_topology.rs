//! What agents register about their machines: the real executables (queue
//! runner on its embedded PostgreSQL, two builder agents reading a fake
//! sysfs tree of two NUMA nodes with interleaved CPUs). `/status/machines`
//! shows each machine's NUMA nodes, and the slots of the one that pins;
//! the one that does not pin still reports its nodes.

#![allow(clippy::unwrap_used)]

mod cli;

use std::ffi::OsStr;

use cli::*;
use serde_json::{json, Value};

const TOKEN: &str = "cli-topology-token-0123456789abcdef";

/// A sysfs tree with node 0 on CPUs 0 and 2, node 1 on CPUs 1 and 3.
fn fake_sysfs(dir: &std::path::Path) -> std::path::PathBuf {
    let root = dir.join("sys");
    for (node, cpus) in [("node0", "0,2\n"), ("node1", "1,3\n")] {
        let node = root.join("devices/system/node").join(node);
        std::fs::create_dir_all(&node).unwrap();
        std::fs::write(node.join("cpulist"), cpus).unwrap();
    }
    root
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machines_show_the_numa_nodes_their_agents_read_and_the_slots_of_those_that_pin() {
    let farm = Serving::start(TOKEN, &[]);
    let sysfs = fake_sysfs(farm.dir.path());
    let sysfs_args = [OsStr::new("--sysfs-root"), sysfs.as_os_str()];
    let _pinned = farm.agent("pinned", 2, &sysfs_args);
    let unpinned_args = [
        sysfs_args[0],
        sysfs_args[1],
        OsStr::new("--pinning"),
        OsStr::new("off"),
    ];
    let _unpinned = farm.agent("unpinned", 2, &unpinned_args);

    let body = sluice_test_support::http_get(farm.http(), "/status/machines").unwrap();
    let machines: Value = serde_json::from_str(&body).unwrap();
    let nodes = json!([{ "node": 0, "cpus": "0,2" }, { "node": 1, "cpus": "1,3" }]);
    let pinned = &machines["machines"]["pinned"];
    assert_eq!(pinned["numaNodes"], nodes, "{pinned}");
    assert_eq!(pinned["slots"], nodes, "one slot per node: {pinned}");
    let unpinned = &machines["machines"]["unpinned"];
    assert_eq!(unpinned["numaNodes"], nodes, "{unpinned}");
    assert_eq!(unpinned["slots"], json!([]), "{unpinned}");

    farm.stop();
}
