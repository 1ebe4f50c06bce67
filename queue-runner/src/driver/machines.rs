//! Machines: agents connecting, leaving and reporting load and phases,
//! and the snapshot `/status`, `/status/machines`, the dashboard and the
//! `SystemStatus` row show.

use super::*;
use crate::status::RunningStep;

pub(super) struct Machine {
    pub(super) info: AgentInfo,
    pub(super) commands: mpsc::Sender<ToAgent>,
    pub(super) load: AgentLoad,
    pub(super) running: usize,
    /// Attempts that ran here and ended (refusals left out), and their
    /// milliseconds from dispatch to result and building alone.
    pub(super) steps_done: u64,
    pub(super) step_ms_total: u64,
    pub(super) build_ms_total: u64,
    /// Since when (unix seconds) none of its slots is taken.
    pub(super) idle_since: i64,
    /// When (unix seconds; 0: never) an attempt here last failed for the
    /// machinery's reasons, and how many did in a row since one did not.
    pub(super) last_failure: i64,
    pub(super) consecutive_failures: u64,
    /// Its last heartbeat (or connection): its attempts are held under a
    /// lease that this renews.
    pub(super) last_heard: Instant,
    /// It has a session now (a machine whose session dropped is kept,
    /// detached, while it holds attempts).
    pub(super) connected: bool,
    /// Why it gets no new steps for now (pressure, disk), until it recovers.
    pub(super) paused: Option<String>,
    /// Assignments it refused since it last took one: past
    /// `FREE_REFUSALS`, a refusal costs a try like an aborted attempt, so
    /// an agent that refuses everything cannot keep a step spinning.
    pub(super) refusals_in_a_row: u32,
}

/// An attempt that ran on a machine and ended.
pub(super) struct Ran {
    /// From dispatch to result, by our clock.
    pub(super) step_ms: u64,
    /// Building alone, as the agent measured it (else `step_ms`).
    pub(super) build_ms: u64,
    /// It failed for the machinery's reasons (aborted, to be retried).
    pub(super) machinery_failed: bool,
}

impl Machine {
    /// A machine that just connected, idle.
    pub(super) fn new(info: AgentInfo, commands: mpsc::Sender<ToAgent>) -> Machine {
        Machine {
            info,
            commands,
            load: AgentLoad::default(),
            running: 0,
            steps_done: 0,
            step_ms_total: 0,
            build_ms_total: 0,
            idle_since: unix_now(),
            last_failure: 0,
            consecutive_failures: 0,
            last_heard: Instant::now(),
            connected: true,
            paused: None,
            refusals_in_a_row: 0,
        }
    }

    /// One of its attempts left its slot at `now` (unix seconds): `ran`
    /// says how it went, `None` when it never ran (refused, or given up).
    pub(super) fn attempt_ended(&mut self, now: i64, ran: Option<Ran>) {
        self.running = self.running.saturating_sub(1);
        if self.running == 0 {
            self.idle_since = now;
        }
        let Some(ran) = ran else {
            return;
        };
        self.steps_done += 1;
        self.step_ms_total += ran.step_ms;
        self.build_ms_total += ran.build_ms;
        if ran.machinery_failed {
            self.consecutive_failures += 1;
            self.last_failure = now;
        } else {
            self.consecutive_failures = 0;
        }
    }
}

/// Refusals in a row from one machine that cost no try.
pub(super) const FREE_REFUSALS: u32 = 3;

impl Driver {
    pub(super) fn on_agent(&mut self, msg: FromAgent) {
        match msg {
            FromAgent::Connected {
                machine,
                info,
                commands,
                held,
            } => self.on_connected(machine, info, commands, held),
            FromAgent::Disconnected { machine } => self.on_disconnected(machine),
            FromAgent::Draining { machine } => {
                if let Some(m) = self.machines.get_mut(&machine) {
                    m.info.draining = true;
                    self.deferred_dispatches.retain(|(_, m, _)| *m != machine);
                    self.apply(Event::MachineDetached { machine });
                }
            }
            FromAgent::Heartbeat { machine, load } => {
                if let Some(m) = self.machines.get_mut(&machine) {
                    m.load = load;
                    m.last_heard = Instant::now();
                    self.check_capacity(machine);
                }
            }
            FromAgent::Phase {
                machine,
                attempt,
                busy,
                slot,
            } => {
                // A slot the machine did not register is not believed.
                let slots = self
                    .machines
                    .get(&machine)
                    .map_or(0, |m| m.info.slots.len());
                let slot = slot.filter(|s| usize::try_from(*s).is_ok_and(|s| s < slots));
                let Some(a) = self
                    .attempts
                    .get_mut(&attempt)
                    .filter(|a| a.machine == machine)
                else {
                    // Reported right after a restart, before adoption.
                    self.orphan_phase(attempt, machine, (busy, slot));
                    return;
                };
                a.busy = busy;
                a.slot = slot;
                if let Some(stepnr) = a.stepnr {
                    let build = a.build;
                    self.send_write(WriteJob::Phase {
                        build,
                        stepnr,
                        busy,
                    });
                }
            }
            FromAgent::Finished {
                machine,
                attempt,
                report,
                committed,
            } => self.on_finished(machine, attempt, report, committed),
        }
    }

    /// Why machine `m` should get no new steps now, if it should not: CPU
    /// pressure over the threshold, or too little free disk where its store
    /// is or where it builds.
    fn over_capacity(&self, m: &Machine) -> Option<String> {
        let pressure = self.config.max_cpu_pressure;
        if pressure > 0.0 && m.load.cpu_pressure.avg10 > pressure {
            return Some(format!(
                "CPU pressure {:.1}% is over {pressure}%",
                m.load.cpu_pressure.avg10
            ));
        }
        let min = self.config.min_free_disk_mb.saturating_mul(1 << 20);
        // A figure the agent could not read does not pause it.
        let free = [m.load.store_free_bytes, m.load.build_dir_free_bytes]
            .into_iter()
            .flatten()
            .min();
        if let Some(free) = free.filter(|free| min > 0 && *free < min) {
            return Some(format!(
                "{} MiB of free disk is under {} MiB",
                free >> 20,
                self.config.min_free_disk_mb
            ));
        }
        None
    }

    /// Pauses or resumes machine `id` by its latest figures: paused, it
    /// keeps its running steps and gets no new ones (the core's detach).
    fn check_capacity(&mut self, id: MachineId) {
        let Some(m) = self.machines.get(&id) else {
            return;
        };
        let over = self.over_capacity(m);
        match (over, m.paused.is_some()) {
            (Some(why), false) => {
                tracing::warn!(agent = %m.info.name, "agent paused: {why}; it gets no new steps until it recovers");
                if let Some(m) = self.machines.get_mut(&id) {
                    m.paused = Some(why);
                }
                self.deferred_dispatches.retain(|(_, m, _)| *m != id);
                self.apply(Event::MachineDetached { machine: id });
            }
            (None, true) => {
                tracing::info!(agent = %m.info.name, "agent recovered: it takes steps again");
                let spec = resume::machine_spec(id, &m.info);
                if let Some(m) = self.machines.get_mut(&id) {
                    m.paused = None;
                }
                self.apply(Event::MachineConnected(spec));
            }
            _ => {}
        }
    }

    pub(super) fn publish_status(&mut self) {
        let stats = self.core.stats();
        let now = unix_now();
        let machines = self
            .machines
            .iter()
            .map(|(id, m)| MachineStatus {
                id: id.0,
                hostname: m.info.name.clone(),
                systems: m.info.systems.clone(),
                max_jobs: m.info.max_jobs,
                speed_factor: m.info.speed_factor,
                supported_features: m.info.supported_features.clone(),
                mandatory_features: m.info.mandatory_features.clone(),
                running: m.running,
                total_mem: m.info.total_mem_bytes,
                load: m.load.clone(),
                steps_done: m.steps_done,
                step_ms_total: m.step_ms_total,
                build_ms_total: m.build_ms_total,
                idle_since: m.idle_since,
                last_failure: m.last_failure,
                consecutive_failures: m.consecutive_failures,
                last_heard_unix: now
                    .saturating_sub(i64::try_from(m.last_heard.elapsed().as_secs()).unwrap_or(0)),
                connected: m.connected,
                draining: m.info.draining,
                paused: m.paused.clone(),
                slots: m.info.slots.clone(),
                nodes: m.info.nodes.clone(),
            })
            .collect();
        let running = match &self.running_published {
            Some((at, list)) if at.elapsed() < crate::status::RUNNING_REFRESH => {
                // Maybe stale: the loop publishes again once it is due.
                self.running_stale = true;
                list.clone()
            }
            _ => {
                let list: std::sync::Arc<Vec<RunningStep>> = std::sync::Arc::new(
                    self.attempts
                        .values()
                        .map(|a| RunningStep {
                            machine: a.machine.0,
                            build: a.build.0,
                            stepnr: a.stepnr,
                            drv_path: a.drv_path.clone(),
                            started_unix: a.started_unix,
                            busy: a.busy,
                            slot: a.slot,
                        })
                        .collect(),
                );
                self.running_published = Some((Instant::now(), list.clone()));
                self.running_stale = false;
                list
            }
        };
        let snapshot = StatusSnapshot {
            started_unix: self.started_unix,
            uptime_s: self.clock.elapsed().as_secs(),
            core: stats,
            builds_queued: self.builds.len(),
            queue_wakeups: self.counters.queue_wakeups,
            dispatcher_wakeups: self.counters.dispatcher_wakeups,
            dispatch_time_ms: self.counters.dispatch_time_ms,
            builds_done: self.counters.builds_done,
            steps_done: self.counters.steps_done,
            builds_read: self.counters.builds_read,
            max_tries: self.counters.max_tries,
            step_ms_total: self.counters.step_ms_total,
            build_ms_total: self.counters.build_ms_total,
            machines,
            running,
            database_down_since: match self.database {
                writer::DatabaseHealth::Up => None,
                writer::DatabaseHealth::Down { since_unix } => Some(since_unix),
            },
            pending_writes: self.writer.max_capacity() - self.writer.capacity()
                + self.writer_in_flight.get()
                + self.write_backlog.len(),
            uploads: self.uploads.as_ref().map(upload::Uploads::status),
        };
        let _ = self.status.send(snapshot);
    }
}
