//! `InputClosure`: the input closure of an attempt whose assignment was
//! too large to carry it, streamed in chunks.
//!
//! The closure is computed when the agent asks, from the attempt's roots
//! (the basic derivation's input sources) and the store's path-info
//! cache, which the assignment's own computation filled; it is held only
//! while it streams.
//!
//! Invariants: only the machine that owns the attempt is answered. Paths
//! go in dependency order; a chunk holds at most
//! [`MAX_CLOSURE_CHUNK_PATHS`] paths and, unless one path info alone is
//! larger, at most [`MAX_CLOSURE_CHUNK_BYTES`] encoded bytes, so no
//! message grows with the closure. At most [`CHUNK_BUFFER`] chunks wait
//! for a slow agent.

use std::sync::Arc;

use prost::Message;
use sluice_proto::v1 as pb;
use sluice_proto::{MAX_CLOSURE_CHUNK_BYTES, MAX_CLOSURE_CHUNK_PATHS};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::auth::AgentIdentity;
use super::convert;
use super::Shared;

/// Chunks buffered towards the agent.
const CHUNK_BUFFER: usize = 4;

pub(crate) type ClosureStream = ReceiverStream<Result<pb::InputClosureChunk, Status>>;

/// The input closure of `attempt`, which `machine` must own, in
/// dependency order (from the shared path-info cache where it can).
pub(crate) async fn of_attempt(
    shared: &Shared,
    attempt: crate::agents::AttemptId,
    machine: sluice_core::MachineId,
) -> Result<Vec<Arc<sluice_nix::daemon::PathInfo>>, Status> {
    let roots = shared
        .attempts
        .with_owned(attempt, machine, |e| e.input_roots().to_vec())?;
    crate::store::closure(&shared.store, roots)
        .await
        .map_err(|e| Status::unavailable(format!("the input closure of {attempt}: {e}")))
}

/// Checks the request, computes the closure and starts streaming it.
pub(crate) async fn open(
    shared: Arc<Shared>,
    owner: AgentIdentity,
    req: pb::InputClosureRequest,
) -> Result<ClosureStream, Status> {
    let session = shared.sessions.get(&req.session_id, &owner)?;
    let attempt = convert::attempt_id(&req.step_id)?;
    let closure = of_attempt(&shared, attempt, session.machine).await?;
    let (tx, rx) = mpsc::channel(CHUNK_BUFFER);
    tokio::spawn(async move {
        let mut chunk = pb::InputClosureChunk::default();
        let mut bytes = 0;
        for info in &closure {
            let wire = convert::path_info_to_wire(info);
            let len = wire.encoded_len();
            if !chunk.paths.is_empty()
                && (chunk.paths.len() >= MAX_CLOSURE_CHUNK_PATHS
                    || bytes + len > MAX_CLOSURE_CHUNK_BYTES)
            {
                let full = std::mem::take(&mut chunk);
                bytes = 0;
                if tx.send(Ok(full)).await.is_err() {
                    return;
                }
            }
            bytes += len;
            chunk.paths.push(wire);
        }
        if !chunk.paths.is_empty() {
            let _ = tx.send(Ok(chunk)).await;
        }
    });
    Ok(ReceiverStream::new(rx))
}
