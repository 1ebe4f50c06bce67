//! Resolution against real Nix 2.8: Nix builds derivations that depend on
//! floating content-addressed ones by first writing a resolved derivation
//! ("resolved derivation: 'X' -> 'Y'" on stderr) and building that. Our
//! resolution of X, given the outputs Nix realised, must be Y byte for byte
//! and at the same path. Nix's realisation ids (`sha256:<hash>!<output>`)
//! also check our masked hash modulo of floating derivations.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, HashMap};

use common::{output, parse_path, read_drv, store_dir};
use sluice_nix::derivation::hash_modulo::{hash_derivation_modulo, DrvHashCache};
use sluice_nix::derivation::resolve::{resolve, resolve_with_map, ResolveError};
use sluice_nix::derivation::{Derivation, DerivationOutput, DerivationType};
use sluice_nix::store_path::{output_path_name, StorePath};
use sluice_test_support::nix::{NixCommands, NixEnv};

/// Builders use only shell builtins: the build environment has no PATH.
const EXPR: &str = r#"
rec {
  caA = mkDrv { name = "ca-a"; __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256";
    args = [ "-c" "echo a > $out" ]; };
  caM = mkDrv { name = "ca-m"; __contentAddressed = true; outputs = [ "out" "dev" ];
    args = [ "-c" "echo m > $out; echo d > $dev" ]; };
  caB = mkDrv { name = "ca-b"; __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256";
    refA = "${caA}"; both = "${caA}:${caM.dev}:${caA}";
    args = [ "-c" "echo ${caA} ${caM.dev} > $out" "${caM}" ]; };
  deferred = mkDrv { name = "deferred"; outputs = [ "out" "doc" ];
    args = [ "-c" "echo ${caB} ${caM} > $out; echo doc > $doc" ]; };
  deferredChain = mkDrv { name = "deferred-chain"; args = [ "-c" "echo ${deferred.doc} > $out" ]; };
}
"#;

/// Builds `drv`; returns its outputs by name and the resolved derivations
/// Nix reported (original → resolved).
fn realise(
    env: &NixEnv,
    drv: &StorePath,
) -> (BTreeMap<String, StorePath>, Vec<(StorePath, StorePath)>) {
    let dir = store_dir();
    let out = output(
        env.command("nix-store")
            .arg("--realise")
            .arg(dir.print(drv)),
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let paths: Vec<StorePath> = String::from_utf8(out.stdout)
        .expect("utf-8")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(parse_path)
        .collect();
    let (_, parsed) = read_drv(drv);
    let mut by_name = BTreeMap::new();
    for output_name in parsed.outputs.keys() {
        let want = output_path_name(&parsed.name, output_name);
        let path = paths
            .iter()
            .find(|p| p.name() == want)
            .unwrap_or_else(|| panic!("no output {output_name} of {drv} in {paths:?}"));
        by_name.insert(output_name.clone(), path.clone());
    }
    let resolved = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("resolved derivation: '"))
        .map(|rest| {
            let (from, rest) = rest.split_once("' -> '").expect("resolved line shape");
            let to = rest.split('\'').next().expect("resolved path");
            (parse_path(from), parse_path(to))
        })
        .collect();
    (by_name, resolved)
}

/// `nix realisation info`: output name → (realisation id hash, path).
fn realisation_info(env: &NixEnv, drv: &StorePath) -> BTreeMap<String, (String, StorePath)> {
    let out = output(
        env.command("nix")
            .args(["realisation", "info"])
            .arg(store_dir().print(drv)),
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .lines()
        .map(|l| {
            let (id, path) = l.split_once(' ').expect("'<id> <path>'");
            let (hash, output) = id.split_once('!').expect("'<hash>!<output>'");
            (output.to_owned(), (hash.to_owned(), parse_path(path)))
        })
        .collect()
}

#[test]
fn resolution_matches_nix() {
    let env = NixEnv::new();
    let dir = store_dir();
    let attrs = ["caA", "caM", "caB", "deferred", "deferredChain"];
    let drvs: HashMap<&str, StorePath> = attrs
        .iter()
        .copied()
        .zip(env.instantiate(EXPR, &attrs).iter().map(|p| parse_path(p)))
        .collect();
    let parsed: HashMap<StorePath, Derivation> =
        drvs.values().map(|p| (p.clone(), read_drv(p).1)).collect();
    assert_eq!(
        parsed[&drvs["deferred"]].derivation_type(),
        Ok(DerivationType::InputAddressed { deferred: true })
    );

    // Build bottom-up, collecting every output and every resolution.
    let mut realised: BTreeMap<(StorePath, String), StorePath> = BTreeMap::new();
    let mut resolutions: BTreeMap<StorePath, StorePath> = BTreeMap::new();
    for attr in attrs {
        let (outputs, resolved) = realise(&env, &drvs[attr]);
        for (name, path) in outputs {
            realised.insert((drvs[attr].clone(), name), path);
        }
        resolutions.extend(resolved);
    }

    let mut checked = 0;
    for attr in ["caB", "deferred", "deferredChain"] {
        let original = &drvs[attr];
        let nix_resolved = resolutions
            .get(original)
            .unwrap_or_else(|| panic!("Nix reported no resolution of {original}: {resolutions:?}"));
        let ours = resolve_with_map(&dir, &parsed[original], &realised).expect("resolves");
        let nix_bytes = std::fs::read(dir.print(nix_resolved)).expect("resolved .drv in the store");
        let printed = ours.to_aterm(&dir).expect("prints");
        assert_eq!(
            printed,
            String::from_utf8_lossy(&nix_bytes),
            "{attr}: resolved derivation differs from Nix's {nix_resolved}"
        );
        assert_eq!(
            &ours.drv_path(&dir).expect("drv path"),
            nix_resolved,
            "{attr}"
        );
        // Input-addressed outputs of a resolved deferred derivation are where
        // Nix put the outputs of the original.
        for (name, output) in &ours.outputs {
            if let DerivationOutput::InputAddressed { path } = output {
                assert_eq!(
                    path,
                    &realised[&(original.clone(), name.clone())],
                    "{attr}!{name}"
                );
            }
        }
        checked += 1;
    }
    assert_eq!(checked, 3);

    // No placeholder of an input is left; they all became realised paths.
    let ca_b = resolve_with_map(&dir, &parsed[&drvs["caB"]], &realised).expect("resolves");
    assert_eq!(
        ca_b.env["both"],
        format!(
            "{a}:{m}:{a}",
            a = dir.print(&realised[&(drvs["caA"].clone(), "out".into())]),
            m = dir.print(&realised[&(drvs["caM"].clone(), "dev".into())]),
        )
    );

    // Realisation ids are the masked hashes modulo.
    let mut cache = DrvHashCache::new();
    for attr in ["caA", "caM", "caB"] {
        let path = &drvs[attr];
        cache
            .hash_with(&dir, path, |p| parsed.get(p).cloned().ok_or(()))
            .expect("hash modulo");
        let masked =
            hash_derivation_modulo(&dir, &parsed[path], true, &cache).expect("masked hash");
        for (output, (id, real_path)) in realisation_info(&env, path) {
            assert_eq!(
                id,
                format!(
                    "sha256:{}",
                    masked.get(&output).expect("hash of output").to_base16()
                ),
                "{attr}!{output}"
            );
            assert_eq!(real_path, realised[&(path.clone(), output)]);
        }
    }
}

#[test]
fn resolution_needs_every_input_output() {
    let env = NixEnv::new();
    let dir = store_dir();
    let paths = env.instantiate(EXPR, &["caB"]);
    let (_, drv) = read_drv(&parse_path(&paths[0]));
    let err = resolve(&dir, &drv, |_, output| {
        (output == "out").then(|| parse_path("/nix/store/00000000000000000000000000000000-x"))
    })
    .expect_err("caM.dev is missing");
    assert!(
        matches!(err, ResolveError::MissingOutput { ref output, .. } if output == "dev"),
        "{err}"
    );
}
