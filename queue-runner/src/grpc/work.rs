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

use super::auth::AgentIdentity;
use super::convert;
use super::sessions::Session;
use super::Shared;
use crate::agents::{FromAgent, ToAgent};

/// Response messages buffered towards one agent.
const OUTBOUND_BUFFER: usize = 4;

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
    let (commands_tx, commands_rx) = mpsc::channel(shared.config.command_buffer.max(1));
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
    if let Err(e) = shared.attempts.with_owned(attempt, session.machine, |_| ()) {
        tracing::warn!(session = %session.id, "phase update dropped: {e}");
        return;
    }
    session
        .send(FromAgent::Phase {
            machine: session.machine,
            attempt,
            busy,
        })
        .await;
}
