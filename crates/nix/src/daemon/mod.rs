//! The Nix worker protocol ("daemon protocol"): a pure codec and a thin
//! async client over a Unix socket or a `nix-daemon --stdio` child.
//!
//! Protocol versions: the client offers 1.38 and works with daemons from
//! 1.34 (Nix 2.8) up; it uses the lower of the two versions, exchanges
//! features from 1.38 and implements `realisation-with-path-not-hash`
//! (Nix 2.35+). How each encoding was checked:
//!
//! - 1.34: Nix 2.8.0's `daemon.cc`/`remote-store.cc`, and every operation
//!   below but `AddPermRoot` against a real Nix 2.8 daemon in the tests
//!   (socket and stdio).
//! - 1.35–1.38: the sources of Nix 2.20 (1.37: CPU times, trust flag),
//!   2.24 (1.38: feature exchange), 2.34 (1.38 without the feature) and
//!   2.35/master (the feature); decoders were run over Nix's own
//!   characterization data for build results, path infos and realisations
//!   (1.28–1.38). 1.38 without the feature: every operation above against a
//!   real Nix 2.26 daemon in the tests (socket and stdio), as for 1.34.
//!   1.35–1.37 and the feature: a scripted peer only.
//!
//! | operation | code | notes |
//! |---|---|---|
//! | `IsValidPath` | 1 | all |
//! | `AddToStore` | 7 | 1.25+ form: method string, framed data, `ValidPathInfo` reply |
//! | `BuildPaths` | 9 | derived paths as strings (1.30+), build mode |
//! | `EnsurePath` | 10 | all |
//! | `AddTempRoot` | 11 | all |
//! | `AddIndirectRoot` | 12 | all |
//! | `SetOptions` | 19 | all |
//! | `QueryPathInfo` | 26 | validity flag (1.17+) then the unkeyed info |
//! | `QueryValidPaths` | 31 | substitute flag (1.27+) |
//! | `BuildDerivation` | 36 | result: timing 1.29+, CPU 1.37+, outputs by format |
//! | `NarFromPath` | 38 | NAR follows `STDERR_LAST` unframed |
//! | `AddToStoreNar` | 39 | framed NAR (1.23+) |
//! | `RegisterDrvOutput` | 42 | JSON realisation, or fields with the feature |
//! | `QueryRealisation` | 43 | set of JSON, or an optional with the feature |
//! | `BuildPathsWithResults` | 46 | 1.34+ |
//! | `AddPermRoot` | 47 | Nix 2.20+ (protocol 1.37+); refused below |
//!
//! `AddTextToStore` (8) is obsolete since 1.25; text files (`.drv`s) are
//! added with `AddToStore` and the method `text:sha256`, which every
//! supported daemon accepts.
//!
//! Layout: [`wire`] (primitives and limits), [`stderr`] (log and error
//! messages), [`handshake`], `types`/`build` (operation values), and
//! [`client`], the only part that does IO besides [`child_stderr`] (what a
//! daemon prints on its own stderr, forwarded to `tracing`).

pub mod build;
pub mod child_stderr;
pub mod client;
mod connection;
pub mod handshake;
pub mod stderr;
pub mod types;
pub mod wire;

use std::fmt;

use crate::store_path::StoreDir;

pub use build::{BuildResult, BuildStatus, BuiltOutput, DrvOutput, KeyedBuildResult, Realisation};
pub use client::{ClientError, DaemonClient};
pub use handshake::HandshakeError;
pub use stderr::{LogEvent, LogField, RemoteError};
pub use types::{
    BuildMode, ClientOptions, DaemonInfo, DerivedPath, OutputsSpec, PathInfo, Trust, Verbosity,
};
pub use wire::Limits;

/// The feature that switches realisations to `.drv`-path identifiers.
pub const FEATURE_REALISATION_WITH_PATH: &str = "realisation-with-path-not-hash";

/// A worker protocol version, `major.minor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProtocolVersion {
    pub major: u8,
    pub minor: u8,
}

impl ProtocolVersion {
    /// Nix 2.8.
    pub const MIN_SUPPORTED: ProtocolVersion = ProtocolVersion::new(1, 34);
    /// What this client offers.
    pub const LATEST: ProtocolVersion = ProtocolVersion::new(1, 38);

    pub const fn new(major: u8, minor: u8) -> Self {
        ProtocolVersion { major, minor }
    }

    pub const fn to_wire(self) -> u64 {
        ((self.major as u64) << 8) | self.minor as u64
    }

    /// `None` if the number has bits beyond major and minor.
    pub const fn from_wire(wire: u64) -> Option<Self> {
        if wire > 0xffff {
            return None;
        }
        Some(ProtocolVersion::new((wire >> 8) as u8, (wire & 0xff) as u8))
    }
}

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// What encodings depend on: the negotiated version and features, and the
/// store directory paths are printed in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireContext {
    pub version: ProtocolVersion,
    /// `realisation-with-path-not-hash` was negotiated.
    pub realisation_with_path: bool,
    pub store_dir: StoreDir,
}

/// Operation codes.
pub(crate) mod op {
    pub const IS_VALID_PATH: u64 = 1;
    pub const ADD_TO_STORE: u64 = 7;
    pub const BUILD_PATHS: u64 = 9;
    pub const ENSURE_PATH: u64 = 10;
    pub const ADD_TEMP_ROOT: u64 = 11;
    pub const ADD_INDIRECT_ROOT: u64 = 12;
    pub const SET_OPTIONS: u64 = 19;
    pub const QUERY_PATH_INFO: u64 = 26;
    pub const QUERY_VALID_PATHS: u64 = 31;
    pub const BUILD_DERIVATION: u64 = 36;
    pub const NAR_FROM_PATH: u64 = 38;
    pub const ADD_TO_STORE_NAR: u64 = 39;
    pub const REGISTER_DRV_OUTPUT: u64 = 42;
    pub const QUERY_REALISATION: u64 = 43;
    pub const BUILD_PATHS_WITH_RESULTS: u64 = 46;
    pub const ADD_PERM_ROOT: u64 = 47;
}
