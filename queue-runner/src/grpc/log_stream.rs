//! `StreamLog`: a running step's build log, appended to its log file as
//! the chunks arrive (so the web UI can follow it), through
//! [`crate::logs::LogWriter`].
//!
//! Invariants: every chunk of a stream names the same session and
//! attempt, which the caller must own; one stream writes an attempt's log
//! at a time, and a later stream (an agent that reconnected its log
//! stream) goes on where the previous one stopped; the file never grows
//! past the assignment's log limit, and bytes past it are counted and
//! dropped. The writer goes back to the registry however the stream ends.
//! A stream for an attempt a restart has not adopted yet waits for it (the
//! first chunk is already read), so no chunk is dropped for that. Chunks in
//! flight when a connection drops may be lost; the agent sends the rest on
//! its next session.

use sluice_proto::v1 as pb;
use tonic::{Status, Streaming};

use std::time::Duration;

use super::attempts::{AccessError, LogHandle};
use super::auth::AgentIdentity;
use super::convert;
use super::Shared;
use crate::agents::AttemptId;
use crate::logs::{LogError, LogWriter};

/// How long a stream for an attempt not yet adopted after a restart
/// waits for it.
const RESUME_WAIT: Duration = Duration::from_secs(120);

fn log_status(e: LogError) -> Status {
    Status::internal(e.to_string())
}

/// Receives one log stream.
pub(crate) async fn receive(
    shared: &Shared,
    owner: AgentIdentity,
    mut inbound: Streaming<pb::LogChunk>,
) -> Result<pb::LogAck, Status> {
    let Some(first) = inbound.message().await? else {
        return Ok(pb::LogAck { bytes_received: 0 });
    };
    let session = shared.sessions.get(&first.session_id, &owner)?;
    let attempt = convert::attempt_id(&first.step_id)?;
    // After a restart the attempt is known only once adopted: wait for
    // that rather than refuse, so the chunks already sent are not lost.
    let waited_since = tokio::time::Instant::now();
    let handle = loop {
        match shared.attempts.take_log(attempt, session.machine) {
            Err(AccessError::Resuming(_)) if waited_since.elapsed() < RESUME_WAIT => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => break other?,
        }
    };
    let mut writer = match handle {
        Some(LogHandle::Resume(writer)) => writer,
        Some(LogHandle::Create {
            drv_path,
            max_bytes,
            append,
        }) => match LogWriter::open(&shared.config.data_dir, &drv_path, max_bytes, append).await {
            Ok(writer) => writer,
            Err(e) => return Err(log_status(e)),
        },
        None => {
            return Err(Status::failed_precondition(format!(
                "a log stream for {attempt} is already open"
            )))
        }
    };
    let mut result = copy(&mut writer, first, &mut inbound, attempt).await;
    // What the ack counts is in the file before the agent hears of it.
    if let Err(e) = writer.flush().await {
        result = result.and(Err(log_status(e)));
    }
    if let Some(orphan) = shared.attempts.put_log(attempt, writer) {
        orphan.finish().await.map_err(log_status)?;
    }
    Ok(pb::LogAck {
        bytes_received: result?,
    })
}

async fn copy(
    writer: &mut LogWriter,
    first: pb::LogChunk,
    inbound: &mut Streaming<pb::LogChunk>,
    attempt: AttemptId,
) -> Result<u64, Status> {
    let session_id = first.session_id.clone();
    let step_id = first.step_id.clone();
    let mut received = 0u64;
    let mut chunk = Some(first);
    while let Some(c) = chunk {
        if c.session_id != session_id || c.step_id != step_id {
            return Err(Status::invalid_argument(format!(
                "a log stream for {attempt} carried a chunk for another session or step"
            )));
        }
        received = received.saturating_add(c.data.len() as u64);
        // Past the limit the writer drops what does not fit; the build
        // itself is stopped by the agent's Nix, with status 10.
        writer
            .append_at(c.offset, &c.data)
            .await
            .map_err(log_status)?;
        chunk = inbound.message().await?;
    }
    Ok(received)
}
