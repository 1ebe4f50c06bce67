//! The simulated world's derivations: a DAG by short name, parsed from
//! lines such as `d: x86_64-linux big <- b c`, and the step specs a driver
//! would send for it.

use std::collections::{BTreeMap, BTreeSet};

use crate::{DrvPath, StepSpec};

/// A derivation graph, by short name.
#[derive(Clone, Debug, Default)]
pub(crate) struct Dag {
    pub nodes: BTreeMap<String, Node>,
}

#[derive(Clone, Debug)]
pub(crate) struct Node {
    pub system: String,
    pub features: Vec<String>,
    pub inputs: Vec<String>,
    /// Marked `!resolve`: resolved once its inputs are built.
    pub needs_resolution: bool,
    /// Marked `~SECONDS`: how long it is expected to (and, in timed runs,
    /// does) take to build.
    pub expected_ms: Option<u32>,
}

/// The store path of a simulated derivation.
pub(crate) fn drv(name: &str) -> DrvPath {
    DrvPath::from(format!("/nix/store/sim-{name}.drv"))
}

/// The short name of a simulated derivation.
pub(crate) fn name(drv: &DrvPath) -> String {
    short(drv.as_str())
}

pub(crate) fn short(text: &str) -> String {
    text.replace("/nix/store/sim-", "").replace(".drv", "")
}

impl Dag {
    /// One node a line:
    /// `name: system [feature…] [!resolve] [~SECONDS] [<- input…]`.
    /// Blank lines and `#` comments are skipped.
    pub fn parse(text: &str) -> Dag {
        let mut dag = Dag::default();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, rest) = line
                .split_once(':')
                .expect("a DAG line is `name: system …`");
            let (left, inputs) = rest.split_once("<-").unwrap_or((rest, ""));
            let mut words = left.split_whitespace();
            let system = words.next().expect("a DAG node needs a system").to_string();
            let (marks, words): (Vec<&str>, Vec<&str>) = words.partition(|w| *w == "!resolve");
            let (times, features): (Vec<&str>, Vec<&str>) =
                words.into_iter().partition(|w| w.starts_with('~'));
            let expected_ms = times.first().map(|t| {
                let secs: u32 = t[1..].trim_end_matches('s').parse().expect("~SECONDS");
                secs * 1000
            });
            dag.nodes.insert(
                name.trim().to_string(),
                Node {
                    system,
                    features: features.into_iter().map(str::to_string).collect(),
                    inputs: inputs.split_whitespace().map(str::to_string).collect(),
                    needs_resolution: !marks.is_empty(),
                    expected_ms,
                },
            );
        }
        for node in dag.nodes.values() {
            for input in &node.inputs {
                assert!(dag.nodes.contains_key(input), "unknown input {input}");
            }
        }
        dag
    }

    /// `top` and everything it depends on.
    pub fn closure(&self, top: &str) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut pending = vec![top.to_string()];
        while let Some(name) = pending.pop() {
            if seen.insert(name.clone()) {
                pending.extend(self.nodes[&name].inputs.iter().cloned());
            }
        }
        seen
    }

    /// What the driver would send: the closure of `top` without the
    /// derivations whose outputs are `valid`.
    /// `failed` are known to fail (`FailedPaths`).
    pub fn step_specs(
        &self,
        top: &str,
        valid: &BTreeSet<String>,
        failed: &BTreeSet<String>,
    ) -> Vec<StepSpec> {
        self.closure(top)
            .into_iter()
            .filter(|name| !valid.contains(name))
            .map(|name| {
                let node = &self.nodes[&name];
                StepSpec {
                    drv_path: drv(&name),
                    system: node.system.clone(),
                    required_features: node.features.clone(),
                    input_drvs: node.inputs.iter().map(|i| drv(i)).collect(),
                    known_failed: failed.contains(&name),
                    needs_resolution: node.needs_resolution,
                    expected_ms: node.expected_ms,
                }
            })
            .collect()
    }

    /// The spec of a node on its own (a resolved derivation).
    pub fn spec(&self, name: &str) -> StepSpec {
        let node = &self.nodes[name];
        StepSpec {
            drv_path: drv(name),
            system: node.system.clone(),
            required_features: node.features.clone(),
            input_drvs: node.inputs.iter().map(|i| drv(i)).collect(),
            known_failed: false,
            needs_resolution: node.needs_resolution,
            expected_ms: node.expected_ms,
        }
    }
}
