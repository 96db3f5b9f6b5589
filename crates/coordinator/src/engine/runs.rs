//! A run's life: submitted, cancelled, finished or failed, and agents told when it ends.

use super::*;

impl Engine {
    /// A run's cache and keys, which agents substitute from as root, must be ones the
    /// operator listed (when they listed any).
    fn check_run_cache(&self, spec: &RunSpec) -> Result<(), EngineError> {
        let same = nixfarm_core::cache_url::same_cache;
        let caches = &self.opts.run_caches;
        if !spec.cache.is_empty()
            && !caches.is_empty()
            && !caches.iter().any(|c| same(c, &spec.cache))
        {
            return Err(EngineError::Denied(format!(
                "this farm's runs may use only the caches its operator listed (run_caches): '{}' is not one of them",
                nixfarm_core::limits::clip(&spec.cache, 200)
            )));
        }
        let keys = &self.opts.run_cache_keys;
        // A Cachix cache's keys come from Cachix (its API, which the URL may name), not from
        // the run: only a listed one passes a list of keys.
        if !keys.is_empty()
            && spec.cache.starts_with("cachix://")
            && !caches.iter().any(|c| same(c, &spec.cache))
        {
            return Err(EngineError::Denied(format!(
                "this farm's runs may trust only the keys its operator listed (run_cache_keys), and a Cachix cache's keys come from Cachix: '{}' must be one of run_caches",
                nixfarm_core::limits::clip(&spec.cache, 200)
            )));
        }
        if let Some(k) = spec
            .trusted_public_keys
            .iter()
            .find(|k| !keys.is_empty() && !keys.contains(k))
        {
            return Err(EngineError::Denied(format!(
                "this farm's runs may trust only the keys its operator listed (run_cache_keys): '{}' is not one of them",
                nixfarm_core::limits::clip(k, 120)
            )));
        }
        Ok(())
    }

    /// Accepts a run; evaluation starts as soon as an agent is free.
    pub fn submit(&self, spec: RunSpec) -> Result<String, EngineError> {
        // A flake's packages live below an attribute path; a Nix file's may be its top level.
        if spec.attr_path.trim().is_empty() && spec.entry.file.is_empty() {
            return Err(EngineError::Invalid("the attribute path is empty".into()));
        }
        // Until the run is stored: the sweep then counts it as wanting its snapshot.
        let _snapshots = self.snapshots.hold();
        match &spec.source {
            SourceSpec::Snapshot(d) => {
                if !self.sources_dir.join(format!("{d}.tar")).is_file() {
                    return Err(EngineError::Invalid(format!(
                        "no uploaded source with digest {d}; upload it first"
                    )));
                }
            }
            SourceSpec::FlakeRef(f) => {
                nixfarm_core::flakeref::validate_for_farm(f, self.opts.allow_local_flake_refs)
                    .map_err(|e| EngineError::Invalid(e.to_string()))?;
            }
        }
        self.check_run_cache(&spec)?;
        if let Some(root) = &spec.stage_of {
            self.check_stage(root, &spec)?;
        }
        for (name, reference) in &spec.entry.overrides {
            nixfarm_core::entry::check_override(name, reference, self.opts.allow_local_flake_refs)
                .map_err(|e| EngineError::Invalid(e.0))?;
        }
        let mut g = self.lock();
        let inner = &mut *g;
        let in_flight = inner.runs.iter().filter(|r| !r.state.is_terminal()).count();
        if in_flight >= self.opts.max_runs_in_flight {
            return Err(EngineError::Busy(self.opts.max_runs_in_flight));
        }
        let id = random_id("r");
        // The run, its first event and its evaluation tasks land together, or (the store
        // failing) none of it does and the run is not in memory either.
        let stored = self.atomically(inner, |inner| self.submit_now(inner, &id, &spec));
        if stored.is_err() {
            inner.runs.retain(|r| r.id != id);
        }
        stored?;
        self.dispatch(inner);
        Ok(id)
    }

    /// Stores and starts run `id`: its row, its first event, and for a hash-fixing stage its
    /// evaluation tasks.
    fn submit_now(&self, inner: &mut Inner, id: &str, spec: &RunSpec) -> Result<(), EngineError> {
        let now = self.clock.now_ms();
        let spec_json =
            serde_json::to_string(&spec).map_err(|e| EngineError::Invalid(e.to_string()))?;
        inner.db.insert_run(&RunRow {
            id: id.to_string(),
            state: RunState::Evaluating,
            label: spec.label.clone(),
            spec: spec_json,
            error: String::new(),
            created_ms: now,
            finished_ms: 0,
            eval_tasks_total: -1,
        })?;
        if let Some(root) = &spec.stage_of {
            inner.db.add_stage(root, id)?;
        }
        let mut run = RunMem::new(id.to_string(), spec.clone(), RunState::Evaluating, now);
        if !spec.skip_listing {
            run.eval_queue.push_back(EvalTask::List);
        }
        inner.runs.push(run);
        self.emit(
            inner,
            id,
            Ev::RunStarted {
                label: spec.label.clone(),
                attr_path: spec.attr_path.clone(),
            },
        );
        if spec.skip_listing {
            // Known attributes (a hash-fixing stage): straight to their evaluation.
            let mut seen = HashSet::new();
            let attrs: Vec<String> = spec
                .attrs
                .iter()
                .filter(|a| seen.insert(a.as_str()))
                .cloned()
                .collect();
            self.plan_chunks(inner, id, attrs, None)?;
        }
        Ok(())
    }

    /// Cancels a run: nothing new starts, running builds are told to stop.
    pub fn cancel(&self, run_id: &str) -> Result<bool, EngineError> {
        let mut g = self.lock();
        let inner = &mut *g;
        let Some(idx) = inner.runs.iter().position(|r| r.id == run_id) else {
            return match inner.db.run(run_id)? {
                Some(_) => Ok(false),
                None => Err(EngineError::NotFound(format!("run {run_id}"))),
            };
        };
        if inner.runs[idx].state.is_terminal() {
            return Ok(false);
        }
        // The run's end, its builds' and its event land together.
        self.atomically(inner, |inner| self.cancel_now(inner, idx, run_id))
    }

    fn cancel_now(&self, inner: &mut Inner, idx: usize, run_id: &str) -> Result<bool, EngineError> {
        let now = self.clock.now_ms();
        let run = &mut inner.runs[idx];
        run.eval_queue.clear();
        run.state = RunState::Cancelled;
        run.repo_owed.clear();
        inner.db.repo_checks_settled(run_id, None)?;
        Self::stop_builds(inner, run_id)?;
        self.drop_checks(inner, run_id)?;
        inner
            .db
            .set_run_state(run_id, RunState::Cancelled, "", now)?;
        Self::tell_run_ended(inner, run_id);
        let report = self.report_locked(inner, run_id)?;
        self.emit(
            inner,
            run_id,
            Ev::RunFinished {
                state: RunState::Cancelled,
                summary: report.summary,
            },
        );
        Ok(true)
    }

    /// Stops a run's builds as it ends before they do: those waiting are cancelled, running
    /// ones too (their agents are told to stop), so a result that arrives anyway finds
    /// nothing running and changes nothing.
    fn stop_builds(inner: &mut Inner, run_id: &str) -> Result<(), EngineError> {
        let Some(run) = inner.runs.iter_mut().find(|r| r.id == run_id) else {
            return Ok(());
        };
        if let Some(s) = run.sched.as_mut() {
            let running: Vec<NodeId> = (0..s.len() as NodeId)
                .filter(|&n| s.state(n) == NodeState::Running)
                .collect();
            for &n in &running {
                s.cancel_running(n);
            }
            for n in s.cancel_pending().into_iter().chain(running) {
                inner.db.set_drv_state(
                    run_id,
                    &run.drv_of[n as usize],
                    DrvState::Cancelled,
                    None,
                )?;
            }
        }
        let running: Vec<(String, String)> = inner
            .attempts
            .iter()
            .filter(|(_, a)| a.run_id == run_id)
            .map(|(id, a)| (id.clone(), a.agent.clone()))
            .collect();
        for (attempt, agent) in running {
            if let Some(tx) = inner.agents.get(&agent).and_then(|a| a.tx.clone()) {
                inner.send(tx, ToAgent::Cancel { attempt });
            }
        }
        Ok(())
    }

    pub(super) fn check_all_runs(&self) {
        let mut g = self.lock();
        let inner = &mut *g;
        let ids: Vec<String> = inner.runs.iter().map(|r| r.id.clone()).collect();
        for id in ids {
            if let Err(e) = self.maybe_finish(inner, &id) {
                tracing::error!(run = id, "cannot finish run: {e}");
            }
        }
        self.dispatch(inner);
    }

    pub(super) fn maybe_finish(&self, inner: &mut Inner, run_id: &str) -> Result<(), EngineError> {
        let Some(run) = inner.runs.iter_mut().find(|r| r.id == run_id) else {
            return Ok(());
        };
        // Builds may end before evaluation does: the run ends when both have.
        if run.state.is_terminal() || !run.eval_complete() {
            return Ok(());
        }
        let finished = match &run.sched {
            Some(s) => s.unfinished() == 0,
            // No scheduler is made before evaluation completes unless something was
            // evaluated: a repository with no packages has nothing to build.
            None => run.drv_of.is_empty(),
        };
        if !finished {
            return Ok(());
        }
        run.state = RunState::Finished;
        inner
            .db
            .set_run_state(run_id, RunState::Finished, "", self.clock.now_ms())?;
        Self::tell_run_ended(inner, run_id);
        let report = self.report_locked(inner, run_id)?;
        self.emit(
            inner,
            run_id,
            Ev::RunFinished {
                state: RunState::Finished,
                summary: report.summary,
            },
        );
        Ok(())
    }

    pub(super) fn fail_run(
        &self,
        inner: &mut Inner,
        run_id: &str,
        error: &str,
    ) -> Result<(), EngineError> {
        if let Some(run) = inner.runs.iter_mut().find(|r| r.id == run_id) {
            if run.state.is_terminal() {
                return Ok(());
            }
            run.state = RunState::Failed;
            run.eval_queue.clear();
            // Repository checks still owed would change the report of a run that ended.
            run.repo_owed.clear();
        }
        inner.db.repo_checks_settled(run_id, None)?;
        // Builds may already be going (they start with the first evaluated chunk).
        Self::stop_builds(inner, run_id)?;
        self.drop_checks(inner, run_id)?;
        inner
            .db
            .set_run_state(run_id, RunState::Failed, error, self.clock.now_ms())?;
        Self::tell_run_ended(inner, run_id);
        self.emit(
            inner,
            run_id,
            Ev::RunFailed {
                error: error.to_string(),
            },
        );
        Ok(())
    }

    /// Tells every connected agent that a run ended, so it releases what it kept for it.
    pub(super) fn tell_run_ended(inner: &mut Inner, run_id: &str) {
        // No claim is checked against an ended run's outputs.
        if let Some(run) = inner.runs.iter_mut().find(|r| r.id == run_id) {
            run.node_of_output = HashMap::new();
        }
        let streams: Vec<_> = inner.agents.values().filter_map(|a| a.tx.clone()).collect();
        for tx in streams {
            inner.send(
                tx,
                ToAgent::RunEnded {
                    run_id: run_id.to_string(),
                },
            );
        }
    }

    /// The store hashes of every derivation and output of the runs still going: what the
    /// farm cache must keep.
    pub fn protected_store_hashes(&self) -> HashSet<String> {
        let g = self.lock();
        let mut out = HashSet::new();
        for run in g.runs.iter().filter(|r| !r.state.is_terminal()) {
            out.extend(run.drv_of.iter().map(|d| d.hash_part().to_string()));
            for outs in &run.outputs_of {
                out.extend(
                    outs.values()
                        .filter_map(OutputPath::known)
                        .map(|p| p.hash_part().to_string()),
                );
            }
        }
        out
    }

    /// Runs not finished yet.
    pub fn active_runs(&self) -> Vec<String> {
        self.lock()
            .runs
            .iter()
            .filter(|r| !r.state.is_terminal())
            .map(|r| r.id.clone())
            .collect()
    }
}
