//! A corpus of derivations written by real Nix (2.8), read back by this
//! crate: parse then print must give the file byte for byte, the computed
//! `.drv` path must be the real one, the parsed view must equal
//! `nix show-derivation`'s, and the computed output paths must be Nix's.
//! Store paths of text files and content-addressed files added by Nix are
//! checked the same way.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;

use common::{output, parse_path, read_drv, show_derivations, show_json, store_dir};
use sluice_nix::derivation::hash_modulo::{
    compute_output_paths, fill_input_addressed_outputs, DrvHashCache,
};
use sluice_nix::derivation::placeholder::{downstream_placeholder, hash_placeholder};
use sluice_nix::derivation::{Derivation, DerivationOutput, DerivationType, ParsedDerivation};
use sluice_nix::hash::{Hash, HashAlgo};
use sluice_nix::store_path::{ContentAddressMethod, StorePath};
use sluice_test_support::nix::{NixCommands, NixEnv};

/// Every kind of output and input Nix 2.8 can write. Not covered, because
/// Nix 2.8 refuses them: `outputHashMode = "text"` ("invalid value 'text'
/// for 'outputHashMode'") and impure derivations (need the
/// `impure-derivations` feature, not enabled in the test configuration).
const CORPUS: &str = r#"
rec {
  plain = mkDrv { name = "plain"; args = [ "-c" "echo plain > $out" ]; };
  multi = mkDrv { name = "multi"; outputs = [ "out" "dev" "lib" ]; args = [ "-c" "mkdir $out $dev $lib" ]; };
  usesMulti = mkDrv { name = "uses-multi"; args = [ "-c" "ls ${multi.dev} ${multi.lib} > $out" ]; };
  usesMultiAll = mkDrv { name = "uses-multi-all"; args = [ "-c" "ls ${multi} ${multi.dev} ${plain} > $out" ]; };

  fixedFlat = mkDrv { name = "fixed-flat"; outputHashMode = "flat"; outputHashAlgo = "sha256";
    outputHash = builtins.hashString "sha256" "hello\n"; args = [ "-c" "echo hello > $out" ]; };
  # Same output as fixedFlat from another builder: equal hashes modulo.
  fixedFlatTwin = mkDrv { name = "fixed-flat"; outputHashMode = "flat"; outputHashAlgo = "sha256";
    outputHash = builtins.hashString "sha256" "hello\n"; args = [ "-c" "printf 'hello\\n' > $out" ]; };
  fixedSha1 = mkDrv { name = "fixed-sha1"; outputHashAlgo = "sha1"; outputHash = builtins.hashString "sha1" "x"; };
  fixedMd5 = mkDrv { name = "fixed-md5"; outputHashAlgo = "md5"; outputHash = builtins.hashString "md5" "x"; };
  fixedSha512Sri = mkDrv { name = "fixed-sha512";
    outputHash = "sha512-z4PhNX7vuL3xVChQ1m2AB9Yg5AULVxXcg/SpIdNs6c5H0NE8XYXysP+DGNKHfuwvY7kxvUdBeoGlODJ6+SfaPg=="; };
  fixedRec = mkDrv { name = "fixed-rec"; outputHashMode = "recursive";
    outputHash = "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"; };
  fixedRecSha1 = mkDrv { name = "fixed-rec-sha1"; outputHashMode = "recursive"; outputHashAlgo = "sha1";
    outputHash = builtins.hashString "sha1" "y"; };
  builtinFetch = mkDrv { name = "builtin-fetch"; builder = "builtin:fetchurl"; system = "builtin";
    url = "http://example.invalid/x"; outputHashAlgo = "sha256"; outputHash = builtins.hashString "sha256" "u"; };
  usesFixed = mkDrv { name = "uses-fixed";
    args = [ "-c" "cat ${fixedFlat} ${fixedFlatTwin} ${fixedRec} ${fixedSha1} ${fixedMd5} ${fixedSha512Sri} ${fixedRecSha1} ${builtinFetch} > $out" ]; };

  caA = mkDrv { name = "ca-a"; __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256";
    args = [ "-c" "echo a > $out" ]; };
  caFlat = mkDrv { name = "ca-flat"; __contentAddressed = true; outputHashMode = "flat"; outputHashAlgo = "sha512";
    args = [ "-c" "echo flat > $out" ]; };
  caMulti = mkDrv { name = "ca-multi"; __contentAddressed = true; outputs = [ "out" "dev" ];
    args = [ "-c" "echo m > $out; echo d > $dev" ]; };
  caB = mkDrv { name = "ca-b"; __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256";
    args = [ "-c" "cat ${caA} ${caMulti.dev} ${caFlat} > $out" ]; };
  caUsesFixed = mkDrv { name = "ca-uses-fixed"; __contentAddressed = true;
    args = [ "-c" "cat ${fixedFlat} ${plain} > $out" ]; };
  deferred = mkDrv { name = "deferred"; args = [ "-c" "cat ${caA} > $out" ]; };
  deferredMulti = mkDrv { name = "deferred-multi"; outputs = [ "out" "doc" ];
    args = [ "-c" "cat ${caB} ${deferred} > $out; touch $doc" ]; };
  deferredChain = mkDrv { name = "deferred-chain"; args = [ "-c" "cat ${deferredMulti.doc} ${plain} > $out" ]; };
  # A fixed output hides its inputs: what uses it is not deferred.
  fixedUsesCa = mkDrv { name = "fixed-uses-ca"; outputHashAlgo = "sha256"; outputHash = builtins.hashString "sha256" "z";
    args = [ "-c" "cat ${caA} > /dev/null; printf z > $out" ]; };
  usesFixedUsesCa = mkDrv { name = "uses-fixed-uses-ca"; args = [ "-c" "cat ${fixedUsesCa} > $out" ]; };

  structured = mkDrv { name = "structured"; __structuredAttrs = true; outputs = [ "out" "bin" ];
    nested = { a = 1; b = [ "x\"y" "z\\w" "t\tn\nr\r" ]; c = null; d = true; f = 1.5; u = "日本"; };
    dep = plain; args = [ "-c" "true" ]; };
  odd = mkDrv { name = "odd"; quote = "a\"b"; backslash = "a\\b"; newline = "a\nb"; tab = "a\tb"; cr = "a\rb";
    unicode = "héllo ✓ 日本 🎉"; empty = ""; dollar = "\${x}"; mixed = "\"\\\n\r\t\"\\";
    "weird key" = "v"; "key\"quote\\" = "v2";
    args = [ "-c" "echo \"$quote\" > $out" "" "multi\nline" "\\" "\r\t" ]; };
  src = builtins.toFile "src-${nonce}" "source text\n";
  srcWithRef = builtins.toFile "src-ref-${nonce}" "see ${src}";
  withSrc = mkDrv { name = "with-src"; s1 = src; s2 = srcWithRef; args = [ "-c" "cat $s1 $s2 > $out" ]; };
  chain = n: if n == 0 then plain else mkDrv { name = "chain-${toString n}"; args = [ "-c" "cat ${chain (n - 1)} > $out" ]; };
  chain12 = chain 12;
  wide = mkDrv { name = "wide"; args = [ "-c" "echo $deps > $out" ];
    deps = map (i: mkDrv { name = "leaf-${toString i}"; args = [ "-c" "echo ${toString i} > $out" ]; }) (builtins.genList (x: x) 25); };
  placeholderUse = mkDrv { name = "placeholder"; outputs = [ "out" "man" ];
    args = [ "-c" "echo ${builtins.placeholder "man"} > $out" ]; };
  otherSystem = mkDrv { name = "other-system"; system = "aarch64-linux"; };
  passAsFile = mkDrv { name = "pass-as-file"; big = "data\n"; passAsFile = [ "big" ]; };
  # A .drv path both as an input source (its own path) and as an input derivation.
  drvPathRef = mkDrv { name = "drv-path-ref"; d = plain.drvPath; o = "${plain}"; };
}
"#;

const ATTRS: &[&str] = &[
    "plain",
    "multi",
    "usesMulti",
    "usesMultiAll",
    "fixedFlat",
    "fixedFlatTwin",
    "fixedSha1",
    "fixedMd5",
    "fixedSha512Sri",
    "fixedRec",
    "fixedRecSha1",
    "builtinFetch",
    "usesFixed",
    "caA",
    "caFlat",
    "caMulti",
    "caB",
    "caUsesFixed",
    "deferred",
    "deferredMulti",
    "deferredChain",
    "fixedUsesCa",
    "usesFixedUsesCa",
    "structured",
    "odd",
    "withSrc",
    "chain12",
    "wide",
    "placeholderUse",
    "otherSystem",
    "passAsFile",
    "drvPathRef",
];

struct Corpus {
    env: NixEnv,
    top: BTreeMap<&'static str, StorePath>,
    /// Every derivation in the closure of `top`: path → (file, parsed).
    all: BTreeMap<StorePath, (Vec<u8>, Derivation)>,
    json: BTreeMap<String, serde_json::Value>,
}

fn corpus() -> Corpus {
    let env = NixEnv::new();
    let paths = env.instantiate(CORPUS, ATTRS);
    let top: BTreeMap<_, _> = ATTRS
        .iter()
        .copied()
        .zip(paths.iter().map(|p| parse_path(p)))
        .collect();
    let json = show_derivations(&env, &paths, true);
    let all = json
        .keys()
        .map(|p| {
            let path = parse_path(p);
            let read = read_drv(&path);
            (path, read)
        })
        .collect();
    Corpus {
        env,
        top,
        all,
        json,
    }
}

#[test]
fn corpus_round_trips_and_matches_nix() {
    let c = corpus();
    let dir = store_dir();
    assert!(
        c.all.len() >= 60,
        "closure has only {} derivations",
        c.all.len()
    );
    let mut cache = DrvHashCache::new();
    for (path, (bytes, drv)) in &c.all {
        let printed = drv.to_aterm(&dir).expect("prints");
        assert!(
            printed.as_bytes() == bytes.as_slice(),
            "{path}: printing the parsed derivation changed it:\n file: {}\n ours: {printed}",
            String::from_utf8_lossy(bytes)
        );
        assert_eq!(
            &drv.drv_path(&dir).expect("drv path"),
            path,
            "{path}: .drv path"
        );
        assert_eq!(
            show_json(drv),
            c.json[&dir.print(path)],
            "{path}: parsed view differs from nix show-derivation"
        );

        cache
            .hash_with(&dir, path, |p| {
                c.all
                    .get(p)
                    .map(|(_, d)| d.clone())
                    .ok_or_else(|| format!("{p} not in closure"))
            })
            .expect("hash modulo");
        let computed = compute_output_paths(&dir, drv, &cache).expect("output paths");
        let nix_outputs = c.json[&dir.print(path)]["outputs"]
            .as_object()
            .expect("outputs object");
        assert_eq!(computed.len(), nix_outputs.len(), "{path}: output count");
        for (name, nix_out) in nix_outputs {
            let ours = computed[name].as_ref().map(|p| dir.print(p));
            let theirs = nix_out
                .get("path")
                .and_then(|p| p.as_str())
                .map(str::to_owned);
            assert_eq!(ours, theirs, "{path}: path of output {name}");
        }

        // Reading with the text attached hashes the file itself; it must
        // agree with printing, and every file Nix writes is canonical.
        let parsed = ParsedDerivation::parse_drv_file(&dir, path, bytes).expect("parses");
        assert!(parsed.is_canonical(), "{path}: not canonical");
        assert_eq!(parsed.derivation(), drv);
        assert_eq!(&parsed.drv_path(&dir).expect("drv path"), path);
        let mut admitted = DrvHashCache::new();
        for input in drv.input_drvs.keys() {
            let h = cache.get(input).expect("inputs were hashed").clone();
            admitted.insert(input.clone(), h);
        }
        assert_eq!(
            admitted.admit(&dir, path.clone(), &parsed),
            Ok(computed),
            "{path}: admit"
        );
        assert_eq!(admitted.get(path), cache.get(path), "{path}: memoised hash");
    }
}

#[test]
fn corpus_covers_every_kind() {
    let c = corpus();
    let drv = |attr: &str| &c.all[&c.top[attr]].1;
    let kind = |attr: &str| drv(attr).derivation_type().expect("valid type");
    assert_eq!(
        kind("plain"),
        DerivationType::InputAddressed { deferred: false }
    );
    assert_eq!(
        kind("deferred"),
        DerivationType::InputAddressed { deferred: true }
    );
    assert_eq!(
        kind("deferredChain"),
        DerivationType::InputAddressed { deferred: true }
    );
    assert_eq!(
        kind("usesFixedUsesCa"),
        DerivationType::InputAddressed { deferred: false }
    );
    assert_eq!(
        kind("caA"),
        DerivationType::ContentAddressed { fixed: false }
    );
    assert_eq!(
        kind("fixedRec"),
        DerivationType::ContentAddressed { fixed: true }
    );
    let fixed = |attr: &str| match &drv(attr).outputs["out"] {
        DerivationOutput::CAFixed { method, hash } => (*method, hash.algo()),
        other => panic!("{attr}: not fixed: {other:?}"),
    };
    assert_eq!(
        fixed("fixedFlat"),
        (ContentAddressMethod::Flat, HashAlgo::Sha256)
    );
    assert_eq!(
        fixed("fixedMd5"),
        (ContentAddressMethod::Flat, HashAlgo::Md5)
    );
    assert_eq!(
        fixed("fixedSha512Sri"),
        (ContentAddressMethod::Flat, HashAlgo::Sha512)
    );
    assert_eq!(
        fixed("fixedRec"),
        (ContentAddressMethod::Recursive, HashAlgo::Sha256)
    );
    assert_eq!(
        fixed("fixedRecSha1"),
        (ContentAddressMethod::Recursive, HashAlgo::Sha1)
    );
    assert!(matches!(
        drv("caFlat").outputs["out"],
        DerivationOutput::CAFloating {
            method: ContentAddressMethod::Flat,
            hash_algo: HashAlgo::Sha512
        }
    ));
    assert_eq!(drv("multi").outputs.len(), 3);
    let json = drv("structured")
        .structured_attrs()
        .expect("structured attrs in __json");
    let v: serde_json::Value = serde_json::from_str(json).expect("__json is JSON");
    assert_eq!(v["nested"]["b"][2], "t\tn\nr\r");
    assert_eq!(drv("odd").env["mixed"], "\"\\\n\r\t\"\\");
    assert_eq!(drv("odd").env["empty"], "");
    assert_eq!(drv("odd").env["key\"quote\\"], "v2");
    assert!(!drv("withSrc").input_srcs.is_empty());
    let d = drv("drvPathRef");
    assert!(d.input_srcs.contains(&c.top["plain"]) && d.input_drvs.contains_key(&c.top["plain"]));

    // The placeholders Nix wrote are the ones we compute.
    let ca_b = drv("caB");
    let args = ca_b.args.join(" ");
    assert!(args.contains(&downstream_placeholder(&c.top["caA"], "out")));
    assert!(args.contains(&downstream_placeholder(&c.top["caMulti"], "dev")));
    assert_eq!(ca_b.env["out"], hash_placeholder("out"));
    assert!(drv("placeholderUse").args[1].contains(&hash_placeholder("man")));
    assert!(drv("deferredChain").args[1]
        .contains(&downstream_placeholder(&c.top["deferredMulti"], "doc")));
    drop(c.env);
}

/// Re-creating each input-addressed derivation's outputs as
/// `derivationStrict` does gives back the file Nix wrote.
#[test]
fn filling_outputs_reproduces_nix() {
    let c = corpus();
    let dir = store_dir();
    let mut cache = DrvHashCache::new();
    let mut checked = 0;
    for (path, (_, drv)) in &c.all {
        cache
            .hash_with(&dir, path, |p| {
                c.all.get(p).map(|(_, d)| d.clone()).ok_or(())
            })
            .expect("hash modulo");
        if !matches!(
            drv.derivation_type(),
            Ok(DerivationType::InputAddressed { .. })
        ) {
            continue;
        }
        let mut fresh = drv.clone();
        for (name, out) in fresh.outputs.iter_mut() {
            *out = DerivationOutput::Deferred;
            fresh.env.insert(name.clone(), "garbage".into());
        }
        fill_input_addressed_outputs(&dir, &mut fresh, &cache).expect("fill outputs");
        assert_eq!(&fresh, drv, "{path}");
        checked += 1;
    }
    assert!(checked >= 40, "only {checked} input-addressed derivations");
}

/// Text paths (`builtins.toFile`) with and without references.
#[test]
fn text_paths_match_nix() {
    let c = corpus();
    let dir = store_dir();
    let with_src = &c.all[&c.top["withSrc"]].1;
    let src = parse_path(&with_src.env["s1"]);
    let src_ref = parse_path(&with_src.env["s2"]);
    let nonce = c.env.nonce();
    assert_eq!(
        dir.compute_text_path(&format!("src-{nonce}"), b"source text\n", [])
            .expect("text path"),
        src
    );
    let contents = format!("see {}", dir.print(&src));
    assert_eq!(
        dir.compute_text_path(&format!("src-ref-{nonce}"), contents.as_bytes(), [&src])
            .expect("text path"),
        src_ref
    );
}

/// Content-addressed files added with `nix-store --add-fixed`.
#[test]
fn fixed_paths_match_nix_store_add_fixed() {
    let env = NixEnv::new();
    let dir = store_dir();
    let file = env.dir().join(format!("blob-{}", env.nonce()));
    let contents = format!("contents {}\n", env.nonce());
    std::fs::write(&file, &contents).expect("write file");
    let name = file
        .file_name()
        .and_then(|n| n.to_str())
        .expect("file name")
        .to_owned();
    for (algo, recursive) in [
        (HashAlgo::Sha256, false),
        (HashAlgo::Sha1, false),
        (HashAlgo::Md5, false),
        (HashAlgo::Sha256, true),
        (HashAlgo::Sha512, true),
    ] {
        let mut cmd = env.command("nix-store");
        cmd.arg("--add-fixed");
        if recursive {
            cmd.arg("--recursive");
        }
        cmd.arg(algo.name()).arg(&file);
        let nix_path = parse_path(&String::from_utf8(output(&mut cmd).stdout).expect("utf-8"));
        let hash = if recursive {
            // The NAR hash, from Nix itself.
            let out = output(
                env.command("nix")
                    .args(["hash", "path", "--base16", "--type"])
                    .arg(algo.name())
                    .arg(&file),
            );
            Hash::parse_unprefixed(String::from_utf8(out.stdout).expect("utf-8").trim(), algo)
                .expect("nix hash path prints a hash")
        } else {
            Hash::compute(algo, contents.as_bytes())
        };
        let method = if recursive {
            ContentAddressMethod::Recursive
        } else {
            ContentAddressMethod::Flat
        };
        let ours = dir
            .make_fixed_output_path(method, &hash, &name, [], false)
            .expect("fixed path");
        assert_eq!(ours, nix_path, "{algo} recursive={recursive}");
    }
}

/// Equal fixed outputs share one entry in the hash modulo's input list,
/// and the entries' output sets merge.
#[test]
fn twin_fixed_outputs_have_equal_hashes() {
    let c = corpus();
    let dir = store_dir();
    let mut cache = DrvHashCache::new();
    let load = |p: &StorePath| c.all.get(p).map(|(_, d)| d.clone()).ok_or(());
    let a = cache
        .hash_with(&dir, &c.top["fixedFlat"], load)
        .expect("hash")
        .clone();
    let b = cache
        .hash_with(&dir, &c.top["fixedFlatTwin"], load)
        .expect("hash")
        .clone();
    assert_ne!(c.top["fixedFlat"], c.top["fixedFlatTwin"]);
    assert_eq!(a, b);
    // `usesFixed` uses both: its output path (checked against Nix in
    // `corpus_round_trips_and_matches_nix`) depends on merging them.
    let uses = &c.all[&c.top["usesFixed"]].1;
    assert!(uses.input_drvs.contains_key(&c.top["fixedFlat"]));
    assert!(uses.input_drvs.contains_key(&c.top["fixedFlatTwin"]));
}
