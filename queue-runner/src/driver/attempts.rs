//! Attempts: one dispatch of a step to a machine, from the core's
//! `Dispatch` through its preparation (row and assignment) to its end
//! (the agent's result, a cancel, a lost machine, a failed preparation).
//!
//! Invariant: an attempt's row is finished exactly once, by `complete`
//! (the agent's result) or `end_attempt` (the driver gives up); the write
//! that finishes it is queued before the core hears of its end.

use super::*;

/// One attempt at a step, from dispatch to its end.
#[derive(Debug, Clone)]
pub(super) struct Attempt {
    pub(super) drv_path: DrvPath,
    pub(super) machine: MachineId,
    pub(super) build: BuildId,
    pub(super) machine_name: String,
    /// `None` until the `BuildSteps` row exists.
    pub(super) stepnr: Option<i32>,
    pub(super) started_unix: i64,
    /// The agent has it: its assignment was sent, or it was adopted.
    pub(super) sent: bool,
    /// Adopted after a restart: the agent already runs it.
    pub(super) adopted: bool,
    /// It occupies one of its machine's slots (`Machine::running`).
    pub(super) in_slot: bool,
    /// Its phase as last reported (Hydra's `busy` code): 1, preparing,
    /// until its agent reports one; 0 for an adopted attempt until then.
    pub(super) busy: i32,
    /// The agent's pinned slot it holds, as last reported (an index into
    /// the machine's slots, checked).
    pub(super) slot: Option<u32>,
}

impl Driver {
    pub(super) fn on_finished(
        &mut self,
        machine: MachineId,
        attempt: AttemptId,
        report: StepReport,
        committed: watch::Sender<bool>,
    ) {
        // A refused result is forgotten with its attempt: the agent's next
        // report is told the attempt is over.
        let refuse = |why: &str| {
            let _ = self.attempts_shared.remove(attempt);
            tracing::warn!(%attempt, %machine, "{why}; the result is refused");
        };
        let Some(a) = self.attempts.get(&attempt) else {
            return refuse("result for an attempt that is over");
        };
        if a.machine != machine {
            return refuse("result from a machine that does not run it");
        }
        // The assignment is sent only once the row exists, so a result
        // for an attempt without a row is a lie.
        if a.stepnr.is_none() || !a.sent {
            return refuse("result for an attempt that was never assigned");
        }
        self.complete(attempt, report, Some(committed));
    }

    /// Records the end of an attempt and tells the core. The row's times
    /// come from our clock (dispatch to now), never the agent's: its clock
    /// may be wrong, or lie.
    ///
    /// With `committed` (an agent's report), the attempt stays in the
    /// registry until everything this result causes is committed; then it
    /// is removed and `committed` set, which answers the agent.
    pub(super) fn complete(
        &mut self,
        attempt: AttemptId,
        mut report: StepReport,
        committed: Option<watch::Sender<bool>>,
    ) {
        let Some(a) = self.attempts.remove(&attempt) else {
            return;
        };
        report.start_time = a.started_unix;
        report.stop_time = unix_now().max(a.started_unix);
        if committed.is_none() {
            let _ = self.attempts_shared.remove(attempt);
        }
        self.by_step.remove(&(a.drv_path.clone(), a.machine));
        let mut refused = report.status != 0 && report.failure == FailureKind::Refused;
        if let Some(m) = self.machines.get_mut(&a.machine) {
            if refused {
                m.refusals_in_a_row += 1;
                refused = m.refusals_in_a_row <= machines::FREE_REFUSALS;
            } else {
                m.refusals_in_a_row = 0;
            }
        }
        // A failure the agent blames on the machinery is recorded as an
        // aborted attempt (3), whatever code came with it, and retried.
        let retryable = report.status != 0 && report.is_retryable();
        if let Some(m) = self.machines.get_mut(&a.machine).filter(|_| a.in_slot) {
            let ran = (!refused).then(|| {
                let step_ms = (report.stop_time - report.start_time).max(0) as u64 * 1000;
                machines::Ran {
                    step_ms,
                    // Building alone, as the agent measured it.
                    build_ms: report.run.as_ref().map_or(step_ms, |r| r.build_ms),
                    machinery_failed: retryable,
                }
            });
            if let Some(ran) = &ran {
                self.counters.step_ms_total += ran.step_ms;
                self.counters.build_ms_total += ran.build_ms;
            }
            m.attempt_ended(report.stop_time, ran);
        }
        self.counters.steps_done += 1;
        if retryable {
            report.status = 3;
        }
        let outcome = if refused {
            StepOutcome::Refused
        } else {
            outcome_of(report.status, retryable)
        };
        if self.uploads.is_some() {
            // Into the binary cache: the outputs (the builds this step
            // finishes wait for them), and the log of a step that ended
            // for good as its agent reported it.
            if outcome == StepOutcome::Success {
                self.upload_step_outputs(&a.drv_path, &report.outputs);
            }
            let for_good = match outcome {
                StepOutcome::Success => true,
                StepOutcome::Failed { can_retry, .. } => !can_retry,
                StepOutcome::Refused => false,
            };
            if for_good && committed.is_some() {
                self.upload_log(&a.drv_path);
            }
        }
        if report.status == 0 {
            self.built_outputs.insert(
                a.drv_path.clone(),
                BuiltStep {
                    outputs: report.outputs.clone(),
                    start_time: report.start_time,
                    stop_time: report.stop_time,
                },
            );
        }
        if let Some(stepnr) = a.stepnr {
            let failed_paths = if fails_for_good(report.status) {
                self.closure
                    .get(&a.drv_path)
                    .map(|c| c.failed_paths(a.drv_path.as_str()))
                    .unwrap_or_default()
            } else {
                Vec::new()
            };
            // What content-addressed outputs became, its own and those of
            // the steps resolved into it: committed with its row.
            let (mut realisations, resolved_from) = if report.status == 0 {
                let into = self.resolutions.built(&a.drv_path, &report.outputs);
                (into.realisations, into.originals)
            } else {
                (Vec::new(), Vec::new())
            };
            if report.status == 0 {
                if let Some(keys) = self.closure.get(&a.drv_path).map(HeldDrv::keys) {
                    realisations.extend(super::resolve::realisations_of(
                        &a.drv_path,
                        &keys,
                        &report.outputs,
                    ));
                }
            }
            for original in &resolved_from {
                self.built_outputs.insert(
                    original.clone(),
                    BuiltStep {
                        outputs: report.outputs.clone(),
                        start_time: report.start_time,
                        stop_time: report.stop_time,
                    },
                );
            }
            self.register_realisations(realisations.clone());
            self.send_write(WriteJob::FinishStep {
                build: a.build,
                stepnr,
                drv_path: a.drv_path.as_str().to_string(),
                machine: a.machine_name.clone(),
                report,
                failed_paths,
                realisations,
                resolved_from: resolved_from
                    .iter()
                    .map(|d| d.as_str().to_owned())
                    .collect(),
            });
        }
        let succeeded = outcome == StepOutcome::Success;
        // An adopted attempt whose build finished without it holds no slot
        // in the core: only its row records the result.
        if a.in_slot {
            self.apply(Event::StepFinished {
                drv_path: a.drv_path.clone(),
                machine: a.machine,
                outcome,
            });
        }
        if succeeded {
            // The builds this step finished were recorded by the call
            // above; dependents read its outputs from the database.
            self.built_outputs.remove(&a.drv_path);
            if let Some(held) = self.closure.remove(&a.drv_path) {
                // Its dependents, dispatched next, need its output paths:
                // from memory, not from its `.drv` again. Only static
                // ones (a step with dynamic outputs is resolved first).
                if let Some(outputs) = held.static_outputs(a.drv_path.as_str()) {
                    self.store.remember_static_outputs(
                        a.drv_path.as_str(),
                        outputs.iter().map(|(n, p)| (n.as_str(), p.as_str())),
                    );
                }
            }
        }
        if let Some(committed) = committed {
            // Queued after the step's row and the builds it finished: runs
            // once they are all committed.
            let registry = self.attempts_shared.clone();
            self.send_write(WriteJob::AfterCommit(writer::OnCommit(Box::new(
                move || {
                    let _ = registry.remove(attempt);
                    let _ = committed.send(true);
                },
            ))));
        }
    }

    /// Ends an attempt the driver itself gives up on (cancel, disconnect,
    /// preparation failure), recording `status` with `error`.
    pub(super) fn end_attempt(&mut self, attempt: AttemptId, status: i32, error: &str) {
        let Some(a) = self.attempts.remove(&attempt) else {
            return;
        };
        let _ = self.attempts_shared.remove(attempt);
        if let Some(m) = self.machines.get_mut(&a.machine).filter(|_| a.in_slot) {
            m.attempt_ended(unix_now(), None);
        }
        match a.stepnr {
            Some(stepnr) => self.finish_row(&a, stepnr, status, error),
            // Its row is still being created: finished when its number
            // arrives (`on_prepared`), so it never stays busy.
            None => {
                self.ended_before_row
                    .insert(attempt, (a, status, error.to_string()));
            }
        }
    }

    /// Finishes the row of an attempt the driver gave up on.
    pub(super) fn finish_row(&mut self, a: &Attempt, stepnr: i32, status: i32, error: &str) {
        self.send_write(WriteJob::FinishStep {
            build: a.build,
            stepnr,
            drv_path: a.drv_path.as_str().to_string(),
            machine: a.machine_name.clone(),
            report: StepReport {
                status,
                error_msg: error.to_string(),
                times_built: 0,
                is_non_deterministic: false,
                start_time: a.started_unix,
                stop_time: unix_now().max(a.started_unix),
                outputs: Vec::new(),
                overhead_ms: 0,
                failure: FailureKind::Infrastructure,
                run: None,
            },
            failed_paths: Vec::new(),
            realisations: Vec::new(),
            resolved_from: Vec::new(),
        });
    }

    pub(super) fn dispatch(&mut self, drv_path: DrvPath, machine: MachineId, build: BuildId) {
        if self.hold_dispatches || !self.write_backlog.is_empty() {
            self.deferred_dispatches
                .push_back((drv_path, machine, build));
            return;
        }
        let id = AttemptId::new();
        let Some(m) = self.machines.get_mut(&machine) else {
            return;
        };
        m.running += 1;
        let machine_name = m.info.name.clone();
        self.attempts.insert(
            id,
            Attempt {
                drv_path: drv_path.clone(),
                machine,
                build,
                machine_name,
                stepnr: None,
                started_unix: unix_now(),
                sent: false,
                adopted: false,
                in_slot: true,
                busy: 1,
                slot: None,
            },
        );
        self.by_step.insert((drv_path.clone(), machine), id);
        let first_for_build = self.started_builds.insert(build);
        self.prepare(id, drv_path, machine, build, first_for_build);
    }

    /// Starts preparing attempt `id`: its row (unless it is adopted and
    /// has one) and its assignment, in a task that answers with
    /// [`DriverEvent::Prepared`].
    pub(super) fn prepare(
        &mut self,
        id: AttemptId,
        drv_path: DrvPath,
        machine: MachineId,
        build: BuildId,
        first_for_build: bool,
    ) {
        let Some(a) = self.attempts.get(&id) else {
            return;
        };
        let outputs = self
            .closure
            .get(&drv_path)
            .map(|held| held.outputs_map(drv_path.as_str()))
            .unwrap_or_default();
        let system = self.held_system(&drv_path);
        let job = prepare::Preparation {
            attempt: id,
            machine,
            build,
            drv_path: drv_path.as_str().to_string(),
            system,
            machine_name: a.machine_name.clone(),
            outputs,
            first_for_build,
            started_unix: a.started_unix,
            existing_row: a.stepnr,
            max_log_bytes: self.config.max_log_bytes,
            max_output_bytes: self.config.max_output_bytes,
            timeouts: self.step_limits(&drv_path, build),
            resolutions: self.resolution_rows_for(&drv_path, a.stepnr.is_some()),
        };
        let writer = self.writer.clone();
        let store = self.store.clone();
        let me = self.me.clone();
        tokio::spawn(prepare::run(job, writer, store, me));
    }

    /// The max silent time and timeout for a step: the largest among the
    /// builds that need it, so that sharing a step with a build of tighter
    /// limits never cuts a build short. Hydra's defaults if no build is
    /// held.
    fn step_limits(&self, drv_path: &DrvPath, build: BuildId) -> (u32, u32) {
        let mut needing = self.core.builds_needing(drv_path.as_str());
        if needing.is_empty() {
            needing.push(build);
        }
        needing
            .iter()
            .filter_map(|id| self.builds.get(id))
            .map(|b| (b.max_silent_s, b.timeout_s))
            .reduce(|(s1, t1), (s2, t2)| (s1.max(s2), t1.max(t2)))
            .unwrap_or((3600, 36000))
    }

    pub(super) fn on_prepared(
        &mut self,
        attempt: AttemptId,
        stepnr: i32,
        assignment: Result<(crate::agents::Assignment, AttemptEntry), String>,
    ) {
        let Some(a) = self.attempts.get_mut(&attempt) else {
            // Cancelled or disconnected while its row was being created:
            // finish the row now, with why the attempt ended.
            if let Some((a, status, error)) = self.ended_before_row.remove(&attempt) {
                if stepnr > 0 {
                    self.finish_row(&a, stepnr, status, &error);
                }
            }
            return;
        };
        if stepnr > 0 {
            a.stepnr = Some(stepnr);
        }
        let machine = a.machine;
        let started = a.started_unix;
        if a.adopted {
            // The agent already runs it: only the registry needs it.
            let registered = assignment.and_then(|(_, entry)| {
                self.attempts_shared
                    .register_adopted(attempt, entry)
                    .map_err(|e| e.to_string())
            });
            if let Err(error) = registered {
                if let Some(m) = self.machines.get(&machine) {
                    let _ = m.commands.try_send(ToAgent::Cancel(attempt));
                }
                self.drop_attempt(
                    attempt,
                    &format!("adopting the step after a restart: {error}"),
                );
            }
            return;
        }
        a.sent = true;
        let sent = assignment.and_then(|(assignment, entry)| {
            self.attempts_shared
                .register(attempt, entry)
                .map_err(|e| e.to_string())?;
            let commands = self
                .machines
                .get(&machine)
                .map(|m| m.commands.clone())
                .ok_or_else(|| "the builder went away".to_string())?;
            commands
                .try_send(ToAgent::Assign(assignment))
                .map_err(|_| "the builder's command queue is full or closed".to_string())
        });
        if let Err(error) = sent {
            let report = StepReport {
                status: 3,
                error_msg: error,
                times_built: 0,
                is_non_deterministic: false,
                start_time: started,
                stop_time: unix_now(),
                outputs: Vec::new(),
                overhead_ms: 0,
                failure: FailureKind::Infrastructure,
                run: None,
            };
            self.complete(attempt, report, None);
        }
    }
}

/// Whether a step status is a failure of the build itself, which building
/// again will not fix: its outputs go into `FailedPaths` (Hydra's rule;
/// a derivation with outputs known only once built goes in itself).
fn fails_for_good(status: i32) -> bool {
    matches!(status, 1 | 7 | 10 | 11)
}

/// A Hydra step status from an agent, as the core's outcome.
/// `can_retry` is the agent's word (see `StepReport::is_retryable`); the
/// core decides whether tries remain and how long to wait.
fn outcome_of(status: i32, can_retry: bool) -> StepOutcome {
    let failure = match status {
        0 => return StepOutcome::Success,
        1 => StepFailure::Failed,
        7 => StepFailure::TimedOut,
        10 => StepFailure::LogLimitExceeded,
        11 => StepFailure::NarSizeLimitExceeded,
        12 => StepFailure::NotDeterministic,
        _ => StepFailure::Aborted,
    };
    StepOutcome::Failed { failure, can_retry }
}
