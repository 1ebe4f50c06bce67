//! `FetchPaths`: the NARs of inputs an agent lacks, read from the queue
//! runner's store and sent as zstd-compressed chunks.
//!
//! Each path is one zstd stream spread over chunks: the first chunk of a
//! path carries its path info, the last has `end` set. Paths go in the
//! dependency order of the attempt's input closure, whatever order the
//! request lists them in.
//!
//! A request names at most [`MAX_FETCH_PATHS`] paths; an agent that lacks
//! more asks again. The closure is computed for each request from the
//! attempt's roots, out of the store's path-info cache.
//!
//! Invariants: only paths in the attempt's input closure are served, and
//! only to the machine that owns the attempt. Memory per call is bounded:
//! the NAR flows from the daemon through a fixed-size pipe, a compressor
//! and a channel of [`FETCH_BUFFER`] chunks, so an agent that reads slowly
//! slows the daemon down instead of filling the queue runner's memory.

use std::collections::BTreeSet;
use std::io::Write;
use std::sync::Arc;

use sluice_nix::daemon::{ClientError, DaemonClient, PathInfo};
use sluice_nix::store_path::{StoreDir, StorePath};
use sluice_proto::v1 as pb;
use sluice_proto::MAX_FETCH_PATHS;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::auth::AgentIdentity;
use super::convert;
use super::store::StoreError;
use super::Shared;

/// Uncompressed bytes read from the NAR at a time.
const CHUNK: usize = 64 << 10;
/// Compressed chunks buffered towards the agent.
const FETCH_BUFFER: usize = 4;
const ZSTD_LEVEL: i32 = 3;

pub(crate) type FetchStream = ReceiverStream<Result<pb::NarChunk, Status>>;

#[derive(Debug, Error)]
enum FetchError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("reading '{path}' from the queue runner's store: {source}")]
    Daemon { path: String, source: ClientError },
    #[error("compressing the NAR of '{path}': {source}")]
    Compress {
        path: String,
        source: std::io::Error,
    },
    #[error("the NAR of '{0}' does not match the hash the queue runner's store records")]
    Corrupt(String),
    #[error("the agent stopped reading")]
    AgentGone,
}

impl From<FetchError> for Status {
    fn from(e: FetchError) -> Status {
        let msg = e.to_string();
        match e {
            FetchError::Store(_) => Status::unavailable(msg),
            _ => Status::internal(msg),
        }
    }
}

/// Checks the request and starts streaming.
pub(crate) async fn open(
    shared: Arc<Shared>,
    owner: AgentIdentity,
    req: pb::FetchPathsRequest,
) -> Result<FetchStream, Status> {
    let session = shared.sessions.get(&req.session_id, &owner)?;
    let attempt = convert::attempt_id(&req.step_id)?;
    if req.paths.len() > MAX_FETCH_PATHS {
        return Err(Status::invalid_argument(format!(
            "{} paths asked for at once; at most {MAX_FETCH_PATHS} per request",
            req.paths.len()
        )));
    }
    let paths = req
        .paths
        .iter()
        .map(|p| convert::store_path("paths", p))
        .collect::<Result<Vec<_>, _>>()?;
    let closure = super::input_closure::of_attempt(&shared, attempt, session.machine).await?;
    let ordered = order_inputs(&closure, &paths).map_err(|p| {
        Status::permission_denied(format!(
            "'{}' is not in the input closure of {attempt}",
            StoreDir::default().print(&p)
        ))
    })?;
    drop(closure);
    let (tx, rx) = mpsc::channel(FETCH_BUFFER);
    tokio::spawn(async move {
        match send_paths(&shared, ordered, &tx).await {
            Ok(()) | Err(FetchError::AgentGone) => {}
            Err(e) => {
                tracing::warn!(session = %session.id, %attempt, "input fetch failed: {e}");
                let _ = tx.send(Err(e.into())).await;
            }
        }
    });
    Ok(ReceiverStream::new(rx))
}

/// The infos of `paths` (which must all be in `closure`, a closure in
/// dependency order) in the closure's order, without duplicates; the
/// first path not in it is the error.
fn order_inputs(
    closure: &[Arc<PathInfo>],
    paths: &[StorePath],
) -> Result<Vec<Arc<PathInfo>>, StorePath> {
    let wanted: BTreeSet<&StorePath> = paths.iter().collect();
    let ordered: Vec<Arc<PathInfo>> = closure
        .iter()
        .filter(|i| wanted.contains(&i.path))
        .cloned()
        .collect();
    if ordered.len() < wanted.len() {
        let have: BTreeSet<&StorePath> = ordered.iter().map(|i| &i.path).collect();
        if let Some(stray) = paths.iter().find(|p| !have.contains(p)) {
            return Err(stray.clone());
        }
    }
    Ok(ordered)
}

type ChunkSender = mpsc::Sender<Result<pb::NarChunk, Status>>;

async fn send_paths(
    shared: &Shared,
    paths: Vec<Arc<PathInfo>>,
    tx: &ChunkSender,
) -> Result<(), FetchError> {
    let mut client = shared.store.client().await?;
    for info in paths {
        send_path(&mut client, &info, tx).await?;
    }
    Ok(())
}

/// Sends the NAR of `info`'s path (its info came from the closure: a
/// valid path's info never changes, and a path deleted since fails the
/// export).
async fn send_path(
    client: &mut DaemonClient,
    info: &PathInfo,
    tx: &ChunkSender,
) -> Result<(), FetchError> {
    let path = &info.path;
    let printed = StoreDir::default().print(path);
    let daemon_err = |source| FetchError::Daemon {
        path: printed.clone(),
        source,
    };
    let (mut writer, reader) = tokio::io::duplex(CHUNK);
    let export = async move {
        let result = client.nar_from_path(path, &mut writer).await;
        let _ = writer.shutdown().await;
        result
    };
    let compress = compress(reader, convert::path_info_to_wire(info), &printed, tx);
    let (exported, compressed) = tokio::join!(export, compress);
    let tail = match (exported, compressed) {
        (_, Err(FetchError::AgentGone)) => return Err(FetchError::AgentGone),
        (Err(e), _) => return Err(daemon_err(e)),
        (Ok(summary), _) if summary.nar_hash != info.nar_hash => {
            return Err(FetchError::Corrupt(printed.clone()))
        }
        (Ok(_), compressed) => compressed?,
    };
    // Only a complete, verified NAR gets its `end`.
    tx.send(Ok(tail)).await.map_err(|_| FetchError::AgentGone)
}

/// Reads the NAR from `reader` and sends it compressed; returns the last
/// chunk (with `end` set) for the caller to send once the export is known
/// to be complete. Takes the reader by value so that stopping early closes
/// the pipe and stops the export.
async fn compress(
    mut reader: DuplexStream,
    info: pb::StorePathInfo,
    path: &str,
    tx: &ChunkSender,
) -> Result<pb::NarChunk, FetchError> {
    let err = |source| FetchError::Compress {
        path: path.to_owned(),
        source,
    };
    let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), ZSTD_LEVEL).map_err(err)?;
    let mut buf = vec![0u8; CHUNK];
    let mut info = Some(info);
    loop {
        let n = reader.read(&mut buf).await.map_err(err)?;
        if n == 0 {
            break;
        }
        encoder.write_all(&buf[..n]).map_err(err)?;
        let data = std::mem::take(encoder.get_mut());
        if !data.is_empty() {
            let chunk = pb::NarChunk {
                info: info.take(),
                data,
                end: false,
            };
            tx.send(Ok(chunk))
                .await
                .map_err(|_| FetchError::AgentGone)?;
        }
    }
    let data = encoder.finish().map_err(err)?;
    Ok(pb::NarChunk {
        info: info.take(),
        data,
        end: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_nix::hash::Hash;

    fn path(name: &str) -> StorePath {
        let hash = name.len();
        StoreDir::default()
            .parse_path(&format!(
                "/nix/store/{}-{name}",
                format!("{hash}").repeat(32).get(..32).unwrap_or_default()
            ))
            .expect("test path")
    }

    #[test]
    fn inputs_are_served_in_closure_order_and_only_inputs() {
        let closure: Vec<Arc<PathInfo>> = ["a", "bb", "ccc"]
            .iter()
            .map(|n| Arc::new(PathInfo::new(path(n), Hash::sha256(b"x"), 1)))
            .collect();
        let got = order_inputs(&closure, &[path("ccc"), path("a"), path("ccc")]);
        let got: Vec<StorePath> = got
            .expect("inputs")
            .iter()
            .map(|i| i.path.clone())
            .collect();
        assert_eq!(got, vec![path("a"), path("ccc")]);
        assert_eq!(
            order_inputs(&closure, &[path("a"), path("dddd")]).map(|_| ()),
            Err(path("dddd"))
        );
    }
}
