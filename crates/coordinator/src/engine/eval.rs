//! Evaluation: the attribute listing, chunks evaluated in isolation, and the graph they yield.

use super::*;

impl Engine {
    pub(super) fn on_eval_list(
        &self,
        inner: &mut Inner,
        a: AttemptMem,
        result: Result<(Vec<String>, Vec<nixfarm_core::report::RepoCheck>), AgentFailure>,
        mut evaluated: Option<EvalChunkOutput>,
    ) -> Result<(), EngineError> {
        let run_id = a.run_id.clone();
        let mut attrs = match result {
            Ok((attrs, repository)) => {
                use super::opinions::Verdict;
                match self.second_opinion(
                    inner,
                    &run_id,
                    EvalTask::List,
                    &a.agent,
                    Some(&attrs),
                    &mut evaluated,
                )? {
                    Verdict::Take => {}
                    Verdict::Wait => {
                        // Cross-checked: each listing's checks count; one failure stays.
                        inner.db.record_repo_checks(&run_id, &repository, true)?;
                        return Ok(());
                    }
                    Verdict::Disagree(msg) => return self.fail_run(inner, &run_id, &msg),
                }
                inner
                    .db
                    .record_repo_checks(&run_id, &repository, self.opts.cross_check_eval)?;
                attrs
            }
            Err((msg, true)) => return self.retry_eval(inner, &run_id, EvalTask::List, -1, &msg),
            Err((msg, false)) => {
                let attr_path = inner
                    .runs
                    .iter()
                    .find(|r| r.id == run_id)
                    .map(|r| r.spec.attr_path.clone())
                    .unwrap_or_default();
                return self.fail_run(
                    inner,
                    &run_id,
                    &format!("cannot list the attributes of '{attr_path}': {msg}"),
                );
            }
        };
        let Some(run) = inner.runs.iter_mut().find(|r| r.id == run_id) else {
            return Ok(());
        };
        if run.state.is_terminal() {
            return Ok(());
        }
        if !run.spec.attrs.is_empty() {
            let listed: HashSet<&String> = attrs.iter().collect();
            let missing: Vec<&str> = run
                .spec
                .attrs
                .iter()
                .filter(|a| !listed.contains(a))
                .map(String::as_str)
                .collect();
            if !missing.is_empty() {
                // What is listed is packages: an attribute that is there but no derivation
                // (`lib`, a set of modules) is missing as one too.
                let place = if run.spec.attr_path.is_empty() {
                    "in the file (its top level, and sets marked recurseForDerivations)".to_string()
                } else {
                    format!("in '{}'", run.spec.attr_path)
                };
                let msg = format!(
                    "no package {} {place}: --attr names a derivation there",
                    missing.join(", ")
                );
                return self.fail_run(inner, &run_id, &msg);
            }
            let wanted: HashSet<&String> = run.spec.attrs.iter().collect();
            attrs.retain(|a| wanted.contains(a));
        }
        let evaluated = evaluated.filter(|(done, _)| {
            // Only listed attributes, each once; else the tasks evaluate them all.
            let listed: HashSet<&String> = attrs.iter().collect();
            let mut seen = HashSet::new();
            let ok = !done.is_empty()
                && done
                    .iter()
                    .all(|a| listed.contains(&a.attr) && seen.insert(&a.attr));
            if !ok {
                tracing::warn!(
                    run = run_id,
                    "ignoring a listing's evaluation of other attributes"
                );
            }
            ok
        });
        self.plan_chunks(inner, &run_id, attrs, evaluated)
    }

    /// Splits a run's attributes into evaluation tasks, recorded before they are queued.
    /// What the listing evaluated already is the first task, done at once.
    pub(super) fn plan_chunks(
        &self,
        inner: &mut Inner,
        run_id: &str,
        attrs: Vec<String>,
        evaluated: Option<EvalChunkOutput>,
    ) -> Result<(), EngineError> {
        let eval_slots = inner
            .agents
            .values()
            .filter(|a| a.tx.is_some())
            .map(|a| eval_slots(a.reg.max_jobs as usize))
            .sum::<usize>()
            .max(1);
        // Enough tasks to spread over the agents' evaluation slots, bounded so each process
        // stays small.
        let done: Vec<String> = evaluated
            .iter()
            .flat_map(|(e, _)| e.iter().map(|a| a.attr.clone()))
            .collect();
        let rest: Vec<String> = {
            let done: HashSet<&String> = done.iter().collect();
            attrs
                .iter()
                .filter(|a| !done.contains(a))
                .cloned()
                .collect()
        };
        let size = rest
            .len()
            .div_ceil(eval_slots)
            .clamp(1, self.opts.eval_chunk_size.max(1));
        // What a listing that evaluated its packages left out: the packages that threw
        // there, whose tasks only learn their messages (`listed_as_throwing`), and the
        // flake's checks, which it does not evaluate; each in tasks of their own. Said only
        // of a listing small enough to be evaluated whole: a larger one's word would cost a
        // Nix process per attribute.
        let (rest, checks): (Vec<String>, Vec<String>) = if evaluated.is_some() {
            rest.into_iter()
                .partition(|a| !a.starts_with(nixfarm_core::report::CHECK_PREFIX))
        } else {
            (rest, Vec::new())
        };
        let threw =
            evaluated.is_some() && done.len() + rest.len() <= self.opts.list_eval_max as usize;
        let chunks: Vec<(&[String], bool)> = (!done.is_empty())
            .then_some((done.as_slice(), false))
            .into_iter()
            .chain(rest.chunks(size).map(|c| (c, threw)))
            .chain(checks.chunks(size).map(|c| (c, false)))
            .collect();
        let total = chunks.len();
        let slices: Vec<&[String]> = chunks.iter().map(|(c, _)| *c).collect();
        inner.db.record_eval_tasks(run_id, &slices)?;
        let Some(run) = inner.runs.iter_mut().find(|r| r.id == run_id) else {
            return Ok(());
        };
        run.eval_tasks_total = Some(total);
        for (i, (c, threw)) in chunks.iter().enumerate() {
            run.chunk_attrs.insert(i as i64, c.to_vec());
            if i > 0 || evaluated.is_none() {
                run.eval_queue.push_back(EvalTask::Chunk(i as i64));
            }
            if *threw {
                run.throwing_chunks.insert(i as i64);
            }
        }
        self.emit(
            inner,
            run_id,
            Ev::EvalListed {
                attrs: attrs.len() as u64,
                tasks: total as u64,
            },
        );
        if let Some((attrs, drvs)) = evaluated {
            return self.accept_chunk(inner, run_id, 0, attrs, drvs);
        }
        if total == 0 {
            self.start_building(inner, run_id)?;
        }
        Ok(())
    }

    pub(super) fn retry_eval(
        &self,
        inner: &mut Inner,
        run_id: &str,
        task: EvalTask,
        task_no: i64,
        msg: &str,
    ) -> Result<(), EngineError> {
        // A run that ended (cancelled, say) has its evaluations stopped: nothing to retry.
        if inner.run_is_over(run_id) {
            return Ok(());
        }
        let failures = if task_no >= 0 {
            inner.db.eval_task_infra_failure(run_id, task_no)?
        } else {
            // The listing has no task row: its failed attempts are the count.
            inner.db.failed_attempts(run_id, AttemptKind::EvalList)?
        };
        if failures > self.opts.max_infra_retries {
            // The machine's words, which an expression can print where `tryEval` cannot
            // catch them: parked, to be weighed against the run's other tasks.
            if task_no >= 0 && nixfarm_nix::messages::is_machine_error_to_weigh(msg) {
                return self.park_eval(inner, run_id, task_no, msg);
            }
            return self.fail_run(
                inner,
                run_id,
                &format!("evaluation kept failing on agents: {msg}"),
            );
        }
        tracing::warn!(
            run = run_id,
            "evaluation infrastructure failure, retrying: {msg}"
        );
        let now = self.clock.now_ms();
        if let Some(run) = inner.runs.iter_mut().find(|r| r.id == run_id) {
            run.requeue_eval(task, now, false);
        }
        Ok(())
    }

    pub(super) fn on_eval_chunk(
        &self,
        inner: &mut Inner,
        a: AttemptMem,
        result: Result<EvalChunkOutput, AgentFailure>,
    ) -> Result<(), EngineError> {
        let run_id = a.run_id.clone();
        let JobRef::Eval(EvalTask::Chunk(task)) = a.job else {
            return Ok(());
        };
        let (attrs, drvs) = match result {
            Ok(r) => r,
            Err((msg, _infra)) => {
                return self.retry_eval(inner, &run_id, EvalTask::Chunk(task), task, &msg);
            }
        };
        // The task's attributes, each once, and no other: an answer that rewrote another
        // task's packages, or left its own out, would change the report unseen.
        let asked = inner
            .runs
            .iter()
            .find(|r| r.id == run_id)
            .and_then(|r| r.chunk_attrs.get(&task));
        let exact = asked.is_some_and(|asked| {
            let asked: HashSet<&String> = asked.iter().collect();
            let mut seen = HashSet::new();
            attrs.len() == asked.len()
                && attrs
                    .iter()
                    .all(|a| asked.contains(&a.attr) && seen.insert(&a.attr))
        });
        if !exact {
            let msg = "the answer to an evaluation task named other attributes than the task's";
            self.violation(inner, &a.agent, msg);
            return self.retry_eval(inner, &run_id, EvalTask::Chunk(task), task, msg);
        }
        let mut answer = Some((attrs, drvs));
        use super::opinions::Verdict;
        match self.second_opinion(
            inner,
            &run_id,
            EvalTask::Chunk(task),
            &a.agent,
            None,
            &mut answer,
        )? {
            Verdict::Take => {}
            Verdict::Wait => return Ok(()),
            Verdict::Disagree(msg) => return self.fail_run(inner, &run_id, &msg),
        }
        let Some((attrs, drvs)) = answer else {
            return Ok(());
        };
        self.accept_chunk(inner, &run_id, task, attrs, drvs)
    }

    /// An evaluated task: recorded, its derivations added to the graph, building started
    /// when it was the last.
    pub(super) fn accept_chunk(
        &self,
        inner: &mut Inner,
        run_id: &str,
        task: i64,
        attrs: Vec<EvaluatedAttr>,
        drvs: BTreeMap<StorePath, DrvNode>,
    ) -> Result<(), EngineError> {
        let run_id = run_id.to_string();
        if inner.run_is_over(&run_id) {
            return Ok(());
        }
        let failed = attrs
            .iter()
            .filter(|a| !a.info.eval_error.is_empty())
            .count();
        inner.db.record_eval_chunk(&run_id, task, &attrs, &drvs)?;
        // Building starts with the first chunk, not after the last.
        self.extend_graph(inner, &run_id, &attrs, &drvs)?;
        let Some(run) = inner.runs.iter_mut().find(|r| r.id == run_id) else {
            return Ok(());
        };
        run.eval_tasks_done.insert(task);
        let (done, total) = (run.eval_tasks_done.len(), run.eval_tasks_total.unwrap_or(0));
        self.emit(
            inner,
            &run_id,
            Ev::EvalProgress {
                task,
                attrs: attrs.len() as u64,
                eval_failed: failed as u64,
                tasks_done: done as u64,
                tasks: total as u64,
            },
        );
        if done >= total {
            self.start_building(inner, &run_id)?;
        } else {
            self.settle_parked(inner, &run_id)?;
        }
        Ok(())
    }

    /// Adds an evaluated chunk's derivations to the run's build graph as they arrive, so
    /// what is ready builds while the rest still evaluates. A chunk's derivations are whole
    /// closures; those another chunk brought are already there.
    fn extend_graph(
        &self,
        inner: &mut Inner,
        run_id: &str,
        attrs: &[EvaluatedAttr],
        drvs: &BTreeMap<StorePath, DrvNode>,
    ) -> Result<(), EngineError> {
        let times = &inner.build_times;
        let Some(run) = inner.runs.iter_mut().find(|r| r.id == run_id) else {
            return Ok(());
        };
        if run.state.is_terminal() {
            return Ok(());
        }
        for a in attrs {
            run.note_package(&a.info);
        }
        let mut sched = run.sched.take().unwrap_or_else(|| {
            let mut s = Scheduler::new();
            s.start();
            s
        });
        let from = sched.len() as NodeId;
        let mut added: Vec<(NodeId, &DrvNode)> = Vec::new();
        for (path, node) in drvs {
            if run.node_of.contains_key(path) {
                continue;
            }
            added.push((run.add_drv(&mut sched, path, node, times), node));
        }
        for (id, node) in &added {
            for input in &node.input_drvs {
                if let Some(&j) = run.node_of.get(input) {
                    sched.add_edge(*id, j);
                }
            }
        }
        // Warm mode: what the cache already has is done before anything is dispatched.
        let rep = BuildReport {
            kind: BuildOutcome::Built,
            substituted: true,
            message: "already in the cache".into(),
            ..Default::default()
        };
        // Only a run that asked to skip what the cache holds: otherwise an agent's word
        // that an output is there would stand for a build nobody ran.
        let warm = run.spec.skip_cached;
        for (id, node) in &added {
            if warm && node.present {
                sched.restore(*id, NodeState::Built, None);
                let drv = &run.drv_of[*id as usize];
                inner
                    .db
                    .set_drv_state(run_id, drv, DrvState::Built, Some(&rep))?;
            }
        }
        let failed = sched.extend(from);
        run.sched = Some(sched);
        for (id, root) in failed {
            let (drv, root_drv) = (&run.drv_of[id as usize], &run.drv_of[root as usize]);
            let dep = BuildReport {
                kind: BuildOutcome::DependencyFailed,
                failed_root: Some(root_drv.clone()),
                ..Default::default()
            };
            inner
                .db
                .set_drv_state(run_id, drv, DrvState::DependencyFailed, Some(&dep))?;
        }
        Ok(())
    }

    pub(super) fn start_building(
        &self,
        inner: &mut Inner,
        run_id: &str,
    ) -> Result<(), EngineError> {
        let Some(run) = inner.runs.iter_mut().find(|r| r.id == run_id) else {
            return Ok(());
        };
        // Streamed: the graph grew with each chunk and is building already.
        if run.sched.is_some() {
            run.state = RunState::Building;
            inner.db.set_run_state(run_id, RunState::Building, "", 0)?;
            return self.evaluation_done(inner, run_id);
        }
        // Warm mode: what the cache already has is done before anything is dispatched.
        for row in inner.db.drvs(run_id)? {
            if run.spec.skip_cached && row.state == DrvState::Waiting && row.node.present {
                let rep = BuildReport {
                    kind: BuildOutcome::Built,
                    substituted: true,
                    message: "already in the cache".into(),
                    ..Default::default()
                };
                inner
                    .db
                    .set_drv_state(run_id, &row.drv_path, DrvState::Built, Some(&rep))?;
            }
        }
        Self::build_scheduler(inner.db.as_mut(), run, &inner.build_times)?;
        self.evaluation_done(inner, run_id)
    }

    /// Says how big the evaluated run is, and ends it if nothing is left to build.
    fn evaluation_done(&self, inner: &mut Inner, run_id: &str) -> Result<(), EngineError> {
        let drvs = inner
            .runs
            .iter()
            .find(|r| r.id == run_id)
            .map_or(0, |r| r.drv_of.len());
        let packages = inner.db.packages(run_id)?.len();
        self.emit(
            inner,
            run_id,
            Ev::EvalDone {
                packages: packages as u64,
                drvs: drvs as u64,
            },
        );
        self.maybe_finish(inner, run_id)
    }
}

/// Evaluation tasks an agent with `max_jobs` build slots runs at once, beside its builds:
/// half as many, at least one. Builds start with the first evaluated task and never wait for
/// a slot an evaluation holds; a host holds at most that many evaluation processes (each up
/// to `eval_memory_mib`).
pub(super) fn eval_slots(max_jobs: usize) -> usize {
    max_jobs.div_ceil(2).max(1)
}
