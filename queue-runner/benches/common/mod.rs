//! What the queue runner's benches share: the line that names the machine
//! their figures come from, and a fixed-seed generator for generated DAGs.
//! Included with `#[path]` by each bench.

#![allow(dead_code)]

/// Prints `title` and the machine (nproc and the CPU model), so figures
/// from different machines are not compared blindly.
pub fn print_machine(title: &str) {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    println!("{title}");
    println!("machine: nproc {cpus}, CPU {model}");
}

/// A fixed-seed xorshift generator: the same DAG shape every run.
pub struct XorShift(pub u64);

impl XorShift {
    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}
