//! Held builds (`HeldBuild`, what is kept of a loaded build) and builds
//! the core finished: the write that records them (for a success with a
//! binary cache, once its outputs are uploaded: see [`super::upload`]),
//! and forgetting what nobody needs any more.

use super::*;

/// What the queue runner keeps of a queued build while it holds it: what
/// scheduling and recording its end need, without the names that only the
/// web UI shows (a farm holds 100,000 of these).
#[derive(Debug, Clone)]
pub struct HeldBuild {
    pub id: i32,
    pub jobset_id: i32,
    /// The top-level derivation (sharing the string the core holds).
    pub drv_path: DrvPath,
    /// `Builds.globalPriority` as last seen.
    pub global_priority: i32,
    pub max_silent_s: u32,
    pub timeout_s: u32,
    /// As [`crate::db::queue::QueuedBuild::outputs`], packed: read them
    /// with [`HeldBuild::outputs`].
    outputs: crate::compact::CompactOutputs,
}

impl HeldBuild {
    /// What is kept of a loaded build; `drv_path` is its top-level
    /// derivation's path, interned.
    pub fn of(build: &crate::db::queue::QueuedBuild, drv_path: DrvPath) -> HeldBuild {
        HeldBuild {
            id: build.id,
            jobset_id: build.jobset_id,
            drv_path,
            global_priority: build.global_priority,
            max_silent_s: build.max_silent_s,
            timeout_s: build.timeout_s,
            outputs: crate::compact::CompactOutputs::new(
                &build.drv_path,
                build
                    .outputs
                    .iter()
                    .map(|(n, p)| (n.as_str(), p.as_deref())),
            ),
        }
    }

    /// Its outputs (recorded in `BuildOutputs`): name, path when known.
    pub fn outputs(&self) -> impl Iterator<Item = (&str, Option<std::borrow::Cow<'_, str>>)> {
        self.outputs.iter(self.drv_path.as_str())
    }
}

impl Driver {
    pub(super) fn build_finished(&mut self, finished: sluice_core::BuildFinished) {
        let mut ids = vec![(finished.build, finished.status)];
        ids.extend(finished.dependents.iter().map(|d| (d.build, d.status)));
        let mut builds = Vec::new();
        for (id, status) in ids {
            let Some(build) = self.builds.remove(&id) else {
                continue;
            };
            self.started_builds.remove(&id);
            // Finished as far as loads go, even while its write waits for
            // an upload (`upload.rs`): a load must not take it for queued.
            self.recently_finished.insert(id, false);
            let built = self.built_outputs.get(&build.drv_path);
            builds.push(writer::FinishedBuild {
                status: status.code(),
                outputs: built.map(|b| b.outputs.clone()),
                // Outputs known before this run (recorded) carry no times.
                times: built
                    .filter(|b| b.start_time > 0)
                    .map(|b| (b.start_time, b.stop_time)),
                build,
            });
        }
        if builds.is_empty() {
            return;
        }
        // With a binary cache, a success is written once its outputs are in
        // the cache. (A success finishes one build: the step's, or a
        // cached one.)
        let upload = builds
            .first()
            .filter(|_| finished.status == sluice_core::Status::Success && self.uploads.is_some())
            .map(|b| b.build.drv_path.clone());
        if let Some(drv) = upload {
            self.finish_once_uploaded(finished.build, finished.cached, builds, &drv);
        } else {
            self.counters.builds_done += builds.len() as u64;
            self.send_write(WriteJob::FinishBuilds {
                head: finished.build,
                cached: finished.cached,
                failed_step: finished.failed_step.map(|d| d.as_str().to_string()),
                builds,
                time: unix_now(),
            });
        }
        // Forget closure details nobody needs any more.
        if self.builds.is_empty() {
            self.prune();
        }
    }

    /// Drops what the driver keeps about derivations the core no longer
    /// holds a step for (steps of failed or cancelled builds), so memory
    /// follows the queue, not the history.
    pub(super) fn prune(&mut self) {
        let core = &self.core;
        self.closure.retain(|drv, _| core.has_step(drv.as_str()));
        self.resolutions.retain(|drv| core.has_step(drv.as_str()));
        if self.builds.is_empty() {
            self.built_outputs.clear();
        }
        let live: HashSet<BuildId> = self.builds.keys().copied().collect();
        self.started_builds.retain(|b| live.contains(b));
    }
}
