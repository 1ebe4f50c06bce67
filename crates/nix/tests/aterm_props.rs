//! Property tests of the ATerm codec: generated derivations survive
//! print → parse unchanged, and no input (random bytes, or a valid
//! derivation with bytes changed, inserted or removed) makes the parser
//! or anything computed from its result panic.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use proptest::collection::{btree_map, btree_set, vec};
use proptest::prelude::*;
use sluice_nix::derivation::hash_modulo::{
    compute_output_paths, hash_derivation_modulo, DrvHash, DrvHashCache, DrvHashKind,
};
use sluice_nix::derivation::resolve::resolve;
use sluice_nix::derivation::{Derivation, DerivationOutput, ParsedDerivation};
use sluice_nix::hash::{Hash, HashAlgo};
use sluice_nix::store_path::{ContentAddressMethod, StoreDir, StorePath};

fn algo() -> impl Strategy<Value = HashAlgo> {
    prop_oneof![
        Just(HashAlgo::Md5),
        Just(HashAlgo::Sha1),
        Just(HashAlgo::Sha256),
        Just(HashAlgo::Sha512)
    ]
}

fn method() -> impl Strategy<Value = ContentAddressMethod> {
    prop_oneof![
        Just(ContentAddressMethod::Flat),
        Just(ContentAddressMethod::Recursive),
        Just(ContentAddressMethod::Text)
    ]
}

fn store_path(suffix: &'static str) -> impl Strategy<Value = StorePath> {
    (any::<[u8; 20]>(), "[a-zA-Z0-9][a-zA-Z0-9+._?=-]{0,30}").prop_map(move |(digest, name)| {
        StorePath::from_digest(&digest, &format!("{name}{suffix}"))
            .expect("generated names are valid")
    })
}

fn output() -> impl Strategy<Value = DerivationOutput> {
    prop_oneof![
        store_path("").prop_map(|path| DerivationOutput::InputAddressed { path }),
        (method(), algo(), vec(any::<u8>(), 64)).prop_map(|(method, algo, bytes)| {
            // Text content addresses exist only for SHA-256.
            let algo = if method == ContentAddressMethod::Text {
                HashAlgo::Sha256
            } else {
                algo
            };
            let hash = Hash::from_digest(algo, &bytes[..algo.size()]).expect("right size");
            DerivationOutput::CAFixed { method, hash }
        }),
        (method(), algo())
            .prop_map(|(method, hash_algo)| DerivationOutput::CAFloating { method, hash_algo }),
        Just(DerivationOutput::Deferred),
        (method(), algo())
            .prop_map(|(method, hash_algo)| DerivationOutput::Impure { method, hash_algo }),
    ]
}

/// Any text, with the characters that need escaping made frequent.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "(?s).{0,40}",
        "[\"\\\\\n\r\tab/ ]{0,20}",
        Just(String::new())
    ]
}

/// Nix prints the platform and output names without escaping, so they
/// can only round-trip without quotes and backslashes (as in every real
/// derivation).
fn unescaped_text() -> impl Strategy<Value = String> {
    prop_oneof!["[^\"\\\\]{0,20}", "[a-z\n\r\t]{0,10}"]
}

fn derivation() -> impl Strategy<Value = Derivation> {
    (
        "[a-z][a-z0-9-]{0,15}",
        btree_map("[a-z]{1,6}", output(), 1..4),
        btree_map(store_path(".drv"), btree_set("[a-z]{1,6}", 1..3), 0..4),
        btree_set(store_path(""), 0..4),
        unescaped_text(),
        text(),
        vec(text(), 0..4),
        btree_map(text(), text(), 0..6),
    )
        .prop_map(
            |(name, outputs, input_drvs, input_srcs, platform, builder, args, mut env)| {
                // As in real derivations, most outputs have a variable
                // (which masking empties).
                for output in outputs.keys().filter(|o| o.len() % 3 != 0) {
                    env.insert(output.clone(), format!("/nix/store/\"{output}\"\n"));
                }
                Derivation {
                    name,
                    outputs,
                    input_drvs,
                    input_srcs,
                    platform,
                    builder,
                    args,
                    env,
                }
            },
        )
}

/// Parsing with the text attached agrees with printing: the text counts
/// as canonical exactly when printing gives it back, and every path and
/// hash computed from the text equals the one computed by printing.
fn check_text_shortcuts(dir: &StoreDir, text: &[u8], name: &str) -> Result<(), TestCaseError> {
    let Ok(parsed) = ParsedDerivation::parse(dir, text, name) else {
        return Ok(());
    };
    let drv = parsed.derivation();
    let printed = drv.to_aterm(dir);
    prop_assert_eq!(
        parsed.is_canonical(),
        printed.as_ref().is_ok_and(|p| p.as_bytes() == text),
        "canonical flag wrong for {:?}",
        String::from_utf8_lossy(text)
    );
    prop_assert_eq!(parsed.drv_path(dir), drv.drv_path(dir));
    let cache = input_hashes(drv);
    for mask in [false, true] {
        prop_assert_eq!(
            parsed.hash_modulo(dir, mask, &cache),
            hash_derivation_modulo(dir, drv, mask, &cache)
        );
    }
    prop_assert_eq!(
        parsed.output_paths(dir, &cache),
        compute_output_paths(dir, drv, &cache)
    );
    Ok(())
}

/// Every input known, with a hash for each output used from it.
fn input_hashes(drv: &Derivation) -> DrvHashCache {
    let mut cache = DrvHashCache::new();
    for (input, wanted) in &drv.input_drvs {
        let hashes = wanted
            .iter()
            .map(|o| (o.clone(), Hash::sha256(o.as_bytes())));
        cache.insert(input.clone(), DrvHash::new(DrvHashKind::Regular, hashes));
    }
    cache
}

/// Everything this crate computes from a derivation; must never panic.
fn exercise(dir: &StoreDir, drv: &Derivation) {
    let _ = drv.to_aterm(dir);
    let _ = drv.drv_path(dir);
    let _ = drv.derivation_type();
    let cache = input_hashes(drv);
    let _ = hash_derivation_modulo(dir, drv, true, &cache);
    let _ = hash_derivation_modulo(dir, drv, false, &cache);
    let _ = compute_output_paths(dir, drv, &cache);
    if let Ok(basic) = resolve(dir, drv, |_, _| {
        Some(StorePath::from_base_name("00000000000000000000000000000000-x").expect("valid"))
    }) {
        let _ = basic.to_aterm(dir);
        let _ = basic.drv_path(dir);
    }
}

/// One way of writing a derivation that Nix reads as the same one but
/// prints differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Liberty {
    None,
    ReverseOutputs,
    ReverseInputs,
    ReverseWanted,
    ReverseSources,
    ReverseEnv,
    /// A needless backslash before a character in an escaped field.
    NeedlessEscape,
    /// An escaped newline, return or tab in a field Nix prints without
    /// escaping.
    /// (Other needless escapes are caught whatever the field.)
    EscapeInRawField,
    /// A newline, return or tab written as is in an escaped field.
    RawControl,
    UpperCaseHash,
    Nix32Hash,
}

const LIBERTIES: [Liberty; 11] = [
    Liberty::None,
    Liberty::ReverseOutputs,
    Liberty::ReverseInputs,
    Liberty::ReverseWanted,
    Liberty::ReverseSources,
    Liberty::ReverseEnv,
    Liberty::NeedlessEscape,
    Liberty::EscapeInRawField,
    Liberty::RawControl,
    Liberty::UpperCaseHash,
    Liberty::Nix32Hash,
];

/// Prints `drv` taking one `liberty` (where the derivation gives it room
/// to) that Nix would still read as the same derivation; `seed` picks
/// where.
fn print_loosely(dir: &StoreDir, drv: &Derivation, liberty: Liberty, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut coin = move |percent: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % 100 < percent
    };
    let string =
        |out: &mut Vec<u8>, s: &str, escaped_field: bool, coin: &mut dyn FnMut(u64) -> bool| {
            out.push(b'"');
            for c in s.bytes() {
                match c {
                    b'"' | b'\\' => out.extend_from_slice(&[b'\\', c]),
                    b'\n' | b'\r' | b'\t' if escaped_field => {
                        if liberty == Liberty::RawControl && coin(50) {
                            out.push(c);
                        } else {
                            out.extend_from_slice(match c {
                                b'\n' => b"\\n",
                                b'\r' => b"\\r",
                                _ => b"\\t",
                            })
                        }
                    }
                    b'\n' | b'\r' | b'\t' if liberty == Liberty::EscapeInRawField && coin(50) => {
                        out.extend_from_slice(match c {
                            b'\n' => b"\\n",
                            b'\r' => b"\\r",
                            _ => b"\\t",
                        })
                    }
                    b'n' | b'r' | b't' => out.push(c),
                    _ if escaped_field && liberty == Liberty::NeedlessEscape && coin(20) => {
                        out.extend_from_slice(&[b'\\', c])
                    }
                    _ => out.push(c),
                }
            }
            out.push(b'"');
        };
    let order = |n: usize, rev: bool| -> Vec<usize> {
        let mut v: Vec<usize> = (0..n).collect();
        if rev {
            v.reverse();
        }
        v
    };
    let mut out = Vec::new();
    out.extend_from_slice(b"Derive([");
    let outputs: Vec<_> = drv.outputs.iter().collect();
    for (n, i) in order(outputs.len(), liberty == Liberty::ReverseOutputs)
        .into_iter()
        .enumerate()
    {
        let (name, output) = outputs[i];
        if n > 0 {
            out.push(b',');
        }
        out.push(b'(');
        string(&mut out, name, false, &mut coin);
        let path = output
            .path(dir, &drv.name, name)
            .ok()
            .flatten()
            .map(|p| dir.print(&p))
            .unwrap_or_default();
        let (algo, hash) = match output {
            DerivationOutput::CAFixed { method, hash } => {
                let text = match liberty {
                    Liberty::UpperCaseHash => hash.to_base16().to_uppercase(),
                    Liberty::Nix32Hash => hash.to_nix32(),
                    _ => hash.to_base16(),
                };
                (format!("{}{}", method.prefix(), hash.algo()), text)
            }
            DerivationOutput::CAFloating { method, hash_algo } => {
                (format!("{}{}", method.prefix(), hash_algo), String::new())
            }
            DerivationOutput::Impure { method, hash_algo } => {
                (format!("{}{}", method.prefix(), hash_algo), "impure".into())
            }
            _ => (String::new(), String::new()),
        };
        for field in [path, algo, hash] {
            out.push(b',');
            string(&mut out, &field, false, &mut coin);
        }
        out.push(b')');
    }
    out.extend_from_slice(b"],[");
    let inputs: Vec<_> = drv.input_drvs.iter().collect();
    for (n, i) in order(inputs.len(), liberty == Liberty::ReverseInputs)
        .into_iter()
        .enumerate()
    {
        let (path, wanted) = inputs[i];
        if n > 0 {
            out.push(b',');
        }
        out.push(b'(');
        string(&mut out, &dir.print(path), false, &mut coin);
        out.extend_from_slice(b",[");
        let wanted: Vec<_> = wanted.iter().collect();
        for (m, j) in order(wanted.len(), liberty == Liberty::ReverseWanted)
            .into_iter()
            .enumerate()
        {
            if m > 0 {
                out.push(b',');
            }
            string(&mut out, wanted[j], false, &mut coin);
        }
        out.extend_from_slice(b"])");
    }
    out.extend_from_slice(b"],[");
    let srcs: Vec<_> = drv.input_srcs.iter().collect();
    for (n, i) in order(srcs.len(), liberty == Liberty::ReverseSources)
        .into_iter()
        .enumerate()
    {
        if n > 0 {
            out.push(b',');
        }
        string(&mut out, &dir.print(srcs[i]), false, &mut coin);
    }
    out.extend_from_slice(b"],");
    string(&mut out, &drv.platform, false, &mut coin);
    out.push(b',');
    string(&mut out, &drv.builder, true, &mut coin);
    out.extend_from_slice(b",[");
    for (n, arg) in drv.args.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        string(&mut out, arg, true, &mut coin);
    }
    out.extend_from_slice(b"],[");
    let env: Vec<_> = drv.env.iter().collect();
    for (n, i) in order(env.len(), liberty == Liberty::ReverseEnv)
        .into_iter()
        .enumerate()
    {
        if n > 0 {
            out.push(b',');
        }
        out.push(b'(');
        string(&mut out, env[i].0, true, &mut coin);
        out.push(b',');
        string(&mut out, env[i].1, true, &mut coin);
        out.push(b')');
    }
    out.extend_from_slice(b"])");
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn print_then_parse_round_trips(drv in derivation()) {
        let dir = StoreDir::default();
        let text = drv.to_aterm(&dir).expect("generated derivations print");
        let back = Derivation::parse(&dir, text.as_bytes(), &drv.name)
            .map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(&back, &drv);
        prop_assert_eq!(&back.to_aterm(&dir).expect("prints"), &text);
        exercise(&dir, &drv);
        let parsed = ParsedDerivation::parse(&dir, text.as_bytes(), &drv.name).expect("parses");
        prop_assert!(parsed.is_canonical());
        check_text_shortcuts(&dir, text.as_bytes(), &drv.name)?;
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..400)) {
        let dir = StoreDir::default();
        if let Ok(drv) = Derivation::parse(&dir, &bytes, "x") {
            exercise(&dir, &drv);
        }
        let mut prefixed = b"Derive([".to_vec();
        prefixed.extend_from_slice(&bytes);
        if let Ok(drv) = Derivation::parse(&dir, &prefixed, "x") {
            exercise(&dir, &drv);
        }
        check_text_shortcuts(&dir, &bytes, "x")?;
        check_text_shortcuts(&dir, &prefixed, "x")?;
    }

    #[test]
    fn damaged_derivations_never_panic(
        drv in derivation(),
        edits in vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..6),
    ) {
        let dir = StoreDir::default();
        let mut bytes = drv.to_aterm(&dir).expect("prints").into_bytes();
        for (at, byte, op) in edits {
            if bytes.is_empty() {
                break;
            }
            let i = at.index(bytes.len());
            match op {
                0 => bytes[i] = byte,
                1 => bytes.insert(i, byte),
                _ => {
                    bytes.remove(i);
                }
            }
        }
        check_text_shortcuts(&dir, &bytes, &drv.name)?;
        match Derivation::parse(&dir, &bytes, &drv.name) {
            Ok(parsed) => exercise(&dir, &parsed),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    /// Texts Nix would read as the same derivation but print differently:
    /// they parse to that derivation, are told apart from canonical ones,
    /// and give the same paths and hashes as printing does.
    #[test]
    fn loosely_printed_derivations(
        drv in derivation(),
        liberty in prop::sample::select(&LIBERTIES[..]),
        seed in any::<u64>(),
    ) {
        let dir = StoreDir::default();
        let text = print_loosely(&dir, &drv, liberty, seed);
        let back = Derivation::parse(&dir, &text, &drv.name)
            .map_err(|e| TestCaseError::fail(format!("{e}\n{}", String::from_utf8_lossy(&text))))?;
        prop_assert_eq!(&back, &drv);
        check_text_shortcuts(&dir, &text, &drv.name)?;
    }

    #[test]
    fn every_output_name_set_is_kept(names in btree_set("[a-z]{1,6}", 1..5)) {
        let dir = StoreDir::default();
        let drv = Derivation {
            name: "x".into(),
            outputs: names.iter().map(|n| (n.clone(), DerivationOutput::Deferred)).collect(),
            ..Derivation::default()
        };
        let text = drv.to_aterm(&dir).expect("prints");
        let back = Derivation::parse(&dir, text.as_bytes(), "x").expect("parses");
        prop_assert_eq!(back.outputs.keys().cloned().collect::<BTreeSet<_>>(), names);
    }
}
