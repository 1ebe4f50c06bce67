//! The `sluice.v1.QueueRunner` trait implementation: each method checks
//! the caller and hands over to the module that does the work (sessions,
//! [`super::work`], [`super::log_stream`], [`super::fetch`],
//! [`super::upload`]); the small ones (version, register, heartbeat,
//! result) live here.
//!
//! Invariants: every method reads the caller's identity first and checks
//! any session it names belongs to it; a result is accepted only after its
//! outputs are valid in the queue runner's store, and at most once; it is
//! acknowledged only once committed, so an agent that heard no answer
//! reports again and nothing is lost or recorded twice.

use std::collections::BTreeSet;

use sluice_nix::store_path::StoreDir;
use sluice_proto::v1 as pb;
use sluice_proto::PROTOCOL_VERSION;
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

use super::attempts::Report;
use super::auth::identity;
use super::{convert, fetch, input_closure, log_stream, upload, work, QueueRunnerService};
use crate::agents::FromAgent;

const RUNNER_VERSION: &str = env!("CARGO_PKG_VERSION");

fn saturating_u32(n: u128) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[tonic::async_trait]
impl pb::queue_runner_server::QueueRunner for QueueRunnerService {
    async fn version(
        &self,
        request: Request<pb::VersionRequest>,
    ) -> Result<Response<pb::VersionResponse>, Status> {
        identity(&request)?;
        let req = request.into_inner();
        if req.protocol_version != PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "agent {} speaks sluice protocol version {}, but this queue runner ({}) \
                 speaks version {}: upgrade the older of the two",
                req.agent_version, req.protocol_version, RUNNER_VERSION, PROTOCOL_VERSION
            )));
        }
        Ok(Response::new(pb::VersionResponse {
            protocol_version: PROTOCOL_VERSION,
            runner_version: RUNNER_VERSION.to_owned(),
        }))
    }

    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let owner = identity(&request)?;
        let info = convert::agent_info(request.into_inner())?;
        let session = self.shared.sessions.register(owner.clone(), info).await;
        tracing::debug!(session = %session.id, agent = %session.info.name, token = %owner.0, "agent registered");
        let config = &self.shared.config;
        Ok(Response::new(pb::RegisterResponse {
            session_id: session.id.clone(),
            heartbeat_interval_ms: saturating_u32(config.heartbeat_interval.as_millis()),
            max_message_bytes: saturating_u32(config.max_message_bytes as u128),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let owner = identity(&request)?;
        let req = request.into_inner();
        let session = self.shared.sessions.get(&req.session_id, &owner)?;
        self.shared.sessions.beat(&session);
        // A heartbeat renews the agent's lease on its attempts: it is
        // waited for, never dropped, even when the driver is busy.
        session
            .send(FromAgent::Heartbeat {
                machine: session.machine,
                load: convert::agent_load(&req),
            })
            .await;
        Ok(Response::new(pb::HeartbeatResponse {}))
    }

    type WorkStream = work::WorkStream;

    async fn work(
        &self,
        request: Request<Streaming<pb::AgentEvent>>,
    ) -> Result<Response<Self::WorkStream>, Status> {
        let owner = identity(&request)?;
        let peer = request.remote_addr();
        let stream = work::open(self.shared.clone(), owner, peer, request.into_inner()).await?;
        Ok(Response::new(stream))
    }

    async fn stream_log(
        &self,
        request: Request<Streaming<pb::LogChunk>>,
    ) -> Result<Response<pb::LogAck>, Status> {
        let owner = identity(&request)?;
        let ack = log_stream::receive(&self.shared, owner, request.into_inner()).await?;
        Ok(Response::new(ack))
    }

    type InputClosureStream = input_closure::ClosureStream;

    async fn input_closure(
        &self,
        request: Request<pb::InputClosureRequest>,
    ) -> Result<Response<Self::InputClosureStream>, Status> {
        let owner = identity(&request)?;
        let stream = input_closure::open(self.shared.clone(), owner, request.into_inner()).await?;
        Ok(Response::new(stream))
    }

    type FetchPathsStream = fetch::FetchStream;

    async fn fetch_paths(
        &self,
        request: Request<pb::FetchPathsRequest>,
    ) -> Result<Response<Self::FetchPathsStream>, Status> {
        let owner = identity(&request)?;
        let stream = fetch::open(self.shared.clone(), owner, request.into_inner()).await?;
        Ok(Response::new(stream))
    }

    async fn upload_nar(
        &self,
        request: Request<Streaming<pb::NarUpload>>,
    ) -> Result<Response<pb::UploadNarResponse>, Status> {
        let owner = identity(&request)?;
        let response = upload::receive(self.shared.clone(), owner, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn report_result(
        &self,
        request: Request<pb::StepResult>,
    ) -> Result<Response<pb::ResultAck>, Status> {
        let owner = identity(&request)?;
        let res = request.into_inner();
        let session = self.shared.sessions.get(&res.session_id, &owner)?;
        let attempt = convert::attempt_id(&res.step_id)?;
        // A repeated report (the agent did not hear the answer) waits for
        // the first one's commit.
        if let Some(wait) = self
            .shared
            .attempts
            .pending_report(attempt, session.machine)?
        {
            return committed(wait).await;
        }
        let mut report = convert::step_report(&res)?;
        if report.status == 0 {
            let paths = self
                .shared
                .attempts
                .with_owned(attempt, session.machine, |e| {
                    e.check_success(&report.outputs)
                })??;
            let mut client = self
                .shared
                .store
                .client()
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            let valid: BTreeSet<_> = client
                .query_valid_paths(paths.iter(), false)
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            if let Some(missing) = paths.iter().find(|p| !valid.contains(*p)) {
                return Err(Status::failed_precondition(format!(
                    "output '{}' is not valid in the queue runner's store: upload it before \
                     reporting success",
                    StoreDir::default().print(missing)
                )));
            }
        } else {
            report.outputs.clear();
        }
        let (sender, wait) = match self.shared.attempts.report(attempt, session.machine)? {
            Report::First { committed, wait } => (committed, wait),
            Report::Again(wait) => return committed(wait).await,
        };
        tracing::debug!(session = %session.id, %attempt, status = report.status, "step result");
        let sent = session
            .send(FromAgent::Finished {
                machine: session.machine,
                attempt,
                report,
                committed: sender,
            })
            .await;
        if !sent {
            return Err(Status::unavailable(
                "the session ended before the result could be delivered",
            ));
        }
        committed(wait).await
    }
}

/// Answers a report once its result is committed: the agent may forget it
/// only then.
async fn committed(mut wait: watch::Receiver<bool>) -> Result<Response<pb::ResultAck>, Status> {
    match wait.wait_for(|done| *done).await {
        Ok(_) => Ok(Response::new(pb::ResultAck {})),
        Err(_) => Err(Status::unavailable(
            "the result was not recorded (the queue runner is stopping): report it again",
        )),
    }
}
