//! The queue runner's own Nix store: opening daemon connections and the
//! store queries the driver needs (closures, path infos, basic derivations).
//!
//! Connections come from the pool the gRPC service uses too
//! ([`crate::grpc::LocalStore`]).
//!
//! Invariant: a closure is returned in dependency order: every path comes
//! after the paths it references (self-references aside).

use std::collections::{BTreeMap, HashSet};

use sluice_nix::daemon::{ClientError, DaemonClient, PathInfo};

use sluice_nix::derivation::{BasicDerivation, Derivation};
use sluice_nix::store_path::{StoreDir, StorePath};

use crate::agents::PathSummary;

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

fn query_err(op: &'static str, path: &StorePath, dir: &StoreDir, e: ClientError) -> StoreError {
    StoreError::Query {
        op,
        path: dir.print(path),
        cause: e.to_string(),
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

/// The closure of `roots` with path infos, in dependency order.
pub async fn closure(
    client: &mut DaemonClient,
    dir: &StoreDir,
    roots: impl IntoIterator<Item = StorePath>,
) -> Result<Vec<PathInfo>, StoreError> {
    let mut infos: BTreeMap<StorePath, PathInfo> = BTreeMap::new();
    let mut pending: Vec<StorePath> = roots.into_iter().collect();
    while let Some(path) = pending.pop() {
        if infos.contains_key(&path) {
            continue;
        }
        let info = client
            .query_path_info(&path)
            .await
            .map_err(|e| query_err("querying path info of", &path, dir, e))?
            .ok_or_else(|| StoreError::Missing {
                path: dir.print(&path),
            })?;
        for r in &info.references {
            if !infos.contains_key(r) {
                pending.push(r.clone());
            }
        }
        infos.insert(path, info);
    }
    Ok(topo_sort(infos))
}

/// Orders path infos so references come first (iteratively: closures can
/// be deep).
fn topo_sort(mut infos: BTreeMap<StorePath, PathInfo>) -> Vec<PathInfo> {
    let mut done: HashSet<StorePath> = HashSet::new();
    let mut order = Vec::with_capacity(infos.len());
    let keys: Vec<StorePath> = infos.keys().cloned().collect();
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
