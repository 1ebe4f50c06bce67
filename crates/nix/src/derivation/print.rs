//! Printing derivations as Nix's `Derivation::unparse` does, into any
//! [`Sink`]: a buffer for the `.drv` text, or a SHA-256 directly for the
//! hashes Nix takes of printed text (the `.drv` path, hashes modulo), which
//! then need no buffer of the whole text.
//!
//! Invariant: the bytes are exactly Nix's: output names, paths, hash fields
//! and the platform unescaped; builder, arguments and environment with `"`,
//! `\`, newline, return and tab escaped; maps in key order; fixed output
//! paths recomputed from their hashes.

use std::collections::{BTreeMap, BTreeSet};

use super::{fixed_output_path, Derivation, DerivationOutput, DerivationView};
pub(crate) use crate::hash::HashSink;
use crate::hash::{base16_on_stack, Hash, HashAlgo};
use crate::store_path::{ContentAddressMethod, MakeStorePathError, StoreDir, StorePath};

/// Where printed bytes go.
pub(crate) trait Sink {
    fn put(&mut self, bytes: &[u8]);
    fn put_byte(&mut self, b: u8);
}

impl Sink for Vec<u8> {
    #[inline]
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }

    #[inline]
    fn put_byte(&mut self, b: u8) {
        self.push(b);
    }
}

/// Printing straight into a SHA-256.
impl Sink for HashSink {
    #[inline]
    fn put(&mut self, bytes: &[u8]) {
        HashSink::put(self, bytes);
    }

    #[inline]
    fn put_byte(&mut self, b: u8) {
        HashSink::put_byte(self, b);
    }
}

fn put_base16(out: &mut impl Sink, hash: &Hash) {
    let (hex, len) = base16_on_stack(hash);
    out.put(&hex[..len]);
}

/// One used output of an input derivation, by the input's hash modulo.
pub(crate) type ModuloInput<'a> = (&'a Hash, &'a str);

/// What the input derivation list of a printed derivation holds.
pub(crate) enum InputsSection<'a> {
    /// Nothing: a basic (e.g. resolved) derivation.
    None,
    /// The real input derivations.
    Drvs(&'a BTreeMap<StorePath, BTreeSet<String>>),
    /// Input derivations replaced by their hashes modulo (printed in
    /// base-16): `(hash, output)` pairs sorted by hash digest then output
    /// name, without duplicates; pairs with equal hashes form one entry.
    Modulo(&'a [ModuloInput<'a>]),
}

/// A capacity guess for the printed text, to avoid regrowing the buffer.
pub(crate) fn estimate_len(drv: &Derivation) -> usize {
    let env: usize = drv.env.iter().map(|(k, v)| k.len() + v.len() + 8).sum();
    let args: usize = drv.args.iter().map(|a| a.len() + 3).sum();
    let paths = (drv.input_drvs.len() + drv.input_srcs.len() + drv.outputs.len()) * 96;
    256 + env + args + paths + drv.builder.len()
}

/// Prints a derivation as Nix's `Derivation::unparse` does. With
/// `mask_outputs`, output paths and the environment variables named like
/// outputs are printed empty.
pub(crate) fn write(
    out: &mut impl Sink,
    store_dir: &StoreDir,
    drv: DerivationView<'_>,
    inputs: InputsSection<'_>,
    mask_outputs: bool,
) -> std::result::Result<(), MakeStorePathError> {
    out.put(b"Derive(");
    write_outputs(out, store_dir, drv, mask_outputs)?;
    out.put_byte(b',');
    write_inputs(out, store_dir, inputs);
    out.put(b",[");
    for (i, path) in drv.input_srcs.iter().enumerate() {
        if i > 0 {
            out.put_byte(b',');
        }
        quoted_path(out, store_dir, path);
    }
    out.put(b"],");
    raw(out, drv.platform.as_bytes());
    out.put_byte(b',');
    escaped(out, drv.builder.as_bytes());
    out.put(b",[");
    for (i, arg) in drv.args.iter().enumerate() {
        if i > 0 {
            out.put_byte(b',');
        }
        escaped(out, arg.as_bytes());
    }
    out.put(b"],[");
    for (i, (key, value)) in drv.env.iter().enumerate() {
        if i > 0 {
            out.put_byte(b',');
        }
        out.put_byte(b'(');
        escaped(out, key.as_bytes());
        out.put_byte(b',');
        if mask_outputs && drv.outputs.contains_key(key) {
            out.put(b"\"\"");
        } else {
            escaped(out, value.as_bytes());
        }
        out.put_byte(b')');
    }
    out.put(b"])");
    Ok(())
}

/// The output list, brackets included.
pub(crate) fn write_outputs(
    out: &mut impl Sink,
    store_dir: &StoreDir,
    drv: DerivationView<'_>,
    mask_outputs: bool,
) -> std::result::Result<(), MakeStorePathError> {
    out.put_byte(b'[');
    for (i, (name, output)) in drv.outputs.iter().enumerate() {
        if i > 0 {
            out.put_byte(b',');
        }
        out.put_byte(b'(');
        raw(out, name.as_bytes());
        out.put_byte(b',');
        match output {
            DerivationOutput::InputAddressed { path } => {
                if mask_outputs {
                    out.put(b"\"\"");
                } else {
                    quoted_path(out, store_dir, path);
                }
                out.put(b",\"\",\"\"");
            }
            DerivationOutput::CAFixed { method, hash } => {
                if mask_outputs {
                    out.put(b"\"\"");
                } else {
                    let path = fixed_output_path(store_dir, *method, hash, drv.name, name)?;
                    quoted_path(out, store_dir, &path);
                }
                out.put(b",\"");
                method_algo(out, *method, hash.algo());
                out.put(b"\",\"");
                put_base16(out, hash);
                out.put_byte(b'"');
            }
            DerivationOutput::CAFloating { method, hash_algo } => {
                out.put(b"\"\",\"");
                method_algo(out, *method, *hash_algo);
                out.put(b"\",\"\"");
            }
            DerivationOutput::Deferred => out.put(b"\"\",\"\",\"\""),
            DerivationOutput::Impure { method, hash_algo } => {
                out.put(b"\"\",\"");
                method_algo(out, *method, *hash_algo);
                out.put(b"\",\"impure\"");
            }
        }
        out.put_byte(b')');
    }
    out.put_byte(b']');
    Ok(())
}

/// The input derivation list, brackets included.
pub(crate) fn write_inputs(out: &mut impl Sink, store_dir: &StoreDir, inputs: InputsSection<'_>) {
    out.put_byte(b'[');
    match inputs {
        InputsSection::None => {}
        InputsSection::Drvs(drvs) => {
            for (i, (path, wanted)) in drvs.iter().enumerate() {
                if i > 0 {
                    out.put_byte(b',');
                }
                out.put_byte(b'(');
                quoted_path(out, store_dir, path);
                out.put_byte(b',');
                raw_list(out, wanted.iter().map(|s| s.as_bytes()));
                out.put_byte(b')');
            }
        }
        InputsSection::Modulo(pairs) => {
            let mut previous: Option<&Hash> = None;
            for (hash, output) in pairs {
                if previous.is_some_and(|p| p.digest() == hash.digest()) {
                    out.put(b",\"");
                } else {
                    if previous.is_some() {
                        out.put(b"]),");
                    }
                    out.put(b"(\"");
                    put_base16(out, hash);
                    out.put(b"\",[\"");
                }
                out.put(output.as_bytes());
                out.put_byte(b'"');
                previous = Some(hash);
            }
            if previous.is_some() {
                out.put(b"])");
            }
        }
    }
    out.put_byte(b']');
}

/// The printed text as a `String`. Everything printed comes from `str`s
/// and ASCII, so it is UTF-8; a lossy conversion stands in for a panic.
pub(crate) fn into_string(out: Vec<u8>) -> String {
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

fn method_algo(out: &mut impl Sink, method: ContentAddressMethod, algo: HashAlgo) {
    out.put(method.prefix().as_bytes());
    out.put(algo.name().as_bytes());
}

fn quoted_path(out: &mut impl Sink, store_dir: &StoreDir, path: &StorePath) {
    out.put_byte(b'"');
    out.put(store_dir.as_str().as_bytes());
    out.put_byte(b'/');
    out.put(path.base_name().as_bytes());
    out.put_byte(b'"');
}

/// A string in quotes, not escaped (Nix's `printUnquotedString`).
fn raw(out: &mut impl Sink, s: &[u8]) {
    out.put_byte(b'"');
    out.put(s);
    out.put_byte(b'"');
}

fn raw_list<'s>(out: &mut impl Sink, items: impl Iterator<Item = &'s [u8]>) {
    out.put_byte(b'[');
    for (i, s) in items.enumerate() {
        if i > 0 {
            out.put_byte(b',');
        }
        raw(out, s);
    }
    out.put_byte(b']');
}

/// A string in quotes with `"`, `\`, newline, return and tab escaped.
/// Runs of bytes between escapes are found with SIMD searches and copied
/// whole; each search's result is kept until passed, so the input is
/// scanned about twice in all, however many escapes it has.
fn escaped(out: &mut impl Sink, s: &[u8]) {
    let find3 = |from: usize| memchr::memchr3(b'"', b'\\', b'\n', &s[from..]).map(|i| from + i);
    let find2 = |from: usize| memchr::memchr2(b'\r', b'\t', &s[from..]).map(|i| from + i);
    out.put_byte(b'"');
    let mut start = 0;
    let mut next3 = find3(0);
    let mut next2 = find2(0);
    loop {
        let at = match (next3, next2) {
            (None, None) => break,
            (Some(a), None) | (None, Some(a)) => a,
            (Some(a), Some(b)) => a.min(b),
        };
        out.put(&s[start..at]);
        let c = s[at];
        out.put_byte(b'\\');
        out.put_byte(match c {
            b'\n' => b'n',
            b'\r' => b'r',
            b'\t' => b't',
            other => other,
        });
        start = at + 1;
        if next3 == Some(at) {
            next3 = find3(start);
        } else {
            next2 = find2(start);
        }
    }
    out.put(&s[start..]);
    out.put_byte(b'"');
}
