//! Results into Hydra's tables: `BuildSteps` and `BuildStepOutputs` as
//! steps run and finish, the result columns of `Builds` with
//! `BuildOutputs`, `BuildProducts` and `BuildMetrics` when builds finish,
//! and `FailedPaths`. Exactly what the contract names, and nothing of
//! Hydra's tables beyond it.
//!
//! Invariants:
//! - `stepnr` is `max + 1` per build, allocated by the insert itself and
//!   retried on conflict, so concurrent inserts for one build (from any
//!   number of connections, inside transactions or not) get distinct,
//!   gap-free numbers.
//! - A busy step has a phase and a NULL status; a finished one has busy 0
//!   and a status. Status 13 is only ever written together with
//!   `resolvedDrvPath` ([`mark_step_resolved`]).
//! - A build is finished at most once: the update requires `finished = 0`,
//!   so a build cancelled meanwhile is left alone and reported as such.
//!   Finishing sets `startTime` and `stopTime` (both non-zero, checked here
//!   before the database's constraint would refuse them) and
//!   `notificationPendingSince = stopTime`.
//! - Every function that writes several statements runs them in one
//!   transaction, or in a savepoint when the caller's connection is already
//!   in one; callers that finish a batch of builds use [`finish_builds`] or
//!   their own transaction around these calls, with the notifications.
//!
//! `steps` writes `BuildSteps` and `FailedPaths`; `builds` writes the
//! result columns of `Builds` and its outputs, products and metrics;
//! `attempts` our own `SluiceAttempts`, the attempt behind each busy step;
//! `realisations` our own `SluiceRealisations`, what content-addressed
//! outputs became; `build_times` our own `SluiceBuildTimes`, how long
//! derivations of each name take.

use std::collections::BTreeMap;

use sluice_core::Status;
use sqlx::{Connection, PgConnection};

use crate::nix_support::{BuildMetric, BuildProduct};

mod attempts;
mod build_times;
mod builds;
mod realisations;
mod steps;

pub use attempts::*;
pub use build_times::*;
pub use builds::*;
pub use realisations::*;
pub use steps::*;

/// Why a result was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum ResultsError {
    #[error("{what}: {}", super::describe_sqlx_error(.source))]
    Database {
        what: String,
        #[source]
        source: sqlx::Error,
    },
    /// The caller passed something the contract does not allow; nothing
    /// was written.
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
    #[error("{op} step {stepnr} of build {build}: no such step")]
    NoSuchStep {
        op: &'static str,
        build: i32,
        stepnr: i32,
    },
    /// The step finished or was aborted meanwhile.
    #[error("updating the phase of step {stepnr} of build {build}: the step is not busy")]
    StepNotBusy { build: i32, stepnr: i32 },
    #[error("creating a step of build {build}: no free step number after {attempts} attempts")]
    StepNumberContention { build: i32, attempts: u32 },
}

/// The most keys a lookup sends in one query: a pooled connection keeps
/// its buffer as large as the largest message it ever sent, and a load's
/// first batch of a big queue can name some 140,000 paths (17 MB in one
/// query).
const LOOKUP_CHUNK: usize = 4096;

fn db_err(what: &str) -> impl FnOnce(sqlx::Error) -> ResultsError + '_ {
    move |source| ResultsError::Database {
        what: what.to_owned(),
        source,
    }
}

fn invalid(what: &str, reason: impl Into<String>) -> ResultsError {
    ResultsError::Invalid {
        what: what.to_owned(),
        reason: reason.into(),
    }
}

/// A time for an `integer` column: positive and within 32 bits.
fn db_time(what: &str, field: &str, secs: i64) -> Result<i32, ResultsError> {
    match i32::try_from(secs) {
        Ok(t) if t > 0 => Ok(t),
        _ => Err(invalid(
            what,
            format!("{field} {secs} is not a positive 32-bit unix time"),
        )),
    }
}

fn db_time_opt(what: &str, field: &str, secs: Option<i64>) -> Result<Option<i32>, ResultsError> {
    secs.map(|s| db_time(what, field, s)).transpose()
}

/// A byte count for a `bigint` column.
fn db_size(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_round_trip_through_their_codes() {
        for phase in [
            StepPhase::Preparing,
            StepPhase::Connecting,
            StepPhase::SendingInputs,
            StepPhase::Building,
            StepPhase::WaitingForLocalSlot,
            StepPhase::ReceivingOutputs,
            StepPhase::PostProcessing,
        ] {
            let code = u32::try_from(phase.code()).expect("positive");
            assert_eq!(StepPhase::from_code(code), Some(phase));
        }
        assert_eq!(StepPhase::from_code(0), None);
        assert_eq!(StepPhase::from_code(2), None);
        assert_eq!(StepPhase::from_code(u32::MAX), None);
    }

    #[test]
    fn times_must_be_positive_32_bit() {
        assert_eq!(db_time("t", "start", 1).ok(), Some(1));
        assert!(db_time("t", "start", 0).is_err());
        assert!(db_time("t", "start", -5).is_err());
        assert!(db_time("t", "start", i64::from(i32::MAX) + 1).is_err());
    }
}
