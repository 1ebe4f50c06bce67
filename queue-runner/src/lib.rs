//! The Sluice queue runner as a library: the binary in `main.rs` is a thin
//! command-line front over these modules, and the integration tests drive
//! them directly.
//!
//! - [`db`]: the PostgreSQL adapter: connecting with one-line errors, and
//!   the migrations that create (or recognise) Hydra's schema.

pub mod db;
