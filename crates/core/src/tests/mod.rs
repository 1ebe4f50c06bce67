//! Tests of the core through the simulation harness.

mod batch;
mod critical_path;
mod lifetime;
mod order;
mod prefetch;
mod props;
mod resolution;
mod resume;
mod scenarios;
