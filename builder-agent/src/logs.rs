//! The build log on its way to the queue runner: lines of build output
//! from the local Nix daemon, batched into `StreamLog` chunks.
//!
//! Invariants: lines go out in the order the daemon sent them, each with
//! its newline; a chunk never exceeds the message size the queue runner
//! announced; the stream to the queue runner is bounded, and if it fails
//! the build goes on (its log is then incomplete, which is logged here).

use sluice_nix::daemon::LogEvent;
use sluice_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::session::SessionCtx;

/// Chunks buffered towards the queue runner.
const LOG_BUFFER: usize = 8;
/// Bytes gathered into one chunk at most (less if messages are smaller).
const CHUNK: usize = 64 << 10;

/// Forwards build output lines from `lines` until it closes.
pub(crate) async fn forward(
    ctx: &SessionCtx,
    step: &str,
    mut lines: mpsc::UnboundedReceiver<LogEvent>,
) {
    let (tx, rx) = mpsc::channel(LOG_BUFFER);
    let mut client = ctx.client.clone();
    let call = client.stream_log(ReceiverStream::new(rx));
    let chunk_limit = CHUNK.min(ctx.max_message / 2).max(1024);
    let feed = async move {
        let mut buf: Vec<u8> = Vec::new();
        while let Some(event) = lines.recv().await {
            append(&mut buf, &event);
            // Gather what is already waiting, up to a chunk.
            while buf.len() < chunk_limit {
                match lines.try_recv() {
                    Ok(event) => append(&mut buf, &event),
                    Err(_) => break,
                }
            }
            while !buf.is_empty() {
                let rest = buf.split_off(buf.len().min(chunk_limit));
                let chunk = pb::LogChunk {
                    session_id: ctx.id.clone(),
                    step_id: step.to_owned(),
                    data: std::mem::replace(&mut buf, rest),
                };
                if tx.send(chunk).await.is_err() {
                    // The call ended early; its error is reported below.
                    return;
                }
            }
        }
    };
    let (acked, ()) = tokio::join!(call, feed);
    if let Err(status) = acked {
        tracing::warn!(
            step,
            "the build log could not be streamed: {}",
            status.message()
        );
    }
}

fn append(buf: &mut Vec<u8>, event: &LogEvent) {
    if let Some(line) = event.build_log_line() {
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
    }
}
