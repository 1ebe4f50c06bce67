//! Tests of the core through the simulation harness.

mod critical_path;
mod lifetime;
mod order;
mod props;
mod resolution;
mod resume;
mod scenarios;
