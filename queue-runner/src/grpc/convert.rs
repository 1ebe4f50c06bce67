//! Conversions between `sluice.v1` messages and the plain types of
//! [`crate::agents`] and `sluice-nix`, by hand, at the edge.
//!
//! Invariants: every conversion of a message from an agent checks what it
//! reads (store paths parse, hashes are SHA-256, numbers fit) and returns
//! a [`ConvertError`] rather than panicking or truncating silently.

use sluice_nix::daemon::PathInfo;
use sluice_nix::hash::{Base, Hash, HashAlgo};
use sluice_nix::store_path::{StoreDir, StorePath};
use sluice_proto::v1 as pb;
use thiserror::Error;

use crate::agents::{
    AgentInfo, AgentLoad, AttemptId, FailureKind, PathSummary, Pressure, StepReport, ToAgent,
};

/// A message field that does not hold what it must.
#[derive(Debug, Error)]
#[error("field '{field}': {problem}")]
pub(crate) struct ConvertError {
    field: &'static str,
    problem: String,
}

impl From<ConvertError> for tonic::Status {
    fn from(e: ConvertError) -> tonic::Status {
        tonic::Status::invalid_argument(e.to_string())
    }
}

fn invalid(field: &'static str, problem: impl ToString) -> ConvertError {
    ConvertError {
        field,
        problem: problem.to_string(),
    }
}

/// An attempt id as the wire carries it (`step_id`): its decimal number.
pub(crate) fn attempt_id(step_id: &str) -> Result<AttemptId, ConvertError> {
    uuid::Uuid::try_parse(step_id)
        .map(AttemptId)
        .map_err(|_| invalid("step_id", format!("'{step_id}' is not a step id we issued")))
}

pub(crate) fn step_id(attempt: AttemptId) -> String {
    attempt.0.simple().to_string()
}

pub(crate) fn store_path(field: &'static str, path: &str) -> Result<StorePath, ConvertError> {
    StoreDir::default()
        .parse_path(path)
        .map_err(|e| invalid(field, e))
}

/// NUMA nodes of a registration kept (the kernel's limit is 1,024).
const MAX_NODES: usize = 1024;

pub(crate) fn agent_info(req: pb::RegisterRequest) -> Result<AgentInfo, ConvertError> {
    if req.name.trim().is_empty() {
        return Err(invalid("name", "an agent needs a name"));
    }
    if req.systems.is_empty() {
        return Err(invalid(
            "systems",
            "an agent must build at least one system",
        ));
    }
    if req.max_jobs == 0 {
        return Err(invalid("max_jobs", "must be at least 1"));
    }
    let speed_factor = if req.speed_factor.is_finite() && req.speed_factor > 0.0 {
        req.speed_factor
    } else {
        1.0
    };
    Ok(AgentInfo {
        name: req.name,
        systems: req.systems,
        supported_features: req.supported_features,
        mandatory_features: req.mandatory_features,
        max_jobs: req.max_jobs,
        prefetch: req.prefetch.min(req.max_jobs),
        speed_factor,
        total_mem_bytes: req.total_mem_bytes,
        draining: req.draining,
        // Shown, never trusted for anything: at most one per job slot.
        slots: req
            .slots
            .into_iter()
            .take(req.max_jobs as usize)
            .map(|s| (s.node, s.cpus.chars().take(256).collect()))
            .collect(),
        nodes: req
            .nodes
            .into_iter()
            .take(MAX_NODES)
            .map(|n| (n.id, n.cpus.chars().take(256).collect()))
            .collect(),
    })
}

pub(crate) fn agent_load(req: &pb::HeartbeatRequest) -> AgentLoad {
    let finite = |x: f32| if x.is_finite() { x } else { 0.0 };
    let pressure = req.pressure.unwrap_or_default();
    let avgs = |avg10, avg60, avg300| Pressure {
        avg10: finite(avg10),
        avg60: finite(avg60),
        avg300: finite(avg300),
    };
    AgentLoad {
        load: [finite(req.load1), finite(req.load5), finite(req.load15)],
        mem_used_bytes: req.mem_used_bytes,
        cpu_pressure: avgs(
            pressure.cpu_some_avg10,
            pressure.cpu_some_avg60,
            pressure.cpu_some_avg300,
        ),
        memory_pressure: avgs(
            pressure.memory_some_avg10,
            pressure.memory_some_avg60,
            pressure.memory_some_avg300,
        ),
        io_pressure: avgs(
            pressure.io_some_avg10,
            pressure.io_some_avg60,
            pressure.io_some_avg300,
        ),
        store_free_bytes: req.store_free_bytes,
        build_dir_free_bytes: req.build_dir_free_bytes,
    }
}

fn path_summary(p: &PathSummary) -> pb::StorePathInfo {
    pb::StorePathInfo {
        path: p.path.clone(),
        nar_hash: p.nar_hash.clone(),
        nar_size: p.nar_size,
        references: p.references.clone(),
        deriver: p.deriver.clone().unwrap_or_default(),
        ca: p.ca.clone().unwrap_or_default(),
    }
}

/// A path info as the wire carries it (`sha256:<nix32>` hashes).
pub(crate) fn path_info_to_wire(info: &PathInfo) -> pb::StorePathInfo {
    let dir = StoreDir::default();
    pb::StorePathInfo {
        path: dir.print(&info.path),
        nar_hash: info.nar_hash.format(Base::Nix32, true),
        nar_size: info.nar_size,
        references: info.references.iter().map(|r| dir.print(r)).collect(),
        deriver: info
            .deriver
            .as_ref()
            .map(|d| dir.print(d))
            .unwrap_or_default(),
        ca: info.ca.clone().unwrap_or_default(),
    }
}

/// A path info an agent declared; the hash must be SHA-256.
pub(crate) fn path_info_from_wire(info: &pb::StorePathInfo) -> Result<PathInfo, ConvertError> {
    let path = store_path("info.path", &info.path)?;
    let nar_hash = Hash::parse_any(&info.nar_hash, Some(HashAlgo::Sha256))
        .map_err(|e| invalid("info.nar_hash", e))?;
    let mut out = PathInfo::new(path, nar_hash, info.nar_size);
    for r in &info.references {
        out.references.insert(store_path("info.references", r)?);
    }
    if !info.deriver.is_empty() {
        out.deriver = Some(store_path("info.deriver", &info.deriver)?);
    }
    if !info.ca.is_empty() {
        out.ca = Some(info.ca.clone());
    }
    Ok(out)
}

pub(crate) fn runner_command(cmd: ToAgent) -> pb::RunnerCommand {
    let command = match cmd {
        ToAgent::Assign(a) => pb::runner_command::Command::Assign(pb::Assignment {
            step_id: step_id(a.attempt),
            drv_path: a.drv_path,
            drv: a.basic_drv.into_bytes(),
            inputs: a.inputs.iter().map(path_summary).collect(),
            inputs_streamed: a.streamed_inputs.is_some(),
            input_count: a
                .streamed_inputs
                .unwrap_or(u64::try_from(a.inputs.len()).unwrap_or(u64::MAX)),
            max_silent_time_s: a.max_silent_time_s,
            build_timeout_s: a.build_timeout_s,
            max_log_bytes: a.max_log_bytes,
            max_output_bytes: a.max_output_bytes,
        }),
        ToAgent::Cancel(attempt) => pb::runner_command::Command::Cancel(pb::Cancel {
            step_id: step_id(attempt),
        }),
    };
    pb::RunnerCommand {
        command: Some(command),
    }
}

/// Hydra step statuses an agent may report.
const REPORTABLE: [u32; 7] = [0, 1, 3, 7, 10, 11, 12];

pub(crate) fn step_report(res: &pb::StepResult) -> Result<StepReport, ConvertError> {
    if !REPORTABLE.contains(&res.status) {
        return Err(invalid(
            "status",
            format!("{} is not a step status an agent may report", res.status),
        ));
    }
    let status = i32::try_from(res.status).map_err(|e| invalid("status", e))?;
    Ok(StepReport {
        status,
        error_msg: res.error_msg.clone(),
        times_built: res.times_built,
        is_non_deterministic: res.is_non_deterministic,
        start_time: res.start_time,
        stop_time: res.stop_time,
        outputs: res
            .outputs
            .iter()
            .map(|o| (o.name.clone(), o.path.clone()))
            .collect(),
        overhead_ms: res.overhead_ms,
        run: Some(crate::db::results::StepRun {
            exit_code: res.exit_code,
            signal: res.signal,
            fetch_ms: res.fetch_ms,
            build_ms: res.build_ms,
            upload_ms: res.upload_ms,
        }),
        failure: match pb::FailureKind::try_from(res.failure) {
            Ok(pb::FailureKind::None) => FailureKind::None,
            Ok(pb::FailureKind::Build) => FailureKind::Build,
            Ok(pb::FailureKind::Infrastructure) => FailureKind::Infrastructure,
            Ok(pb::FailureKind::Refused) => FailureKind::Refused,
            // Unknown values are from a newer agent: the status decides.
            Ok(pb::FailureKind::Unspecified) | Err(_) => FailureKind::Unspecified,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_infos_survive_the_wire() {
        let dir = StoreDir::default();
        let p = dir
            .parse_path("/nix/store/7n8pyd8s1sxgxhcw6xm9f5cbqqzk3c8p-input")
            .expect("path");
        let mut info = PathInfo::new(p.clone(), Hash::sha256(b"nar"), 42);
        info.references.insert(p.clone());
        info.deriver = Some(p);
        info.ca = Some("fixed:r:sha256:abc".into());
        let back = path_info_from_wire(&path_info_to_wire(&info)).expect("round trip");
        assert_eq!(back, info);
    }

    #[test]
    fn bad_fields_are_refused() {
        let mut wire = pb::StorePathInfo {
            path: "/etc/passwd".into(),
            ..Default::default()
        };
        assert!(path_info_from_wire(&wire).is_err());
        wire.path = "/nix/store/7n8pyd8s1sxgxhcw6xm9f5cbqqzk3c8p-input".into();
        wire.nar_hash = "md5:0123".into();
        assert!(path_info_from_wire(&wire).is_err());
        assert!(attempt_id("attempt-1").is_err());
        let id = AttemptId(uuid::Uuid::from_u128(17));
        assert_eq!(attempt_id(&step_id(id)).ok(), Some(id));
        let report = pb::StepResult {
            status: 6,
            ..Default::default()
        };
        assert!(step_report(&report).is_err());
    }
}
