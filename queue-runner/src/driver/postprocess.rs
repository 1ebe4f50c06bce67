//! Recording a successful build: its outputs, sizes and what its outputs'
//! `nix-support/` directories declare (products, metrics, release name, a
//! `failed` marker that turns status 0 into 6).

use std::collections::HashSet;

use sluice_nix::store_path::StorePath;

use super::writer::FinishedBuild;
use crate::db::results::BuildFinish;
use crate::nix_support;
use crate::store::Store;

/// What to record for a build whose top-level outputs are valid.
pub async fn success(
    store: &Store,
    finished: &FinishedBuild,
    cached: bool,
    start_time: i64,
    stop_time: i64,
) -> Result<BuildFinish, String> {
    let build = &finished.build;
    let outputs: Vec<(String, String)> = match &finished.outputs {
        Some(outs) => outs.clone(),
        None => build
            .outputs()
            .filter_map(|(n, p)| p.map(|p| (n.to_owned(), p.into_owned())))
            .collect(),
    };
    let dir = store.store_dir().clone();
    let paths: Vec<StorePath> = outputs
        .iter()
        .map(|(_, p)| dir.parse_path(p).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let closure = store
        .closure(paths.iter().cloned())
        .await
        .map_err(|e| e.to_string())?;
    let own: HashSet<&StorePath> = paths.iter().collect();
    let size: u64 = closure
        .iter()
        .filter(|i| own.contains(&i.path))
        .map(|i| i.nar_size)
        .sum();
    let closure_size: u64 = closure.iter().map(|i| i.nar_size).sum();
    let support = nix_support::read_outputs(dir.as_str(), &outputs)
        .await
        .map_err(|e| e.to_string())?;
    Ok(BuildFinish {
        build: build.id,
        status: support.build_status(),
        start_time,
        stop_time,
        is_cached: cached,
        size,
        closure_size,
        release_name: support.release_name,
        outputs,
        products: support.products,
        metrics: support.metrics,
    })
}
