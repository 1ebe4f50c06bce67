//! The live dashboard at `/`: one server-rendered HTML page that reloads
//! itself (`<meta http-equiv="refresh">`), no script at all.
//!
//! It is drawn from two things that are ready before anyone asks: the
//! status snapshot the driver publishes (machines, slots, running steps,
//! counters), and the [`Figures`] a sampler task of its own refreshes
//! every `status-interval-s` from the database (the queue grouped by
//! jobset and system, the latest failed steps, the names of the builds in
//! progress) and from the snapshot's counters (throughput per minute over
//! the last hour). [`render`] only formats them.
//!
//! Invariants: loading the page never waits for the database or the
//! driver, and costs the same with 100 or 100,000 queued builds (the
//! queue arrives grouped, and at most [`render::JOBSETS_SHOWN`] jobsets
//! are listed). Everything that came from the database or an agent is
//! HTML-escaped where it is written into the page ([`render::Html`]).
//! A database that is away leaves the last figures up, marked stale, and
//! is logged once.

pub mod render;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::watch;

use crate::db::dashboard::{BuildName, FailedStep};
use crate::status::StatusSnapshot;

/// Failed steps listed at most.
pub const FAILURES_SHOWN: i64 = 20;

/// Minutes of throughput kept and charted.
pub const THROUGHPUT_MINUTES: usize = 60;

/// What the page shows besides the status snapshot.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    /// The latest successful read of the database; `None` before the
    /// first.
    pub read: Option<DatabaseFigures>,
    /// Why the latest read failed, if it did (the page then shows the
    /// figures of `read`, saying how old they are).
    pub read_error: Option<String>,
    pub throughput: Throughput,
}

/// One read of the database, grouped for the page.
#[derive(Debug, Clone, Default)]
pub struct DatabaseFigures {
    /// When it was read (unix seconds).
    pub at: i64,
    /// Queued builds per system, most first.
    pub by_system: Vec<(String, i64)>,
    /// Queued builds per jobset, most first: (project, jobset, builds,
    /// builds per system).
    pub by_jobset: Vec<JobsetQueue>,
    pub queued_total: i64,
    pub failures: Vec<Failure>,
    /// Project, jobset and job of the builds in progress, by build id.
    pub names: HashMap<i32, BuildName>,
}

/// The queued builds of one jobset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobsetQueue {
    pub project: String,
    pub jobset: String,
    pub builds: i64,
    /// Per system, most first.
    pub systems: Vec<(String, i64)>,
}

/// A failed step, and whether its log is at hand (served at
/// `/log/<drv>`).
#[derive(Debug, Clone)]
pub struct Failure {
    pub step: FailedStep,
    pub has_log: bool,
}

/// Completions per minute over the last hour, from the differences of the
/// snapshot's counters between samples (so since this process started).
#[derive(Debug, Clone, Default)]
pub struct Throughput {
    /// Oldest first; a minute without completions may be missing.
    minutes: VecDeque<Minute>,
    /// The counters at the previous sample.
    last: Option<Completions>,
    /// The first sample (unix seconds).
    pub since: Option<i64>,
}

/// Completions in one minute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Minute {
    /// Unix time of its start, divided by 60.
    pub minute: i64,
    pub steps_succeeded: u64,
    pub steps_failed: u64,
    pub builds_finished: u64,
}

/// Counters of completions since the process started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Completions {
    pub steps_succeeded: u64,
    pub steps_failed: u64,
    pub builds_finished: u64,
}

impl Completions {
    pub fn of(s: &StatusSnapshot) -> Completions {
        Completions {
            steps_succeeded: s.core.steps_done,
            steps_failed: s.core.steps_failed,
            builds_finished: s.builds_done,
        }
    }
}

impl Throughput {
    /// Adds what completed since the previous sample to the minute of
    /// `now` (unix seconds), and forgets minutes older than the window.
    pub fn record(&mut self, now: i64, counters: Completions) {
        self.since.get_or_insert(now);
        let minute = now.div_euclid(60);
        if let Some(last) = self.last.replace(counters) {
            let delta = Minute {
                minute,
                steps_succeeded: counters
                    .steps_succeeded
                    .saturating_sub(last.steps_succeeded),
                steps_failed: counters.steps_failed.saturating_sub(last.steps_failed),
                builds_finished: counters
                    .builds_finished
                    .saturating_sub(last.builds_finished),
            };
            match self.minutes.back_mut() {
                Some(m) if m.minute == minute => {
                    m.steps_succeeded += delta.steps_succeeded;
                    m.steps_failed += delta.steps_failed;
                    m.builds_finished += delta.builds_finished;
                }
                _ => self.minutes.push_back(delta),
            }
        }
        let oldest = minute - THROUGHPUT_MINUTES as i64 + 1;
        while self.minutes.front().is_some_and(|m| m.minute < oldest) {
            self.minutes.pop_front();
        }
    }

    /// The last [`THROUGHPUT_MINUTES`] minutes up to the one of `now`,
    /// oldest first, with zeros where nothing completed.
    pub fn last_hour(&self, now: i64) -> Vec<Minute> {
        let current = now.div_euclid(60);
        let first = current - THROUGHPUT_MINUTES as i64 + 1;
        let mut minutes: Vec<Minute> = (first..=current)
            .map(|minute| Minute {
                minute,
                ..Minute::default()
            })
            .collect();
        for m in &self.minutes {
            if let Some(slot) = usize::try_from(m.minute - first)
                .ok()
                .and_then(|i| minutes.get_mut(i))
            {
                *slot = *m;
            }
        }
        minutes
    }
}

/// Groups the queue by system and by jobset, most first (ties by name).
pub fn group_queue(groups: &[crate::db::dashboard::QueuedGroup]) -> DatabaseFigures {
    let mut by_system: BTreeMap<&str, i64> = BTreeMap::new();
    let mut by_jobset: BTreeMap<(&str, &str), BTreeMap<&str, i64>> = BTreeMap::new();
    for g in groups {
        *by_system.entry(&g.system).or_default() += g.builds;
        *by_jobset
            .entry((&g.project, &g.jobset))
            .or_default()
            .entry(&g.system)
            .or_default() += g.builds;
    }
    let most_first = |m: BTreeMap<&str, i64>| {
        let mut v: Vec<(String, i64)> = m.into_iter().map(|(k, n)| (k.to_owned(), n)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v
    };
    let mut jobsets: Vec<JobsetQueue> = by_jobset
        .into_iter()
        .map(|((project, jobset), systems)| JobsetQueue {
            project: project.to_owned(),
            jobset: jobset.to_owned(),
            builds: systems.values().sum(),
            systems: most_first(systems),
        })
        .collect();
    jobsets.sort_by(|a, b| {
        b.builds
            .cmp(&a.builds)
            .then_with(|| (&a.project, &a.jobset).cmp(&(&b.project, &b.jobset)))
    });
    DatabaseFigures {
        queued_total: groups.iter().map(|g| g.builds).sum(),
        by_system: most_first(by_system),
        by_jobset: jobsets,
        ..DatabaseFigures::default()
    }
}

/// Starts the sampler: it sends figures to `out` at once, then every
/// `interval`, until its task is aborted or every receiver is gone.
pub fn spawn(
    pool: sqlx::PgPool,
    status: watch::Receiver<StatusSnapshot>,
    data_dir: PathBuf,
    interval: Duration,
    out: watch::Sender<Figures>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(sample(pool, status, data_dir, interval, out))
}

async fn sample(
    pool: sqlx::PgPool,
    status: watch::Receiver<StatusSnapshot>,
    data_dir: PathBuf,
    interval: Duration,
    out: watch::Sender<Figures>,
) {
    let budget = crate::status_row::write_budget(interval);
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut figures = Figures::default();
    loop {
        ticks.tick().await;
        let now = crate::driver::unix_now();
        let (completions, mut builds) = {
            let s = status.borrow();
            let builds: Vec<i32> = s.running.iter().map(|r| r.build).collect();
            (Completions::of(&s), builds)
        };
        builds.sort_unstable();
        builds.dedup();
        figures.throughput.record(now, completions);
        let read = tokio::time::timeout(
            budget,
            crate::db::dashboard::read(&pool, &builds, FAILURES_SHOWN, budget),
        )
        .await;
        let error = match read {
            Ok(Ok(read)) => {
                let mut grouped = group_queue(&read.queue);
                grouped.at = now;
                grouped.names = read.names.into_iter().collect();
                grouped.failures = with_logs(&data_dir, read.failures).await;
                figures.read = Some(grouped);
                None
            }
            Ok(Err(e)) => Some(crate::db::describe_sqlx_error(&e)),
            Err(_) => Some(format!("no answer within {} ms", budget.as_millis())),
        };
        match (&error, &figures.read_error) {
            (Some(e), None) => tracing::warn!(
                "the dashboard cannot read the database: {e}; it shows the last figures it read"
            ),
            (None, Some(_)) => tracing::info!("the dashboard reads the database again"),
            _ => {}
        }
        figures.read_error = error;
        if out.send(figures.clone()).is_err() {
            return;
        }
    }
}

/// Whether each failed step's log file exists.
async fn with_logs(data_dir: &std::path::Path, failed: Vec<FailedStep>) -> Vec<Failure> {
    let mut out = Vec::with_capacity(failed.len());
    for step in failed {
        let has_log = match crate::logs::log_path(data_dir, &step.drv_path) {
            Ok(path) => tokio::fs::try_exists(path).await.unwrap_or(false),
            Err(_) => false,
        };
        out.push(Failure { step, has_log });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::dashboard::QueuedGroup;

    fn c(ok: u64, failed: u64, builds: u64) -> Completions {
        Completions {
            steps_succeeded: ok,
            steps_failed: failed,
            builds_finished: builds,
        }
    }

    #[test]
    fn throughput_counts_differences_per_minute_over_the_last_hour() {
        let mut t = Throughput::default();
        let start = 1_000 * 60;
        t.record(start, c(5, 1, 2)); // the baseline: nothing counted
        t.record(start + 10, c(7, 1, 3));
        t.record(start + 50, c(10, 2, 5));
        t.record(start + 70, c(11, 2, 5)); // the next minute
        let hour = t.last_hour(start + 70);
        assert_eq!(hour.len(), THROUGHPUT_MINUTES);
        let last_two = &hour[THROUGHPUT_MINUTES - 2..];
        assert_eq!(
            (
                last_two[0].steps_succeeded,
                last_two[0].steps_failed,
                last_two[0].builds_finished
            ),
            (5, 1, 3)
        );
        assert_eq!(last_two[1].steps_succeeded, 1);
        assert!(hour[..THROUGHPUT_MINUTES - 2]
            .iter()
            .all(|m| m.steps_succeeded == 0));
        // An hour later the first minute is gone.
        t.record(start + 60 * 60, c(11, 2, 5));
        let hour = t.last_hour(start + 60 * 60);
        assert_eq!(hour.iter().map(|m| m.steps_succeeded).sum::<u64>(), 1);
        assert!(t.minutes.len() <= THROUGHPUT_MINUTES);
    }

    #[test]
    fn the_queue_is_grouped_by_system_and_by_jobset_most_first() {
        let g = |p: &str, j: &str, s: &str, n| QueuedGroup {
            project: p.into(),
            jobset: j.into(),
            system: s.into(),
            builds: n,
        };
        let f = group_queue(&[
            g("p", "small", "x86_64-linux", 1),
            g("p", "big", "x86_64-linux", 5),
            g("p", "big", "aarch64-linux", 7),
            g("q", "other", "aarch64-linux", 2),
        ]);
        assert_eq!(f.queued_total, 15);
        assert_eq!(
            f.by_system,
            [
                ("aarch64-linux".to_string(), 9),
                ("x86_64-linux".to_string(), 6)
            ]
        );
        let names: Vec<(&str, i64)> = f
            .by_jobset
            .iter()
            .map(|j| (j.jobset.as_str(), j.builds))
            .collect();
        assert_eq!(names, [("big", 12), ("other", 2), ("small", 1)]);
        assert_eq!(f.by_jobset[0].systems[0], ("aarch64-linux".to_string(), 7));
    }
}
