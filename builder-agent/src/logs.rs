//! The build log on its way to the queue runner: lines of build output
//! from the local Nix daemon, batched into `StreamLog` chunks.
//!
//! Invariants: lines go out in the order the daemon sent them, each with
//! its newline; a chunk never exceeds the message size the queue runner
//! announced; the stream to the queue runner is bounded. If it fails (the
//! connection dropped, the queue runner restarted) the build goes on, the
//! lines that come meanwhile are kept (up to [`MAX_CARRY`] bytes; past
//! that they are counted and dropped, and the log says so), and a new
//! stream on the next session goes on where the old one stopped.

use std::time::Duration;

use sluice_nix::daemon::LogEvent;
use sluice_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::link::Link;

/// Chunks buffered towards the queue runner.
const LOG_BUFFER: usize = 8;
/// Bytes gathered into one chunk at most (less if messages are smaller).
const CHUNK: usize = 64 << 10;
/// Bytes of log kept while no stream is open.
const MAX_CARRY: usize = 8 << 20;

/// Log bytes waiting to be sent, bounded.
#[derive(Default)]
struct Carry {
    buf: Vec<u8>,
    dropped: u64,
}

impl Carry {
    fn push(&mut self, event: &LogEvent) {
        if let Some(line) = event.build_log_line() {
            if self.buf.len() + line.len() < MAX_CARRY {
                self.buf.extend_from_slice(line.as_bytes());
                self.buf.push(b'\n');
            } else {
                self.dropped += line.len() as u64 + 1;
            }
        }
    }

    /// Takes up to `limit` bytes, with a note first about what was lost.
    fn take(&mut self, limit: usize) -> Vec<u8> {
        if self.dropped > 0 {
            let note = format!(
                "sluice: {} bytes of build output were lost while the queue runner was unreachable\n",
                self.dropped
            );
            self.dropped = 0;
            let mut rest = std::mem::take(&mut self.buf);
            let mut out = note.into_bytes();
            let n = rest.len().min(limit.saturating_sub(out.len()));
            out.extend(rest.drain(..n));
            self.buf = rest;
            return out;
        }
        let rest = self.buf.split_off(self.buf.len().min(limit));
        std::mem::replace(&mut self.buf, rest)
    }
}

/// Forwards build output lines from `lines` until it closes and every
/// line is sent (or the queue runner refuses the log for good).
pub(crate) async fn forward(
    link: &mut Link,
    step: &str,
    mut lines: mpsc::UnboundedReceiver<LogEvent>,
) {
    let mut carry = Carry::default();
    let mut open = true;
    loop {
        // Wait for a session, keeping what the build writes meanwhile.
        let ctx = loop {
            if let Some(ctx) = link.now() {
                break ctx;
            }
            if !open {
                if carry.buf.is_empty() {
                    return;
                }
                break link.session().await;
            }
            tokio::select! {
                ctx = link.session() => break ctx,
                event = lines.recv() => match event {
                    Some(event) => carry.push(&event),
                    None => open = false,
                },
            }
        };
        let chunk_limit = CHUNK.min(ctx.max_message / 2).max(1024);
        let (tx, rx) = mpsc::channel(LOG_BUFFER);
        let mut client = ctx.client.clone();
        let call = client.stream_log(ReceiverStream::new(rx));
        let feed = async {
            // Owned here: the stream ends when the feed does.
            let tx = tx;
            loop {
                if carry.buf.is_empty() && carry.dropped == 0 {
                    if !open {
                        return;
                    }
                    match lines.recv().await {
                        Some(event) => carry.push(&event),
                        None => {
                            open = false;
                            continue;
                        }
                    }
                }
                // Gather what is already waiting, up to a chunk.
                while open && carry.buf.len() < chunk_limit {
                    match lines.try_recv() {
                        Ok(event) => carry.push(&event),
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => open = false,
                    }
                }
                let chunk = pb::LogChunk {
                    session_id: ctx.id.clone(),
                    step_id: step.to_owned(),
                    data: carry.take(chunk_limit),
                };
                if let Err(unsent) = tx.send(chunk).await {
                    // The call ended early: keep the chunk for the next one.
                    let mut data = unsent.0.data;
                    data.extend_from_slice(&carry.buf);
                    carry.buf = data;
                    return;
                }
            }
        };
        let (acked, ()) = tokio::join!(call, feed);
        match acked {
            Ok(_) if !open && carry.buf.is_empty() => return,
            Ok(_) => {}
            Err(status) if crate::link::worth_retrying(&status) => {
                tracing::debug!(
                    step,
                    "the log stream broke, resuming on the next session: {}",
                    status.message()
                );
                link.retry_pause(Duration::from_secs(1)).await;
            }
            Err(status) => {
                tracing::warn!(
                    step,
                    "the build log could not be streamed: {}",
                    status.message()
                );
                // Drain the rest so the build is not held up.
                while lines.recv().await.is_some() {}
                return;
            }
        }
    }
}
