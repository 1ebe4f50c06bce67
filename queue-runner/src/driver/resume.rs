//! Attempts that outlive a connection or a restart.
//!
//! - **Leases.** An agent's attempts are held under a lease that its
//!   heartbeats renew; an agent silent past the lease (frozen, or gone)
//!   loses them: they are aborted and retried elsewhere, and its session
//!   ends. When an agent's session ends its machine is *detached*: its
//!   attempts are kept, since the agent goes on building them, and it gets
//!   no new steps. If the agent registers again within the lease, the
//!   machine is reattached with the attempts it reports holding; the
//!   others are aborted and retried.
//! - **Restart.** A restarted queue runner reads the attempts the previous
//!   run left in progress (`SluiceAttempts`), loads nothing, and waits up to
//!   one lease for agents to report them. Each reported attempt is claimed
//!   in the core for its agent's machine; loading then starts, and a
//!   claimed step is adopted (`Command::Adopt`): it keeps its row, start
//!   time and log, and nothing is sent to the agent. Attempts nobody
//!   reported are aborted when the wait ends.
//!
//! Invariant: an attempt is aborted only once no agent can deliver it: its
//! lease expired, its agent came back without it, or, after a restart,
//! nobody reported it within the lease or its step cannot be adopted.

use super::*;
use crate::db::results::AttemptRow;

/// An attempt a previous run left in progress.
#[derive(Debug)]
pub(super) struct Orphan {
    row: AttemptRow,
    /// The machine whose agent reported it.
    claimed_by: Option<MachineId>,
    /// The busy phase and slot that agent reported for it, if any.
    phase: Option<(i32, Option<u32>)>,
}

/// The wait after a restart for agents to report their attempts.
#[derive(Debug)]
pub(super) struct Resuming {
    orphans: HashMap<AttemptId, Orphan>,
    until: Instant,
}

impl Driver {
    /// Takes the attempts a previous run left in progress; call before
    /// [`Driver::run`]. With any, loading waits until agents report them or
    /// a lease passes.
    pub fn resume_attempts(&mut self, rows: Vec<AttemptRow>) {
        if rows.is_empty() {
            return;
        }
        tracing::info!(
            attempts = rows.len(),
            wait_s = self.config.lease.as_secs(),
            "waiting for agents to report the steps they still run"
        );
        let orphans: HashMap<AttemptId, Orphan> = rows
            .into_iter()
            .map(|row| {
                (
                    AttemptId(row.id),
                    Orphan {
                        row,
                        claimed_by: None,
                        phase: None,
                    },
                )
            })
            .collect();
        self.attempts_shared.expect(orphans.keys().copied());
        self.resume = Some(Resuming {
            orphans,
            until: Instant::now() + self.config.lease,
        });
    }

    /// Whether the driver still waits for agents after a restart.
    pub(super) fn resuming(&self) -> bool {
        self.resume.is_some()
    }

    /// Whether `machine` holds attempts (whose lease then matters).
    fn holds_attempts(&self, machine: MachineId) -> bool {
        self.attempts.values().any(|a| a.machine == machine)
    }

    /// The machines holding attempts, in one pass over the attempts (the
    /// driver asks on every turn of its loop).
    fn machines_holding_attempts(&self) -> HashSet<MachineId> {
        self.attempts.values().map(|a| a.machine).collect()
    }

    /// The earliest of the driver's own deadlines: a lease that runs out
    /// (the last heartbeat of an agent holding attempts, plus the lease),
    /// the end of the wait after a restart.
    pub(super) fn next_lease_deadline(&self) -> Option<Instant> {
        let holding = self.machines_holding_attempts();
        let leases = self
            .machines
            .iter()
            .filter(|(id, _)| holding.contains(id))
            .map(|(_, m)| m.last_heard + self.config.lease);
        leases.chain(self.resume.as_ref().map(|r| r.until)).min()
    }

    /// Ends what ran out by now: the attempts of agents silent past their
    /// lease (connected or not), the wait after a restart.
    pub(super) fn expire_leases(&mut self) {
        let now = Instant::now();
        let lease = self.config.lease;
        let holding = self.machines_holding_attempts();
        let expired: Vec<MachineId> = self
            .machines
            .iter()
            .filter(|(id, m)| m.last_heard + lease <= now && holding.contains(id))
            .map(|(id, _)| *id)
            .collect();
        for machine in expired {
            if let Some(m) = self.machines.get(&machine) {
                tracing::warn!(
                    agent = %m.info.name,
                    lease_s = lease.as_secs(),
                    "no heartbeat from the agent within its lease; its steps are retried elsewhere"
                );
            }
            // Dropping the machine drops its command channel, which ends
            // its session if it is still open: the agent registers anew.
            self.give_up_machine(machine, "the builder stayed silent past its lease");
        }
        if self.resume.as_ref().is_some_and(|r| r.until <= now) {
            self.finish_resume();
        }
    }

    /// The agent's session ended: keep its attempts for a lease, or forget
    /// it at once if it runs none.
    pub(super) fn on_disconnected(&mut self, machine: MachineId) {
        if !self.machines.contains_key(&machine) {
            return;
        }
        if !self.holds_attempts(machine) {
            self.give_up_machine(machine, "the builder disconnected");
            return;
        }
        if let Some(m) = self.machines.get_mut(&machine) {
            m.connected = false;
        }
        self.deferred_dispatches.retain(|(_, m, _)| *m != machine);
        self.apply(Event::MachineDetached { machine });
    }

    /// Forgets a machine: its attempts are aborted (status 3) and retried.
    pub(super) fn give_up_machine(&mut self, machine: MachineId, why: &str) {
        if self.machines.remove(&machine).is_none() {
            return;
        }
        let gone: Vec<AttemptId> = self
            .attempts
            .iter()
            .filter(|(_, a)| a.machine == machine)
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.end_attempt(id, 3, why);
        }
        self.by_step.retain(|(_, m), _| *m != machine);
        self.claimed.retain(|(_, m), _| *m != machine);
        self.deferred_dispatches.retain(|(_, m, _)| *m != machine);
        self.apply(Event::MachineDisconnected { machine });
    }

    /// An agent (re)connected, holding `held` from earlier sessions.
    pub(super) fn on_connected(
        &mut self,
        machine: MachineId,
        info: AgentInfo,
        commands: mpsc::Sender<ToAgent>,
        held: Vec<AttemptId>,
    ) {
        let spec = machine_spec(machine, &info);
        let held_set: HashSet<AttemptId> = held.iter().copied().collect();
        match self.machines.get_mut(&machine) {
            Some(m) => {
                // Back within its lease (or a second registration): it
                // keeps the attempts it still holds.
                m.info = info.clone();
                m.commands = commands.clone();
                m.last_heard = Instant::now();
                m.paused = None;
                m.connected = true;
            }
            None => {
                self.machines
                    .insert(machine, Machine::new(info.clone(), commands.clone()));
            }
        }
        self.apply(Event::MachineConnected(spec));
        // Attempts sent to it that it no longer holds are lost.
        let lost: Vec<AttemptId> = self
            .attempts
            .iter()
            .filter(|(id, a)| a.machine == machine && a.sent && !held_set.contains(id))
            .map(|(id, _)| *id)
            .collect();
        for id in lost {
            self.drop_attempt(id, "the builder came back without this step");
        }
        for id in held {
            let ours = self.attempts.get(&id).is_some_and(|a| a.machine == machine);
            if ours {
                continue;
            }
            let claimed = self
                .resume
                .as_mut()
                .and_then(|r| r.orphans.get_mut(&id))
                .map(|o| {
                    if o.row.machine == info.name {
                        o.claimed_by = Some(machine);
                        true
                    } else {
                        false
                    }
                });
            if claimed != Some(true) {
                tracing::info!(%id, agent = %info.name, "the agent holds an attempt that is over; cancelling it");
                let _ = commands.try_send(ToAgent::Cancel(id));
            }
        }
        let all_claimed = self
            .resume
            .as_ref()
            .is_some_and(|r| r.orphans.values().all(|o| o.claimed_by.is_some()));
        if all_claimed {
            self.finish_resume();
        }
    }

    /// Keeps the phase `machine` reports for an attempt it claimed while
    /// the driver still waits for other agents after a restart, for when
    /// the attempt is adopted; whether `attempt` was such a claim.
    pub(super) fn orphan_phase(
        &mut self,
        attempt: AttemptId,
        machine: MachineId,
        phase: (i32, Option<u32>),
    ) -> bool {
        let orphan = self
            .resume
            .as_mut()
            .and_then(|r| r.orphans.get_mut(&attempt))
            .filter(|o| o.claimed_by == Some(machine));
        match orphan {
            Some(o) => {
                o.phase = Some(phase);
                true
            }
            None => false,
        }
    }

    /// Aborts an attempt the driver gives up on while its machine stays,
    /// and tells the core, which retries the step.
    pub(super) fn drop_attempt(&mut self, id: AttemptId, why: &str) {
        let Some(a) = self.attempts.get(&id) else {
            return;
        };
        let (drv_path, machine, in_slot) = (a.drv_path.clone(), a.machine, a.in_slot);
        self.by_step.remove(&(drv_path.clone(), machine));
        self.end_attempt(id, 3, why);
        if !in_slot {
            return;
        }
        self.apply(Event::StepFinished {
            drv_path,
            machine,
            outcome: StepOutcome::Failed {
                failure: StepFailure::Aborted,
                can_retry: true,
            },
        });
    }

    /// Ends the wait after a restart: reported attempts are claimed in the
    /// core, the rest aborted; then loading starts.
    fn finish_resume(&mut self) {
        let Some(resume) = self.resume.take() else {
            return;
        };
        let mut adopted = 0;
        let mut aborted = 0;
        for (id, orphan) in resume.orphans {
            let row = orphan.row;
            let claimed_by = orphan
                .claimed_by
                .filter(|machine| self.machines.contains_key(machine));
            let (busy, slot) = orphan.phase.unwrap_or((0, None));
            let attempt = |machine: MachineId| Attempt {
                drv_path: DrvPath::from(row.drv_path.as_str()),
                machine,
                build: BuildId(row.build),
                machine_name: row.machine.clone(),
                stepnr: Some(row.stepnr),
                started_unix: row.start_time,
                sent: true,
                adopted: true,
                in_slot: false,
                busy,
                slot,
            };
            match claimed_by {
                Some(machine) => {
                    adopted += 1;
                    let drv_path = DrvPath::from(row.drv_path.as_str());
                    self.claimed.insert((drv_path.clone(), machine), id);
                    self.attempts.insert(id, attempt(machine));
                    self.apply(Event::StepClaimed { drv_path, machine });
                }
                None => {
                    aborted += 1;
                    let _ = self.attempts_shared.remove(id);
                    // No machine runs it: the attempt exists only to
                    // finish its row.
                    self.finish_row(
                        &attempt(MachineId(0)),
                        row.stepnr,
                        3,
                        "no agent reported this step within the lease after the queue runner restarted",
                    );
                }
            }
        }
        tracing::info!(adopted, aborted, "resumed the steps agents still run");
        self.load_new();
        self.load_restarted();
    }

    /// The core put a claimed step into its machine's slot: the attempt
    /// goes on where it is; its registry entry is prepared as for a
    /// dispatch, but nothing is sent.
    pub(super) fn adopt(&mut self, drv_path: DrvPath, machine: MachineId) {
        let Some(id) = self.claimed.remove(&(drv_path.clone(), machine)) else {
            return;
        };
        let Some(a) = self.attempts.get(&id) else {
            return;
        };
        let build = a.build;
        if let Some(a) = self.attempts.get_mut(&id) {
            a.in_slot = true;
        }
        self.by_step.insert((drv_path.clone(), machine), id);
        self.started_builds.insert(build);
        if let Some(m) = self.machines.get_mut(&machine) {
            m.running += 1;
        }
        tracing::info!(%id, drv = %drv_path, "adopted a step its agent still runs");
        self.prepare(id, drv_path, machine, build, false);
    }

    /// The core could not adopt a claimed step: abort the attempt and stop
    /// it on its agent; the step is scheduled as usual.
    pub(super) fn refuse_adoption(&mut self, drv_path: DrvPath, machine: MachineId, why: &str) {
        let Some(id) = self.claimed.remove(&(drv_path.clone(), machine)) else {
            return;
        };
        tracing::warn!(%id, drv = %drv_path, "not adopting a step its agent still runs: {why}");
        if let Some(m) = self.machines.get(&machine) {
            let _ = m.commands.try_send(ToAgent::Cancel(id));
        }
        self.end_attempt(
            id,
            3,
            &format!("the step could not be adopted after a restart: {why}"),
        );
    }

    /// Claims that no load used. If the attempt's build finished here
    /// without it (its outputs were valid already: a store the agent
    /// shares, say), the agent still delivers the result, and the row
    /// records it; otherwise its build is gone (cancelled, deleted) and
    /// the attempt is stopped.
    pub(super) fn withdraw_unused_claims(&mut self) {
        let claims: Vec<((DrvPath, MachineId), AttemptId)> =
            self.claimed.iter().map(|(k, v)| (k.clone(), *v)).collect();
        for ((drv_path, machine), id) in claims {
            self.apply(Event::ClaimWithdrawn {
                drv_path: drv_path.clone(),
            });
            let build = self.attempts.get(&id).map(|a| a.build);
            let finished_here = build.is_some_and(|b| {
                self.builds.contains_key(&b) || self.recently_finished.contains_key(&b)
            });
            match build {
                Some(build) if finished_here => {
                    self.claimed.remove(&(drv_path.clone(), machine));
                    tracing::info!(%id, drv = %drv_path, "its build finished without it; the step's result is still taken");
                    self.prepare(id, drv_path, machine, build, false);
                }
                _ => self.refuse_adoption(drv_path, machine, "no queued build needs it any more"),
            }
        }
    }
}

/// The core's view of an agent.
pub(super) fn machine_spec(machine: MachineId, info: &AgentInfo) -> MachineSpec {
    MachineSpec {
        id: machine,
        name: info.name.clone(),
        systems: info.systems.clone(),
        supported_features: info.supported_features.clone(),
        mandatory_features: info.mandatory_features.clone(),
        // A draining agent takes no new steps.
        max_jobs: if info.draining { 0 } else { info.max_jobs },
        prefetch: if info.draining { 0 } else { info.prefetch },
        speed_factor: info.speed_factor,
    }
}
