//! Agent sessions: created by `Register`, kept alive by heartbeats,
//! connected to the driver by the work stream, and ended exactly once.
//!
//! A session is *registered* until its work stream opens, then
//! *connected*: only then does the driver know it (`Connected`). It ends
//! when its work stream ends, when its heartbeats stop for
//! `missed_heartbeats` intervals, or when the service shuts down.
//!
//! Invariants: a session ends exactly once, because only the caller that
//! removes it from the table proceeds to end it; events for the driver go
//! through the session's gate, an async lock that ending closes, so the
//! driver sees `Connected`, then the session's other events, then one
//! `Disconnected`, and nothing after it. An agent (token and name) keeps
//! one machine id for the life of this process, and has at most one live
//! session: the old one is ended (and its `Disconnected` sent) before a new
//! one registers, so the driver sees an agent's sessions one after another.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use sluice_core::MachineId;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::auth::AgentIdentity;
use super::Shared;
use crate::agents::{AgentInfo, AttemptId, FromAgent, ToAgent};

/// Why a call naming a session is refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub(crate) enum SessionError {
    #[error("unknown session '{0}' (expired or never registered): register again")]
    Unknown(String),
    #[error("session '{0}' was registered with another token")]
    NotYours(String),
    #[error("session '{0}' already has a work stream")]
    AlreadyWorking(String),
    #[error("session '{0}' has ended")]
    Ended(String),
}

impl From<SessionError> for tonic::Status {
    fn from(e: SessionError) -> tonic::Status {
        let msg = e.to_string();
        match e {
            SessionError::Unknown(_) => tonic::Status::not_found(msg),
            SessionError::NotYours(_) => tonic::Status::permission_denied(msg),
            SessionError::AlreadyWorking(_) => tonic::Status::already_exists(msg),
            SessionError::Ended(_) => tonic::Status::unavailable(msg),
        }
    }
}

struct Gate {
    /// Cleared when the session ends; nothing is sent afterwards.
    events: Option<mpsc::Sender<FromAgent>>,
    connected: bool,
}

struct Liveness {
    last_heartbeat: Instant,
    working: bool,
}

/// One registered agent.
pub(crate) struct Session {
    pub(crate) id: String,
    pub(crate) machine: MachineId,
    owner: AgentIdentity,
    pub(crate) info: AgentInfo,
    liveness: Mutex<Liveness>,
    gate: tokio::sync::Mutex<Gate>,
    /// Cancelled when the session ends: stops its work stream.
    pub(crate) ended: CancellationToken,
    /// Why it ended, for the agent.
    end_reason: Mutex<Option<String>>,
}

impl Session {
    /// Sends `event` to the driver unless the session has ended; returns
    /// whether it was sent.
    pub(crate) async fn send(&self, event: FromAgent) -> bool {
        let gate = self.gate.lock().await;
        match (&gate.events, gate.connected) {
            (Some(tx), true) => tx.send(event).await.is_ok(),
            _ => false,
        }
    }

    /// Tells the driver about the agent: from now on it may assign work
    /// through `commands`. Fails if the session ended meanwhile.
    pub(crate) async fn connect(
        &self,
        commands: mpsc::Sender<ToAgent>,
        held: Vec<AttemptId>,
    ) -> Result<(), SessionError> {
        let mut gate = self.gate.lock().await;
        let Some(tx) = gate.events.clone() else {
            return Err(SessionError::Ended(self.id.clone()));
        };
        gate.connected = true;
        // A driver that is gone cannot be told; the session still ends
        // normally later.
        let _ = tx
            .send(FromAgent::Connected {
                machine: self.machine,
                info: self.info.clone(),
                commands,
                held,
            })
            .await;
        Ok(())
    }

    pub(crate) fn end_reason(&self) -> Option<String> {
        self.end_reason.lock().clone()
    }
}

struct Table {
    by_id: HashMap<String, Arc<Session>>,
    /// The machine id of each agent (token and name) seen by this run:
    /// an agent that reconnects keeps its id, and with it its attempts.
    machines: HashMap<(AgentIdentity, String), MachineId>,
    next_machine: u64,
}

/// All live sessions.
pub(crate) struct Sessions {
    table: Mutex<Table>,
    events: mpsc::Sender<FromAgent>,
}

impl Sessions {
    pub(crate) fn new(events: mpsc::Sender<FromAgent>) -> Sessions {
        Sessions {
            table: Mutex::new(Table {
                by_id: HashMap::new(),
                machines: HashMap::new(),
                next_machine: 1,
            }),
            events,
        }
    }

    /// A new session with an unguessable id. The machine id is the
    /// agent's (by token and name) from an earlier session of this run, or
    /// a fresh one; a session of the same agent still live is ended first
    /// (its connection is gone, or it is a second agent of the same name).
    pub(crate) async fn register(&self, owner: AgentIdentity, info: AgentInfo) -> Arc<Session> {
        let key = (owner.clone(), info.name.clone());
        let replaced: Vec<String> = {
            let table = self.table.lock();
            match table.machines.get(&key) {
                Some(machine) => table
                    .by_id
                    .values()
                    .filter(|s| s.machine == *machine)
                    .map(|s| s.id.clone())
                    .collect(),
                None => Vec::new(),
            }
        };
        for old in replaced {
            tracing::warn!(
                agent = %info.name,
                session = %old,
                "the agent registered again; its previous session ends"
            );
            self.end(&old, "replaced by a new session of the same agent")
                .await;
        }
        let mut table = self.table.lock();
        let machine = match table.machines.get(&key) {
            Some(machine) => *machine,
            None => {
                let machine = MachineId(table.next_machine);
                table.next_machine += 1;
                table.machines.insert(key, machine);
                machine
            }
        };
        let id = uuid::Uuid::new_v4().simple().to_string();
        let session = Arc::new(Session {
            id: id.clone(),
            machine,
            owner,
            info,
            liveness: Mutex::new(Liveness {
                last_heartbeat: Instant::now(),
                working: false,
            }),
            gate: tokio::sync::Mutex::new(Gate {
                events: Some(self.events.clone()),
                connected: false,
            }),
            ended: CancellationToken::new(),
            end_reason: Mutex::new(None),
        });
        table.by_id.insert(id, session.clone());
        session
    }

    /// The session `id`, if `owner` registered it.
    pub(crate) fn get(
        &self,
        id: &str,
        owner: &AgentIdentity,
    ) -> Result<Arc<Session>, SessionError> {
        let session = self
            .table
            .lock()
            .by_id
            .get(id)
            .cloned()
            .ok_or_else(|| SessionError::Unknown(id.to_owned()))?;
        if session.owner != *owner {
            return Err(SessionError::NotYours(id.to_owned()));
        }
        Ok(session)
    }

    /// Records a heartbeat.
    pub(crate) fn beat(&self, session: &Session) {
        session.liveness.lock().last_heartbeat = Instant::now();
    }

    /// Claims the session's single work stream.
    pub(crate) fn start_work(&self, session: &Session) -> Result<(), SessionError> {
        let mut live = session.liveness.lock();
        if live.working {
            return Err(SessionError::AlreadyWorking(session.id.clone()));
        }
        live.working = true;
        Ok(())
    }

    /// Ends session `id` if it is still live: stops its work stream and,
    /// if the driver knew it, sends `Disconnected`. Idempotent.
    pub(crate) async fn end(&self, id: &str, reason: &str) {
        let Some(session) = self.table.lock().by_id.remove(id) else {
            return;
        };
        *session.end_reason.lock() = Some(reason.to_owned());
        session.ended.cancel();
        let mut gate = session.gate.lock().await;
        let events = gate.events.take();
        if let (Some(tx), true) = (events, gate.connected) {
            tracing::info!(
                session = %session.id,
                machine = %session.machine,
                agent = %session.info.name,
                "agent disconnected: {reason}"
            );
            let _ = tx
                .send(FromAgent::Disconnected {
                    machine: session.machine,
                })
                .await;
        }
    }

    /// Ends every session.
    pub(crate) async fn end_all(&self, reason: &str) {
        let ids: Vec<String> = self.table.lock().by_id.keys().cloned().collect();
        for id in ids {
            self.end(&id, reason).await;
        }
    }

    /// Ends the sessions whose last heartbeat is older than `timeout`.
    pub(crate) async fn reap(&self, now: Instant, timeout: Duration) {
        let expired: Vec<String> = self
            .table
            .lock()
            .by_id
            .values()
            .filter(|s| now.saturating_duration_since(s.liveness.lock().last_heartbeat) > timeout)
            .map(|s| s.id.clone())
            .collect();
        for id in expired {
            let reason = format!("no heartbeat for {} ms", timeout.as_millis());
            self.end(&id, &reason).await;
        }
    }
}

/// Checks for expired sessions every `period`, until aborted.
pub(crate) async fn reap_forever(shared: Arc<Shared>, period: Duration) {
    let mut ticks = tokio::time::interval(period.max(Duration::from_millis(10)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        shared
            .sessions
            .reap(Instant::now(), shared.config.session_timeout())
            .await;
    }
}
