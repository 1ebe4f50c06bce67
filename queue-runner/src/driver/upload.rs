//! Binary cache uploads on the build-finish path (only with
//! `--binary-cache`; without it nothing here runs and no build waits).
//!
//! The outputs of every step that succeeds here are uploaded with their
//! closures, minus what the cache has. A successful build is finished (its
//! `WriteJob::FinishBuilds` goes to the writer) only once an upload of its
//! top-level outputs, with their closure, has succeeded. That holds for
//! builds whose outputs were valid already when they were loaded (cached
//! builds) too, and that is what makes it hold across a restart: a build
//! whose upload was still pending when the queue runner stopped is still
//! unfinished in the database, so it is loaded again, found cached, and
//! uploaded before it is finished.
//!
//! Uploads run in tasks of their own, at most [`MAX_RUNNING`] at once, and
//! answer with [`DriverEvent::Uploaded`]: the driver never awaits them. A
//! failed upload is tried again later, forever: after a transient failure
//! (the cache or the store unreachable) from [`FIRST_RETRY`] doubling up
//! to [`MAX_TRANSIENT_RETRY`]; after a permanent one (a path gone from the
//! store or corrupt, a cache that belongs to another store) every
//! [`PERMANENT_RETRY`], logged as an error each time. A build is never
//! finished while its outputs are missing from the cache, nor failed for
//! it: it waits, `/status` says how many wait and since when, and once the
//! fault is fixed (live, or by a restart, after which a path missing from
//! the store is built again) it finishes.
//!
//! Build logs go to the cache as `log/<drv>` once a step has ended for
//! good, best effort: [`LOG_TRIES`] tries, never awaited by anything.
//!
//! Invariants: one upload per set of output paths at a time (a build or a
//! step whose outputs are being uploaded joins that upload); every pending
//! upload is either waiting for a running slot, running, or waiting for
//! its retry, never lost; the builds waiting on an upload are written
//! finished, in one `FinishBuilds` each, exactly when it succeeds.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use sluice_core::{BuildId, DrvPath};
use sluice_nix::store_path::{StoreDir, StorePath};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::writer::{FinishedBuild, WriteJob};
use super::{unix_now, Driver, DriverEvent};
use crate::binary_cache::Uploader;
use crate::status::UploadStatus;

/// Closure uploads running at once (each uploads several NARs at once
/// itself; see `binary_cache::PARALLEL_UPLOADS`).
pub const MAX_RUNNING: usize = 4;
/// The wait after an upload's first transient failure; it doubles with
/// each failure in a row. (The uploader has retried a few times already.)
pub const FIRST_RETRY: Duration = Duration::from_secs(2);
/// The longest wait between tries after transient failures.
pub const MAX_TRANSIENT_RETRY: Duration = Duration::from_secs(30);
/// The wait between tries after a permanent failure: an operator may fix
/// the cause (repair the store, fix the cache) without a restart.
pub const PERMANENT_RETRY: Duration = Duration::from_secs(300);
/// Tries at a build log's upload (each retried by the uploader itself).
pub const LOG_TRIES: u32 = 3;
/// The wait between two tries at a build log.
const LOG_RETRY: Duration = Duration::from_secs(10);
/// Build log uploads in flight at most; past that a log is not uploaded
/// (and `/status` counts it as failed) rather than piling up tasks.
const MAX_LOGS_IN_FLIGHT: usize = 256;

/// One pending upload, in the order they were asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UploadId(u64);

/// How an upload task ended, for [`DriverEvent::Uploaded`].
#[derive(Debug)]
pub struct Uploaded {
    id: UploadId,
    result: Result<usize, UploadFailure>,
}

#[derive(Debug)]
struct UploadFailure {
    message: String,
    transient: bool,
}

/// How a build log's upload ended, for [`DriverEvent::LogUploaded`].
#[derive(Debug)]
pub enum LogUploaded {
    Uploaded,
    /// The step left no log file.
    NoLog,
    Failed {
        drv: String,
        error: String,
    },
}

/// Builds finished together, waiting for their outputs to be uploaded:
/// the `FinishBuilds` write they become.
#[derive(Debug)]
struct WaitingBuilds {
    head: BuildId,
    cached: bool,
    builds: Vec<FinishedBuild>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for one of the [`MAX_RUNNING`] slots.
    Ready,
    Running,
    /// Waiting for its retry ([`DriverEvent::UploadDue`]).
    Backoff,
}

#[derive(Debug)]
struct Pending {
    /// The derivation whose outputs these are (the first that asked), for
    /// messages.
    drv: DrvPath,
    roots: Box<[StorePath]>,
    waiting: Vec<WaitingBuilds>,
    since_unix: i64,
    failures: u32,
    state: State,
}

/// The driver's binary cache uploads: pending ones, their tasks, and what
/// `/status` shows of them.
pub struct Uploads {
    cache: Uploader,
    me: mpsc::Sender<DriverEvent>,
    pending: BTreeMap<UploadId, Pending>,
    by_roots: HashMap<Box<[StorePath]>, UploadId>,
    next_id: u64,
    ready: VecDeque<UploadId>,
    running: usize,
    /// Builds written finished only once their upload succeeds.
    builds_waiting: usize,
    logs_in_flight: usize,
    /// Every task started here (uploads and the timers of their retries):
    /// dropped, or stopped at shutdown, with the driver.
    tasks: JoinSet<()>,
    counters: Counters,
}

#[derive(Debug, Default)]
struct Counters {
    done: u64,
    paths_uploaded: u64,
    failures: u64,
    last_error: Option<String>,
    logs_uploaded: u64,
    logs_failed: u64,
}

impl Uploads {
    pub fn new(cache: Uploader, me: mpsc::Sender<DriverEvent>) -> Uploads {
        Uploads {
            cache,
            me,
            pending: BTreeMap::new(),
            by_roots: HashMap::new(),
            next_id: 0,
            ready: VecDeque::new(),
            running: 0,
            builds_waiting: 0,
            logs_in_flight: 0,
            tasks: JoinSet::new(),
            counters: Counters::default(),
        }
    }

    fn store_dir(&self) -> &StoreDir {
        &self.cache.config().store_dir
    }

    /// The store paths of `outputs` (full paths, as reported or recorded),
    /// sorted: the key of their upload. A path that does not parse cannot
    /// be in the store either; it is left to the writer's post-processing
    /// to fail the build for it.
    fn roots<'a>(&self, drv: &DrvPath, outputs: impl Iterator<Item = &'a str>) -> Box<[StorePath]> {
        let mut roots: Vec<StorePath> = outputs
            .filter_map(|p| match self.store_dir().parse_path(p) {
                Ok(path) => Some(path),
                Err(e) => {
                    tracing::warn!(drv = %drv, path = p, error = %e, "binary cache: not a store path; not uploaded");
                    None
                }
            })
            .collect();
        roots.sort();
        roots.dedup();
        roots.into_boxed_slice()
    }

    /// Joins the upload of `roots` or asks for a new one; returns its id.
    fn upload(&mut self, drv: &DrvPath, roots: Box<[StorePath]>) -> UploadId {
        if let Some(id) = self.by_roots.get(&roots) {
            return *id;
        }
        let id = UploadId(self.next_id);
        self.next_id += 1;
        self.by_roots.insert(roots.clone(), id);
        self.pending.insert(
            id,
            Pending {
                drv: drv.clone(),
                roots,
                waiting: Vec::new(),
                since_unix: unix_now(),
                failures: 0,
                state: State::Ready,
            },
        );
        self.ready.push_back(id);
        id
    }

    /// Starts ready uploads while fewer than [`MAX_RUNNING`] run.
    fn start_ready(&mut self) {
        // Finished tasks answered with an event; reaping them keeps the
        // set small. One that panicked never answered: its upload stays
        // pending (`/status` shows it) until a restart.
        while let Some(ended) = self.tasks.try_join_next() {
            if let Err(e) = ended {
                if e.is_panic() {
                    tracing::error!(error = %e, "binary cache: an upload task panicked");
                }
            }
        }
        while self.running < MAX_RUNNING {
            let Some(id) = self.ready.pop_front() else {
                return;
            };
            let Some(pending) = self.pending.get_mut(&id) else {
                continue;
            };
            if pending.state != State::Ready {
                continue;
            }
            pending.state = State::Running;
            self.running += 1;
            let cache = self.cache.clone();
            let me = self.me.clone();
            let roots = pending.roots.to_vec();
            self.tasks.spawn(async move {
                let result = cache
                    .upload_closure(roots)
                    .await
                    .map(|report| report.uploaded.len())
                    .map_err(|e| UploadFailure {
                        message: e.to_string(),
                        transient: e.is_transient(),
                    });
                let _ = me
                    .send(DriverEvent::Uploaded(Uploaded { id, result }))
                    .await;
            });
        }
    }

    /// Stops every task at shutdown; says what was left pending.
    pub fn stop(mut self) {
        self.tasks.abort_all();
        if !self.pending.is_empty() {
            tracing::warn!(
                uploads = self.pending.len(),
                builds = self.builds_waiting,
                "shutting down with binary cache uploads pending: their builds stay unfinished \
                 in the database, and the next start uploads their outputs and finishes them"
            );
        }
    }

    pub fn status(&self) -> UploadStatus {
        UploadStatus {
            pending: self.pending.len(),
            builds_waiting: self.builds_waiting,
            oldest_pending_since: self.pending.values().next().map(|p| p.since_unix),
            done: self.counters.done,
            paths_uploaded: self.counters.paths_uploaded,
            failures: self.counters.failures,
            last_error: self.counters.last_error.clone(),
            logs_uploaded: self.counters.logs_uploaded,
            logs_failed: self.counters.logs_failed,
        }
    }
}

/// How long to wait before trying an upload again after `failures`
/// failures in a row.
fn retry_after(failures: u32, transient: bool) -> Duration {
    if !transient {
        return PERMANENT_RETRY;
    }
    let doublings = failures.saturating_sub(1).min(16);
    FIRST_RETRY
        .saturating_mul(1 << doublings)
        .min(MAX_TRANSIENT_RETRY)
}

impl Driver {
    /// Gives the driver a binary cache: from now on successful builds are
    /// finished only once their outputs are in it.
    pub fn upload_to(&mut self, cache: Uploader) {
        self.uploads = Some(Uploads::new(cache, self.me.clone()));
    }

    /// Uploads the outputs of a step that succeeded here (no build waits
    /// for this by itself; see [`Driver::finish_once_uploaded`]).
    pub(super) fn upload_step_outputs(&mut self, drv: &DrvPath, outputs: &[(String, String)]) {
        let Some(uploads) = self.uploads.as_mut() else {
            return;
        };
        let roots = uploads.roots(drv, outputs.iter().map(|(_, p)| p.as_str()));
        if roots.is_empty() {
            return;
        }
        uploads.upload(drv, roots);
        uploads.start_ready();
    }

    /// Records successful `builds` finished once their outputs (`drv`'s,
    /// with their closure) are in the cache; at once without a cache.
    pub(super) fn finish_once_uploaded(
        &mut self,
        head: BuildId,
        cached: bool,
        builds: Vec<FinishedBuild>,
        drv: &DrvPath,
    ) {
        let Some(uploads) = self.uploads.as_mut() else {
            return self.write_finished(head, cached, builds);
        };
        let outputs: Vec<std::borrow::Cow<'_, str>> = builds
            .iter()
            .flat_map(|b| -> Vec<std::borrow::Cow<'_, str>> {
                match &b.outputs {
                    Some(outs) => outs.iter().map(|(_, p)| p.as_str().into()).collect(),
                    // A cached build: the paths recorded in `BuildOutputs`.
                    None => b.build.outputs().filter_map(|(_, p)| p).collect(),
                }
            })
            .collect();
        let roots = uploads.roots(drv, outputs.iter().map(|p| &**p));
        if roots.is_empty() {
            // Nothing known to upload: the writer's post-processing
            // decides what the build becomes.
            return self.write_finished(head, cached, builds);
        }
        let id = uploads.upload(drv, roots);
        uploads.builds_waiting += builds.len();
        if let Some(pending) = uploads.pending.get_mut(&id) {
            pending.waiting.push(WaitingBuilds {
                head,
                cached,
                builds,
            });
        }
        uploads.start_ready();
    }

    /// Sends the write that records successful `builds` finished.
    fn write_finished(&mut self, head: BuildId, cached: bool, builds: Vec<FinishedBuild>) {
        self.counters.builds_done += builds.len() as u64;
        self.send_write(WriteJob::FinishBuilds {
            head,
            cached,
            failed_step: None,
            builds,
            time: unix_now(),
        });
    }

    pub(super) fn on_uploaded(&mut self, done: Uploaded) {
        let Some(uploads) = self.uploads.as_mut() else {
            return;
        };
        uploads.running = uploads.running.saturating_sub(1);
        let id = done.id;
        match done.result {
            Ok(paths) => {
                if let Some(pending) = uploads.pending.remove(&id) {
                    uploads.by_roots.remove(&pending.roots);
                    uploads.counters.done += 1;
                    uploads.counters.paths_uploaded += paths as u64;
                    let waiting = pending.waiting;
                    let released: usize = waiting.iter().map(|w| w.builds.len()).sum();
                    uploads.builds_waiting = uploads.builds_waiting.saturating_sub(released);
                    if pending.failures > 0 {
                        tracing::info!(drv = %pending.drv, failures = pending.failures, "binary cache: upload done after failures");
                    }
                    uploads.start_ready();
                    for w in waiting {
                        self.write_finished(w.head, w.cached, w.builds);
                    }
                }
            }
            Err(failure) => {
                uploads.counters.failures += 1;
                uploads.counters.last_error = Some(failure.message.clone());
                if let Some(pending) = uploads.pending.get_mut(&id) {
                    pending.failures += 1;
                    pending.state = State::Backoff;
                    let wait = retry_after(pending.failures, failure.transient);
                    let builds: Vec<i32> = pending
                        .waiting
                        .iter()
                        .flat_map(|w| w.builds.iter().map(|b| b.build.id))
                        .collect();
                    if failure.transient {
                        tracing::warn!(drv = %pending.drv, ?builds, failures = pending.failures, retry_in_s = wait.as_secs(), error = %failure.message, "binary cache: upload failed; the builds wait for it");
                    } else {
                        tracing::error!(drv = %pending.drv, ?builds, failures = pending.failures, retry_in_s = wait.as_secs(), error = %failure.message, "binary cache: upload failed for good; the builds wait until it is fixed (or the queue runner restarts)");
                    }
                    let me = uploads.me.clone();
                    uploads.tasks.spawn(async move {
                        tokio::time::sleep(wait).await;
                        let _ = me.send(DriverEvent::UploadDue(id)).await;
                    });
                }
                uploads.start_ready();
            }
        }
    }

    pub(super) fn on_upload_due(&mut self, id: UploadId) {
        let Some(uploads) = self.uploads.as_mut() else {
            return;
        };
        if let Some(pending) = uploads.pending.get_mut(&id) {
            if pending.state == State::Backoff {
                pending.state = State::Ready;
                uploads.ready.push_back(id);
                uploads.start_ready();
            }
        }
    }

    /// Uploads the build log of `drv` (a step that ended for good), best
    /// effort, in the background.
    pub(super) fn upload_log(&mut self, drv: &DrvPath) {
        let Some(uploads) = self.uploads.as_mut() else {
            return;
        };
        let (Ok(file), Ok(path)) = (
            crate::logs::log_path(&self.config.data_dir, drv.as_str()),
            uploads.store_dir().parse_path(drv.as_str()),
        ) else {
            return;
        };
        if uploads.logs_in_flight >= MAX_LOGS_IN_FLIGHT {
            uploads.counters.logs_failed += 1;
            tracing::warn!(drv = %drv, "binary cache: too many build logs on their way; this one is not uploaded");
            return;
        }
        uploads.logs_in_flight += 1;
        let cache = uploads.cache.clone();
        let me = uploads.me.clone();
        let drv = drv.as_str().to_owned();
        uploads.tasks.spawn(async move {
            let mut tried = 0;
            let outcome = loop {
                tried += 1;
                match cache.upload_log_file(&path, &file).await {
                    Ok(()) => break LogUploaded::Uploaded,
                    Err(sluice_binary_cache::LogUploadError::Read { source, .. })
                        if source.kind() == std::io::ErrorKind::NotFound =>
                    {
                        break LogUploaded::NoLog
                    }
                    Err(e) if tried >= LOG_TRIES => {
                        break LogUploaded::Failed {
                            drv,
                            error: e.to_string(),
                        }
                    }
                    Err(_) => tokio::time::sleep(LOG_RETRY).await,
                }
            };
            let _ = me.send(DriverEvent::LogUploaded(outcome)).await;
        });
    }

    pub(super) fn on_log_uploaded(&mut self, outcome: LogUploaded) {
        let Some(uploads) = self.uploads.as_mut() else {
            return;
        };
        uploads.logs_in_flight = uploads.logs_in_flight.saturating_sub(1);
        match outcome {
            LogUploaded::Uploaded => uploads.counters.logs_uploaded += 1,
            LogUploaded::NoLog => {}
            LogUploaded::Failed { drv, error } => {
                uploads.counters.logs_failed += 1;
                tracing::warn!(%drv, %error, "binary cache: the build log was not uploaded");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_failures_back_off_up_to_a_cap_and_permanent_ones_wait_longest() {
        assert_eq!(retry_after(1, true), FIRST_RETRY);
        assert_eq!(retry_after(2, true), FIRST_RETRY * 2);
        assert_eq!(retry_after(3, true), FIRST_RETRY * 4);
        assert_eq!(retry_after(40, true), MAX_TRANSIENT_RETRY);
        assert_eq!(retry_after(u32::MAX, true), MAX_TRANSIENT_RETRY);
        assert_eq!(retry_after(1, false), PERMANENT_RETRY);
        assert!(PERMANENT_RETRY > MAX_TRANSIENT_RETRY);
    }
}
