//! Tokio adaptors: decode, copy, restore and produce NARs on async streams.
//!
//! Readers are [`AsyncBufRead`] so that exactly the archive's bytes are
//! consumed: whatever follows it stays in the reader (a NAR inside the
//! daemon protocol, or several NARs back to back). Filesystem work runs on
//! tokio's blocking pool and talks to the async side over bounded channels.
//!
//! Invariants: memory stays bounded by a few 64 KiB chunks in flight; every
//! function reports the hash and size of exactly the archive's bytes.

use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::decode::{NarDecoder, NarError, NarEvent, OwnedNarEvent};
use super::encode::{NarEncodeError, NarEncoder};
use super::hashing::{NarHasher, NarSummary};
use super::restore::{NarRestoreError, NarRestorer, RestoreError};

const CHUNK: usize = 64 * 1024;
/// Chunks or events in flight between the async side and a blocking task.
const IN_FLIGHT: usize = 8;

/// Why streaming a NAR failed.
#[derive(Debug, Error)]
pub enum NarStreamError<E = std::convert::Infallible> {
    #[error(transparent)]
    Nar(#[from] NarError),
    #[error("streaming NAR: reading failed: {0}")]
    Read(#[source] io::Error),
    #[error("streaming NAR: writing failed: {0}")]
    Write(#[source] io::Error),
    #[error("streaming NAR: the event handler failed: {0}")]
    Sink(E),
}

/// Reads one archive from `reader`, passing each event to `on_event`.
pub async fn decode_async<R, E>(
    reader: &mut R,
    mut on_event: impl FnMut(NarEvent<'_>) -> Result<(), E>,
) -> Result<NarSummary, NarStreamError<E>>
where
    R: AsyncBufRead + Unpin + ?Sized,
{
    let mut decoder = NarDecoder::new();
    let mut hasher = NarHasher::new();
    while !decoder.is_done() {
        let buf = reader.fill_buf().await.map_err(NarStreamError::Read)?;
        if buf.is_empty() {
            decoder.finish()?;
            break;
        }
        let used = decoder.feed(buf, &mut on_event).map_err(|e| match e {
            super::decode::FeedError::Nar(e) => NarStreamError::Nar(e),
            super::decode::FeedError::Sink(e) => NarStreamError::Sink(e),
        })?;
        hasher.update(&buf[..used]);
        reader.consume(used);
    }
    Ok(hasher.summary())
}

/// Copies one archive from `reader` to `writer`, checking it on the way.
/// On a malformed archive, the bytes before the error may have been written.
pub async fn copy_nar<R, W>(reader: &mut R, writer: &mut W) -> Result<NarSummary, NarStreamError>
where
    R: AsyncBufRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut decoder = NarDecoder::new();
    let mut hasher = NarHasher::new();
    while !decoder.is_done() {
        let buf = reader.fill_buf().await.map_err(NarStreamError::Read)?;
        if buf.is_empty() {
            decoder.finish()?;
            break;
        }
        let used = decoder
            .feed(buf, |_| Ok::<(), std::convert::Infallible>(()))
            .map_err(|e| match e {
                super::decode::FeedError::Nar(e) => NarStreamError::Nar(e),
                super::decode::FeedError::Sink(never) => match never {},
            })?;
        writer
            .write_all(&buf[..used])
            .await
            .map_err(NarStreamError::Write)?;
        hasher.update(&buf[..used]);
        reader.consume(used);
    }
    writer.flush().await.map_err(NarStreamError::Write)?;
    Ok(hasher.summary())
}

/// Restores one archive from `reader` at `target` (which must not exist).
pub async fn restore_async<R>(reader: &mut R, target: &Path) -> Result<NarSummary, RestoreError>
where
    R: AsyncBufRead + Unpin + ?Sized,
{
    let (tx, mut rx) = mpsc::channel::<OwnedNarEvent>(IN_FLIGHT);
    let target: PathBuf = target.to_owned();
    let writer = tokio::task::spawn_blocking(move || {
        let mut restorer = NarRestorer::new(target);
        while let Some(event) = rx.blocking_recv() {
            restorer.apply(event.as_event())?;
        }
        Ok::<(), NarRestoreError>(())
    });
    let mut events = Vec::new();
    let decoded = async {
        let mut decoder = NarDecoder::new();
        let mut hasher = NarHasher::new();
        while !decoder.is_done() {
            let buf = reader.fill_buf().await.map_err(RestoreError::Read)?;
            if buf.is_empty() {
                decoder.finish()?;
                break;
            }
            let used = decoder
                .feed(buf, |ev| {
                    events.push(ev.to_owned_event());
                    Ok::<(), std::convert::Infallible>(())
                })
                .map_err(|e| match e {
                    super::decode::FeedError::Nar(e) => RestoreError::Nar(e),
                    super::decode::FeedError::Sink(never) => match never {},
                })?;
            hasher.update(&buf[..used]);
            reader.consume(used);
            for event in events.drain(..) {
                if tx.send(event).await.is_err() {
                    // The writer stopped: its error is reported below.
                    return Ok(None);
                }
            }
        }
        Ok::<_, RestoreError>(Some(hasher.summary()))
    }
    .await;
    drop(tx);
    let written = writer.await.map_err(|e| {
        RestoreError::Restore(NarRestoreError::Io {
            op: "running the restore task",
            path: PathBuf::new(),
            source: io::Error::other(e.to_string()),
        })
    })?;
    match (decoded, written) {
        (Err(e), _) => Err(e),
        (Ok(_), Err(e)) => Err(RestoreError::Restore(e)),
        (Ok(Some(summary)), Ok(())) => Ok(summary),
        (Ok(None), Ok(())) => Err(RestoreError::Restore(NarRestoreError::OutOfOrder {
            event: "restore task ended early",
        })),
    }
}

/// Writes the NAR of `path` to `writer`; files are read on the blocking pool.
pub async fn dump_path_async<W>(path: &Path, writer: &mut W) -> Result<NarSummary, NarEncodeError>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(IN_FLIGHT);
    let root = path.to_owned();
    let reader = tokio::task::spawn_blocking(move || {
        let mut encoder = NarEncoder::new(root);
        loop {
            let mut buf = vec![0u8; CHUNK];
            let n = encoder.read_chunk(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            buf.truncate(n);
            if tx.blocking_send(buf).is_err() {
                return Ok(());
            }
        }
    });
    let mut hasher = NarHasher::new();
    let write_error = |source| NarEncodeError::Write {
        path: path.to_owned(),
        source,
    };
    while let Some(chunk) = rx.recv().await {
        writer.write_all(&chunk).await.map_err(write_error)?;
        hasher.update(&chunk);
    }
    reader
        .await
        .map_err(|e| write_error(io::Error::other(e.to_string())))??;
    writer.flush().await.map_err(write_error)?;
    Ok(hasher.summary())
}

/// An `AsyncRead` over a bounded channel of byte chunks, for feeding a NAR
/// that arrives in messages (over gRPC, say) into an importer that reads.
/// An `Err` item fails the read with that error; the channel closing is the
/// end of the stream. Memory stays bounded by the channel's capacity.
pub struct ChannelReader {
    rx: mpsc::Receiver<io::Result<bytes::Bytes>>,
    current: bytes::Bytes,
}

impl ChannelReader {
    pub fn new(rx: mpsc::Receiver<io::Result<bytes::Bytes>>) -> ChannelReader {
        ChannelReader {
            rx,
            current: bytes::Bytes::new(),
        }
    }
}

impl tokio::io::AsyncRead for ChannelReader {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        use std::task::Poll;
        let this = self.get_mut();
        loop {
            if !this.current.is_empty() {
                let n = buf.remaining().min(this.current.len());
                buf.put_slice(&this.current.split_to(n));
                return Poll::Ready(Ok(()));
            }
            match std::task::ready!(this.rx.poll_recv(cx)) {
                Some(Ok(bytes)) => this.current = bytes,
                Some(Err(e)) => return Poll::Ready(Err(e)),
                None => return Poll::Ready(Ok(())),
            }
        }
    }
}
