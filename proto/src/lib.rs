//! Generated types and stubs of the `sluice.v1` agent protocol.
//!
//! Only the gRPC adapters of `queue-runner` and `builder-agent` use these
//! types; everything else converts them into its own types at the edge.

#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("sluice.v1");
}

/// The protocol version this crate speaks; bumped on any change that an
/// older peer would misread.
pub const PROTOCOL_VERSION: u32 = 1;
