//! Cross-checked builds: a derivation one agent built counts only once a different agent has
//! built it again from the same inputs and found the same outputs as the cache holds
//! (`nix-store --check` against what it fetched from there). Until then it stays running in
//! the scheduler, so nothing builds on it; the first result is kept in the store meanwhile.

use super::*;

/// What is told the outputs of a build whose check found different ones.
pub type OnFailedCheck = Arc<dyn Fn(&[String]) + Send + Sync>;

impl Engine {
    /// Sets what is told the outputs of a build whose check found different ones (once; the
    /// farm cache, which then stops serving them).
    pub fn on_failed_check(&self, f: OnFailedCheck) {
        let _ = self.failed_check.set(f);
    }

    /// Holds `agent`'s successful build of `node` until another agent has checked it.
    pub(super) fn queue_check(
        &self,
        inner: &mut Inner,
        run_id: &str,
        node: NodeId,
        agent: &str,
        report: BuildReport,
    ) -> Result<(), EngineError> {
        let now = self.clock.now_ms();
        let Some(run) = inner.runs.iter_mut().find(|r| r.id == run_id) else {
            return Ok(());
        };
        let drv = run.drv_of[node as usize].clone();
        let duration_ms = report.duration_ms;
        let check = PendingCheck {
            drv: drv.clone(),
            built_by: agent.to_string(),
            report,
            queued_ms: now,
        };
        inner.db.record_build_check(run_id, &check)?;
        run.checks.insert(node, check);
        run.check_queue.push_back(node);
        if !super::checker_connected(&inner.agents, agent) {
            tracing::warn!(
                run = run_id,
                drv,
                agent,
                "the build waits for a second agent to check it (cross_check_builds): none with a credential of its own is connected"
            );
        }
        self.emit(
            inner,
            run_id,
            Ev::JobAwaitingCheck {
                name: store_name(&drv).to_string(),
                drv,
                agent: agent.to_string(),
                duration_ms,
            },
        );
        Ok(())
    }

    /// The oldest check in `run` that `agent` may take: not of its own build (nor of one by
    /// an agent `independent_of` says is the same holder), of a derivation it can build.
    pub(super) fn next_check(
        run: &mut RunMem,
        caps: &Capabilities,
        independent_of: &dyn Fn(&str) -> bool,
    ) -> Option<(JobRef, Job, String)> {
        if caps.fetches_only {
            return None;
        }
        let sched = run.sched.as_ref()?;
        let at = run.check_queue.iter().position(|n| {
            run.checks
                .get(n)
                .is_some_and(|c| independent_of(&c.built_by))
                && caps.can_build(sched.class(*n))
        })?;
        let node = run.check_queue.remove(at)?;
        let drv = run.drv_of[node as usize].clone();
        let job = run.build_job(&drv, false, true);
        Some((JobRef::Check(node), job, drv))
    }

    /// A check's result settles the first build: the same outputs count it built; a
    /// difference, or a failure to build it again, fails it; a broken or lost check is
    /// tried again (on any agent but the first).
    pub(super) fn on_check(
        &self,
        inner: &mut Inner,
        a: &AttemptMem,
        node: NodeId,
        report: BuildReport,
        retry: bool,
    ) -> Result<(), EngineError> {
        let now = self.clock.now_ms();
        let Some(run) = inner.runs.iter_mut().find(|r| r.id == a.run_id) else {
            return Ok(());
        };
        let running = run
            .sched
            .as_ref()
            .is_some_and(|s| s.state(node) == NodeState::Running);
        let Some(first) = run.checks.get(&node).cloned().filter(|_| running) else {
            tracing::debug!(
                run = a.run_id,
                "ignoring a check of a build not awaiting one"
            );
            return Ok(());
        };
        let (by, checker, drv) = (&first.built_by, &a.agent, first.drv.clone());
        let terminal = run.state.is_terminal();
        // "Built" from an agent that did not check (one that predates checks builds the
        // derivation as usual, substituting it from the cache) vouches for nothing.
        let report = if report.kind.produced_outputs() && !report.checked {
            BuildReport {
                kind: BuildOutcome::InfraFailed,
                message: format!(
                    "agent {checker} answered without checking (is it older than cross_check_builds?)"
                ),
                ..report
            }
        } else {
            report
        };
        let settled = match report.kind {
            BuildOutcome::Built | BuildOutcome::NotCached => BuildReport {
                message: format!(
                    "built on {by}; {checker} built it again and got the same outputs"
                ),
                ..first.report.clone()
            },
            BuildOutcome::Cancelled if !terminal => {
                Self::requeue_check(run, node, now);
                return Ok(());
            }
            BuildOutcome::InfraFailed => {
                let n = inner.db.drv_infra_failure(&a.run_id, &drv)?;
                let run = inner.runs.iter_mut().find(|r| r.id == a.run_id);
                if let Some(run) = run
                    && retry
                    && n <= self.opts.max_infra_retries
                    && !terminal
                {
                    tracing::warn!(
                        run = a.run_id,
                        drv,
                        attempt = n,
                        "check failed, requeueing: {}",
                        report.message
                    );
                    Self::requeue_check(run, node, now);
                    let message = report.message.clone();
                    self.emit(
                        inner,
                        &a.run_id,
                        Ev::JobRetry {
                            drv,
                            message,
                            retry: n,
                        },
                    );
                    return Ok(());
                }
                BuildReport {
                    message: format!(
                        "built on {by}, but it could not be checked on {checker}: {}",
                        report.message
                    ),
                    agent: checker.clone(),
                    ..report
                }
            }
            BuildOutcome::NotReproducible => {
                // What was pushed is not vouched for: nobody substitutes it from the farm
                // cache again, in this run or a later one.
                let outputs: Vec<String> = run
                    .outputs_of
                    .get(node as usize)
                    .map(|o| o.values().cloned().collect())
                    .unwrap_or_default();
                if let Some(f) = self.failed_check.get() {
                    f(&outputs);
                }
                BuildReport {
                    message: format!(
                        "{by} and {checker} built different outputs: the build is not reproducible, or one of them did not build what the derivation says ({})",
                        report.message
                    ),
                    agent: checker.clone(),
                    ..report
                }
            }
            BuildOutcome::Cancelled => report,
            BuildOutcome::BuildFailed
            | BuildOutcome::HashMismatch
            | BuildOutcome::TimedOut
            | BuildOutcome::DependencyFailed => BuildReport {
                message: format!(
                    "built on {by}, but building it again on {checker} failed: {}",
                    report.message
                ),
                agent: checker.clone(),
                ..report
            },
        };
        self.settle_check(inner, &a.run_id.clone(), node, &a.agent.clone(), settled)
    }

    fn requeue_check(run: &mut RunMem, node: NodeId, now: i64) {
        if let Some(c) = run.checks.get_mut(&node) {
            // Its wait for an agent starts again.
            c.queued_ms = now;
            run.check_queue.push_front(node);
        }
    }

    /// Ends a check one way or the other: forgotten, and the build's outcome applied.
    fn settle_check(
        &self,
        inner: &mut Inner,
        run_id: &str,
        node: NodeId,
        agent: &str,
        report: BuildReport,
    ) -> Result<(), EngineError> {
        let Some(run) = inner.runs.iter_mut().find(|r| r.id == run_id) else {
            return Ok(());
        };
        let Some(c) = run.checks.remove(&node) else {
            return Ok(());
        };
        run.check_queue.retain(|n| *n != node);
        inner.db.drop_build_check(run_id, &c.drv)?;
        self.finish_build(inner, run_id, node, agent, report, false)
    }

    /// Cross-checks nobody took within the wait: a build's check fails it (infrastructure,
    /// saying why); an evaluation answer nobody else gave fails the run.
    pub(super) fn expire_cross_checks(&self, inner: &mut Inner, now: i64) {
        let wait = self.opts.cross_check_wait_ms;
        let secs = wait / 1000;
        let mut builds = Vec::new();
        let mut evals = Vec::new();
        for run in inner.runs.iter().filter(|r| !r.state.is_terminal()) {
            for n in &run.check_queue {
                if let Some(c) = run.checks.get(n)
                    && now - c.queued_ms >= wait
                {
                    builds.push((run.id.clone(), *n, c.built_by.clone()));
                }
            }
            let waiting = run.eval_queue.iter().find_map(|t| {
                let task = super::opinions::task_no(*t);
                let since = run.opinion_since.get(&task)?;
                let first = run.opinions.get(&task)?;
                (now - since >= wait).then(|| (task, first.agent.clone()))
            });
            if let Some(w) = waiting {
                evals.push((run.id.clone(), w));
            }
        }
        for (run_id, node, by) in builds {
            let report = BuildReport {
                kind: BuildOutcome::InfraFailed,
                message: format!(
                    "built on {by}, but no other agent took its check within {secs} s (cross_check_builds needs a second agent, with a credential of its own, that can build it)"
                ),
                agent: by.clone(),
                ..Default::default()
            };
            if let Err(e) = self.settle_check(inner, &run_id, node, &by, report) {
                tracing::error!(run = run_id, "cannot fail an unchecked build: {e}");
            }
        }
        for (run_id, (task, agent)) in evals {
            let what = if task < 0 {
                "the attribute listing".to_string()
            } else {
                format!("evaluation task {task}")
            };
            let why = format!(
                "{what} was answered by {agent}, and no other agent answered it within {secs} s to check it (cross_check_evaluation needs two connected agents with credentials of their own)"
            );
            if let Err(e) = self.fail_run(inner, &run_id, &why) {
                tracing::error!(run = run_id, "cannot fail a run: {e}");
            }
        }
    }
}
