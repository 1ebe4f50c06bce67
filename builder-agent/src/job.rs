//! One assignment, from the first phase update to the report: fetch the
//! inputs the local store lacks, build the basic derivation with the local
//! Nix daemon while streaming its log, upload the outputs, report.
//!
//! The result is delivered until the queue runner acknowledges it, which
//! it does once it is committed: on this session or, if the connection
//! drops or the queue runner restarts, on the next one, uploading the
//! outputs again if that session does not have them.
//!
//! Invariants: every assignment that is not cancelled gets exactly one
//! accepted report (or is told its attempt is over), and every report says whose fault a failure is
//! (`pb::FailureKind`): a failure of the agent's own machinery (store,
//! transfers, the Nix daemon, Nix's TransientFailure) is aborted (status 3)
//! and `INFRASTRUCTURE`, to be retried; a failure of the build itself has
//! the Hydra code for how it failed and is `BUILD`. Success is reported
//! only after every output was uploaded.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sluice_nix::daemon::{
    BuildMode, BuildStatus, ClientError, ClientOptions, DaemonClient, PathInfo,
};
use sluice_nix::derivation::{BasicDerivation, Derivation};
use sluice_nix::store_path::{StoreDir, StorePath};
use sluice_proto::v1 as pb;
use thiserror::Error;

use crate::link::{worth_retrying, Link, Slots};
use crate::nix_store::{Placement, StoreConn};
use crate::session::SessionCtx;
use crate::{logs, nix_store, transfer};

/// Hydra's busy phases (`BuildSteps.busy`).
const SENDING_INPUTS: u32 = 20;
const BUILDING: u32 = 30;
const RECEIVING_OUTPUTS: u32 = 40;

/// Hydra's step statuses.
const SUCCEEDED: u32 = 0;
const FAILED: u32 = 1;
const ABORTED: u32 = 3;
const TIMED_OUT: u32 = 7;
const LOG_LIMIT: u32 = 10;
const OUTPUT_LIMIT: u32 = 11;
const NOT_DETERMINISTIC: u32 = 12;

/// Why a job could not do its part (reported as status 3).
#[derive(Debug, Error)]
pub(crate) enum JobError {
    #[error("the assignment is malformed: {0}")]
    Assignment(String),
    #[error("the agent's Nix store: {0}")]
    Store(#[from] ClientError),
    #[error("fetching inputs: {0}")]
    Fetch(#[from] transfer::FetchError),
    #[error("uploading output '{output}': {source}")]
    Upload {
        output: String,
        source: transfer::UploadError,
    },
    #[error("the build reported no path for output '{0}'")]
    MissingOutput(String),
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Whose fault a step with Hydra status `status` (from [`hydra_status`]
/// or the agent's own checks) is: every abort is the machinery's.
pub(crate) fn failure_kind(status: u32) -> pb::FailureKind {
    match status {
        SUCCEEDED => pb::FailureKind::None,
        ABORTED => pb::FailureKind::Infrastructure,
        _ => pb::FailureKind::Build,
    }
}

/// Hydra's step status for how Nix says a build ended.
pub(crate) fn hydra_status(status: BuildStatus) -> u32 {
    match status {
        BuildStatus::Built
        | BuildStatus::Substituted
        | BuildStatus::AlreadyValid
        | BuildStatus::ResolvesToAlreadyValid => SUCCEEDED,
        BuildStatus::PermanentFailure
        | BuildStatus::InputRejected
        | BuildStatus::OutputRejected => FAILED,
        BuildStatus::TimedOut => TIMED_OUT,
        BuildStatus::LogLimitExceeded => LOG_LIMIT,
        BuildStatus::NotDeterministic => NOT_DETERMINISTIC,
        BuildStatus::TransientFailure
        | BuildStatus::MiscFailure
        | BuildStatus::CachedFailure
        | BuildStatus::DependencyFailed
        | BuildStatus::NoSubstituters
        | BuildStatus::Unknown(_) => ABORTED,
    }
}

fn result(step: &str, status: u32, error_msg: String) -> pb::StepResult {
    let now = unix_now();
    pb::StepResult {
        step_id: step.to_owned(),
        status,
        error_msg,
        start_time: now,
        stop_time: now,
        ..Default::default()
    }
}

/// How a report went.
enum Reported {
    /// Committed, or the attempt is over: forget it.
    Done,
    /// Not heard (the connection or the session failed): report again.
    Again(String),
    /// The queue runner will not take this result (say, an output it does
    /// not accept): report the step aborted instead.
    Refused(String),
}

async fn report(ctx: &SessionCtx, step: &str, mut result: pb::StepResult) -> Reported {
    if result.failure == i32::from(pb::FailureKind::Unspecified) {
        result.failure = failure_kind(result.status).into();
    }
    result.session_id = ctx.id.clone();
    let status = result.status;
    match ctx.client.clone().report_result(result).await {
        Ok(_) => {
            tracing::info!(step, status, "step reported");
            Reported::Done
        }
        Err(e) if worth_retrying(&e) => Reported::Again(e.message().to_owned()),
        Err(e) if e.code() == tonic::Code::Aborted => {
            tracing::warn!(
                step,
                status,
                "the step is over for the queue runner: {}",
                e.message()
            );
            Reported::Done
        }
        Err(e) => Reported::Refused(e.message().to_owned()),
    }
}

/// Reports a step the agent stopped (it is stopping itself): aborted,
/// the machinery's fault, so the queue runner retries it.
pub(crate) async fn report_aborted(ctx: &SessionCtx, step: &str, why: String) {
    match report(ctx, step, result(step, ABORTED, why)).await {
        Reported::Done => {}
        Reported::Again(e) | Reported::Refused(e) => {
            tracing::warn!(step, "reporting the stopped step failed: {e}")
        }
    }
}

/// Gives back an assignment the agent will not run (it never started):
/// the queue runner assigns it again at once, and it costs no try.
pub(crate) async fn refuse(ctx: Arc<SessionCtx>, step: String, why: &'static str) {
    let mut refusal = result(&step, ABORTED, why.to_owned());
    refusal.failure = pb::FailureKind::Refused.into();
    match report(&ctx, &step, refusal).await {
        Reported::Done => {}
        Reported::Again(e) | Reported::Refused(e) => {
            tracing::warn!(step, "refusing the step failed: {e}")
        }
    }
}

/// What a finished build leaves to deliver.
struct Outcome {
    result: pb::StepResult,
    /// For a success: the outputs to upload first, by name, with the
    /// daemon connection to read them from (and its cgroup, which holds
    /// nothing else by then).
    uploads: Option<(BTreeMap<String, PathInfo>, StoreConn)>,
}

/// Runs an assignment once one of `slots` is free, and delivers its
/// result; the slot is released when the build is over, before the
/// delivery. If the agent drains before a slot frees, the step is given
/// back unstarted.
pub(crate) async fn run(mut link: Link, assignment: pb::Assignment, slots: Arc<Slots>) {
    let step = assignment.step_id.clone();
    tracing::info!(step, drv = assignment.drv_path, "step assigned");
    let Some(slot) = slots.acquire().await else {
        tracing::info!(
            step,
            "the agent drains before the step started; giving it back"
        );
        let ctx = link.session().await;
        refuse(ctx, step, "the agent is draining").await;
        return;
    };
    let outcome = match build(&mut link, &assignment, slot.placement(), slot.index()).await {
        Ok(outcome) => outcome,
        Err(e) => {
            tracing::warn!(step, drv = assignment.drv_path, "step aborted: {e}");
            Outcome {
                result: result(&step, ABORTED, e.to_string()),
                uploads: None,
            }
        }
    };
    drop(slot);
    deliver(&mut link, &step, outcome).await;
}

/// Delivers `outcome` until the queue runner has it: uploads (for a
/// success) then the report, again on the next session whenever a call
/// fails for want of a connection.
async fn deliver(link: &mut Link, step: &str, mut outcome: Outcome) {
    let mut tries = 0u32;
    loop {
        let ctx = link.session().await;
        let uploading = Instant::now();
        let uploaded = match &mut outcome.uploads {
            Some((infos, conn)) => upload_all(&ctx, step, infos, &mut conn.nix).await,
            None => Ok(Vec::new()),
        };
        let mut message = outcome.result.clone();
        if outcome.uploads.is_some() {
            message.upload_ms = millis(uploading.elapsed());
        }
        match uploaded {
            Ok(outputs) => {
                if outcome.uploads.is_some() {
                    message.outputs = outputs;
                }
            }
            Err(JobError::Upload { source, .. }) if source.worth_retrying() => {
                tries += 1;
                tracing::warn!(
                    step,
                    tries,
                    "uploading outputs failed, trying again: {source}"
                );
                link.retry_pause(Duration::from_secs(2)).await;
                continue;
            }
            Err(e) => {
                // The queue runner will not take the outputs: the step is
                // aborted, which is the infrastructure's fault.
                tracing::warn!(step, "step aborted: {e}");
                outcome.uploads = None;
                outcome.result = result(step, ABORTED, e.to_string());
                continue;
            }
        }
        match report(&ctx, step, message).await {
            Reported::Done => return,
            Reported::Refused(e) if outcome.result.status != ABORTED => {
                tracing::warn!(
                    step,
                    "the queue runner refused the result ({e}); reporting the step aborted"
                );
                outcome.uploads = None;
                outcome.result = result(
                    step,
                    ABORTED,
                    format!("the queue runner refused the result: {e}"),
                );
            }
            Reported::Refused(e) => {
                tracing::warn!(step, "the queue runner refused the step's result: {e}");
                return;
            }
            Reported::Again(e) => {
                tries += 1;
                tracing::warn!(
                    step,
                    tries,
                    "reporting the step's result failed, trying again: {e}"
                );
                link.retry_pause(Duration::from_secs(2)).await;
            }
        }
    }
}

/// Uploads every output, each after those it refers to; returns them as
/// the result lists them.
async fn upload_all(
    ctx: &SessionCtx,
    step: &str,
    infos: &BTreeMap<String, PathInfo>,
    nix: &mut DaemonClient,
) -> Result<Vec<pb::BuildOutput>, JobError> {
    // The build is over and its slot released: the upload holds none.
    ctx.phase(step, RECEIVING_OUTPUTS, None);
    let dir = StoreDir::default();
    let mut outputs = Vec::with_capacity(infos.len());
    for name in upload_order(infos) {
        let Some(info) = infos.get(&name) else {
            continue;
        };
        transfer::upload_output(ctx, step, &name, info, nix)
            .await
            .map_err(|source| JobError::Upload {
                output: name.clone(),
                source,
            })?;
        outputs.push(pb::BuildOutput {
            name: name.clone(),
            path: dir.print(&info.path),
        });
    }
    Ok(outputs)
}

fn store_path(what: &str, path: &str) -> Result<StorePath, JobError> {
    StoreDir::default()
        .parse_path(path)
        .map_err(|e| JobError::Assignment(format!("{what} '{path}': {e}")))
}

/// Builds `a` in the slot of `placement` (`slot`: its index among the
/// registered slots, if it is pinned).
async fn build(
    link: &mut Link,
    a: &pb::Assignment,
    placement: Placement<'_>,
    slot: Option<u32>,
) -> Result<Outcome, JobError> {
    let step = a.step_id.as_str();
    let ctx = link.session().await;
    ctx.phase(step, SENDING_INPUTS, slot);
    let dir = StoreDir::default();
    let drv_path = store_path("drv_path", &a.drv_path)?;
    let drv = Derivation::parse_drv_file(&dir, &drv_path, &a.drv)
        .map_err(|e| JobError::Assignment(format!("derivation: {e}")))?;
    if !drv.input_drvs.is_empty() {
        return Err(JobError::Assignment(
            "the derivation still has input derivations".into(),
        ));
    }
    let (basic, _) = drv.into_basic();
    let mut conn = nix_store::connect(&ctx.config.store, placement).await?;
    let cores = placement
        .cpus
        .map_or(0, |c| u32::try_from(c.len()).unwrap_or(0));
    let seat = Seat { cores, slot };
    let built = build_with(link, &ctx, a, &drv_path, &basic, &mut conn.nix, seat).await;
    match built {
        // The connection stays open: the outputs are read from it. What
        // the build left running goes now; only the daemon stays.
        Ok(Built::Upload(result, infos)) => {
            if let Some(cgroup) = &conn.cgroup {
                cgroup.kill_all_but(conn.nix.child_pid());
            }
            Ok(Outcome {
                result,
                uploads: Some((infos, conn)),
            })
        }
        done => {
            // A clean goodbye, so the daemon does not log a broken
            // connection; then the cgroup goes, with all it holds.
            conn.nix.close(Duration::from_secs(1)).await;
            drop(conn.cgroup);
            done.map(|built| match built {
                Built::Done(result) | Built::Upload(result, _) => Outcome {
                    result,
                    uploads: None,
                },
            })
        }
    }
}

/// What a build gives.
enum Built {
    /// A result with nothing to upload (a failure).
    Done(pb::StepResult),
    /// A success whose outputs go up before the result.
    Upload(pb::StepResult, BTreeMap<String, PathInfo>),
}

/// Where a step builds: its slot's CPU count (`NIX_BUILD_CORES`; 0: all)
/// and the slot's index, when it is pinned.
#[derive(Clone, Copy)]
struct Seat {
    cores: u32,
    slot: Option<u32>,
}

async fn build_with(
    link: &mut Link,
    ctx: &SessionCtx,
    a: &pb::Assignment,
    drv_path: &StorePath,
    basic: &BasicDerivation,
    nix: &mut DaemonClient,
    Seat { cores, slot }: Seat,
) -> Result<Built, JobError> {
    let step = a.step_id.as_str();
    let copying = Instant::now();
    transfer::ensure_inputs(ctx, a, nix).await?;
    let overhead = copying.elapsed();
    let building_since = Instant::now();

    if let Some(current) = link.now() {
        current.phase(step, BUILDING, slot);
    }
    nix.set_options(&ClientOptions {
        max_silent_time: a.max_silent_time_s,
        build_timeout: (a.build_timeout_s > 0).then_some(u64::from(a.build_timeout_s)),
        max_log_size: (a.max_log_bytes > 0).then_some(a.max_log_bytes),
        // NIX_BUILD_CORES: the slot's CPUs (0, all, when not pinned).
        build_cores: cores,
        verbose_build: true,
        ..ClientOptions::default()
    })
    .await?;
    let (log_tx, log_rx) = tokio::sync::mpsc::unbounded_channel();
    nix.log_to(log_tx);
    let building = async {
        let built = nix
            .build_derivation(drv_path, basic, BuildMode::Normal)
            .await;
        // Drops the log sender, which ends the log stream.
        nix.set_logger(|_| {});
        built
    };
    let mut log_link = link.clone();
    let (built, ()) = tokio::join!(building, logs::forward(&mut log_link, step, log_rx));
    let built = built?;
    let build_time = building_since.elapsed();

    let status = hydra_status(built.status);
    let (exit_code, signal) = match exit_status(&built.error_msg) {
        Some(ended) => ended,
        // Nix names how a builder ended only when it failed.
        None if built.status == BuildStatus::Built => (Some(0), None),
        None => (None, None),
    };
    let mut res = pb::StepResult {
        step_id: step.to_owned(),
        status,
        error_msg: built.error_msg.clone(),
        times_built: u32::try_from(built.times_built).unwrap_or(u32::MAX),
        is_non_deterministic: built.is_non_deterministic,
        start_time: i64::try_from(built.start_time).unwrap_or(0),
        stop_time: i64::try_from(built.stop_time).unwrap_or(0),
        overhead_ms: millis(overhead),
        exit_code,
        signal,
        fetch_ms: millis(overhead),
        build_ms: millis(build_time),
        ..Default::default()
    };
    if res.start_time == 0 {
        res.start_time = unix_now();
        res.stop_time = res.start_time;
    }
    if status != SUCCEEDED {
        return Ok(Built::Done(res));
    }

    let mut infos = BTreeMap::new();
    for name in basic.outputs.keys() {
        let out = built
            .built_outputs
            .get(name)
            .map(|o| o.out_path.clone())
            .ok_or_else(|| JobError::MissingOutput(name.clone()))?;
        let info = nix
            .query_path_info(&out)
            .await?
            .ok_or_else(|| JobError::MissingOutput(name.clone()))?;
        infos.insert(name.clone(), info);
    }
    let total: u64 = infos.values().map(|i| i.nar_size).sum();
    if a.max_output_bytes > 0 && total > a.max_output_bytes {
        res.status = OUTPUT_LIMIT;
        res.error_msg = format!(
            "the outputs total {total} bytes, more than the limit of {}",
            a.max_output_bytes
        );
        return Ok(Built::Done(res));
    }
    Ok(Built::Upload(res, infos))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// How the builder ended, from Nix's message about a failed build: its
/// exit code ("… failed with exit code 2") or the signal that killed it
/// ("… failed due to signal 9 (Killed)"). Nix's own sentence comes first,
/// before any excerpt of the build's log (which may say anything), so the
/// first match counts. `None` when the message says neither.
fn exit_status(message: &str) -> Option<(Option<i32>, Option<i32>)> {
    let number_after = |marker: &str| -> Option<i32> {
        let (_, rest) = message.split_once(marker)?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    };
    if let Some(code) = number_after("with exit code ") {
        return Some((Some(code), None));
    }
    number_after("due to signal ").map(|signal| (None, Some(signal)))
}

/// Output names ordered so that an output comes after the outputs it
/// refers to (the queue runner checks references against what it knows).
fn upload_order(infos: &BTreeMap<String, PathInfo>) -> Vec<String> {
    let mut done: BTreeSet<&StorePath> = BTreeSet::new();
    let mut order = Vec::with_capacity(infos.len());
    let mut left: Vec<(&String, &PathInfo)> = infos.iter().collect();
    while !left.is_empty() {
        let before = left.len();
        left.retain(|(name, info)| {
            let ready = infos.values().all(|other| {
                other.path == info.path
                    || !info.references.contains(&other.path)
                    || done.contains(&other.path)
            });
            if ready {
                done.insert(&info.path);
                order.push((*name).clone());
            }
            !ready
        });
        if left.len() == before {
            // A cycle between outputs cannot be built by Nix; keep going.
            order.extend(left.drain(..).map(|(n, _)| n.clone()));
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_nix::hash::Hash;

    #[test]
    fn nix_statuses_map_to_hydra_codes() {
        assert_eq!(hydra_status(BuildStatus::Built), 0);
        assert_eq!(hydra_status(BuildStatus::AlreadyValid), 0);
        assert_eq!(hydra_status(BuildStatus::PermanentFailure), 1);
        assert_eq!(hydra_status(BuildStatus::OutputRejected), 1);
        assert_eq!(hydra_status(BuildStatus::TimedOut), 7);
        assert_eq!(hydra_status(BuildStatus::LogLimitExceeded), 10);
        assert_eq!(hydra_status(BuildStatus::NotDeterministic), 12);
        assert_eq!(hydra_status(BuildStatus::TransientFailure), 3);
        assert_eq!(hydra_status(BuildStatus::MiscFailure), 3);
        assert_eq!(hydra_status(BuildStatus::Unknown(99)), 3);
    }

    #[test]
    fn aborts_are_the_machinerys_fault_and_the_rest_the_builds() {
        use pb::FailureKind::*;
        let kind = |s: BuildStatus| failure_kind(hydra_status(s));
        assert_eq!(kind(BuildStatus::Built), None);
        assert_eq!(kind(BuildStatus::PermanentFailure), Build);
        assert_eq!(kind(BuildStatus::TimedOut), Build);
        assert_eq!(kind(BuildStatus::LogLimitExceeded), Build);
        assert_eq!(kind(BuildStatus::NotDeterministic), Build);
        assert_eq!(kind(BuildStatus::TransientFailure), Infrastructure);
        assert_eq!(kind(BuildStatus::MiscFailure), Infrastructure);
        // The agent's own checks.
        assert_eq!(failure_kind(OUTPUT_LIMIT), Build);
        assert_eq!(failure_kind(ABORTED), Infrastructure);
    }

    #[test]
    fn the_builders_exit_status_comes_from_nixs_message() {
        // Nix 2.8.
        assert_eq!(
            exit_status("builder for '/nix/store/x-a.drv' failed with exit code 3"),
            Some((Some(3), None))
        );
        assert_eq!(
            exit_status("builder for '/nix/store/x-a.drv' failed due to signal 9 (Killed)"),
            Some((None, Some(9)))
        );
        // Nix 2.26 puts it on a line of its own, with the log after it.
        assert_eq!(
            exit_status("Cannot build '/nix/store/x-a.drv'.\n       Reason: builder failed with exit code 42.\n       Last 1 log lines:"),
            Some((Some(42), None))
        );
        // A log excerpt saying the same words does not count.
        assert_eq!(
            exit_status("builder for '/nix/store/x-a.drv' failed with exit code 42;\nlast 1 log lines:\n> failed with exit code 7"),
            Some((Some(42), None))
        );
        assert_eq!(exit_status(""), None);
        assert_eq!(exit_status("exit code x"), None);
    }

    #[test]
    fn referenced_outputs_are_uploaded_first() {
        let dir = StoreDir::default();
        let p = |s: &str| dir.parse_path(s).expect("path");
        let out = p("/nix/store/7n8pyd8s1sxgxhcw6xm9f5cbqqzk3c8p-x");
        let dev = p("/nix/store/1f0xy7krxh1hbbi2pvdq8cp5bjq6vqq3-x-dev");
        let lib = p("/nix/store/2f0xy7krxh1hbbi2pvdq8cp5bjq6vqq3-x-lib");
        let info = |path: &StorePath, refs: &[&StorePath]| {
            let mut i = PathInfo::new(path.clone(), Hash::sha256(b""), 0);
            i.references = refs.iter().map(|r| (*r).clone()).collect();
            i
        };
        let infos: BTreeMap<String, PathInfo> = [
            ("dev".to_owned(), info(&dev, &[&out, &lib, &dev])),
            ("lib".to_owned(), info(&lib, &[])),
            ("out".to_owned(), info(&out, &[&lib])),
        ]
        .into();
        assert_eq!(upload_order(&infos), ["lib", "out", "dev"]);
    }
}
