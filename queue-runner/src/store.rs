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

use parking_lot::Mutex;
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
}

impl Store {
    pub fn new(pool: crate::grpc::LocalStore) -> Store {
        Store {
            pool,
            store_dir: StoreDir::default(),
        }
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
pub async fn basic_derivation(
    store: &Store,
    drv: &Derivation,
) -> Result<BasicDerivation, StoreError> {
    let dir = store.store_dir();
    let (mut basic, input_drvs) = drv.clone().into_basic();
    for (input, outputs) in input_drvs {
        let input_str = dir.print(&input);
        let input_drv = store.read_derivation(&input_str).await?;
        for name in outputs {
            let path = input_drv
                .outputs
                .get(&name)
                .map(|o| o.path(dir, &input_drv.name, &name))
                .transpose()
                .map_err(|e| StoreError::Derivation {
                    drv: input_str.clone(),
                    cause: e.to_string(),
                })?
                .flatten()
                .ok_or_else(|| StoreError::Derivation {
                    drv: input_str.clone(),
                    cause: format!(
                        "the path of output {name} is known only once built: the derivation using it must be resolved first"
                    ),
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

/// A bounded map of path infos with approximately least-recently-used
/// eviction: two generations of at most half the bound each; a lookup
/// moves a path into the young one, and a full young generation becomes
/// the old one (the old one is dropped).
///
/// Invariant: it never holds more than its bound; the lock is held only
/// for map operations, never across an `.await`.
pub struct PathInfoCache {
    half: usize,
    generations: Mutex<Generations>,
}

#[derive(Default)]
struct Generations {
    young: HashMap<StorePath, Arc<PathInfo>>,
    old: HashMap<StorePath, Arc<PathInfo>>,
}

impl Generations {
    fn insert(&mut self, half: usize, info: Arc<PathInfo>) {
        if self.young.len() >= half {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(info.path.clone(), info);
    }
}

impl std::fmt::Debug for PathInfoCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PathInfoCache")
            .field("capacity", &(self.half * 2))
            .field("len", &self.len())
            .finish()
    }
}

impl PathInfoCache {
    /// A cache of at most `capacity` paths (at least 2).
    pub fn new(capacity: usize) -> PathInfoCache {
        PathInfoCache {
            half: (capacity / 2).max(1),
            generations: Mutex::new(Generations::default()),
        }
    }

    /// Paths held.
    pub fn len(&self) -> usize {
        let g = self.generations.lock();
        g.young.len() + g.old.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Passes the cached infos of `paths` to `found`; returns the others.
    fn lookup(&self, paths: &[StorePath], mut found: impl FnMut(Arc<PathInfo>)) -> Vec<StorePath> {
        let mut misses = Vec::new();
        let mut g = self.generations.lock();
        for path in paths {
            if let Some(info) = g.young.get(path) {
                found(info.clone());
            } else if let Some(info) = g.old.remove(path) {
                found(info.clone());
                g.insert(self.half, info);
            } else {
                misses.push(path.clone());
            }
        }
        misses
    }

    fn insert(&self, infos: impl IntoIterator<Item = Arc<PathInfo>>) {
        let mut g = self.generations.lock();
        for info in infos {
            g.insert(self.half, info);
        }
    }
}

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
            cache.insert(fresh);
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

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_nix::hash::Hash;

    fn info(i: usize) -> Arc<PathInfo> {
        let hash = sluice_nix::base32::encode(&[u8::try_from(i).unwrap_or(0); 20]);
        let path = StoreDir::default()
            .parse_path(&format!("/nix/store/{hash}-p{i}"))
            .expect("test path");
        Arc::new(PathInfo::new(path, Hash::sha256(b"x"), 1))
    }

    #[test]
    fn the_cache_keeps_its_bound_and_what_was_used_last() {
        let cache = PathInfoCache::new(4);
        cache.insert((0..10).map(info));
        assert!(cache.len() <= 4, "{} paths held", cache.len());
        // The last two inserted are held; looking one up keeps it through
        // the next rotation.
        let recent = [info(8).path.clone(), info(9).path.clone()];
        let mut found = 0;
        assert!(cache.lookup(&recent, |_| found += 1).is_empty());
        assert_eq!(found, 2);
        cache.insert((10..12).map(info));
        let mut found = Vec::new();
        let misses = cache.lookup(&[info(9).path.clone(), info(0).path.clone()], |i| {
            found.push(i.path.clone())
        });
        assert_eq!(found, vec![info(9).path.clone()]);
        assert_eq!(misses, vec![info(0).path.clone()]);
        assert!(cache.len() <= 4);
    }
}
