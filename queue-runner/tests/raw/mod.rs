//! A hand-driven agent for tests: a gRPC client that says whatever a test
//! wants, with a bearer token, and a helper that registers and opens the
//! work stream. Shared through `#[path]` by the tests that need an agent
//! no real agent would be.

#![allow(dead_code, clippy::unwrap_used)]

use sluice_proto::v1 as pb;
use sluice_proto::v1::queue_runner_client::QueueRunnerClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Bearer(MetadataValue<Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        r.metadata_mut().insert("authorization", self.0.clone());
        Ok(r)
    }
}

pub type Raw = QueueRunnerClient<InterceptedService<Channel, Bearer>>;

/// A client of the service at `url` presenting `token`.
pub async fn connect(url: String, token: &str) -> Raw {
    let channel = Channel::from_shared(url)
        .expect("url")
        .connect()
        .await
        .expect("connecting to the service");
    let bearer = Bearer(format!("Bearer {token}").parse().expect("ascii token"));
    QueueRunnerClient::with_interceptor(channel, bearer)
}

/// Registers with `request` and opens the work stream; returns the session
/// id, the sender that keeps the stream open, and the command stream.
pub async fn open_session(
    client: &mut Raw,
    request: pb::RegisterRequest,
) -> (
    String,
    tokio::sync::mpsc::Sender<pb::AgentEvent>,
    tonic::Streaming<pb::RunnerCommand>,
) {
    let session = client
        .register(request)
        .await
        .expect("register")
        .into_inner()
        .session_id;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::AgentEvent {
        session_id: session.clone(),
        event: Some(pb::agent_event::Event::Hello(pb::Hello::default())),
    })
    .await
    .expect("hello");
    let commands = client
        .work(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("work stream")
        .into_inner();
    (session, tx, commands)
}
