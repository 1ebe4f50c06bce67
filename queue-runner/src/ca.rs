//! Content-addressed derivations, as the queue runner sees them: which
//! derivations have output paths known only once built, which must be
//! resolved before they are built, and the keys their realisations are
//! recorded under (Nix's `DrvOutput`: the hash modulo with outputs masked,
//! and the output name).
//!
//! Invariants: a derivation needs resolution exactly when Nix 2.8 would
//! resolve it before building (`DerivationGoal`): content-addressed with
//! input derivations, or input-addressed with deferred outputs; hashes
//! modulo are memoised per `.drv` path in one [`Hashes`] cache shared by
//! loading and resolution, computed inputs first, without recursion.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use sluice_nix::derivation::hash_modulo::hash_derivation_modulo;
use sluice_nix::derivation::{Derivation, DerivationType, DrvHashCache};
use sluice_nix::hash::Base;
use sluice_nix::store_path::{StoreDir, StorePath};

/// The hashes modulo computed so far, shared by the tasks that need them.
pub type Hashes = Arc<parking_lot::Mutex<DrvHashCache>>;

/// Whether `drv`'s output paths are known only once it is built (floating
/// content-addressed, deferred, or impure outputs).
pub fn has_dynamic_outputs(drv: &Derivation) -> bool {
    matches!(
        drv.derivation_type(),
        Ok(DerivationType::ContentAddressed { fixed: false }
            | DerivationType::InputAddressed { deferred: true }
            | DerivationType::Impure)
    )
}

/// Whether `drv` must be resolved before it is built.
pub fn needs_resolution(drv: &Derivation) -> bool {
    match drv.derivation_type() {
        Ok(DerivationType::InputAddressed { deferred: true }) => true,
        Ok(DerivationType::ContentAddressed { fixed: false }) => !drv.input_drvs.is_empty(),
        _ => false,
    }
}

/// The realisation key of each output of `drv` (at `drv_path`): its hash
/// modulo with outputs masked, `sha256:<base16>`, as Nix's
/// `staticOutputHashes`. Input derivations not memoised in `hashes` yet
/// are read with `read` (a `.drv` path to its parsed derivation).
pub async fn realisation_keys<F, Fut>(
    hashes: &Hashes,
    dir: &StoreDir,
    drv_path: &StorePath,
    drv: &Derivation,
    read: &F,
) -> Result<BTreeMap<String, String>, String>
where
    F: Fn(StorePath) -> Fut,
    Fut: std::future::Future<Output = Result<Derivation, String>>,
{
    memoise_inputs(hashes, dir, drv_path, drv, read).await?;
    let cache = hashes.lock();
    let hash = hash_derivation_modulo(dir, drv, true, &*cache).map_err(|e| e.to_string())?;
    Ok(hash
        .iter()
        .map(|(output, h)| (output.to_owned(), h.format(Base::Base16, true)))
        .collect())
}

/// Memoises the (unmasked) hash modulo of every input derivation of `drv`,
/// depth first, reading what is missing. The lock is never held across a
/// read.
async fn memoise_inputs<F, Fut>(
    hashes: &Hashes,
    dir: &StoreDir,
    drv_path: &StorePath,
    drv: &Derivation,
    read: &F,
) -> Result<(), String>
where
    F: Fn(StorePath) -> Fut,
    Fut: std::future::Future<Output = Result<Derivation, String>>,
{
    let missing = |d: &Derivation| -> Vec<StorePath> {
        let cache = hashes.lock();
        d.input_drvs
            .keys()
            .filter(|p| cache.get(p).is_none())
            .cloned()
            .collect()
    };
    // Frames: a derivation and its inputs still to memoise.
    let mut stack: Vec<(StorePath, Derivation, Vec<StorePath>)> = Vec::new();
    let mut on_stack: HashSet<StorePath> = HashSet::from([drv_path.clone()]);
    let mut top_missing = missing(drv);
    loop {
        let next = match stack.last_mut() {
            Some((_, _, left)) => left.pop(),
            None => top_missing.pop(),
        };
        match next {
            Some(input) => {
                if hashes.lock().get(&input).is_some() {
                    continue;
                }
                if !on_stack.insert(input.clone()) {
                    return Err(format!(
                        "derivation {} depends on itself",
                        dir.print(&input)
                    ));
                }
                let parsed = read(input.clone()).await?;
                let left = missing(&parsed);
                stack.push((input, parsed, left));
            }
            None => match stack.pop() {
                Some((path, parsed, _)) => {
                    on_stack.remove(&path);
                    hashes
                        .lock()
                        .add(dir, path, &parsed)
                        .map_err(|e| e.to_string())?;
                }
                None => return Ok(()),
            },
        }
    }
}
