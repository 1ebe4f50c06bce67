//! The machine's CPUs and NUMA nodes, and the slots steps are pinned to.
//!
//! The topology comes from sysfs (`<root>/devices/system/node/node*/cpulist`,
//! or, without NUMA information, `<root>/devices/system/cpu/online` as one
//! node); the root is a parameter so tests read fake trees. A [`Layout`]
//! divides it into slots: one per NUMA node by default, or `N` slots of `M`
//! CPUs filled node by node. A [`SlotTable`] hands out free slots, each on
//! the least-loaded node: the one with the fewest CPUs in busy slots.
//!
//! Invariants: a slot's CPUs are all on its node; no CPU is in two slots;
//! a slot is given to at most one step at a time.

use std::collections::BTreeMap;
use std::path::Path;

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TopologyError {
    #[error("reading {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{path}: '{text}' is not a CPU list")]
    BadList { path: String, text: String },
    #[error("no CPUs found under {0}")]
    NoCpus(String),
    #[error("--slots {slots} --cpus-per-slot {per_slot} needs {needed} CPUs, but the machine has {available}")]
    TooFewCpus {
        slots: u32,
        per_slot: u32,
        needed: u64,
        available: usize,
    },
    #[error("--slots and --cpus-per-slot must both be at least 1")]
    Empty,
}

/// One NUMA node and its CPUs, ascending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub id: u32,
    pub cpus: Vec<u32>,
}

/// The machine's NUMA nodes, by id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub nodes: Vec<Node>,
}

/// A part of the machine a step runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub node: u32,
    pub cpus: Vec<u32>,
    /// The nodes its memory is bound to: the nodes of its CPUs on a
    /// machine of several nodes, none (no binding) on a machine of one.
    pub mems: Vec<u32>,
}

/// How the machine is divided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub slots: Vec<Slot>,
}

/// Parses a kernel CPU list such as `0-3,8,10-11`.
pub fn parse_cpu_list(text: &str) -> Option<Vec<u32>> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                if a > b || b - a > 1 << 16 {
                    return None;
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().ok()?),
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    Some(cpus)
}

/// Formats CPUs as a kernel CPU list, e.g. `0-3,8`.
pub fn format_cpu_list(cpus: &[u32]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let start = cpus[i];
        let mut end = start;
        while i + 1 < cpus.len() && cpus[i + 1] == end + 1 {
            i += 1;
            end = cpus[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(",")
}

fn read_list(path: &Path) -> Result<Vec<u32>, TopologyError> {
    let text = std::fs::read_to_string(path).map_err(|e| TopologyError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    parse_cpu_list(&text).ok_or_else(|| TopologyError::BadList {
        path: path.display().to_string(),
        text: text.trim().to_owned(),
    })
}

impl Topology {
    /// Reads the topology under `sysfs_root` (normally `/sys`).
    pub fn read(sysfs_root: &Path) -> Result<Topology, TopologyError> {
        let node_dir = sysfs_root.join("devices/system/node");
        let mut nodes = BTreeMap::new();
        if let Ok(entries) = std::fs::read_dir(&node_dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(id) = name
                    .strip_prefix("node")
                    .and_then(|n| n.parse::<u32>().ok())
                else {
                    continue;
                };
                let cpus = read_list(&entry.path().join("cpulist"))?;
                if !cpus.is_empty() {
                    nodes.insert(id, cpus);
                }
            }
        }
        if nodes.is_empty() {
            let online = sysfs_root.join("devices/system/cpu/online");
            let cpus = read_list(&online)?;
            if cpus.is_empty() {
                return Err(TopologyError::NoCpus(sysfs_root.display().to_string()));
            }
            nodes.insert(0, cpus);
        }
        Ok(Topology {
            nodes: nodes
                .into_iter()
                .map(|(id, cpus)| Node { id, cpus })
                .collect(),
        })
    }

    pub fn cpu_count(&self) -> usize {
        self.nodes.iter().map(|n| n.cpus.len()).sum()
    }
}

impl Layout {
    /// One slot per NUMA node, with all of its CPUs.
    pub fn per_node(topology: &Topology) -> Layout {
        Layout {
            slots: topology
                .nodes
                .iter()
                .map(|n| Slot {
                    node: n.id,
                    cpus: n.cpus.clone(),
                    mems: bind(topology, vec![n.id]),
                })
                .collect(),
        }
    }

    /// `slots` slots of `per_slot` CPUs, filled node by node: a slot never
    /// spans two nodes while a node still has room for a whole one, and the
    /// slots spread over the nodes round-robin.
    pub fn explicit(
        topology: &Topology,
        slots: u32,
        per_slot: u32,
    ) -> Result<Layout, TopologyError> {
        if slots == 0 || per_slot == 0 {
            return Err(TopologyError::Empty);
        }
        let needed = u64::from(slots) * u64::from(per_slot);
        let too_few = || TopologyError::TooFewCpus {
            slots,
            per_slot,
            needed,
            available: topology.cpu_count(),
        };
        if needed > topology.cpu_count() as u64 {
            return Err(too_few());
        }
        let per_slot = per_slot as usize;
        // Whole slots per node first, taken round-robin across nodes.
        let mut free: Vec<(u32, std::collections::VecDeque<u32>)> = topology
            .nodes
            .iter()
            .map(|n| (n.id, n.cpus.iter().copied().collect()))
            .collect();
        let mut out = Vec::new();
        while out.len() < slots as usize {
            let before = out.len();
            for (node, cpus) in free.iter_mut() {
                if out.len() == slots as usize {
                    break;
                }
                if cpus.len() >= per_slot {
                    out.push(Slot {
                        node: *node,
                        cpus: cpus.drain(..per_slot).collect(),
                        mems: bind(topology, vec![*node]),
                    });
                }
            }
            if out.len() == before {
                break;
            }
        }
        // What is left spans nodes (a slot wider than any node's rest):
        // it is named after the node giving most of its CPUs.
        while out.len() < slots as usize {
            let mut cpus = Vec::new();
            let mut from: BTreeMap<u32, usize> = BTreeMap::new();
            for (node, rest) in free.iter_mut() {
                while cpus.len() < per_slot {
                    let Some(cpu) = rest.pop_front() else { break };
                    cpus.push(cpu);
                    *from.entry(*node).or_default() += 1;
                }
            }
            if cpus.len() < per_slot {
                return Err(too_few());
            }
            cpus.sort_unstable();
            let node = from
                .iter()
                .max_by_key(|(node, n)| (**n, std::cmp::Reverse(**node)))
                .map_or(0, |(node, _)| *node);
            let mems = bind(topology, from.keys().copied().collect());
            out.push(Slot { node, cpus, mems });
        }
        Ok(Layout { slots: out })
    }
}

/// `nodes` where memory binding means something (several nodes), else none.
fn bind(topology: &Topology, nodes: Vec<u32>) -> Vec<u32> {
    if topology.nodes.len() > 1 {
        nodes
    } else {
        Vec::new()
    }
}

/// Which slots are busy.
#[derive(Debug, Clone)]
pub struct SlotTable {
    layout: Layout,
    busy: Vec<bool>,
}

impl SlotTable {
    pub fn new(layout: Layout) -> SlotTable {
        let busy = vec![false; layout.slots.len()];
        SlotTable { layout, busy }
    }

    pub fn len(&self) -> usize {
        self.busy.len()
    }

    pub fn is_empty(&self) -> bool {
        self.busy.is_empty()
    }

    pub fn slot(&self, index: usize) -> Option<&Slot> {
        self.layout.slots.get(index)
    }

    /// CPUs in busy slots on `node`.
    fn load(&self, node: u32) -> usize {
        self.layout
            .slots
            .iter()
            .zip(&self.busy)
            .filter(|(s, busy)| **busy && s.node == node)
            .map(|(s, _)| s.cpus.len())
            .sum()
    }

    /// Takes a free slot on the least-loaded node (fewest busy CPUs; then
    /// the lowest node, then the first slot); `None` if every slot is busy.
    pub fn take(&mut self) -> Option<usize> {
        let index = (0..self.busy.len())
            .filter(|i| !self.busy[*i])
            .min_by_key(|i| {
                let node = self.layout.slots[*i].node;
                (self.load(node), node, *i)
            })?;
        self.busy[index] = true;
        Some(index)
    }

    pub fn release(&mut self, index: usize) {
        if let Some(busy) = self.busy.get_mut(index) {
            *busy = false;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A fake sysfs tree with `nodes` (id, CPU list).
    fn tree(nodes: &[(u32, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (id, list) in nodes {
            let node = dir.path().join(format!("devices/system/node/node{id}"));
            std::fs::create_dir_all(&node).unwrap();
            std::fs::write(node.join("cpulist"), format!("{list}\n")).unwrap();
        }
        // Noise the reader must skip.
        std::fs::create_dir_all(dir.path().join("devices/system/node/power")).unwrap();
        dir
    }

    #[test]
    fn cpu_lists_parse_and_print() {
        assert_eq!(
            parse_cpu_list("0-3,8,10-11\n"),
            Some(vec![0, 1, 2, 3, 8, 10, 11])
        );
        assert_eq!(parse_cpu_list(""), Some(vec![]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
        assert_eq!(format_cpu_list(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
    }

    #[test]
    fn two_nodes_of_four_cpus_give_a_slot_per_node_and_fill_evenly() {
        let dir = tree(&[(0, "0-3"), (1, "4-7")]);
        let topology = Topology::read(dir.path()).unwrap();
        assert_eq!(topology.cpu_count(), 8);
        let layout = Layout::per_node(&topology);
        assert_eq!(
            layout.slots,
            [
                Slot {
                    node: 0,
                    cpus: vec![0, 1, 2, 3],
                    mems: vec![0],
                },
                Slot {
                    node: 1,
                    cpus: vec![4, 5, 6, 7],
                    mems: vec![1],
                }
            ]
        );
        // Four slots of two CPUs: two per node, round-robin.
        let layout = Layout::explicit(&topology, 4, 2).unwrap();
        let nodes: Vec<u32> = layout.slots.iter().map(|s| s.node).collect();
        assert_eq!(nodes, [0, 1, 0, 1]);
        assert_eq!(layout.slots[2].cpus, [2, 3]);
        // Memory is bound to the slot's own node.
        assert_eq!(layout.slots[3].mems, [1]);
        // The least-loaded node gets each next step.
        let mut table = SlotTable::new(layout);
        let first = table.take().unwrap();
        let second = table.take().unwrap();
        assert_ne!(
            table.slot(first).unwrap().node,
            table.slot(second).unwrap().node
        );
        table.release(first);
        let third = table.take().unwrap();
        assert_eq!(
            table.slot(third).unwrap().node,
            table.slot(first).unwrap().node
        );
        assert!(table.take().is_some() && table.take().is_some());
        assert_eq!(table.take(), None);
    }

    #[test]
    fn four_nodes_with_odd_cpu_lists() {
        let dir = tree(&[(0, "0,4"), (1, "1,5"), (2, "2-3,8"), (3, "6-7,9-11")]);
        let topology = Topology::read(dir.path()).unwrap();
        assert_eq!(topology.nodes.len(), 4);
        assert_eq!(topology.nodes[3].cpus, [6, 7, 9, 10, 11]);
        let layout = Layout::explicit(&topology, 5, 2).unwrap();
        for slot in &layout.slots {
            let node = &topology.nodes[slot.node as usize];
            assert!(slot.cpus.iter().all(|c| node.cpus.contains(c)), "{slot:?}");
        }
        let mut all: Vec<u32> = layout.slots.iter().flat_map(|s| s.cpus.clone()).collect();
        let n = all.len();
        all.dedup();
        assert_eq!(all.len(), n, "no CPU in two slots");
        // Node 3 has the most room: it holds the fifth slot.
        assert_eq!(layout.slots[4].node, 3);
        // With node 3 busier, the next step goes to an idle node.
        let mut table = SlotTable::new(Layout::per_node(&topology));
        assert_eq!(table.take(), Some(0));
        assert_eq!(table.take(), Some(1));
        assert_eq!(table.take(), Some(2));
        assert_eq!(table.take(), Some(3));
        table.release(1);
        assert_eq!(table.take(), Some(1));
        // Slots wider than any node span nodes.
        let wide = Layout::explicit(&topology, 2, 5).unwrap();
        assert_eq!(wide.slots.len(), 2);
        assert_eq!(wide.slots[0].node, 3);
        // Its memory may come from each node it has CPUs on.
        let nodes_of = |cpus: &[u32]| -> Vec<u32> {
            let mut n: Vec<u32> = topology
                .nodes
                .iter()
                .filter(|node| node.cpus.iter().any(|c| cpus.contains(c)))
                .map(|node| node.id)
                .collect();
            n.sort_unstable();
            n
        };
        for slot in &wide.slots {
            assert_eq!(slot.mems, nodes_of(&slot.cpus), "{slot:?}");
        }
        assert!(matches!(
            Layout::explicit(&topology, 3, 5),
            Err(TopologyError::TooFewCpus { available: 12, .. })
        ));
    }

    #[test]
    fn a_single_node_or_none_at_all() {
        let dir = tree(&[(0, "0-1")]);
        let topology = Topology::read(dir.path()).unwrap();
        assert_eq!(Layout::per_node(&topology).slots.len(), 1);
        // One node: nothing to bind memory to.
        assert!(Layout::per_node(&topology).slots[0].mems.is_empty());
        let two = Layout::explicit(&topology, 2, 1).unwrap();
        assert_eq!(two.slots[0].cpus, [0]);
        assert_eq!(two.slots[1].cpus, [1]);
        // No NUMA directory: the online CPUs are one node.
        let flat = tempfile::tempdir().unwrap();
        let cpu = flat.path().join("devices/system/cpu");
        std::fs::create_dir_all(&cpu).unwrap();
        std::fs::write(cpu.join("online"), "0-5\n").unwrap();
        let topology = Topology::read(flat.path()).unwrap();
        assert_eq!(
            topology.nodes,
            [Node {
                id: 0,
                cpus: (0..6).collect()
            }]
        );
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            Topology::read(empty.path()),
            Err(TopologyError::Read { .. })
        ));
    }
}
