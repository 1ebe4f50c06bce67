//! The pure steps of the worker-protocol handshake.
//!
//! 1. Client: `WORKER_MAGIC_1`, its version. Daemon: `WORKER_MAGIC_2`, its
//!    version. Both use the lower of the two from then on.
//! 2. From 1.38: client sends its feature set, daemon its own; the
//!    intersection is in force.
//! 3. Client: obsolete CPU affinity (`0`) and reserve-space (`false`).
//! 4. Daemon: its Nix version (1.33+) and whether it trusts us (1.35+),
//!    then stderr messages up to `STDERR_LAST`.
//!
//! Invariants: a daemon that is not a Nix daemon, or whose protocol is
//! older than [`ProtocolVersion::MIN_SUPPORTED`], is refused with a
//! [`HandshakeError`] before anything else is sent.

use std::collections::BTreeSet;

use thiserror::Error;

use super::types::Trust;
use super::wire::{DecodeError, Malformed, WireReader, WireWriter};
use super::ProtocolVersion;

pub const WORKER_MAGIC_1: u64 = 0x6e69_7863;
pub const WORKER_MAGIC_2: u64 = 0x6478_696f;

/// The protocol features this client implements and offers.
pub const CLIENT_FEATURES: &[&str] = &[super::FEATURE_REALISATION_WITH_PATH];

/// Why the daemon's greeting is unacceptable.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HandshakeError {
    #[error("the peer is not a Nix daemon: it greeted with {0:#x}")]
    BadMagic(u64),
    #[error("the Nix daemon speaks protocol major version {0}, not 1")]
    UnsupportedMajor(u64),
    #[error(
        "the Nix daemon speaks protocol {0}, older than {min} (Nix 2.8), the oldest this client supports",
        min = ProtocolVersion::MIN_SUPPORTED
    )]
    TooOld(ProtocolVersion),
}

/// Step 1, client side.
pub fn encode_hello(w: &mut WireWriter, ours: ProtocolVersion) {
    w.u64(WORKER_MAGIC_1).u64(ours.to_wire());
}

/// Step 1, the daemon's reply: its version.
pub fn decode_daemon_hello(
    r: &mut WireReader<'_>,
) -> Result<Result<ProtocolVersion, HandshakeError>, DecodeError> {
    let magic = r.u64()?;
    if magic != WORKER_MAGIC_2 {
        return Ok(Err(HandshakeError::BadMagic(magic)));
    }
    let wire = r.u64()?;
    Ok(ProtocolVersion::from_wire(wire).ok_or(HandshakeError::UnsupportedMajor(wire >> 8)))
}

/// The version both sides use.
pub fn negotiate(
    ours: ProtocolVersion,
    theirs: ProtocolVersion,
) -> Result<ProtocolVersion, HandshakeError> {
    if theirs.major != 1 {
        return Err(HandshakeError::UnsupportedMajor(u64::from(theirs.major)));
    }
    let version = ours.min(theirs);
    if version < ProtocolVersion::MIN_SUPPORTED {
        return Err(HandshakeError::TooOld(version));
    }
    Ok(version)
}

/// Whether step 2 happens at `version`.
pub fn exchanges_features(version: ProtocolVersion) -> bool {
    version >= ProtocolVersion::new(1, 38)
}

/// Step 2, client side.
pub fn encode_features(w: &mut WireWriter) {
    w.strings(CLIENT_FEATURES.iter());
}

/// Step 2, the daemon's features, intersected with ours.
pub fn decode_features(r: &mut WireReader<'_>) -> Result<BTreeSet<String>, DecodeError> {
    Ok(r.strings("daemon features")?
        .into_iter()
        .filter(|f| CLIENT_FEATURES.contains(&f.as_str()))
        .collect())
}

/// Step 3.
pub fn encode_client_info(w: &mut WireWriter) {
    // Both fields exist since 1.14 and 1.11, below the minimum we support.
    w.u64(0).bool(false);
}

/// Step 4, before the stderr messages: Nix version and trust.
pub fn decode_daemon_info(
    r: &mut WireReader<'_>,
    version: ProtocolVersion,
) -> Result<(Option<String>, Option<Trust>), DecodeError> {
    let nix_version = if version >= ProtocolVersion::new(1, 33) {
        Some(r.string_lossy("daemon Nix version")?)
    } else {
        None
    };
    let trust = if version >= ProtocolVersion::new(1, 35) {
        match r.u64()? {
            0 => None,
            1 => Some(Trust::Trusted),
            2 => Some(Trust::NotTrusted),
            other => {
                return Err(Malformed::OutOfRange {
                    what: "daemon trust flag",
                    value: other,
                }
                .into())
            }
        }
    } else {
        None
    };
    Ok((nix_version, trust))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiates_the_lower_version_and_refuses_old_daemons() {
        let v = ProtocolVersion::new;
        assert_eq!(negotiate(v(1, 38), v(1, 34)), Ok(v(1, 34)));
        assert_eq!(negotiate(v(1, 38), v(1, 39)), Ok(v(1, 38)));
        assert_eq!(
            negotiate(v(1, 38), v(1, 33)),
            Err(HandshakeError::TooOld(v(1, 33)))
        );
        assert_eq!(
            negotiate(v(1, 38), v(2, 0)),
            Err(HandshakeError::UnsupportedMajor(2))
        );
    }

    #[test]
    fn trust_flag_only_from_1_35() {
        let mut w = WireWriter::new();
        w.str("2.24.0").u64(1);
        let bytes = w.into_bytes();
        let at_34 = decode_daemon_info(
            &mut WireReader::new(&bytes, Default::default()),
            ProtocolVersion::new(1, 34),
        );
        assert_eq!(at_34, Ok((Some("2.24.0".into()), None)));
        let at_35 = decode_daemon_info(
            &mut WireReader::new(&bytes, Default::default()),
            ProtocolVersion::new(1, 35),
        );
        assert_eq!(at_35, Ok((Some("2.24.0".into()), Some(Trust::Trusted))));
    }
}
