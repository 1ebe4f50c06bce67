//! Small value types shared by events, commands and the graph: typed ids,
//! derivation paths, Hydra's status codes and the core's clock.
//!
//! Invariants: a [`DrvPath`] is cheap to clone (one shared `Arc<str>`), so the
//! step index and a step share one allocation per derivation; [`Status`]
//! codes are exactly the integers of Hydra's `buildStatus`/`BuildSteps.status`
//! columns; [`Millis`] is a monotonic instant chosen by the driver, never read
//! from the system clock inside the core.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// The hasher of the maps keyed by derivation paths (hundreds of
/// thousands of entries, looked up for every edge of a loaded closure):
/// foldhash, seeded per process, several times faster than SipHash on
/// paths of 60 bytes.
pub type PathHasher = foldhash::fast::RandomState;

/// A map keyed by derivation paths, with [`PathHasher`].
pub type PathMap<K, V> = std::collections::HashMap<K, V, PathHasher>;

/// A set of derivation paths, with [`PathHasher`].
pub type PathSet<K> = std::collections::HashSet<K, PathHasher>;

/// `Builds.id` of a Hydra build.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BuildId(pub i32);

/// `Jobsets.id`; kept on each build for scheduling shares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JobsetId(pub i32);

/// Identity of one connected builder, chosen by the driver. An id names one
/// connection: an agent that reconnects should get a fresh id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MachineId(pub u64);

impl fmt::Display for BuildId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

impl fmt::Display for MachineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "machine {}", self.0)
    }
}

/// Full store path of a derivation (`/nix/store/…-name.drv`).
///
/// Cloning shares the string; the core keeps exactly one allocation per
/// derivation it holds a step for.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DrvPath(Arc<str>);

impl DrvPath {
    pub fn new(path: impl Into<Arc<str>>) -> Self {
        DrvPath(path.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for DrvPath {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DrvPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DrvPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl From<&str> for DrvPath {
    fn from(path: &str) -> Self {
        DrvPath(path.into())
    }
}

impl From<String> for DrvPath {
    fn from(path: String) -> Self {
        DrvPath(path.into())
    }
}

/// Hydra's build and step status codes (`Builds.buildStatus`,
/// `BuildSteps.status`). Some apply to builds only, some to steps only; see
/// the contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    Success = 0,
    Failed = 1,
    /// Builds only: a dependency failed.
    DepFailed = 2,
    /// Infrastructure failure; may be retried.
    Aborted = 3,
    Cancelled = 4,
    /// Builds only: succeeded, but an output has `nix-support/failed`.
    FailedWithOutput = 6,
    TimedOut = 7,
    /// Steps only: the outputs are known to fail (`FailedPaths`).
    CachedFailure = 8,
    /// No machine can build this system and feature set.
    Unsupported = 9,
    LogLimitExceeded = 10,
    NarSizeLimitExceeded = 11,
    NotDeterministic = 12,
    /// Steps only: rewritten into a resolved derivation.
    Resolved = 13,
}

impl Status {
    /// The integer stored in the database.
    pub fn code(self) -> i32 {
        self as i32
    }

    /// A short lowercase name, for logs and traces.
    pub fn name(self) -> &'static str {
        match self {
            Status::Success => "succeeded",
            Status::Failed => "failed",
            Status::DepFailed => "dep-failed",
            Status::Aborted => "aborted",
            Status::Cancelled => "cancelled",
            Status::FailedWithOutput => "failed-with-output",
            Status::TimedOut => "timed-out",
            Status::CachedFailure => "cached-failure",
            Status::Unsupported => "unsupported",
            Status::LogLimitExceeded => "log-limit-exceeded",
            Status::NarSizeLimitExceeded => "nar-size-limit-exceeded",
            Status::NotDeterministic => "not-deterministic",
            Status::Resolved => "resolved",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a builder says an attempt at a step failed. Only failures a builder
/// can report exist here; `Unsupported` and `DepFailed` are decided by the
/// core itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StepFailure {
    /// The builder exited non-zero.
    Failed,
    /// Infrastructure failure (connection lost, disk full, …).
    Aborted,
    TimedOut,
    LogLimitExceeded,
    NarSizeLimitExceeded,
    NotDeterministic,
}

impl StepFailure {
    pub fn status(self) -> Status {
        match self {
            StepFailure::Failed => Status::Failed,
            StepFailure::Aborted => Status::Aborted,
            StepFailure::TimedOut => Status::TimedOut,
            StepFailure::LogLimitExceeded => Status::LogLimitExceeded,
            StepFailure::NarSizeLimitExceeded => Status::NarSizeLimitExceeded,
            StepFailure::NotDeterministic => Status::NotDeterministic,
        }
    }
}

/// An instant on the driver's monotonic clock, in milliseconds since an
/// epoch of the driver's choosing (typically its start).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Millis(pub u64);

impl Millis {
    pub const ZERO: Millis = Millis(0);

    pub fn from_secs(secs: u64) -> Self {
        Millis(secs.saturating_mul(1000))
    }

    /// `self + span`, saturating at the end of time.
    pub fn saturating_add(self, span: Duration) -> Self {
        let ms = u64::try_from(span.as_millis()).unwrap_or(u64::MAX);
        Millis(self.0.saturating_add(ms))
    }

    /// Time elapsed from `earlier` to `self`, zero if `earlier` is later.
    pub fn saturating_since(self, earlier: Millis) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 % 1000 == 0 {
            write!(f, "{}s", self.0 / 1000)
        } else {
            write!(f, "{}ms", self.0)
        }
    }
}
