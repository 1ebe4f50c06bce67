//! Tests of the core through the simulation harness.

mod lifetime;
mod order;
mod props;
mod resolution;
mod resume;
mod scenarios;
