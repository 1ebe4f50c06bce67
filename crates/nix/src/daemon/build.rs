//! Build results and realisations on the wire, in both of their formats.
//!
//! Until Nix 2.35 a realisation is identified by the derivation's hash
//! modulo and an output name (`sha256:<hex>!out`) and travels as JSON;
//! Nix 2.35 and later negotiate the `realisation-with-path-not-hash` feature,
//! identify it by the `.drv` path and output name, and send plain fields
//! (and refuse `QueryRealisation`/`RegisterDrvOutput` without the feature).
//! Which format is used is decided by [`WireContext::realisation_with_path`].
//!
//! Invariants: decoding follows the negotiated version exactly (timing
//! fields from 1.29, built outputs from 1.28, CPU times from 1.37); unknown
//! status codes are kept as [`BuildStatus::Unknown`] rather than rejected.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::hash::{Base, Hash};
use crate::store_path::StorePath;

use super::types::DerivedPath;
use super::wire::{capped, DecodeError, Malformed, WireReader, WireWriter};
use super::{ProtocolVersion, WireContext};

/// How a build ended (Nix's `BuildResult::Status`, by wire number).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BuildStatus {
    Built,
    Substituted,
    AlreadyValid,
    PermanentFailure,
    InputRejected,
    OutputRejected,
    TransientFailure,
    CachedFailure,
    TimedOut,
    MiscFailure,
    DependencyFailed,
    LogLimitExceeded,
    NotDeterministic,
    ResolvesToAlreadyValid,
    NoSubstituters,
    /// A code this client does not know.
    Unknown(u64),
}

impl BuildStatus {
    pub fn from_wire(code: u64) -> BuildStatus {
        use BuildStatus::*;
        match code {
            0 => Built,
            1 => Substituted,
            2 => AlreadyValid,
            3 => PermanentFailure,
            4 => InputRejected,
            5 => OutputRejected,
            6 => TransientFailure,
            7 => CachedFailure,
            8 => TimedOut,
            9 => MiscFailure,
            10 => DependencyFailed,
            11 => LogLimitExceeded,
            12 => NotDeterministic,
            13 => ResolvesToAlreadyValid,
            14 => NoSubstituters,
            other => Unknown(other),
        }
    }

    pub fn to_wire(self) -> u64 {
        use BuildStatus::*;
        match self {
            Built => 0,
            Substituted => 1,
            AlreadyValid => 2,
            PermanentFailure => 3,
            InputRejected => 4,
            OutputRejected => 5,
            TransientFailure => 6,
            CachedFailure => 7,
            TimedOut => 8,
            MiscFailure => 9,
            DependencyFailed => 10,
            LogLimitExceeded => 11,
            NotDeterministic => 12,
            ResolvesToAlreadyValid => 13,
            NoSubstituters => 14,
            Unknown(code) => code,
        }
    }

    /// The outputs are valid afterwards.
    pub fn is_success(self) -> bool {
        matches!(
            self,
            BuildStatus::Built
                | BuildStatus::Substituted
                | BuildStatus::AlreadyValid
                | BuildStatus::ResolvesToAlreadyValid
        )
    }
}

/// One output a build produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltOutput {
    pub out_path: StorePath,
    pub signatures: BTreeSet<String>,
    /// The realisation id the daemon sent in the JSON format
    /// (`sha256:<hex>!<output>`); Nix 2.8 puts the derivation's hash modulo
    /// there, newer Nix a dummy hash. `None` with `realisation-with-path`.
    pub legacy_id: Option<String>,
}

/// The outcome of a build (`BuildResult`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildResult {
    pub status: BuildStatus,
    pub error_msg: String,
    /// How many times the derivation was built (more with `--repeat`).
    pub times_built: u64,
    /// Repeated builds differed.
    pub is_non_deterministic: bool,
    /// Seconds since the epoch; 0 when the build did not run.
    pub start_time: u64,
    pub stop_time: u64,
    /// CPU time of the builder (protocol >= 1.37, and only if measured).
    pub cpu_user: Option<Duration>,
    pub cpu_system: Option<Duration>,
    /// Outputs by name.
    pub built_outputs: BTreeMap<String, BuiltOutput>,
}

impl BuildResult {
    pub fn is_success(&self) -> bool {
        self.status.is_success()
    }

    pub fn decode(r: &mut WireReader<'_>, ctx: &WireContext) -> Result<BuildResult, DecodeError> {
        let status = BuildStatus::from_wire(r.u64()?);
        let error_msg = r.string_lossy("build result error message")?;
        let mut res = BuildResult {
            status,
            error_msg,
            times_built: 0,
            is_non_deterministic: false,
            start_time: 0,
            stop_time: 0,
            cpu_user: None,
            cpu_system: None,
            built_outputs: BTreeMap::new(),
        };
        if ctx.version >= ProtocolVersion::new(1, 29) {
            res.times_built = r.u64_max("build result timesBuilt", u64::from(u32::MAX))?;
            res.is_non_deterministic = r.bool()?;
            res.start_time = r.u64_max("build result start time", i64::MAX as u64)?;
            res.stop_time = r.u64_max("build result stop time", i64::MAX as u64)?;
        }
        if ctx.version >= ProtocolVersion::new(1, 37) {
            res.cpu_user = decode_opt_micros(r, "build result cpuUser")?;
            res.cpu_system = decode_opt_micros(r, "build result cpuSystem")?;
        }
        if ctx.realisation_with_path {
            let n = r.count("build result outputs")?;
            for _ in 0..n {
                let name = r.string("build result output name")?;
                let out_path = r.store_path(&ctx.store_dir, "build result output path")?;
                let signatures = r.strings("build result output signatures")?;
                res.built_outputs.insert(
                    name,
                    BuiltOutput {
                        out_path,
                        signatures: signatures.into_iter().collect(),
                        legacy_id: None,
                    },
                );
            }
        } else if ctx.version >= ProtocolVersion::new(1, 28) {
            let n = r.count("build result outputs")?;
            for _ in 0..n {
                let id = r.string("build result output id")?;
                let json = r.string("build result realisation")?;
                let Some((_, name)) = id.split_once('!') else {
                    return Err(Malformed::invalid(
                        "build result output id",
                        format!("'{id}' has no '!'"),
                    )
                    .into());
                };
                let parsed = RealisationJson::parse(&json, "build result realisation")?;
                res.built_outputs.insert(
                    name.to_owned(),
                    BuiltOutput {
                        out_path: parsed.out_path()?,
                        signatures: parsed.signatures,
                        legacy_id: Some(id.clone()),
                    },
                );
            }
        }
        Ok(res)
    }
}

impl BuildResult {
    /// Encodes as a daemon would at `ctx` (for tests and fakes). Fields the
    /// version lacks are left out; outputs without a legacy id get Nix's
    /// dummy one.
    pub fn encode(&self, w: &mut WireWriter, ctx: &WireContext) {
        w.u64(self.status.to_wire()).str(&self.error_msg);
        if ctx.version >= ProtocolVersion::new(1, 29) {
            w.u64(self.times_built)
                .bool(self.is_non_deterministic)
                .u64(self.start_time)
                .u64(self.stop_time);
        }
        if ctx.version >= ProtocolVersion::new(1, 37) {
            for t in [self.cpu_user, self.cpu_system] {
                match t {
                    None => w.u64(0),
                    Some(d) => w
                        .u64(1)
                        .u64(u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
                };
            }
        }
        if ctx.realisation_with_path {
            w.u64(self.built_outputs.len() as u64);
            for (name, out) in &self.built_outputs {
                w.str(name)
                    .store_path(&ctx.store_dir, &out.out_path)
                    .strings(&out.signatures);
            }
        } else if ctx.version >= ProtocolVersion::new(1, 28) {
            w.u64(self.built_outputs.len() as u64);
            for (name, out) in &self.built_outputs {
                let id = out
                    .legacy_id
                    .clone()
                    .unwrap_or_else(|| format!("sha256:{}!{name}", "0".repeat(64)));
                let json = serde_json::json!({ "id": id, "outPath": out.out_path.base_name() });
                w.str(&id).str(&json.to_string());
            }
        }
    }
}

fn decode_opt_micros(
    r: &mut WireReader<'_>,
    what: &'static str,
) -> Result<Option<Duration>, DecodeError> {
    match r.u64()? {
        0 => Ok(None),
        1 => {
            let micros = r.u64_max(what, i64::MAX as u64)?;
            Ok(Some(Duration::from_micros(micros)))
        }
        tag => Err(Malformed::OutOfRange { what, value: tag }.into()),
    }
}

/// A build result with what was built (`BuildPathsWithResults`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyedBuildResult {
    pub path: DerivedPath,
    pub result: BuildResult,
}

impl KeyedBuildResult {
    pub fn decode(r: &mut WireReader<'_>, ctx: &WireContext) -> Result<Self, DecodeError> {
        let path = r.string("keyed build result path")?;
        let path = DerivedPath::parse_wire(&path, &ctx.store_dir)?;
        let result = BuildResult::decode(r, ctx)?;
        Ok(KeyedBuildResult { path, result })
    }

    pub fn encode(&self, w: &mut WireWriter, ctx: &WireContext) {
        w.str(&self.path.to_wire(&ctx.store_dir));
        self.result.encode(w, ctx);
    }

    pub fn decode_list(
        r: &mut WireReader<'_>,
        ctx: &WireContext,
    ) -> Result<Vec<Self>, DecodeError> {
        let n = r.count("build results")?;
        let mut out = Vec::with_capacity(capped(n));
        for _ in 0..n {
            out.push(Self::decode(r, ctx)?);
        }
        Ok(out)
    }
}

/// One output of one derivation, as the realisation operations name it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DrvOutput {
    /// By the derivation's hash modulo (daemons without
    /// `realisation-with-path-not-hash`, e.g. Nix 2.8).
    ByHash { drv_hash: Hash, output: String },
    /// By the `.drv` path (daemons with the feature, Nix >= 2.35).
    ByPath { drv_path: StorePath, output: String },
}

impl DrvOutput {
    pub fn output(&self) -> &str {
        match self {
            DrvOutput::ByHash { output, .. } | DrvOutput::ByPath { output, .. } => output,
        }
    }

    /// `sha256:<hex>!<output>`, for [`DrvOutput::ByHash`].
    pub fn legacy_id(&self) -> Option<String> {
        match self {
            DrvOutput::ByHash { drv_hash, output } => {
                Some(format!("{}!{output}", drv_hash.format(Base::Base16, true)))
            }
            DrvOutput::ByPath { .. } => None,
        }
    }

    fn parse_legacy(id: &str, what: &'static str) -> Result<DrvOutput, Malformed> {
        let (hash, output) = id
            .split_once('!')
            .ok_or_else(|| Malformed::invalid(what, format!("'{id}' has no '!'")))?;
        let drv_hash = Hash::parse_prefixed(hash).map_err(|e| Malformed::invalid(what, e))?;
        Ok(DrvOutput::ByHash {
            drv_hash,
            output: output.to_owned(),
        })
    }

    /// Encodes the id in the negotiated format; `None` if this variant
    /// cannot be expressed there.
    pub fn encode(&self, w: &mut WireWriter, ctx: &WireContext) -> Option<()> {
        match (self, ctx.realisation_with_path) {
            (DrvOutput::ByPath { drv_path, output }, true) => {
                w.store_path(&ctx.store_dir, drv_path).str(output);
                Some(())
            }
            (DrvOutput::ByHash { .. }, false) => {
                w.str(&self.legacy_id()?);
                Some(())
            }
            _ => None,
        }
    }
}

/// That an output of a derivation was built as a given path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Realisation {
    pub id: DrvOutput,
    pub out_path: StorePath,
    pub signatures: BTreeSet<String>,
    /// Legacy format only: realisations this one depends on, by legacy id.
    pub dependent_realisations: BTreeMap<String, StorePath>,
}

/// Nix's JSON form of a realisation (keys in the order Nix prints them).
#[derive(Debug, Serialize, Deserialize)]
struct RealisationJson {
    #[serde(rename = "dependentRealisations", default)]
    dependent_realisations: BTreeMap<String, String>,
    id: String,
    #[serde(rename = "outPath")]
    out_path: String,
    #[serde(default)]
    signatures: BTreeSet<String>,
}

impl RealisationJson {
    fn parse(json: &str, what: &'static str) -> Result<RealisationJson, Malformed> {
        serde_json::from_str(json).map_err(|e| Malformed::invalid(what, e))
    }

    /// `outPath` is a base name in this format.
    fn out_path(&self) -> Result<StorePath, Malformed> {
        StorePath::from_base_name(&self.out_path)
            .map_err(|e| Malformed::invalid("realisation outPath", e))
    }

    fn into_realisation(self) -> Result<Realisation, Malformed> {
        let out_path = self.out_path()?;
        let id = DrvOutput::parse_legacy(&self.id, "realisation id")?;
        let mut deps = BTreeMap::new();
        for (k, v) in self.dependent_realisations {
            let p = StorePath::from_base_name(&v)
                .map_err(|e| Malformed::invalid("realisation dependency", e))?;
            deps.insert(k, p);
        }
        Ok(Realisation {
            id,
            out_path,
            signatures: self.signatures,
            dependent_realisations: deps,
        })
    }
}

impl Realisation {
    /// Encodes for `RegisterDrvOutput`; `None` if the id's kind does not
    /// match the negotiated format.
    pub fn encode(&self, w: &mut WireWriter, ctx: &WireContext) -> Option<()> {
        if ctx.realisation_with_path {
            self.id.encode(w, ctx)?;
            w.store_path(&ctx.store_dir, &self.out_path)
                .strings(&self.signatures);
        } else {
            let json = RealisationJson {
                dependent_realisations: self
                    .dependent_realisations
                    .iter()
                    .map(|(k, v)| (k.clone(), v.base_name().to_owned()))
                    .collect(),
                id: self.id.legacy_id()?,
                out_path: self.out_path.base_name().to_owned(),
                signatures: self.signatures.clone(),
            };
            // Serialising plain strings and maps cannot fail.
            w.str(&serde_json::to_string(&json).ok()?);
        }
        Some(())
    }

    /// Decodes the `QueryRealisation` reply for `id`.
    pub fn decode_query_reply(
        r: &mut WireReader<'_>,
        ctx: &WireContext,
        id: &DrvOutput,
    ) -> Result<Option<Realisation>, DecodeError> {
        if ctx.realisation_with_path {
            match r.u64()? {
                0 => Ok(None),
                1 => {
                    let out_path = r.store_path(&ctx.store_dir, "realisation outPath")?;
                    let signatures = r.strings("realisation signatures")?;
                    Ok(Some(Realisation {
                        id: id.clone(),
                        out_path,
                        signatures: signatures.into_iter().collect(),
                        dependent_realisations: BTreeMap::new(),
                    }))
                }
                tag => Err(Malformed::OutOfRange {
                    what: "optional realisation tag",
                    value: tag,
                }
                .into()),
            }
        } else {
            // A set of JSON realisations with at most one element.
            let n = r.count("realisations")?;
            let mut first = None;
            for _ in 0..n {
                let json = r.string("realisation")?;
                let parsed = RealisationJson::parse(&json, "realisation")?.into_realisation()?;
                first.get_or_insert(parsed);
            }
            Ok(first)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store_path::StoreDir;

    fn ctx(minor: u8, with_path: bool) -> WireContext {
        WireContext {
            version: ProtocolVersion::new(1, minor),
            realisation_with_path: with_path,
            store_dir: StoreDir::default(),
        }
    }

    const OUT: &str = "/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo";

    #[test]
    fn build_result_fields_follow_the_version() {
        let mut w = WireWriter::new();
        w.u64(8)
            .str("timed out")
            .u64(1)
            .bool(false)
            .u64(100)
            .u64(200);
        w.u64(1).u64(1500).u64(0); // 1.37: cpuUser = 1.5 ms, cpuSystem unknown
        w.u64(1)
            .str("sha256:0000000000000000000000000000000000000000000000000000000000000000!out")
            .str(r#"{"id":"sha256:0000000000000000000000000000000000000000000000000000000000000000!out","outPath":"g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo"}"#);
        let bytes = w.into_bytes();
        let res = BuildResult::decode(
            &mut WireReader::new(&bytes, Default::default()),
            &ctx(37, false),
        )
        .expect("decodes");
        assert_eq!(res.status, BuildStatus::TimedOut);
        assert_eq!(res.error_msg, "timed out");
        assert_eq!(
            (res.times_built, res.start_time, res.stop_time),
            (1, 100, 200)
        );
        assert_eq!(res.cpu_user, Some(Duration::from_micros(1500)));
        assert_eq!(res.cpu_system, None);
        let out = &res.built_outputs["out"];
        assert_eq!(StoreDir::default().print(&out.out_path), OUT);

        // At 1.34 the CPU times are absent: the same bytes are misread, and
        // the decoder notices rather than inventing values.
        let at_34 = BuildResult::decode(
            &mut WireReader::new(&bytes, Default::default()),
            &ctx(34, false),
        );
        assert!(at_34.is_err());
    }

    #[test]
    fn realisation_with_path_format() {
        let drv_path =
            StorePath::from_base_name("g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo.drv").expect("path");
        let real = Realisation {
            id: DrvOutput::ByPath {
                drv_path,
                output: "out".into(),
            },
            out_path: StorePath::from_base_name("g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo")
                .expect("path"),
            signatures: BTreeSet::new(),
            dependent_realisations: BTreeMap::new(),
        };
        let c = ctx(38, true);
        let mut w = WireWriter::new();
        assert!(real.encode(&mut w, &c).is_some());
        let mut expected = WireWriter::new();
        expected
            .str("/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo.drv")
            .str("out")
            .str(OUT)
            .u64(0);
        assert_eq!(w.as_bytes(), expected.as_bytes());
        // A by-path id cannot be sent in the JSON format.
        assert!(real
            .encode(&mut WireWriter::new(), &ctx(38, false))
            .is_none());
    }
}
