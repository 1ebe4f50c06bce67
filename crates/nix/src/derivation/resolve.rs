//! Resolution: turning a derivation with content-addressed inputs into the
//! basic derivation that is actually built, as Nix 2.8's
//! `Derivation::tryResolve` does.
//!
//! Given the realised path of every (input derivation, output) pair used,
//! the resolved derivation:
//! - has no input derivations; their realised outputs join the input sources;
//! - has every downstream placeholder of those outputs replaced by the
//!   realised path in the builder, the arguments, and the environment's keys
//!   and values (placeholders in the order of their text, each replaced
//!   everywhere, as Nix's `rewriteStrings`);
//! - has each deferred output turned into an input-addressed one, with the
//!   path from the masked hash modulo of the rewritten derivation, which is
//!   also written into that output's environment variable.
//!
//! Its `.drv` is [`BasicDerivation::to_aterm`] (an empty input derivation
//! list) at [`BasicDerivation::drv_path`]; Nix builds that instead of the
//! original.
//!
//! Invariant: pure; realised paths come from the caller, and a missing one
//! is an error, never a guess.

use std::collections::BTreeMap;

use thiserror::Error;

use super::hash_modulo::{hash_basic_modulo, HashModuloError};
use super::placeholder::downstream_placeholder;
use super::{BasicDerivation, Derivation, DerivationOutput};
use crate::store_path::{StoreDir, StorePath};

/// Why a derivation could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ResolveError {
    #[error("cannot resolve '{name}': output '{output}' of input '{input}' has no realised path")]
    MissingOutput {
        name: String,
        input: StorePath,
        output: String,
    },
    #[error("cannot resolve: {0}")]
    Hash(#[from] HashModuloError),
}

/// Resolves `drv` with `realised(input drv, output name)` giving each used
/// input output's realised path.
pub fn resolve(
    store_dir: &StoreDir,
    drv: &Derivation,
    mut realised: impl FnMut(&StorePath, &str) -> Option<StorePath>,
) -> Result<BasicDerivation, ResolveError> {
    let mut rewrites: BTreeMap<String, String> = BTreeMap::new();
    let mut resolved = Derivation {
        input_drvs: BTreeMap::new(),
        ..drv.clone()
    };
    for (input, outputs) in &drv.input_drvs {
        for output in outputs {
            let path = realised(input, output).ok_or_else(|| ResolveError::MissingOutput {
                name: drv.name.clone(),
                input: input.clone(),
                output: output.clone(),
            })?;
            rewrites.insert(
                downstream_placeholder(input, output),
                store_dir.print(&path),
            );
            resolved.input_srcs.insert(path);
        }
    }
    let rewrites: Vec<(String, String)> = rewrites.into_iter().collect();

    resolved.builder = rewrite_strings(&resolved.builder, &rewrites);
    for arg in &mut resolved.args {
        *arg = rewrite_strings(arg, &rewrites);
    }
    let mut env = BTreeMap::new();
    for (key, value) in std::mem::take(&mut resolved.env) {
        // When two keys rewrite to one, the first (in the original order)
        // wins, as with Nix's `emplace`.
        env.entry(rewrite_strings(&key, &rewrites))
            .or_insert_with(|| rewrite_strings(&value, &rewrites));
    }
    resolved.env = env;

    let masked = hash_basic_modulo(store_dir, &resolved)?;
    let name = resolved.name.clone();
    for (output_name, output) in resolved.outputs.iter_mut() {
        if *output != DerivationOutput::Deferred {
            continue;
        }
        let Some(hash) = masked.get(output_name) else {
            continue;
        };
        let path = store_dir
            .make_output_path(output_name, hash, &name)
            .map_err(|source| HashModuloError::Path {
                name: name.clone(),
                source,
            })?;
        resolved
            .env
            .insert(output_name.clone(), store_dir.print(&path));
        *output = DerivationOutput::InputAddressed { path };
    }
    Ok(resolved.into_basic().0)
}

/// [`resolve`] with the realised paths in a map.
pub fn resolve_with_map(
    store_dir: &StoreDir,
    drv: &Derivation,
    realised: &BTreeMap<(StorePath, String), StorePath>,
) -> Result<BasicDerivation, ResolveError> {
    resolve(store_dir, drv, |input, output| {
        realised.get(&(input.clone(), output.to_owned())).cloned()
    })
}

/// Nix's `rewriteStrings`: for each pair in order, replaces occurrences of
/// the first string by the second, searching again from the start of each
/// replacement (so a match may begin inside inserted text, as in Nix).
fn rewrite_strings(s: &str, rewrites: &[(String, String)]) -> String {
    let mut s = s.to_owned();
    for (from, to) in rewrites {
        if from == to || from.is_empty() || !s.contains(from.as_str()) {
            continue;
        }
        if to.contains(from.as_str()) {
            // Nix would loop forever here; replace each original occurrence.
            s = s.replace(from.as_str(), to);
            continue;
        }
        // Terminates: a match that starts at the same place again would
        // need `to` to contain `from` or be shorter (the string shrinks);
        // any later match consumes text after the inserted replacement.
        let mut at = 0;
        while let Some(k) = s[at..].find(from.as_str()) {
            at += k;
            s.replace_range(at..at + from.len(), to);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_in_order_everywhere() {
        let rewrites = vec![
            ("/aa".to_owned(), "/nix/store/x".to_owned()),
            ("/bb".to_owned(), "/nix/store/y".to_owned()),
        ];
        assert_eq!(
            rewrite_strings("/aa:/bb/aa", &rewrites),
            "/nix/store/x:/nix/store/y/nix/store/x"
        );
        assert_eq!(rewrite_strings("none", &rewrites), "none");
        // A match that starts inside the inserted text, as Nix finds it.
        let tricky = vec![("ab".to_owned(), "a".to_owned())];
        assert_eq!(rewrite_strings("abbb", &tricky), "a");
        let growing = vec![("a".to_owned(), "aa".to_owned())];
        assert_eq!(rewrite_strings("a-a", &growing), "aa-aa");
    }
}
