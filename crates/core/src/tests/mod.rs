//! Tests of the core through the simulation harness.

mod lifetime;
mod order;
mod props;
mod resume;
mod scenarios;
