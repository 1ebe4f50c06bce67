//! The HTTP endpoints: `GET /status` and `GET /status/machines` as Hydra's
//! web UI reads them (camelCase JSON), and `GET /metrics` in Prometheus'
//! text format.
//!
//! Invariant: handlers only read the latest [`StatusSnapshot`] from a watch
//! channel; they never reach into the driver, so a slow client cannot slow
//! scheduling.

use std::net::SocketAddr;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::status::{StatusSnapshot, UploadStatus};

type Snapshot = watch::Receiver<StatusSnapshot>;

pub fn router(status: Snapshot) -> Router {
    Router::new()
        .route("/status", get(status_json))
        .route("/status/machines", get(machines_json))
        .route("/metrics", get(metrics))
        .with_state(status)
}

/// Serves until the listener fails or the task is dropped.
pub async fn serve(addr: SocketAddr, status: Snapshot) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, router(status)).await
}

/// Binds first (so the caller learns of a bad address at once), then serves
/// in a task.
pub async fn spawn(
    addr: SocketAddr,
    status: Snapshot,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tracing::info!(bound = %local, "listening for HTTP (/status, /status/machines, /metrics)");
    let handle = tokio::spawn(async move { axum::serve(listener, router(status)).await });
    Ok((local, handle))
}

pub fn status_value(s: &StatusSnapshot) -> Value {
    // Computed now: the snapshot is only refreshed when something happens.
    let now = crate::driver::unix_now();
    let uptime = (now - s.started_unix).max(0);
    json!({
        "queueRunner": {
            "status": "up",
            "time": now,
            "uptime": uptime,
            "nrQueuedBuilds": s.builds_queued,
            "nrStepsWaiting": s.core.steps_waiting,
            "nrStepsRunnable": s.core.steps_runnable,
            "nrStepsBuilding": s.core.steps_building,
            "nrRetries": s.core.retries,
            "nrStepsDone": s.steps_done,
            "nrBuildsDone": s.builds_done,
            "nrUnsupportedSteps": s.core.steps_unsupported,
            "nrQueueWakeups": s.queue_wakeups,
            "nrDispatcherWakeups": s.dispatcher_wakeups,
            "dispatchTimeMs": s.dispatch_time_ms,
            "machinesTotal": s.core.machines_total,
            "machinesInUse": s.core.machines_in_use,
            "databaseUp": s.database_down_since.is_none(),
            "databaseDownSince": s.database_down_since,
            "nrPendingWrites": s.pending_writes,
            "heapBytes": crate::memory::heap_bytes(),
            "binaryCache": s.uploads.as_ref().map(|u| uploads_value(u, now)),
        }
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

async fn status_json(State(status): State<Snapshot>) -> Json<Value> {
    Json(status_value(&status.borrow()))
}

pub fn machines_value(s: &StatusSnapshot) -> Value {
    let machines: Vec<Value> = s
        .machines
        .iter()
        .map(|m| {
            json!({
                "hostname": m.hostname,
                "systems": m.systems,
                "maxJobs": m.max_jobs,
                "speedFactor": m.speed_factor,
                "supportedFeatures": m.supported_features,
                "mandatoryFeatures": m.mandatory_features,
                "hasCapacity": !m.draining && m.paused.is_none() && (m.running as u32) < m.max_jobs,
                "draining": m.draining,
                "paused": m.paused,
                "slots": m.slots.iter().map(|(node, cpus)| json!({ "node": node, "cpus": cpus })).collect::<Vec<_>>(),
                "totalMem": m.total_mem,
                "currentJobs": m.running,
                "stats": {
                    "load": m.load.load[0],
                    "memUsage": m.load.mem_used_bytes,
                    "nrStepsDone": m.steps_done,
                    "avgStepBuildTimeMs": m.avg_step_build_ms,
                    "storeFreeBytes": m.load.store_free_bytes,
                    "buildDirFreeBytes": m.load.build_dir_free_bytes,
                    "pressure": {
                        "cpuSomeAvg10": m.load.cpu_pressure.avg10,
                        "memorySomeAvg10": m.load.memory_pressure.avg10,
                        "ioSomeAvg10": m.load.io_pressure.avg10,
                    },
                },
            })
        })
        .collect();
    json!({ "machines": machines })
}

async fn machines_json(State(status): State<Snapshot>) -> Json<Value> {
    Json(machines_value(&status.borrow()))
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

async fn metrics(State(status): State<Snapshot>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics_text(&status.borrow()),
    )
}
