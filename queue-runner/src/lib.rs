//! The Sluice queue runner as a library: the binary in `main.rs` is a thin
//! command-line front over these modules, and the integration tests drive
//! them directly.
//!
//! - [`db`]: the PostgreSQL adapter: connecting with one-line errors, and
//!   the migrations that create (or recognise) Hydra's schema.

pub mod agents;
pub mod binary_cache;
pub mod bounded_cache;
pub mod ca;
pub mod compact;
pub mod config;
pub mod dashboard;
pub mod db;
pub mod driver;
pub mod drv_table;
pub mod embedded;
pub mod failpoint;
pub mod grpc;
pub mod http;
pub mod ingest;
pub mod logging;
pub mod logs;
pub mod memory;
pub mod nix_support;
pub mod service;
pub mod status;
pub mod status_row;
pub mod store;
pub mod submit;
