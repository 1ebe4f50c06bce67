//! The dashboard's HTML, from a status snapshot and the sampler's
//! [`Figures`]: a pure function of them and the time.
//!
//! Invariant: every string that came from the database or an agent
//! (project, jobset and job names, machine names, systems, features,
//! derivation names, error messages, the reasons a machine is paused)
//! goes into the page through [`Html`] (text and attribute values) or
//! [`url_segment`] (the path of a link); only this file's own literals are
//! written raw.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};

use super::{Figures, Minute};
use crate::status::{phase_name, MachineStatus, RunningStep, StatusSnapshot};

/// Jobsets listed in the queue at most (the rest are summed up in one
/// line), so the page stays small with any number of jobsets.
pub const JOBSETS_SHOWN: usize = 50;

/// Error messages are cut to this many characters.
const ERROR_CHARS: usize = 300;

/// Text escaped for HTML element content and quoted attribute values.
pub struct Html<'a>(pub &'a str);

impl fmt::Display for Html<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(i) = rest.find(['&', '<', '>', '"', '\'']) {
            f.write_str(&rest[..i])?;
            f.write_str(match rest.as_bytes()[i] {
                b'&' => "&amp;",
                b'<' => "&lt;",
                b'>' => "&gt;",
                b'"' => "&quot;",
                _ => "&#39;",
            })?;
            rest = &rest[i + 1..];
        }
        f.write_str(rest)
    }
}

/// `s` as one segment of a URL path: everything but letters, digits and
/// `-._~` percent-encoded (so a `?` or `/` in a name cannot change the
/// link's meaning).
pub fn url_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A duration in seconds, as people read it: `42s`, `3m 07s`, `2h 05m`,
/// `3d 04h`.
pub fn duration(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// Bytes in binary units: `512 B`, `1.5 KiB`, `12.0 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// The name of a derivation without its store directory and hash:
/// `/nix/store/abc…-hello-2.12.drv` gives `hello-2.12.drv`.
pub fn drv_name(drv_path: &str) -> &str {
    let base = drv_path.rsplit('/').next().unwrap_or(drv_path);
    base.split_once('-').map_or(base, |(_, name)| name)
}

/// How the web UI names a step status.
pub fn status_name(status: i32) -> &'static str {
    match status {
        0 => "succeeded",
        1 => "failed",
        2 => "dependency failed",
        3 => "aborted",
        4 => "cancelled",
        6 => "failed with output",
        7 => "timed out",
        8 => "cached failure",
        9 => "unsupported system or feature",
        10 => "log limit exceeded",
        11 => "output limit exceeded",
        12 => "not deterministic",
        13 => "resolved",
        _ => "unknown status",
    }
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:1em 2em;color:#222}\
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ccc}\
table{border-collapse:collapse;margin:.4em 0}td,th{padding:.15em .6em;text-align:left;vertical-align:top}\
th{background:#eee}tr:nth-child(even) td{background:#f7f7f7}td.n,th.n{text-align:right}\
.muted{color:#777}.warn{background:#fff3cd;border:1px solid #e0c060;padding:.4em .8em}\
.bad{color:#a00}.ok{color:#070}.tag{font-size:.85em;padding:0 .4em;border-radius:.3em;background:#eee}\
.cols{display:flex;gap:3em;flex-wrap:wrap}tt,code{font-size:.92em}\
tr.machine td{background:#e8eef6;font-weight:bold}";

/// The whole page at time `now` (unix seconds), reloading itself every
/// `refresh_s` seconds.
pub fn page(s: &StatusSnapshot, f: &Figures, now: i64, refresh_s: u64) -> String {
    let mut out = String::with_capacity(16 * 1024);
    // Writing to a String cannot fail.
    let _ = write_page(&mut out, s, f, now, refresh_s);
    out
}

fn write_page(
    out: &mut String,
    s: &StatusSnapshot,
    f: &Figures,
    now: i64,
    refresh_s: u64,
) -> fmt::Result {
    write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{refresh_s}\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <title>Sluice queue runner</title><style>{STYLE}</style></head><body>\n"
    )?;
    summary(out, s, f, now)?;
    queue(out, f, now)?;
    running(out, s, f, now)?;
    machines(out, s, now)?;
    failures(out, f, now)?;
    throughput(out, f, now)?;
    write!(
        out,
        "<p class=\"muted\">Reloads every {refresh_s} s. JSON: <a href=\"/status\">/status</a>, \
         <a href=\"/status/machines\">/status/machines</a>; \
         <a href=\"/metrics\">/metrics</a>.</p>\n</body></html>\n"
    )
}

fn summary(out: &mut String, s: &StatusSnapshot, f: &Figures, now: i64) -> fmt::Result {
    write!(
        out,
        "<h1>Sluice queue runner</h1>\n<p>Up for {}. ",
        duration(now - s.started_unix),
    )?;
    match s.database_down_since {
        None => out.push_str("Database: <span class=\"ok\">up</span>"),
        Some(since) => write!(
            out,
            "Database: <span class=\"bad\">away for {}</span>",
            duration(now - since)
        )?,
    }
    writeln!(out, ", {} writes pending.</p>", s.pending_writes)?;
    let queued = f
        .read
        .as_ref()
        .map_or_else(|| "…".to_owned(), |r| r.queued_total.to_string());
    write!(
        out,
        "<table><tr><th class=\"n\">Queued builds</th><th class=\"n\">Held</th>\
         <th class=\"n\">Steps runnable</th><th class=\"n\">Waiting</th>\
         <th class=\"n\">Building</th><th class=\"n\">Builds done</th>\
         <th class=\"n\">Steps done</th><th class=\"n\">Machines</th>\
         <th class=\"n\">Slots busy</th></tr>\n<tr><td class=\"n\">{queued}</td>\
         <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
         <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
         <td class=\"n\">{}</td><td class=\"n\">{} / {}</td></tr></table>\n",
        s.builds_queued,
        s.core.steps_runnable,
        s.core.steps_waiting + s.core.steps_retry_pending + s.core.steps_resolving,
        s.core.steps_building,
        s.builds_done,
        s.steps_done,
        s.machines.len(),
        s.core.slots_busy,
        s.core.slots_total,
    )?;
    if let Some(u) = &s.uploads {
        write!(
            out,
            "<p>Binary cache: {} uploads pending, {} builds waiting for theirs",
            u.pending, u.builds_waiting
        )?;
        if let Some(since) = u.oldest_pending_since {
            write!(out, ", the oldest for {}", duration(now - since))?;
        }
        write!(out, "; {} failed tries", u.failures)?;
        if let Some(error) = &u.last_error {
            write!(out, ", the last: {}", Html(error))?;
        }
        out.push_str(".</p>\n");
    }
    if let Some(error) = &f.read_error {
        write!(
            out,
            "<p class=\"warn\">The database cannot be read ({}). ",
            Html(error)
        )?;
        match &f.read {
            Some(r) => writeln!(
                out,
                "The queue and failures below are as of {} ago.</p>",
                duration(now - r.at)
            )?,
            None => out.push_str("The queue and failures are not known yet.</p>\n"),
        }
    }
    Ok(())
}

fn queue(out: &mut String, f: &Figures, now: i64) -> fmt::Result {
    out.push_str("<h2 id=\"queue\">Queue</h2>\n");
    let Some(r) = &f.read else {
        out.push_str("<p class=\"muted\">Not read from the database yet.</p>\n");
        return Ok(());
    };
    write!(
        out,
        "<p>{} queued builds (read {} ago).</p>\n<div class=\"cols\"><div>\
         <table><tr><th>System</th><th class=\"n\">Builds</th></tr>\n",
        r.queued_total,
        duration(now - r.at)
    )?;
    for (system, n) in &r.by_system {
        writeln!(
            out,
            "<tr><td><tt>{}</tt></td><td class=\"n\">{n}</td></tr>",
            Html(system)
        )?;
    }
    out.push_str(
        "</table></div><div><table><tr><th>Jobset</th><th class=\"n\">Builds</th>\
         <th>By system</th></tr>\n",
    );
    for j in r.by_jobset.iter().take(JOBSETS_SHOWN) {
        write!(
            out,
            "<tr><td>{}:{}</td><td class=\"n\">{}</td><td class=\"muted\">",
            Html(&j.project),
            Html(&j.jobset),
            j.builds
        )?;
        for (i, (system, n)) in j.systems.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            write!(out, "{} {n}", Html(system))?;
        }
        out.push_str("</td></tr>\n");
    }
    if r.by_jobset.len() > JOBSETS_SHOWN {
        let rest = &r.by_jobset[JOBSETS_SHOWN..];
        writeln!(
            out,
            "<tr><td class=\"muted\">… {} more jobsets</td><td class=\"n\">{}</td><td></td></tr>",
            rest.len(),
            rest.iter().map(|j| j.builds).sum::<i64>()
        )?;
    }
    out.push_str("</table></div></div>\n");
    Ok(())
}

/// Machines by name (then id), for a stable order.
fn sorted_machines(s: &StatusSnapshot) -> Vec<&MachineStatus> {
    let mut machines: Vec<&MachineStatus> = s.machines.iter().collect();
    machines.sort_by(|a, b| (&a.hostname, a.id).cmp(&(&b.hostname, b.id)));
    machines
}

/// What a machine is doing, as tags.
fn state_tags(out: &mut String, m: &MachineStatus) -> fmt::Result {
    if !m.connected {
        out.push_str(" <span class=\"tag bad\">disconnected</span>");
    }
    if m.draining {
        out.push_str(" <span class=\"tag\">draining</span>");
    }
    if let Some(why) = &m.paused {
        write!(out, " <span class=\"tag bad\">paused: {}</span>", Html(why))?;
    }
    Ok(())
}

fn running(out: &mut String, s: &StatusSnapshot, f: &Figures, now: i64) -> fmt::Result {
    write!(
        out,
        "<h2 id=\"running\">Running steps</h2>\n<p>Steps in progress: {}.</p>\n\
         <table><tr><th>Slot</th><th>Build</th><th>Job</th><th>Step</th><th>Phase</th>\
         <th class=\"n\">Elapsed</th></tr>\n",
        s.running.len()
    )?;
    let mut by_machine: BTreeMap<u64, Vec<&RunningStep>> = BTreeMap::new();
    for r in s.running.iter() {
        by_machine.entry(r.machine).or_default().push(r);
    }
    for steps in by_machine.values_mut() {
        steps.sort_by_key(|r| (r.slot.is_none(), r.slot, r.started_unix, r.build));
    }
    for m in sorted_machines(s) {
        write!(
            out,
            "<tr class=\"machine\"><td colspan=\"6\">{} <span class=\"muted\">{} of {} jobs</span>",
            Html(&m.hostname),
            m.running,
            m.max_jobs
        )?;
        state_tags(out, m)?;
        out.push_str("</td></tr>\n");
        let steps = by_machine.remove(&m.id).unwrap_or_default();
        // Each pinned slot, with its step or idle; then the steps in no
        // pinned slot (being prepared, waiting for a slot, uploading, or
        // on an agent that does not pin).
        for (index, (node, cpus)) in m.slots.iter().enumerate() {
            let slot = format!("{index} (node {node}, CPUs {})", Html(cpus));
            let mut here = steps
                .iter()
                .filter(|r| r.slot.and_then(|i| usize::try_from(i).ok()) == Some(index))
                .peekable();
            if here.peek().is_none() {
                writeln!(
                    out,
                    "<tr><td>{slot}</td><td colspan=\"5\" class=\"muted\">idle</td></tr>"
                )?;
            }
            for r in here {
                step_row(out, &slot, r, f, now)?;
            }
        }
        let unslotted: Vec<&&RunningStep> = steps.iter().filter(|r| r.slot.is_none()).collect();
        for r in &unslotted {
            step_row(out, "—", r, f, now)?;
        }
        if m.slots.is_empty() && unslotted.is_empty() {
            out.push_str("<tr><td>—</td><td colspan=\"5\" class=\"muted\">idle</td></tr>\n");
        }
    }
    // Attempts of machines no longer in the snapshot (given up on).
    for r in by_machine.values().flatten() {
        step_row(out, "(gone)", r, f, now)?;
    }
    out.push_str("</table>\n");
    Ok(())
}

/// `slot` is already HTML.
fn step_row(out: &mut String, slot: &str, r: &RunningStep, f: &Figures, now: i64) -> fmt::Result {
    write!(
        out,
        "<tr><td>{slot}</td><td class=\"n\">{}</td><td>",
        r.build
    )?;
    match f.read.as_ref().and_then(|d| d.names.get(&r.build)) {
        Some(n) => write!(
            out,
            "{}:{}:{}",
            Html(&n.project),
            Html(&n.jobset),
            Html(&n.job)
        )?,
        None => out.push_str("<span class=\"muted\">…</span>"),
    }
    let stepnr = r.stepnr.map_or_else(String::new, |n| format!("#{n} "));
    writeln!(
        out,
        "</td><td>{stepnr}<tt>{}</tt></td><td>{}</td><td class=\"n\">{}</td></tr>",
        Html(drv_name(r.drv_path.as_str())),
        phase_name(r.busy),
        duration(now - r.started_unix)
    )
}

fn machines(out: &mut String, s: &StatusSnapshot, now: i64) -> fmt::Result {
    out.push_str(
        "<h2 id=\"machines\">Machines</h2>\n<table><tr><th>Machine</th><th>Systems</th>\
         <th class=\"n\">Jobs</th><th class=\"n\">Load 1/5/15</th><th class=\"n\">Memory</th>\
         <th class=\"n\">Pressure CPU/mem/IO</th><th class=\"n\">Free: store</th>\
         <th class=\"n\">build dir</th><th class=\"n\">Steps done</th>\
         <th class=\"n\">Avg step</th><th class=\"n\">Heard</th></tr>\n",
    );
    if s.machines.is_empty() {
        out.push_str(
            "<tr><td colspan=\"11\" class=\"muted\">No builder agent is connected.</td></tr>\n",
        );
    }
    for m in sorted_machines(s) {
        write!(out, "<tr><td>{}", Html(&m.hostname))?;
        state_tags(out, m)?;
        out.push_str("</td><td>");
        for (i, system) in m.systems.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            write!(out, "<tt>{}</tt>", Html(system))?;
        }
        let l = &m.load;
        let avg_step = m.step_ms_total.checked_div(m.steps_done).unwrap_or(0) / 1000;
        writeln!(
            out,
            "</td><td class=\"n\">{} / {}</td><td class=\"n\">{:.2} {:.2} {:.2}</td>\
             <td class=\"n\">{} / {}</td><td class=\"n\">{:.1}% {:.1}% {:.1}%</td>\
             <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{} ago</td></tr>",
            m.running,
            m.max_jobs,
            l.load[0],
            l.load[1],
            l.load[2],
            bytes(l.mem_used_bytes),
            bytes(m.total_mem),
            l.cpu_pressure.avg10,
            l.memory_pressure.avg10,
            l.io_pressure.avg10,
            l.store_free_bytes.map_or_else(|| "?".to_owned(), bytes),
            l.build_dir_free_bytes.map_or_else(|| "?".to_owned(), bytes),
            m.steps_done,
            duration(i64::try_from(avg_step).unwrap_or(i64::MAX)),
            duration(now - m.last_heard_unix),
        )?;
    }
    out.push_str("</table>\n");
    Ok(())
}

fn failures(out: &mut String, f: &Figures, now: i64) -> fmt::Result {
    out.push_str("<h2 id=\"failures\">Recent failures</h2>\n");
    let Some(r) = &f.read else {
        out.push_str("<p class=\"muted\">Not read from the database yet.</p>\n");
        return Ok(());
    };
    if r.failures.is_empty() {
        out.push_str("<p class=\"muted\">No failed steps.</p>\n");
        return Ok(());
    }
    out.push_str(
        "<table><tr><th>When</th><th>Job</th><th>Build</th><th>Step</th><th>Status</th>\
         <th>Machine</th><th>Error</th><th>Log</th></tr>\n",
    );
    for failure in &r.failures {
        let step = &failure.step;
        // Without colours, control characters and the log excerpt Nix
        // appends (the log is a link away).
        let error: String =
            crate::submit::report::error_lines(step.error_msg.as_deref().unwrap_or_default())
                .join(" ")
                .chars()
                .take(ERROR_CHARS)
                .collect();
        write!(
            out,
            "<tr><td>{} ago</td><td>{}:{}:{}</td><td class=\"n\">{} #{}</td><td><tt>{}</tt></td>\
             <td class=\"bad\">{}</td><td>{}</td><td>{}</td><td>",
            duration(now - step.stop_time),
            Html(&step.project),
            Html(&step.jobset),
            Html(&step.job),
            step.build,
            step.stepnr,
            Html(drv_name(&step.drv_path)),
            status_name(step.status),
            Html(&step.machine),
            Html(&error),
        )?;
        if failure.has_log {
            let base = step.drv_path.rsplit('/').next().unwrap_or_default();
            write!(out, "<a href=\"/log/{}\">log</a>", Html(&url_segment(base)))?;
        } else {
            out.push_str("<span class=\"muted\">none</span>");
        }
        out.push_str("</td></tr>\n");
    }
    out.push_str("</table>\n");
    Ok(())
}

fn throughput(out: &mut String, f: &Figures, now: i64) -> fmt::Result {
    const BAR: u64 = 10;
    const HEIGHT: u64 = 80;
    let hour = f.throughput.last_hour(now);
    let total = |get: fn(&Minute) -> u64| hour.iter().map(get).sum::<u64>();
    let since = f
        .throughput
        .since
        .filter(|since| now - since < 3600)
        .map_or_else(String::new, |since| {
            format!(
                " (counted since {} ago, when this queue runner started)",
                duration(now - since)
            )
        });
    writeln!(
        out,
        "<h2 id=\"throughput\">Throughput, last hour</h2>\n<p>Steps succeeded: {}, failed: {}; \
         builds finished: {}{since}.</p>",
        total(|m| m.steps_succeeded),
        total(|m| m.steps_failed),
        total(|m| m.builds_finished),
    )?;
    let peak = hour
        .iter()
        .map(|m| m.steps_succeeded + m.steps_failed)
        .max()
        .unwrap_or(0)
        .max(1);
    let width = BAR * hour.len() as u64;
    write!(
        out,
        "<svg width=\"{width}\" height=\"{}\" role=\"img\" aria-label=\"steps per minute\">\
         <rect width=\"{width}\" height=\"{HEIGHT}\" fill=\"#f4f4f4\"/>",
        HEIGHT + 14
    )?;
    for (i, m) in hour.iter().enumerate() {
        let x = i as u64 * BAR;
        let ok = m.steps_succeeded * HEIGHT / peak;
        let bad = m.steps_failed * HEIGHT / peak;
        let ago = (now.div_euclid(60) - m.minute).max(0);
        write!(
            out,
            "<g><title>{ago} min ago: {} succeeded, {} failed, {} builds</title>\
             <rect x=\"{x}\" y=\"{}\" width=\"{}\" height=\"{ok}\" fill=\"#4a9a4a\"/>\
             <rect x=\"{x}\" y=\"{}\" width=\"{}\" height=\"{bad}\" fill=\"#c04040\"/></g>",
            m.steps_succeeded,
            m.steps_failed,
            m.builds_finished,
            HEIGHT - ok,
            BAR - 1,
            HEIGHT - ok - bad,
            BAR - 1,
        )?;
    }
    writeln!(
        out,
        "<text x=\"0\" y=\"{}\" font-size=\"11\">60 min ago</text>\
         <text x=\"{width}\" y=\"{}\" font-size=\"11\" text-anchor=\"end\">now · peak {peak}/min</text></svg>",
        HEIGHT + 12,
        HEIGHT + 12
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dashboard::{DatabaseFigures, Failure, JobsetQueue};
    use crate::db::dashboard::{BuildName, FailedStep};
    use crate::status::UploadStatus;

    const EVIL: &str = "<script>alert(1)</script>";

    /// A page where every string from outside is `EVIL`.
    fn evil_page() -> String {
        let now = 1_000_000;
        let s = StatusSnapshot {
            started_unix: now - 100,
            machines: vec![MachineStatus {
                id: 7,
                hostname: EVIL.into(),
                systems: vec![EVIL.into()],
                max_jobs: 2,
                connected: true,
                paused: Some(EVIL.into()),
                slots: vec![(0, EVIL.into())],
                ..MachineStatus::default()
            }],
            running: std::sync::Arc::new(vec![RunningStep {
                machine: 7,
                build: 1,
                stepnr: Some(1),
                drv_path: sluice_core::DrvPath::from("/nix/store/abc-<script>x</script>.drv"),
                started_unix: now - 5,
                busy: 30,
                slot: Some(0),
            }]),
            uploads: Some(UploadStatus {
                last_error: Some(EVIL.into()),
                ..UploadStatus::default()
            }),
            ..StatusSnapshot::default()
        };
        let name = || BuildName {
            project: EVIL.into(),
            jobset: EVIL.into(),
            job: EVIL.into(),
        };
        let f = Figures {
            read: Some(DatabaseFigures {
                at: now,
                by_system: vec![(EVIL.into(), 1)],
                by_jobset: vec![JobsetQueue {
                    project: EVIL.into(),
                    jobset: EVIL.into(),
                    builds: 1,
                    systems: vec![(EVIL.into(), 1)],
                }],
                queued_total: 1,
                failures: vec![Failure {
                    step: FailedStep {
                        build: 1,
                        stepnr: 1,
                        project: EVIL.into(),
                        jobset: EVIL.into(),
                        job: EVIL.into(),
                        drv_path: "/nix/store/abc-a?b=c.drv".into(),
                        machine: EVIL.into(),
                        status: 1,
                        error_msg: Some(EVIL.into()),
                        stop_time: now - 1,
                    },
                    has_log: true,
                }],
                names: [(1, name())].into_iter().collect(),
            }),
            read_error: Some(EVIL.into()),
            ..Figures::default()
        };
        page(&s, &f, now, 5)
    }

    #[test]
    fn every_string_from_outside_is_escaped() {
        let page = evil_page();
        assert!(!page.to_ascii_lowercase().contains("<script"), "{page}");
        // Each place shows it, as text.
        let shown = page
            .matches("&lt;script&gt;alert(1)&lt;/script&gt;")
            .count();
        assert!(shown >= 15, "{shown} times:\n{page}");
        // A link's path cannot be cut short by a `?` in a name.
        assert!(page.contains("href=\"/log/abc-a%3Fb%3Dc.drv\""), "{page}");
        assert!(page.contains("Binary cache: 0 uploads pending"), "{page}");
    }

    #[test]
    fn html_escapes_markup_and_quotes() {
        assert_eq!(
            Html("<script>alert('x')</script> & \"q\"").to_string(),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
        assert_eq!(Html("plain-name_1.0").to_string(), "plain-name_1.0");
        assert_eq!(Html("ünïcode ✓").to_string(), "ünïcode ✓");
    }

    #[test]
    fn url_segments_keep_only_unreserved_characters() {
        assert_eq!(url_segment("abc-hello-1.0.drv"), "abc-hello-1.0.drv");
        assert_eq!(url_segment("a?b=c/d\"<"), "a%3Fb%3Dc%2Fd%22%3C");
    }

    #[test]
    fn durations_and_sizes_read_naturally() {
        assert_eq!(duration(-5), "0s");
        assert_eq!(duration(42), "42s");
        assert_eq!(duration(187), "3m 07s");
        assert_eq!(duration(7500), "2h 05m");
        assert_eq!(duration(3 * 86_400 + 4 * 3600), "3d 04h");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(12 << 30), "12.0 GiB");
        assert_eq!(drv_name("/nix/store/abc-hello-2.12.drv"), "hello-2.12.drv");
    }
}
