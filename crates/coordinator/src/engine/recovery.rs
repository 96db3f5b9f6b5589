//! Resuming from the state store: unfinished runs, their graphs and the attempts that were running.

use super::*;

impl Engine {
    pub(super) fn recover(&self) -> Result<(), EngineError> {
        let mut g = self.lock();
        let inner = &mut *g;
        // Attempts that were running when the coordinator stopped: their agents will
        // reconnect and either claim them (reattach) or they are requeued below.
        let running = inner.db.running_attempts()?;
        let mut owed = inner.db.repo_owed()?;
        for row in inner.db.runs()? {
            let state = row.state;
            if state.is_terminal() {
                continue;
            }
            let spec: RunSpec = match serde_json::from_str(&row.spec) {
                Ok(s) => s,
                Err(e) => {
                    // Failed as any run fails: stored, its event sent (watchers end), owed
                    // checks settled.
                    self.fail_run(inner, &row.id, &format!("unreadable run spec: {e}"))?;
                    continue;
                }
            };
            let mut run = RunMem::new(row.id.clone(), spec, state, row.created_ms);
            // Repository checks the listing agents still owe: each sends them again when it
            // dials back in; if it does not within its lease, the run says so and goes on.
            run.repo_owed = owed.remove(&row.id).unwrap_or_default();
            match self.restore_run(inner, &mut run, row.eval_tasks_total) {
                Ok(()) => inner.runs.push(run),
                // What an older coordinator stored that this one reads stricter (a store
                // path), or damage: that run fails, the farm goes on.
                Err(EngineError::State(e)) if e.is_unreadable() => {
                    tracing::warn!(run = row.id, "cannot read the run's stored state: {e}");
                    let why = format!(
                        "unreadable stored state (an older coordinator's, or damaged): {e}"
                    );
                    self.fail_run(inner, &row.id, &why)?;
                }
                Err(e) => return Err(e),
            }
        }
        // Owed to runs that ended meanwhile (failed, cancelled): nothing waits for them.
        for run_id in owed.into_keys() {
            inner.db.repo_checks_settled(&run_id, None)?;
        }
        self.reattach_running(inner, running)?;
        self.atomically(inner, |inner| self.settle_checks_unchecked(inner))?;
        drop(g);
        self.check_all_runs();
        Ok(())
    }

    /// A run's evaluation tasks, second opinions, graph and pending checks, from the store.
    fn restore_run(
        &self,
        inner: &mut Inner,
        run: &mut RunMem,
        eval_tasks_total: i64,
    ) -> Result<(), EngineError> {
        {
            let row_id = run.id.clone();
            let tasks = inner.db.eval_tasks(&row_id)?;
            if eval_tasks_total < 0 {
                run.eval_queue.push_back(EvalTask::List);
            } else {
                run.eval_tasks_total = Some(eval_tasks_total as usize);
                for (task, attrs, done) in &tasks {
                    run.chunk_attrs.insert(*task, attrs.clone());
                    if *done {
                        run.eval_tasks_done.insert(*task);
                    } else {
                        run.eval_queue.push_back(EvalTask::Chunk(*task));
                    }
                }
            }
            let now = self.clock.now_ms();
            for o in inner.db.eval_opinions(&row_id)? {
                // The wait for a second answer starts again with this process.
                run.opinion_since.insert(o.task, now);
                run.opinions.insert(o.task, o);
            }
            // A run still evaluating may have built part of its graph already.
            Self::build_scheduler(inner.db.as_mut(), run, &inner.build_times)?;
            // Builds awaiting their check: still running (nothing builds on them yet), the
            // check queued again (or reattached below, if an agent was on it).
            for mut c in inner.db.build_checks(&row_id)? {
                let Some(&n) = run.node_of.get(&c.drv) else {
                    continue;
                };
                if let Some(s) = run.sched.as_mut() {
                    s.mark_running(n);
                }
                c.queued_ms = now;
                run.checks.insert(n, c);
                run.check_queue.push_back(n);
            }
        }
        Ok(())
    }

    /// Attempts that were running when the coordinator stopped: reattached when their run
    /// is back, else lost.
    fn reattach_running(
        &self,
        inner: &mut Inner,
        running: Vec<AttemptRow>,
    ) -> Result<(), EngineError> {
        for a in running {
            let Some(run) = inner.runs.iter_mut().find(|r| r.id == a.run_id) else {
                inner.db.finish_attempt(
                    &a.id,
                    AttemptState::Lost,
                    "coordinator restarted; run finished",
                    self.clock.now_ms(),
                )?;
                continue;
            };
            let job = match a.kind {
                AttemptKind::Build => match run.node_of.get(a.target.as_str()) {
                    Some(&n) => {
                        if let Some(s) = run.sched.as_mut() {
                            s.mark_running(n);
                        }
                        JobRef::Build(n)
                    }
                    None => continue,
                },
                AttemptKind::Check => match run.node_of.get(a.target.as_str()) {
                    Some(&n) if run.checks.contains_key(&n) => {
                        run.check_queue.retain(|q| *q != n);
                        JobRef::Check(n)
                    }
                    _ => continue,
                },
                AttemptKind::EvalList => {
                    run.eval_queue.retain(|t| *t != EvalTask::List);
                    JobRef::Eval(EvalTask::List)
                }
                AttemptKind::EvalChunk => {
                    let task = a.target.parse().unwrap_or(-1);
                    run.eval_queue.retain(|t| *t != EvalTask::Chunk(task));
                    JobRef::Eval(EvalTask::Chunk(task))
                }
            };
            // A fixed-output build held a fetch slot (dispatch gives one when it can): it
            // does again, so the agent's build slots are not counted full of fetches.
            let fetch = match job {
                JobRef::Build(n) => run.sched.as_ref().is_some_and(|s| s.class(n).fetch),
                JobRef::Eval(_) | JobRef::Check(_) => false,
            };
            // Held for the agent; requeued by the lease check if it does not come back.
            inner.attempts.insert(
                a.id.clone(),
                AttemptMem {
                    run_id: a.run_id.clone(),
                    job,
                    agent: a.agent.clone(),
                    fetch,
                    hold: None,
                },
            );
        }
        let now = self.clock.now_ms();
        for (reg, _) in inner.db.agents()? {
            {
                let name = reg.name.clone();
                let mut running = slots::Running::default();
                for (id, a) in inner.attempts.iter().filter(|(_, a)| a.agent == name) {
                    running.insert(id.clone(), a.slot());
                }
                let caps = Capabilities {
                    systems: reg.systems.clone(),
                    features: reg.features.clone(),
                    fetches_only: false,
                    builds_only: false,
                };
                // Disconnected until it dials in; its lease starts now.
                inner.agents.insert(
                    name,
                    AgentMem {
                        reg,
                        caps,
                        conn: 0,
                        tx: None,
                        running,
                        unseen: HashMap::new(),
                        last_seen_ms: now,
                        draining: false,
                        paused: String::new(),
                        session: String::new(),
                        violations: 0,
                    },
                );
            }
        }
        Ok(())
    }

    pub(super) fn build_scheduler(
        db: &mut dyn StateStore,
        run: &mut RunMem,
        times: &HashMap<String, u64>,
    ) -> Result<(), EngineError> {
        let rows = db.drvs(&run.id)?;
        let complete = run.eval_complete();
        if rows.is_empty() && !complete {
            return Ok(());
        }
        // The packages' limits first: a declared timeout weighs a derivation never built here.
        for (_, p) in db.packages(&run.id)? {
            run.note_package(&p);
        }
        let mut sched = Scheduler::new();
        let mut nodes: Vec<DrvNode> = Vec::with_capacity(rows.len());
        for row in &rows {
            let node = row.node.clone();
            run.add_drv(&mut sched, &row.drv_path, &node, times);
            nodes.push(node);
        }
        for (i, node) in nodes.iter().enumerate() {
            for input in &node.input_drvs {
                if let Some(&j) = run.node_of.get(input) {
                    sched.add_edge(i as NodeId, j);
                }
            }
        }
        for (i, row) in rows.iter().enumerate() {
            let state = match row.state {
                DrvState::Built => NodeState::Built,
                DrvState::Failed => NodeState::Failed,
                DrvState::DependencyFailed => NodeState::DependencyFailed,
                DrvState::Cancelled => NodeState::Cancelled,
                DrvState::Waiting => continue,
            };
            let root = row
                .result
                .as_ref()
                .and_then(|r| r.failed_root.as_ref())
                .and_then(|f| run.node_of.get(f.as_str()).copied());
            sched.restore(i as NodeId, state, root);
            if state == NodeState::Built {
                run.done_builds += 1;
            }
        }
        sched.start();
        run.sched = Some(sched);
        if complete && (run.state == RunState::Evaluating || run.state == RunState::Queued) {
            run.state = RunState::Building;
            db.set_run_state(&run.id, RunState::Building, "", 0)?;
        }
        Ok(())
    }
}

impl RunMem {
    /// What an attempt at `job` works on, as the database keeps it (and recovery above reads
    /// it back): the derivation's path, `list`, or an evaluation task's number.
    pub(super) fn target_text(&self, job: &JobRef) -> String {
        match job {
            JobRef::Eval(EvalTask::List) => "list".into(),
            JobRef::Eval(EvalTask::Chunk(n)) => n.to_string(),
            JobRef::Build(n) | JobRef::Check(n) => self
                .drv_of
                .get(*n as usize)
                .map(ToString::to_string)
                .unwrap_or_default(),
        }
    }
}
