//! Throughput of the derivation layer on a synthetic nixpkgs-shaped corpus.
//!
//! Generates (deterministically) 12,000 `.drv` texts of 1–20 KB: leaf
//! fixed-output fetches and input-addressed packages with tens of input
//! derivations, a few input sources, and long environment values (lists of
//! store paths in `buildInputs`/`configureFlags`, shell snippets with quotes
//! and newlines). Every derivation is made as Nix makes it (output paths
//! from the hash modulo, `.drv` path from the text), so the benchmark also
//! checks that reading computes the same paths.
//!
//! Prints, single-threaded: parse throughput in MB/s, and derivations per
//! second for parse + `.drv` path + output paths, with the hash modulo of
//! every derivation memoised across the corpus as a queue runner would.
//! Rates are per second of the thread's CPU time (`/proc/self/schedstat`),
//! which on a shared machine is what one core delivers; wall time is shown
//! beside it. Run with `cargo bench -p sluice-nix --bench derivations`
//! (about 30 s); without `--bench` it only checks a small corpus.

use std::collections::{BTreeMap, BTreeSet};
use std::hint::black_box;
use std::time::{Duration, Instant};

use sluice_nix::derivation::hash_modulo::{
    compute_output_paths, fill_input_addressed_outputs, DrvHashCache,
};
use sluice_nix::derivation::{Derivation, DerivationOutput, ParsedDerivation};
use sluice_nix::hash::{Hash, HashAlgo};
use sluice_nix::store_path::{ContentAddressMethod, StoreDir, StorePath};

/// The allocator the Sluice binaries use, so the figures are theirs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CORPUS_SIZE: usize = 12_000;
/// Without `--bench` (e.g. `cargo test --benches`): a small corpus, checked
/// but not timed.
const SMOKE_CORPUS_SIZE: usize = 300;

/// xorshift64*: deterministic and dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn digest(&mut self) -> [u8; 20] {
        let mut d = [0u8; 20];
        for chunk in d.chunks_mut(8) {
            let bytes = self.next().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        d
    }

    fn word(&mut self) -> String {
        const SYLLABLES: &[&str] = &[
            "lib", "py", "gtk", "xml", "ssl", "zip", "net", "qt", "mesa", "font", "util", "core",
            "glib", "perl", "gnu", "rust", "go", "nix", "sys", "dev", "x11", "pulse", "cups",
        ];
        let n = 1 + self.below(3);
        (0..n)
            .map(|_| SYLLABLES[self.below(SYLLABLES.len())])
            .collect::<Vec<_>>()
            .join("")
    }
}

struct Generated {
    path: StorePath,
    text: String,
    drv: Derivation,
}

fn path_list(dir: &StoreDir, paths: &[StorePath]) -> String {
    paths
        .iter()
        .map(|p| dir.print(p))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A fixed-output fetch, as `fetchurl` writes them.
fn fetch(rng: &mut Rng, dir: &StoreDir, bash: &StorePath, i: usize) -> Derivation {
    let name = format!("{}-{}.{}.tar.gz", rng.word(), i % 17, rng.below(30));
    let mut digest = [0u8; 32];
    for chunk in digest.chunks_mut(8) {
        chunk.copy_from_slice(&rng.next().to_le_bytes());
    }
    let hash = Hash::from_digest(HashAlgo::Sha256, &digest).unwrap_or(Hash::sha256(b""));
    let method = if rng.chance(30) {
        ContentAddressMethod::Recursive
    } else {
        ContentAddressMethod::Flat
    };
    let output = DerivationOutput::CAFixed { method, hash };
    let out_path = output
        .path(dir, &name, "out")
        .ok()
        .flatten()
        .map(|p| dir.print(&p))
        .unwrap_or_default();
    let url = format!("https://example.org/{}/{}", rng.word(), name);
    let env: BTreeMap<String, String> = [
        ("builder", dir.print(bash) + "/bin/bash"),
        ("name", name.clone()),
        ("out", out_path),
        ("outputHash", hash.to_base16()),
        ("outputHashAlgo", "sha256".into()),
        (
            "outputHashMode",
            if method == ContentAddressMethod::Recursive {
                "recursive"
            } else {
                "flat"
            }
            .into(),
        ),
        ("system", "x86_64-linux".into()),
        ("urls", url),
        ("preferLocalBuild", "1".into()),
        ("SSL_CERT_FILE", "/no-cert-file.crt".into()),
        ("impureEnvVars", "http_proxy https_proxy ftp_proxy all_proxy no_proxy NIX_CURL_FLAGS NIX_HASHED_MIRRORS NIX_CONNECT_TIMEOUT NIX_MIRRORS_apache NIX_MIRRORS_bioc NIX_MIRRORS_bitlbee NIX_MIRRORS_centos NIX_MIRRORS_cpan NIX_MIRRORS_debian NIX_MIRRORS_fedora NIX_MIRRORS_gcc NIX_MIRRORS_gentoo NIX_MIRRORS_gnome NIX_MIRRORS_gnu NIX_MIRRORS_gnupg NIX_MIRRORS_hackage NIX_MIRRORS_kde NIX_MIRRORS_kernel NIX_MIRRORS_mozilla NIX_MIRRORS_mysql NIX_MIRRORS_openbsd NIX_MIRRORS_sourceforge NIX_MIRRORS_ubuntu NIX_MIRRORS_xorg".into()),
        ("curlOpts", String::new()),
        ("showURLs", String::new()),
        ("postFetch", String::new()),
        ("downloadToTemp", String::new()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    Derivation {
        name,
        outputs: [("out".to_owned(), output)].into_iter().collect(),
        platform: "x86_64-linux".into(),
        builder: dir.print(bash) + "/bin/bash",
        args: vec!["-e".into(), "/builder.sh".into()],
        env,
        ..Derivation::default()
    }
}

fn generate(dir: &StoreDir, size: usize) -> Vec<Generated> {
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let bash =
        StorePath::from_digest(&rng.digest(), "bash-5.1-p16").unwrap_or_else(|e| panic!("{e}"));
    let default_builder = StorePath::from_digest(&rng.digest(), "default-builder.sh")
        .unwrap_or_else(|e| panic!("{e}"));
    let mut cache = DrvHashCache::new();
    let mut out: Vec<Generated> = Vec::with_capacity(size);
    // (index into `out`, output names) of input-addressed derivations.
    let mut packages: Vec<usize> = Vec::new();
    let mut fetches: Vec<usize> = Vec::new();
    for i in 0..size {
        let mut drv = if i < 50 || rng.chance(20) {
            fetch(&mut rng, dir, &bash, i)
        } else {
            package(
                &mut rng,
                dir,
                &out,
                &packages,
                &fetches,
                &bash,
                &default_builder,
                i,
            )
        };
        let fixed = matches!(
            drv.outputs.get("out"),
            Some(DerivationOutput::CAFixed { .. })
        );
        if !fixed {
            fill_input_addressed_outputs(dir, &mut drv, &cache).unwrap_or_else(|e| panic!("{e}"));
        }
        let path = drv.drv_path(dir).unwrap_or_else(|e| panic!("{e}"));
        cache
            .add(dir, path.clone(), &drv)
            .unwrap_or_else(|e| panic!("{e}"));
        let text = drv.to_aterm(dir).unwrap_or_else(|e| panic!("{e}"));
        if fixed {
            fetches.push(out.len());
        } else {
            packages.push(out.len());
        }
        out.push(Generated { path, text, drv });
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn package(
    rng: &mut Rng,
    dir: &StoreDir,
    corpus: &[Generated],
    packages: &[usize],
    fetches: &[usize],
    bash: &StorePath,
    default_builder: &StorePath,
    i: usize,
) -> Derivation {
    let pname = format!("{}-{}", rng.word(), i);
    let version = format!("{}.{}.{}", rng.below(10), rng.below(40), rng.below(9));
    let name = format!("{pname}-{version}");
    let target_size = 1024 + rng.below(17 * 1024);

    let mut input_drvs: BTreeMap<StorePath, BTreeSet<String>> = BTreeMap::new();
    let mut build_inputs = Vec::new();
    let mut native_inputs = Vec::new();
    let src = &corpus[fetches[rng.below(fetches.len())]];
    input_drvs
        .entry(src.path.clone())
        .or_default()
        .insert("out".into());
    let src_path = src.drv.outputs["out"]
        .path(dir, &src.drv.name, "out")
        .ok()
        .flatten();
    // A few popular derivations (stdenv, compilers) and many recent ones.
    let n_inputs = if packages.is_empty() {
        0
    } else {
        3 + rng.below(45)
    };
    for k in 0..n_inputs {
        let idx = if k < 3 {
            packages[rng.below(packages.len().min(20))]
        } else {
            packages[packages.len() - 1 - rng.below(packages.len().min(3000))]
        };
        let dep = &corpus[idx];
        let outputs: Vec<&String> = dep.drv.outputs.keys().collect();
        let wanted = outputs[rng.below(outputs.len())].clone();
        if let Some(DerivationOutput::InputAddressed { path }) = dep.drv.outputs.get(&wanted) {
            if k % 3 == 0 {
                native_inputs.push(path.clone());
            } else {
                build_inputs.push(path.clone());
            }
        }
        input_drvs
            .entry(dep.path.clone())
            .or_default()
            .insert(wanted);
    }
    let mut input_srcs = BTreeSet::from([default_builder.clone()]);
    for _ in 0..rng.below(4) {
        let patch = format!("{}-fix-{}.patch", rng.word(), rng.below(100));
        if let Ok(p) = StorePath::from_digest(&rng.digest(), &patch) {
            input_srcs.insert(p);
        }
    }

    let outputs: Vec<&str> = match rng.below(10) {
        0..=5 => vec!["out"],
        6 | 7 => vec!["out", "dev"],
        8 => vec!["out", "dev", "lib"],
        _ => vec!["bin", "dev", "man", "out"],
    };
    let mut flags: Vec<String> = Vec::new();
    for p in build_inputs.iter().take(12) {
        flags.push(format!("--with-{}={}", rng.word(), dir.print(p)));
    }
    for _ in 0..rng.below(12) {
        flags.push(format!("--enable-{}", rng.word()));
    }
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    let mut set = |k: &str, v: String| {
        env.insert(k.to_owned(), v);
    };
    set("builder", dir.print(bash) + "/bin/bash");
    set("name", name.clone());
    set("pname", pname.clone());
    set("version", version);
    set("system", "x86_64-linux".into());
    set("outputs", outputs.join(" "));
    set("buildInputs", path_list(dir, &build_inputs));
    set("nativeBuildInputs", path_list(dir, &native_inputs));
    set(
        "propagatedBuildInputs",
        path_list(dir, &build_inputs[..build_inputs.len() / 3]),
    );
    set("configureFlags", flags.join(" "));
    set("src", src_path.map(|p| dir.print(&p)).unwrap_or_default());
    set(
        "stdenv",
        native_inputs
            .first()
            .map(|p| dir.print(p))
            .unwrap_or_default(),
    );
    set(
        "patches",
        path_list(dir, &input_srcs.iter().skip(1).cloned().collect::<Vec<_>>()),
    );
    set("strictDeps", "1".into());
    set("doCheck", if rng.chance(50) { "1" } else { "" }.into());
    set("enableParallelBuilding", "1".into());
    for o in &outputs {
        set(o, String::new());
    }
    let mut script = String::from("runHook preInstall\n");
    let mut n = 0;
    let fixed_size = 400
        + 110 * input_drvs.len()
        + 60 * input_srcs.len()
        + env
            .iter()
            .map(|(k, v)| k.len() + v.len() + 8)
            .sum::<usize>();
    while fixed_size + script.len() + 120 < target_size {
        script.push_str(&format!(
            "  substituteInPlace src/{w}.c --replace \"/usr/lib/{w}\" \"$out/lib/{w}\"\n\tinstall -Dm755 {w}-{n} \"$out/bin/{w}\" || echo 'no {w}' >&2\n",
            w = rng.word()
        ));
        n += 1;
    }
    script.push_str("runHook postInstall\n");
    env.insert("postInstall".into(), script);

    Derivation {
        name,
        outputs: outputs
            .iter()
            .map(|o| ((*o).to_owned(), DerivationOutput::Deferred))
            .collect(),
        input_drvs,
        input_srcs,
        platform: "x86_64-linux".into(),
        builder: dir.print(bash) + "/bin/bash",
        args: vec!["-e".into(), dir.print(default_builder)],
        env,
    }
}

/// Nanoseconds this process's main thread has run on a CPU, from
/// `/proc/self/schedstat` (`None` where that is unavailable). On a shared
/// machine this, not wall time, is what one core delivers.
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/schedstat").ok()?;
    let ns: u64 = stat.split_whitespace().next()?.parse().ok()?;
    (ns > 0).then(|| Duration::from_nanos(ns))
}

/// Time taken by some passes: wall clock, and CPU time when known.
struct Timing {
    passes: u32,
    wall: Duration,
    cpu: Option<Duration>,
}

impl Timing {
    /// Items per second of CPU time (wall time if unknown) for `items` per pass.
    fn rate(&self, items: f64) -> f64 {
        items * f64::from(self.passes) / self.cpu.unwrap_or(self.wall).as_secs_f64()
    }

    fn describe(&self) -> String {
        match self.cpu {
            Some(cpu) => format!(
                "{} passes, {:.2?} CPU in {:.2?} wall",
                self.passes, cpu, self.wall
            ),
            None => format!("{} passes in {:.2?} wall", self.passes, self.wall),
        }
    }
}

/// Runs `pass` repeatedly for at least `min` (and at least `min_passes`
/// times).
fn time_passes(min: Duration, min_passes: u32, mut pass: impl FnMut()) -> Timing {
    let start = Instant::now();
    let cpu_start = cpu_time();
    let mut passes = 0;
    while passes < min_passes || start.elapsed() < min {
        pass();
        passes += 1;
    }
    let wall = start.elapsed();
    let cpu = match (cpu_start, cpu_time()) {
        (Some(a), Some(b)) if b > a => Some(b - a),
        _ => None,
    };
    Timing { passes, wall, cpu }
}

fn main() {
    let dir = StoreDir::default();
    let timed = std::env::args().any(|a| a == "--bench");
    let t = Instant::now();
    let corpus = generate(
        &dir,
        if timed {
            CORPUS_SIZE
        } else {
            SMOKE_CORPUS_SIZE
        },
    );
    let bytes: usize = corpus.iter().map(|g| g.text.len()).sum();
    let min = corpus.iter().map(|g| g.text.len()).min().unwrap_or(0);
    let max = corpus.iter().map(|g| g.text.len()).max().unwrap_or(0);
    let inputs: usize = corpus.iter().map(|g| g.drv.input_drvs.len()).sum();
    println!(
        "corpus: {} derivations, {:.1} MB ({} to {} bytes each, {:.1} input derivations on average), generated in {:.1?}",
        corpus.len(),
        bytes as f64 / 1e6,
        min,
        max,
        inputs as f64 / corpus.len() as f64,
        t.elapsed()
    );
    check(&dir, &corpus);
    if !timed {
        println!("smoke run (no --bench): corpus checked, nothing timed");
        return;
    }
    let n = corpus.len() as f64;
    let mb = bytes as f64 / 1e6;
    if cpu_time().is_none() {
        println!("(no /proc/self/schedstat: rates are per second of wall time)");
    }

    // Parsing alone, keeping the results for the pass (as a queue runner
    // keeps what it reads), then dropping each result at once (the worst
    // case for the allocator: every string freed right after it was made).
    let t = time_passes(Duration::from_secs(3), 2, || {
        let kept: Vec<_> = corpus
            .iter()
            .map(|g| ParsedDerivation::parse(&dir, g.text.as_bytes(), &g.drv.name).ok())
            .collect();
        black_box(kept);
    });
    println!(
        "parse (ParsedDerivation::parse, results kept): {:.0} MB/s, {:.0} derivations/s ({})",
        t.rate(mb),
        t.rate(n),
        t.describe()
    );
    let t = time_passes(Duration::from_secs(3), 2, || {
        for g in &corpus {
            black_box(Derivation::parse(&dir, g.text.as_bytes(), &g.drv.name).ok());
        }
    });
    println!(
        "parse (Derivation::parse, each result dropped at once): {:.0} MB/s, {:.0} derivations/s ({})",
        t.rate(mb),
        t.rate(n),
        t.describe()
    );

    // What a queue runner does with each derivation it reads, inputs
    // first; it keeps what it read (as steps), so this pass does too and
    // frees it all at the end.
    let t = time_passes(Duration::from_secs(5), 2, || {
        let mut cache = DrvHashCache::new();
        let mut kept = Vec::with_capacity(corpus.len());
        for g in &corpus {
            let Ok(parsed) = ParsedDerivation::parse(&dir, g.text.as_bytes(), &g.drv.name) else {
                panic!("corpus derivation does not parse");
            };
            let Ok(path) = parsed.drv_path(&dir) else {
                panic!("no drv path");
            };
            let Ok(outputs) = cache.admit(&dir, path, &parsed) else {
                panic!("no hash modulo");
            };
            kept.push((parsed.into_derivation(), outputs));
        }
        black_box(kept);
    });
    println!(
        "parse + .drv path + output paths, hash modulo memoised: {:.0} derivations/s, {:.0} MB/s ({})",
        t.rate(n),
        t.rate(mb),
        t.describe()
    );

    // The same through `Derivation`, which prints the text again for every
    // hash instead of hashing the file's own bytes.
    let t = time_passes(Duration::from_secs(3), 1, || {
        let mut cache = DrvHashCache::new();
        for g in &corpus {
            let Ok(drv) = Derivation::parse(&dir, g.text.as_bytes(), &g.drv.name) else {
                panic!("corpus derivation does not parse");
            };
            let Ok(path) = drv.drv_path(&dir) else {
                panic!("no drv path");
            };
            if cache.add(&dir, path, &drv).is_err() {
                panic!("no hash modulo");
            }
            black_box(compute_output_paths(&dir, &drv, &cache).ok());
        }
    });
    println!(
        "  the same through Derivation (printing instead of hashing the file): {:.0} derivations/s ({})",
        t.rate(n),
        t.describe()
    );

    let t = time_passes(Duration::from_secs(1), 1, || {
        for g in &corpus {
            black_box(Hash::sha256(g.text.as_bytes()));
        }
    });
    println!(
        "  for scale, one SHA-256 of each text: {:.1} µs per derivation (three are unavoidable: .drv path, hash modulo, masked hash modulo)",
        1e6 / t.rate(n)
    );
}

/// Untimed: reading computes exactly the paths the corpus was made with,
/// whichever way it is read.
fn check(dir: &StoreDir, corpus: &[Generated]) {
    let mut cache = DrvHashCache::new();
    for g in corpus {
        let parsed = ParsedDerivation::parse(dir, g.text.as_bytes(), &g.drv.name)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(parsed.is_canonical());
        let drv = parsed.derivation();
        assert_eq!(drv, &g.drv, "parse differs from the generated derivation");
        assert_eq!(drv.drv_path(dir).ok().as_ref(), Some(&g.path));
        assert_eq!(parsed.drv_path(dir).ok().as_ref(), Some(&g.path));
        cache
            .add(dir, g.path.clone(), drv)
            .unwrap_or_else(|e| panic!("{e}"));
        let paths = compute_output_paths(dir, drv, &cache).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed.output_paths(dir, &cache).as_ref(), Ok(&paths));
        let mut fresh = DrvHashCache::new();
        for input in drv.input_drvs.keys() {
            if let Some(h) = cache.get(input) {
                fresh.insert(input.clone(), h.clone());
            }
        }
        assert_eq!(
            fresh.admit(dir, g.path.clone(), &parsed).as_ref(),
            Ok(&paths)
        );
        assert_eq!(fresh.get(&g.path), cache.get(&g.path));
        for (name, output) in &drv.outputs {
            let stored = output.path(dir, &drv.name, name).ok().flatten();
            assert_eq!(paths[name], stored, "output {name} of {}", g.path);
        }
    }
}
