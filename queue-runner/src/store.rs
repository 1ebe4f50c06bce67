//! The queue runner's own Nix store: opening daemon connections and the
//! store queries the driver and the gRPC service need (closures, path
//! infos, basic derivations).
//!
//! Connections come from the pool the gRPC service uses too
//! ([`crate::grpc::LocalStore`]), and so does the [`PathInfoCache`]:
//! closures come from memory, and what is not there from pipelined
//! batches of daemon queries, never one round trip per path.
//!
//! Invariant: a closure is returned in dependency order: every path comes
//! after the paths it references (self-references aside).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use sluice_nix::daemon::PathInfo;

use sluice_nix::derivation::{BasicDerivation, Derivation};
use sluice_nix::store_path::{StoreDir, StorePath};

use crate::agents::PathSummary;
use crate::grpc::LocalStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Connect(String),
    #[error("{op} {path}: {cause}")]
    Query {
        op: &'static str,
        path: String,
        cause: String,
    },
    #[error("{path} is not valid in the queue runner's store")]
    Missing { path: String },
    #[error("derivation {drv}: {cause}")]
    Derivation { drv: String, cause: String },
}

/// The queue runner's store: a pool of daemon connections (shared with
/// the gRPC service) and the store directory.
#[derive(Debug, Clone)]
pub struct Store {
    pool: crate::grpc::LocalStore,
    store_dir: StoreDir,
    /// The static output paths of derivations, so that dispatching a step
    /// reads its inputs' `.drv` files only when they are not here.
    outputs: Arc<DrvOutputCache>,
}

/// Derivations whose static output paths the queue runner remembers: the
/// inputs of steps about to be dispatched are mostly steps that were just
/// built, or a few popular ones (stdenv's), so a small cache catches
/// nearly all of them. About 300 bytes each.
pub const DRV_OUTPUT_CACHE_DRVS: usize = 16_384;

/// A derivation's output name → static path.
pub type DrvOutputs = Arc<[(String, StorePath)]>;

/// Static output paths by derivation: see [`DRV_OUTPUT_CACHE_DRVS`].
pub type DrvOutputCache = crate::bounded_cache::BoundedCache<StorePath, DrvOutputs>;

impl Store {
    pub fn new(pool: crate::grpc::LocalStore) -> Store {
        Store {
            pool,
            store_dir: StoreDir::default(),
            outputs: Arc::new(DrvOutputCache::new(DRV_OUTPUT_CACHE_DRVS)),
        }
    }

    /// Remembers the output paths of derivation `drv_path`. Only for paths
    /// fixed by the derivation itself (input-addressed or fixed-output),
    /// never for outputs known only once built: a derivation needing those
    /// must be resolved, and [`basic_derivation`] refuses it.
    pub fn remember_static_outputs<'a>(
        &self,
        drv_path: &str,
        outputs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) {
        let Ok(drv) = self.store_dir.parse_path(drv_path) else {
            return;
        };
        let outputs: Result<Vec<(String, StorePath)>, _> = outputs
            .into_iter()
            .map(|(name, path)| {
                self.store_dir
                    .parse_path(path)
                    .map(|p| (name.to_owned(), p))
            })
            .collect();
        if let Ok(outputs) = outputs {
            self.outputs.insert([(drv, DrvOutputs::from(outputs))]);
        }
    }

    /// The static output paths of `drv` (from memory, else from its
    /// `.drv` file, then remembered); an error names an output known only
    /// once built.
    async fn static_outputs(&self, drv: &StorePath) -> Result<DrvOutputs, StoreError> {
        if let Some(outputs) = self.outputs.get(drv) {
            return Ok(outputs);
        }
        let printed = self.store_dir.print(drv);
        let parsed = self.read_derivation(&printed).await?;
        let mut outputs = Vec::with_capacity(parsed.outputs.len());
        for (name, output) in &parsed.outputs {
            let path = output
                .path(&self.store_dir, &parsed.name, name)
                .map_err(|e| StoreError::Derivation {
                    drv: printed.clone(),
                    cause: e.to_string(),
                })?
                .ok_or_else(|| StoreError::Derivation {
                    drv: printed.clone(),
                    cause: format!(
                        "the path of output {name} is known only once built: the derivation using it must be resolved first"
                    ),
                })?;
            outputs.push((name.clone(), path));
        }
        let outputs = DrvOutputs::from(outputs);
        self.outputs.insert([(drv.clone(), outputs.clone())]);
        Ok(outputs)
    }

    pub fn store_dir(&self) -> &StoreDir {
        &self.store_dir
    }

    /// The connection pool.
    pub fn pool(&self) -> &crate::grpc::LocalStore {
        &self.pool
    }

    /// A connection from the pool (returned to it on drop).
    pub async fn connect(&self) -> Result<crate::grpc::store::PooledClient, StoreError> {
        self.pool
            .client()
            .await
            .map_err(|e| StoreError::Connect(e.to_string()))
    }

    /// The closure of `roots`, in dependency order (see [`closure`]).
    pub async fn closure(
        &self,
        roots: impl IntoIterator<Item = StorePath>,
    ) -> Result<Vec<Arc<PathInfo>>, StoreError> {
        closure(&self.pool, roots).await
    }

    /// Reads and parses a `.drv` file of this store.
    pub async fn read_derivation(&self, drv_path: &str) -> Result<Derivation, StoreError> {
        let err = |cause: String| StoreError::Derivation {
            drv: drv_path.into(),
            cause,
        };
        let sp = self
            .store_dir
            .parse_path(drv_path)
            .map_err(|e| err(e.to_string()))?;
        let text = tokio::fs::read(drv_path)
            .await
            .map_err(|e| err(e.to_string()))?;
        Derivation::parse_drv_file(&self.store_dir, &sp, &text).map_err(|e| err(e.to_string()))
    }
}

/// The basic derivation an agent builds: `drv` with each used output of
/// its input derivations added to the input sources. Every input output's
/// path must be static: a derivation with content-addressed inputs is
/// resolved first (`driver::resolve`), and one that was not is refused.
/// The inputs' output paths come from memory where the queue runner has
/// them ([`Store::remember_static_outputs`]), else from their `.drv`s.
pub async fn basic_derivation(
    store: &Store,
    drv: &Derivation,
) -> Result<BasicDerivation, StoreError> {
    let dir = store.store_dir();
    let (mut basic, input_drvs) = drv.clone().into_basic();
    for (input, wanted) in input_drvs {
        let outputs = store.static_outputs(&input).await?;
        for name in wanted {
            let path = outputs
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, p)| p.clone())
                .ok_or_else(|| StoreError::Derivation {
                    drv: dir.print(&input),
                    cause: format!("it has no output {name}"),
                })?;
            basic.input_srcs.insert(path);
        }
    }
    Ok(basic)
}

/// Path infos the queue runner keeps in memory, shared by every closure
/// query (assignments, `InputClosure`, `FetchPaths`, uploads, finished
/// builds). A valid path's info never changes, so a cached one is never
/// stale; a path deleted since is caught when its NAR is read. At about
/// 0.5 to 1 KiB per path (its references dominate), the bound keeps the
/// cache under about 200 MiB; closures of up to half of it stay whole.
pub const PATH_INFO_CACHE_PATHS: usize = 200_000;

/// Path infos asked of the daemon in one pipelined round trip.
const QUERY_BATCH: usize = 512;

/// Path infos by path: see [`PATH_INFO_CACHE_PATHS`].
pub type PathInfoCache = crate::bounded_cache::BoundedCache<StorePath, Arc<PathInfo>>;

/// The closure of `roots` with path infos, in dependency order, from
/// the pool's cache where it can, and otherwise from the daemon, one
/// pipelined batch of up to [`QUERY_BATCH`] paths per round trip (a
/// connection is taken from the pool only then).
pub async fn closure(
    pool: &LocalStore,
    roots: impl IntoIterator<Item = StorePath>,
) -> Result<Vec<Arc<PathInfo>>, StoreError> {
    let dir = StoreDir::default();
    let cache = pool.path_infos();
    let mut queued: HashSet<StorePath> = HashSet::new();
    let mut frontier: Vec<StorePath> = roots
        .into_iter()
        .filter(|p| queued.insert(p.clone()))
        .collect();
    let mut infos: HashMap<StorePath, Arc<PathInfo>> = HashMap::new();
    let mut client = None;
    while !frontier.is_empty() {
        let mut found = Vec::new();
        let misses = cache.lookup(&frontier, |info| found.push(info));
        for batch in misses.chunks(QUERY_BATCH) {
            let c = match &mut client {
                Some(c) => c,
                None => client.insert(
                    pool.client()
                        .await
                        .map_err(|e| StoreError::Connect(e.to_string()))?,
                ),
            };
            let got = c
                .query_path_infos(batch)
                .await
                .map_err(|e| StoreError::Query {
                    op: "querying the path infos of a batch of paths with",
                    path: dir.print(&batch[0]),
                    cause: e.to_string(),
                })?;
            let mut fresh = Vec::with_capacity(batch.len());
            for (path, info) in batch.iter().zip(got) {
                let info = Arc::new(info.ok_or_else(|| StoreError::Missing {
                    path: dir.print(path),
                })?);
                fresh.push(info.clone());
                found.push(info);
            }
            cache.insert(fresh.into_iter().map(|info| (info.path.clone(), info)));
        }
        frontier.clear();
        for info in found {
            for r in &info.references {
                if queued.insert(r.clone()) {
                    frontier.push(r.clone());
                }
            }
            infos.insert(info.path.clone(), info);
        }
    }
    Ok(topo_sort(infos))
}

/// Orders path infos so references come first (iteratively: closures can
/// be deep), starting from the roots in path order so the result does not
/// depend on hashing.
fn topo_sort(mut infos: HashMap<StorePath, Arc<PathInfo>>) -> Vec<Arc<PathInfo>> {
    let mut done: HashSet<StorePath> = HashSet::with_capacity(infos.len());
    let mut order = Vec::with_capacity(infos.len());
    let mut keys: Vec<StorePath> = infos.keys().cloned().collect();
    keys.sort_unstable();
    for root in keys {
        let mut stack = vec![(root, false)];
        while let Some((p, leaving)) = stack.pop() {
            if leaving {
                if let Some(info) = infos.remove(&p) {
                    order.push(info);
                }
                continue;
            }
            if !done.insert(p.clone()) {
                continue;
            }
            stack.push((p.clone(), true));
            if let Some(info) = infos.get(&p) {
                for r in &info.references {
                    if *r != p && !done.contains(r) {
                        stack.push((r.clone(), false));
                    }
                }
            }
        }
    }
    order
}

/// A path info as the agent protocol carries it.
pub fn summary(dir: &StoreDir, info: &PathInfo) -> PathSummary {
    PathSummary {
        path: dir.print(&info.path),
        nar_hash: format!("sha256:{}", info.nar_hash.to_nix32()),
        nar_size: info.nar_size,
        references: info.references.iter().map(|r| dir.print(r)).collect(),
        deriver: info.deriver.as_ref().map(|d| dir.print(d)),
        ca: info.ca.clone(),
    }
}
