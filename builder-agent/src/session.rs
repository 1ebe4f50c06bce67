//! One connection to the queue runner: version check, registration
//! (announcing the steps the agent still holds), heartbeats, and the work
//! stream, whose assignments and cancels it applies to the agent's jobs.
//!
//! Invariants: jobs belong to the agent ([`crate::link::Jobs`]), not to a
//! session: when a session ends its jobs go on, and reach the next session
//! through the [`Link`], which holds this session only while it is up. At
//! most `max_jobs` jobs build at once; an assignment beyond that (the
//! queue runner assigns up to `prefetch` steps ahead) waits for a slot,
//! and is given back unstarted (`FAILURE_KIND_REFUSED`) if the agent
//! drains first.

use std::sync::Arc;
use std::time::Duration;

use sluice_proto::v1 as pb;
use sluice_proto::v1::queue_runner_client::QueueRunnerClient;
use sluice_proto::PROTOCOL_VERSION;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::config::AgentConfig;
use crate::link::{Jobs, Link};
use crate::{host, job, Backoff};

const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Phase updates buffered towards the queue runner.
const EVENT_BUFFER: usize = 64;
/// Heartbeat failures in a row that end the session.
const MAX_HEARTBEAT_FAILURES: u32 = 3;

/// Adds the bearer token to every call.
#[derive(Clone)]
pub(crate) struct Bearer(MetadataValue<Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

pub(crate) type Client = QueueRunnerClient<InterceptedService<Channel, Bearer>>;

/// How a session ended.
#[derive(Debug)]
pub(crate) enum Ended {
    /// Try again later.
    Lost(String),
    /// The queue runner will not take this agent as configured.
    Refused(String),
    /// Draining, and every job is done: the agent may exit.
    Drained,
}

/// What jobs share with their session.
pub(crate) struct SessionCtx {
    pub(crate) id: String,
    pub(crate) client: Client,
    pub(crate) config: Arc<AgentConfig>,
    /// Largest message the queue runner accepts.
    pub(crate) max_message: usize,
    /// The work stream, for phase updates.
    events: mpsc::Sender<pb::AgentEvent>,
    /// Every job's latest phase, which outlives the session.
    phases: crate::link::Phases,
}

impl SessionCtx {
    /// Reports a busy phase (Hydra's `BuildSteps.busy` code) of a step,
    /// and the pinned slot it holds (its index in the registered slots),
    /// if it holds one. Advisory: dropped if the stream is full or gone.
    pub(crate) fn phase(&self, step_id: &str, busy: u32, slot: Option<u32>) {
        self.phases.lock().insert(step_id.to_owned(), (busy, slot));
        let _ = self
            .events
            .try_send(phase_event(&self.id, step_id.to_owned(), busy, slot));
    }
}

/// A phase update of step `step_id` on session `session_id`.
fn phase_event(session_id: &str, step_id: String, busy: u32, slot: Option<u32>) -> pb::AgentEvent {
    pb::AgentEvent {
        session_id: session_id.to_owned(),
        event: Some(pb::agent_event::Event::Phase(pb::PhaseUpdate {
            step_id,
            busy,
            slot,
        })),
    }
}

fn lost(what: &str, status: &Status) -> Ended {
    Ended::Lost(format!("{what}: {}", status.message()))
}

/// Errors that no retry will fix. A refused token is named as such,
/// whichever call met it first.
fn classify(what: &str, status: Status) -> Ended {
    match status.code() {
        Code::Unauthenticated => Ended::Refused(format!(
            "the queue runner refused this agent's token ({}); \
             check --token-file against the queue runner's --agent-token-file",
            status.message()
        )),
        Code::FailedPrecondition | Code::InvalidArgument => {
            Ended::Refused(format!("{what}: {}", status.message()))
        }
        _ => lost(what, &status),
    }
}

async fn connect(config: &AgentConfig) -> Result<Client, Ended> {
    let token: MetadataValue<Ascii> = format!("Bearer {}", config.token).parse().map_err(|_| {
        Ended::Refused("the token contains characters HTTP headers cannot carry".into())
    })?;
    let endpoint = Endpoint::from_shared(config.queue_runner.clone())
        .map_err(|e| Ended::Refused(format!("--queue-runner '{}': {e}", config.queue_runner)))?
        .connect_timeout(Duration::from_secs(10))
        .tcp_keepalive(Some(Duration::from_secs(30)))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20));
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| Ended::Lost(format!("connecting to {}: {e}", config.queue_runner)))?;
    Ok(QueueRunnerClient::with_interceptor(channel, Bearer(token)))
}

/// Runs one session until it ends. While it is up, `link` holds it.
pub(crate) async fn run(
    config: &Arc<AgentConfig>,
    backoff: &mut Backoff,
    jobs: &mut Jobs,
    link: &watch::Sender<Option<Arc<SessionCtx>>>,
    draining: watch::Receiver<bool>,
) -> Ended {
    let ended = match serve(config, backoff, jobs, link, draining).await {
        Ok(never) => match never {},
        Err(ended) => ended,
    };
    link.send_replace(None);
    ended
}

async fn serve(
    config: &Arc<AgentConfig>,
    backoff: &mut Backoff,
    jobs: &mut Jobs,
    link: &watch::Sender<Option<Arc<SessionCtx>>>,
    mut draining: watch::Receiver<bool>,
) -> Result<std::convert::Infallible, Ended> {
    let mut client = connect(config).await?;
    let version = client
        .version(pb::VersionRequest {
            protocol_version: PROTOCOL_VERSION,
            agent_version: AGENT_VERSION.to_owned(),
        })
        .await
        .map_err(|s| classify("version check", s))?
        .into_inner();
    if version.protocol_version != PROTOCOL_VERSION {
        return Err(Ended::Refused(format!(
            "the queue runner ({}) speaks protocol {}, this agent {PROTOCOL_VERSION}",
            version.runner_version, version.protocol_version
        )));
    }
    let host = host::load(&config.proc_root);
    let is_draining = *draining.borrow();
    let registered = client
        .register(pb::RegisterRequest {
            name: config.name.clone(),
            systems: config.systems.clone(),
            supported_features: config.features.clone(),
            mandatory_features: config.mandatory_features.clone(),
            max_jobs: config.max_jobs,
            prefetch: config.prefetch,
            speed_factor: config.speed_factor,
            total_mem_bytes: host.mem_total_bytes,
            draining: is_draining,
            slots: config
                .slots
                .iter()
                .flat_map(|layout| &layout.slots)
                .map(|slot| pb::SlotInfo {
                    node: slot.node,
                    cpus: crate::topology::format_cpu_list(&slot.cpus),
                })
                .collect(),
            nodes: config
                .topology
                .iter()
                .flat_map(|t| &t.nodes)
                .map(|node| pb::NumaNode {
                    id: node.id,
                    cpus: crate::topology::format_cpu_list(&node.cpus),
                })
                .collect(),
        })
        .await
        .map_err(|s| classify("registration", s))?
        .into_inner();
    backoff.reset();
    let max_message = usize::try_from(registered.max_message_bytes)
        .unwrap_or(usize::MAX)
        .max(64 << 10);
    let client = client
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);

    let held_steps = jobs.held();
    let held_phases = jobs.held_phases();
    // Room for the Hello and every held step's phase, so none waits.
    let (events, events_rx) = mpsc::channel(EVENT_BUFFER.max(held_phases.len() + 1));
    let hello = pb::AgentEvent {
        session_id: registered.session_id.clone(),
        event: Some(pb::agent_event::Event::Hello(pb::Hello {
            held_steps: held_steps.clone(),
        })),
    };
    // The channel has room: these cannot wait.
    let _ = events.try_send(hello);
    // Then where each held step is, which a restarted queue runner does
    // not know (advisory, like every phase update).
    for (step_id, busy, slot) in held_phases {
        let _ = events.try_send(phase_event(&registered.session_id, step_id, busy, slot));
    }
    let mut commands = client
        .clone()
        .work(ReceiverStream::new(events_rx))
        .await
        .map_err(|s| lost("opening the work stream", &s))?
        .into_inner();
    tracing::info!(
        session = %registered.session_id,
        queue_runner = %config.queue_runner,
        held = held_steps.len(),
        "registered with the queue runner"
    );
    let ctx = Arc::new(SessionCtx {
        id: registered.session_id,
        client,
        config: config.clone(),
        max_message,
        events,
        phases: jobs.phases(),
    });
    let interval = Duration::from_millis(u64::from(registered.heartbeat_interval_ms).max(100));
    let heartbeats = heartbeat(ctx.clone(), interval);
    tokio::pin!(heartbeats);

    link.send_replace(Some(ctx.clone()));
    let job_link = Link::from_sender(link);
    loop {
        let drain = *draining.borrow_and_update();
        if drain && jobs.is_empty() {
            return Err(Ended::Drained);
        }
        tokio::select! {
            ended = &mut heartbeats => return Err(ended),
            Some(done) = jobs.set.join_next_with_id(), if !jobs.set.is_empty() => jobs.reap(done),
            Ok(()) = draining.changed() => {
                let now_draining = *draining.borrow();
                if now_draining {
                    // The queue runner hears of the drain before any step
                    // held ahead is given back, so it sends them elsewhere.
                    let _ = ctx.events.try_send(pb::AgentEvent {
                        session_id: ctx.id.clone(),
                        event: Some(pb::agent_event::Event::Drain(pb::Drain {})),
                    });
                    jobs.slots().drain();
                }
            }
            message = commands.message() => {
                let command = match message {
                    Ok(Some(pb::RunnerCommand { command: Some(c) })) => c,
                    Ok(Some(_)) => continue,
                    Ok(None) => return Err(Ended::Lost("the queue runner closed the work stream".into())),
                    Err(status) => return Err(lost("work stream", &status)),
                };
                match command {
                    pb::runner_command::Command::Assign(a) => {
                        let step = a.step_id.clone();
                        if jobs.contains(&step) {
                            tracing::warn!(step, "assigned a step that is already running; ignored");
                        } else if drain {
                            tracing::info!(step, "assigned a step while draining; refusing it");
                            tokio::spawn(job::refuse(ctx.clone(), step, "the agent is draining"));
                        } else {
                            // It waits for a slot if none is free: the
                            // queue runner may assign steps ahead.
                            let slots = jobs.slots();
                            jobs.spawn(step, job::run(job_link.clone(), a, slots));
                        }
                    }
                    pb::runner_command::Command::Cancel(c) => {
                        if jobs.cancel(&c.step_id) {
                            tracing::info!(step = c.step_id, "cancelled by the queue runner");
                        }
                    }
                }
            }
        }
    }
}

/// The free space on the filesystem of `path` (the `what`), for a
/// heartbeat. A read that fails is left out, and said once until a read
/// succeeds again.
fn free_space(what: &str, path: &std::path::Path, unreadable: &mut bool) -> Option<u64> {
    match host::free_bytes(path) {
        Ok(free) => {
            *unreadable = false;
            Some(free)
        }
        Err(e) => {
            if !std::mem::replace(unreadable, true) {
                tracing::warn!(
                    "the free space of the {what} '{}' cannot be read ({e}); heartbeats leave it out",
                    path.display()
                );
            }
            None
        }
    }
}

/// Sends heartbeats until the queue runner forgets the session or they
/// keep failing; returns why.
async fn heartbeat(ctx: Arc<SessionCtx>, interval: Duration) -> Ended {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures = 0;
    let (mut store_unreadable, mut build_dir_unreadable) = (false, false);
    loop {
        ticks.tick().await;
        let load = host::load(&ctx.config.proc_root);
        let store_free = free_space("store", &ctx.config.store_dir, &mut store_unreadable);
        let build_dir_free = free_space(
            "build directory",
            &ctx.config.build_dir,
            &mut build_dir_unreadable,
        );
        let request = pb::HeartbeatRequest {
            session_id: ctx.id.clone(),
            load1: load.load[0],
            load5: load.load[1],
            load15: load.load[2],
            mem_used_bytes: load.mem_used_bytes,
            pressure: Some(pb::Pressure {
                cpu_some_avg10: load.cpu_pressure.avg10,
                cpu_some_avg60: load.cpu_pressure.avg60,
                cpu_some_avg300: load.cpu_pressure.avg300,
                memory_some_avg10: load.memory_pressure.avg10,
                memory_some_avg60: load.memory_pressure.avg60,
                memory_some_avg300: load.memory_pressure.avg300,
                io_some_avg10: load.io_pressure.avg10,
                io_some_avg60: load.io_pressure.avg60,
                io_some_avg300: load.io_pressure.avg300,
            }),
            store_free_bytes: store_free,
            build_dir_free_bytes: build_dir_free,
        };
        match ctx.client.clone().heartbeat(request).await {
            Ok(_) => failures = 0,
            Err(s) if matches!(s.code(), Code::NotFound | Code::PermissionDenied) => {
                return lost("heartbeat", &s)
            }
            Err(s) if s.code() == Code::Unauthenticated => return classify("heartbeat", s),
            Err(s) => {
                failures += 1;
                tracing::warn!("heartbeat failed ({failures} in a row): {}", s.message());
                if failures >= MAX_HEARTBEAT_FAILURES {
                    return lost("heartbeats", &s);
                }
            }
        }
    }
}
