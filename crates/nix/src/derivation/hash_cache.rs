//! Memoised hashes modulo: what a queue runner keeps across the
//! derivations it reads, as Nix keeps `drvHashes`.
//!
//! Invariant: the cache holds only unmasked hashes (those that derivations
//! using an input need), each computed from a derivation whose inputs were
//! all in the cache; derivations are loaded only through a function the
//! caller supplies, so the cache itself does no IO.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

use thiserror::Error;

use super::hash_modulo::{
    hash_derivation_modulo, output_paths_of, DrvHash, DrvHashLookup, HashModuloError, Which,
};
use super::parsed::ParsedDerivation;
use super::Derivation;
use crate::store_path::{StoreDir, StorePath};

/// Why [`DrvHashCache::hash_with`] failed.
#[derive(Debug, Error)]
pub enum HashWithLoadError<E> {
    #[error("loading derivation '{path}': {source}")]
    Load { path: StorePath, source: E },
    #[error(transparent)]
    Hash(#[from] HashModuloError),
    #[error("derivation '{0}' depends on itself")]
    Cycle(StorePath),
}

/// Memoised (unmasked) hashes modulo, per `.drv` path.
#[derive(Debug, Default, Clone)]
pub struct DrvHashCache {
    hashes: HashMap<StorePath, DrvHash, BuildHasherDefault<PathHasher>>,
}

/// A cheap hasher for store paths: FxHash-style mixing of 8-byte words and
/// a strong finaliser. Only a map's bucket choice depends on it, never a
/// result; store paths begin with 32 characters of a SHA-256, so inputs
/// that collide on purpose would have to be ground out of SHA-256.
#[derive(Default)]
struct PathHasher(u64);

impl Hasher for PathHasher {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x517c_c1b7_2722_0a95;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(K);
        }
        for &b in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(K);
        }
    }

    fn finish(&self) -> u64 {
        // The SplitMix64 finaliser, so low and high bits both depend on
        // every input bit (the map uses both).
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

impl DrvHashLookup for DrvHashCache {
    fn drv_hash(&self, drv_path: &StorePath) -> Option<&DrvHash> {
        self.hashes.get(drv_path)
    }
}

impl DrvHashCache {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    pub fn get(&self, drv_path: &StorePath) -> Option<&DrvHash> {
        self.hashes.get(drv_path)
    }

    pub fn insert(&mut self, drv_path: StorePath, hash: DrvHash) {
        self.hashes.insert(drv_path, hash);
    }

    /// Computes and memoises the hash of `drv`, the derivation at
    /// `drv_path`, whose inputs must all be memoised already.
    pub fn add(
        &mut self,
        store_dir: &StoreDir,
        drv_path: StorePath,
        drv: &Derivation,
    ) -> Result<&DrvHash, HashModuloError> {
        let hash = hash_derivation_modulo(store_dir, drv, false, self)?;
        Ok(self.hashes.entry(drv_path).or_insert(hash))
    }

    /// [`DrvHashCache::add`] for a derivation parsed with its text, which
    /// is hashed in pieces instead of printed when it is canonical.
    pub fn add_parsed(
        &mut self,
        store_dir: &StoreDir,
        drv_path: StorePath,
        parsed: &ParsedDerivation<'_>,
    ) -> Result<&DrvHash, HashModuloError> {
        let hash = parsed.hash_modulo(store_dir, false, self)?;
        Ok(self.hashes.entry(drv_path).or_insert(hash))
    }

    /// What a queue runner does with each derivation it reads, inputs
    /// first: memoises its hash modulo ([`DrvHashCache::add_parsed`]) and
    /// returns its output paths
    /// ([`super::hash_modulo::compute_output_paths`]), looking its inputs
    /// up once for both.
    pub fn admit(
        &mut self,
        store_dir: &StoreDir,
        drv_path: StorePath,
        parsed: &ParsedDerivation<'_>,
    ) -> Result<BTreeMap<String, Option<StorePath>>, HashModuloError> {
        let hashes = parsed.hashes(store_dir, Which::Both, self)?;
        let paths = output_paths_of(store_dir, parsed.derivation(), hashes.masked.as_ref())?;
        if let Some(unmasked) = hashes.unmasked {
            self.hashes.entry(drv_path).or_insert(unmasked);
        }
        Ok(paths)
    }

    /// The hash of the derivation at `drv_path`, loading it and every input
    /// not memoised yet with `load` (depth first, without recursion, so
    /// deep dependency chains cannot overflow the stack).
    pub fn hash_with<E>(
        &mut self,
        store_dir: &StoreDir,
        drv_path: &StorePath,
        mut load: impl FnMut(&StorePath) -> Result<Derivation, E>,
    ) -> Result<&DrvHash, HashWithLoadError<E>> {
        // Each frame: a derivation, and how many of its inputs are known
        // to be memoised.
        let mut stack: Vec<(StorePath, Derivation, usize)> = Vec::new();
        let mut on_stack: HashSet<StorePath> = HashSet::new();
        let mut push = |path: &StorePath,
                        stack: &mut Vec<(StorePath, Derivation, usize)>,
                        on_stack: &mut HashSet<StorePath>|
         -> Result<(), HashWithLoadError<E>> {
            if !on_stack.insert(path.clone()) {
                return Err(HashWithLoadError::Cycle(path.clone()));
            }
            let drv = load(path).map_err(|source| HashWithLoadError::Load {
                path: path.clone(),
                source,
            })?;
            stack.push((path.clone(), drv, 0));
            Ok(())
        };
        if !self.hashes.contains_key(drv_path) {
            push(drv_path, &mut stack, &mut on_stack)?;
        }
        while let Some((path, drv, done)) = stack.last_mut() {
            let missing = drv
                .input_drvs
                .keys()
                .enumerate()
                .skip(*done)
                .find(|(_, input)| !self.hashes.contains_key(*input))
                .map(|(i, input)| (i, input.clone()));
            match missing {
                Some((i, input)) => {
                    *done = i;
                    push(&input, &mut stack, &mut on_stack)?;
                }
                None => {
                    let hash = hash_derivation_modulo(store_dir, drv, false, self)?;
                    let path = path.clone();
                    on_stack.remove(&path);
                    stack.pop();
                    self.hashes.insert(path, hash);
                }
            }
        }
        self.hashes
            .get(drv_path)
            .ok_or_else(|| HashWithLoadError::Cycle(drv_path.clone()))
    }
}
