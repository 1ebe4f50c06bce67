//! What outlives a session: the running jobs, and the link through which
//! they reach whichever session is current.
//!
//! A job belongs to the agent, not to the connection it arrived on. When a
//! session ends (the network dropped, the queue runner restarted) the job
//! goes on building; what it must tell the queue runner (its log, its
//! outputs and result) waits for the next session and goes there.
//!
//! Invariants: [`Link`] holds the current session or none; a job never
//! keeps a session past a failed call, it asks the link again. [`Jobs`]
//! holds every job until it has delivered its result (or was cancelled),
//! so the held steps a new session announces are exactly those; a job
//! holds a slot only while it builds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::task::{AbortHandle, JoinSet};
use tonic::{Code, Status};

use crate::cgroup::Cgroups;
use crate::nix_store::Placement;
use crate::session::SessionCtx;
use crate::topology::{Layout, Slot, SlotTable};

/// The current session, as jobs see it.
#[derive(Clone)]
pub(crate) struct Link(watch::Receiver<Option<Arc<SessionCtx>>>);

impl Link {
    /// A link that follows `sender`.
    pub(crate) fn from_sender(sender: &watch::Sender<Option<Arc<SessionCtx>>>) -> Link {
        Link(sender.subscribe())
    }

    /// The current session, if there is one now.
    pub(crate) fn now(&self) -> Option<Arc<SessionCtx>> {
        self.0.borrow().clone()
    }

    /// The current session, waiting for one if there is none.
    pub(crate) async fn session(&mut self) -> Arc<SessionCtx> {
        loop {
            if let Some(ctx) = self.0.borrow_and_update().clone() {
                return ctx;
            }
            if self.0.changed().await.is_err() {
                // The agent is stopping: the job is dropped with it.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Waits before trying a call again: until the session changes, or
    /// `pause` passes if it does not.
    pub(crate) async fn retry_pause(&mut self, pause: Duration) {
        let _ = tokio::time::timeout(pause, self.0.changed()).await;
    }
}

/// Whether a failed call may succeed later, on this session or the next:
/// the connection or the session failed, not the request.
pub(crate) fn worth_retrying(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Internal
            // An unknown session: it expired or the queue runner restarted.
            | Code::NotFound
            | Code::ResourceExhausted
    )
}

/// The agent's jobs, by step id.
pub(crate) struct Jobs {
    pub(crate) set: JoinSet<()>,
    running: HashMap<String, AbortHandle>,
    by_task: HashMap<tokio::task::Id, String>,
    slots: Arc<Slots>,
    phases: Phases,
}

/// The latest busy phase and slot each job reported, kept across sessions
/// so that a new session can tell the queue runner where its held steps
/// are (a restarted queue runner knows only their rows).
pub(crate) type Phases = Arc<parking_lot::Mutex<HashMap<String, (u32, Option<u32>)>>>;

/// The machine's job slots, shared by the jobs. A job waits here for a
/// slot (the queue runner may assign steps ahead of the free slots, see
/// `pb::RegisterRequest::prefetch`) and holds it only while it builds: a
/// job that only delivers its result holds none, since the queue runner
/// frees the slot when the result reaches it.
pub(crate) struct Slots {
    max_jobs: usize,
    /// Jobs building (holding a slot).
    building: AtomicUsize,
    /// The slots of the machine steps are pinned to, if they are.
    table: Option<parking_lot::Mutex<SlotTable>>,
    /// Where each step's cgroup is made, if cgroups are used.
    cgroups: Option<Arc<Cgroups>>,
    /// Set once the agent drains: jobs still waiting give their step back.
    draining: AtomicBool,
    /// Wakes the waiting jobs when a slot frees or the agent drains.
    changed: Notify,
}

impl Slots {
    /// Waits for a free slot: with pinning, one on the least-loaded NUMA
    /// node. `None` once the agent drains: the step never started.
    pub(crate) async fn acquire(self: &Arc<Self>) -> Option<SlotGuard> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.draining.load(Ordering::SeqCst) {
                return None;
            }
            if let Some(slot) = self.try_take() {
                return Some(slot);
            }
            changed.await;
        }
    }

    fn try_take(self: &Arc<Self>) -> Option<SlotGuard> {
        // Only this function takes slots, and only under the table's lock
        // or this compare-exchange: two jobs never get the same one.
        let mut n = self.building.load(Ordering::SeqCst);
        loop {
            if n >= self.max_jobs {
                return None;
            }
            match self
                .building
                .compare_exchange(n, n + 1, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => break,
                Err(now) => n = now,
            }
        }
        let pinned = match &self.table {
            Some(table) => {
                let mut t = table.lock();
                let taken = t.take().and_then(|index| match t.slot(index).cloned() {
                    Some(slot) => Some((index, slot)),
                    None => {
                        t.release(index);
                        None
                    }
                });
                match taken {
                    Some(taken) => Some(taken),
                    None => {
                        drop(t);
                        self.building.fetch_sub(1, Ordering::SeqCst);
                        return None;
                    }
                }
            }
            None => None,
        };
        Some(SlotGuard {
            slots: self.clone(),
            pinned,
        })
    }

    /// Jobs waiting for a slot give their steps back from now on.
    pub(crate) fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.changed.notify_waiters();
    }
}

/// A job's claim on a slot, released when dropped.
pub(crate) struct SlotGuard {
    slots: Arc<Slots>,
    /// The pinned slot: its index in the table, and what it is.
    pinned: Option<(usize, Slot)>,
}

impl SlotGuard {
    /// The pinned slot's index in the layout (the order the slots were
    /// registered in); `None` when steps are not pinned.
    pub(crate) fn index(&self) -> Option<u32> {
        self.pinned
            .as_ref()
            .and_then(|(index, _)| u32::try_from(*index).ok())
    }

    /// Where the job's step runs: its slot's CPUs and memory nodes, if it
    /// is pinned, and in a cgroup of its own, if cgroups are used.
    pub(crate) fn placement(&self) -> Placement<'_> {
        let slot = self.pinned.as_ref().map(|(_, slot)| slot);
        Placement {
            cpus: slot.map(|s| s.cpus.as_slice()),
            mems: slot.map_or(&[][..], |s| s.mems.as_slice()),
            cgroups: self.slots.cgroups.as_deref(),
        }
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if let (Some((index, _)), Some(table)) = (&self.pinned, &self.slots.table) {
            table.lock().release(*index);
        }
        self.slots.building.fetch_sub(1, Ordering::SeqCst);
        self.slots.changed.notify_waiters();
    }
}

impl Jobs {
    /// No jobs yet; at most `max_jobs` build at once, pinned to the slots
    /// of `layout`, if given, each in a cgroup of its own made by
    /// `cgroups`, if given.
    pub(crate) fn new(max_jobs: u32, layout: Option<Layout>, cgroups: Option<Cgroups>) -> Jobs {
        Jobs {
            set: JoinSet::new(),
            running: HashMap::new(),
            by_task: HashMap::new(),
            slots: Arc::new(Slots {
                max_jobs: max_jobs as usize,
                building: AtomicUsize::new(0),
                table: layout.map(|l| parking_lot::Mutex::new(SlotTable::new(l))),
                cgroups: cgroups.map(Arc::new),
                draining: AtomicBool::new(false),
                changed: Notify::new(),
            }),
            phases: Phases::default(),
        }
    }

    /// Where the jobs' sessions record their phases.
    pub(crate) fn phases(&self) -> Phases {
        self.phases.clone()
    }

    /// The latest phase (busy code, slot) of each held step that has
    /// reported one, in step order.
    pub(crate) fn held_phases(&self) -> Vec<(String, u32, Option<u32>)> {
        let mut phases = self.phases.lock();
        // A phase a cancelled job reported on its way out is dropped here.
        phases.retain(|step, _| self.running.contains_key(step));
        let mut held: Vec<(String, u32, Option<u32>)> = phases
            .iter()
            .map(|(step, (busy, slot))| (step.clone(), *busy, *slot))
            .collect();
        held.sort();
        held
    }

    /// The slots, for a new job to wait on.
    pub(crate) fn slots(&self) -> Arc<Slots> {
        self.slots.clone()
    }

    /// Steps held: waiting for a slot, building, or delivering a result.
    pub(crate) fn held(&self) -> Vec<String> {
        let mut steps: Vec<String> = self.running.keys().cloned().collect();
        steps.sort();
        steps
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// Stops every job; returns the steps they held.
    pub(crate) fn abort_all(&mut self) -> Vec<String> {
        let steps = self.held();
        for (_, handle) in self.running.drain() {
            handle.abort();
        }
        self.by_task.clear();
        self.phases.lock().clear();
        steps
    }

    /// Whether `step` is held.
    pub(crate) fn contains(&self, step: &str) -> bool {
        self.running.contains_key(step)
    }

    pub(crate) fn spawn(
        &mut self,
        step: String,
        job: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let handle = self.set.spawn(job);
        self.by_task.insert(handle.id(), step.clone());
        self.running.insert(step, handle);
    }

    /// Stops the job of `step`; whether there was one.
    pub(crate) fn cancel(&mut self, step: &str) -> bool {
        match self.running.remove(step) {
            Some(handle) => {
                handle.abort();
                self.phases.lock().remove(step);
                true
            }
            None => false,
        }
    }

    /// Forgets a job that ended.
    pub(crate) fn reap(&mut self, done: Result<(tokio::task::Id, ()), tokio::task::JoinError>) {
        let id = match &done {
            Ok((id, ())) => *id,
            Err(e) => e.id(),
        };
        if let Some(step) = self.by_task.remove(&id) {
            self.running.remove(&step);
            self.phases.lock().remove(&step);
        }
        if let Err(e) = done {
            if e.is_panic() {
                tracing::error!("a job panicked: {e}");
            }
        }
    }
}
