//! Cross-checked builds: a derivation one agent built counts only once a different agent has
//! built it again from the same inputs and found the same outputs: as the cache holds
//! (`nix-store --check` against what it fetched from there), or, for outputs held in the
//! builder's own store, with the NAR hashes that build reported. Until then it stays
//! running in the scheduler, so nothing builds on it; the first result is kept in the
//! store meanwhile.

use super::*;
use crate::credentials::Credential;

/// What is told the outputs of a build whose check found different ones.
pub type OnFailedCheck = Arc<dyn Fn(&[String]) + Send + Sync>;

impl Engine {
    /// The farm cache has started: cross-checked builds may hold unchecked outputs there
    /// (unless the agents share a store), and `withdraw` is told the outputs no check
    /// vouched for, which it then stops serving.
    pub fn attach_farm_cache(&self, withdraw: OnFailedCheck) {
        let _ = self.failed_check.set(withdraw);
        let mut inner = self.lock();
        if inner.hold_way != Hold::SharedStore {
            inner.hold_way = Hold::FarmCache;
        }
    }

    /// Holds `agent`'s successful build of `node` until another agent has checked it.
    pub(super) fn queue_check(
        &self,
        inner: &mut Inner,
        run_id: &str,
        node: NodeId,
        agent: &str,
        report: BuildReport,
        hold: Hold,
    ) -> Result<(), EngineError> {
        let now = self.clock.now_ms();
        let Some(run) = inner.runs.iter_mut().find(|r| r.id == run_id) else {
            return Ok(());
        };
        let drv = run.drv_of[node as usize].clone();
        let duration_ms = report.duration_ms;
        let credential = inner
            .agents
            .get(agent)
            .map(|a| a.reg.credential.clone())
            .unwrap_or_default();
        let check = PendingCheck {
            drv: drv.clone(),
            built_by: agent.to_string(),
            credential,
            report,
            queued_ms: now,
            hold,
        };
        inner.db.record_build_check(run_id, &check)?;
        run.checks.insert(node, check);
        run.check_queue.push_back(node);
        if !checker_connected(
            &inner.agents,
            (agent, &run.spec.cache),
            hold,
            inner.hold_way,
        ) {
            tracing::warn!(
                run = run_id,
                %drv,
                agent,
                "the build waits for a second agent to check it (cross_check_builds): none with a credential of its own is connected"
            );
        }
        self.emit(
            inner,
            run_id,
            Ev::JobAwaitingCheck {
                name: store_name(&drv).to_string(),
                drv: drv.clone(),
                agent: agent.to_string(),
                duration_ms,
            },
        );
        Ok(())
    }

    /// The oldest check in `run` that the asking agent may take: not of its own build (nor
    /// of one by an agent `independent_of` says is the same holder, given the credential
    /// that agent built with), of a derivation it can build; of held outputs only if it
    /// `takes` them (an older agent would neither fetch nor publish them).
    pub(super) fn next_check(
        run: &mut RunMem,
        caps: &Capabilities,
        takes: &dyn Fn(Hold) -> bool,
        independent_of: &dyn Fn(&str, &Credential) -> bool,
    ) -> Option<(JobRef, Job, String)> {
        if caps.fetches_only {
            return None;
        }
        let sched = run.sched.as_ref()?;
        let at = run.check_queue.iter().position(|n| {
            run.checks
                .get(n)
                .is_some_and(|c| independent_of(&c.built_by, &c.credential) && takes(c.hold))
                && caps.can_build(sched.class(*n))
        })?;
        let node = run.check_queue.remove(at)?;
        let drv = run.drv_of[node as usize].clone();
        let first = run.checks.get(&node);
        let hold = first.map_or(Hold::No, |c| c.hold);
        let mut job = run.build_job(&drv, false, true, hold);
        // Held in the builder's store: the check builds it again and compares with what
        // that build reported.
        if let (Hold::BuilderStore, Some(first), Job::Build { expect, .. }) =
            (hold, first, &mut job)
        {
            *expect = first
                .report
                .outputs
                .iter()
                .filter_map(|(name, path)| {
                    let h = first.report.nar_hashes.get(name)?;
                    Some((name.clone(), path.known()?.clone(), *h))
                })
                .collect();
        }
        Some((JobRef::Check(node), job, drv.to_string()))
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
        let report = super::build::unasked_cancel(&inner.agents, checker, report, terminal);
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
        // Held in the builder's store: the two agents' NAR hashes are what is compared
        // (the checker compared them too, before it published). A check that says too
        // little proves nothing either way: it is asked again.
        let report = match report.kind {
            BuildOutcome::Built if first.hold == Hold::BuilderStore => {
                match compare_hashes(&first.report, &report) {
                    Ok(()) => report,
                    Err(Differ::Hashes(why)) => BuildReport {
                        kind: BuildOutcome::NotReproducible,
                        message: why,
                        ..report
                    },
                    Err(Differ::Unsaid(why)) => BuildReport {
                        kind: BuildOutcome::InfraFailed,
                        message: format!("agent {checker} answered without checking: {why}"),
                        ..report
                    },
                }
            }
            _ => report,
        };
        let held = first.hold.held();
        // Held outputs reach the run's cache only by the check's own push: one that failed
        // leaves them unpublished, so the check is tried again (dependents on other hosts
        // would otherwise build the input again, unchecked).
        let unpublished = held && report.kind == BuildOutcome::NotCached;
        let report = if unpublished {
            BuildReport {
                kind: BuildOutcome::InfraFailed,
                message: format!(
                    "{checker} built it again and got the same outputs, but {}",
                    report.message
                ),
                ..report
            }
        } else {
            report
        };
        let settled = match report.kind {
            BuildOutcome::Built | BuildOutcome::NotCached => BuildReport {
                // Held: the check's own push put them in the run's cache.
                kind: if held {
                    BuildOutcome::Built
                } else {
                    first.report.kind
                },
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
                        %drv,
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
                            drv: drv.clone(),
                            message,
                            retry: n,
                        },
                    );
                    return Ok(());
                }
                BuildReport {
                    message: if unpublished {
                        format!("built on {by}; {}", report.message)
                    } else {
                        format!(
                            "built on {by}, but it could not be checked on {checker}: {}",
                            report.message
                        )
                    },
                    agent: checker.clone(),
                    ..report
                }
            }
            BuildOutcome::NotReproducible => BuildReport {
                message: format!(
                    "{by} and {checker} built different outputs: the build is not reproducible, or one of them did not build what the derivation says ({})",
                    report.message
                ),
                agent: checker.clone(),
                ..report
            },
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

    /// A check back in the queue (its attempt lost or broken): its wait for an agent
    /// starts again.
    pub(super) fn requeue_check(run: &mut RunMem, node: NodeId, now: i64) {
        if let Some(c) = run.checks.get_mut(&node) {
            c.queued_ms = now;
            run.check_queue.push_front(node);
        }
    }

    /// Tells the farm cache to stop serving a build's outputs: no check vouched for them.
    fn withdraw(&self, run: &RunMem, node: NodeId) {
        let outputs: Vec<String> = run
            .outputs_of
            .get(node as usize)
            .map(|o| {
                o.values()
                    .filter_map(|p| p.known())
                    .map(ToString::to_string)
                    .collect()
            })
            .unwrap_or_default();
        if let Some(f) = self.failed_check.get() {
            f(&outputs);
        }
    }

    /// Ends a check one way or the other: forgotten, and the build's outcome applied. What
    /// did not pass its check is no longer served by the farm cache.
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
        if !report.kind.produced_outputs() {
            self.withdraw(run, node);
        }
        inner.db.drop_build_check(run_id, &c.drv)?;
        self.finish_build(inner, run_id, node, agent, report, false)
    }

    /// A run that ended before its checks did (cancelled, failed): what they were to vouch
    /// for is withdrawn, and they are forgotten.
    pub(super) fn drop_checks(&self, inner: &mut Inner, run_id: &str) -> Result<(), EngineError> {
        let Inner { runs, db, .. } = inner;
        let Some(run) = runs.iter_mut().find(|r| r.id == run_id) else {
            return Ok(());
        };
        run.check_queue.clear();
        let pending: Vec<NodeId> = run.checks.keys().copied().collect();
        for n in pending {
            self.withdraw(run, n);
            if let Some(c) = run.checks.remove(&n) {
                db.drop_build_check(run_id, &c.drv)?;
            }
        }
        Ok(())
    }

    /// Cross-checks still waiting for an agent, after the coordinator restarted with the
    /// option turned off (and the run did not ask for them): the builds count as they
    /// would without it.
    pub(super) fn settle_checks_unchecked(&self, inner: &mut Inner) -> Result<(), EngineError> {
        if self.opts.cross_check_builds {
            return Ok(());
        }
        let pending: Vec<(String, NodeId, PendingCheck)> = inner
            .runs
            .iter()
            .filter(|r| !r.spec.cross_check_builds)
            .flat_map(|r| r.checks.iter().map(|(n, c)| (r.id.clone(), *n, c.clone())))
            .collect();
        for (run_id, node, mut c) in pending {
            // Held out of the run's cache for a check: with none to come, never pushed there.
            if c.hold.held() && c.report.kind.produced_outputs() {
                c.report.kind = BuildOutcome::NotCached;
                c.report.message = "built, but held back from the run's cache for a cross-check that no longer runs (cross_check_builds was turned off): it gets there only in the closure of something built on it where it is held".into();
            }
            self.settle_check(inner, &run_id, node, &c.built_by, c.report)?;
        }
        Ok(())
    }

    /// Cross-checks nobody could take within the wait (no connected agent other than the
    /// first one's holder, able to take it): a build's check fails it (infrastructure,
    /// saying why); an evaluation answer nobody else gave fails the run. While such an
    /// agent is connected, if busy, the wait starts again: the check waits its turn.
    pub(super) fn expire_cross_checks(&self, inner: &mut Inner, now: i64) {
        let wait = self.opts.cross_check_wait_ms;
        let secs = wait / 1000;
        let (agents, way) = (&inner.agents, inner.hold_way);
        // One look at the agents per first agent and kind of job, not per job.
        let mut seen = HashMap::new();
        let mut taker = |first, cache, class, hold| {
            taker(&mut seen, agents, (first, cache), class, (hold, way))
        };
        let (mut builds, mut evals) = (Vec::new(), Vec::new());
        let (mut fresh_builds, mut fresh_evals) = (Vec::new(), Vec::new());
        for (i, run) in inner.runs.iter().enumerate() {
            if run.state.is_terminal() {
                continue;
            }
            for n in &run.check_queue {
                let Some(c) = run.checks.get(n) else { continue };
                let class = run.sched.as_ref().map(|s| s.class(*n));
                if taker(&c.built_by, &run.spec.cache, class, c.hold) {
                    fresh_builds.push((i, *n));
                } else if now - c.queued_ms >= wait {
                    builds.push((run.id.clone(), *n, c.built_by.clone()));
                }
            }
            for t in &run.eval_queue {
                let task = super::opinions::task_no(*t);
                let (Some(since), Some(first)) =
                    (run.opinion_since.get(&task), run.opinions.get(&task))
                else {
                    continue;
                };
                if taker(&first.agent, &run.spec.cache, None, Hold::No) {
                    fresh_evals.push((i, task));
                } else if now - since >= wait {
                    evals.push((run.id.clone(), (task, first.agent.clone())));
                    break;
                }
            }
        }
        for (i, n) in fresh_builds {
            if let Some(c) = inner.runs[i].checks.get_mut(&n) {
                c.queued_ms = now;
            }
        }
        for (i, task) in fresh_evals {
            inner.runs[i].opinion_since.insert(task, now);
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

/// Whether some connected agent other than `agent` (and independent of it) could check its
/// work: if not, the coordinator's log says what the run waits for.
pub(super) fn checker_connected(
    agents: &BTreeMap<String, AgentMem>,
    (agent, cache): (&str, &str),
    hold: Hold,
    way: Hold,
) -> bool {
    agents.iter().any(|(n, a)| {
        a.tx.is_some()
            && super::independent(agents, agent, n)
            && super::may_take(a, hold, way)
            && super::dispatch::agent_reaches(a, cache, way)
    })
}

/// Whether a connected agent that takes work could take a cross-check of `first`'s work
/// (of a derivation of `class`, its outputs held as `hold` while agents hand them over
/// `way`; class None: an evaluation), remembered in `seen`.
fn taker<'a>(
    seen: &mut HashMap<(&'a str, Option<&'a crate::scheduler::Class>, Hold, &'a str), bool>,
    agents: &BTreeMap<String, AgentMem>,
    (first, cache): (&'a str, &'a str),
    class: Option<&'a crate::scheduler::Class>,
    (hold, way): (Hold, Hold),
) -> bool {
    *seen.entry((first, class, hold, cache)).or_insert_with(|| {
        agents.iter().any(|(n, a)| {
            a.tx.is_some()
                && !a.draining
                && super::independent(agents, first, n)
                && class.is_none_or(|c| a.caps.can_build(c))
                && super::may_take(a, hold, way)
                && super::dispatch::agent_reaches(a, cache, way)
        })
    })
}

/// The outputs of a build held in its store ([`Hold::BuilderStore`]) that lack a NAR hash
/// (all of them when it named none): such a build cannot be checked.
pub(super) fn unhashed(report: &BuildReport) -> Vec<&str> {
    if report.outputs.is_empty() {
        return vec!["(none named)"];
    }
    report
        .outputs
        .keys()
        .filter(|name| !report.nar_hashes.contains_key(*name))
        .map(String::as_str)
        .collect()
}

/// How a check's answer falls short of the first build's, compared by NAR hash.
enum Differ {
    /// Another hash for an output: the two builds differ.
    Hashes(String),
    /// Not the same outputs named, or a hash missing: the answer proves nothing.
    Unsaid(String),
}

/// Whether a check's outputs are the first build's, output by output, by NAR hash.
fn compare_hashes(first: &BuildReport, check: &BuildReport) -> Result<(), Differ> {
    if first.outputs != check.outputs {
        return Err(Differ::Unsaid(
            "it reported other outputs than the build".into(),
        ));
    }
    for (name, path) in &first.outputs {
        let (Some(a), Some(b)) = (first.nar_hashes.get(name), check.nar_hashes.get(name)) else {
            return Err(Differ::Unsaid(format!(
                "no NAR hash of output {name} to compare"
            )));
        };
        if a != b {
            return Err(Differ::Hashes(format!(
                "{path}: NAR hash {a} on the first build, {b} on the check"
            )));
        }
    }
    Ok(())
}
