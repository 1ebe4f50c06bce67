//! The IO under [`super::client`]: a byte stream to the daemon with a read
//! buffer, and [`Call`], the guard every operation runs in.
//!
//! A `Call` takes the connection out of the client for the duration of an
//! operation and puts it back only when the operation ended in a state the
//! daemon agrees on (success, or an error the daemon reported with
//! `STDERR_ERROR`). If the operation's future is dropped, or fails in the
//! middle of the exchange (IO error, malformed reply), the connection is
//! dropped with the `Call`: the socket is closed or the child's pipes are
//! shut, the daemon notices the hang-up and interrupts what it was doing
//! (a build included), and the client reports [`ClientError::Closed`] from
//! then on. A connection is therefore never left desynchronised.
//!
//! Invariant: bytes are only interpreted by the pure codecs in
//! [`super::wire`], [`super::stderr`] and [`crate::nar`]; this module only
//! moves them.

use std::io;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::client::{ClientError, DaemonClient};
use super::stderr::{self, LogEvent, StderrMessage};
use super::wire::{DecodeError, Limits, Malformed, WireReader, WireWriter};

/// Largest frame sent in framed uploads.
const FRAME: usize = 64 * 1024;

/// Receives log events as they arrive.
pub type Logger = Box<dyn FnMut(LogEvent) + Send>;

/// Why reading failed, before it is tied to an operation.
pub(crate) enum ReadError {
    Io(io::Error),
    Eof,
    Malformed(Malformed),
}

impl ReadError {
    pub(crate) fn for_op(self, op: &str) -> ClientError {
        let op = op.to_owned();
        match self {
            ReadError::Io(source) => ClientError::Io { op, source },
            ReadError::Eof => ClientError::Disconnected { op },
            ReadError::Malformed(source) => ClientError::Protocol { op, source },
        }
    }
}

/// The receiving side: the stream and what was read but not yet decoded.
pub(crate) struct Reader {
    stream: Box<dyn AsyncRead + Send + Unpin>,
    pub(crate) buf: BytesMut,
}

impl Reader {
    /// Replaces the buffer by one just big enough for what it holds
    /// unread, if its capacity is over `keep` bytes.
    pub(crate) fn shrink(&mut self, keep: usize) {
        if self.buf.capacity() > keep {
            self.buf = BytesMut::from(&self.buf[..]);
        }
    }

    /// Reads more bytes into the buffer.
    pub(crate) async fn fill(&mut self) -> Result<(), ReadError> {
        let want = self.buf.len().clamp(FRAME, 1 << 20);
        self.buf.reserve(want);
        match self.stream.read_buf(&mut self.buf).await {
            Ok(0) => Err(ReadError::Eof),
            Ok(_) => Ok(()),
            Err(e) => Err(ReadError::Io(e)),
        }
    }

    /// Decodes one value with `f`, reading as much as it needs.
    pub(crate) async fn decode<T>(
        &mut self,
        limits: Limits,
        mut f: impl FnMut(&mut WireReader<'_>) -> Result<T, DecodeError>,
    ) -> Result<T, ReadError> {
        loop {
            let mut r = WireReader::new(&self.buf, limits);
            match f(&mut r) {
                Ok(v) => {
                    let used = r.position();
                    self.buf.advance(used);
                    return Ok(v);
                }
                Err(DecodeError::NeedMore { needed }) => {
                    while self.buf.len() < needed {
                        self.fill().await?;
                    }
                }
                Err(DecodeError::Malformed(m)) => return Err(ReadError::Malformed(m)),
            }
        }
    }

    /// Reads stderr messages up to `STDERR_LAST`, passing log events on.
    /// `Ok(Err(_))` is an error the daemon reported (the connection stays
    /// in step); `Err(_)` means it is not.
    pub(crate) async fn process_stderr(
        &mut self,
        limits: Limits,
        logger: &mut Logger,
    ) -> Result<Result<(), stderr::RemoteError>, ReadError> {
        loop {
            match self.decode(limits, stderr::decode).await? {
                StderrMessage::Last => return Ok(Ok(())),
                StderrMessage::Error(e) => return Ok(Err(e)),
                StderrMessage::Log(event) => logger(event),
                StderrMessage::Read(_) | StderrMessage::Write(_) => {
                    return Err(ReadError::Malformed(Malformed::invalid(
                        "stderr message",
                        "the daemon asked for a data transfer no supported operation uses",
                    )))
                }
            }
        }
    }
}

/// An open byte stream to a daemon.
pub(crate) struct Connection {
    pub(crate) reader: Reader,
    pub(crate) writer: Box<dyn AsyncWrite + Send + Unpin>,
    /// The `nix-daemon --stdio` process, if we started one. Not killed on
    /// drop: closing its stdin makes it interrupt its work and exit.
    pub(crate) child: Option<tokio::process::Child>,
}

impl Connection {
    pub(crate) fn new(
        reader: Box<dyn AsyncRead + Send + Unpin>,
        writer: Box<dyn AsyncWrite + Send + Unpin>,
        child: Option<tokio::process::Child>,
    ) -> Self {
        Connection {
            reader: Reader {
                stream: reader,
                buf: BytesMut::with_capacity(FRAME),
            },
            writer,
            child,
        }
    }

    pub(crate) async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.writer.write_all(bytes).await?;
        self.writer.flush().await
    }
}

/// Sends `source` as frames (`u64` length, bytes; a zero length ends it).
async fn send_frames(
    writer: &mut (dyn AsyncWrite + Send + Unpin),
    source: &mut (dyn AsyncRead + Send + Unpin),
) -> Result<(), FrameError> {
    let mut buf = vec![0u8; 8 + FRAME];
    loop {
        let n = loop {
            match source.read(&mut buf[8..]).await {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(FrameError::Source(e)),
            }
        };
        buf[..8].copy_from_slice(&(n as u64).to_le_bytes());
        writer
            .write_all(&buf[..8 + n])
            .await
            .map_err(FrameError::Write)?;
        if n == 0 {
            return writer.flush().await.map_err(FrameError::Write);
        }
    }
}

enum FrameError {
    Source(io::Error),
    Write(io::Error),
}

/// One operation in progress; see the module documentation.
pub(crate) struct Call<'c> {
    client: &'c mut DaemonClient,
    conn: Option<Connection>,
    pub(crate) op: String,
    /// Put the connection back when the call ends.
    keep: bool,
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        if self.keep {
            self.client.conn = self.conn.take();
        }
    }
}

impl<'c> Call<'c> {
    pub(crate) fn begin(client: &'c mut DaemonClient, op: String) -> Result<Self, ClientError> {
        let Some(conn) = client.conn.take() else {
            return Err(ClientError::Closed { op });
        };
        Ok(Call {
            client,
            conn: Some(conn),
            op,
            keep: false,
        })
    }

    fn parts(&mut self) -> Result<(&mut Connection, &mut Logger, Limits), ClientError> {
        let limits = self.client.limits;
        match &mut self.conn {
            Some(conn) => Ok((conn, &mut self.client.logger, limits)),
            None => Err(ClientError::Closed {
                op: self.op.clone(),
            }),
        }
    }

    pub(crate) async fn send(&mut self, w: &WireWriter) -> Result<(), ClientError> {
        let (conn, _, _) = self.parts()?;
        let result = conn.send(w.as_bytes()).await;
        result.map_err(|source| ClientError::Io {
            op: self.op.clone(),
            source,
        })
    }

    pub(crate) async fn read<T>(
        &mut self,
        f: impl FnMut(&mut WireReader<'_>) -> Result<T, DecodeError>,
    ) -> Result<T, ClientError> {
        let (conn, _, limits) = self.parts()?;
        let result = conn.reader.decode(limits, f).await;
        result.map_err(|e| e.for_op(&self.op))
    }

    /// Direct access to the read buffer (for the unframed NAR).
    pub(crate) fn reader(&mut self) -> Result<&mut Reader, ClientError> {
        Ok(&mut self.parts()?.0.reader)
    }

    /// Waits for the end of the daemon's work on this operation.
    pub(crate) async fn process_stderr(&mut self) -> Result<(), ClientError> {
        let (conn, logger, limits) = self.parts()?;
        let result = conn.reader.process_stderr(limits, logger).await;
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => {
                // The daemon ended the operation itself: still in step.
                self.keep = true;
                Err(ClientError::Remote {
                    op: self.op.clone(),
                    source,
                })
            }
            Err(e) => Err(e.for_op(&self.op)),
        }
    }

    /// Sends `w`, which holds `count` operations, and reads their replies
    /// while it is being written: each reply's stderr messages up to
    /// `STDERR_LAST`, then its value, decoded by `f` with its index. An
    /// error the daemon reports for one operation fails the call and
    /// leaves the connection closed (the replies after it are unread).
    pub(crate) async fn send_and_read_replies<T>(
        &mut self,
        w: &WireWriter,
        count: usize,
        mut f: impl FnMut(usize, &mut WireReader<'_>) -> Result<T, DecodeError>,
    ) -> Result<Vec<T>, ClientError> {
        let op = self.op.clone();
        let (conn, logger, limits) = self.parts()?;
        let Connection { reader, writer, .. } = conn;
        let send = async {
            writer.write_all(w.as_bytes()).await?;
            writer.flush().await
        };
        let replies = async {
            let mut out = Vec::with_capacity(count);
            for i in 0..count {
                if let Err(remote) = reader.process_stderr(limits, logger).await? {
                    return Ok(Err(remote));
                }
                out.push(reader.decode(limits, |r| f(i, r)).await?);
            }
            Ok(Ok(out))
        };
        tokio::pin!(send, replies);
        let mut sent = false;
        // Replies that end early (an error) abandon the rest of the
        // writing: the daemon may have stopped reading.
        let read: Result<Result<Vec<T>, stderr::RemoteError>, ReadError> = loop {
            tokio::select! {
                biased;
                done = &mut send, if !sent => match done {
                    Ok(()) => sent = true,
                    Err(source) => return Err(ClientError::Io { op, source }),
                },
                read = &mut replies => break read,
            }
        };
        match read {
            Ok(Ok(out)) => {
                // Every request was answered, so every byte was read: this
                // only completes the flush.
                if !sent {
                    send.await.map_err(|source| ClientError::Io {
                        op: op.clone(),
                        source,
                    })?;
                }
                Ok(out)
            }
            Ok(Err(source)) => Err(ClientError::Remote { op, source }),
            Err(e) => Err(e.for_op(&op)),
        }
    }

    /// Streams `source` as framed data while handling the daemon's stderr
    /// messages, up to its `STDERR_LAST`.
    pub(crate) async fn send_framed_and_process_stderr(
        &mut self,
        source: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<(), ClientError> {
        let op = self.op.clone();
        let (outcome, frames_done) = {
            let (conn, logger, limits) = self.parts()?;
            let Connection { reader, writer, .. } = conn;
            let frames = send_frames(writer.as_mut(), source);
            let stderr = reader.process_stderr(limits, logger);
            tokio::pin!(frames, stderr);
            let mut frames_done = false;
            loop {
                tokio::select! {
                    // Frames first: when both are ready, whether all data
                    // went out decides if the connection is still in step.
                    biased;
                    sent = &mut frames, if !frames_done => match sent {
                        Ok(()) => frames_done = true,
                        Err(FrameError::Source(source)) => {
                            return Err(ClientError::Source { op, source })
                        }
                        // The daemon may have hung up after reporting why:
                        // prefer its message if it arrives.
                        Err(FrameError::Write(e)) => {
                            return Err(match stderr.await {
                                Ok(Err(source)) => ClientError::Remote { op, source },
                                _ => ClientError::Io { op, source: e },
                            });
                        }
                    },
                    done = &mut stderr => break (done, frames_done),
                }
            }
        };
        match outcome {
            Ok(Ok(())) if frames_done => Ok(()),
            Ok(Ok(())) => Err(ClientError::Protocol {
                op,
                source: Malformed::invalid(
                    "stderr message",
                    "STDERR_LAST before the data was sent",
                ),
            }),
            Ok(Err(source)) => {
                // Only in step if the daemon had consumed all frames.
                self.keep = frames_done;
                Err(ClientError::Remote { op, source })
            }
            Err(e) => Err(e.for_op(&op)),
        }
    }

    /// Ends the call successfully, returning the connection to the client.
    pub(crate) fn finish<T>(mut self, value: T) -> T {
        self.keep = true;
        value
    }

    /// [`Call::finish`] for operations without a reply value.
    pub(crate) fn done(mut self) {
        self.keep = true;
    }
}
