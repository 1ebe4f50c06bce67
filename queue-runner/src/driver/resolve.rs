//! Resolution of content-addressed steps: the core's
//! [`sluice_core::Command::Resolve`] in, [`Event::StepResolved`] out.
//!
//! A background task ([`run`]) reads the step's derivation, finds the
//! path each used input output got (static, or recorded in
//! `SluiceRealisations`: the database's word, never an agent's alone),
//! resolves it with the Nix layer, and checks whether the resolved
//! derivation's outputs are known already (early cutoff). If not, it
//! writes the resolved `.drv` to the queue runner's store, with a GC root
//! under the data directory. The driver then records the resolution
//! through the writer (a status-13 row, kept once per build and
//! derivation, so a restart that resolves again adds none) and tells the
//! core.
//!
//! When a resolved derivation's step succeeds, [`Resolutions::built`]
//! gives the steps resolved into it, so that the same transaction records
//! their realisations and their rows' outputs, and their builds get the
//! paths.
//!
//! Invariants: a resolution that fails for want of the database or the
//! store is tried again later (it changes nothing); one that cannot be
//! done (an input output nobody recorded, a derivation that does not
//! resolve) fails the step for good with a message saying why; nothing
//! here is lost on a restart, since the decision is derived again from
//! the database and the store.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use sluice_core::{BuildId, DrvPath, Event, Resolution, StepFailure, StepSpec};
use sluice_nix::derivation::resolve::resolve;
use sluice_nix::derivation::Derivation;
use sluice_nix::store_path::{StoreDir, StorePath};

use super::writer::{ResolutionRow, WriteJob};
use super::{unix_now, Driver, DriverEvent};
use crate::ca::Hashes;
use crate::db::results::{Realisation, StepKind, StepPhase, StepRow, StepState};
use crate::ingest::ClosureDrv;
use crate::store::Store;

/// How long a resolution that failed for want of the database or the
/// store waits before it is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// A step resolved into another derivation, until that one is built.
#[derive(Debug, Clone)]
struct Original {
    drv_path: DrvPath,
    /// Its outputs' realisation keys (output → hash).
    keys: BTreeMap<String, String>,
}

/// The steps resolved into each resolved derivation not built yet.
#[derive(Debug, Default)]
pub(super) struct Resolutions {
    into: HashMap<DrvPath, Vec<Original>>,
    /// Status-13 rows waiting for the first row of the new step they were
    /// resolved into, to be created in its transaction.
    rows: HashMap<DrvPath, Vec<ResolutionRow>>,
}

/// What a resolution task found.
#[derive(Debug)]
pub struct Resolved {
    drv_path: DrvPath,
    build: BuildId,
    outcome: Outcome,
}

#[derive(Debug)]
enum Outcome {
    /// Build this derivation (written to the store) in the step's place.
    Build {
        resolved: ClosureDrv,
        original_keys: BTreeMap<String, String>,
        system: String,
    },
    /// The resolved derivation's outputs are known: `outputs`.
    Built {
        resolved_drv: String,
        outputs: Vec<(String, String)>,
        original_keys: BTreeMap<String, String>,
        system: String,
    },
    /// It cannot be resolved, and never will be.
    Impossible(String),
    /// The database or the store failed: try again later.
    Transient(String),
}

/// What [`Resolutions::built`] says about a built derivation.
pub(super) struct ResolvedInto {
    /// The realisations of the steps resolved into it.
    pub realisations: Vec<Realisation>,
    /// Those steps' derivations.
    pub originals: Vec<DrvPath>,
}

impl Resolutions {
    /// `resolved` was built with `outputs`: the steps resolved into it,
    /// and what their outputs became. Forgets them.
    pub(super) fn built(
        &mut self,
        resolved: &DrvPath,
        outputs: &[(String, String)],
    ) -> ResolvedInto {
        let originals = self.into.remove(resolved).unwrap_or_default();
        let realisations = originals
            .iter()
            .flat_map(|o| realisations_of(&o.drv_path, &o.keys, outputs))
            .collect();
        ResolvedInto {
            realisations,
            originals: originals.into_iter().map(|o| o.drv_path).collect(),
        }
    }

    /// Forgets resolutions into derivations the core no longer holds.
    pub(super) fn retain(&mut self, live: impl Fn(&DrvPath) -> bool) {
        self.into.retain(|resolved, _| live(resolved));
        self.rows.retain(|resolved, _| live(resolved));
    }
}

/// The realisations of `drv_path`'s outputs (by `keys`) as `outputs` says.
pub(super) fn realisations_of(
    drv_path: &DrvPath,
    keys: &BTreeMap<String, String>,
    outputs: &[(String, String)],
) -> Vec<Realisation> {
    outputs
        .iter()
        .filter_map(|(name, path)| {
            keys.get(name).map(|hash| Realisation {
                drv_hash: hash.clone(),
                output: name.clone(),
                out_path: path.clone(),
                drv_path: drv_path.as_str().to_owned(),
            })
        })
        .collect()
}

impl Driver {
    /// The status-13 rows to create with the first row of `resolved`'s
    /// step. An attempt that has its row already (adopted) gets none: they
    /// are written on their own.
    pub(super) fn resolution_rows_for(
        &mut self,
        resolved: &DrvPath,
        has_row: bool,
    ) -> Vec<ResolutionRow> {
        let rows = self.resolutions.rows.remove(resolved).unwrap_or_default();
        if !has_row {
            return rows;
        }
        for r in rows {
            self.record_resolution(r, Vec::new(), Vec::new());
        }
        Vec::new()
    }

    /// Records a resolution on its own, with what its outputs became when
    /// they are known.
    fn record_resolution(
        &mut self,
        resolution: ResolutionRow,
        realisations: Vec<Realisation>,
        outputs: Vec<(String, String)>,
    ) {
        self.send_write(WriteJob::RecordResolution {
            resolution,
            realisations,
            outputs,
        });
    }

    /// Starts resolving `drv_path` (the core's `Command::Resolve`).
    pub(super) fn resolve(&mut self, drv_path: DrvPath, build: BuildId) {
        let keys = self
            .closure
            .get(&drv_path)
            .map(crate::ingest::HeldDrv::keys)
            .unwrap_or_default();
        let job = Job {
            drv_path,
            build,
            keys,
            pool: self.pool.clone(),
            store: self.store.clone(),
            hashes: self.hashes.clone(),
            gc_roots: self.config.data_dir.join("gcroots"),
            round_trips: Default::default(),
        };
        let me = self.me.clone();
        // The realisations of its inputs were queued for the writer just
        // before: resolve once they are committed, so the database has
        // them.
        let start = move || {
            tokio::spawn(async move {
                let resolved = run(job).await;
                let _ = me.send(DriverEvent::Resolved(Box::new(resolved))).await;
            });
        };
        self.send_write(WriteJob::AfterCommit(super::writer::OnCommit(Box::new(
            start,
        ))));
    }

    pub(super) fn on_resolved(&mut self, resolved: Resolved) {
        let Resolved {
            drv_path,
            build,
            outcome,
        } = resolved;
        let time = unix_now();
        let resolution = match outcome {
            Outcome::Transient(error) => {
                tracing::warn!(drv = %drv_path, %error, "resolving failed; trying again in 5 s");
                let me = self.me.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(RETRY_AFTER).await;
                    let _ = me.send(DriverEvent::ResolveAgain { drv_path, build }).await;
                });
                return;
            }
            Outcome::Impossible(error) => {
                tracing::error!(drv = %drv_path, %error, "a step cannot be resolved");
                let mut row = StepRow::finished(
                    build.0,
                    drv_path.as_str().to_owned(),
                    sluice_core::Status::Aborted,
                    time,
                );
                row.error_msg = Some(format!("cannot resolve the derivation: {error}"));
                self.send_write(WriteJob::InsertStep { row });
                Resolution::Failed(StepFailure::Aborted)
            }
            Outcome::Built {
                resolved_drv,
                outputs,
                original_keys,
                system,
            } => {
                tracing::info!(drv = %drv_path, resolved = %resolved_drv, "resolved to a derivation already built");
                let realisations = realisations_of(&drv_path, &original_keys, &outputs);
                self.record_resolution(
                    ResolutionRow {
                        row: resolution_row(build, &drv_path, &system, &original_keys, &outputs),
                        resolved_drv,
                        time,
                    },
                    realisations.clone(),
                    outputs.clone(),
                );
                self.register_realisations(realisations);
                self.built_outputs.insert(
                    drv_path.clone(),
                    super::BuiltStep {
                        outputs,
                        start_time: time,
                        stop_time: time,
                    },
                );
                Resolution::Valid
            }
            Outcome::Build {
                resolved,
                original_keys,
                system,
            } => {
                let resolved_path = resolved.spec.drv_path.clone();
                let row = ResolutionRow {
                    row: resolution_row(build, &drv_path, &system, &original_keys, &[]),
                    resolved_drv: base_name(resolved_path.as_str()),
                    time,
                };
                tracing::info!(drv = %drv_path, resolved = %resolved_path, "resolved");
                if self.core.has_step(resolved_path.as_str()) {
                    // Shared with a step that exists (it may have its
                    // row already): recorded now.
                    self.record_resolution(row, Vec::new(), Vec::new());
                } else {
                    // A new step: recorded with its first row.
                    self.resolutions
                        .rows
                        .entry(resolved_path.clone())
                        .or_default()
                        .push(row);
                }
                self.resolutions
                    .into
                    .entry(resolved_path.clone())
                    .or_default()
                    .push(Original {
                        drv_path: drv_path.clone(),
                        keys: original_keys,
                    });
                let spec = resolved.spec.clone();
                if !self.closure.contains_key(&resolved_path) {
                    let held = resolved.held(&mut |s| super::load::intern(&mut self.systems, s));
                    self.closure.insert(resolved_path, held);
                }
                Resolution::Step(spec)
            }
        };
        self.apply(Event::StepResolved {
            drv_path,
            resolution,
        });
    }

    /// Tells the queue runner's own store what content-addressed outputs
    /// became, so `nix` there knows them; a store that refuses (no
    /// `ca-derivations`) is only a warning: the database has them.
    pub(super) fn register_realisations(&self, realisations: Vec<Realisation>) {
        if realisations.is_empty() {
            return;
        }
        let store = self.store.clone();
        tokio::spawn(async move {
            if let Err(e) = register(&store, &realisations).await {
                tracing::warn!(error = %e, "registering realisations with the local store failed");
            }
        });
    }
}

async fn register(store: &Store, realisations: &[Realisation]) -> Result<(), String> {
    use sluice_nix::daemon::{DrvOutput, Realisation as NixRealisation};
    let dir = store.store_dir().clone();
    let mut client = store.connect().await.map_err(|e| e.to_string())?;
    for r in realisations {
        let drv_hash =
            sluice_nix::hash::Hash::parse_prefixed(&r.drv_hash).map_err(|e| e.to_string())?;
        let out_path = dir.parse_path(&r.out_path).map_err(|e| e.to_string())?;
        let realisation = NixRealisation {
            id: DrvOutput::ByHash {
                drv_hash,
                output: r.output.clone(),
            },
            out_path,
            signatures: BTreeSet::new(),
            dependent_realisations: BTreeMap::new(),
        };
        client
            .register_drv_output(&realisation)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The base name of a store path: `<hash>-<name>`.
fn base_name(path: &str) -> String {
    path.rsplit('/').next().unwrap_or(path).to_owned()
}

/// The status-13 row recording a resolution under `build`.
fn resolution_row(
    build: BuildId,
    drv_path: &DrvPath,
    system: &str,
    keys: &BTreeMap<String, String>,
    outputs: &[(String, String)],
) -> StepRow {
    let known: HashMap<&str, &str> = outputs
        .iter()
        .map(|(n, p)| (n.as_str(), p.as_str()))
        .collect();
    StepRow {
        build: build.0,
        step_type: StepKind::Build,
        drv_path: drv_path.as_str().to_owned(),
        system: system.to_owned(),
        machine: String::new(),
        // Made busy, then marked resolved in the same transaction.
        state: StepState::Busy(StepPhase::Preparing),
        error_msg: None,
        start_time: Some(unix_now()),
        stop_time: None,
        propagated_from: None,
        outputs: keys
            .keys()
            .map(|name| {
                (
                    name.clone(),
                    known.get(name.as_str()).map(|p| p.to_string()),
                )
            })
            .collect(),
    }
}

struct Job {
    drv_path: DrvPath,
    build: BuildId,
    keys: BTreeMap<String, String>,
    pool: sqlx::PgPool,
    store: Store,
    hashes: Hashes,
    gc_roots: std::path::PathBuf,
    /// Database round trips made so far.
    round_trips: std::sync::atomic::AtomicU32,
}

/// What one resolution found (see [`resolve_derivation`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolutionSummary {
    /// The resolved derivation, written to the store, when it must be
    /// built; `None` when its outputs are known already (early cutoff).
    pub resolved: Option<String>,
    /// The database round trips it took.
    pub db_round_trips: u32,
}

/// Resolves `drv_path` exactly as the driver does for a step, without
/// recording the resolution in the database: for benches and tests.
pub async fn resolve_derivation(
    pool: &sqlx::PgPool,
    store: &Store,
    hashes: &Hashes,
    drv_path: &str,
    gc_roots: &std::path::Path,
) -> Result<ResolutionSummary, String> {
    let job = Job {
        drv_path: DrvPath::from(drv_path),
        build: BuildId(0),
        keys: BTreeMap::new(),
        pool: pool.clone(),
        store: store.clone(),
        hashes: hashes.clone(),
        gc_roots: gc_roots.to_path_buf(),
        round_trips: Default::default(),
    };
    let outcome = resolve_step(&job).await;
    let db_round_trips = job.round_trips.load(std::sync::atomic::Ordering::Relaxed);
    match outcome {
        Ok(Outcome::Build { resolved, .. }) => Ok(ResolutionSummary {
            resolved: Some(resolved.spec.drv_path.as_str().to_owned()),
            db_round_trips,
        }),
        Ok(Outcome::Built { .. }) => Ok(ResolutionSummary {
            resolved: None,
            db_round_trips,
        }),
        Ok(Outcome::Impossible(e) | Outcome::Transient(e))
        | Err(Stop::Impossible(e) | Stop::Transient(e)) => Err(e),
    }
}

/// Why a resolution stopped.
enum Stop {
    Impossible(String),
    Transient(String),
}

async fn run(job: Job) -> Resolved {
    let outcome = match resolve_step(&job).await {
        Ok(outcome) => outcome,
        Err(Stop::Impossible(e)) => Outcome::Impossible(e),
        Err(Stop::Transient(e)) => Outcome::Transient(e),
    };
    Resolved {
        drv_path: job.drv_path,
        build: job.build,
        outcome,
    }
}

async fn resolve_step(job: &Job) -> Result<Outcome, Stop> {
    let store = &job.store;
    let dir = store.store_dir().clone();
    let read = |p: StorePath| {
        let path = dir.print(&p);
        async move {
            store
                .read_derivation(&path)
                .await
                .map_err(|e| e.to_string())
        }
    };
    let drv_sp = dir
        .parse_path(job.drv_path.as_str())
        .map_err(|e| Stop::Impossible(e.to_string()))?;
    let drv = read(drv_sp.clone()).await.map_err(Stop::Transient)?;
    let original_keys = if job.keys.is_empty() {
        crate::ca::realisation_keys(&job.hashes, &dir, &drv_sp, &drv, &read)
            .await
            .map_err(Stop::Transient)?
    } else {
        job.keys.clone()
    };

    // Every used output of every input: static, or recorded.
    let mut realised: BTreeMap<(StorePath, String), StorePath> = BTreeMap::new();
    let mut wanted: Vec<(String, String)> = Vec::new();
    let mut wanted_for: Vec<(StorePath, String)> = Vec::new();
    for (input, outputs) in &drv.input_drvs {
        let input_drv = read(input.clone()).await.map_err(Stop::Transient)?;
        let keys = if crate::ca::has_dynamic_outputs(&input_drv) {
            crate::ca::realisation_keys(&job.hashes, &dir, input, &input_drv, &read)
                .await
                .map_err(Stop::Transient)?
        } else {
            BTreeMap::new()
        };
        for output in outputs {
            let fixed = input_drv
                .outputs
                .get(output)
                .map(|o| o.path(&dir, &input_drv.name, output))
                .transpose()
                .map_err(|e| Stop::Impossible(e.to_string()))?
                .flatten();
            match (fixed, keys.get(output)) {
                (Some(path), _) => {
                    realised.insert((input.clone(), output.clone()), path);
                }
                (None, Some(hash)) => {
                    wanted.push((hash.clone(), output.clone()));
                    wanted_for.push((input.clone(), output.clone()));
                }
                (None, None) => {
                    return Err(Stop::Impossible(format!(
                        "input {} has no output '{output}'",
                        dir.print(input)
                    )))
                }
            }
        }
    }
    let recorded = lookup(job, &wanted).await?;
    for ((hash, output), (input, _)) in wanted.iter().zip(&wanted_for) {
        let Some(path) = recorded.get(&(hash.clone(), output.clone())) else {
            return Err(Stop::Impossible(format!(
                "output '{output}' of input {} was never recorded as built",
                dir.print(input)
            )));
        };
        let path = dir
            .parse_path(path)
            .map_err(|e| Stop::Impossible(format!("a recorded realisation: {e}")))?;
        realised.insert((input.clone(), output.clone()), path);
    }

    let basic = resolve(&dir, &drv, |input, output| {
        realised.get(&(input.clone(), output.to_owned())).cloned()
    })
    .map_err(|e| Stop::Impossible(e.to_string()))?;
    let resolved_sp = basic
        .drv_path(&dir)
        .map_err(|e| Stop::Impossible(e.to_string()))?;
    let resolved_path = DrvPath::from(dir.print(&resolved_sp));
    let resolved_drv = Derivation::from(basic.clone());

    // Its outputs: static (input-addressed), or recorded (content-addressed).
    let keys = if crate::ca::has_dynamic_outputs(&resolved_drv) {
        crate::ca::realisation_keys(&job.hashes, &dir, &resolved_sp, &resolved_drv, &read)
            .await
            .map_err(Stop::Transient)?
    } else {
        BTreeMap::new()
    };
    let wanted: Vec<(String, String)> = keys.iter().map(|(o, h)| (h.clone(), o.clone())).collect();
    let recorded = lookup(job, &wanted).await?;
    let mut outputs: BTreeMap<String, Option<String>> = BTreeMap::new();
    for (name, out) in &resolved_drv.outputs {
        let fixed = out
            .path(&dir, &resolved_drv.name, name)
            .map_err(|e| Stop::Impossible(e.to_string()))?
            .map(|p| dir.print(&p));
        let known = fixed.or_else(|| {
            keys.get(name)
                .and_then(|h| recorded.get(&(h.clone(), name.clone())).cloned())
        });
        outputs.insert(name.clone(), known);
    }
    if let Some(built) = all_valid(store, &dir, &outputs).await? {
        return Ok(Outcome::Built {
            resolved_drv: base_name(resolved_path.as_str()),
            outputs: built,
            original_keys,
            system: drv.platform.clone(),
        });
    }

    write_drv(store, &dir, &basic, &resolved_sp, &job.gc_roots).await?;
    // Paths recorded but not valid any more are built again.
    let outputs = outputs
        .into_iter()
        .map(|(n, p)| {
            let known = p.filter(|_| !keys.contains_key(&n));
            (Box::from(n), known.map(Box::from))
        })
        .collect();
    let spec = StepSpec {
        drv_path: resolved_path,
        system: resolved_drv.platform.clone(),
        required_features: crate::ingest::required_features(&resolved_drv),
        input_drvs: Vec::new(),
        known_failed: false,
        needs_resolution: false,
        // The core gives it the estimate of the step resolved into it.
        expected_ms: None,
    };
    Ok(Outcome::Build {
        resolved: ClosureDrv {
            spec,
            outputs,
            keys,
        },
        original_keys,
        system: drv.platform.clone(),
    })
}

async fn lookup(
    job: &Job,
    keys: &[(String, String)],
) -> Result<HashMap<(String, String), String>, Stop> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    job.round_trips
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut conn = job
        .pool
        .acquire()
        .await
        .map_err(|e| Stop::Transient(crate::db::describe_sqlx_error(&e)))?;
    crate::db::results::lookup_realisations(&mut conn, keys)
        .await
        .map_err(|e| Stop::Transient(e.to_string()))
}

/// The outputs, if every one is known and valid in the store.
async fn all_valid(
    store: &Store,
    dir: &StoreDir,
    outputs: &BTreeMap<String, Option<String>>,
) -> Result<Option<Vec<(String, String)>>, Stop> {
    let mut paths = Vec::new();
    for (name, path) in outputs {
        let Some(path) = path else {
            return Ok(None);
        };
        let sp = dir
            .parse_path(path)
            .map_err(|e| Stop::Impossible(e.to_string()))?;
        paths.push((name.clone(), path.clone(), sp));
    }
    let mut client = store
        .connect()
        .await
        .map_err(|e| Stop::Transient(e.to_string()))?;
    let valid = client
        .query_valid_paths(paths.iter().map(|(_, _, sp)| sp), false)
        .await
        .map_err(|e| Stop::Transient(e.to_string()))?;
    if paths.iter().all(|(_, _, sp)| valid.contains(sp)) {
        Ok(Some(paths.into_iter().map(|(n, p, _)| (n, p)).collect()))
    } else {
        Ok(None)
    }
}

/// Writes the resolved derivation into the store (as Nix writes a `.drv`)
/// and roots it under `gc_roots`, so a garbage collection keeps it while
/// it waits to be built.
async fn write_drv(
    store: &Store,
    dir: &StoreDir,
    basic: &sluice_nix::derivation::BasicDerivation,
    expected: &StorePath,
    gc_roots: &std::path::Path,
) -> Result<(), Stop> {
    let text = basic
        .to_aterm(dir)
        .map_err(|e| Stop::Impossible(e.to_string()))?;
    let name = format!("{}.drv", basic.name);
    let mut client = store
        .connect()
        .await
        .map_err(|e| Stop::Transient(e.to_string()))?;
    let info = client
        .add_text_to_store(&name, text.as_bytes(), &basic.input_srcs)
        .await
        .map_err(|e| Stop::Transient(e.to_string()))?;
    if info.path != *expected {
        return Err(Stop::Impossible(format!(
            "the store put the resolved derivation at {}, not at {}",
            dir.print(&info.path),
            dir.print(expected)
        )));
    }
    tokio::fs::create_dir_all(gc_roots)
        .await
        .map_err(|e| Stop::Transient(format!("creating {}: {e}", gc_roots.display())))?;
    let link = gc_roots.join(base_name(&dir.print(expected)));
    match tokio::fs::symlink(dir.print(expected), &link).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Stop::Transient(format!("creating {}: {e}", link.display()))),
    }
    client
        .add_indirect_root(&link)
        .await
        .map_err(|e| Stop::Transient(e.to_string()))?;
    Ok(())
}
