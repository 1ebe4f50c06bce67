//! NARs between the queue runner and the agent's store: the input closure
//! comes with the assignment or, when large, through `InputClosure`; the
//! inputs the store lacks come in through `FetchPaths` (zstd-compressed,
//! in requests of bounded size) and are imported with
//! `AddToStoreNar`; outputs go out through `UploadNar` (uncompressed), with
//! a header carrying their path info.
//!
//! Invariants: NARs stream, they are never held whole: memory is bounded
//! by a few chunks and the decompressor's window (capped at
//! 2^[`MAX_WINDOW_LOG`] bytes), whatever the NAR's size. Inputs are
//! imported one at a time in the order the queue runner sends them (the
//! closure's dependency order), and only the paths that were asked for;
//! the local daemon checks each NAR against its declared hash.

use sluice_nix::nar::stream::ChannelReader;
use std::io;

use bytes::Bytes;
use sluice_nix::daemon::{ClientError, DaemonClient, PathInfo};
use sluice_nix::hash::{Base, Hash, HashAlgo};
use sluice_nix::store_path::{StoreDir, StorePath};
use sluice_proto::v1 as pb;
use sluice_proto::MAX_FETCH_PATHS;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use zstd::stream::raw::{DParameter, Decoder, InBuffer, Operation, OutBuffer};

use crate::session::SessionCtx;

/// Largest zstd window accepted from the queue runner (128 MiB).
const MAX_WINDOW_LOG: u32 = 27;
/// Bytes moved at a time.
const CHUNK: usize = 128 << 10;
/// Chunks buffered between the network and the local daemon.
const BUFFER: usize = 4;

#[derive(Debug, Error)]
pub(crate) enum FetchError {
    #[error("the queue runner refused: {0}")]
    Refused(String),
    #[error("the queue runner sent '{got}' where '{expected}' was due")]
    Unexpected { expected: String, got: String },
    #[error("the stream ended before '{0}' was complete")]
    Truncated(String),
    #[error("the path info of '{path}' is malformed: {problem}")]
    BadInfo { path: String, problem: String },
    #[error("decompressing '{path}': {source}")]
    Decompress { path: String, source: io::Error },
    #[error("importing '{path}': {source}")]
    Import { path: String, source: ClientError },
    #[error("asking the agent's store which inputs it has: {0}")]
    Validity(ClientError),
    #[error("the input closure has {got} paths, the assignment said {expected}")]
    ClosureSize { expected: u64, got: u64 },
}

#[derive(Debug, Error)]
pub(crate) enum UploadError {
    #[error("the queue runner refused the upload: {}", .0.message())]
    Refused(tonic::Status),
    #[error("reading the output from the local store: {0}")]
    Export(ClientError),
}

impl UploadError {
    /// Whether the upload may succeed later, on this session or the next.
    pub(crate) fn worth_retrying(&self) -> bool {
        match self {
            UploadError::Refused(status) => crate::link::worth_retrying(status),
            UploadError::Export(_) => false,
        }
    }
}

fn path_info(info: &pb::StorePathInfo) -> Result<PathInfo, FetchError> {
    let bad = |problem: String| FetchError::BadInfo {
        path: info.path.clone(),
        problem,
    };
    let dir = StoreDir::default();
    let parse = |p: &str| dir.parse_path(p).map_err(|e| bad(e.to_string()));
    let nar_hash =
        Hash::parse_any(&info.nar_hash, Some(HashAlgo::Sha256)).map_err(|e| bad(e.to_string()))?;
    let mut out = PathInfo::new(parse(&info.path)?, nar_hash, info.nar_size);
    for r in &info.references {
        out.references.insert(parse(r)?);
    }
    if !info.deriver.is_empty() {
        out.deriver = Some(parse(&info.deriver)?);
    }
    if !info.ca.is_empty() {
        out.ca = Some(info.ca.clone());
    }
    Ok(out)
}

fn info_to_wire(info: &PathInfo) -> pb::StorePathInfo {
    let dir = StoreDir::default();
    pb::StorePathInfo {
        path: dir.print(&info.path),
        nar_hash: info.nar_hash.format(Base::Nix32, true),
        nar_size: info.nar_size,
        references: info.references.iter().map(|r| dir.print(r)).collect(),
        deriver: info
            .deriver
            .as_ref()
            .map(|d| dir.print(d))
            .unwrap_or_default(),
        ca: info.ca.clone().unwrap_or_default(),
    }
}

/// Makes the assignment's input closure valid in `nix`. The closure comes
/// inline or, for a large one (`inputs_streamed`), from `InputClosure` in
/// chunks; the local store is asked which paths it has a chunk at a time,
/// and what it lacks is fetched in dependency order, at most
/// [`MAX_FETCH_PATHS`] paths per request. Only the missing paths are held,
/// never the closure's path infos.
pub(crate) async fn ensure_inputs(
    ctx: &SessionCtx,
    a: &pb::Assignment,
    nix: &mut DaemonClient,
) -> Result<(), FetchError> {
    let step = a.step_id.as_str();
    let mut missing = Vec::new();
    if a.inputs_streamed {
        let request = pb::InputClosureRequest {
            session_id: ctx.id.clone(),
            step_id: step.to_owned(),
        };
        let refused = |s: tonic::Status| FetchError::Refused(s.message().to_owned());
        let mut stream = ctx
            .client
            .clone()
            .input_closure(request)
            .await
            .map_err(refused)?
            .into_inner();
        let mut got: u64 = 0;
        while let Some(chunk) = stream.message().await.map_err(refused)? {
            got = got.saturating_add(u64::try_from(chunk.paths.len()).unwrap_or(u64::MAX));
            missing.extend(lacking(nix, &chunk.paths).await?);
        }
        if got != a.input_count {
            return Err(FetchError::ClosureSize {
                expected: a.input_count,
                got,
            });
        }
    } else {
        for chunk in a.inputs.chunks(MAX_FETCH_PATHS) {
            missing.extend(lacking(nix, chunk).await?);
        }
    }
    if !missing.is_empty() {
        tracing::debug!(step, count = missing.len(), "fetching inputs");
    }
    for batch in missing.chunks(MAX_FETCH_PATHS) {
        fetch_inputs(ctx, step, batch, nix).await?;
    }
    Ok(())
}

/// The paths of `infos` that `nix` lacks, in the same order.
async fn lacking(
    nix: &mut DaemonClient,
    infos: &[pb::StorePathInfo],
) -> Result<Vec<StorePath>, FetchError> {
    let dir = StoreDir::default();
    let paths = infos
        .iter()
        .map(|i| {
            dir.parse_path(&i.path).map_err(|e| FetchError::BadInfo {
                path: i.path.clone(),
                problem: e.to_string(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let valid = nix
        .query_valid_paths(paths.iter(), false)
        .await
        .map_err(FetchError::Validity)?;
    Ok(paths.into_iter().filter(|p| !valid.contains(p)).collect())
}

/// Fetches `paths` (in dependency order, at most [`MAX_FETCH_PATHS`]) and
/// imports them into `nix`.
async fn fetch_inputs(
    ctx: &SessionCtx,
    step: &str,
    paths: &[StorePath],
    nix: &mut DaemonClient,
) -> Result<(), FetchError> {
    let dir = StoreDir::default();
    let request = pb::FetchPathsRequest {
        session_id: ctx.id.clone(),
        step_id: step.to_owned(),
        paths: paths.iter().map(|p| dir.print(p)).collect(),
    };
    let refused = |s: tonic::Status| FetchError::Refused(s.message().to_owned());
    let mut stream = ctx
        .client
        .clone()
        .fetch_paths(request)
        .await
        .map_err(refused)?
        .into_inner();
    for expected in paths {
        let expected = dir.print(expected);
        let first = stream
            .message()
            .await
            .map_err(refused)?
            .ok_or_else(|| FetchError::Truncated(expected.clone()))?;
        let info = match &first.info {
            Some(info) if info.path == expected => path_info(info)?,
            Some(info) => {
                return Err(FetchError::Unexpected {
                    expected,
                    got: info.path.clone(),
                })
            }
            None => {
                return Err(FetchError::Unexpected {
                    expected,
                    got: "a chunk without path info".into(),
                })
            }
        };
        import_one(nix, &info, first, &mut stream, &expected).await?;
    }
    Ok(())
}

async fn import_one(
    nix: &mut DaemonClient,
    info: &PathInfo,
    first: pb::NarChunk,
    stream: &mut Streaming<pb::NarChunk>,
    path: &str,
) -> Result<(), FetchError> {
    let (tx, rx) = mpsc::channel(BUFFER);
    let reader = ChannelReader::new(rx);
    let import = async {
        let mut reader = reader;
        nix.add_to_store_nar(info, &mut reader, false, true).await
    };
    let (imported, fed) = tokio::join!(import, decompress(first, stream, tx, path));
    match (fed, imported) {
        (Err(FeedError::Fetch(e)), _) => Err(e),
        (_, Err(source)) => Err(FetchError::Import {
            path: path.to_owned(),
            source,
        }),
        (Err(FeedError::ImportStopped), Ok(())) => Err(FetchError::Truncated(path.to_owned())),
        (Ok(()), Ok(())) => Ok(()),
    }
}

enum FeedError {
    Fetch(FetchError),
    ImportStopped,
}

/// Decompresses the chunks of one path into the import, up to its `end`.
async fn decompress(
    first: pb::NarChunk,
    stream: &mut Streaming<pb::NarChunk>,
    tx: mpsc::Sender<io::Result<Bytes>>,
    path: &str,
) -> Result<(), FeedError> {
    let fail = |e: FetchError| async {
        // An error, not an end of file: the import must not complete.
        let _ = tx.send(Err(io::Error::other(e.to_string()))).await;
        Err(FeedError::Fetch(e))
    };
    let zstd_err = |source| FetchError::Decompress {
        path: path.to_owned(),
        source,
    };
    let mut decoder = match Decoder::new().and_then(|mut d| {
        d.set_parameter(DParameter::WindowLogMax(MAX_WINDOW_LOG))
            .map(|()| d)
    }) {
        Ok(d) => d,
        Err(e) => return fail(zstd_err(e)).await,
    };
    let mut out = vec![0u8; CHUNK];
    let mut chunk = first;
    let mut frame_done;
    loop {
        let mut input = InBuffer::around(&chunk.data);
        loop {
            let mut output = OutBuffer::around(&mut out[..]);
            let hint = match decoder.run(&mut input, &mut output) {
                Ok(h) => h,
                Err(e) => return fail(zstd_err(e)).await,
            };
            let n = output.pos();
            frame_done = hint == 0;
            if n > 0
                && tx
                    .send(Ok(Bytes::copy_from_slice(&out[..n])))
                    .await
                    .is_err()
            {
                return Err(FeedError::ImportStopped);
            }
            if input.pos() == chunk.data.len() && n < out.len() {
                break;
            }
        }
        if chunk.end {
            if !frame_done {
                return fail(FetchError::Truncated(path.to_owned())).await;
            }
            return Ok(());
        }
        chunk = match stream.message().await {
            Ok(Some(c)) if c.info.is_none() => c,
            Ok(Some(_)) => {
                return fail(FetchError::Unexpected {
                    expected: format!("more of '{path}'"),
                    got: "the start of another path".into(),
                })
                .await
            }
            Ok(None) => return fail(FetchError::Truncated(path.to_owned())).await,
            Err(s) => return fail(FetchError::Refused(s.message().to_owned())).await,
        };
    }
}

/// Uploads output `name` (path info `info`) from `nix`.
pub(crate) async fn upload_output(
    ctx: &SessionCtx,
    step: &str,
    name: &str,
    info: &PathInfo,
    nix: &mut DaemonClient,
) -> Result<(), UploadError> {
    let (tx, rx) = mpsc::channel(BUFFER);
    let header = pb::NarUpload {
        part: Some(pb::nar_upload::Part::Header(pb::UploadHeader {
            session_id: ctx.id.clone(),
            step_id: step.to_owned(),
            output_name: name.to_owned(),
            info: Some(info_to_wire(info)),
        })),
    };
    // The channel is empty: this cannot wait.
    let _ = tx.try_send(header);
    let mut client = ctx.client.clone();
    let call = client.upload_nar(ReceiverStream::new(rx));
    let chunk = CHUNK.min(ctx.max_message / 2).max(1024);
    let (mut writer, mut reader) = tokio::io::duplex(chunk);
    let export = async move {
        let result = nix.nar_from_path(&info.path, &mut writer).await;
        let _ = writer.shutdown().await;
        result
    };
    let send = async move {
        let mut buf = vec![0u8; chunk];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let data = pb::NarUpload {
                        part: Some(pb::nar_upload::Part::Data(buf[..n].to_vec())),
                    };
                    if tx.send(data).await.is_err() {
                        break;
                    }
                }
            }
        }
        // Dropping `tx` here ends the upload stream.
    };
    let (response, exported, ()) = tokio::join!(call, export, send);
    match (response, exported) {
        (Ok(_), Ok(_)) => Ok(()),
        (Err(s), Ok(_)) => Err(UploadError::Refused(s)),
        (Ok(_), Err(e)) => Err(UploadError::Export(e)),
        // Either caused the other; the queue runner's word says more.
        (Err(s), Err(e)) => {
            tracing::debug!(step, "reading the output locally failed too: {e}");
            Err(UploadError::Refused(s))
        }
    }
}
