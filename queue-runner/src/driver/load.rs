//! Loading queued builds: from PostgreSQL (new rows only) and their
//! closures from the store, in a background task.
//!
//! Invariants: at most one load runs at a time; a notification that
//! arrives during a load schedules exactly one more; a load of new builds
//! reads only ids above the highest id already loaded, so its cost is
//! proportional to what is new. Restarted builds (ids below that mark) are
//! found by id only and loaded if not held. A build finished here is not
//! loaded again until its rows are written and a load has started since
//! (`Driver::recently_finished`), so a restart is seen at the next load.

use std::collections::HashSet;
use std::sync::Arc;

use sluice_core::{BuildId, BuildSpec, DrvPath, Event, JobsetId};

use super::{Driver, DriverEvent};
use crate::db::queue::{QueuedBuild, UndecodableBuild};
use crate::ingest::{self, BatchClosure, IngestError};

/// What a load found.
#[derive(Debug)]
pub struct LoadedBatch {
    pub builds: Vec<QueuedBuild>,
    /// Rows that could not be read as builds: aborted, each alone.
    pub undecodable: Vec<UndecodableBuild>,
    pub closure: BatchClosure,
    /// The batch was full: more new builds may be waiting.
    pub more: bool,
    /// A database or store error that stopped the load; retried on the next
    /// notification or resync.
    pub error: Option<String>,
}

#[derive(Debug)]
pub struct Loader {
    batch: i64,
    in_flight: bool,
    want_new: bool,
    want_restarted: bool,
    /// Highest build id loaded (or seen finished) so far.
    max_id: i32,
    /// The derivations the last load was told the core holds, and
    /// `Core::steps_unindexed` as it was then (see `Driver::held_drvs`);
    /// dropped when a load meets one that is not held after all.
    held_drvs: Option<(Arc<sluice_core::PathSet<DrvPath>>, u64)>,
}

impl Loader {
    pub fn new(batch: i64) -> Loader {
        Loader {
            batch: batch.max(1),
            in_flight: false,
            want_new: true,
            want_restarted: false,
            max_id: 0,
            held_drvs: None,
        }
    }
}

impl Driver {
    pub(super) fn load_new(&mut self) {
        self.loader.want_new = true;
        self.start_load();
    }

    pub(super) fn load_restarted(&mut self) {
        self.loader.want_restarted = true;
        self.start_load();
    }

    pub(super) fn start_load(&mut self) {
        self.start_load_ahead_of(None);
    }

    /// Starts a load; `ahead_of`, a batch loaded but not yet applied, counts
    /// as held already: the new load reads past neither its builds nor its
    /// derivations. A derivation of it that ends up with no step after all
    /// (its build was aborted, or it finished meanwhile) makes the builds
    /// that need it load again later ([`IngestError::NoLongerHeld`]), as
    /// for any step that finishes while a load reads.
    fn start_load_ahead_of(&mut self, ahead_of: Option<&LoadedBatch>) {
        // Nothing new is loaded while writes are backlogged: a load's
        // cached builds would only add to them. `drain_backlog` calls again.
        // Nor while a restart waits for agents to report their attempts:
        // their steps must be claimed before they are loaded.
        if self.loader.in_flight || !self.write_backlog.is_empty() || self.resuming() {
            return;
        }
        let restarted = std::mem::take(&mut self.loader.want_restarted);
        let new = std::mem::take(&mut self.loader.want_new);
        if !restarted && !new {
            return;
        }
        self.loader.in_flight = true;
        let pool = self.pool.clone();
        let store = self.store.clone();
        let hashes = self.hashes.clone();
        let me = self.me.clone();
        let after = self.loader.max_id;
        let limit = self.loader.batch;
        // Builds whose rows were written before this load starts are seen
        // finished by it: no need to keep them out any more.
        self.recently_finished.retain(|_, written| !*written);
        let ahead_builds = ahead_of.into_iter().flat_map(|b| {
            b.builds
                .iter()
                .map(|build| build.id)
                .chain(b.undecodable.iter().map(|bad| bad.id))
        });
        // Only a load of restarted builds asks which builds are held.
        let held: HashSet<i32> = if restarted {
            self.builds
                .keys()
                .chain(self.recently_finished.keys())
                .map(|b| b.0)
                .chain(ahead_builds)
                .collect()
        } else {
            HashSet::new()
        };
        let held_drvs = self.held_drvs(ahead_of);
        tokio::spawn(async move {
            let batch = load(
                pool, store, hashes, after, limit, restarted, held, held_drvs,
            )
            .await;
            let _ = me.send(DriverEvent::Loaded(batch)).await;
        });
    }

    /// What the core holds as a load starts, and `ahead_of`'s
    /// derivations: the reader stops there.
    ///
    /// Taken afresh (from the driver's table, keeping what the core
    /// holds: the table may keep an entry a little longer), that costs
    /// every held derivation, per batch. So the last load's copy is kept
    /// and extended by the next batch's derivations, as long as no step
    /// has left the core since it was taken and no load has met a
    /// derivation the copy wrongly holds ([`IngestError::NoLongerHeld`]:
    /// one of a batch's derivations that got no step after all). Either
    /// makes the next copy a fresh one. A copy short of a held derivation
    /// (a resolved step added meanwhile) only makes the reader read it.
    fn held_drvs(&mut self, ahead_of: Option<&LoadedBatch>) -> Arc<sluice_core::PathSet<DrvPath>> {
        let unindexed = self.core.steps_unindexed();
        let kept = match self.loader.held_drvs.take() {
            Some((copy, at)) if at == unindexed => Arc::into_inner(copy),
            _ => None,
        };
        let ahead = ahead_of.into_iter().flat_map(|b| b.closure.drvs.keys());
        let held_drvs = match kept {
            Some(mut copy) => {
                copy.extend(ahead.cloned());
                copy
            }
            None => {
                let core = &self.core;
                let mut copy = sluice_core::PathSet::with_capacity_and_hasher(
                    self.closure.len() + ahead_of.map_or(0, |b| b.closure.drvs.len()),
                    sluice_core::PathHasher::default(),
                );
                copy.extend(
                    self.closure
                        .keys()
                        .filter(|drv| core.has_step(drv.as_str()))
                        .chain(ahead)
                        .cloned(),
                );
                copy
            }
        };
        let held_drvs = Arc::new(held_drvs);
        self.loader.held_drvs = Some((held_drvs.clone(), unindexed));
        held_drvs
    }

    pub(super) fn on_loaded(&mut self, batch: LoadedBatch) {
        const MID_LOAD_FAILPOINT: &str = "abort-mid-load";
        self.loader.in_flight = false;
        if let Some(error) = &batch.error {
            // Nothing of a failed load is used: a build whose closure could
            // not be read must not look cached. Try again shortly.
            tracing::error!(%error, "loading queued builds failed; retrying in 5s");
            let me = self.me.clone();
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                let _ = me.send(DriverEvent::Resync).await;
            });
            return;
        }
        if batch.more {
            self.loader.want_new = true;
            // The next batch is read while this one is applied.
            let last = batch
                .builds
                .iter()
                .map(|b| b.id)
                .chain(batch.undecodable.iter().map(|b| b.id))
                .max();
            if let Some(last) = last {
                self.loader.max_id = self.loader.max_id.max(last);
            }
            self.start_load_ahead_of(Some(&batch));
        }
        for bad in batch.undecodable {
            self.loader.max_id = self.loader.max_id.max(bad.id);
            if !self.is_held(BuildId(bad.id)) {
                self.abort_loaded_build(bad.id, bad.drv_path, bad.error);
            }
        }
        self.hold_dispatches = true;
        // The builds go to the core in one event (it computes critical
        // paths once for all of them); the steps of those before count as
        // held for those after.
        let mut queued = Vec::new();
        let mut in_event: sluice_core::PathSet<DrvPath> = sluice_core::PathSet::default();
        for build in batch.builds {
            self.loader.max_id = self.loader.max_id.max(build.id);
            let id = BuildId(build.id);
            if self.is_held(id) {
                continue;
            }
            let core = &self.core;
            let steps = match batch.closure.steps_for(&build.drv_path, |drv| {
                core.has_step(drv) || in_event.contains(drv)
            }) {
                Ok(steps) => steps,
                Err(IngestError::NoLongerHeld { path }) => {
                    // The copy that said it was held is wrong: the next
                    // load takes a fresh one.
                    self.loader.held_drvs = None;
                    // Read again by the next load, which looks for
                    // unfinished builds it does not hold.
                    tracing::debug!(build = build.id, drv = %path, "loading a build again: a step it needs finished meanwhile");
                    self.loader.want_restarted = true;
                    continue;
                }
                Err(e) => {
                    self.abort_loaded_build(build.id, build.drv_path, e.to_string());
                    continue;
                }
            };
            for step in &steps {
                in_event.insert(step.drv_path.clone());
                if let Some(d) = batch.closure.drvs.get(step.drv_path.as_str()) {
                    if !self.closure.contains_key(&step.drv_path) {
                        let held = d.held(&mut |s| intern(&mut self.systems, s));
                        self.closure.insert(step.drv_path.clone(), held);
                    }
                }
            }
            // A build of a content-addressed derivation whose outputs are
            // recorded finishes cached, with those paths.
            if let Some(realised) = batch.closure.realised.get(&build.drv_path) {
                self.built_outputs
                    .entry(DrvPath::from(build.drv_path.as_str()))
                    .or_insert_with(|| super::BuiltStep {
                        outputs: realised
                            .iter()
                            .map(|r| (r.output.clone(), r.out_path.clone()))
                            .collect(),
                        start_time: 0,
                        stop_time: 0,
                    });
            }
            // The top's path as the closure interned it, shared with the
            // core's step.
            let top_drv = batch
                .closure
                .drvs
                .get_key_value(build.drv_path.as_str())
                .map_or_else(
                    || DrvPath::from(build.drv_path.as_str()),
                    |(p, _)| p.clone(),
                );
            let spec = BuildSpec {
                id,
                jobset: JobsetId(build.jobset_id),
                global_priority: build.global_priority,
                priority: build.priority,
                timestamp: build.timestamp,
                top_drv: top_drv.clone(),
            };
            self.set_jobset_shares(build.jobset_id, build.scheduling_shares);
            self.builds
                .insert(id, super::HeldBuild::of(&build, top_drv));
            queued.push((spec, steps));
        }
        drop(in_event);
        if !queued.is_empty() {
            self.counters.builds_read += queued.len() as u64;
            self.apply(Event::BuildsQueued { builds: queued });
        }
        // With the next batch being read from a kept copy of the held
        // derivations, and builds left to read.
        if batch.more && crate::failpoint::armed(MID_LOAD_FAILPOINT) {
            crate::failpoint::abort(MID_LOAD_FAILPOINT);
        }
        self.hold_dispatches = false;
        if !batch.more {
            // Every queued build is loaded: a claim still unused belongs
            // to a build that is gone.
            self.withdraw_unused_claims();
            // And the graph stops growing for now: give back what its
            // vectors of dependents kept spare while it grew, and the copy
            // of the held derivations kept for the next batch.
            self.core.trim_dependents();
            self.loader.held_drvs = None;
        }
        self.start_deferred_dispatches();
        self.start_load();
    }

    /// Whether build `id` is held, or finished here and maybe not yet seen
    /// finished by a load: a load must not take it for a queued one.
    fn is_held(&self, id: BuildId) -> bool {
        self.builds.contains_key(&id) || self.recently_finished.contains_key(&id)
    }

    /// Aborts a loaded build that cannot be built at all (its row or its
    /// closure cannot be read), with a step row saying why.
    fn abort_loaded_build(&mut self, build: i32, drv_path: String, error: String) {
        tracing::error!(build, %error, "aborting a build that cannot be read");
        self.recently_finished.insert(BuildId(build), false);
        self.send_write(super::writer::WriteJob::AbortBuild {
            build,
            drv_path,
            error,
            time: super::unix_now(),
        });
    }

    /// Tells the core a jobset's scheduling shares, if they are news.
    pub(super) fn set_jobset_shares(&mut self, jobset: i32, shares: u32) {
        if self.jobset_shares.insert(jobset, shares) != Some(shares) {
            self.apply(Event::JobsetShares {
                jobset: JobsetId(jobset),
                shares,
            });
        }
    }

    /// Reads every jobset's shares again, in the background.
    pub(super) fn reload_jobset_shares(&mut self) {
        let pool = self.pool.clone();
        let me = self.me.clone();
        tokio::spawn(async move {
            match crate::db::held::jobset_shares(&pool).await {
                Ok(rows) => {
                    let shares = rows
                        .into_iter()
                        .map(|(id, n)| (id, u32::try_from(n).unwrap_or(1).max(1)))
                        .collect();
                    let _ = me.send(DriverEvent::JobsetShares(shares)).await;
                }
                Err(e) => tracing::error!(
                    error = %crate::db::describe_sqlx_error(&e),
                    "reading the jobsets' scheduling shares failed"
                ),
            }
        });
    }

    /// Asks the database which held builds finished (cancelled, deleted) or,
    /// with `bumped`, changed global priority.
    pub(super) fn check_held_builds(&mut self, bumped: bool) {
        let held: Vec<(i32, i32)> = self
            .builds
            .iter()
            .map(|(id, b)| (id.0, b.global_priority))
            .collect();
        if held.is_empty() {
            return;
        }
        let pool = self.pool.clone();
        let me = self.me.clone();
        tokio::spawn(async move {
            let ids: Vec<i32> = held.iter().map(|(id, _)| *id).collect();
            match crate::db::held::unfinished_priorities(&pool, &ids).await {
                Ok(live) => {
                    let live: std::collections::HashMap<i32, i32> = live.into_iter().collect();
                    let gone = ids
                        .iter()
                        .filter(|id| !live.contains_key(id))
                        .map(|id| BuildId(*id))
                        .collect::<Vec<_>>();
                    if !gone.is_empty() {
                        let _ = me.send(DriverEvent::BuildsGone(gone)).await;
                    }
                    if bumped {
                        let changed = held
                            .iter()
                            .filter_map(|(id, old)| {
                                live.get(id)
                                    .filter(|new| *new != old)
                                    .map(|new| (BuildId(*id), *new))
                            })
                            .collect::<Vec<_>>();
                        if !changed.is_empty() {
                            let _ = me.send(DriverEvent::BuildsBumped(changed)).await;
                        }
                    }
                }
                Err(e) => tracing::error!(error = %e, "checking held builds failed"),
            }
        });
    }
}

#[allow(clippy::too_many_arguments)]
async fn load(
    pool: sqlx::PgPool,
    store: crate::store::Store,
    hashes: crate::ca::Hashes,
    after: i32,
    limit: i64,
    restarted: bool,
    held: HashSet<i32>,
    held_drvs: Arc<sluice_core::PathSet<DrvPath>>,
) -> LoadedBatch {
    let mut batch = LoadedBatch {
        builds: Vec::new(),
        undecodable: Vec::new(),
        closure: BatchClosure::default(),
        more: false,
        error: None,
    };
    let result: Result<(), String> = async {
        let mut conn = acquire(&pool).await?;
        if restarted {
            let ids = crate::db::queue::unfinished_build_ids(&mut conn, after)
                .await
                .map_err(|e| e.to_string())?;
            let missing: Vec<i32> = ids.into_iter().filter(|id| !held.contains(id)).collect();
            if !missing.is_empty() {
                let mut b = crate::db::queue::load_builds_by_ids(&mut conn, &missing)
                    .await
                    .map_err(|e| e.to_string())?;
                batch.builds.append(&mut b.builds);
                batch.undecodable.append(&mut b.undecodable);
            }
        }
        let mut new = crate::db::queue::load_builds_after(&mut conn, after, limit as u32)
            .await
            .map_err(|e| e.to_string())?;
        batch.more = (new.builds.len() + new.undecodable.len()) as i64 >= limit;
        batch.builds.append(&mut new.builds);
        batch.undecodable.append(&mut new.undecodable);
        // A queued build with step rows already was restarted (a build
        // whose derivation failed for good finished with it): the cached
        // failures its rows name under a `.drv` path are forgotten, as the
        // web UI forgets their output paths. Done at every load, not only
        // on `builds_restarted`, so a queue runner that dies before it
        // hears of a restart forgets them when it loads the build again.
        let ids: Vec<i32> = batch.builds.iter().map(|b| b.id).collect();
        let forgotten = crate::db::results::forget_failed_derivations(&mut conn, &ids)
            .await
            .map_err(|e| e.to_string())?;
        if forgotten > 0 {
            tracing::info!(
                derivations = forgotten,
                "restarted builds: the cached failures of their derivations are forgotten"
            );
        }
        drop(conn);
        if batch.builds.is_empty() {
            return Ok(());
        }
        let mut client = store.connect().await.map_err(|e| e.to_string())?;
        let tops: Vec<String> = batch.builds.iter().map(|b| b.drv_path.clone()).collect();
        let dir = store.store_dir().clone();
        // Realisations come from the database, else from the store (built
        // there by hand, or recorded before the database was); those the
        // store gave are recorded once their paths prove valid.
        let store_realisations = StoreRealisations::new(store.clone());
        let lookup = |keys: Vec<(String, String)>| {
            let (pool, store_realisations) = (pool.clone(), &store_realisations);
            async move {
                let mut conn = acquire(&pool).await?;
                let mut found = crate::db::results::lookup_realisations(&mut conn, &keys)
                    .await
                    .map_err(|e| e.to_string())?;
                drop(conn);
                let missing: Vec<(String, String)> = keys
                    .into_iter()
                    .filter(|k| !found.contains_key(k))
                    .collect();
                found.extend(store_realisations.ask(&missing).await);
                Ok(found)
            }
        };
        batch.closure = ingest::read_closures(
            &mut client,
            &dir,
            &tops,
            &|drv: &str| held_drvs.contains(drv),
            |p: &str| std::fs::read(p),
            &hashes,
            lookup,
        )
        .await;
        if batch.closure.drvs.values().any(|d| !d.keys.is_empty()) {
            if let Err(cause) = supports_content_addressed(&store, &mut client).await {
                batch.closure.refuse_content_addressed(&cause);
            }
        }
        drop(client);
        if let Some(error) = batch.closure.transient.take() {
            // Nothing of this batch is used; the load is retried.
            return Err(error);
        }
        let mut conn = acquire(&pool).await?;
        store_realisations
            .record_valid(&mut conn, &batch.closure)
            .await?;
        mark_known_failures(&mut conn, &mut batch.closure).await?;
        expect_build_times(&mut conn, &mut batch.closure).await
    }
    .await;
    if let Err(e) = result {
        batch.error = Some(e);
    }
    batch
}

/// A connection from `pool`, or why there is none, in one line.
async fn acquire(
    pool: &sqlx::PgPool,
) -> Result<sqlx::pool::PoolConnection<sqlx::Postgres>, String> {
    pool.acquire()
        .await
        .map_err(|e| crate::db::describe_sqlx_error(&e))
}

/// The realisations a load asks of the queue runner's own store, for keys
/// the database lacks: on one connection of their own for the whole load,
/// one key a round trip (the daemon protocol has no batch query). A store
/// without `ca-derivations` drops the connection at the first question,
/// which only means it knows none, and is not asked again by this load; so
/// is one that fails otherwise, which costs a rebuild at worst.
struct StoreRealisations {
    store: crate::store::Store,
    /// `None` until the first question; then the connection, or `Err`
    /// once the store would not answer.
    client: tokio::sync::Mutex<Option<Result<crate::grpc::store::PooledClient, ()>>>,
    /// The keys it answered.
    answered: parking_lot::Mutex<HashSet<(String, String)>>,
}

impl StoreRealisations {
    fn new(store: crate::store::Store) -> StoreRealisations {
        StoreRealisations {
            store,
            client: tokio::sync::Mutex::new(None),
            answered: parking_lot::Mutex::default(),
        }
    }

    /// The output paths the store knows of `keys` (hash, output name).
    async fn ask(
        &self,
        keys: &[(String, String)],
    ) -> std::collections::HashMap<(String, String), String> {
        use sluice_nix::daemon::DrvOutput;
        let mut found = std::collections::HashMap::new();
        if keys.is_empty() {
            return found;
        }
        let mut slot = self.client.lock().await;
        if slot.is_none() {
            *slot = Some(self.store.connect().await.map_err(|e| {
                tracing::debug!(error = %e, "realisations not asked of the store");
            }));
        }
        let Some(Ok(client)) = slot.as_mut() else {
            return found;
        };
        for (hash, output) in keys {
            let Ok(drv_hash) = sluice_nix::hash::Hash::parse_prefixed(hash) else {
                continue;
            };
            let id = DrvOutput::ByHash {
                drv_hash,
                output: output.clone(),
            };
            match client.query_realisation(&id).await {
                Ok(Some(r)) => {
                    let path = self.store.store_dir().print(&r.out_path);
                    found.insert((hash.clone(), output.clone()), path);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "the store answers no realisation queries");
                    *slot = Some(Err(()));
                    break;
                }
            }
        }
        self.answered.lock().extend(found.keys().cloned());
        found
    }

    /// Records the realisations of `closure`'s valid derivations that the
    /// store gave, so that resolving their dependents, which reads only the
    /// database, finds them.
    async fn record_valid(
        &self,
        conn: &mut sqlx::PgConnection,
        closure: &BatchClosure,
    ) -> Result<(), String> {
        let answered = self.answered.lock().clone();
        if answered.is_empty() {
            return Ok(());
        }
        let learnt: Vec<crate::db::results::Realisation> = closure
            .realised
            .values()
            .flatten()
            .filter(|r| answered.contains(&(r.drv_hash.clone(), r.output.clone())))
            .cloned()
            .collect();
        if learnt.is_empty() {
            return Ok(());
        }
        crate::db::results::record_realisations(conn, &learnt)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(
            realisations = learnt.len(),
            "recorded realisations the local store knew and the database did not"
        );
        Ok(())
    }
}

/// Whether the queue runner's store can hold realisations (Nix's
/// experimental feature `ca-derivations`): asked with a realisation query,
/// which a daemon without the feature refuses (Nix 2.8 by dropping the
/// connection, while a fresh one still answers). The error says what to
/// do.
async fn supports_content_addressed(
    store: &crate::store::Store,
    client: &mut sluice_nix::daemon::DaemonClient,
) -> Result<(), String> {
    use sluice_nix::daemon::{ClientError, DrvOutput};
    let probe = DrvOutput::ByHash {
        drv_hash: sluice_nix::hash::Hash::sha256(b"sluice: does this store know realisations?"),
        output: "out".to_owned(),
    };
    let refused = |e: &dyn std::fmt::Display| {
        format!(
            "the queue runner's Nix store does not take content-addressed outputs \
             (enable the experimental feature with `experimental-features = ca-derivations` \
             in its nix.conf): {e}"
        )
    };
    match client.query_realisation(&probe).await {
        Ok(_) => Ok(()),
        Err(e @ ClientError::Remote { .. }) => Err(refused(&e)),
        Err(e @ (ClientError::Disconnected { .. } | ClientError::Closed { .. })) => {
            let alive = match store.connect().await {
                Ok(mut fresh) => fresh
                    .query_valid_paths(std::iter::empty(), false)
                    .await
                    .is_ok(),
                Err(_) => false,
            };
            if alive {
                Err(refused(&e))
            } else {
                // The daemon itself is gone: the load fails elsewhere.
                Ok(())
            }
        }
        // Anything else is the connection's trouble, not an answer.
        Err(_) => Ok(()),
    }
}

/// Marks the derivations of `closure` that `FailedPaths` names
/// ([`sluice_core::StepSpec::known_failed`], see
/// [`ingest::ClosureDrv::failure_paths`]), in one lookup for the batch.
async fn mark_known_failures(
    conn: &mut sqlx::PgConnection,
    closure: &mut BatchClosure,
) -> Result<(), String> {
    let paths: Vec<String> = closure
        .drvs
        .iter()
        .flat_map(|(path, d)| d.failure_paths(path.as_str()).map(str::to_owned))
        .collect();
    if paths.is_empty() {
        return Ok(());
    }
    let failed = crate::db::results::failed_paths_among(conn, &paths)
        .await
        .map_err(|e| e.to_string())?;
    if failed.is_empty() {
        return Ok(());
    }
    for (path, drv) in closure.drvs.iter_mut() {
        if drv.failure_paths(path.as_str()).any(|p| failed.contains(p)) {
            drv.spec.known_failed = true;
        }
    }
    Ok(())
}

/// Fills in how long each derivation is expected to build, from the
/// times recorded for its name (one lookup for the batch); the core
/// uses its default for names never built.
async fn expect_build_times(
    conn: &mut sqlx::PgConnection,
    closure: &mut BatchClosure,
) -> Result<(), String> {
    let mut names: Vec<&str> = closure
        .drvs
        .keys()
        .map(|drv| crate::db::results::build_time_name(drv.as_str()))
        .collect();
    names.sort_unstable();
    names.dedup();
    if names.is_empty() {
        return Ok(());
    }
    let times = crate::db::results::lookup_build_times(conn, &names)
        .await
        .map_err(|e| e.to_string())?;
    for (drv, d) in closure.drvs.iter_mut() {
        if let Some(ms) = times.get(crate::db::results::build_time_name(drv.as_str())) {
            d.spec.expected_ms = Some(u32::try_from(*ms).unwrap_or(u32::MAX));
        }
    }
    Ok(())
}

/// The index of `name` in `names`, added if missing (a farm has a few
/// systems: a scan is quicker than a hash).
pub(super) fn intern(names: &mut Vec<Arc<str>>, name: &str) -> usize {
    if let Some(known) = names.iter().position(|n| &**n == name) {
        return known;
    }
    names.push(Arc::from(name));
    names.len() - 1
}
