//! The work stream: one per session, opened by the agent with `Hello`.
//!
//! Opening it tells the driver about the agent (`Connected`, with a
//! bounded command channel); the driver's commands then flow to the agent
//! as `RunnerCommand`s and the agent's phase updates flow back as
//! `FromAgent::Phase`. When either side closes the stream, or the session
//! ends otherwise, the session ends and the driver gets `Disconnected`.
//!
//! Invariants: two tasks serve a stream, one per direction, and both stop
//! when the session's `ended` token is cancelled; each ends the session on
//! its way out, which is idempotent. Phase updates for attempts the agent
//! does not own are dropped (and logged), never forwarded.

use std::sync::Arc;

use sluice_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use super::attempts::AccessError;
use super::auth::AgentIdentity;
use super::convert;
use super::sessions::Session;
use super::Shared;
use crate::agents::{FromAgent, ToAgent};

/// Response messages buffered towards one agent.
const OUTBOUND_BUFFER: usize = 4;

/// The most assignments an agent's command channel makes room for.
const MAX_COMMAND_STEPS: u64 = 1 << 16;

pub(crate) type WorkStream = ReceiverStream<Result<pb::RunnerCommand, Status>>;

/// Accepts the stream: waits for `Hello`, connects the session, and starts
/// the two forwarding tasks.
pub(crate) async fn open(
    shared: Arc<Shared>,
    owner: AgentIdentity,
    peer: Option<std::net::SocketAddr>,
    mut inbound: Streaming<pb::AgentEvent>,
) -> Result<WorkStream, Status> {
    let first = tokio::time::timeout(shared.config.session_timeout(), inbound.message())
        .await
        .map_err(|_| Status::deadline_exceeded("no Hello on the work stream"))??
        .ok_or_else(|| Status::invalid_argument("the work stream closed before Hello"))?;
    let Some(pb::agent_event::Event::Hello(hello)) = first.event else {
        return Err(Status::invalid_argument(
            "the first message on the work stream must be Hello",
        ));
    };
    let session = shared.sessions.get(&first.session_id, &owner)?;
    shared.sessions.start_work(&session)?;
    let held = hello
        .held_steps
        .iter()
        .filter_map(|step| match convert::attempt_id(step) {
            Ok(id) => Some(id),
            Err(e) => {
                tracing::warn!(session = %session.id, "a held step is ignored: {e}");
                None
            }
        })
        .collect::<Vec<_>>();
    let (commands_tx, commands_rx) = mpsc::channel(command_capacity(
        shared.config.command_buffer,
        session.info.max_jobs,
        session.info.prefetch,
    ));
    session.connect(commands_tx, held).await?;
    tracing::info!(
        session = %session.id,
        machine = %session.machine,
        agent = %session.info.name,
        token = %owner.0,
        peer = %peer.map(|p| p.to_string()).unwrap_or_else(|| "unknown".into()),
        systems = ?session.info.systems,
        features = ?session.info.supported_features,
        slots = session.info.max_jobs,
        "agent connected"
    );
    let (out_tx, out_rx) = mpsc::channel(OUTBOUND_BUFFER);
    tokio::spawn(forward_commands(
        shared.clone(),
        session.clone(),
        commands_rx,
        out_tx,
    ));
    tokio::spawn(receive_events(shared, session, inbound));
    Ok(ReceiverStream::new(out_rx))
}

/// The capacity of an agent's command channel: an assignment for each of
/// its slots and each step it takes ahead, plus `buffer` (for cancels).
/// The driver never waits on it (`try_send`): an assignment that finds it
/// full is given up as aborted, so a burst of dispatches to an idle agent
/// (one per slot and step ahead, prepared together) must fit.
/// An agent that claims more than [`MAX_COMMAND_STEPS`] of them gets room
/// for that many (its registration is its own word).
fn command_capacity(buffer: usize, max_jobs: u32, prefetch: u32) -> usize {
    let steps = (u64::from(max_jobs) + u64::from(prefetch)).min(MAX_COMMAND_STEPS);
    buffer
        .max(1)
        .saturating_add(usize::try_from(steps).unwrap_or(0))
}

/// Driver → agent.
async fn forward_commands(
    shared: Arc<Shared>,
    session: Arc<Session>,
    mut commands: mpsc::Receiver<ToAgent>,
    out: mpsc::Sender<Result<pb::RunnerCommand, Status>>,
) {
    let reason = loop {
        tokio::select! {
            _ = session.ended.cancelled() => {
                let why = session.end_reason().unwrap_or_else(|| "session ended".into());
                // Best effort: the agent learns why, if it is listening.
                let _ = out.try_send(Err(Status::unavailable(why.clone())));
                break why;
            }
            _ = out.closed() => break "the agent closed the work stream".to_owned(),
            cmd = commands.recv() => match cmd {
                Some(cmd) => {
                    let sent = tokio::select! {
                        r = out.send(Ok(convert::runner_command(cmd))) => r.is_ok(),
                        _ = session.ended.cancelled() => false,
                    };
                    if !sent {
                        break "the work stream closed".to_owned();
                    }
                }
                None => break "the driver dropped the agent".to_owned(),
            },
        }
    };
    shared.sessions.end(&session.id, &reason).await;
}

/// Agent → driver.
async fn receive_events(
    shared: Arc<Shared>,
    session: Arc<Session>,
    mut inbound: Streaming<pb::AgentEvent>,
) {
    let reason = loop {
        let message = tokio::select! {
            _ = session.ended.cancelled() => return,
            m = inbound.message() => m,
        };
        match message {
            Ok(Some(event)) => handle_event(&shared, &session, event).await,
            Ok(None) => break "the agent closed the work stream".to_owned(),
            Err(status) => break format!("the work stream failed: {}", status.message()),
        }
    };
    shared.sessions.end(&session.id, &reason).await;
}

async fn handle_event(shared: &Shared, session: &Session, event: pb::AgentEvent) {
    if event.session_id != session.id {
        tracing::warn!(session = %session.id, "work stream event names another session; dropped");
        return;
    }
    let phase = match event.event {
        Some(pb::agent_event::Event::Phase(phase)) => phase,
        Some(pb::agent_event::Event::Drain(_)) => {
            tracing::info!(session = %session.id, agent = %session.info.name, "agent draining: it takes no new steps");
            session
                .send(FromAgent::Draining {
                    machine: session.machine,
                })
                .await;
            return;
        }
        _ => return,
    };
    let attempt = match convert::attempt_id(&phase.step_id) {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(session = %session.id, "phase update dropped: {e}");
            return;
        }
    };
    let Ok(busy) = i32::try_from(phase.busy) else {
        tracing::warn!(session = %session.id, busy = phase.busy, "phase code out of range; dropped");
        return;
    };
    match shared.attempts.with_owned(attempt, session.machine, |_| ()) {
        // A step held across a queue-runner restart is not registered
        // until the driver adopts it; the driver checks that this machine
        // claimed it.
        Ok(()) | Err(AccessError::Resuming(_)) => {}
        Err(e) => {
            tracing::warn!(session = %session.id, "phase update dropped: {e}");
            return;
        }
    }
    session
        .send(FromAgent::Phase {
            machine: session.machine,
            attempt,
            busy,
            slot: phase.slot,
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_channel_holds_every_slot_and_step_ahead_plus_the_buffer() {
        assert_eq!(command_capacity(16, 64, 64), 16 + 128);
        assert_eq!(command_capacity(0, 1, 0), 2);
        // An agent's claim does not size the channel beyond the cap.
        assert_eq!(
            command_capacity(16, u32::MAX, u32::MAX),
            16 + (1 << 16) as usize
        );
    }
}
