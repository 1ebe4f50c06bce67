//! `UploadNar`: an output's NAR from an agent, imported into the queue
//! runner's store.
//!
//! The header names the attempt and output and declares the path info
//! (NAR hash and size, references, deriver, content address); data chunks
//! follow, uncompressed. The NAR streams into `AddToStoreNar` as it
//! arrives, while its size and SHA-256 are counted.
//!
//! Invariants: the header is checked against the attempt before a byte is
//! read (owner, output name, path, content address, references, size
//! limit), and the deriver recorded is the attempt's derivation, never the
//! agent's word. The daemon
//! never receives more bytes than declared, and the last chunk is held
//! back until the agent has finished sending and the count and hash match
//! the header: a NAR that differs is never complete in the daemon's eyes,
//! so it is never registered, and it is not recorded as uploaded. Memory
//! is bounded by the message size times [`UPLOAD_BUFFER`] plus one held
//! chunk, whatever the NAR's size.

use sluice_nix::nar::stream::ChannelReader;
use std::collections::BTreeSet;
use std::io;
use std::sync::Arc;

use bytes::Bytes;
use sluice_nix::daemon::{ClientError, PathInfo};
use sluice_nix::nar::{NarHasher, NarSummary};
use sluice_nix::store_path::{StoreDir, StorePath};
use sluice_proto::v1 as pb;
use thiserror::Error;
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use super::attempts::UploadedOutput;
use super::auth::AgentIdentity;
use super::convert;
use super::store::StoreError;
use super::Shared;

/// Chunks buffered between the agent's stream and the daemon.
const UPLOAD_BUFFER: usize = 4;

#[derive(Debug, Error)]
enum UploadError {
    #[error("the upload must start with a header")]
    NoHeader,
    #[error("a second header in the middle of the data")]
    SecondHeader,
    #[error("the NAR is longer than the declared {declared} bytes")]
    TooLong { declared: u64 },
    #[error("the NAR has {got} bytes, not the declared {declared}")]
    SizeMismatch { declared: u64, got: u64 },
    #[error("the NAR's hash is {got}, not the declared {declared}")]
    HashMismatch { declared: String, got: String },
    #[error("the agent's stream failed: {0}")]
    Stream(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("reading the input closure from the queue runner's store: {0}")]
    Closure(#[from] crate::store::StoreError),
    #[error("importing '{path}' into the queue runner's store: {source}")]
    Import { path: String, source: ClientError },
    #[error("the import stopped before the NAR was complete")]
    ImportStopped,
}

impl From<UploadError> for Status {
    fn from(e: UploadError) -> Status {
        let msg = e.to_string();
        match e {
            UploadError::NoHeader | UploadError::SecondHeader => Status::invalid_argument(msg),
            UploadError::TooLong { .. }
            | UploadError::SizeMismatch { .. }
            | UploadError::HashMismatch { .. } => Status::data_loss(msg),
            UploadError::Stream(_) => Status::cancelled(msg),
            UploadError::Store(_) | UploadError::Closure(_) => Status::unavailable(msg),
            UploadError::Import { ref source, .. } if source.remote().is_some() => {
                Status::failed_precondition(msg)
            }
            UploadError::Import { .. } | UploadError::ImportStopped => Status::internal(msg),
        }
    }
}

/// Those of `info`'s references that are in the input closure of
/// `roots` (computed only when it refers to anything but itself).
async fn input_references(
    shared: &Shared,
    roots: Vec<StorePath>,
    info: &PathInfo,
) -> Result<BTreeSet<StorePath>, UploadError> {
    if info.references.iter().all(|r| *r == info.path) {
        return Ok(BTreeSet::new());
    }
    let closure = crate::store::closure(&shared.store, roots).await?;
    Ok(closure
        .iter()
        .filter(|i| info.references.contains(&i.path))
        .map(|i| i.path.clone())
        .collect())
}

/// Receives, verifies and imports one upload.
pub(crate) async fn receive(
    shared: Arc<Shared>,
    owner: AgentIdentity,
    mut inbound: Streaming<pb::NarUpload>,
) -> Result<pb::UploadNarResponse, Status> {
    let header = match inbound.message().await? {
        Some(pb::NarUpload {
            part: Some(pb::nar_upload::Part::Header(h)),
        }) => h,
        _ => return Err(UploadError::NoHeader.into()),
    };
    let session = shared.sessions.get(&header.session_id, &owner)?;
    let attempt = convert::attempt_id(&header.step_id)?;
    let wire_info = header
        .info
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("the upload header has no path info"))?;
    let mut info = convert::path_info_from_wire(wire_info)?;
    let output = header.output_name;
    let roots = shared
        .attempts
        .with_owned(attempt, session.machine, |e| e.input_roots().to_vec())?;
    let input_refs = input_references(&shared, roots, &info).await?;
    let deriver = shared.attempts.with_owned(attempt, session.machine, |e| {
        e.check_upload(&output, &info, &input_refs)
            .map(|()| e.drv_path().clone())
    })??;
    // The output's deriver is the attempt's derivation, whatever the
    // agent's store recorded (it built a basic derivation of its own).
    info.deriver = Some(deriver);

    let mut client = shared.store.client().await.map_err(UploadError::from)?;
    let (tx, rx) = mpsc::channel(UPLOAD_BUFFER);
    let reader = ChannelReader::new(rx);
    let import = async {
        // Owned here, so the channel closes as soon as the import stops.
        let mut reader = reader;
        client
            .add_to_store_nar(&info, &mut reader, false, true)
            .await
    };
    let (imported, received) = tokio::join!(import, forward(&mut inbound, &info, tx));
    let printed = StoreDir::default().print(&info.path);
    let summary = match (received, imported) {
        (Err(UploadError::ImportStopped), Err(source)) | (Ok(_), Err(source)) => {
            return Err(UploadError::Import {
                path: printed,
                source,
            }
            .into())
        }
        (Err(e), _) => return Err(e.into()),
        (Ok(summary), Ok(())) => summary,
    };
    shared.attempts.record_upload(
        attempt,
        session.machine,
        &output,
        UploadedOutput {
            path: info.path.clone(),
            nar_hash: summary.nar_hash,
            nar_size: summary.nar_size,
        },
    )?;
    tracing::debug!(session = %session.id, %attempt, output, path = printed, "output uploaded");
    Ok(pb::UploadNarResponse {})
}

/// Moves data chunks from the agent to the import, counting and hashing
/// them, holding the last one back until the whole NAR is verified.
async fn forward(
    inbound: &mut Streaming<pb::NarUpload>,
    info: &PathInfo,
    tx: mpsc::Sender<io::Result<Bytes>>,
) -> Result<NarSummary, UploadError> {
    let mut hasher = NarHasher::new();
    let mut held: Option<Bytes> = None;
    let failure = loop {
        let data = match inbound.message().await {
            Ok(Some(pb::NarUpload {
                part: Some(pb::nar_upload::Part::Data(d)),
            })) => d,
            Ok(Some(_)) => break UploadError::SecondHeader,
            Ok(None) => {
                let summary = hasher.summary();
                if summary.nar_size != info.nar_size {
                    break UploadError::SizeMismatch {
                        declared: info.nar_size,
                        got: summary.nar_size,
                    };
                }
                if summary.nar_hash != info.nar_hash {
                    break UploadError::HashMismatch {
                        declared: info.nar_hash.to_string(),
                        got: summary.nar_hash.to_string(),
                    };
                }
                if let Some(last) = held.take() {
                    tx.send(Ok(last))
                        .await
                        .map_err(|_| UploadError::ImportStopped)?;
                }
                return Ok(summary);
            }
            Err(status) => break UploadError::Stream(status.message().to_owned()),
        };
        if data.is_empty() {
            continue;
        }
        if hasher.size().saturating_add(data.len() as u64) > info.nar_size {
            break UploadError::TooLong {
                declared: info.nar_size,
            };
        }
        hasher.update(&data);
        if let Some(previous) = held.replace(Bytes::from(data)) {
            if tx.send(Ok(previous)).await.is_err() {
                return Err(UploadError::ImportStopped);
            }
        }
    };
    // The import must fail rather than see an end of file: an error, not
    // EOF, so the daemon never completes a NAR we refused.
    let _ = tx.send(Err(io::Error::other(failure.to_string()))).await;
    Err(failure)
}
