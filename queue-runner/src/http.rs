//! The HTTP endpoints: the dashboard (`GET /`, with build logs at
//! `GET /log/<drv>`), `GET /status` and `GET /status/machines` as Hydra's
//! web UIs read them (camelCase JSON, machines keyed by name), and
//! `GET /metrics` in Prometheus' text format.
//!
//! Invariant: handlers only read the latest [`StatusSnapshot`] and the
//! dashboard's [`Figures`] from watch channels, and log files; they never
//! reach into the driver or wait for the database, so a slow client cannot
//! slow scheduling and an outage cannot slow a page.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use tokio::sync::watch;

use crate::agents::Pressure;
use crate::dashboard::Figures;
use crate::status::{MachineStatus, StatusSnapshot, UploadStatus};

type Snapshot = watch::Receiver<StatusSnapshot>;

/// What the handlers read.
#[derive(Clone)]
pub struct HttpState {
    pub status: Snapshot,
    pub figures: watch::Receiver<Figures>,
    /// Where build logs are (`<data_dir>/build-logs`).
    pub data_dir: PathBuf,
    /// How often the dashboard reloads itself.
    pub refresh: Duration,
}

/// No script, no frame, nothing from elsewhere: the pages are text,
/// tables and inline SVG.
const CONTENT_SECURITY_POLICY: &str =
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/log/{drv}", get(build_log))
        .route("/status", get(status_json))
        .route("/status/machines", get(machines_json))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Serves until the listener fails or the task is dropped.
pub async fn serve(addr: SocketAddr, state: HttpState) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, router(state)).await
}

/// Binds first (so the caller learns of a bad address at once), then serves
/// in a task.
pub async fn spawn(
    addr: SocketAddr,
    state: HttpState,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tracing::info!(bound = %local, "listening for HTTP (the dashboard at /, /status, /status/machines, /metrics)");
    let handle = tokio::spawn(async move { axum::serve(listener, router(state)).await });
    Ok((local, handle))
}

async fn dashboard(State(state): State<HttpState>) -> Response {
    let now = crate::driver::unix_now();
    let refresh = state.refresh.as_secs().max(2);
    // The snapshot is copied out first: a borrow held while the page is
    // drawn would hold up the driver's next publication. The figures'
    // borrow only holds up the sampler.
    let status = state.status.borrow().clone();
    let page = {
        let figures = state.figures.borrow();
        crate::dashboard::render::page(&status, &figures, now, refresh)
    };
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::CACHE_CONTROL, "no-store"),
        ],
        page,
    )
        .into_response()
}

/// The log of a derivation, `drv` its base name (`<hash>-<name>.drv`), as
/// plain text that a browser never takes for a page.
async fn build_log(State(state): State<HttpState>, Path(drv): Path<String>) -> Response {
    let not_found = || (StatusCode::NOT_FOUND, "no such build log\n").into_response();
    if drv.contains('/') {
        return not_found();
    }
    let Ok(path) = crate::logs::log_path(&state.data_dir, &drv) else {
        return not_found();
    };
    let Ok(file) = tokio::fs::File::open(&path).await else {
        return not_found();
    };
    (
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CONTENT_SECURITY_POLICY, "default-src 'none'"),
        ],
        Body::from_stream(tokio_util::io::ReaderStream::new(file)),
    )
        .into_response()
}

/// The JSON of `/status`, and of the `SystemStatus` row: Hydra's
/// `queueRunner` counters, and the machines as `/status/machines` has
/// them.
pub fn status_value(s: &StatusSnapshot) -> Value {
    // Computed now: the snapshot is only refreshed when something happens.
    let now = crate::driver::unix_now();
    let uptime = (now - s.started_unix).max(0);
    let avg = |total: u64| total.checked_div(s.steps_done).unwrap_or(0);
    let c = &s.core;
    json!({
        "queueRunner": {
            "status": "up",
            "time": now,
            "uptime": uptime,
            "nrQueuedBuilds": s.builds_queued,
            "nrBuildsUnfinished": s.builds_queued,
            "nrBuildsRead": s.builds_read,
            "nrStepsWaiting": c.steps_waiting,
            "nrStepsRunnable": c.steps_runnable,
            "nrStepsBuilding": c.steps_building,
            "nrStepsUnfinished": c.steps_waiting + c.steps_runnable + c.steps_retry_pending
                + c.steps_resolving + c.steps_building,
            "nrStepsStarted": c.dispatches,
            "nrRetries": c.retries,
            "maxNrRetries": s.max_tries,
            "nrStepsDone": s.steps_done,
            "totalStepTimeMs": s.step_ms_total,
            "totalStepBuildTimeMs": s.build_ms_total,
            "avgStepTimeMs": avg(s.step_ms_total),
            "avgStepBuildTimeMs": avg(s.build_ms_total),
            "nrBuildsDone": s.builds_done,
            "nrUnsupportedSteps": c.steps_unsupported,
            "nrQueueWakeups": s.queue_wakeups,
            "nrDispatcherWakeups": s.dispatcher_wakeups,
            "dispatchTimeMs": s.dispatch_time_ms,
            "machinesTotal": c.machines_total,
            "machinesInUse": c.machines_in_use,
            "databaseUp": s.database_down_since.is_none(),
            "databaseDownSince": s.database_down_since,
            "nrPendingWrites": s.pending_writes,
            "heapBytes": crate::memory::heap_bytes(),
            "binaryCache": s.uploads.as_ref().map(|u| uploads_value(u, now)),
        },
        "machines": machines_by_name(s, now),
    })
}

/// The binary cache's uploads: successful builds are written finished
/// only once their outputs are uploaded, so `nrBuildsWaiting` is what an
/// outage holds back.
fn uploads_value(u: &UploadStatus, now: i64) -> Value {
    json!({
        "nrUploadsPending": u.pending,
        "nrBuildsWaiting": u.builds_waiting,
        "oldestUploadPendingSince": u.oldest_pending_since,
        "oldestUploadPendingS": u.oldest_pending_since.map(|t| (now - t).max(0)),
        "nrUploadsDone": u.done,
        "nrPathsUploaded": u.paths_uploaded,
        "nrUploadFailures": u.failures,
        "lastUploadError": u.last_error,
        "nrLogsUploaded": u.logs_uploaded,
        "nrLogUploadsFailed": u.logs_failed,
    })
}

async fn status_json(State(state): State<HttpState>) -> Json<Value> {
    let status = state.status.borrow().clone();
    Json(status_value(&status))
}

/// Every machine under its name, as Hydra's web UIs look them up (the
/// name is what `BuildSteps.machine` says). Two agents of one name (under
/// different tokens) are told apart: the one connected first keeps the
/// name, the others get `name#<id>`.
fn machines_by_name(s: &StatusSnapshot, now: i64) -> Map<String, Value> {
    let mut machines: Vec<&MachineStatus> = s.machines.iter().collect();
    machines.sort_by(|a, b| (&a.hostname, a.id).cmp(&(&b.hostname, b.id)));
    let mut out = Map::new();
    for m in machines {
        let key = if out.contains_key(&m.hostname) {
            format!("{}#{}", m.hostname, m.id)
        } else {
            m.hostname.clone()
        };
        out.insert(key, machine_value(m, now));
    }
    out
}

/// One machine, with the fields of both kinds of Hydra web UI and
/// Sluice's own:
/// - what a web UI asking `/status/machines` reads (Hydra's current queue
///   runner: `systems`, `maxJobs`, `speedFactor`, `supportedFeatures`,
///   `mandatoryFeatures`, `hasCapacity`, `hasStaticCapacity`,
///   `hasDynamicCapacity`, `totalMem`, and `stats` with `load1`, `load5`,
///   `load15`, `memUsage`, `pressure`, `nrStepsDone`,
///   `avgStepBuildTimeMs`, times in ms);
/// - what one reading the `SystemStatus` row reads (Hydra's C++ queue
///   runner: `enabled`, `systemTypes`, `currentJobs`, `nrStepsDone`,
///   `avgStepBuildTime`, … times in seconds);
/// - Sluice's: `connected`, `draining`, `paused`, `slots`, `numaNodes`,
///   free disk.
fn machine_value(m: &MachineStatus, now: i64) -> Value {
    let ms_avg = |total: u64| total.checked_div(m.steps_done).unwrap_or(0);
    let s_avg = |total: u64| match m.steps_done {
        0 => 0.0,
        n => total as f64 / 1000.0 / n as f64,
    };
    let pressure = |p: &Pressure| json!({ "avg10": p.avg10, "avg60": p.avg60, "avg300": p.avg300 });
    let static_capacity = u64::try_from(m.running).unwrap_or(u64::MAX) < u64::from(m.max_jobs);
    let dynamic_capacity = m.paused.is_none();
    let enabled = m.connected && !m.draining;
    let idle_since = (m.running == 0).then_some(m.idle_since);
    json!({
        "hostname": m.hostname,
        "systems": m.systems,
        "maxJobs": m.max_jobs,
        "speedFactor": m.speed_factor,
        "supportedFeatures": m.supported_features,
        "mandatoryFeatures": m.mandatory_features,
        "hasCapacity": enabled && static_capacity && dynamic_capacity,
        "hasStaticCapacity": static_capacity,
        "hasDynamicCapacity": dynamic_capacity,
        "totalMem": m.total_mem,
        "stats": {
            "currentJobs": m.running,
            "nrStepsDone": m.steps_done,
            "totalStepTimeMs": m.step_ms_total,
            "totalStepBuildTimeMs": m.build_ms_total,
            "avgStepTimeMs": ms_avg(m.step_ms_total),
            "avgStepBuildTimeMs": ms_avg(m.build_ms_total),
            "idleSince": m.idle_since,
            "lastFailure": m.last_failure,
            "disabledUntil": 0,
            "consecutiveFailures": m.consecutive_failures,
            "lastPing": m.last_heard_unix,
            "sinceLastPing": (now - m.last_heard_unix).max(0),
            "load1": m.load.load[0],
            "load5": m.load.load[1],
            "load15": m.load.load[2],
            "memUsage": m.load.mem_used_bytes,
            "pressure": {
                "cpuSome": pressure(&m.load.cpu_pressure),
                "memSome": pressure(&m.load.memory_pressure),
                "ioSome": pressure(&m.load.io_pressure),
            },
            "storeFreeBytes": m.load.store_free_bytes,
            "buildDirFreeBytes": m.load.build_dir_free_bytes,
        },
        "enabled": enabled,
        "systemTypes": m.systems,
        "currentJobs": m.running,
        "nrStepsDone": m.steps_done,
        "totalStepTime": m.step_ms_total / 1000,
        "totalStepBuildTime": m.build_ms_total / 1000,
        "avgStepTime": s_avg(m.step_ms_total),
        "avgStepBuildTime": s_avg(m.build_ms_total),
        "idleSince": idle_since,
        "disabledUntil": 0,
        "lastFailure": m.last_failure,
        "consecutiveFailures": m.consecutive_failures,
        "connected": m.connected,
        "draining": m.draining,
        "paused": m.paused,
        "slots": m
            .slots
            .iter()
            .map(|(node, cpus)| json!({ "node": node, "cpus": cpus }))
            .collect::<Vec<_>>(),
        "numaNodes": m
            .nodes
            .iter()
            .map(|(node, cpus)| json!({ "node": node, "cpus": cpus }))
            .collect::<Vec<_>>(),
    })
}

/// The JSON of `/status/machines`.
pub fn machines_value(s: &StatusSnapshot) -> Value {
    let machines = machines_by_name(s, crate::driver::unix_now());
    json!({ "machinesCount": machines.len(), "machines": machines })
}

async fn machines_json(State(state): State<HttpState>) -> Json<Value> {
    let status = state.status.borrow().clone();
    Json(machines_value(&status))
}

pub fn metrics_text(s: &StatusSnapshot) -> String {
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, kind: &str, value: f64| {
        out.push_str(&format!(
            "# HELP sluice_{name} {help}\n# TYPE sluice_{name} {kind}\nsluice_{name} {value}\n"
        ));
    };
    gauge(
        "uptime_seconds",
        "Seconds since the queue runner started.",
        "counter",
        s.uptime_s as f64,
    );
    gauge(
        "builds_queued",
        "Unfinished builds held in memory.",
        "gauge",
        s.builds_queued as f64,
    );
    gauge(
        "steps_waiting",
        "Steps waiting for dependencies.",
        "gauge",
        s.core.steps_waiting as f64,
    );
    gauge(
        "steps_runnable",
        "Steps waiting for a machine.",
        "gauge",
        s.core.steps_runnable as f64,
    );
    gauge(
        "steps_building",
        "Steps being built.",
        "gauge",
        s.core.steps_building as f64,
    );
    gauge(
        "steps_done_total",
        "Attempts that ended.",
        "counter",
        s.steps_done as f64,
    );
    gauge(
        "builds_done_total",
        "Builds finished.",
        "counter",
        s.builds_done as f64,
    );
    gauge(
        "retries_total",
        "Attempts retried.",
        "counter",
        s.core.retries as f64,
    );
    gauge(
        "queue_wakeups_total",
        "Database notifications handled.",
        "counter",
        s.queue_wakeups as f64,
    );
    gauge(
        "dispatcher_wakeups_total",
        "Events given to the scheduler.",
        "counter",
        s.dispatcher_wakeups as f64,
    );
    gauge(
        "dispatch_time_ms_total",
        "Milliseconds spent scheduling.",
        "counter",
        s.dispatch_time_ms as f64,
    );
    gauge(
        "machines",
        "Connected builder agents.",
        "gauge",
        s.core.machines_total as f64,
    );
    gauge(
        "machines_in_use",
        "Agents with a busy slot.",
        "gauge",
        s.core.machines_in_use as f64,
    );
    if let Some(u) = &s.uploads {
        gauge(
            "binary_cache_uploads_pending",
            "Binary cache uploads not done yet.",
            "gauge",
            u.pending as f64,
        );
        gauge(
            "binary_cache_builds_waiting",
            "Successful builds waiting for their outputs to be uploaded.",
            "gauge",
            u.builds_waiting as f64,
        );
        gauge(
            "binary_cache_upload_failures_total",
            "Failed tries at binary cache uploads (each is tried again).",
            "counter",
            u.failures as f64,
        );
        gauge(
            "binary_cache_log_uploads_failed_total",
            "Build logs not uploaded to the binary cache.",
            "counter",
            u.logs_failed as f64,
        );
    }
    out.push_str("# HELP sluice_machine_running_steps Steps running on each agent.\n# TYPE sluice_machine_running_steps gauge\n");
    for m in &s.machines {
        out.push_str(&format!(
            "sluice_machine_running_steps{{machine=\"{}\"}} {}\n",
            escape_label(&m.hostname),
            m.running
        ));
    }
    out
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics_text(&state.status.borrow()),
    )
}
