//! The registry of attempts in flight, shared by the driver and the gRPC
//! service.
//!
//! The driver registers an attempt ([`Attempts::register`]) before it sends
//! the assignment (or, after a restart, [`Attempts::register_adopted`] when
//! it adopts one an agent still runs), and removes it
//! ([`Attempts::remove`]) once the attempt's end is settled: its reported
//! result committed, or the driver gave it up (cancel, lease expired). The
//! service consults it on every call that names an attempt: only the
//! machine the attempt was given to may stream its log, fetch its inputs,
//! upload its outputs or report its result.
//!
//! Invariants: an attempt belongs to exactly one machine (one agent, across
//! its reconnections) for its whole life; an output is recorded as
//! uploaded only after its NAR was verified against the declared size and
//! hash and imported into the store; a result is accepted at most once per
//! attempt, and a repeated report waits for the first one's commit; the
//! agent hears "accepted" only once the result is committed. The lock is
//! never held across an `.await`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use parking_lot::Mutex;
use sluice_core::MachineId;
use sluice_nix::daemon::PathInfo;
use sluice_nix::derivation::{Derivation, DerivationOutput};
use sluice_nix::hash::{Hash, HashAlgo};
use sluice_nix::store_path::{output_path_name, ContentAddressMethod, StoreDir, StorePath};
use thiserror::Error;
use tokio::sync::watch;

use crate::agents::{Assignment, AttemptId};
use crate::logs::LogWriter;

/// Why an assignment cannot be registered.
#[derive(Debug, Error)]
pub enum AttemptError {
    #[error("{attempt}: '{path}' is not a store path: {reason}")]
    BadPath {
        attempt: AttemptId,
        path: String,
        reason: String,
    },
    #[error("{attempt}: the derivation of '{drv}' does not parse: {reason}")]
    BadDerivation {
        attempt: AttemptId,
        drv: String,
        reason: String,
    },
    #[error("{attempt} is already registered")]
    Duplicate { attempt: AttemptId },
}

/// Why a call that names an attempt is refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub(crate) enum AccessError {
    #[error("{0} is not in progress (finished, cancelled or never assigned)")]
    Unknown(AttemptId),
    #[error("{0} was not assigned to this agent")]
    NotYours(AttemptId),
    #[error("{0} has already reported its result")]
    Reported(AttemptId),
    #[error("{0} is not known yet: the queue runner restarted and is waiting for agents to report what they run; try again")]
    Resuming(AttemptId),
}

impl From<AccessError> for tonic::Status {
    fn from(e: AccessError) -> tonic::Status {
        let msg = e.to_string();
        match e {
            // Not "not found", which names an unknown session: an attempt
            // given up (or already recorded) is over for good.
            AccessError::Unknown(_) => tonic::Status::aborted(msg),
            AccessError::Resuming(_) => tonic::Status::unavailable(msg),
            AccessError::NotYours(_) => tonic::Status::permission_denied(msg),
            AccessError::Reported(_) => tonic::Status::failed_precondition(msg),
        }
    }
}

/// Why an upload or a result does not fit the attempt.
#[derive(Debug, Error, PartialEq, Eq)]
pub(crate) enum OutputError {
    #[error("the derivation has no output '{0}'")]
    NoSuchOutput(String),
    #[error("output '{name}' must be '{expected}', not '{got}'")]
    WrongPath {
        name: String,
        expected: String,
        got: String,
    },
    #[error("output '{name}': {problem}")]
    BadContentAddress { name: String, problem: String },
    #[error("output '{name}' refers to '{reference}', which is neither an input nor an output")]
    StrayReference { name: String, reference: String },
    #[error("the outputs' NARs total {total} bytes, over the limit of {limit}")]
    TooLarge { total: u64, limit: u64 },
    #[error("the result lists outputs {got:?}, the derivation has {expected:?}")]
    OutputSet {
        expected: Vec<String>,
        got: Vec<String>,
    },
    #[error("output '{0}' was reported but never uploaded")]
    NotUploaded(String),
}

impl From<OutputError> for tonic::Status {
    fn from(e: OutputError) -> tonic::Status {
        let msg = e.to_string();
        match e {
            OutputError::TooLarge { .. } => tonic::Status::resource_exhausted(msg),
            OutputError::NotUploaded(_) => tonic::Status::failed_precondition(msg),
            _ => tonic::Status::permission_denied(msg),
        }
    }
}

/// Where an output must end up.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ExpectedOutput {
    /// Known in advance: input-addressed and fixed outputs.
    Path(StorePath),
    /// A floating content-addressed output: its path follows from its
    /// contents, so only its name and how it is addressed are known.
    Floating {
        name: String,
        method: ContentAddressMethod,
        algo: HashAlgo,
    },
}

/// An output whose NAR was verified and imported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadedOutput {
    pub path: StorePath,
    pub nar_hash: Hash,
    pub nar_size: u64,
}

/// One attempt, as the driver registered it plus what the service has
/// verified since.
#[derive(Debug, Clone)]
pub struct AttemptEntry {
    machine: MachineId,
    drv_path: StorePath,
    outputs: BTreeMap<String, ExpectedOutput>,
    /// The basic derivation's input sources: the input closure is theirs,
    /// computed (from the store's path-info cache) when a call needs it,
    /// so an attempt never holds a closure that may have 50,000 paths.
    input_roots: Vec<StorePath>,
    max_log_bytes: u64,
    max_output_bytes: u64,
    uploaded: BTreeMap<String, UploadedOutput>,
}

fn parse_path(attempt: AttemptId, path: &str) -> Result<StorePath, AttemptError> {
    StoreDir::default()
        .parse_path(path)
        .map_err(|e| AttemptError::BadPath {
            attempt,
            path: path.to_owned(),
            reason: e.to_string(),
        })
}

impl AttemptEntry {
    /// The entry for `assignment`, given to `machine`: its outputs come from
    /// parsing the basic derivation, its allowed inputs from the closure.
    pub fn from_assignment(
        machine: MachineId,
        assignment: &Assignment,
    ) -> Result<AttemptEntry, AttemptError> {
        let attempt = assignment.attempt;
        let drv_path = parse_path(attempt, &assignment.drv_path)?;
        let bad_drv = |reason: String| AttemptError::BadDerivation {
            attempt,
            drv: assignment.drv_path.clone(),
            reason,
        };
        let dir = StoreDir::default();
        let drv = Derivation::parse_drv_file(&dir, &drv_path, assignment.basic_drv.as_bytes())
            .map_err(|e| bad_drv(e.to_string()))?;
        if !drv.input_drvs.is_empty() {
            return Err(bad_drv("it still has input derivations".into()));
        }
        let mut outputs = BTreeMap::new();
        for (name, output) in &drv.outputs {
            let expected = match output {
                DerivationOutput::CAFloating { method, hash_algo } => ExpectedOutput::Floating {
                    name: output_path_name(&drv.name, name),
                    method: *method,
                    algo: *hash_algo,
                },
                other => match other.path(&dir, &drv.name, name) {
                    Ok(Some(path)) => ExpectedOutput::Path(path),
                    Ok(None) => {
                        return Err(bad_drv(format!(
                            "output '{name}' is deferred or impure, which an agent cannot build"
                        )))
                    }
                    Err(e) => return Err(bad_drv(format!("output '{name}': {e}"))),
                },
            };
            outputs.insert(name.clone(), expected);
        }
        Ok(AttemptEntry {
            machine,
            drv_path,
            outputs,
            input_roots: drv.input_srcs.iter().cloned().collect(),
            max_log_bytes: assignment.max_log_bytes,
            max_output_bytes: assignment.max_output_bytes,
            uploaded: BTreeMap::new(),
        })
    }

    pub fn machine(&self) -> MachineId {
        self.machine
    }

    pub fn drv_path(&self) -> &StorePath {
        &self.drv_path
    }

    /// The outputs uploaded and verified so far, by output name.
    pub fn uploaded(&self) -> &BTreeMap<String, UploadedOutput> {
        &self.uploaded
    }

    /// The roots of the input closure (the basic derivation's input
    /// sources).
    pub fn input_roots(&self) -> &[StorePath] {
        &self.input_roots
    }

    /// Checks that `info` may be imported as output `name`;
    /// `input_refs` holds those of its references that are in the input
    /// closure (the caller computes the closure).
    pub(crate) fn check_upload(
        &self,
        name: &str,
        info: &PathInfo,
        input_refs: &BTreeSet<StorePath>,
    ) -> Result<(), OutputError> {
        let expected = self
            .outputs
            .get(name)
            .ok_or_else(|| OutputError::NoSuchOutput(name.to_owned()))?;
        let dir = StoreDir::default();
        match expected {
            ExpectedOutput::Path(path) => {
                if *path != info.path {
                    return Err(OutputError::WrongPath {
                        name: name.to_owned(),
                        expected: dir.print(path),
                        got: dir.print(&info.path),
                    });
                }
            }
            ExpectedOutput::Floating {
                name: path_name,
                method,
                algo,
            } => check_floating(name, path_name, *method, *algo, info)?,
        }
        let known_outputs: BTreeSet<&StorePath> = self
            .outputs
            .values()
            .filter_map(|o| match o {
                ExpectedOutput::Path(p) => Some(p),
                ExpectedOutput::Floating { .. } => None,
            })
            .chain(self.uploaded.values().map(|u| &u.path))
            .collect();
        for r in &info.references {
            if *r != info.path && !input_refs.contains(r) && !known_outputs.contains(r) {
                return Err(OutputError::StrayReference {
                    name: name.to_owned(),
                    reference: dir.print(r),
                });
            }
        }
        if self.max_output_bytes > 0 {
            let others: u64 = self
                .uploaded
                .iter()
                .filter(|(n, _)| n.as_str() != name)
                .map(|(_, u)| u.nar_size)
                .sum();
            let total = others.saturating_add(info.nar_size);
            if total > self.max_output_bytes {
                return Err(OutputError::TooLarge {
                    total,
                    limit: self.max_output_bytes,
                });
            }
        }
        Ok(())
    }

    /// Checks a successful result's outputs against the derivation and the
    /// uploads; returns the paths, which the caller checks for validity.
    pub(crate) fn check_success(
        &self,
        outputs: &[(String, String)],
    ) -> Result<Vec<StorePath>, OutputError> {
        let got: BTreeSet<&str> = outputs.iter().map(|(n, _)| n.as_str()).collect();
        let expected: BTreeSet<&str> = self.outputs.keys().map(String::as_str).collect();
        if got != expected || got.len() != outputs.len() {
            return Err(OutputError::OutputSet {
                expected: expected.into_iter().map(str::to_owned).collect(),
                got: outputs.iter().map(|(n, _)| n.clone()).collect(),
            });
        }
        let dir = StoreDir::default();
        let mut paths = Vec::with_capacity(outputs.len());
        for (name, path) in outputs {
            let wrong = |expected: String| OutputError::WrongPath {
                name: name.clone(),
                expected,
                got: path.clone(),
            };
            let required = match self.outputs.get(name) {
                Some(ExpectedOutput::Path(p)) => p.clone(),
                _ => match self.uploaded.get(name) {
                    Some(u) => u.path.clone(),
                    None => return Err(OutputError::NotUploaded(name.clone())),
                },
            };
            if dir.print(&required) != *path {
                return Err(wrong(dir.print(&required)));
            }
            paths.push(required);
        }
        Ok(paths)
    }
}

/// A floating output's path must be the content address it declares, of
/// the method and algorithm the derivation asks for.
fn check_floating(
    output: &str,
    path_name: &str,
    method: ContentAddressMethod,
    algo: HashAlgo,
    info: &PathInfo,
) -> Result<(), OutputError> {
    let bad = |problem: String| OutputError::BadContentAddress {
        name: output.to_owned(),
        problem,
    };
    if info.path.name() != path_name {
        return Err(bad(format!(
            "its path is named '{}', not '{path_name}'",
            info.path.name()
        )));
    }
    let ca = info
        .ca
        .as_deref()
        .ok_or_else(|| bad("a floating content-addressed output needs a content address".into()))?;
    let (got_method, hash_text) = if let Some(rest) = ca.strip_prefix("fixed:r:") {
        (ContentAddressMethod::Recursive, rest)
    } else if let Some(rest) = ca.strip_prefix("fixed:") {
        (ContentAddressMethod::Flat, rest)
    } else if let Some(rest) = ca.strip_prefix("text:") {
        (ContentAddressMethod::Text, rest)
    } else {
        return Err(bad(format!("unknown content address '{ca}'")));
    };
    let hash = Hash::parse_any(hash_text, None).map_err(|e| bad(e.to_string()))?;
    if got_method != method || hash.algo() != algo {
        return Err(bad(format!(
            "content address '{ca}' is not of the derivation's kind ({}{})",
            method.prefix(),
            algo.name()
        )));
    }
    let self_ref = info.references.contains(&info.path);
    let others = info.references.iter().filter(|r| **r != info.path);
    let computed = StoreDir::default()
        .make_fixed_output_path(method, &hash, path_name, others, self_ref)
        .map_err(|e| bad(e.to_string()))?;
    if computed != info.path {
        return Err(bad(format!(
            "its content address gives '{}', not the declared path",
            StoreDir::default().print(&computed)
        )));
    }
    Ok(())
}

/// The report an attempt is waiting on, if it can still be committed. One
/// whose result was dropped uncommitted (the writer stopped) is forgotten,
/// so the agent's next report starts afresh.
fn live_report(slot: &mut Slot) -> Option<watch::Receiver<bool>> {
    let wait = slot.committed.as_ref()?;
    if !*wait.borrow() && wait.has_changed().is_err() {
        slot.committed = None;
        return None;
    }
    Some(wait.clone())
}

/// The state of an attempt's log file.
enum LogState {
    /// No stream has opened it yet.
    Unopened,
    /// Opened, and not being written by a stream right now.
    Idle(LogWriter),
    /// A stream holds the writer.
    Streaming,
}

/// What a log stream gets when it opens an attempt's log.
pub(crate) enum LogHandle {
    /// The first stream: create the file for this derivation, with this
    /// limit. A new attempt truncates it, as in Hydra; an attempt adopted
    /// after a restart (`append`) goes on after what its agent sent before.
    Create {
        drv_path: String,
        max_bytes: u64,
        append: bool,
    },
    /// A later stream: go on writing where the previous one stopped.
    Resume(LogWriter),
}

struct Slot {
    entry: AttemptEntry,
    log: LogState,
    /// Adopted after a restart: its log file already holds what the agent
    /// streamed before.
    append_log: bool,
    /// Set once the agent reported its result: becomes true when the
    /// result is committed.
    committed: Option<watch::Receiver<bool>>,
}

/// What a report of an attempt's result gets.
pub(crate) enum Report {
    /// The first report: hand `committed` to the driver with the result,
    /// and answer the agent once `wait` says it is committed.
    First {
        committed: watch::Sender<bool>,
        wait: watch::Receiver<bool>,
    },
    /// The agent reported again (it did not hear the answer): wait for the
    /// first report's commit.
    Again(watch::Receiver<bool>),
}

#[derive(Default)]
struct Table {
    slots: HashMap<AttemptId, Slot>,
    /// Attempts a previous run left in progress that agents may still
    /// report after a restart; calls naming them are asked to try again.
    resuming: HashSet<AttemptId>,
}

/// The registry; cheap to clone, shared by the driver and the service.
#[derive(Clone, Default)]
pub struct Attempts {
    inner: Arc<Mutex<Table>>,
}

impl std::fmt::Debug for Attempts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attempts")
            .field("len", &self.inner.lock().slots.len())
            .finish()
    }
}

impl Attempts {
    pub fn new() -> Attempts {
        Attempts::default()
    }

    /// Registers `entry` as `id`; call before sending the assignment.
    pub fn register(&self, id: AttemptId, entry: AttemptEntry) -> Result<(), AttemptError> {
        self.insert(id, entry, false)
    }

    /// Registers an attempt adopted after a restart: its agent already
    /// runs it, and its log is appended to.
    pub fn register_adopted(&self, id: AttemptId, entry: AttemptEntry) -> Result<(), AttemptError> {
        self.insert(id, entry, true)
    }

    fn insert(
        &self,
        id: AttemptId,
        entry: AttemptEntry,
        adopted: bool,
    ) -> Result<(), AttemptError> {
        let mut table = self.inner.lock();
        if table.slots.contains_key(&id) {
            return Err(AttemptError::Duplicate { attempt: id });
        }
        table.resuming.remove(&id);
        table.slots.insert(
            id,
            Slot {
                entry,
                log: LogState::Unopened,
                append_log: adopted,
                committed: None,
            },
        );
        Ok(())
    }

    /// Marks attempts a previous run left in progress: until each is
    /// registered or [`Attempts::remove`]d, calls naming it are asked to
    /// try again rather than refused.
    pub fn expect(&self, ids: impl IntoIterator<Item = AttemptId>) {
        self.inner.lock().resuming.extend(ids);
    }

    /// Forgets `id`; later calls naming it are refused. Returns the entry,
    /// with the outputs that were uploaded.
    pub fn remove(&self, id: AttemptId) -> Option<AttemptEntry> {
        let mut table = self.inner.lock();
        table.resuming.remove(&id);
        table.slots.remove(&id).map(|slot| slot.entry)
    }

    /// Forgets every attempt of `machine`; returns their ids.
    pub fn remove_machine(&self, machine: MachineId) -> Vec<AttemptId> {
        let mut table = self.inner.lock();
        let ids: Vec<AttemptId> = table
            .slots
            .iter()
            .filter(|(_, slot)| slot.entry.machine == machine)
            .map(|(id, _)| *id)
            .collect();
        for id in &ids {
            table.slots.remove(id);
        }
        ids
    }

    /// A copy of the entry of `id`.
    pub fn get(&self, id: AttemptId) -> Option<AttemptEntry> {
        self.inner
            .lock()
            .slots
            .get(&id)
            .map(|slot| slot.entry.clone())
    }

    pub fn len(&self) -> usize {
        self.inner.lock().slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inner.lock().slots.is_empty()
    }

    /// Runs `f` on the entry of `id` if `machine` owns it and it has not
    /// reported yet.
    pub(crate) fn with_owned<R>(
        &self,
        id: AttemptId,
        machine: MachineId,
        f: impl FnOnce(&mut AttemptEntry) -> R,
    ) -> Result<R, AccessError> {
        self.with_slot(id, machine, |slot| f(&mut slot.entry))
    }

    fn owned_slot(
        table: &mut Table,
        id: AttemptId,
        machine: MachineId,
    ) -> Result<&mut Slot, AccessError> {
        if table.resuming.contains(&id) {
            return Err(AccessError::Resuming(id));
        }
        let slot = table.slots.get_mut(&id).ok_or(AccessError::Unknown(id))?;
        if slot.entry.machine != machine {
            return Err(AccessError::NotYours(id));
        }
        Ok(slot)
    }

    fn with_slot<R>(
        &self,
        id: AttemptId,
        machine: MachineId,
        f: impl FnOnce(&mut Slot) -> R,
    ) -> Result<R, AccessError> {
        let mut table = self.inner.lock();
        let slot = Self::owned_slot(&mut table, id, machine)?;
        if slot.committed.is_some() {
            return Err(AccessError::Reported(id));
        }
        Ok(f(slot))
    }

    /// Records a verified upload.
    pub(crate) fn record_upload(
        &self,
        id: AttemptId,
        machine: MachineId,
        name: &str,
        output: UploadedOutput,
    ) -> Result<(), AccessError> {
        self.with_owned(id, machine, |e| {
            e.uploaded.insert(name.to_owned(), output);
        })
    }

    /// A report of `id`'s result by `machine`: the first one, or one that
    /// repeats it while it is being committed.
    pub(crate) fn report(&self, id: AttemptId, machine: MachineId) -> Result<Report, AccessError> {
        let mut table = self.inner.lock();
        let slot = Self::owned_slot(&mut table, id, machine)?;
        if let Some(wait) = live_report(slot) {
            return Ok(Report::Again(wait));
        }
        let (committed, wait) = watch::channel(false);
        slot.committed = Some(wait.clone());
        Ok(Report::First { committed, wait })
    }

    /// Whether `id` has reported and waits for its commit: the receiver
    /// to wait on.
    pub(crate) fn pending_report(
        &self,
        id: AttemptId,
        machine: MachineId,
    ) -> Result<Option<watch::Receiver<bool>>, AccessError> {
        let mut table = self.inner.lock();
        Ok(live_report(Self::owned_slot(&mut table, id, machine)?))
    }

    /// Takes the attempt's log for one stream; `None` if another stream
    /// holds it.
    pub(crate) fn take_log(
        &self,
        id: AttemptId,
        machine: MachineId,
    ) -> Result<Option<LogHandle>, AccessError> {
        self.with_slot(id, machine, |slot| {
            match std::mem::replace(&mut slot.log, LogState::Streaming) {
                LogState::Unopened => Some(LogHandle::Create {
                    append: slot.append_log,
                    drv_path: StoreDir::default().print(&slot.entry.drv_path),
                    // 0 means no limit in an assignment.
                    max_bytes: match slot.entry.max_log_bytes {
                        0 => u64::MAX,
                        n => n,
                    },
                }),
                LogState::Idle(writer) => Some(LogHandle::Resume(writer)),
                LogState::Streaming => None,
            }
        })
    }

    /// Gives the log back after a stream ended. If the attempt is gone the
    /// writer is returned to the caller to close.
    pub(crate) fn put_log(&self, id: AttemptId, writer: LogWriter) -> Option<LogWriter> {
        let mut table = self.inner.lock();
        match table.slots.get_mut(&id) {
            Some(slot) => {
                slot.log = LogState::Idle(writer);
                None
            }
            None => Some(writer),
        }
    }
}

#[cfg(test)]
mod tests;
