//! The pure scheduling core of the queue runner.
//!
//! It owns the step graph and the dispatch queues. It takes [`Event`]s and
//! returns [`Command`]s; it never reads the clock (time is a parameter,
//! [`Millis`]) and never performs IO. The tokio driver in `queue-runner`
//! owns one [`Core`], feeds it events from PostgreSQL, the store and the
//! builders, and executes the commands it returns.
//!
//! Architecture invariant: this crate depends on no async runtime, database
//! or RPC crate, and is deterministic: the same events at the same times
//! give the same commands.
//!
//! # How a driver uses it
//!
//! One task owns the `Core` and loops:
//!
//! ```text
//! loop {
//!     let event = select! {
//!         // builds_added / builds_restarted: closure read from the store,
//!         // derivations whose outputs are all valid left out
//!         (build, steps) = new_builds  => Event::BuildQueued { build, steps },
//!         id = builds_cancelled        => Event::BuildCancelled { build: id },
//!         (id, p) = builds_bumped      => Event::BuildBumped { build: id, global_priority: p },
//!         spec = agent_registered      => Event::MachineConnected(spec),
//!         id = agent_gone              => Event::MachineDisconnected { machine: id },
//!         (drv_path, machine, outcome) = agent_result
//!                                      => Event::StepFinished { drv_path, machine, outcome },
//!         _ = sleep_until(core.next_deadline()) => Event::Tick,
//!     };
//!     for command in core.handle(event, monotonic_millis()) {
//!         execute(command); // BuildSteps rows, gRPC sends, notifications
//!     }
//! }
//! ```
//!
//! The core has already changed its state when it returns a command. A
//! driver that cannot carry one out (an agent that cannot be reached)
//! reports that back as an event: `MachineDisconnected`, or `StepFinished`
//! with an aborted, retryable outcome.
//!
//! Code map: `types` (ids, status codes, time), `event` and `command` (the
//! interface), `order` (pluggable dispatch order), `graph` (steps and
//! builds), `queue` (per-class runnable queues), `machine` (builders and
//! slots), `core` (the state machine), with its behaviour split over
//! `ingest`, `critical_path` (each step's longest expected time to the
//! top of the graph), `dispatch`, `outcome`, `resolution`
//! (content-addressed steps resolved into fresh ones) and `resume`
//! (detached machines, attempts adopted after a restart), and `status`
//! (reports).
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod command;
mod config;
mod core;
mod critical_path;
mod dispatch;
mod event;
mod graph;
mod index;
mod ingest;
mod machine;
mod order;
mod outcome;
mod queue;
mod resolution;
mod resume;
pub mod shares;
mod status;
mod types;

#[cfg(test)]
mod invariants;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

pub use crate::command::{BuildFinished, Command, DependentBuild, EventError};
pub use crate::config::Config;
pub use crate::core::Core;
pub use crate::event::{BuildSpec, Event, MachineSpec, Resolution, StepOutcome, StepSpec};
pub use crate::order::{
    ConfiguredKey, ConfiguredOrder, CriticalPathKey, CriticalPathOrder, HydraKey, HydraOrder,
    Priority, StepOrder, StepView, UnknownOrder,
};
pub use crate::status::{MachineStats, Stats};
pub use crate::types::{
    BuildId, DrvPath, JobsetId, MachineId, Millis, PathHasher, PathMap, PathSet, Status,
    StepFailure,
};
