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
    /// Why it gets no new steps for now (pressure, disk), until it recovers.
    pub(super) paused: Option<String>,
    /// Assignments it refused since it last took one: past
    /// `FREE_REFUSALS`, a refusal costs a try like an aborted attempt, so
    /// an agent that refuses everything cannot keep a step spinning.
    pub(super) refusals_in_a_row: u32,
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
                slot: _,
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

    /// Why machine `m` should get no new steps now, if it should not: CPU
    /// pressure over the threshold, or too little free disk.
    fn over_capacity(&self, m: &Machine) -> Option<String> {
        let pressure = self.config.max_cpu_pressure;
        if pressure > 0.0 && m.load.cpu_pressure.avg10 > pressure {
            return Some(format!(
                "CPU pressure {:.1}% is over {pressure}%",
                m.load.cpu_pressure.avg10
            ));
        }
        let min = self.config.min_free_disk_mb.saturating_mul(1 << 20);
        let free = m.load.store_free_bytes.min(m.load.build_dir_free_bytes);
        if min > 0 && free < min {
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
                paused: m.paused.clone(),
                slots: m.info.slots.clone(),
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
            uploads: self.uploads.as_ref().map(upload::Uploads::status),
        };
        let _ = self.status.send(snapshot);
    }
}
