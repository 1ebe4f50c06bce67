//! Parsing the ATerm text of `.drv` files (printing is in `print.rs`).
//!
//! The format is `Derive([outputs],[input drvs],[input srcs],"platform",
//! "builder",[args],[env])`. Strings are double-quoted; Nix escapes `"`, `\`,
//! newline, carriage return and tab in the builder, arguments and
//! environment, and prints output names, paths, hash fields and the platform
//! without escaping. The parser reads escapes anywhere (`\x` is `x` for any
//! other `x`), as Nix's does. While parsing it notes whether printing the
//! result would give the text back byte for byte, and if so where the parts
//! lie that hashing modulo replaces (`Layout`).
//!
//! Invariants: parsing works on `&[u8]` and never panics; strings without
//! escapes are copied once, straight from the input; every error carries
//! the byte offset where the problem starts; a layout is returned only for
//! text that printing reproduces exactly. The parser is stricter than
//! Nix's in three ways that no file written by Nix can hit: list elements
//! must be separated by exactly one comma, nothing may follow the closing
//! parenthesis, and the path stored for a fixed output must be the one its
//! hash gives. Duplicate keys behave as in Nix: the first of two outputs of
//! one name wins, the last of two environment entries or input derivations.
//! Strings must be UTF-8: Nix allows any bytes but [`Derivation`] holds
//! `String`s, so a `.drv` with other bytes is rejected as `InvalidUtf8`.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use thiserror::Error;

use super::{fixed_output_path, Derivation, DerivationOutput};
use crate::hash::{Hash, HashAlgo, ParseHashError};
use crate::store_path::{
    ContentAddressMethod, MakeStorePathError, StoreDir, StorePath, StorePathError,
};

/// Why a `.drv` text could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ParseDerivationError {
    #[error("expected '{expected}' at byte {offset} of the derivation")]
    Expected {
        expected: &'static str,
        offset: usize,
    },
    #[error("unterminated string starting at byte {offset} of the derivation")]
    UnterminatedString { offset: usize },
    #[error("string starting at byte {offset} of the derivation is not valid UTF-8")]
    InvalidUtf8 { offset: usize },
    #[error("invalid store path at byte {offset} of the derivation: {source}")]
    InvalidStorePath {
        offset: usize,
        source: StorePathError,
    },
    #[error("invalid output '{output}' at byte {offset} of the derivation: {problem}")]
    InvalidOutput {
        output: String,
        offset: usize,
        problem: OutputProblem,
    },
    #[error("unexpected data after the end of the derivation at byte {offset}")]
    TrailingData { offset: usize },
    #[error("'{0}' is not a .drv path")]
    NotADrvPath(StorePath),
}

/// What is wrong with one output's fields.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum OutputProblem {
    #[error("unknown hash algorithm '{0}'")]
    UnknownHashAlgo(String),
    #[error("invalid hash: {0}")]
    InvalidHash(ParseHashError),
    #[error("a hash is given without a hash algorithm")]
    HashWithoutAlgo,
    #[error("floating and impure outputs must have an empty path, not '{0}'")]
    UnexpectedPath(String),
    #[error("invalid path: {0}")]
    InvalidPath(StorePathError),
    #[error("fixed output path '{found}' is not the path its hash gives, '{expected}'")]
    FixedPathMismatch { found: String, expected: String },
    #[error("cannot compute the fixed output's path: {0}")]
    FixedPath(MakeStorePathError),
}

type Result<T> = std::result::Result<T, ParseDerivationError>;

/// Where the parts that hashing replaces lie in a `.drv` text that is
/// exactly as Nix prints it, so hashes of variants of the printed text can
/// be taken from the text itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layout {
    /// The input derivation list, brackets included.
    pub inputs: Range<usize>,
    /// The quoted values of environment variables named like outputs.
    pub output_env_values: Vec<Range<usize>>,
}

/// Parses `text`, the contents of the `.drv` of derivation `name`.
pub(crate) fn parse(store_dir: &StoreDir, text: &[u8], name: &str) -> Result<Derivation> {
    parse_with_layout(store_dir, text, name).map(|(drv, _)| drv)
}

/// [`parse`], and the text's [`Layout`] if printing the result gives the
/// text back byte for byte (which holds for every `.drv` Nix writes).
pub(crate) fn parse_with_layout(
    store_dir: &StoreDir,
    text: &[u8],
    name: &str,
) -> Result<(Derivation, Option<Layout>)> {
    let mut p = Parser {
        s: text,
        pos: 0,
        store_dir,
        canonical: true,
        raw_controls: memchr::memchr3(b'\n', b'\r', b'\t', text).is_some(),
    };
    let mut drv = Derivation {
        name: name.to_owned(),
        ..Derivation::default()
    };
    p.lit("Derive(")?;

    p.list(|p| {
        let start = p.pos;
        p.lit("(")?;
        let id = p.string(Field::Raw)?;
        p.lit(",")?;
        let (path, _) = p.raw_str(Field::Raw)?;
        p.lit(",")?;
        let (algo, _) = p.raw_str(Field::Raw)?;
        p.lit(",")?;
        let (hash, _) = p.raw_str(Field::Raw)?;
        p.lit(")")?;
        let output = make_output(store_dir, name, &id, &path, &algo, &hash).map_err(|problem| {
            ParseDerivationError::InvalidOutput {
                output: id.clone(),
                offset: start,
                problem,
            }
        })?;
        if let DerivationOutput::CAFixed { hash: h, .. } = &output {
            // Nix prints lower-case base-16 whatever the file had.
            p.canonical &= *hash == h.to_base16();
        }
        p.canonical &= drv.outputs.last_key_value().is_none_or(|(k, _)| *k < id);
        drv.outputs.entry(id).or_insert(output);
        Ok(())
    })?;

    // Maps are gathered in vectors first: in order, as every file Nix
    // writes is, a map is then built in one sweep instead of searched and
    // split once per entry.
    p.lit(",")?;
    let inputs_start = p.pos;
    let mut input_drvs = Vec::new();
    p.list(|p| {
        p.lit("(")?;
        let path = p.store_path()?;
        p.lit(",")?;
        let mut wanted = BTreeSet::new();
        p.list(|p| {
            let output = p.string(Field::Raw)?;
            p.canonical &= wanted.last().is_none_or(|last| *last < output);
            wanted.insert(output);
            Ok(())
        })?;
        p.lit(")")?;
        input_drvs.push((path, wanted));
        Ok(())
    })?;
    let inputs = inputs_start..p.pos;
    let (input_drvs, sorted) = into_map(input_drvs);
    p.canonical &= sorted;
    drv.input_drvs = input_drvs;

    p.lit(",")?;
    p.list(|p| {
        let path = p.store_path()?;
        p.canonical &= drv.input_srcs.last().is_none_or(|last| *last < path);
        drv.input_srcs.insert(path);
        Ok(())
    })?;

    p.lit(",")?;
    drv.platform = p.string(Field::Raw)?;
    p.lit(",")?;
    drv.builder = p.string(Field::Escaped)?;
    p.lit(",")?;
    p.list(|p| {
        drv.args.push(p.string(Field::Escaped)?);
        Ok(())
    })?;
    p.lit(",")?;
    let mut output_env_values = Vec::new();
    let mut env = Vec::new();
    p.list(|p| {
        p.lit("(")?;
        let key = p.string(Field::Escaped)?;
        p.lit(",")?;
        let value_start = p.pos;
        let value = p.string(Field::Escaped)?;
        if drv.outputs.contains_key(&key) {
            output_env_values.push(value_start..p.pos);
        }
        p.lit(")")?;
        env.push((key, value));
        Ok(())
    })?;
    let (env, sorted) = into_map(env);
    p.canonical &= sorted;
    drv.env = env;
    p.lit(")")?;
    if p.pos != text.len() {
        return Err(ParseDerivationError::TrailingData { offset: p.pos });
    }
    let layout = p.canonical.then_some(Layout {
        inputs,
        output_env_values,
    });
    Ok((drv, layout))
}

/// The map of `entries`, the last of equal keys winning (as repeated
/// inserts would), and whether the keys were strictly increasing.
fn into_map<K: Ord, V>(entries: Vec<(K, V)>) -> (BTreeMap<K, V>, bool) {
    if entries.windows(2).all(|w| w[0].0 < w[1].0) {
        // Sorted and unique: the bulk build keeps every entry as it is.
        (entries.into_iter().collect(), true)
    } else {
        let mut map = BTreeMap::new();
        for (k, v) in entries {
            map.insert(k, v);
        }
        (map, false)
    }
}

fn make_output(
    store_dir: &StoreDir,
    drv_name: &str,
    output_name: &str,
    path: &str,
    algo: &str,
    hash: &str,
) -> std::result::Result<DerivationOutput, OutputProblem> {
    if algo.is_empty() {
        if !hash.is_empty() {
            return Err(OutputProblem::HashWithoutAlgo);
        }
        if path.is_empty() {
            return Ok(DerivationOutput::Deferred);
        }
        let path = store_dir
            .parse_path(path)
            .map_err(OutputProblem::InvalidPath)?;
        return Ok(DerivationOutput::InputAddressed { path });
    }
    let (method, algo_name) = ContentAddressMethod::split_prefix(algo);
    let hash_algo = HashAlgo::from_name(algo_name)
        .ok_or_else(|| OutputProblem::UnknownHashAlgo(algo_name.to_owned()))?;
    if hash.is_empty() || hash == "impure" {
        if !path.is_empty() {
            return Err(OutputProblem::UnexpectedPath(path.to_owned()));
        }
        return Ok(if hash.is_empty() {
            DerivationOutput::CAFloating { method, hash_algo }
        } else {
            DerivationOutput::Impure { method, hash_algo }
        });
    }
    let hash = Hash::parse_unprefixed(hash, hash_algo).map_err(OutputProblem::InvalidHash)?;
    let expected = fixed_output_path(store_dir, method, &hash, drv_name, output_name)
        .map_err(OutputProblem::FixedPath)?;
    let expected = store_dir.print(&expected);
    if expected != path {
        return Err(OutputProblem::FixedPathMismatch {
            found: path.to_owned(),
            expected,
        });
    }
    Ok(DerivationOutput::CAFixed { method, hash })
}

/// How Nix prints a string field, which decides whether the text of a
/// parsed string is what printing gives back.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Field {
    /// Printed with `"`, `\`, newline, return and tab escaped.
    Escaped,
    /// Printed as is.
    Raw,
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
    store_dir: &'a StoreDir,
    /// Whether everything so far prints back to the same bytes.
    canonical: bool,
    /// Whether the text has a newline, return or tab byte anywhere (Nix
    /// writes none: it escapes them where it escapes at all). Only then
    /// must each escaped field be searched for them.
    raw_controls: bool,
}

impl<'a> Parser<'a> {
    #[inline]
    fn lit(&mut self, expected: &'static str) -> Result<()> {
        let e = expected.as_bytes();
        let found = match e {
            [one] => self.s.get(self.pos) == Some(one),
            _ => self.s[self.pos..].starts_with(e),
        };
        if found {
            self.pos += expected.len();
            Ok(())
        } else {
            Err(ParseDerivationError::Expected {
                expected,
                offset: self.pos,
            })
        }
    }

    #[inline]
    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    /// `[` elements separated by `,` `]`, each parsed by `element`.
    fn list(&mut self, mut element: impl FnMut(&mut Self) -> Result<()>) -> Result<()> {
        self.lit("[")?;
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(());
        }
        loop {
            element(self)?;
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(());
                }
                _ => {
                    return Err(ParseDerivationError::Expected {
                        expected: "',' or ']'",
                        offset: self.pos,
                    })
                }
            }
        }
    }

    /// A quoted string with escapes undone, borrowed from the input when it
    /// has none; and the offset of its opening quote. Clears `canonical`
    /// if printing the string as `field` would not give the same bytes.
    fn raw_bytes(&mut self, field: Field) -> Result<(Cow<'a, [u8]>, usize)> {
        let start = self.pos;
        self.lit("\"")?;
        let body = self.pos;
        let s = self.s;
        let Some(i) = memchr::memchr2(b'"', b'\\', &s[body..]) else {
            return Err(ParseDerivationError::UnterminatedString { offset: start });
        };
        if s[body + i] == b'"' {
            self.pos = body + i + 1;
            let raw = &s[body..body + i];
            if field == Field::Escaped
                && self.raw_controls
                && memchr::memchr3(b'\n', b'\r', b'\t', raw).is_some()
            {
                self.canonical = false;
            }
            return Ok((Cow::Borrowed(raw), start));
        }
        if field == Field::Raw {
            self.canonical = false;
        }
        let mut buf = Vec::with_capacity(i + 64);
        let mut at = body;
        let mut stop = body + i;
        loop {
            let run = &s[at..stop];
            if field == Field::Escaped
                && self.raw_controls
                && memchr::memchr3(b'\n', b'\r', b'\t', run).is_some()
            {
                self.canonical = false;
            }
            buf.extend_from_slice(run);
            if s[stop] == b'"' {
                self.pos = stop + 1;
                return Ok((Cow::Owned(buf), start));
            }
            // A backslash: the next byte is taken literally except n, r, t.
            let Some(&c) = s.get(stop + 1) else {
                return Err(ParseDerivationError::UnterminatedString { offset: start });
            };
            buf.push(match c {
                b'n' => b'\n',
                b'r' => b'\r',
                b't' => b'\t',
                b'"' | b'\\' => c,
                other => {
                    self.canonical = false;
                    other
                }
            });
            at = stop + 2;
            stop = match memchr::memchr2(b'"', b'\\', &s[at..]) {
                Some(j) => at + j,
                None => return Err(ParseDerivationError::UnterminatedString { offset: start }),
            };
        }
    }

    fn raw_str(&mut self, field: Field) -> Result<(Cow<'a, str>, usize)> {
        let (bytes, start) = self.raw_bytes(field)?;
        let invalid = |_| ParseDerivationError::InvalidUtf8 { offset: start };
        let s = match bytes {
            Cow::Borrowed(b) => Cow::Borrowed(std::str::from_utf8(b).map_err(invalid)?),
            Cow::Owned(v) => Cow::Owned(String::from_utf8(v).map_err(|e| invalid(e.utf8_error()))?),
        };
        Ok((s, start))
    }

    fn string(&mut self, field: Field) -> Result<String> {
        Ok(self.raw_str(field)?.0.into_owned())
    }

    fn store_path(&mut self) -> Result<StorePath> {
        let (s, offset) = self.raw_str(Field::Raw)?;
        self.store_dir
            .parse_path(&s)
            .map_err(|source| ParseDerivationError::InvalidStorePath { offset, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> StoreDir {
        StoreDir::default()
    }

    const SIMPLE: &str = r#"Derive([("out","/nix/store/jc8klrv4a4dlpzqzmqqjp0zvlrvw2b4i-x","","")],[],[],"x86_64-linux","/bin/sh",["-c","echo \"a\\b\"\n\t\r"],[("builder","/bin/sh"),("name","x"),("out","/nix/store/jc8klrv4a4dlpzqzmqqjp0zvlrvw2b4i-x"),("system","x86_64-linux")])"#;

    #[test]
    fn round_trips_escapes() {
        let drv = parse(&dir(), SIMPLE.as_bytes(), "x").expect("parses");
        assert_eq!(drv.args[1], "echo \"a\\b\"\n\t\r");
        assert_eq!(drv.to_aterm(&dir()).expect("prints"), SIMPLE);
    }

    #[test]
    fn errors_name_the_offset() {
        let cut = &SIMPLE[..SIMPLE.len() - 3];
        assert!(matches!(
            parse(&dir(), cut.as_bytes(), "x"),
            Err(ParseDerivationError::Expected { .. })
                | Err(ParseDerivationError::UnterminatedString { .. })
        ));
        let err = parse(&dir(), b"Derive([(\"out\"", "x").expect_err("truncated");
        assert_eq!(
            err,
            ParseDerivationError::Expected {
                expected: ",",
                offset: 14
            }
        );
        let bad_path = SIMPLE.replace("/nix/store/jc8k", "/nix/store/ec8k");
        let err = parse(&dir(), bad_path.as_bytes(), "x").expect_err("invalid output path");
        assert!(matches!(
            err,
            ParseDerivationError::InvalidOutput { offset: 8, .. }
        ));
        let trailing = format!("{SIMPLE}\n");
        assert_eq!(
            parse(&dir(), trailing.as_bytes(), "x"),
            Err(ParseDerivationError::TrailingData {
                offset: SIMPLE.len()
            })
        );
        let mut latin1 = SIMPLE.as_bytes().to_vec();
        let at = SIMPLE.find("echo").expect("has echo");
        latin1[at] = 0xe9;
        assert!(matches!(
            parse(&dir(), &latin1, "x"),
            Err(ParseDerivationError::InvalidUtf8 { .. })
        ));
    }

    #[test]
    fn duplicate_keys_follow_nix() {
        // Nix keeps the first output of a name (`emplace`), and the last
        // environment entry and input derivation (`[]=`, `insert_or_assign`).
        let drv_a = "/nix/store/00000000000000000000000000000000-a.drv";
        let text = format!(
            r#"Derive([("out","","",""),("out","","r:sha256","")],[("{drv_a}",["x"]),("{drv_a}",["y"])],[],"s","b",[],[("k","1"),("k","2")])"#
        );
        let (drv, layout) = parse_with_layout(&dir(), text.as_bytes(), "x").expect("parses");
        assert_eq!(drv.outputs["out"], DerivationOutput::Deferred);
        assert_eq!(drv.env["k"], "2");
        let wanted: Vec<&String> = drv.input_drvs.values().flatten().collect();
        assert_eq!(wanted, ["y"]);
        assert_eq!(layout, None, "duplicates do not print back");
    }

    #[test]
    fn output_kinds() {
        let text = r#"Derive([("a","","r:sha256",""),("b","","",""),("c","","sha1","impure")],[],[],"s","b",[],[])"#;
        let drv = parse(&dir(), text.as_bytes(), "x").expect("parses");
        assert!(matches!(
            drv.outputs["a"],
            DerivationOutput::CAFloating {
                method: ContentAddressMethod::Recursive,
                hash_algo: HashAlgo::Sha256
            }
        ));
        assert_eq!(drv.outputs["b"], DerivationOutput::Deferred);
        assert!(matches!(drv.outputs["c"], DerivationOutput::Impure { .. }));
        assert_eq!(drv.to_aterm(&dir()).expect("prints"), text);
        for bad in [
            r#"Derive([("a","","sha3","")],[],[],"s","b",[],[])"#,
            r#"Derive([("a","","","abc")],[],[],"s","b",[],[])"#,
            r#"Derive([("a","/nix/store/x","r:sha256","")],[],[],"s","b",[],[])"#,
            r#"Derive([("a","","sha256","abc")],[],[],"s","b",[],[])"#,
        ] {
            assert!(
                matches!(
                    parse(&dir(), bad.as_bytes(), "x"),
                    Err(ParseDerivationError::InvalidOutput { .. })
                ),
                "{bad}"
            );
        }
    }
}
