//! Placeholders: strings that stand for output paths not known yet.
//!
//! [`hash_placeholder`] stands for an output of the derivation itself (what
//! `builtins.placeholder "out"` returns, and the value of `$out` in a
//! floating content-addressed derivation's environment): `/` and the nix32
//! SHA-256 of `nix-output:<output>`. The builder replaces it by the real path.
//!
//! [`downstream_placeholder`] stands, in a derivation that depends on it, for
//! an output of a floating content-addressed (or deferred) input derivation:
//! `/` and the nix32 SHA-256 of
//! `nix-upstream-output:<drv hash part>:<output path name>`, the construction
//! of Nix 2.8 (`downstreamPlaceholder` in `derivations.cc`). Resolution
//! replaces it by the input's realised path.
//!
//! Invariant: both are 53 bytes, `/` followed by 52 nix32 digits, so they can
//! never be mistaken for a store path (which has the store directory in
//! front).

use crate::base32;
use crate::hash::Hash;
use crate::store_path::{output_path_name, StorePath};

/// Length of a placeholder: `/` and a nix32 SHA-256.
pub const PLACEHOLDER_LEN: usize = 1 + base32::encoded_len(32);

/// The placeholder for output `output_name` of the derivation itself.
pub fn hash_placeholder(output_name: &str) -> String {
    let mut clear = String::with_capacity(11 + output_name.len());
    clear.push_str("nix-output:");
    clear.push_str(output_name);
    slash_nix32_sha256(&clear)
}

/// The placeholder for output `output_name` of the input derivation
/// `drv_path`, as Nix 2.8 writes it into the derivations that use it.
///
/// `drv_path` should end in `.drv`; Nix drops its last four characters
/// unconditionally, which is the same thing for every real derivation path.
/// Here a name without `.drv` is used whole.
pub fn downstream_placeholder(drv_path: &StorePath, output_name: &str) -> String {
    let drv_name = drv_path.derivation_name().unwrap_or(drv_path.name());
    let mut clear = String::with_capacity(100 + drv_name.len() + output_name.len());
    clear.push_str("nix-upstream-output:");
    clear.push_str(drv_path.hash_part());
    clear.push(':');
    clear.push_str(&output_path_name(drv_name, output_name));
    slash_nix32_sha256(&clear)
}

fn slash_nix32_sha256(clear: &str) -> String {
    let mut s = String::with_capacity(PLACEHOLDER_LEN);
    s.push('/');
    base32::encode_into(Hash::sha256(clear.as_bytes()).digest(), &mut s);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_placeholder_is_nixs() {
        // The value Nix documents for `builtins.placeholder "out"`, and the
        // `out` variable of every floating CA derivation Nix 2.8 writes.
        assert_eq!(
            hash_placeholder("out"),
            "/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9"
        );
        assert_eq!(hash_placeholder("dev").len(), PLACEHOLDER_LEN);
    }

    #[test]
    fn downstream_placeholder_matches_nix_2_8() {
        // From a derivation written by Nix 2.8: `b` uses output `out` of
        // /nix/store/gx2g3znrm3348gdrsfvhby6wqkplxy0i-a.drv and has this in
        // its arguments.
        let a = StorePath::from_base_name("gx2g3znrm3348gdrsfvhby6wqkplxy0i-a.drv")
            .expect("valid path");
        assert_eq!(
            downstream_placeholder(&a, "out"),
            "/11qasyh9ngri62nzyyk1nqr91j2r1628ajlabkfmrw65yp5h1d37"
        );
    }
}
