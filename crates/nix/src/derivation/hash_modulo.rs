//! Nix's derivation hash modulo fixed-output derivations, and the
//! input-addressed output paths computed from it.
//!
//! `hashDerivationModulo` (Nix 2.8) gives each output of a derivation a
//! hash:
//! - a fixed-output derivation: `sha256("fixed:out:<r:?><algo>:<hex>:<out path>")`,
//!   so that how a fixed output is fetched does not change what depends on it;
//! - an impure one: `sha256("impure")`, kind deferred;
//! - any other: the SHA-256 of its ATerm text in which every input
//!   derivation path is replaced by the base-16 hash modulo of the outputs
//!   used from it (inputs with equal hashes merge their output sets), the
//!   same for every output. With `mask_outputs`, output paths and the
//!   environment variables named like outputs print empty.
//!
//! The result is *deferred* if the derivation is floating content-addressed
//! or impure, or if any input's is. Input-addressed output paths are
//! `make_output_path(output, masked hash, name)`; a deferred input-addressed
//! derivation has none until resolved. The hash Nix memoises per `.drv` path
//! and uses for inputs is the unmasked one.
//!
//! Invariant: everything here is a pure function of the derivation and of
//! the input hashes handed in ([`DrvHashLookup`]; [`DrvHashCache`] memoises
//! them per `.drv` path).

use std::collections::{BTreeMap, HashMap};

use sha2::{Digest, Sha256};
use thiserror::Error;

use super::aterm::Layout;
use super::print::{self, HashSink, InputsSection, ModuloInput, Sink};
use super::{Derivation, DerivationOutput, DerivationType, DerivationTypeError, DerivationView};
use crate::hash::{base16_on_stack, Hash};
use crate::store_path::{MakeStorePathError, StoreDir, StorePath};

/// Whether a derivation hash is final, or depends on outputs not known yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrvHashKind {
    Regular,
    Deferred,
}

/// A derivation's hash modulo, per output.
///
/// Kept as a small vector sorted by output name rather than a map: a cache
/// holds one per derivation and looks them up for every input of every
/// derivation, so compactness is what makes lookups fast.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrvHash {
    hashes: Vec<(String, Hash)>,
    pub kind: DrvHashKind,
}

impl DrvHash {
    /// The hashes of the named outputs (a later duplicate name replaces an
    /// earlier one).
    pub fn new(kind: DrvHashKind, hashes: impl IntoIterator<Item = (String, Hash)>) -> DrvHash {
        let mut hashes: Vec<(String, Hash)> = hashes.into_iter().collect();
        hashes.reverse();
        hashes.sort_by(|a, b| a.0.cmp(&b.0));
        hashes.dedup_by(|a, b| a.0 == b.0);
        DrvHash { hashes, kind }
    }

    /// The hash of output `output`.
    pub fn get(&self, output: &str) -> Option<&Hash> {
        self.hashes
            .iter()
            .find(|(name, _)| name == output)
            .map(|(_, h)| h)
    }

    /// Output names and their hashes, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Hash)> {
        self.hashes.iter().map(|(n, h)| (n.as_str(), h))
    }
}

/// Why a hash modulo (or output paths from it) could not be computed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HashModuloError {
    #[error("derivation '{name}': {source}")]
    Type {
        name: String,
        source: DerivationTypeError,
    },
    #[error("derivation '{name}' needs the hash modulo of input '{input}', which is not known")]
    MissingInput { name: String, input: StorePath },
    #[error(
        "derivation '{name}' uses output '{output}' of input '{input}', which has no such output"
    )]
    MissingInputOutput {
        name: String,
        input: StorePath,
        output: String,
    },
    #[error("derivation '{name}': {source}")]
    Path {
        name: String,
        source: MakeStorePathError,
    },
}

/// Where the hashes modulo of input derivations come from.
pub trait DrvHashLookup {
    fn drv_hash(&self, drv_path: &StorePath) -> Option<&DrvHash>;
}

impl DrvHashLookup for HashMap<StorePath, DrvHash> {
    fn drv_hash(&self, drv_path: &StorePath) -> Option<&DrvHash> {
        self.get(drv_path)
    }
}

impl DrvHashLookup for BTreeMap<StorePath, DrvHash> {
    fn drv_hash(&self, drv_path: &StorePath) -> Option<&DrvHash> {
        self.get(drv_path)
    }
}

/// Nix's `hashDerivationModulo`. `inputs` must know the (unmasked) hash
/// of every input derivation.
pub fn hash_derivation_modulo(
    store_dir: &StoreDir,
    drv: &Derivation,
    mask_outputs: bool,
    inputs: &impl DrvHashLookup,
) -> Result<DrvHash, HashModuloError> {
    hash_modulo_from(store_dir, drv, mask_outputs, inputs, None)
}

/// The `.drv` text a derivation was parsed from, when printing the
/// derivation gives it back byte for byte, with the layout of its parts.
#[derive(Clone, Copy)]
pub(crate) struct CanonicalText<'a> {
    pub text: &'a [u8],
    pub layout: &'a Layout,
}

/// Which variants of the hash modulo to compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Which {
    Unmasked,
    Masked,
    Both,
}

/// The variants asked for.
pub(crate) struct ModuloHashes {
    pub unmasked: Option<DrvHash>,
    pub masked: Option<DrvHash>,
}

impl ModuloHashes {
    fn take(self, mask_outputs: bool) -> Option<DrvHash> {
        if mask_outputs {
            self.masked
        } else {
            self.unmasked
        }
    }
}

/// [`hash_derivation_modulo`] for one variant, hashing pieces of `text`
/// instead of printing when it is given.
pub(crate) fn hash_modulo_from(
    store_dir: &StoreDir,
    drv: &Derivation,
    mask_outputs: bool,
    inputs: &impl DrvHashLookup,
    text: Option<CanonicalText<'_>>,
) -> Result<DrvHash, HashModuloError> {
    let which = if mask_outputs {
        Which::Masked
    } else {
        Which::Unmasked
    };
    hashes_from(store_dir, drv, which, inputs, text)?
        .take(mask_outputs)
        .ok_or_else(|| HashModuloError::Type {
            name: drv.name.clone(),
            source: DerivationTypeError::NoOutputs,
        })
}

/// The hashes modulo asked for by `which`, sharing the lookup of inputs
/// (and, from `text`, the printing of the input list) between them.
pub(crate) fn hashes_from(
    store_dir: &StoreDir,
    drv: &Derivation,
    which: Which,
    inputs: &impl DrvHashLookup,
    text: Option<CanonicalText<'_>>,
) -> Result<ModuloHashes, HashModuloError> {
    let name = &drv.name;
    let drv_type = drv
        .derivation_type()
        .map_err(|source| HashModuloError::Type {
            name: name.clone(),
            source,
        })?;
    let same_for_both = |h: DrvHash| {
        let unmasked = (which != Which::Masked).then(|| h.clone());
        let masked = (which != Which::Unmasked).then_some(h);
        ModuloHashes { unmasked, masked }
    };
    let mut kind = match drv_type {
        DerivationType::ContentAddressed { fixed: true } => {
            return Ok(same_for_both(fixed_output_hashes(store_dir, drv.view())?));
        }
        DerivationType::Impure => {
            let impure = Hash::sha256(b"impure");
            return Ok(same_for_both(DrvHash {
                // Output names come sorted and unique from the map.
                hashes: drv.outputs.keys().map(|o| (o.clone(), impure)).collect(),
                kind: DrvHashKind::Deferred,
            }));
        }
        DerivationType::ContentAddressed { fixed: false } => DrvHashKind::Deferred,
        DerivationType::InputAddressed { .. } => DrvHashKind::Regular,
    };

    let mut replaced: Vec<ModuloInput<'_>> = Vec::with_capacity(drv.input_drvs.len() + 4);
    for (input, wanted) in &drv.input_drvs {
        let input_hash = inputs
            .drv_hash(input)
            .ok_or_else(|| HashModuloError::MissingInput {
                name: name.clone(),
                input: input.clone(),
            })?;
        if input_hash.kind == DrvHashKind::Deferred {
            kind = DrvHashKind::Deferred;
        }
        for output in wanted {
            let h = input_hash
                .get(output)
                .ok_or_else(|| HashModuloError::MissingInputOutput {
                    name: name.clone(),
                    input: input.clone(),
                    output: output.clone(),
                })?;
            replaced.push((h, output));
        }
    }
    // Nix keys a map by the base-16 hash: equal hashes merge, and entries
    // sort by hash (base-16 order is digest byte order) then output name.
    // The leading 16 bytes as an integer decide almost every comparison.
    let lead = |h: &Hash| {
        let d = h.digest();
        let mut b = [0u8; 16];
        let n = d.len().min(16);
        b[..n].copy_from_slice(&d[..n]);
        u128::from_be_bytes(b)
    };
    replaced.sort_unstable_by(|a, b| {
        lead(a.0)
            .cmp(&lead(b.0))
            .then_with(|| a.0.digest().cmp(b.0.digest()))
            .then_with(|| a.1.cmp(b.1))
    });
    replaced.dedup_by(|a, b| a.0.digest() == b.0.digest() && a.1 == b.1);

    let section = InputsSection::Modulo(&replaced);
    let path_err = |source| HashModuloError::Path {
        name: name.clone(),
        source,
    };
    let mut unmasked = (which != Which::Masked).then(HashSink::new);
    let mut masked = (which != Which::Unmasked).then(HashSink::new);
    match text {
        Some(CanonicalText { text, layout }) => {
            // The file's own bytes, with the input list (and, masked, the
            // output list and output variables) printed afresh.
            if let Some(h) = &mut unmasked {
                h.put(&text[..layout.inputs.start]);
            }
            if let Some(h) = &mut masked {
                h.put(b"Derive(");
                print::write_outputs(h, store_dir, drv.view(), true).map_err(path_err)?;
                h.put_byte(b',');
            }
            print::write_inputs(
                &mut Tee(unmasked.as_mut(), masked.as_mut()),
                store_dir,
                section,
            );
            if let Some(h) = &mut unmasked {
                h.put(&text[layout.inputs.end..]);
            }
            if let Some(h) = &mut masked {
                let mut at = layout.inputs.end;
                for value in &layout.output_env_values {
                    h.put(&text[at..value.start]);
                    h.put(b"\"\"");
                    at = value.end;
                }
                h.put(&text[at..]);
            }
        }
        None => {
            for (sink, mask) in [(&mut unmasked, false), (&mut masked, true)] {
                if let Some(h) = sink {
                    let section = InputsSection::Modulo(&replaced);
                    print::write(h, store_dir, drv.view(), section, mask).map_err(path_err)?;
                }
            }
        }
    }
    let finish = |sink: Option<HashSink>| {
        sink.map(|h| {
            let hash = h.finish();
            DrvHash {
                hashes: drv.outputs.keys().map(|o| (o.clone(), hash)).collect(),
                kind,
            }
        })
    };
    Ok(ModuloHashes {
        unmasked: finish(unmasked),
        masked: finish(masked),
    })
}

/// Printing into one or two hashers at once.
struct Tee<'a>(Option<&'a mut HashSink>, Option<&'a mut HashSink>);

impl Sink for Tee<'_> {
    fn put(&mut self, bytes: &[u8]) {
        for h in [&mut self.0, &mut self.1].into_iter().flatten() {
            h.put(bytes);
        }
    }

    fn put_byte(&mut self, b: u8) {
        for h in [&mut self.0, &mut self.1].into_iter().flatten() {
            h.put_byte(b);
        }
    }
}

/// The hash modulo of a derivation without input derivations (a basic one).
pub(crate) fn hash_basic_modulo(
    store_dir: &StoreDir,
    drv: &Derivation,
) -> Result<DrvHash, HashModuloError> {
    hash_derivation_modulo(store_dir, drv, true, &HashMap::new())
}

fn fixed_output_hashes(
    store_dir: &StoreDir,
    drv: DerivationView<'_>,
) -> Result<DrvHash, HashModuloError> {
    let mut hashes = Vec::with_capacity(1);
    for (output, o) in drv.outputs {
        let DerivationOutput::CAFixed { method, hash } = o else {
            continue;
        };
        let path = super::fixed_output_path(store_dir, *method, hash, drv.name, output).map_err(
            |source| HashModuloError::Path {
                name: drv.name.to_owned(),
                source,
            },
        )?;
        let mut h = Sha256::new();
        h.update(b"fixed:out:");
        h.update(method.prefix().as_bytes());
        h.update(hash.algo().name().as_bytes());
        h.update(b":");
        let (hex, hex_len) = base16_on_stack(hash);
        h.update(&hex[..hex_len]);
        h.update(b":");
        h.update(store_dir.print(&path).as_bytes());
        hashes.push((output.clone(), Hash::from_sha256(h.finalize().into())));
    }
    Ok(DrvHash {
        hashes,
        kind: DrvHashKind::Regular,
    })
}

/// The output paths Nix computes for `drv`, as `derivationStrict` does:
/// input-addressed outputs from the masked hash modulo (`None` while the
/// derivation is deferred), fixed outputs from their hash, and `None` for
/// floating and impure outputs. Stored input-addressed paths are ignored, so
/// comparing the result with them checks a `.drv` file.
pub fn compute_output_paths(
    store_dir: &StoreDir,
    drv: &Derivation,
    inputs: &impl DrvHashLookup,
) -> Result<BTreeMap<String, Option<StorePath>>, HashModuloError> {
    output_paths_from(store_dir, drv, inputs, None)
}

/// [`compute_output_paths`], hashing pieces of `text` when it is given.
pub(crate) fn output_paths_from(
    store_dir: &StoreDir,
    drv: &Derivation,
    inputs: &impl DrvHashLookup,
    text: Option<CanonicalText<'_>>,
) -> Result<BTreeMap<String, Option<StorePath>>, HashModuloError> {
    let masked = match derivation_type(drv)? {
        DerivationType::InputAddressed { .. } => {
            Some(hash_modulo_from(store_dir, drv, true, inputs, text)?)
        }
        _ => None,
    };
    output_paths_of(store_dir, drv, masked.as_ref())
}

/// The output paths of `drv`, given its masked hash modulo if it is
/// input-addressed (see [`compute_output_paths`]).
pub(crate) fn output_paths_of(
    store_dir: &StoreDir,
    drv: &Derivation,
    masked: Option<&DrvHash>,
) -> Result<BTreeMap<String, Option<StorePath>>, HashModuloError> {
    let path_err = |source| HashModuloError::Path {
        name: drv.name.clone(),
        source,
    };
    let mut paths = BTreeMap::new();
    match derivation_type(drv)? {
        DerivationType::InputAddressed { .. } => {
            let masked = masked.ok_or_else(|| HashModuloError::Type {
                name: drv.name.clone(),
                source: DerivationTypeError::NoOutputs,
            })?;
            for (output, hash) in masked.iter() {
                let path = match masked.kind {
                    DrvHashKind::Regular => Some(
                        store_dir
                            .make_output_path(output, hash, &drv.name)
                            .map_err(path_err)?,
                    ),
                    DrvHashKind::Deferred => None,
                };
                paths.insert(output.to_owned(), path);
            }
        }
        DerivationType::ContentAddressed { .. } | DerivationType::Impure => {
            for (output, o) in &drv.outputs {
                let path = o.path(store_dir, &drv.name, output).map_err(path_err)?;
                paths.insert(output.to_owned(), path);
            }
        }
    }
    Ok(paths)
}

fn derivation_type(drv: &Derivation) -> Result<DerivationType, HashModuloError> {
    drv.derivation_type()
        .map_err(|source| HashModuloError::Type {
            name: drv.name.clone(),
            source,
        })
}

/// Fills in the outputs of a new input-addressed derivation the way
/// `derivationStrict` does: every output and its environment variable are
/// first made empty (deferred); then, if the masked hash modulo is regular,
/// each output gets its path and the variable is set to it. If it is
/// deferred the outputs stay deferred and the variables empty.
pub fn fill_input_addressed_outputs(
    store_dir: &StoreDir,
    drv: &mut Derivation,
    inputs: &impl DrvHashLookup,
) -> Result<DrvHashKind, HashModuloError> {
    let names: Vec<String> = drv.outputs.keys().cloned().collect();
    for name in &names {
        drv.env.insert(name.clone(), String::new());
        drv.outputs.insert(name.clone(), DerivationOutput::Deferred);
    }
    let masked = hash_derivation_modulo(store_dir, drv, true, inputs)?;
    if masked.kind == DrvHashKind::Regular {
        for (output, hash) in masked.iter() {
            let path = store_dir
                .make_output_path(output, hash, &drv.name)
                .map_err(|source| HashModuloError::Path {
                    name: drv.name.clone(),
                    source,
                })?;
            drv.env.insert(output.to_owned(), store_dir.print(&path));
            drv.outputs
                .insert(output.to_owned(), DerivationOutput::InputAddressed { path });
        }
    }
    Ok(masked.kind)
}

pub use super::hash_cache::{DrvHashCache, HashWithLoadError};
