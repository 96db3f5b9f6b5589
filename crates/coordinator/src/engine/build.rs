//! Build outcomes: applied once, to a running build; infrastructure failures retried within a budget.

use super::*;

impl Engine {
    /// Records a build's outcome; an infrastructure failure is retried while `retry` and
    /// the job's retry budget allow.
    pub(super) fn on_build(
        &self,
        inner: &mut Inner,
        a: AttemptMem,
        report: BuildReport,
        retry: bool,
    ) -> Result<(), EngineError> {
        let node = match a.job {
            JobRef::Build(node) => node,
            JobRef::Check(node) => return self.on_check(inner, &a, node, report, retry),
            JobRef::Eval(_) => return Ok(()),
        };
        let Some(run) = inner.runs.iter().find(|r| r.id == a.run_id) else {
            return Ok(());
        };
        let Some(sched) = run.sched.as_ref() else {
            return Ok(());
        };
        // A result is applied once, to a build that is running: the scheduler and the
        // stored state can then never disagree (a late result for a derivation already
        // built or failed would otherwise rewrite its row under its dependents).
        if sched.state(node) != NodeState::Running || run.checks.contains_key(&node) {
            tracing::debug!(
                run = a.run_id,
                drv = %run.drv_of[node as usize],
                "ignoring a result for a build not running"
            );
            return Ok(());
        }
        // Cross-checked builds: what an agent built counts once another has built it again
        // (a fixed output's hash already vouches for it).
        // "Not cached" too: the agent's word that its push failed is no reason to skip it.
        if (self.opts.cross_check_builds || run.spec.cross_check_builds)
            && report.kind.produced_outputs()
            && !sched.class(node).fetch
        {
            // What the build's job said. After a restart, what the run says now; but NAR
            // hashes come only from a build told to keep its outputs in its own store
            // (and one that was not, taken so, is merely built again from scratch).
            let hold = a
                .hold
                .unwrap_or_else(|| match run.hold(&self.opts, inner.hold_way) {
                    Hold::No => Hold::No,
                    _ if !report.nar_hashes.is_empty() => Hold::BuilderStore,
                    h => h,
                });
            // Outputs that did not get to where they wait for their check cannot be
            // checked on another host: built again instead.
            if hold == Hold::FarmCache && report.kind == BuildOutcome::NotCached {
                let report = BuildReport {
                    kind: BuildOutcome::InfraFailed,
                    message: format!(
                        "{} (the farm cache, where its outputs wait for their check)",
                        report.message
                    ),
                    ..report
                };
                return self.finish_build(inner, &a.run_id, node, &a.agent, report, retry);
            }
            // Held in the builder's store: its NAR hashes are all the check has to compare.
            let unhashed = super::checks::unhashed(&report);
            if hold == Hold::BuilderStore && !unhashed.is_empty() {
                let report = BuildReport {
                    kind: BuildOutcome::InfraFailed,
                    message: format!(
                        "agent {} built it but did not report the NAR hash of {}, which its check compares",
                        a.agent,
                        unhashed.join(", ")
                    ),
                    ..report
                };
                return self.finish_build(inner, &a.run_id, node, &a.agent, report, retry);
            }
            return self.queue_check(inner, &a.run_id, node, &a.agent, report, hold);
        }
        self.finish_build(inner, &a.run_id, node, &a.agent, report, retry)
    }

    /// Applies a build's outcome (for cross-checked builds: once the check settled it);
    /// `agent` is the one the event names, and whose store holds the outputs.
    pub(super) fn finish_build(
        &self,
        inner: &mut Inner,
        run_id: &str,
        node: NodeId,
        agent: &str,
        report: BuildReport,
        retry: bool,
    ) -> Result<(), EngineError> {
        let run_id = run_id.to_string();
        let Some(run) = inner.runs.iter_mut().find(|r| r.id == run_id) else {
            return Ok(());
        };
        let drv = run.drv_of[node as usize].clone();
        let report = unasked_cancel(&inner.agents, agent, report, run.state.is_terminal());
        let Some(sched) = run.sched.as_mut() else {
            return Ok(());
        };
        let mut dep_failed = Vec::new();
        let state = match report.kind {
            // Not cached still built: dependents on this agent can go on.
            BuildOutcome::Built | BuildOutcome::NotCached => {
                sched.complete(node);
                run.built_on.insert(node, agent.to_string());
                run.done_builds += 1;
                DrvState::Built
            }
            BuildOutcome::InfraFailed => {
                let n = inner.db.drv_infra_failure(&run_id, &drv)?;
                if retry && n <= self.opts.max_infra_retries && !run.state.is_terminal() {
                    tracing::warn!(
                        run = run_id,
                        %drv,
                        attempt = n,
                        "infrastructure failure, requeueing: {}",
                        report.message
                    );
                    sched.requeue(node);
                    self.emit(
                        inner,
                        &run_id,
                        Ev::JobRetry {
                            drv: drv.clone(),
                            message: report.message.clone(),
                            retry: n,
                        },
                    );
                    return Ok(());
                }
                dep_failed = sched.fail(node);
                DrvState::Failed
            }
            BuildOutcome::Cancelled if !run.state.is_terminal() => {
                // Handed back by a draining or pausing agent: try again elsewhere.
                sched.requeue(node);
                return Ok(());
            }
            BuildOutcome::Cancelled => {
                sched.cancel_running(node);
                DrvState::Cancelled
            }
            BuildOutcome::BuildFailed
            | BuildOutcome::HashMismatch
            | BuildOutcome::TimedOut
            | BuildOutcome::NotReproducible
            | BuildOutcome::DependencyFailed => {
                dep_failed = sched.fail(node);
                DrvState::Failed
            }
        };
        let (done, total) = (sched.len() - sched.unfinished(), sched.len());
        let dep_names: Vec<String> = dep_failed
            .iter()
            .map(|&n| run.drv_of[n as usize].to_string())
            .collect();
        let dep = BuildReport {
            kind: BuildOutcome::DependencyFailed,
            failed_root: Some(drv.clone()),
            ..Default::default()
        };
        // The event is stored with the build's end (one transaction): a coordinator killed
        // between the two would know the build done and never tell its watchers.
        let event = Ev::JobFinished {
            name: store_name(&drv).to_string(),
            drv: drv.clone(),
            agent: agent.to_string(),
            outcome: report.kind,
            message: report.message.clone(),
            duration_ms: report.duration_ms,
            substituted: report.substituted,
            dependency_failed: dep_names.len() as u64,
            done: done as u64,
            total: total as u64,
        };
        let (kind, json) = (event.kind(), event.to_json());
        let seq = inner.db.finish_drv(
            &run_id,
            &drv,
            state,
            &report,
            &dep_names,
            &dep,
            (kind, &json),
        )?;
        self.broadcast(inner, &run_id, seq, kind, json);
        if let Some((name, ms)) = crate::db_times::build_time(&drv, &report) {
            inner.build_times.insert(name.to_string(), ms);
            // Bounded in memory as on disk: past twice the names kept, the newest are
            // read back (the database forgets the rest).
            if inner.build_times.len() > 2 * crate::db_times::MAX_KEPT as usize {
                inner.build_times = inner.db.build_times()?;
            }
        }
        self.maybe_finish(inner, &run_id)
    }
}

/// A job cancelled while its run goes on is handed back for free only by an agent that said
/// it drains or pauses (it says so before it hands anything back); from any other it counts
/// as an infrastructure failure, within the same retries, so an agent that answers every
/// job with "cancelled" cannot keep a run going, and its database growing, forever.
pub(super) fn unasked_cancel(
    agents: &std::collections::BTreeMap<String, super::AgentMem>,
    agent: &str,
    report: BuildReport,
    run_ended: bool,
) -> BuildReport {
    let handing_back = agents
        .get(agent)
        .is_some_and(|a| a.draining || !a.paused.is_empty());
    if report.kind != BuildOutcome::Cancelled || run_ended || handing_back {
        return report;
    }
    BuildReport {
        kind: BuildOutcome::InfraFailed,
        message: format!(
            "agent {agent} cancelled it, though neither the run nor the agent was stopping: {}",
            report.message
        ),
        ..report
    }
}
