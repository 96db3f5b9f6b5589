//! Agents over time: leases that run out (their jobs requeued), attempts their heartbeats
//! leave out, and agents gone long enough to be forgotten.

use super::*;

impl Engine {
    /// Forgets agents disconnected, with nothing running, for longer than the retention
    /// (`agent_retention_ms`): their registration, row and upload claims. Returns their
    /// names, and those forgotten since the last call to make room for new ones, for the
    /// caller to withdraw their farm cache tokens. Call periodically.
    pub fn forget_idle_agents(&self) -> Vec<String> {
        let mut g = self.lock();
        let inner = &mut *g;
        let now = self.clock.now_ms();
        let idle: Vec<String> = inner
            .agents
            .iter()
            .filter(|(_, a)| {
                a.tx.is_none()
                    && a.running.is_empty()
                    && now - a.last_seen_ms > self.opts.agent_retention_ms
            })
            .map(|(n, _)| n.clone())
            .collect();
        self.forget(inner, &idle);
        let mut gone = std::mem::take(&mut inner.forgotten);
        gone.extend(idle);
        gone
    }

    pub(super) fn forget(&self, inner: &mut Inner, names: &[String]) {
        for name in names {
            inner.agents.remove(name);
            if let Err(e) = inner.db.forget_agent(name) {
                tracing::error!(agent = %name, "cannot forget the agent in the database: {e}");
            }
            tracing::info!(agent = %name, "agent forgotten (gone, with nothing running)");
        }
    }

    /// Requeues the jobs of agents silent for longer than the lease; call periodically.
    pub fn check_leases(&self) {
        let mut g = self.lock();
        let inner = &mut *g;
        // What a lease's end leads to lands together (a check given up with its build's
        // outcome, say).
        let r = self.atomically(inner, |inner| {
            self.expire_leases(inner);
            Ok(())
        });
        if let Err(e) = r {
            tracing::error!("cannot store what expired leases led to: {e}");
        }
        self.dispatch(inner);
        Self::forget_ended(inner);
    }

    /// Ended runs leave memory once no attempt of theirs is out: what is asked of them is
    /// read from the store, as after a restart, so a long-lived coordinator holds only the
    /// graphs of the runs going on.
    pub(super) fn forget_ended(inner: &mut Inner) {
        let attempts = &inner.attempts;
        inner
            .runs
            .retain(|r| !r.state.is_terminal() || attempts.values().any(|a| a.run_id == r.id));
    }

    fn expire_leases(&self, inner: &mut Inner) {
        let now = self.clock.now_ms();
        // Repository checks an agent owes and will not deliver (it went silent, or kept them
        // past the wait): said so, and the run goes on.
        let mut lapsed: Vec<(String, String, String)> = Vec::new();
        for r in &inner.runs {
            for crate::model::OwedChecks {
                attempt,
                agent,
                until_ms: until,
            } in &r.repo_owed
            {
                let gone = inner
                    .agents
                    .get(agent)
                    .is_none_or(|a| now - a.last_seen_ms > self.opts.lease_ms);
                let why = if gone {
                    format!(
                        "agent {agent} stopped responding before it reported the flake's other outputs"
                    )
                } else if now >= *until {
                    format!(
                        "agent {agent} did not report the flake's other outputs within {} s",
                        super::REPO_CHECKS_WAIT_MS / 1000
                    )
                } else {
                    continue;
                };
                lapsed.push((r.id.clone(), attempt.clone(), why));
            }
        }
        for (run_id, attempt, why) in lapsed {
            if let Err(e) = self.settle_owed(inner, &run_id, &attempt, why) {
                tracing::error!(run = run_id, "cannot close the repository checks: {e}");
            }
        }
        let expired: Vec<String> = inner
            .agents
            .iter()
            .filter(|(_, a)| !a.running.is_empty() && now - a.last_seen_ms > self.opts.lease_ms)
            .map(|(n, _)| n.clone())
            .collect();
        for name in expired {
            let ids: Vec<String> = inner
                .agents
                .get(&name)
                .map(|a| a.running.iter().cloned().collect())
                .unwrap_or_default();
            tracing::warn!(
                agent = name,
                jobs = ids.len(),
                "agent lease expired; requeueing its jobs"
            );
            for id in ids {
                if let Err(e) = self.lose_attempt(inner, &id, "the agent stopped responding") {
                    tracing::error!("cannot requeue {id}: {e}");
                }
            }
            if let Some(a) = inner.agents.get_mut(&name) {
                a.tx = None;
            }
        }
        self.expire_cross_checks(inner, now);
    }

    /// The attempts `agent` holds that its heartbeats (this one says it runs `running`) have
    /// left out for longer than a lease: it dropped them (a job's task ended without a
    /// result), and they would otherwise stay held for as long as it keeps beating. One
    /// heartbeat that leaves an attempt out is not enough (an assignment still on its way,
    /// a result just behind the heartbeat).
    pub(super) fn unseen_attempts(
        &self,
        inner: &mut Inner,
        agent: &str,
        running: &[String],
        now: i64,
    ) -> Vec<String> {
        let Some(a) = inner.agents.get_mut(agent) else {
            return Vec::new();
        };
        let said: std::collections::HashSet<&str> = running.iter().map(String::as_str).collect();
        let held: std::collections::HashSet<&String> = a.running.iter().collect();
        a.unseen
            .retain(|id, _| held.contains(id) && !said.contains(id.as_str()));
        let mut lost = Vec::new();
        for id in held {
            if said.contains(id.as_str()) {
                continue;
            }
            let since = *a.unseen.entry(id.clone()).or_insert(now);
            if now - since > self.opts.lease_ms {
                lost.push(id.clone());
            }
        }
        lost
    }

    /// Puts an attempt's job back in the queue; its late result will be ignored. The
    /// attempt's loss lands with what it leads to (the build given up).
    pub(super) fn lose_attempt(
        &self,
        inner: &mut Inner,
        attempt: &str,
        why: &str,
    ) -> Result<(), EngineError> {
        self.atomically(inner, |inner| self.lose_attempt_now(inner, attempt, why))
    }

    pub(super) fn lose_attempt_now(
        &self,
        inner: &mut Inner,
        attempt: &str,
        why: &str,
    ) -> Result<(), EngineError> {
        let Some(a) = inner.attempts.remove(attempt) else {
            return Ok(());
        };
        if let Some(ag) = inner.agents.get_mut(&a.agent) {
            ag.running.remove(attempt);
        }
        inner
            .db
            .finish_attempt(attempt, AttemptState::Lost, why, self.clock.now_ms())?;
        let Some(run) = inner.runs.iter_mut().find(|r| r.id == a.run_id) else {
            return Ok(());
        };
        if run.state.is_terminal() {
            return Ok(());
        }
        // Counted apart from failures, and capped: a job that keeps taking its agent down
        // (or whose agents keep being cut off) is given up, not requeued for ever.
        let lost = inner
            .db
            .lost_attempts(&a.run_id, &run.target_text(&a.job))?;
        if lost > self.opts.max_infra_retries {
            let msg =
                format!("given up after {lost} attempts lost with their agents (last: {why})");
            return match a.job {
                JobRef::Eval(_) => self.fail_run(inner, &a.run_id, &format!("evaluation {msg}")),
                JobRef::Build(_) | JobRef::Check(_) => {
                    let report = BuildReport {
                        kind: BuildOutcome::InfraFailed,
                        message: msg,
                        agent: a.agent.clone(),
                        ..Default::default()
                    };
                    self.on_build(inner, a, report, false)
                }
            };
        }
        let Some(run) = inner.runs.iter_mut().find(|r| r.id == a.run_id) else {
            return Ok(());
        };
        match a.job {
            JobRef::Eval(t) => run.requeue_eval(t, self.clock.now_ms(), true),
            JobRef::Build(n) => {
                if let Some(s) = run.sched.as_mut() {
                    s.requeue(n);
                }
            }
            JobRef::Check(n) => Self::requeue_check(run, n, self.clock.now_ms()),
        }
        Ok(())
    }
}
