//! What the driver keeps of every held derivation and build, packed into
//! one allocation each: a queue of 270,000 steps holds one of these per
//! step, and three small strings and two vectors per step cost more than
//! the step itself.
//!
//! An output path is nearly always the usual one: in the derivation's
//! store directory, named after the derivation and the output
//! (`output_path_name`). Such a path is kept as its 20-byte digest, and
//! printed again from the derivation's path when asked for; any other
//! path is kept whole. Each output starts with a tag byte: the kind of
//! path, and whether the output is `out` (nearly all are), whose name is
//! then not kept. Lengths and numbers are LEB128 varints. A derivation
//! with one usual `out` packs into 24 bytes.
//!
//! Invariant: the bytes are written only by this module's constructors,
//! and every reader reads them back exactly as written; a reader that
//! finds less than it expects (which only a bug here could cause) stops
//! early instead of panicking.

use std::borrow::Cow;
use std::collections::BTreeMap;

use sluice_nix::store_path::{output_path_name, StorePath, HASH_PART_LEN};

/// An output whose path is not known yet (floating or deferred).
const UNKNOWN: u8 = 0;
/// The usual path: only its digest is kept.
const USUAL: u8 = 1;
/// Any other path, kept whole.
const OTHER: u8 = 2;
/// The kind of path, in an output's tag byte.
const KIND: u8 = 3;
/// In an output's tag byte: the output is `out`, whose name is not kept.
const OUT: u8 = 4;

/// Output names and, where known, paths, of one derivation; printed back
/// with the path of the derivation (or the build's top derivation) that
/// they belong to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompactOutputs(Box<[u8]>);

impl CompactOutputs {
    /// Packs `outputs` (name, path when known) of derivation `drv_path`.
    pub fn new<'a>(
        drv_path: &str,
        outputs: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
    ) -> CompactOutputs {
        let mut bytes = Vec::new();
        write_outputs(&mut bytes, drv_path, outputs);
        CompactOutputs(bytes.into_boxed_slice())
    }

    /// The outputs of `drv_path` (the path they were packed with), in the
    /// order given to [`CompactOutputs::new`].
    pub fn iter<'a>(&'a self, drv_path: &'a str) -> Outputs<'a> {
        Outputs::new(Reader(&self.0), drv_path)
    }
}

/// What the driver keeps of a derivation while the core holds its step:
/// its system (an index into the driver's interned systems), its outputs,
/// and the realisation keys of the outputs known only once built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedDrv(Box<[u8]>);

impl PackedDrv {
    pub fn new<'a>(
        drv_path: &str,
        system: usize,
        outputs: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
        keys: &BTreeMap<String, String>,
    ) -> PackedDrv {
        let mut bytes = Vec::new();
        write_varint(&mut bytes, system);
        write_outputs(&mut bytes, drv_path, outputs);
        write_varint(&mut bytes, keys.len());
        for (name, key) in keys {
            write_str(&mut bytes, name);
            write_str(&mut bytes, key);
        }
        PackedDrv(bytes.into_boxed_slice())
    }

    /// The index of its system among the driver's interned systems.
    pub fn system(&self) -> usize {
        Reader(&self.0).varint().unwrap_or(0)
    }

    /// Its outputs, as [`CompactOutputs::iter`].
    pub fn outputs<'a>(&'a self, drv_path: &'a str) -> Outputs<'a> {
        let mut reader = Reader(&self.0);
        let _system = reader.varint();
        Outputs::new(reader, drv_path)
    }

    /// Its outputs as a map, for a new step's row.
    pub fn outputs_map(&self, drv_path: &str) -> BTreeMap<String, Option<String>> {
        self.outputs(drv_path)
            .map(|(name, path)| (name.to_owned(), path.map(Cow::into_owned)))
            .collect()
    }

    /// The paths of its outputs that are known.
    pub fn known_paths(&self, drv_path: &str) -> Vec<String> {
        self.outputs(drv_path)
            .filter_map(|(_, path)| path.map(Cow::into_owned))
            .collect()
    }

    /// What goes into `FailedPaths` when it fails for good: its known
    /// output paths, and the derivation itself when some output is known
    /// only once built (no path would remember that failure).
    pub fn failed_paths(&self, drv_path: &str) -> Vec<String> {
        let mut paths = self.known_paths(drv_path);
        if !self.keys().is_empty() {
            paths.push(drv_path.to_owned());
        }
        paths
    }

    /// Its outputs, if every one has a path fixed by the derivation itself
    /// (no realisation key: not known only once built).
    pub fn static_outputs(&self, drv_path: &str) -> Option<Vec<(String, String)>> {
        if !self.keys().is_empty() {
            return None;
        }
        self.outputs(drv_path)
            .map(|(name, path)| Some((name.to_owned(), path?.into_owned())))
            .collect()
    }

    /// The realisation keys of its outputs known only once built (empty
    /// for nearly every derivation).
    pub fn keys(&self) -> BTreeMap<String, String> {
        let mut outputs = self.outputs("");
        for _ in outputs.by_ref() {}
        let mut reader = outputs.reader;
        let mut keys = BTreeMap::new();
        for _ in 0..reader.varint().unwrap_or(0) {
            let (Some(name), Some(key)) = (reader.str(), reader.str()) else {
                break;
            };
            keys.insert(name.to_owned(), key.to_owned());
        }
        keys
    }
}

/// The outputs packed in a [`CompactOutputs`] or a [`PackedDrv`]: (name,
/// path when known).
pub struct Outputs<'a> {
    reader: Reader<'a>,
    left: usize,
    /// `drv_path` split into its store directory and derivation name, to
    /// print usual paths; `None` if it is not a derivation's path (then
    /// no usual path was packed).
    drv: Option<(&'a str, &'a str)>,
}

impl<'a> Outputs<'a> {
    fn new(mut reader: Reader<'a>, drv_path: &'a str) -> Outputs<'a> {
        let left = reader.varint().unwrap_or(0);
        Outputs {
            reader,
            left,
            drv: split_drv_path(drv_path),
        }
    }
}

impl<'a> Iterator for Outputs<'a> {
    type Item = (&'a str, Option<Cow<'a, str>>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let tag = self.reader.byte()?;
        let name = if tag & OUT != 0 {
            "out"
        } else {
            self.reader.str()?
        };
        let path = match tag & KIND {
            UNKNOWN => None,
            USUAL => {
                let digest: [u8; 20] = self.reader.take(20)?.try_into().ok()?;
                // Reading keys walks the outputs without the path.
                let (dir, drv_name) = self.drv.unwrap_or(("", ""));
                let base = StorePath::from_digest(&digest, &output_path_name(drv_name, name))
                    .map(|p| p.base_name().to_owned())
                    .unwrap_or_default();
                Some(Cow::Owned(format!("{dir}/{base}")))
            }
            _ => Some(Cow::Borrowed(self.reader.str()?)),
        };
        Some((name, path))
    }
}

/// (store directory, derivation name) of a derivation's path.
fn split_drv_path(drv_path: &str) -> Option<(&str, &str)> {
    let (dir, base) = drv_path.rsplit_once('/')?;
    let name = base.get(HASH_PART_LEN + 1..)?.strip_suffix(".drv")?;
    (base.as_bytes().get(HASH_PART_LEN) == Some(&b'-')).then_some((dir, name))
}

fn write_outputs<'a>(
    bytes: &mut Vec<u8>,
    drv_path: &str,
    outputs: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
) {
    let outputs: Vec<(&str, Option<&str>)> = outputs.into_iter().collect();
    let drv = split_drv_path(drv_path);
    write_varint(bytes, outputs.len());
    for (name, path) in outputs {
        let usual = path.and_then(|path| drv.and_then(|drv| usual_digest(drv, name, path)));
        let kind = match (path, usual) {
            (None, _) => UNKNOWN,
            (Some(_), Some(_)) => USUAL,
            (Some(_), None) => OTHER,
        };
        if name == "out" {
            bytes.push(kind | OUT);
        } else {
            bytes.push(kind);
            write_str(bytes, name);
        }
        match (path, usual) {
            (_, Some(digest)) => bytes.extend_from_slice(&digest),
            (Some(path), None) => write_str(bytes, path),
            (None, None) => {}
        }
    }
}

/// The digest of `path` if it is output `name`'s usual path for the
/// derivation `(dir, drv_name)`, so that printing it again gives `path`.
fn usual_digest((dir, drv_name): (&str, &str), name: &str, path: &str) -> Option<[u8; 20]> {
    let base = path.strip_prefix(dir)?.strip_prefix('/')?;
    let parsed = StorePath::from_base_name(base).ok()?;
    if parsed.name() != output_path_name(drv_name, name) {
        return None;
    }
    let digest = parsed.digest();
    let again = StorePath::from_digest(&digest, parsed.name()).ok()?;
    (again.base_name() == base).then_some(digest)
}

fn write_varint(bytes: &mut Vec<u8>, mut n: usize) {
    loop {
        let low = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            bytes.push(low);
            return;
        }
        bytes.push(low | 0x80);
    }
}

fn write_str(bytes: &mut Vec<u8>, s: &str) {
    write_varint(bytes, s.len());
    bytes.extend_from_slice(s.as_bytes());
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&first, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(first)
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (taken, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(taken)
    }

    fn varint(&mut self) -> Option<usize> {
        let mut n = 0usize;
        for shift in (0..usize::BITS).step_by(7) {
            let byte = self.byte()?;
            n |= usize::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(n);
            }
        }
        None
    }

    fn str(&mut self) -> Option<&'a str> {
        let len = self.varint()?;
        std::str::from_utf8(self.take(len)?).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DRV: &str = "/nix/store/0c9mqpxn5mv5kavmd4lf1rwzq6fz7a5w-hello-2.12.drv";

    fn usual(output: &str) -> String {
        let name = output_path_name("hello-2.12", output);
        let path = StorePath::from_digest(&[7; 20], &name).expect("a valid name");
        format!("/nix/store/{}", path.base_name())
    }

    fn round_trip(drv: &str, outputs: &[(&str, Option<&str>)]) -> Vec<(String, Option<String>)> {
        let packed = CompactOutputs::new(drv, outputs.iter().copied());
        packed
            .iter(drv)
            .map(|(n, p)| (n.to_owned(), p.map(Cow::into_owned)))
            .collect()
    }

    fn owned(outputs: &[(&str, Option<&str>)]) -> Vec<(String, Option<String>)> {
        outputs
            .iter()
            .map(|(n, p)| (n.to_string(), p.map(str::to_owned)))
            .collect()
    }

    #[test]
    fn usual_paths_are_kept_as_digests_and_print_back_exactly() {
        let (out, dev) = (usual("out"), usual("dev"));
        let outputs = [("dev", Some(dev.as_str())), ("out", Some(out.as_str()))];
        assert_eq!(round_trip(DRV, &outputs), owned(&outputs));
        let packed = CompactOutputs::new(DRV, outputs.iter().copied());
        // count, then per output: tag, name (1 + len) unless `out`, digest.
        assert_eq!(packed.0.len(), 1 + (1 + 1 + 3 + 20) + (1 + 20));
    }

    #[test]
    fn other_and_unknown_paths_survive_whole() {
        let elsewhere = "/other/store/0c9mqpxn5mv5kavmd4lf1rwzq6fz7a5w-hello-2.12";
        let misnamed = "/nix/store/0c9mqpxn5mv5kavmd4lf1rwzq6fz7a5w-something-else";
        let bad = "/nix/store/not-a-store-path";
        let outputs = [
            ("a", Some(elsewhere)),
            ("b", Some(misnamed)),
            ("c", None),
            ("d", Some(bad)),
            ("ünïcode", Some("")),
        ];
        assert_eq!(round_trip(DRV, &outputs), owned(&outputs));
        for out in [None, Some(elsewhere), Some(misnamed)] {
            let outputs = [("out", out), ("dev", None)];
            assert_eq!(round_trip(DRV, &outputs), owned(&outputs));
        }
    }

    #[test]
    fn a_path_that_is_not_a_derivation_keeps_every_output_whole() {
        let out = usual("out");
        let outputs = [("out", Some(out.as_str()))];
        assert_eq!(round_trip("/nix/store/x", &outputs), owned(&outputs));
        assert_eq!(round_trip("", &outputs), owned(&outputs));
    }

    #[test]
    fn a_packed_derivation_keeps_its_system_outputs_and_keys() {
        let out = usual("out");
        let keys = BTreeMap::from([("lib".to_string(), "sha256:abc".to_string())]);
        let packed = PackedDrv::new(
            DRV,
            300,
            [("lib", None), ("out", Some(out.as_str()))],
            &keys,
        );
        assert_eq!(packed.system(), 300);
        let outputs: Vec<_> = packed
            .outputs(DRV)
            .map(|(n, p)| (n.to_owned(), p.map(Cow::into_owned)))
            .collect();
        assert_eq!(outputs, owned(&[("lib", None), ("out", Some(&out))]));
        assert_eq!(packed.keys(), keys);
        let plain = PackedDrv::new(DRV, 0, [("out", Some(out.as_str()))], &BTreeMap::new());
        assert!(plain.keys().is_empty());
        // system, count, tag, digest, no keys: 24 bytes, not ~100.
        assert_eq!(plain.0.len(), 1 + 1 + 1 + 20 + 1);
    }

    #[test]
    fn varints_round_trip() {
        for n in [0, 1, 127, 128, 300, 16_383, 16_384, usize::MAX] {
            let mut bytes = Vec::new();
            write_varint(&mut bytes, n);
            assert_eq!(Reader(&bytes).varint(), Some(n));
        }
    }
}
