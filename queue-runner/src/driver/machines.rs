//! Machines: agents connecting, leaving and reporting load, and the
//! snapshot `/status` and `/status/machines` serve.

use super::*;

pub(super) struct Machine {
    pub(super) info: AgentInfo,
    pub(super) commands: mpsc::Sender<ToAgent>,
    pub(super) load: AgentLoad,
    pub(super) running: usize,
    pub(super) steps_done: u64,
    pub(super) build_ms_total: u64,
    /// Its last heartbeat (or connection): its attempts are held under a
    /// lease that this renews.
    pub(super) last_heard: Instant,
}

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
                }
            }
            FromAgent::Phase {
                machine,
                attempt,
                busy,
            } => {
                if let Some(a) = self.attempts.get(&attempt) {
                    if a.machine == machine {
                        if let Some(stepnr) = a.stepnr {
                            self.send_write(WriteJob::Phase {
                                build: a.build,
                                stepnr,
                                busy,
                            });
                        }
                    }
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

    pub(super) fn publish_status(&mut self) {
        let stats = self.core.stats();
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
                avg_step_build_ms: m.build_ms_total.checked_div(m.steps_done).unwrap_or(0),
                draining: m.info.draining,
            })
            .collect();
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
            machines,
            database_down_since: match self.database {
                writer::DatabaseHealth::Up => None,
                writer::DatabaseHealth::Down { since_unix } => Some(since_unix),
            },
            pending_writes: self.writer.max_capacity() - self.writer.capacity()
                + self.write_backlog.len(),
        };
        let _ = self.status.send(snapshot);
    }
}
