//! Values the worker protocol carries, other than build results: path
//! infos, derived paths, build options, content-address methods and the
//! wire form of a [`BasicDerivation`].
//!
//! Invariants: encoders write exactly what Nix's readers expect for every
//! version in `1.34..=1.38`; decoders check what they read (store paths
//! parse, hashes are SHA-256) and fail with [`Malformed`], never panic.

use std::collections::{BTreeMap, BTreeSet};

use crate::derivation::{fixed_output_path, BasicDerivation, DerivationOutput};
use crate::hash::{Base, Hash, HashAlgo};
use crate::store_path::{ContentAddressMethod, MakeStorePathError, StoreDir, StorePath};

use super::wire::{DecodeError, Malformed, WireReader, WireWriter};
use super::ProtocolVersion;

/// Metadata of a valid store path (Nix's `ValidPathInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    pub path: StorePath,
    pub deriver: Option<StorePath>,
    /// SHA-256 of the path's NAR.
    pub nar_hash: Hash,
    pub references: BTreeSet<StorePath>,
    /// Seconds since the epoch; 0 when unknown.
    pub registration_time: u64,
    pub nar_size: u64,
    /// Built locally rather than substituted.
    pub ultimate: bool,
    pub sigs: BTreeSet<String>,
    /// The content address (`fixed:r:sha256:…`, `text:sha256:…`), if any.
    pub ca: Option<String>,
}

impl PathInfo {
    /// A path info with no deriver, signatures or content address.
    pub fn new(path: StorePath, nar_hash: Hash, nar_size: u64) -> Self {
        PathInfo {
            path,
            deriver: None,
            nar_hash,
            references: BTreeSet::new(),
            registration_time: 0,
            nar_size,
            ultimate: false,
            sigs: BTreeSet::new(),
            ca: None,
        }
    }

    /// Decodes the fields after the path (`UnkeyedValidPathInfo`), as
    /// `QueryPathInfo` returns them.
    pub fn decode_unkeyed(
        r: &mut WireReader<'_>,
        dir: &StoreDir,
        path: StorePath,
    ) -> Result<PathInfo, DecodeError> {
        let deriver = r.opt_store_path(dir, "path info deriver")?;
        let nar_hash = r.sha256("path info narHash")?;
        let references = r.store_paths(dir, "path info references")?;
        let registration_time = r.u64_max("path info registration time", i64::MAX as u64)?;
        let nar_size = r.u64()?;
        // Every supported version (>= 1.16) carries the rest.
        let ultimate = r.bool()?;
        let sigs = r.strings("path info signatures")?.into_iter().collect();
        let ca = r.string("path info content address")?;
        Ok(PathInfo {
            path,
            deriver,
            nar_hash,
            references,
            registration_time,
            nar_size,
            ultimate,
            sigs,
            ca: (!ca.is_empty()).then_some(ca),
        })
    }

    /// Decodes a path and its info (`ValidPathInfo`), as `AddToStore` returns.
    pub fn decode_keyed(r: &mut WireReader<'_>, dir: &StoreDir) -> Result<PathInfo, DecodeError> {
        let path = r.store_path(dir, "path info path")?;
        Self::decode_unkeyed(r, dir, path)
    }

    /// Encodes the fields after the path.
    pub fn encode_unkeyed(&self, w: &mut WireWriter, dir: &StoreDir) {
        w.opt_store_path(dir, self.deriver.as_ref())
            .str(&self.nar_hash.format(Base::Base16, false))
            .store_paths(dir, &self.references)
            .u64(self.registration_time)
            .u64(self.nar_size)
            .bool(self.ultimate)
            .strings(&self.sigs)
            .str(self.ca.as_deref().unwrap_or(""));
    }
}

/// What to build: a store path to make valid, or outputs of a derivation.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum DerivedPath {
    Opaque(StorePath),
    Built {
        drv_path: StorePath,
        outputs: OutputsSpec,
    },
}

/// Which outputs of a derivation.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum OutputsSpec {
    All,
    /// Non-empty.
    Names(BTreeSet<String>),
}

impl DerivedPath {
    /// The wire form: `/nix/store/…` or `/nix/store/…drv!out,dev` (`!*` for all).
    pub fn to_wire(&self, dir: &StoreDir) -> String {
        match self {
            DerivedPath::Opaque(p) => dir.print(p),
            DerivedPath::Built { drv_path, outputs } => {
                let mut s = dir.print(drv_path);
                s.push('!');
                match outputs {
                    OutputsSpec::All => s.push('*'),
                    OutputsSpec::Names(names) => {
                        let names: Vec<&str> = names.iter().map(String::as_str).collect();
                        s.push_str(&names.join(","));
                    }
                }
                s
            }
        }
    }

    pub fn parse_wire(s: &str, dir: &StoreDir) -> Result<DerivedPath, Malformed> {
        let what = "derived path";
        let Some((drv, outputs)) = s.split_once('!') else {
            return dir
                .parse_path(s)
                .map(DerivedPath::Opaque)
                .map_err(|e| Malformed::invalid(what, e));
        };
        let drv_path = dir
            .parse_path(drv)
            .map_err(|e| Malformed::invalid(what, e))?;
        let outputs = if outputs == "*" {
            OutputsSpec::All
        } else {
            let names: BTreeSet<String> = outputs
                .split(',')
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
                .collect();
            if names.is_empty() {
                return Err(Malformed::invalid(what, format!("no outputs in '{s}'")));
            }
            OutputsSpec::Names(names)
        };
        Ok(DerivedPath::Built { drv_path, outputs })
    }
}

/// How a build treats existing outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BuildMode {
    #[default]
    Normal,
    /// Rebuild and replace corrupted outputs.
    Repair,
    /// Rebuild and compare with the existing outputs.
    Check,
}

impl BuildMode {
    pub fn to_wire(self) -> u64 {
        match self {
            BuildMode::Normal => 0,
            BuildMode::Repair => 1,
            BuildMode::Check => 2,
        }
    }
}

/// Nix's log levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Verbosity {
    Error = 0,
    Warn = 1,
    Notice = 2,
    #[default]
    Info = 3,
    Talkative = 4,
    Chatty = 5,
    Debug = 6,
    Vomit = 7,
}

/// Settings sent with `SetOptions`; they apply to the operations that
/// follow on the same connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientOptions {
    pub keep_failed: bool,
    pub keep_going: bool,
    pub try_fallback: bool,
    /// Log messages above this level are not sent.
    pub verbosity: Verbosity,
    pub max_build_jobs: u32,
    /// Seconds without output before a build is killed (0: no limit).
    pub max_silent_time: u32,
    pub verbose_build: bool,
    /// `NIX_BUILD_CORES` for builders (0: all).
    pub build_cores: u32,
    pub use_substitutes: bool,
    /// Seconds a build may run (setting `timeout`; `None`: the daemon's).
    pub build_timeout: Option<u64>,
    /// Bytes of log a build may write (setting `max-build-log-size`).
    pub max_log_size: Option<u64>,
    /// Any other settings, by Nix's name.
    pub overrides: BTreeMap<String, String>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            keep_failed: false,
            keep_going: false,
            try_fallback: false,
            verbosity: Verbosity::Info,
            max_build_jobs: 1,
            max_silent_time: 0,
            verbose_build: true,
            build_cores: 0,
            use_substitutes: false,
            build_timeout: None,
            max_log_size: None,
            overrides: BTreeMap::new(),
        }
    }
}

impl ClientOptions {
    /// The `SetOptions` arguments (after the op code).
    pub fn encode(&self, w: &mut WireWriter) {
        w.bool(self.keep_failed)
            .bool(self.keep_going)
            .bool(self.try_fallback)
            .u64(self.verbosity as u64)
            .u64(u64::from(self.max_build_jobs))
            .u64(u64::from(self.max_silent_time))
            .bool(true) // obsolete useBuildHook
            .u64(if self.verbose_build {
                Verbosity::Error as u64
            } else {
                Verbosity::Vomit as u64
            })
            .u64(0) // obsolete logType
            .u64(0) // obsolete printBuildTrace
            .u64(u64::from(self.build_cores))
            .bool(self.use_substitutes);
        let mut overrides = self.overrides.clone();
        if let Some(t) = self.build_timeout {
            overrides.insert("timeout".into(), t.to_string());
        }
        if let Some(s) = self.max_log_size {
            overrides.insert("max-build-log-size".into(), s.to_string());
        }
        w.u64(overrides.len() as u64);
        for (k, v) in &overrides {
            w.str(k).str(v);
        }
    }
}

/// The method string `AddToStore` takes: `text:sha256`, `fixed:<algo>` or
/// `fixed:r:<algo>`.
pub fn ca_method_wire(method: ContentAddressMethod, algo: HashAlgo) -> String {
    match method {
        ContentAddressMethod::Text => format!("text:{}", algo.name()),
        ContentAddressMethod::Flat => format!("fixed:{}", algo.name()),
        ContentAddressMethod::Recursive => format!("fixed:r:{}", algo.name()),
    }
}

/// Writes a derivation as `BuildDerivation` sends it: outputs as
/// (name, path, hash algorithm, hash) like the ATerm, then input sources,
/// platform, builder, arguments and environment.
pub fn encode_basic_derivation(
    w: &mut WireWriter,
    dir: &StoreDir,
    drv: &BasicDerivation,
) -> Result<(), MakeStorePathError> {
    w.u64(drv.outputs.len() as u64);
    for (name, output) in &drv.outputs {
        w.str(name);
        match output {
            DerivationOutput::InputAddressed { path } => {
                w.store_path(dir, path).str("").str("");
            }
            DerivationOutput::CAFixed { method, hash } => {
                let path = fixed_output_path(dir, *method, hash, &drv.name, name)?;
                w.store_path(dir, &path)
                    .str(&format!("{}{}", method.prefix(), hash.algo().name()))
                    .str(&hash.format(Base::Base16, false));
            }
            DerivationOutput::CAFloating { method, hash_algo } => {
                w.str("")
                    .str(&format!("{}{}", method.prefix(), hash_algo.name()))
                    .str("");
            }
            DerivationOutput::Deferred => {
                w.str("").str("").str("");
            }
            DerivationOutput::Impure { method, hash_algo } => {
                w.str("")
                    .str(&format!("{}{}", method.prefix(), hash_algo.name()))
                    .str("impure");
            }
        }
    }
    w.store_paths(dir, &drv.input_srcs)
        .str(&drv.platform)
        .str(&drv.builder)
        .strings(&drv.args);
    w.u64(drv.env.len() as u64);
    for (k, v) in &drv.env {
        w.str(k).str(v);
    }
    Ok(())
}

/// Trust the daemon reported in the handshake (protocol >= 1.35).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    Trusted,
    NotTrusted,
}

/// What the daemon said about itself during the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonInfo {
    /// The negotiated version: the lower of ours and the daemon's.
    pub version: ProtocolVersion,
    /// The daemon's own protocol version.
    pub daemon_version: ProtocolVersion,
    /// Features both sides support (protocol >= 1.38).
    pub features: BTreeSet<String>,
    /// The daemon's Nix version (`2.8.0`).
    pub nix_version: Option<String>,
    /// Whether the daemon trusts us; `None` when it does not say.
    pub trust: Option<Trust>,
}
