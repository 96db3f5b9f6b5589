//! Agents: registration (and who may use a name), messages, and results bound to the attempt and agent that hold them (leases: `leases.rs`).

use super::*;

impl Engine {
    /// Registers (or re-registers) an agent. Attempts it still runs are kept; any other
    /// attempt the coordinator thought it had is requeued. A name whose stream is still open
    /// is refused, unless the registration presents that stream's session key (the same
    /// agent reconnecting before the coordinator noticed the old stream die). Returns the
    /// connection number and the new session key.
    pub fn connect_agent(
        &self,
        reg: Registration,
        tx: mpsc::UnboundedSender<ToAgent>,
    ) -> Result<(u64, String), EngineError> {
        if reg.name.trim().is_empty() {
            return Err(EngineError::Invalid("agent name is empty".into()));
        }
        if reg.max_jobs == 0 {
            return Err(EngineError::Invalid("max_jobs must be at least 1".into()));
        }
        if reg.systems.is_empty() {
            return Err(EngineError::Invalid(
                "an agent must offer at least one system".into(),
            ));
        }
        let mut g = self.lock();
        let inner = &mut *g;
        // Under the lock: a revocation read before this is refused here, one read after
        // cuts this agent off when it is applied.
        if let Some(why) = self
            .refusal(&reg.credential, reg.admitted_at)
            .or_else(|| self.name_refusal(&reg))
        {
            return Err(EngineError::Denied(why.into()));
        }
        let now = self.clock.now_ms();
        if let Some(old) = inner.agents.get(&reg.name)
            && old.tx.as_ref().is_some_and(|t| !t.is_closed())
            && !(old.session.len() == reg.session_key.len()
                && constant_time_eq(old.session.as_bytes(), reg.session_key.as_bytes()))
        {
            tracing::warn!(
                agent = reg.name,
                "refused a registration under the name of a connected agent"
            );
            return Err(EngineError::Conflict(format!(
                "an agent named '{}' is already connected; give this agent another name (--name), or stop the other one",
                reg.name
            )));
        }
        if !inner.agents.contains_key(&reg.name) && inner.agents.len() >= self.opts.max_agents {
            // Room made by forgetting the agent gone longest (disconnected, nothing running).
            let oldest = inner
                .agents
                .iter()
                .filter(|(_, a)| a.tx.is_none() && a.running.is_empty())
                .min_by_key(|(_, a)| a.last_seen_ms)
                .map(|(n, _)| n.clone());
            let Some(oldest) = oldest else {
                return Err(EngineError::Full(format!(
                    "this coordinator remembers {} agents, all connected or busy: no new agent name is taken until one goes",
                    self.opts.max_agents
                )));
            };
            self.forget(inner, std::slice::from_ref(&oldest));
            inner.forgotten.push(oldest);
        }
        let conn = inner.next_conn;
        inner.next_conn += 1;
        let session = secret_key();
        let violations = inner.agents.get(&reg.name).map_or(0, |a| a.violations);
        inner.db.upsert_agent(&reg, now)?;
        let claimed: HashSet<String> = reg.running_attempts.iter().cloned().collect();
        let previous: Vec<String> = inner
            .attempts
            .iter()
            .filter(|(_, a)| a.agent == reg.name)
            .map(|(id, _)| id.clone())
            .collect();
        if reg.running_attempts.is_empty() {
            // Nothing running there: no upload of its is in flight, so its claims lapse now.
            inner.db.release_all_upload_claims(&reg.name)?;
        }
        let mut running = slots::Running::default();
        for id in previous {
            if claimed.contains(&id) {
                if let Some(slot) = inner.attempts.get(&id).map(AttemptMem::slot) {
                    running.insert(id, slot);
                }
            } else {
                self.lose_attempt(inner, &id, "the agent reconnected without it")?;
            }
        }
        let caps = Capabilities {
            systems: reg.systems.clone(),
            features: reg.features.clone(),
            fetches_only: false,
            builds_only: false,
        };
        tracing::info!(agent = reg.name, systems = ?reg.systems, max_jobs = reg.max_jobs, reattached = running.len(), "agent connected");
        inner.agents.insert(
            reg.name.clone(),
            AgentMem {
                reg,
                caps,
                conn,
                tx: Some(tx),
                running,
                unseen: HashMap::new(),
                last_seen_ms: now,
                draining: false,
                paused: String::new(),
                session: session.clone(),
                violations,
            },
        );
        self.dispatch(inner);
        Ok((conn, session))
    }

    /// Counts and logs a message an agent had no right to send; it changes nothing else.
    pub(super) fn violation(&self, inner: &mut Inner, agent: &str, what: &str) {
        tracing::warn!(agent, "protocol violation, refused: {what}");
        if let Some(a) = inner.agents.get_mut(agent) {
            a.violations += 1;
        }
    }

    /// The agent's stream ended. Its jobs stay with it for the lease period, so a quick
    /// reconnect reattaches to them.
    pub fn disconnect_agent(&self, name: &str, conn: u64) {
        let mut g = self.lock();
        if let Some(a) = g.agents.get_mut(name)
            && a.conn == conn
        {
            a.tx = None;
            tracing::info!(agent = name, "agent disconnected");
        }
    }

    /// Handles one message from a registered agent's stream `conn`; a stream that another
    /// registration of the same agent replaced is no longer heard.
    pub fn agent_message(&self, name: &str, conn: u64, msg: FromAgent) -> Result<(), EngineError> {
        let mut g = self.lock();
        let inner = &mut *g;
        let now = self.clock.now_ms();
        match inner.agents.get_mut(name) {
            Some(a) if a.conn == conn => a.last_seen_ms = now,
            _ => {
                tracing::debug!(agent = name, "ignoring a message from a replaced stream");
                return Ok(());
            }
        }
        // Heartbeats and log chunks (most messages) store nothing: no transaction.
        let msg = match msg {
            FromAgent::Heartbeat {
                running,
                draining,
                paused,
            } => {
                for id in self.unseen_attempts(inner, name, &running, now) {
                    let why = format!(
                        "agent {name} no longer ran it (its heartbeats left it out for over {} s)",
                        self.opts.lease_ms / 1000
                    );
                    if let Err(e) = self.lose_attempt(inner, &id, &why) {
                        tracing::error!("cannot requeue {id}: {e}");
                    }
                }
                if let Some(a) = inner.agents.get_mut(name) {
                    if draining && !a.draining {
                        tracing::info!(agent = name, "agent draining: no new jobs for it");
                        a.draining = true;
                    }
                    if paused != a.paused {
                        if paused.is_empty() {
                            tracing::info!(agent = name, "agent takes jobs again");
                        } else {
                            tracing::warn!(agent = name, "agent paused: {paused}");
                        }
                        a.paused = paused;
                    }
                }
                None
            }
            FromAgent::Log { .. } => None,
            other => Some(other),
        };
        // One step: an attempt's end lands with its outcome, or neither does.
        self.atomically(inner, |inner| {
            match msg {
                None | Some(FromAgent::Heartbeat { .. }) | Some(FromAgent::Log { .. }) => {}
                Some(FromAgent::EvalList {
                    attempt,
                    result,
                    follows,
                    evaluated,
                }) => {
                    if let Some(a) =
                        self.take_attempt(inner, name, &attempt, Answer::List, failed(&result))?
                    {
                        if follows
                            && result.is_ok()
                            && let Some(run) = inner.runs.iter_mut().find(|r| r.id == a.run_id)
                        {
                            let until = self.clock.now_ms() + super::REPO_CHECKS_WAIT_MS;
                            // Owed by this listing alone; cross-checked, also by the other
                            // agents that listed (each one's checks count), but not by this
                            // agent's earlier listing.
                            let cross_checked = self.opts.cross_check_eval;
                            let earlier: Vec<String> = run
                                .repo_owed
                                .iter()
                                .filter(|o| !cross_checked || o.agent == name)
                                .map(|o| o.attempt.clone())
                                .collect();
                            run.repo_owed.retain(|o| !earlier.contains(&o.attempt));
                            run.repo_owed.push(crate::model::OwedChecks {
                                attempt: attempt.clone(),
                                agent: name.to_string(),
                                until_ms: until,
                            });
                            for e in &earlier {
                                inner.db.repo_checks_settled(&a.run_id, Some(e))?;
                            }
                            inner.db.owe_repo_checks(&a.run_id, &attempt, name, until)?;
                        }
                        self.on_eval_list(inner, a, result, evaluated)?;
                    }
                }
                Some(FromAgent::RepoChecks { attempt, checks }) => {
                    // Only an agent that listed, for that listing, once.
                    let mine =
                        |o: &crate::model::OwedChecks| o.attempt == attempt && o.agent == name;
                    if let Some(run) = inner.runs.iter_mut().find(|r| r.repo_owed.iter().any(mine))
                    {
                        run.repo_owed.retain(|o| !mine(o));
                        let id = run.id.clone();
                        inner
                            .db
                            .record_repo_checks(&id, &checks, self.opts.cross_check_eval)?;
                        inner.db.repo_checks_settled(&id, Some(&attempt))?;
                        self.maybe_finish(inner, &id)?;
                    }
                }
                Some(FromAgent::EvalChunk { attempt, result }) => {
                    if let Some(a) =
                        self.take_attempt(inner, name, &attempt, Answer::Chunk, failed(&result))?
                    {
                        self.on_eval_chunk(inner, a, result)?;
                    }
                }
                Some(FromAgent::Build {
                    attempt,
                    mut report,
                }) => {
                    report.agent = name.to_string();
                    let answer = Answer::Build {
                        infra_failed: report.kind == BuildOutcome::InfraFailed,
                    };
                    if let Some(a) = self.take_attempt(
                        inner,
                        name,
                        &attempt,
                        answer,
                        Some(report.kind.as_str()),
                    )? {
                        self.check_outputs(inner, &a, &mut report);
                        Self::check_mismatch(inner, &a, &mut report);
                        self.on_build(inner, a, report, true)?;
                    }
                }
            }
            Ok(())
        })?;
        self.dispatch(inner);
        Ok(())
    }

    /// Completes an attempt exactly once, and only for the agent that holds it: a duplicate
    /// or late result returns None, and so does a result for another agent's attempt (a
    /// protocol violation, counted against the sender). An answer of another kind than the
    /// attempt's job (a listing for a build, say) is no answer to it: the job is put back in
    /// the queue, and the sender counted a violation (unless it said, as a failed build, that
    /// it could not run the job at all: an agent older than the job's kind).
    pub(super) fn take_attempt(
        &self,
        inner: &mut Inner,
        agent: &str,
        attempt: &str,
        answer: Answer,
        outcome: Option<&str>,
    ) -> Result<Option<AttemptMem>, EngineError> {
        match inner.attempts.get(attempt) {
            None => {
                tracing::debug!(agent, "ignoring a result for an attempt nobody holds");
                return Ok(None);
            }
            Some(a) if a.agent != agent => {
                let holder = a.agent.clone();
                self.violation(
                    inner,
                    agent,
                    &format!(
                        "result for attempt {} which agent {holder} holds",
                        nixfarm_core::limits::clip(attempt, 64)
                    ),
                );
                return Ok(None);
            }
            Some(a) if !answer.fits(&a.job) => {
                let job = a.job.clone();
                if answer != (Answer::Build { infra_failed: true }) {
                    self.violation(
                        inner,
                        agent,
                        &format!(
                            "{answer:?} answer to attempt {}, a {job:?} job",
                            nixfarm_core::limits::clip(attempt, 64)
                        ),
                    );
                }
                self.lose_attempt_now(inner, attempt, "answered as another kind of job")?;
                return Ok(None);
            }
            Some(_) => {}
        }
        let ok = inner.db.finish_attempt(
            attempt,
            AttemptState::Done,
            outcome.unwrap_or("ok"),
            self.clock.now_ms(),
        )?;
        let mem = inner.attempts.remove(attempt);
        if let Some(a) = inner.agents.get_mut(agent) {
            a.running.remove(attempt);
        }
        if !ok {
            tracing::debug!(attempt, "ignoring duplicate or late result");
            return Ok(None);
        }
        Ok(mem)
    }

    /// A hash mismatch counts only for a fixed-output derivation, naming the hash it declares
    /// as specified and a hash of the same algorithm as got: the hash to fix comes from a
    /// build's log, where a builder can print anything. One that does not fit is kept as a
    /// failed build.
    pub(super) fn check_mismatch(inner: &Inner, a: &AttemptMem, report: &mut BuildReport) {
        use nixfarm_nix::hash::Hash;
        if report.kind != BuildOutcome::HashMismatch {
            return;
        }
        let (JobRef::Build(node) | JobRef::Check(node)) = a.job else {
            return;
        };
        let Some(run) = inner.runs.iter().find(|r| r.id == a.run_id) else {
            return;
        };
        let specified = report.specified.as_ref().map(Sri::hash);
        let got = report.got.as_ref().map(Sri::hash);
        let fits = match (run.fixed_hash.get(&node), &specified, &got) {
            (Some(declared), Some(s), Some(g)) => {
                s.algo == g.algo
                    && (declared.is_empty()
                        || Hash::parse(declared, Some(s.algo)).as_ref() == Some(s))
            }
            _ => false,
        };
        if !fits {
            report.kind = BuildOutcome::BuildFailed;
            report.message = format!(
                "{} (reported as a hash mismatch, which does not fit this derivation's declared hash)",
                nixfarm_core::limits::clip(&report.message, 1024)
            );
            report.specified = None;
            report.got = None;
        }
    }

    /// A successful build may report only the derivation's own outputs (the graph knows
    /// them); anything else is a protocol violation and the build counts as an
    /// infrastructure failure, retried on another agent.
    pub(super) fn check_outputs(
        &self,
        inner: &mut Inner,
        a: &AttemptMem,
        report: &mut BuildReport,
    ) {
        if !report.kind.produced_outputs() {
            return;
        }
        let (JobRef::Build(node) | JobRef::Check(node)) = a.job else {
            return;
        };
        let Some(expected) = inner
            .runs
            .iter()
            .find(|r| r.id == a.run_id)
            .and_then(|r| r.outputs_of.get(node as usize))
        else {
            return;
        };
        let same_names = expected.len() == report.outputs.len()
            && expected.keys().all(|k| report.outputs.contains_key(k));
        let same_paths = expected.iter().all(|(name, path)| {
            *path == OutputPath::Floating || report.outputs.get(name) == Some(path)
        });
        if same_names && same_paths {
            return;
        }
        let drv = inner
            .runs
            .iter()
            .find(|r| r.id == a.run_id)
            .and_then(|r| r.drv_of.get(node as usize))
            .map(ToString::to_string)
            .unwrap_or_default();
        self.violation(
            inner,
            &a.agent,
            &format!("build of {drv} reported outputs that are not the derivation's own"),
        );
        *report = BuildReport {
            kind: BuildOutcome::InfraFailed,
            message: format!(
                "agent {} reported outputs that are not the derivation's own; result refused",
                a.agent
            ),
            agent: a.agent.clone(),
            ..Default::default()
        };
    }
}

/// What an evaluation's attempt is stored as having ended with: None when it succeeded.
fn failed<T>(result: &Result<T, (String, bool)>) -> Option<&str> {
    result.as_ref().err().map(|e| e.0.as_str())
}

/// What kind of answer an agent's result message is, to be matched with the attempt's job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Answer {
    List,
    Chunk,
    Build { infra_failed: bool },
}

impl Answer {
    fn fits(self, job: &JobRef) -> bool {
        matches!(
            (self, job),
            (Answer::List, JobRef::Eval(EvalTask::List))
                | (Answer::Chunk, JobRef::Eval(EvalTask::Chunk(_)))
                | (Answer::Build { .. }, JobRef::Build(_) | JobRef::Check(_))
        )
    }
}
