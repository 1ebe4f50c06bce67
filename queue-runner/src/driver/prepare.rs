//! Preparing one attempt: its `BuildSteps` row (unless it is adopted after
//! a restart and has one), then the assignment the agent needs (the basic
//! derivation and the closure of its inputs, inline when it is small).
//!
//! Runs as a short-lived task per dispatch, so the driver never waits for
//! the database or the store. The row is committed and the assignment read
//! from the store at the same time; the assignment is sent only once the
//! row exists (a restarted queue runner knows every attempt an agent runs). It always ends by sending exactly one
//! [`DriverEvent::Prepared`] for its attempt, carrying the assignment (or
//! why there is none); the driver sends it on.

use std::collections::BTreeMap;

use sluice_core::{BuildId, MachineId};
use tokio::sync::{mpsc, oneshot};

use super::writer::WriteJob;
use super::DriverEvent;
use crate::agents::{Assignment, AttemptId};
use crate::grpc::AttemptEntry;
use crate::store::{self, Store};

#[derive(Debug)]
pub struct Preparation {
    pub attempt: AttemptId,
    pub machine: MachineId,
    pub build: BuildId,
    pub drv_path: String,
    pub system: String,
    pub machine_name: String,
    pub outputs: BTreeMap<String, Option<String>>,
    pub first_for_build: bool,
    pub started_unix: i64,
    /// The row of an attempt adopted after a restart: none is created.
    pub existing_row: Option<i32>,
    pub max_log_bytes: u64,
    pub max_output_bytes: u64,
    /// (max silent time, timeout) in seconds, from the build.
    pub timeouts: (u32, u32),
    /// Steps resolved into this derivation, whose status-13 rows are
    /// created with this attempt's row.
    pub resolutions: Vec<super::writer::ResolutionRow>,
}

pub async fn run(
    job: Preparation,
    writer: mpsc::Sender<WriteJob>,
    store: Store,
    me: mpsc::Sender<DriverEvent>,
) {
    let attempt = job.attempt;
    // The row and the assignment are made side by side; the assignment
    // goes out only once the row has committed.
    let row = async {
        match job.existing_row {
            Some(stepnr) => Ok(stepnr),
            None => create_row(&job, &writer).await,
        }
    };
    let made = async {
        assignment(&job, &store).await.and_then(|assignment| {
            // What the gRPC layer checks the agent against, parsed here
            // rather than on the driver's task.
            let entry = AttemptEntry::from_assignment(job.machine, &assignment)
                .map_err(|e| e.to_string())?;
            Ok((assignment, entry))
        })
    };
    let (stepnr, made) = tokio::join!(row, made);
    let (stepnr, assignment) = match stepnr {
        Err(e) => (0, Err(format!("recording the step: {e}"))),
        Ok(stepnr) => (stepnr, made),
    };
    // The driver registers the attempt with the gRPC layer and sends the
    // assignment itself, so a cancel that came meanwhile wins cleanly.
    let _ = me
        .send(DriverEvent::Prepared {
            attempt,
            stepnr,
            assignment: Box::new(assignment),
        })
        .await;
}

/// Creates the attempt's busy row (with its `SluiceAttempts` record);
/// returns its number.
async fn create_row(job: &Preparation, writer: &mpsc::Sender<WriteJob>) -> Result<i32, String> {
    let (reply, created) = oneshot::channel();
    let create = WriteJob::CreateStep {
        attempt: job.attempt,
        build: job.build.0,
        drv_path: job.drv_path.clone(),
        system: job.system.clone(),
        machine: job.machine_name.clone(),
        outputs: job.outputs.clone(),
        start_time: job.started_unix,
        first_for_build: job.first_for_build,
        resolutions: job.resolutions.clone(),
        reply,
    };
    if writer.send(create).await.is_err() {
        return Err("the database writer stopped".to_string());
    }
    match created.await {
        Ok(r) => r,
        Err(_) => Err("the database writer dropped the request".to_string()),
    }
}

async fn assignment(job: &Preparation, store: &Store) -> Result<Assignment, String> {
    let drv = store
        .read_derivation(&job.drv_path)
        .await
        .map_err(|e| e.to_string())?;
    let basic = store::basic_derivation(store, &drv)
        .await
        .map_err(|e| e.to_string())?;
    let dir = store.store_dir().clone();
    // Checks that every input is valid here (and fills the path-info
    // cache the agent's `InputClosure` call reads); a large closure is not
    // kept: the agent streams it.
    let closure = store
        .closure(basic.input_srcs.iter().cloned())
        .await
        .map_err(|e| e.to_string())?;
    let (inputs, streamed_inputs) = if closure.len() <= sluice_proto::MAX_INLINE_INPUTS {
        let inputs = closure.iter().map(|i| store::summary(&dir, i)).collect();
        (inputs, None)
    } else {
        (
            Vec::new(),
            Some(u64::try_from(closure.len()).unwrap_or(u64::MAX)),
        )
    };
    drop(closure);
    let basic_drv = basic.to_aterm(&dir).map_err(|e| e.to_string())?;
    Ok(Assignment {
        attempt: job.attempt,
        drv_path: job.drv_path.clone(),
        basic_drv,
        inputs,
        streamed_inputs,
        max_silent_time_s: job.timeouts.0,
        build_timeout_s: job.timeouts.1,
        max_log_bytes: job.max_log_bytes,
        max_output_bytes: job.max_output_bytes,
    })
}
