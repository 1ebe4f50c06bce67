//! The daemon's "stderr" channel: the messages it interleaves with replies
//! while it works on an operation (log lines, activities, data requests),
//! ending in `STDERR_LAST` (success) or `STDERR_ERROR` (failure).
//!
//! Build output arrives as `STDERR_RESULT` messages of type
//! [`RESULT_BUILD_LOG_LINE`] on the build's activity, one per line;
//! `STDERR_NEXT` carries the daemon's own messages.
//!
//! Invariants: decoding a message consumes it whole or not at all; only the
//! error format of protocol >= 1.26 is understood (older daemons are refused
//! at the handshake).

use thiserror::Error;

use super::wire::{capped, DecodeError, Malformed, WireReader};

pub const STDERR_NEXT: u64 = 0x6f6c_6d67;
pub const STDERR_READ: u64 = 0x6461_7461;
pub const STDERR_WRITE: u64 = 0x6461_7416;
pub const STDERR_LAST: u64 = 0x616c_7473;
pub const STDERR_ERROR: u64 = 0x6378_7470;
pub const STDERR_START_ACTIVITY: u64 = 0x5354_5254;
pub const STDERR_STOP_ACTIVITY: u64 = 0x5354_4f50;
pub const STDERR_RESULT: u64 = 0x5253_4c54;

/// Activity type of a build (`actBuild`); its fields are the `.drv` path,
/// the machine, and the round numbers.
pub const ACTIVITY_BUILD: u64 = 105;
/// Result type of one line of build output (`resBuildLogLine`).
pub const RESULT_BUILD_LOG_LINE: u64 = 101;
/// Result type of a build phase change (`resSetPhase`).
pub const RESULT_SET_PHASE: u64 = 104;
/// Result type of output from a post-build hook (`resPostBuildLogLine`).
pub const RESULT_POST_BUILD_LOG_LINE: u64 = 107;

/// A field of an activity or result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogField {
    Int(u64),
    String(String),
}

/// Something the daemon logged while working, delivered as it arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEvent {
    /// A message (`STDERR_NEXT`), without its trailing newline.
    Message(String),
    StartActivity {
        id: u64,
        level: u64,
        kind: u64,
        text: String,
        fields: Vec<LogField>,
        parent: u64,
    },
    StopActivity {
        id: u64,
    },
    Result {
        activity: u64,
        kind: u64,
        fields: Vec<LogField>,
    },
}

impl LogEvent {
    /// The line, if this is a line of build output.
    pub fn build_log_line(&self) -> Option<&str> {
        match self {
            LogEvent::Result {
                kind: RESULT_BUILD_LOG_LINE | RESULT_POST_BUILD_LOG_LINE,
                fields,
                ..
            } => match fields.first() {
                Some(LogField::String(line)) => Some(line),
                _ => None,
            },
            _ => None,
        }
    }
}

/// An error the daemon reported for an operation. The connection is still
/// usable after it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{message}")]
pub struct RemoteError {
    /// Nix's verbosity level of the error (0 = error).
    pub level: u64,
    pub message: String,
    /// Context lines ("while building …"), innermost first.
    pub traces: Vec<String>,
}

/// One message on the stderr channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StderrMessage {
    Log(LogEvent),
    /// The daemon wants up to this many bytes (only obsolete operations).
    Read(u64),
    /// The daemon sends data (only obsolete operations).
    Write(Vec<u8>),
    Last,
    Error(RemoteError),
}

fn fields(r: &mut WireReader<'_>) -> Result<Vec<LogField>, DecodeError> {
    let n = r.count("log fields")?;
    let mut out = Vec::with_capacity(capped(n));
    for _ in 0..n {
        match r.u64()? {
            0 => out.push(LogField::Int(r.u64()?)),
            1 => out.push(LogField::String(r.string_lossy("log field")?)),
            other => {
                return Err(Malformed::OutOfRange {
                    what: "log field type",
                    value: other,
                }
                .into())
            }
        }
    }
    Ok(out)
}

/// Decodes a `STDERR_ERROR` payload (protocol >= 1.26).
pub fn decode_error(r: &mut WireReader<'_>) -> Result<RemoteError, DecodeError> {
    let kind = r.string_lossy("error type")?;
    if kind != "Error" {
        return Err(Malformed::invalid("error type", format!("'{kind}' is not 'Error'")).into());
    }
    let level = r.u64()?;
    let _name = r.bytes("error name")?;
    let message = r.string_lossy("error message")?;
    if r.u64()? != 0 {
        return Err(Malformed::invalid("error position", "positions are not supported").into());
    }
    let n = r.count("error traces")?;
    let mut traces = Vec::with_capacity(capped(n));
    for _ in 0..n {
        if r.u64()? != 0 {
            return Err(Malformed::invalid("error position", "positions are not supported").into());
        }
        traces.push(r.string_lossy("error trace")?);
    }
    Ok(RemoteError {
        level,
        message,
        traces,
    })
}

/// Decodes one stderr message.
pub fn decode(r: &mut WireReader<'_>) -> Result<StderrMessage, DecodeError> {
    let code = r.u64()?;
    Ok(match code {
        STDERR_LAST => StderrMessage::Last,
        STDERR_ERROR => StderrMessage::Error(decode_error(r)?),
        STDERR_NEXT => {
            let mut s = r.string_lossy("log message")?;
            if s.ends_with('\n') {
                s.pop();
            }
            StderrMessage::Log(LogEvent::Message(s))
        }
        STDERR_START_ACTIVITY => {
            let id = r.u64()?;
            let level = r.u64()?;
            let kind = r.u64()?;
            let text = r.string_lossy("activity text")?;
            let fields = fields(r)?;
            let parent = r.u64()?;
            StderrMessage::Log(LogEvent::StartActivity {
                id,
                level,
                kind,
                text,
                fields,
                parent,
            })
        }
        STDERR_STOP_ACTIVITY => StderrMessage::Log(LogEvent::StopActivity { id: r.u64()? }),
        STDERR_RESULT => {
            let activity = r.u64()?;
            let kind = r.u64()?;
            let fields = fields(r)?;
            StderrMessage::Log(LogEvent::Result {
                activity,
                kind,
                fields,
            })
        }
        STDERR_READ => StderrMessage::Read(r.u64()?),
        STDERR_WRITE => StderrMessage::Write(r.bytes("stderr data")?.to_vec()),
        other => return Err(Malformed::UnknownMessage(other).into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::wire::{Limits, WireWriter};

    #[test]
    fn decodes_a_build_log_line() {
        let mut w = WireWriter::new();
        w.u64(STDERR_RESULT)
            .u64(7)
            .u64(RESULT_BUILD_LOG_LINE)
            .u64(1)
            .u64(1)
            .str("hello");
        let bytes = w.into_bytes();
        let msg = decode(&mut WireReader::new(&bytes, Limits::default())).expect("decodes");
        let StderrMessage::Log(ev) = msg else {
            panic!("expected a log event, got {msg:?}")
        };
        assert_eq!(ev.build_log_line(), Some("hello"));
    }

    #[test]
    fn decodes_an_error() {
        let mut w = WireWriter::new();
        w.u64(STDERR_ERROR)
            .str("Error")
            .u64(0)
            .str("Error")
            .str("builder failed")
            .u64(0)
            .u64(1)
            .u64(0)
            .str("while building x");
        let bytes = w.into_bytes();
        assert_eq!(
            decode(&mut WireReader::new(&bytes, Limits::default())),
            Ok(StderrMessage::Error(RemoteError {
                level: 0,
                message: "builder failed".into(),
                traces: vec!["while building x".into()],
            }))
        );
    }
}
