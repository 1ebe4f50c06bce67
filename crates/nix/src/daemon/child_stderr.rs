//! What a `nix-daemon` prints on its own stderr, as opposed to the log
//! and error messages it sends over the protocol ([`super::stderr`]).
//!
//! A daemon reports the failures of operations to its client over the
//! protocol. On stderr it prints only what it could not report there,
//! which is nearly always that the client went away: "error: unexpected
//! end-of-file" when the client closed the connection while the daemon was
//! reading from it (e.g. in the middle of the handshake, or of an
//! operation whose future was dropped), "writing to file: Broken pipe"
//! when it closed while the daemon was writing. A daemon serving a socket
//! prefixes what its per-connection workers print with "unexpected Nix
//! daemon error: ", and Nix colours "error:" with ANSI escapes when `TERM`
//! is set, even on a pipe. [`is_client_gone`] recognises these lines.
//!
//! For `nix-daemon --stdio` children of [`super::DaemonClient::spawn`],
//! the child's stderr is piped and [`forward`]ed to `tracing`, target
//! `nix_daemon::stderr`: a line saying that the client went away at
//! debug level, any other line at warn level.
//!
//! Invariant: a forwarded stderr is read until it closes, so the child
//! never blocks on a full pipe; a line longer than [`MAX_LINE`] bytes is
//! logged in pieces.

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

/// Longest piece of a line logged at once.
pub const MAX_LINE: usize = 16 * 1024;

/// What the daemon's per-connection workers put before their messages.
const WORKER_PREFIX: &str = "unexpected Nix daemon error: ";

/// The messages, after "error: ", of a daemon whose client closed the
/// connection.
const CLIENT_GONE: [&str; 3] = [
    "unexpected end-of-file",
    "writing to file: Broken pipe",
    "writing to file: Connection reset by peer",
];

/// `line` without ANSI escape sequences (`ESC [ parameters final`).
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            // Parameter and intermediate bytes, then one final byte.
            for c in chars.by_ref() {
                if ('\u{40}'..='\u{7e}').contains(&c) {
                    break;
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Whether a line a daemon printed on stderr only says that its client
/// closed the connection (see the module documentation).
pub fn is_client_gone(line: &str) -> bool {
    let plain = strip_ansi(line);
    let mut rest = plain.trim();
    while let Some(r) = rest.strip_prefix(WORKER_PREFIX) {
        rest = r;
    }
    let rest = rest.strip_prefix("error: ").unwrap_or(rest);
    CLIENT_GONE.contains(&rest)
}

/// Logs one line of a daemon's stderr (see the module documentation).
fn log_line(pid: Option<u32>, line: &str) {
    let line = line.trim_end();
    if line.is_empty() {
        return;
    }
    if is_client_gone(line) {
        tracing::debug!(target: "nix_daemon::stderr", ?pid, "{}", strip_ansi(line));
    } else {
        tracing::warn!(target: "nix_daemon::stderr", ?pid, "{}", strip_ansi(line));
    }
}

/// Reads `stderr`, the stderr of daemon process `pid`, until it closes,
/// logging each line; on a task of the current tokio runtime.
pub(crate) fn forward<R>(stderr: R, pid: Option<u32>)
where
    R: tokio::io::AsyncRead + Send + Unpin + 'static,
{
    tokio::spawn(async move {
        let mut reader = BufReader::new(stderr);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match (&mut reader)
                .take(MAX_LINE as u64)
                .read_until(b'\n', &mut buf)
                .await
            {
                Ok(0) => break,
                Ok(_) => log_line(pid, &String::from_utf8_lossy(&buf)),
                Err(e) => {
                    tracing::debug!(target: "nix_daemon::stderr", ?pid, error = %e, "reading the daemon's stderr failed");
                    break;
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_what_a_daemon_prints_when_its_client_goes_away() {
        // As captured from Nix 2.8 daemons with TERM set.
        for line in [
            "unexpected Nix daemon error: \u{1b}[31;1merror:\u{1b}[0m unexpected end-of-file",
            "unexpected Nix daemon error: \u{1b}[31;1merror:\u{1b}[0m writing to file: \u{1b}[35;1mBroken pipe\u{1b}[0m",
            "\u{1b}[31;1merror:\u{1b}[0m unexpected end-of-file\n",
            "error: unexpected end-of-file",
            "unexpected Nix daemon error: unexpected Nix daemon error: error: unexpected end-of-file",
        ] {
            assert!(is_client_gone(line), "{line:?}");
        }
        for line in [
            "error: getting status of '/nix/store/x': No such file or directory",
            "unexpected Nix daemon error: error: cannot open connection to remote store",
            "error: unexpected end-of-file while reading a NAR",
            "accepted connection from pid 12, user root (trusted)",
            "",
        ] {
            assert!(!is_client_gone(line), "{line:?}");
        }
    }

    #[test]
    fn strips_escape_sequences_only() {
        assert_eq!(
            strip_ansi("\u{1b}[31;1merror:\u{1b}[0m a [b] \u{1b}x"),
            "error: a [b] \u{1b}x"
        );
        assert_eq!(strip_ansi("unterminated \u{1b}[31"), "unterminated ");
    }

    #[tokio::test]
    async fn forwarding_reads_until_the_stream_closes() {
        let (mut w, r) = tokio::io::duplex(64);
        forward(r, None);
        // Far more than the pipe holds, in lines longer than a piece: the
        // writes only complete if the forwarder keeps reading.
        let line = "x".repeat(MAX_LINE * 2) + "\n";
        let write = async {
            use tokio::io::AsyncWriteExt;
            for _ in 0..4 {
                w.write_all(line.as_bytes()).await.expect("write");
            }
            w.write_all(b"error: unexpected end-of-file\n")
                .await
                .expect("write");
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), write)
            .await
            .expect("the forwarder drains the stream");
    }
}
