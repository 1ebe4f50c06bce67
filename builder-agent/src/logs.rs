//! The build log on its way to the queue runner: lines of build output
//! from the local Nix daemon, batched into `StreamLog` chunks.
//!
//! Invariants: lines go out in the order the daemon sent them, each with
//! its newline; a chunk never exceeds the message size the queue runner
//! announced; the stream to the queue runner is bounded. If it fails (the
//! connection dropped, the queue runner restarted) the build goes on, the
//! lines that come meanwhile are kept (up to [`MAX_CARRY`] bytes; past
//! that they are counted and dropped, and the log says so), and a new
//! stream on the next session sends again what the broken one carried:
//! each chunk says where it starts in the log (`LogChunk::offset`) and the
//! queue runner skips what it already wrote, so a byte in flight when the
//! queue runner died is neither lost nor written twice.

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
    /// Where `buf` starts in the log.
    offset: u64,
    /// What the current stream carried, from where it started
    /// (`offset - sent.len()`): sent again if the stream breaks. Bounded
    /// by `MAX_CARRY`; past that the oldest bytes are forgotten (the queue
    /// runner notes the gap if it never got them).
    sent: Vec<u8>,
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

    /// Takes up to `limit` bytes as the next chunk of the current stream:
    /// its data and where it starts in the log.
    fn next_chunk(&mut self, limit: usize) -> (Vec<u8>, u64) {
        let offset = self.offset;
        let data = self.take(limit);
        self.offset += data.len() as u64;
        self.sent.extend_from_slice(&data);
        if self.sent.len() > MAX_CARRY {
            let excess = self.sent.len() - MAX_CARRY;
            self.sent.drain(..excess);
        }
        (data, offset)
    }

    /// The stream ended and the queue runner says it received `received`
    /// of the bytes it carried: the rest goes first on the next stream.
    fn acked(&mut self, received: u64) {
        let confirmed = usize::try_from(received)
            .unwrap_or(usize::MAX)
            .min(self.sent.len());
        self.sent.drain(..confirmed);
        self.resend();
    }

    /// The stream broke: what it carried goes first again, at its offsets.
    fn resend(&mut self) {
        let sent = std::mem::take(&mut self.sent);
        self.offset -= sent.len() as u64;
        let mut buf = sent;
        buf.extend_from_slice(&self.buf);
        self.buf = buf;
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
                let (data, offset) = carry.next_chunk(chunk_limit);
                let chunk = pb::LogChunk {
                    session_id: ctx.id.clone(),
                    step_id: step.to_owned(),
                    data,
                    offset,
                };
                if tx.send(chunk).await.is_err() {
                    // The call ended early: the chunk goes again with
                    // what else the stream did not deliver.
                    return;
                }
            }
        };
        let (acked, ()) = tokio::join!(call, feed);
        match &acked {
            Ok(ack) => carry.acked(ack.get_ref().bytes_received),
            Err(_) => carry.resend(),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn carry_with(text: &str) -> Carry {
        Carry {
            buf: text.as_bytes().to_vec(),
            ..Carry::default()
        }
    }

    #[test]
    fn a_broken_stream_sends_what_it_carried_again_at_the_same_offsets() {
        let mut carry = carry_with("abcdefgh");
        assert_eq!(carry.next_chunk(3), (b"abc".to_vec(), 0));
        assert_eq!(carry.next_chunk(3), (b"def".to_vec(), 3));
        carry.resend();
        assert_eq!(carry.next_chunk(100), (b"abcdefgh".to_vec(), 0));
        // This stream ended with 5 of its 8 bytes received: the rest again.
        carry.acked(5);
        assert_eq!(carry.next_chunk(100), (b"fgh".to_vec(), 5));
        carry.acked(3);
        assert!(carry.buf.is_empty() && carry.sent.is_empty());
        assert_eq!(carry.offset, 8);
    }
}
