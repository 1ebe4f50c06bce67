//! How the queue runner's binary logs and reports errors: the log
//! subscriber (level, format, colour) and the one-line error message.
//!
//! Invariants: logs go to stderr at info and above unless `RUST_LOG` says
//! otherwise; colour codes are written only to a terminal; an error's
//! causes are printed once each, in one line.

use std::io::IsTerminal;

/// The format of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// The default filter: our own crates and the rest at info, sqlx's
/// per-statement chatter only when slow enough to warn.
const DEFAULT_FILTER: &str = "info,sqlx=warn";

/// Installs the global subscriber. `RUST_LOG`, when set and valid, replaces
/// the default filter.
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
}

/// The error and its causes in one line, each cause once: a cause whose
/// text the message already holds (because a layer printed its source) is
/// not repeated.
pub fn error_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = one_line(&cause.to_string());
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

fn one_line(s: &str) -> String {
    s.lines().map(str::trim).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("reading the token file t: {source}")]
    struct ReadError {
        source: std::io::Error,
    }

    #[test]
    fn a_cause_already_in_the_message_is_printed_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory");
        let err = anyhow::Error::new(ReadError { source: io }).context("starting");
        assert_eq!(
            error_line(&err),
            "starting: reading the token file t: No such file or directory"
        );
    }

    #[test]
    fn repeated_context_is_printed_once() {
        let err = anyhow::anyhow!("connection refused")
            .context("starting the embedded PostgreSQL")
            .context("starting the embedded PostgreSQL");
        assert_eq!(
            error_line(&err),
            "starting the embedded PostgreSQL: connection refused"
        );
    }
}
