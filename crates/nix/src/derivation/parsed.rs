//! A derivation together with the `.drv` text it was parsed from.
//!
//! Nix computes a derivation's `.drv` path and its hashes modulo from its
//! printed text. A file Nix wrote is already that text, so instead of
//! printing it again a [`ParsedDerivation`] hashes the file itself: whole
//! for the `.drv` path, and in pieces around a freshly printed input list
//! (and, when masking, output list and output variables) for the hashes
//! modulo. That halves the work of reading a derivation and computing its
//! paths.
//!
//! Invariant: the text is used only if the parser found that printing the
//! derivation gives it back byte for byte (escapes, order, hash encoding
//! all as Nix prints them); otherwise every computation prints, exactly as
//! the functions on [`Derivation`] do. Either way the results are the same,
//! and the derivation cannot be changed while its text is attached.

use std::collections::BTreeMap;

use super::aterm::{self, Layout, ParseDerivationError};
use super::hash_modulo::{
    hash_modulo_from, hashes_from, output_paths_from, CanonicalText, DrvHash, DrvHashLookup,
    HashModuloError, ModuloHashes, Which,
};
use super::{text_drv_path, Derivation, DrvPathError};
use crate::store_path::{StoreDir, StorePath};

/// A derivation and the text it was parsed from.
#[derive(Debug, Clone)]
pub struct ParsedDerivation<'a> {
    drv: Derivation,
    text: &'a [u8],
    layout: Option<Layout>,
}

impl<'a> ParsedDerivation<'a> {
    /// Parses `text`, the `.drv` of the derivation called `name`.
    pub fn parse(
        store_dir: &StoreDir,
        text: &'a [u8],
        name: &str,
    ) -> Result<ParsedDerivation<'a>, ParseDerivationError> {
        let (drv, layout) = aterm::parse_with_layout(store_dir, text, name)?;
        Ok(ParsedDerivation { drv, text, layout })
    }

    /// Parses `text`, the contents of the `.drv` file at `drv_path`.
    pub fn parse_drv_file(
        store_dir: &StoreDir,
        drv_path: &StorePath,
        text: &'a [u8],
    ) -> Result<ParsedDerivation<'a>, ParseDerivationError> {
        let name = drv_path
            .derivation_name()
            .ok_or_else(|| ParseDerivationError::NotADrvPath(drv_path.clone()))?;
        Self::parse(store_dir, text, name)
    }

    pub fn derivation(&self) -> &Derivation {
        &self.drv
    }

    pub fn into_derivation(self) -> Derivation {
        self.drv
    }

    /// The text it was parsed from.
    pub fn text(&self) -> &'a [u8] {
        self.text
    }

    /// Whether printing the derivation gives back its text byte for byte.
    pub fn is_canonical(&self) -> bool {
        self.layout.is_some()
    }

    fn canonical_text(&self) -> Option<CanonicalText<'_>> {
        self.layout.as_ref().map(|layout| CanonicalText {
            text: self.text,
            layout,
        })
    }

    /// [`Derivation::drv_path`].
    pub fn drv_path(&self, store_dir: &StoreDir) -> Result<StorePath, DrvPathError> {
        match self.layout {
            Some(_) => text_drv_path(store_dir, &self.drv.name, self.text, self.drv.references()),
            None => self.drv.drv_path(store_dir),
        }
    }

    /// [`super::hash_modulo::hash_derivation_modulo`].
    pub fn hash_modulo(
        &self,
        store_dir: &StoreDir,
        mask_outputs: bool,
        inputs: &impl DrvHashLookup,
    ) -> Result<DrvHash, HashModuloError> {
        hash_modulo_from(
            store_dir,
            &self.drv,
            mask_outputs,
            inputs,
            self.canonical_text(),
        )
    }

    /// The variants of the hash modulo `which` asks for.
    pub(crate) fn hashes(
        &self,
        store_dir: &StoreDir,
        which: Which,
        inputs: &impl DrvHashLookup,
    ) -> Result<ModuloHashes, HashModuloError> {
        hashes_from(store_dir, &self.drv, which, inputs, self.canonical_text())
    }

    /// [`super::hash_modulo::compute_output_paths`].
    pub fn output_paths(
        &self,
        store_dir: &StoreDir,
        inputs: &impl DrvHashLookup,
    ) -> Result<BTreeMap<String, Option<StorePath>>, HashModuloError> {
        output_paths_from(store_dir, &self.drv, inputs, self.canonical_text())
    }
}
