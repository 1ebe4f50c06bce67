//! Derivations: the `.drv` files that describe one build each.
//!
//! [`Derivation`] is a store derivation as Nix writes it (outputs, input
//! derivations with the outputs wanted from each, input sources, platform,
//! builder, arguments and environment), plus the name that is not in the
//! file but in its path. [`BasicDerivation`] is one without input
//! derivations: what resolution produces and what a builder runs.
//!
//! Submodules: [`aterm`] parses and prints the ATerm text byte for byte;
//! [`parsed`] keeps a parsed derivation with its text, to hash the text
//! instead of printing it again;
//! [`hash_modulo`] computes Nix's derivation hash modulo fixed outputs, and
//! with it input-addressed output paths; [`placeholder`] builds the strings
//! that stand for not-yet-known output paths; [`resolve`] replaces
//! floating content-addressed inputs by their realised paths.
//!
//! Invariants: maps and sets are ordered, so printing is deterministic and
//! equals Nix's (which sorts the same way); a fixed output stores only its
//! hash, and its path is always recomputed from hash, name and output name,
//! as Nix does; structured attributes (`__json`) are an ordinary environment
//! entry and are kept byte for byte.

pub mod aterm;
mod hash_cache;
pub mod hash_modulo;
pub mod parsed;
pub mod placeholder;
mod print;
pub mod resolve;

use std::collections::{BTreeMap, BTreeSet};

use thiserror::Error;

use crate::hash::{Hash, HashAlgo};
use crate::store_path::{
    output_path_name, ContentAddressMethod, MakeStorePathError, StoreDir, StorePath, DRV_EXTENSION,
};

pub use aterm::ParseDerivationError;
pub use hash_cache::{DrvHashCache, HashWithLoadError};
pub use parsed::ParsedDerivation;

/// How one output's path is determined.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DerivationOutput {
    /// A path fixed at instantiation from the hash of the derivation.
    InputAddressed { path: StorePath },
    /// A fixed-output (content-addressed, hash known in advance) output.
    CAFixed {
        method: ContentAddressMethod,
        hash: Hash,
    },
    /// A content-addressed output whose hash is known only after the build.
    CAFloating {
        method: ContentAddressMethod,
        hash_algo: HashAlgo,
    },
    /// An input-addressed output whose path is known only once the
    /// floating content-addressed derivations it depends on are built.
    Deferred,
    /// An output of an impure derivation (experimental in Nix).
    Impure {
        method: ContentAddressMethod,
        hash_algo: HashAlgo,
    },
}

impl DerivationOutput {
    /// The output's path if it is known statically: input-addressed and
    /// fixed outputs; `None` for the others.
    pub fn path(
        &self,
        store_dir: &StoreDir,
        drv_name: &str,
        output_name: &str,
    ) -> Result<Option<StorePath>, MakeStorePathError> {
        match self {
            DerivationOutput::InputAddressed { path } => Ok(Some(path.clone())),
            DerivationOutput::CAFixed { method, hash } => Ok(Some(fixed_output_path(
                store_dir,
                *method,
                hash,
                drv_name,
                output_name,
            )?)),
            DerivationOutput::CAFloating { .. }
            | DerivationOutput::Deferred
            | DerivationOutput::Impure { .. } => Ok(None),
        }
    }
}

/// The path of a fixed output named `output_name` of derivation `drv_name`.
pub fn fixed_output_path(
    store_dir: &StoreDir,
    method: ContentAddressMethod,
    hash: &Hash,
    drv_name: &str,
    output_name: &str,
) -> Result<StorePath, MakeStorePathError> {
    store_dir.make_fixed_output_path(
        method,
        hash,
        &output_path_name(drv_name, output_name),
        [],
        false,
    )
}

/// What kind of derivation this is, from the kinds of its outputs (Nix's
/// `DerivationType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DerivationType {
    /// All outputs input-addressed, or all deferred.
    InputAddressed {
        deferred: bool,
    },
    /// All outputs fixed (exactly one, `out`), or all floating.
    ContentAddressed {
        fixed: bool,
    },
    Impure,
}

/// Why a derivation's outputs do not form a valid derivation type.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DerivationTypeError {
    #[error("derivation has no outputs")]
    NoOutputs,
    #[error("derivation mixes output kinds (input-addressed, fixed, floating, deferred, impure)")]
    MixedOutputKinds,
    #[error("all floating outputs must use the same hash algorithm")]
    FloatingAlgorithmsDiffer,
    #[error("a fixed-output derivation must have exactly one output, named \"out\"")]
    BadFixedOutputs,
}

/// A store derivation, as in a `.drv` file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Derivation {
    /// The derivation's name: its `.drv` path's name without `.drv`. Not
    /// part of the file, but of every path computed from it.
    pub name: String,
    pub outputs: BTreeMap<String, DerivationOutput>,
    /// Input derivations and which of their outputs are used.
    pub input_drvs: BTreeMap<StorePath, BTreeSet<String>>,
    pub input_srcs: BTreeSet<StorePath>,
    pub platform: String,
    pub builder: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
}

/// A derivation without input derivations: a resolved one, or what a
/// remote builder is sent.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BasicDerivation {
    pub name: String,
    pub outputs: BTreeMap<String, DerivationOutput>,
    pub input_srcs: BTreeSet<StorePath>,
    pub platform: String,
    pub builder: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
}

/// Why a derivation's own `.drv` path could not be computed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DrvPathError {
    #[error("derivation '{name}' cannot be printed: {source}")]
    Print {
        name: String,
        source: MakeStorePathError,
    },
    #[error("derivation '{name}' has no valid .drv path: {source}")]
    Path {
        name: String,
        source: MakeStorePathError,
    },
}

/// Environment variable that holds structured attributes as JSON.
pub const STRUCTURED_ATTRS_ENV: &str = "__json";

/// The fields that both derivation kinds share, borrowed, for printing and
/// classification without copying.
#[derive(Clone, Copy)]
pub(crate) struct DerivationView<'a> {
    pub name: &'a str,
    pub outputs: &'a BTreeMap<String, DerivationOutput>,
    pub input_srcs: &'a BTreeSet<StorePath>,
    pub platform: &'a str,
    pub builder: &'a str,
    pub args: &'a [String],
    pub env: &'a BTreeMap<String, String>,
}

impl DerivationView<'_> {
    fn derivation_type(&self) -> Result<DerivationType, DerivationTypeError> {
        let (mut ia, mut fixed, mut floating, mut deferred, mut impure) = (0, 0, 0, 0, 0);
        let mut floating_algo = None;
        for output in self.outputs.values() {
            match output {
                DerivationOutput::InputAddressed { .. } => ia += 1,
                DerivationOutput::CAFixed { .. } => fixed += 1,
                DerivationOutput::CAFloating { hash_algo, .. } => {
                    floating += 1;
                    match floating_algo {
                        None => floating_algo = Some(*hash_algo),
                        Some(a) if a != *hash_algo => {
                            return Err(DerivationTypeError::FloatingAlgorithmsDiffer)
                        }
                        Some(_) => {}
                    }
                }
                DerivationOutput::Deferred => deferred += 1,
                DerivationOutput::Impure { .. } => impure += 1,
            }
        }
        let total = self.outputs.len();
        if total == 0 {
            return Err(DerivationTypeError::NoOutputs);
        }
        if ia == total {
            Ok(DerivationType::InputAddressed { deferred: false })
        } else if fixed == total {
            if total > 1 || !self.outputs.contains_key("out") {
                return Err(DerivationTypeError::BadFixedOutputs);
            }
            Ok(DerivationType::ContentAddressed { fixed: true })
        } else if floating == total {
            Ok(DerivationType::ContentAddressed { fixed: false })
        } else if deferred == total {
            Ok(DerivationType::InputAddressed { deferred: true })
        } else if impure == total {
            Ok(DerivationType::Impure)
        } else {
            Err(DerivationTypeError::MixedOutputKinds)
        }
    }
}

impl Derivation {
    pub(crate) fn view(&self) -> DerivationView<'_> {
        DerivationView {
            name: &self.name,
            outputs: &self.outputs,
            input_srcs: &self.input_srcs,
            platform: &self.platform,
            builder: &self.builder,
            args: &self.args,
            env: &self.env,
        }
    }

    /// Parses the ATerm text of a `.drv` file; `name` is the derivation
    /// name (see [`Derivation::parse_drv_file`]).
    pub fn parse(
        store_dir: &StoreDir,
        text: &[u8],
        name: &str,
    ) -> Result<Derivation, ParseDerivationError> {
        aterm::parse(store_dir, text, name)
    }

    /// Parses the `.drv` file at `drv_path`, whose contents are `text`.
    pub fn parse_drv_file(
        store_dir: &StoreDir,
        drv_path: &StorePath,
        text: &[u8],
    ) -> Result<Derivation, ParseDerivationError> {
        let name = drv_path
            .derivation_name()
            .ok_or_else(|| ParseDerivationError::NotADrvPath(drv_path.clone()))?;
        aterm::parse(store_dir, text, name)
    }

    /// The ATerm text, exactly as Nix writes it.
    pub fn to_aterm(&self, store_dir: &StoreDir) -> Result<String, MakeStorePathError> {
        let mut out = Vec::with_capacity(print::estimate_len(self));
        print::write(
            &mut out,
            store_dir,
            self.view(),
            print::InputsSection::Drvs(&self.input_drvs),
            false,
        )?;
        Ok(print::into_string(out))
    }

    /// Nix's derivation type, or why the outputs are inconsistent.
    pub fn derivation_type(&self) -> Result<DerivationType, DerivationTypeError> {
        self.view().derivation_type()
    }

    /// The store paths the `.drv` file refers to: input sources and input
    /// derivations, in store-path order.
    pub fn references(&self) -> impl Iterator<Item = &StorePath> {
        MergeSorted {
            a: self.input_srcs.iter().peekable(),
            b: self.input_drvs.keys().peekable(),
        }
    }

    /// The path the `.drv` file has in the store (Nix's `writeDerivation`):
    /// a text path named `<name>.drv` referring to [`Derivation::references`].
    pub fn drv_path(&self, store_dir: &StoreDir) -> Result<StorePath, DrvPathError> {
        let mut h = print::HashSink::new();
        print::write(
            &mut h,
            store_dir,
            self.view(),
            print::InputsSection::Drvs(&self.input_drvs),
            false,
        )
        .map_err(|source| DrvPathError::Print {
            name: self.name.clone(),
            source,
        })?;
        drv_path_of_hash(store_dir, &self.name, &h.finish(), self.references())
    }

    /// Structured attributes (the `__json` variable), if the derivation
    /// uses them.
    pub fn structured_attrs(&self) -> Option<&str> {
        self.env.get(STRUCTURED_ATTRS_ENV).map(String::as_str)
    }

    /// Splits off the input derivations.
    pub fn into_basic(self) -> (BasicDerivation, BTreeMap<StorePath, BTreeSet<String>>) {
        (
            BasicDerivation {
                name: self.name,
                outputs: self.outputs,
                input_srcs: self.input_srcs,
                platform: self.platform,
                builder: self.builder,
                args: self.args,
                env: self.env,
            },
            self.input_drvs,
        )
    }
}

impl From<BasicDerivation> for Derivation {
    fn from(b: BasicDerivation) -> Derivation {
        Derivation {
            name: b.name,
            outputs: b.outputs,
            input_drvs: BTreeMap::new(),
            input_srcs: b.input_srcs,
            platform: b.platform,
            builder: b.builder,
            args: b.args,
            env: b.env,
        }
    }
}

impl BasicDerivation {
    pub(crate) fn view(&self) -> DerivationView<'_> {
        DerivationView {
            name: &self.name,
            outputs: &self.outputs,
            input_srcs: &self.input_srcs,
            platform: &self.platform,
            builder: &self.builder,
            args: &self.args,
            env: &self.env,
        }
    }

    /// The ATerm text of the derivation with an empty input derivation
    /// list: the `.drv` Nix writes for a resolved derivation.
    pub fn to_aterm(&self, store_dir: &StoreDir) -> Result<String, MakeStorePathError> {
        let mut out = Vec::new();
        print::write(
            &mut out,
            store_dir,
            self.view(),
            print::InputsSection::None,
            false,
        )?;
        Ok(print::into_string(out))
    }

    /// Nix's derivation type, or why the outputs are inconsistent.
    pub fn derivation_type(&self) -> Result<DerivationType, DerivationTypeError> {
        self.view().derivation_type()
    }

    /// The store path of [`BasicDerivation::to_aterm`] written as a `.drv`:
    /// a text path referring to the input sources.
    pub fn drv_path(&self, store_dir: &StoreDir) -> Result<StorePath, DrvPathError> {
        let text = self
            .to_aterm(store_dir)
            .map_err(|source| DrvPathError::Print {
                name: self.name.clone(),
                source,
            })?;
        text_drv_path(store_dir, &self.name, text.as_bytes(), &self.input_srcs)
    }
}

pub(crate) fn text_drv_path<'a>(
    store_dir: &StoreDir,
    name: &str,
    text: &[u8],
    references: impl IntoIterator<Item = &'a StorePath>,
) -> Result<StorePath, DrvPathError> {
    drv_path_of_hash(store_dir, name, &Hash::sha256(text), references)
}

/// The path of a `.drv` whose text has SHA-256 `hash`.
fn drv_path_of_hash<'a>(
    store_dir: &StoreDir,
    name: &str,
    hash: &Hash,
    references: impl IntoIterator<Item = &'a StorePath>,
) -> Result<StorePath, DrvPathError> {
    let mut file_name = String::with_capacity(name.len() + DRV_EXTENSION.len());
    file_name.push_str(name);
    file_name.push_str(DRV_EXTENSION);
    store_dir
        .make_text_path(&file_name, hash, references)
        .map_err(|source| DrvPathError::Path {
            name: name.to_owned(),
            source,
        })
}

/// Merges two sorted iterators of paths into one sorted iterator without
/// duplicates (the union of two sets).
struct MergeSorted<A: Iterator, B: Iterator> {
    a: std::iter::Peekable<A>,
    b: std::iter::Peekable<B>,
}

impl<'a, A, B> Iterator for MergeSorted<A, B>
where
    A: Iterator<Item = &'a StorePath>,
    B: Iterator<Item = &'a StorePath>,
{
    type Item = &'a StorePath;

    fn next(&mut self) -> Option<&'a StorePath> {
        match (self.a.peek(), self.b.peek()) {
            (Some(x), Some(y)) => match x.cmp(y) {
                std::cmp::Ordering::Less => self.a.next(),
                std::cmp::Ordering::Greater => self.b.next(),
                // A path in both sets is one reference.
                std::cmp::Ordering::Equal => {
                    self.b.next();
                    self.a.next()
                }
            },
            (Some(_), None) => self.a.next(),
            (None, _) => self.b.next(),
        }
    }
}
