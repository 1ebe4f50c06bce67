//! The report `submit --wait` prints for a build that did not succeed:
//! its status, the step that failed (followed to the build it really ran
//! under), that step's error and exit code, and the end of its log.
//!
//! Made in three parts so that the formatting is tested without IO: the
//! database adapter finds the failed step ([`evaluator::failed_step`]),
//! [`read_log_tail`] reads the end of its log, and [`format_failure`] turns
//! plain data into text. Log lines and error messages come from builders:
//! ANSI escape sequences are removed from them and other control
//! characters escaped before they reach a terminal.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use sluice_nix::daemon::child_stderr::strip_ansi;
use sqlx::PgPool;

use super::{status_name, BuildState, FailedStep, SubmitError};
use crate::db::evaluator;

/// How many lines of a failed step's log the report shows.
pub const LOG_TAIL_LINES: usize = 20;

/// At most this many bytes are read from the end of a log: enough for
/// [`LOG_TAIL_LINES`] lines of any sensible length, however large the log.
const LOG_TAIL_BYTES: u64 = 64 * 1024;

/// A log line longer than this is cut in the report.
const MAX_LINE_CHARS: usize = 1000;

/// What was found of a step's log, for [`format_failure`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepLog {
    /// The plain log file and its last lines (at most [`LOG_TAIL_LINES`]).
    Tail { path: PathBuf, lines: Vec<String> },
    /// No plain file, but a compressed one the web UI can show.
    Compressed { path: PathBuf },
    /// No log file at all at the contract's path.
    Missing { path: PathBuf },
    /// The file exists but could not be read.
    Unreadable { path: PathBuf, error: String },
    /// The step's derivation path gives no log path.
    NoPath { error: String },
}

/// Reads the last `lines` lines of the log of `drv_path` under `data_dir`
/// (see [`crate::logs::log_path`]), reading no more than the end of the
/// file.
pub fn read_log_tail(data_dir: &Path, drv_path: &str, lines: usize) -> StepLog {
    let path = match crate::logs::log_path(data_dir, drv_path) {
        Ok(path) => path,
        Err(e) => {
            return StepLog::NoPath {
                error: e.to_string(),
            }
        }
    };
    let mut file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            for ext in ["bz2", "zst"] {
                let mut name = path.clone().into_os_string();
                name.push(".");
                name.push(ext);
                let compressed = PathBuf::from(name);
                if compressed.is_file() {
                    return StepLog::Compressed { path: compressed };
                }
            }
            return StepLog::Missing { path };
        }
        Err(e) => {
            return StepLog::Unreadable {
                path,
                error: e.to_string(),
            }
        }
    };
    match tail_of(&mut file, lines) {
        Ok(lines) => StepLog::Tail { path, lines },
        Err(e) => StepLog::Unreadable {
            path,
            error: e.to_string(),
        },
    }
}

/// The last `lines` lines of `file`, from at most its last
/// [`LOG_TAIL_BYTES`] bytes (a line cut by that window is dropped).
fn tail_of(file: &mut std::fs::File, lines: usize) -> std::io::Result<Vec<String>> {
    let len = file.metadata()?.len();
    let start = len.saturating_sub(LOG_TAIL_BYTES);
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    file.take(LOG_TAIL_BYTES).read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    let mut all: Vec<&str> = text.lines().collect();
    if start > 0 && !all.is_empty() {
        all.remove(0);
    }
    let from = all.len().saturating_sub(lines);
    Ok(all[from..].iter().map(|l| l.to_string()).collect())
}

/// `text` made safe to print: ANSI escape sequences (`ESC [ … final`, as
/// Nix and many builders colour their output with) removed, other control
/// characters but tabs escaped (a builder's output must not drive the
/// reader's terminal), and cut after [`MAX_LINE_CHARS`] characters.
pub(super) fn printable(text: &str) -> String {
    let mut out = String::new();
    for (n, c) in strip_ansi(text).chars().enumerate() {
        if n == MAX_LINE_CHARS {
            out.push_str(" […]");
            break;
        }
        if c.is_control() && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The lines of a step's error message worth showing next to the log:
/// without the "last N log lines:" excerpt and the hint to run `nix log`
/// that Nix appends to a builder failure (the report shows the log itself,
/// which `nix log` could not find), and without escape sequences.
///
/// Nix 2.8 ends the message with `For full logs, run 'nix log <drv>'.`,
/// Nix 2.26 with `For full logs, run:` and the command indented on the
/// next line (`nix-store -l` instead of `nix log` without the `nix-command`
/// feature). Either way the line before the excerpt ends with `;`, which
/// goes too.
pub(crate) fn error_lines(error_msg: &str) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut in_excerpt = false;
    let mut command_follows = false;
    for raw in error_msg.trim().lines() {
        let line = printable(raw);
        let trimmed = line.trim();
        if command_follows {
            command_follows = false;
            if trimmed.starts_with("nix log ") || trimmed.starts_with("nix-store -l ") {
                continue;
            }
        }
        if trimmed.starts_with("last ") && trimmed.ends_with(" log lines:") {
            in_excerpt = true;
            if let Some(before) = lines.last_mut() {
                if let Some(cut) = before.strip_suffix(';') {
                    *before = cut.to_string();
                }
            }
            continue;
        }
        if in_excerpt && trimmed.starts_with('>') {
            continue;
        }
        in_excerpt = false;
        if trimmed == "For full logs, run:" {
            command_follows = true;
            continue;
        }
        if trimmed.starts_with("For full logs, run ") || trimmed.is_empty() {
            continue;
        }
        lines.push(trimmed.to_string());
    }
    if let Some(last) = lines.last_mut() {
        if let Some(cut) = last.strip_suffix(';') {
            *last = cut.to_string();
        }
    }
    lines
}

/// The exit code in a Nix error message such as "builder for '…' failed
/// with exit code 1".
pub fn exit_code(error_msg: &str) -> Option<i32> {
    let (_, rest) = error_msg.rsplit_once("exit code ")?;
    let digits: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '-')
        .collect();
    digits.parse().ok()
}

/// The report for a build that finished without success: its status, the
/// step that failed (`step`, from [`evaluator::failed_step`]) and that
/// step's log (`log`, from [`read_log_tail`]). One line per fact, the
/// first naming the build; every line ends with a newline.
pub fn format_failure(
    build: &BuildState,
    step: Option<&FailedStep>,
    log: Option<&StepLog>,
) -> String {
    let mut out = String::new();
    let mut line = |text: String| {
        out.push_str(&text);
        out.push('\n');
    };
    let code = build.status.unwrap_or(-1);
    line(format!(
        "build {} ({}): {}",
        build.id,
        printable(&build.job),
        status_name(code)
    ));
    let Some(step) = step else {
        line("  no failed step is recorded for this build".into());
        return out;
    };
    let whose = if step.build == build.id {
        format!("step {}", step.stepnr)
    } else {
        format!(
            "step {} of build {}, whose failure this build inherited",
            step.stepnr, step.build
        )
    };
    // A build that failed with output (6) has no failed step: its own
    // step, which succeeded, is the one to look at.
    let label = if step.status == 0 {
        "step"
    } else {
        "failed step"
    };
    line(format!(
        "  {label}: {} ({whose}): {}",
        printable(&step.drv_path),
        status_name(step.status)
    ));
    if let Some(origin) = step.propagated_from {
        line(format!(
            "  propagated from build {origin}, which has no failed step for this derivation"
        ));
    }
    if !step.machine.is_empty() {
        line(format!("  machine: {}", printable(&step.machine)));
    }
    let errors = error_lines(step.error_msg.as_deref().unwrap_or(""));
    if let Some(code) = errors.first().and_then(|first| exit_code(first)) {
        line(format!("  exit code: {code}"));
    }
    for (n, text) in errors.iter().enumerate() {
        let label = if n == 0 { "  error: " } else { "         " };
        line(format!("{label}{text}"));
    }
    match log {
        None => {}
        Some(StepLog::Tail { path, lines }) if lines.is_empty() => {
            line(format!("  log: {} (empty)", path.display()));
        }
        Some(StepLog::Tail { path, lines }) => {
            line(format!("  log: {}", path.display()));
            line(format!("  last {} lines of the log:", lines.len()));
            for l in lines {
                line(format!("    {}", printable(l)));
            }
        }
        Some(StepLog::Compressed { path }) => {
            line(format!("  log: {} (compressed; not shown)", path.display()));
        }
        Some(StepLog::Missing { path }) => {
            line(format!("  log: none; no file at {}", path.display()));
        }
        Some(StepLog::Unreadable { path, error }) => {
            line(format!("  log: {} cannot be read: {error}", path.display()));
        }
        Some(StepLog::NoPath { error }) => line(format!("  log: none ({error})")),
    }
    out
}

/// The report of [`format_failure`] for a finished build, from the
/// database and the logs under `data_dir`.
pub async fn failure_report(
    pool: &PgPool,
    build: &BuildState,
    data_dir: &Path,
) -> Result<String, SubmitError> {
    let step = evaluator::failed_step(pool, build.id).await.map_err(|e| {
        SubmitError::Follow(format!(
            "finding the failed step of build {}: {}",
            build.id,
            crate::db::describe_sqlx_error(&e)
        ))
    })?;
    let log = step
        .as_ref()
        .map(|s| read_log_tail(data_dir, &s.drv_path, LOG_TAIL_LINES));
    Ok(format_failure(build, step.as_ref(), log.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DRV: &str = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-fails.drv";

    fn failed_build(id: i32, status: i32) -> BuildState {
        BuildState {
            id,
            job: "fails".into(),
            finished: true,
            status: Some(status),
        }
    }

    fn step(build: i32) -> FailedStep {
        FailedStep {
            build,
            stepnr: 1,
            drv_path: DRV.into(),
            status: 1,
            error_msg: Some(format!("builder for '{DRV}' failed with exit code 3")),
            machine: "agent-a".into(),
            propagated_from: None,
        }
    }

    #[test]
    fn a_failure_reports_status_step_error_and_log_tail() {
        let log = StepLog::Tail {
            path: "/data/build-logs/01/23-fails.drv".into(),
            lines: vec!["about to fail".into(), "boom".into()],
        };
        let report = format_failure(&failed_build(7, 1), Some(&step(7)), Some(&log));
        assert_eq!(
            report,
            format!(
                "build 7 (fails): failed\n\
                 \x20 failed step: {DRV} (step 1): failed\n\
                 \x20 machine: agent-a\n\
                 \x20 exit code: 3\n\
                 \x20 error: builder for '{DRV}' failed with exit code 3\n\
                 \x20 log: /data/build-logs/01/23-fails.drv\n\
                 \x20 last 2 lines of the log:\n\
                 \x20   about to fail\n\
                 \x20   boom\n"
            )
        );
    }

    #[test]
    fn a_dependency_failure_names_the_build_the_step_failed_under() {
        let log = StepLog::Missing {
            path: "/data/build-logs/01/23-fails.drv".into(),
        };
        let report = format_failure(&failed_build(8, 2), Some(&step(7)), Some(&log));
        assert!(
            report.starts_with("build 8 (fails): dependency failed\n"),
            "{report}"
        );
        assert!(
            report.contains(&format!(
                "failed step: {DRV} (step 1 of build 7, whose failure this build inherited): failed\n"
            )),
            "{report}"
        );
        assert!(
            report.contains("log: none; no file at /data/build-logs/01/23-fails.drv\n"),
            "{report}"
        );
    }

    #[test]
    fn reports_without_a_step_or_a_log_say_so() {
        let cancelled = format_failure(&failed_build(9, 4), None, None);
        assert_eq!(
            cancelled,
            "build 9 (fails): cancelled\n  no failed step is recorded for this build\n"
        );
        let mut orphan = step(9);
        orphan.propagated_from = Some(3);
        orphan.error_msg = None;
        orphan.machine = String::new();
        let compressed = StepLog::Compressed {
            path: "/d/x.drv.zst".into(),
        };
        let report = format_failure(&failed_build(9, 2), Some(&orphan), Some(&compressed));
        assert!(report.contains("propagated from build 3"), "{report}");
        assert!(
            !report.contains("machine:") && !report.contains("error:"),
            "{report}"
        );
        assert!(
            report.contains("log: /d/x.drv.zst (compressed; not shown)"),
            "{report}"
        );
        let mut built = step(10);
        built.status = 0;
        built.error_msg = None;
        let report = format_failure(&failed_build(10, 6), Some(&built), None);
        assert!(
            report.contains(&format!("  step: {DRV} (step 1): succeeded\n")),
            "{report}"
        );
    }

    #[test]
    fn builder_text_cannot_drive_the_terminal() {
        let log = StepLog::Tail {
            path: "/l".into(),
            lines: vec![
                "\u{1b}[31;1mred\u{1b}[0m\tand tabbed".into(),
                "\u{1b}]0;title\u{7}".into(),
            ],
        };
        let mut s = step(1);
        s.error_msg = Some("first line\nsecond \u{7} line".into());
        let report = format_failure(&failed_build(1, 1), Some(&s), Some(&log));
        assert!(report.contains("    red\tand tabbed\n"), "{report}");
        assert!(report.contains("    \\u{1b}]0;title\\u{7}\n"), "{report}");
        assert!(
            report.contains("  error: first line\n         second \\u{7} line\n"),
            "{report}"
        );
        assert!(!report.contains('\u{1b}') && !report.contains('\u{7}'));
    }

    #[test]
    fn nix_error_messages_lose_their_log_excerpt_and_colours() {
        // As Nix 2.8 reports a failed builder.
        let msg = "\u{1b}[0mbuilder for '\u{1b}[35;1m/nix/store/x-a.drv\u{1b}[0m' failed with exit code 2;\n\
                   last 2 log lines:\n\
                   > one\n\
                   > two\n\
                   For full logs, run '\u{1b}[1mnix log /nix/store/x-a.drv\u{1b}[0m'.";
        assert_eq!(
            error_lines(msg),
            vec!["builder for '/nix/store/x-a.drv' failed with exit code 2".to_string()]
        );
        // As Nix 2.26 reports it: the command on a line of its own.
        let msg = "\u{1b}[0mbuilder for '\u{1b}[35;1m/nix/store/x-a.drv\u{1b}[0m' failed with exit code 1;\n\
                   last 2 log lines:\n\
                   > one\n\
                   > two\n\
                   For full logs, run:\n  \u{1b}[1mnix log /nix/store/x-a.drv\u{1b}[0m";
        assert_eq!(
            error_lines(msg),
            vec!["builder for '/nix/store/x-a.drv' failed with exit code 1".to_string()]
        );
        // Without the nix-command feature, and with more after the hint.
        let msg = "builder for '/nix/store/x-a.drv' failed with exit code 1;\n\
                   last 1 log lines:\n\
                   > one\n\
                   For full logs, run:\n  nix-store -l /nix/store/x-a.drv\n\
                   and something else";
        assert_eq!(
            error_lines(msg),
            vec![
                "builder for '/nix/store/x-a.drv' failed with exit code 1".to_string(),
                "and something else".to_string()
            ]
        );
        assert_eq!(error_lines(""), Vec::<String>::new());
        let long = "y".repeat(MAX_LINE_CHARS + 5);
        assert_eq!(printable(&long), "y".repeat(MAX_LINE_CHARS) + " […]");
    }

    #[test]
    fn exit_codes_are_read_from_nix_messages() {
        assert_eq!(
            exit_code("builder for 'x.drv' failed with exit code 1"),
            Some(1)
        );
        assert_eq!(
            exit_code("builder for 'x.drv' failed with exit code 127;\nlast lines"),
            Some(127)
        );
        assert_eq!(exit_code("timed out"), None);
        assert_eq!(exit_code("exit code "), None);
    }

    #[test]
    fn log_tails_come_from_the_contract_path() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = crate::logs::log_path(dir.path(), DRV).expect("log path");
        assert_eq!(
            read_log_tail(dir.path(), DRV, 20),
            StepLog::Missing { path: path.clone() }
        );
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        let zst = path.with_extension("drv.zst");
        std::fs::write(&zst, b"x").expect("write");
        assert_eq!(
            read_log_tail(dir.path(), DRV, 20),
            StepLog::Compressed { path: zst }
        );

        let text: String = (1..=30).map(|n| format!("line {n}\n")).collect();
        std::fs::write(&path, text).expect("write");
        let StepLog::Tail { path: found, lines } = read_log_tail(dir.path(), DRV, 20) else {
            panic!("no tail");
        };
        assert_eq!(found, path);
        let want: Vec<String> = (11..=30).map(|n| format!("line {n}")).collect();
        assert_eq!(lines, want);

        // A log far larger than the window: only its end is read, and the
        // line the window cuts is left out.
        let long = "x".repeat(200 * 1024) + "\nlast but one\nlast";
        std::fs::write(&path, long).expect("write");
        let StepLog::Tail { lines, .. } = read_log_tail(dir.path(), DRV, 20) else {
            panic!("no tail");
        };
        assert_eq!(lines, vec!["last but one".to_string(), "last".to_string()]);

        assert!(matches!(
            read_log_tail(dir.path(), "not-a-drv", 20),
            StepLog::NoPath { .. }
        ));
    }
}
