//! Generated types and stubs of the `sluice.v1` agent protocol.
//!
//! Only the gRPC adapters of `queue-runner` and `builder-agent` use these
//! types; everything else converts them into its own types at the edge.

#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("sluice.v1");
}

/// The protocol version this crate speaks; bumped on any change that an
/// older peer would misread. 2: closures over [`MAX_INLINE_INPUTS`] paths
/// are streamed (`Assignment.inputs_streamed`, `InputClosure`), and
/// `FetchPaths` takes at most [`MAX_FETCH_PATHS`] paths.
pub const PROTOCOL_VERSION: u32 = 2;

/// The most input paths an assignment carries inline; a larger closure
/// is streamed with `InputClosure`, so no assignment grows with it.
pub const MAX_INLINE_INPUTS: usize = 1_000;

/// The most paths in one `InputClosureChunk`.
pub const MAX_CLOSURE_CHUNK_PATHS: usize = 1_000;

/// The most encoded bytes of path infos in one `InputClosureChunk` (a
/// chunk stops early past it; one path info alone may exceed it).
pub const MAX_CLOSURE_CHUNK_BYTES: usize = 1 << 20;

/// The most paths one `FetchPaths` request may name.
pub const MAX_FETCH_PATHS: usize = 1_000;
