//! Reading the derivation closures of queued builds from the Nix store.
//!
//! For a batch of builds, walks the `.drv` files from each build's top
//! derivation down, parses them, and asks the store which outputs are
//! valid. A derivation whose outputs are all valid needs no step, and the
//! walk does not descend below it. Everything else becomes a
//! [`StepSpec`] for the core.
//!
//! The files of each level of the walk are read concurrently, and the
//! validity of all their outputs is asked in one query. An output whose
//! path is known only once built (content-addressed, deferred) counts as
//! valid when its realisation is known (one lookup per level, by the keys
//! [`crate::ca::realisation_keys`] gives; the caller's lookup asks the
//! database, then the store) and that path is valid.
//!
//! Invariants: each `.drv` is read and parsed at most once per batch, so a
//! jobset whose builds share dependencies costs the size of the union of
//! their closures, not the sum; a derivation that is missing or cannot be
//! parsed fails only the builds that need it, with a message naming the
//! file; a transient failure (the store's daemon, an I/O error other than
//! a missing file) fails no build: the batch says so
//! ([`BatchClosure::transient`]) and is read again later.

use std::collections::{BTreeMap, HashMap, HashSet};

use sluice_core::{DrvPath, StepSpec};
use sluice_nix::daemon::DaemonClient;
use sluice_nix::derivation::Derivation;
use sluice_nix::store_path::{StoreDir, StorePath};

/// How many `.drv` files are read at once.
/// Blocking tasks reading and parsing a chunk of derivations at once.
const READ_THREADS: usize = 4;
/// Derivations of one level of a closure read and parsed before they are
/// reduced to what is kept (see [`read_closures`]).
const LEVEL_CHUNK: usize = 1024;

/// Why a derivation could not be taken into the graph.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IngestError {
    #[error("reading derivation {path}: {cause}")]
    Read { path: String, cause: String },
    #[error("parsing derivation {path}: {cause}")]
    Parse { path: String, cause: String },
    #[error("derivation {path} depends on itself (a dependency cycle); Nix cannot build it")]
    Cycle { path: String },
    #[error("derivation {path} cannot be built here: {cause}")]
    Unsupported { path: String, cause: String },
    /// Not an error of the derivation: it had a step when the batch was
    /// read, so it was not read, and has none now. The build needing it is
    /// loaded again, not aborted.
    #[error("derivation {path} was held when its batch was read, and is not any more")]
    NoLongerHeld { path: String },
}

/// One derivation of a closure, with what the driver needs besides the
/// core's [`StepSpec`].
#[derive(Debug, Clone)]
pub struct ClosureDrv {
    pub spec: StepSpec,
    /// Output name → known path: static, or recorded for a
    /// content-addressed or deferred output (`None` when not known yet);
    /// sorted by name, compact as [`HeldDrv::outputs`].
    pub outputs: Box<[HeldOutput]>,
    /// For outputs known only once built: output name → realisation key
    /// (the hash modulo, see [`crate::ca::realisation_keys`]).
    pub keys: BTreeMap<String, String>,
}

/// An output's name and, when known, its path.
pub type HeldOutput = (Box<str>, Option<Box<str>>);

/// What the driver keeps of a derivation while the core holds its step:
/// only what dispatch and results need, packed into one allocation (the
/// inputs live in the core's graph, and the rest of the spec is not needed
/// again).
pub type HeldDrv = crate::compact::PackedDrv;

impl ClosureDrv {
    /// The paths `FailedPaths` would name if it failed for good: its known
    /// output paths, and `path` (its own) when some output is known only
    /// once built (as `PackedDrv::failed_paths` records them).
    pub fn failure_paths<'a>(&'a self, path: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        let own = (!self.keys.is_empty()).then_some(path);
        self.outputs
            .iter()
            .filter_map(|(_, p)| p.as_deref())
            .chain(own)
    }

    /// What is kept of it while its step is held; `intern` gives the
    /// index of its system among the interned ones.
    pub fn held(&self, intern: &mut impl FnMut(&str) -> usize) -> HeldDrv {
        HeldDrv::new(
            self.spec.drv_path.as_str(),
            intern(&self.spec.system),
            self.outputs.iter().map(|(n, p)| (&**n, p.as_deref())),
            &self.keys,
        )
    }
}

/// The union closure of a batch of builds.
#[derive(Debug, Default)]
pub struct BatchClosure {
    /// Derivations that need building, by path (the key and the spec's
    /// `drv_path`, like every input naming it, share one string).
    pub drvs: sluice_core::PathMap<DrvPath, ClosureDrv>,
    /// Derivations whose outputs are all valid: no step.
    pub valid: HashSet<String>,
    /// The outputs of valid derivations whose paths are not static, as
    /// realised (every output of such a derivation has a key): what a
    /// build of one finishes with, and what the caller records of those
    /// it learnt from somewhere other than the database.
    pub realised: HashMap<String, Vec<crate::db::results::Realisation>>,
    /// Derivations that are missing or malformed: the builds that need
    /// them cannot be built.
    pub broken: HashMap<String, IngestError>,
    /// Derivations not read because the queue runner held a step for them
    /// when the batch was read (their own inputs are held too).
    pub held: sluice_core::PathSet<DrvPath>,
    /// A failure that says nothing about the derivations (the store did
    /// not answer, a read failed for another reason than a missing file):
    /// nothing of this batch may be used; read it again later.
    pub transient: Option<String>,
}

impl BatchClosure {
    /// Marks every derivation whose outputs are known only once built as
    /// unbuildable here, for `cause`.
    pub fn refuse_content_addressed(&mut self, cause: &str) {
        let dynamic: Vec<DrvPath> = self
            .drvs
            .iter()
            .filter(|(_, d)| !d.keys.is_empty())
            .map(|(p, _)| p.clone())
            .collect();
        for path in dynamic {
            self.drvs.remove(&path);
            let path = path.as_str().to_owned();
            self.broken.insert(
                path.clone(),
                IngestError::Unsupported {
                    path,
                    cause: cause.to_owned(),
                },
            );
        }
    }

    /// The steps one build needs that are not held yet: the part of the
    /// batch closure reachable from `top` without passing through a
    /// derivation for which `held` is true (the core has its step, and so
    /// every step below it). Loading a queue thus costs the union of the
    /// builds' closures, not their sum. `Err` if a reachable derivation is
    /// broken.
    pub fn steps_for(
        &self,
        top: &str,
        held: impl Fn(&str) -> bool,
    ) -> Result<Vec<StepSpec>, IngestError> {
        // Depth first, iteratively: a derivation met again while it is
        // still on the path from `top` closes a cycle.
        let mut out = Vec::new();
        let mut done: HashSet<&str> = HashSet::new();
        let mut on_path: HashSet<&str> = HashSet::new();
        // (derivation, index of its next input to visit)
        let mut stack: Vec<(&str, usize)> = Vec::new();
        if held(top) {
            return Ok(out);
        }
        if let Some(err) = self.broken.get(top) {
            return Err(err.clone());
        }
        if self.held.contains(top) {
            return Err(IngestError::NoLongerHeld {
                path: top.to_owned(),
            });
        }
        stack.push((top, 0));
        on_path.insert(top);
        while let Some((drv, next)) = stack.last().copied() {
            let inputs = self
                .drvs
                .get(drv)
                .map(|d| d.spec.input_drvs.as_slice())
                .unwrap_or_default();
            match inputs.get(next) {
                Some(input) => {
                    if let Some(top_entry) = stack.last_mut() {
                        top_entry.1 += 1;
                    }
                    let input = input.as_str();
                    if on_path.contains(input) {
                        return Err(IngestError::Cycle {
                            path: input.to_owned(),
                        });
                    }
                    if done.contains(input) {
                        continue;
                    }
                    if held(input) {
                        done.insert(input);
                        continue;
                    }
                    if self.held.contains(input) {
                        return Err(IngestError::NoLongerHeld {
                            path: input.to_owned(),
                        });
                    }
                    if let Some(err) = self.broken.get(input) {
                        return Err(err.clone());
                    }
                    on_path.insert(input);
                    stack.push((input, 0));
                }
                None => {
                    stack.pop();
                    on_path.remove(drv);
                    done.insert(drv);
                    if let Some(d) = self.drvs.get(drv) {
                        out.push(d.spec.clone());
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Reads the closures of `tops` (full `.drv` paths).
///
/// `read_file` reads a store file by full path, blocking; it is a
/// parameter so that the store's files can live under a different real
/// directory than the logical store dir, as in a builder's isolated store.
/// Files are read and parsed on the blocking pool, a share of a chunk per
/// thread (a blocking task per file cost more in thread wake-ups than the
/// read itself).
///
/// `lookup` gives the recorded realisations of (hash, output) keys;
/// `hashes` memoises hashes modulo across batches.
///
/// The walk stops at derivations `held` says the queue runner has a step
/// for (so has every step below it): loading a queue reads the union of
/// its builds' closures once, not once per batch. They are listed in
/// [`BatchClosure::held`]; the caller checks they are still held.
pub async fn read_closures<F, L, LFut>(
    store: &mut DaemonClient,
    store_dir: &StoreDir,
    tops: &[String],
    held: &(dyn Fn(&str) -> bool + Send + Sync),
    read_file: F,
    hashes: &crate::ca::Hashes,
    lookup: L,
) -> BatchClosure
where
    F: Fn(&str) -> std::io::Result<Vec<u8>> + Clone + Send + Sync + 'static,
    L: Fn(Vec<(String, String)>) -> LFut,
    LFut: std::future::Future<Output = Result<HashMap<(String, String), String>, String>>,
{
    let mut batch = BatchClosure::default();
    // Every path met, interned: one string per derivation however many
    // derivations name it as an input.
    let mut queued: sluice_core::PathSet<DrvPath> = sluice_core::PathSet::default();
    let mut frontier: Vec<DrvPath> = Vec::new();
    for top in tops {
        let top = DrvPath::from(top.as_str());
        if queued.insert(top.clone()) {
            if held(top.as_str()) {
                batch.held.insert(top);
            } else {
                frontier.push(top);
            }
        }
    }
    let mut level: Vec<DrvPath> = Vec::new();
    while !frontier.is_empty() || !level.is_empty() {
        if level.is_empty() {
            level = std::mem::take(&mut frontier);
        }
        // Read and parse a chunk of this level: a chunk's parsed
        // derivations are all alive at once, and a whole level of a big
        // closure is most of it.
        let rest = level.split_off(level.len().min(LEVEL_CHUNK));
        let chunk = std::mem::replace(&mut level, rest);
        let reads = match read_chunk(store_dir, chunk, &read_file).await {
            Ok(reads) => reads,
            Err(e) => {
                batch.transient = Some(e);
                return batch;
            }
        };
        let mut parsed: Vec<(DrvPath, StorePath, Derivation)> = Vec::new();
        for (path, result) in reads {
            match result {
                Ok((sp, drv)) => parsed.push((path, sp, drv)),
                Err(ReadFailure::Broken(e)) => {
                    batch.broken.insert(path.as_str().to_owned(), e);
                }
                Err(ReadFailure::Transient(e)) => {
                    batch.transient = Some(e);
                    return batch;
                }
            }
        }
        // The realisation keys of outputs known only once built, and what
        // is recorded for them, in one lookup for the level.
        let mut keys_of: Vec<BTreeMap<String, String>> = Vec::new();
        for (path, sp, drv) in &parsed {
            if !crate::ca::has_dynamic_outputs(drv) {
                keys_of.push(BTreeMap::new());
                continue;
            }
            let read = |p: StorePath| {
                let path = store_dir.print(&p);
                let read_file = &read_file;
                async move {
                    match read_one(store_dir, &path, read_file) {
                        Ok((_, drv)) => Ok(drv),
                        Err(ReadFailure::Broken(e)) => Err(e.to_string()),
                        Err(ReadFailure::Transient(e)) => Err(e),
                    }
                }
            };
            match crate::ca::realisation_keys(hashes, store_dir, sp, drv, &read).await {
                Ok(keys) => keys_of.push(keys),
                Err(e) => {
                    batch.broken.insert(
                        path.as_str().to_owned(),
                        IngestError::Parse {
                            path: path.as_str().to_owned(),
                            cause: format!("computing its hash modulo: {e}"),
                        },
                    );
                    keys_of.push(BTreeMap::new());
                }
            }
        }
        let wanted: Vec<(String, String)> = keys_of
            .iter()
            .flat_map(|keys| keys.iter().map(|(o, h)| (h.clone(), o.clone())))
            .collect();
        let recorded = if wanted.is_empty() {
            HashMap::new()
        } else {
            match lookup(wanted).await {
                Ok(found) => found,
                Err(e) => {
                    batch.transient = Some(format!("looking realisations up: {e}"));
                    return batch;
                }
            }
        };

        // One validity query for every known output of the level.
        let mut outputs_of: Vec<BTreeMap<String, Option<StorePath>>> = Vec::new();
        let mut static_paths: Vec<StorePath> = Vec::new();
        for ((path, _, drv), keys) in parsed.iter().zip(&keys_of) {
            let mut outs = BTreeMap::new();
            for (name, out) in &drv.outputs {
                let realised = keys
                    .get(name)
                    .and_then(|h| recorded.get(&(h.clone(), name.clone())))
                    .and_then(|p| store_dir.parse_path(p).ok());
                match out.path(store_dir, &drv.name, name).map(|p| p.or(realised)) {
                    Ok(p) => {
                        if let Some(p) = &p {
                            static_paths.push(p.clone());
                        }
                        outs.insert(name.clone(), p);
                    }
                    Err(e) => {
                        batch.broken.insert(
                            path.as_str().to_owned(),
                            IngestError::Parse {
                                path: path.as_str().to_owned(),
                                cause: e.to_string(),
                            },
                        );
                    }
                }
            }
            outputs_of.push(outs);
        }
        let valid_paths = if static_paths.is_empty() {
            Default::default()
        } else {
            match store.query_valid_paths(static_paths.iter(), false).await {
                Ok(v) => v,
                Err(e) => {
                    batch.transient = Some(format!("querying the store's valid paths: {e}"));
                    return batch;
                }
            }
        };
        for (((path, _sp, drv), outs), keys) in parsed.into_iter().zip(outputs_of).zip(keys_of) {
            if batch.broken.contains_key(path.as_str()) {
                continue;
            }
            let all_valid = !outs.is_empty()
                && outs
                    .values()
                    .all(|p| p.as_ref().is_some_and(|p| valid_paths.contains(p)));
            if all_valid {
                if !keys.is_empty() {
                    let realised = outs
                        .iter()
                        .filter_map(|(output, p)| {
                            Some(crate::db::results::Realisation {
                                drv_hash: keys.get(output)?.clone(),
                                output: output.clone(),
                                out_path: store_dir.print(p.as_ref()?),
                                drv_path: path.as_str().to_owned(),
                            })
                        })
                        .collect();
                    batch.realised.insert(path.as_str().to_owned(), realised);
                }
                batch.valid.insert(path.as_str().to_owned());
                continue;
            }
            let input_drvs: Vec<DrvPath> = drv
                .input_drvs
                .keys()
                .map(|p| {
                    let printed = store_dir.print(p);
                    match queued.get(printed.as_str()) {
                        Some(known) => known.clone(),
                        None => {
                            let input = DrvPath::from(printed);
                            queued.insert(input.clone());
                            if held(input.as_str()) {
                                batch.held.insert(input.clone());
                            } else {
                                frontier.push(input.clone());
                            }
                            input
                        }
                    }
                })
                .collect();
            let required_features = required_features(&drv);
            let spec = StepSpec {
                drv_path: path.clone(),
                system: drv.platform.clone(),
                required_features,
                input_drvs,
                // Set by the loader, which asks `FailedPaths`.
                known_failed: false,
                needs_resolution: crate::ca::needs_resolution(&drv),
                // No history yet: the core's default estimate.
                expected_ms: None,
            };
            // A recorded path that is not valid any more is built again.
            let outputs = outs
                .into_iter()
                .map(|(n, p)| {
                    let known = p.filter(|p| !keys.contains_key(&n) || valid_paths.contains(p));
                    (Box::from(n), known.map(|p| Box::from(store_dir.print(&p))))
                })
                .collect();
            batch.drvs.insert(
                path,
                ClosureDrv {
                    spec,
                    outputs,
                    keys,
                },
            );
        }
    }
    batch
}

/// Why one `.drv` was not read.
enum ReadFailure {
    /// Missing or malformed: the derivation itself is at fault.
    Broken(IngestError),
    /// Anything else: try again later.
    Transient(String),
}

/// Reads and parses `chunk` on the blocking pool, split among
/// [`READ_THREADS`] tasks.
async fn read_chunk<F>(
    store_dir: &StoreDir,
    chunk: Vec<DrvPath>,
    read_file: &F,
) -> Result<Vec<(DrvPath, Result<(StorePath, Derivation), ReadFailure>)>, String>
where
    F: Fn(&str) -> std::io::Result<Vec<u8>> + Clone + Send + Sync + 'static,
{
    let per_task = chunk.len().div_ceil(READ_THREADS).max(1);
    let mut tasks = Vec::new();
    let mut chunk = chunk;
    while !chunk.is_empty() {
        let rest = chunk.split_off(chunk.len().min(per_task));
        let part = std::mem::replace(&mut chunk, rest);
        let dir = store_dir.clone();
        let read_file = read_file.clone();
        tasks.push(tokio::task::spawn_blocking(move || {
            part.into_iter()
                .map(|path| {
                    let result = read_one(&dir, path.as_str(), &read_file);
                    (path, result)
                })
                .collect::<Vec<_>>()
        }));
    }
    let mut reads = Vec::new();
    for task in tasks {
        reads.extend(
            task.await
                .map_err(|e| format!("reading derivations: {e}"))?,
        );
    }
    Ok(reads)
}

fn read_one<F>(
    store_dir: &StoreDir,
    path: &str,
    read_file: &F,
) -> Result<(StorePath, Derivation), ReadFailure>
where
    F: Fn(&str) -> std::io::Result<Vec<u8>>,
{
    let parse_error = |cause: String| {
        ReadFailure::Broken(IngestError::Parse {
            path: path.into(),
            cause,
        })
    };
    let sp = store_dir
        .parse_path(path)
        .map_err(|e| parse_error(e.to_string()))?;
    let text = read_file(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            ReadFailure::Broken(IngestError::Read {
                path: path.into(),
                cause: e.to_string(),
            })
        } else {
            ReadFailure::Transient(format!("reading derivation {path}: {e}"))
        }
    })?;
    let drv = Derivation::parse_drv_file(store_dir, &sp, &text)
        .map_err(|e| parse_error(e.to_string()))?;
    Ok((sp, drv))
}

/// `requiredSystemFeatures`, from the environment or structured attributes.
pub fn required_features(drv: &Derivation) -> Vec<String> {
    if let Some(json) = drv.structured_attrs() {
        if let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(json)
        {
            if let Some(serde_json::Value::Array(items)) = map.get("requiredSystemFeatures") {
                return items
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect();
            }
        }
        return Vec::new();
    }
    drv.env
        .get("requiredSystemFeatures")
        .map(|v| v.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(name: &str) -> String {
        format!("/nix/store/{name:a>32}-{name}.drv")
    }

    fn closure_drv(name: &str, inputs: &[&str]) -> (DrvPath, ClosureDrv) {
        let drv_path = DrvPath::from(path(name));
        let spec = StepSpec {
            drv_path: drv_path.clone(),
            system: "x86_64-linux".into(),
            required_features: Vec::new(),
            input_drvs: inputs.iter().map(|i| DrvPath::from(path(i))).collect(),
            known_failed: false,
            needs_resolution: false,
            expected_ms: None,
        };
        let held = ClosureDrv {
            spec,
            outputs: Box::new([]),
            keys: BTreeMap::new(),
        };
        (drv_path, held)
    }

    /// top needs mid, which was held when the batch was read (so not
    /// read); mid needs leaf.
    fn batch() -> BatchClosure {
        let mut batch = BatchClosure::default();
        let (p, d) = closure_drv("top", &["mid"]);
        batch.drvs.insert(p, d);
        batch.held.insert(DrvPath::from(path("mid")));
        batch
    }

    #[test]
    fn a_walk_stops_at_a_step_still_held() {
        let mid = path("mid");
        let steps = batch()
            .steps_for(&path("top"), |d| d == mid)
            .expect("mid is held");
        let names: Vec<&str> = steps.iter().map(|s| s.drv_path.as_str()).collect();
        assert_eq!(names, vec![path("top").as_str()]);
    }

    #[test]
    fn a_step_held_when_read_and_gone_since_makes_the_build_load_again() {
        // mid finished (or failed) meanwhile: its outputs may or may not be
        // valid, and it was never read; absent, it would count as built.
        match batch().steps_for(&path("top"), |_| false) {
            Err(IngestError::NoLongerHeld { path: p }) => assert_eq!(p, path("mid")),
            other => panic!("expected NoLongerHeld, got {other:?}"),
        }
    }
}
