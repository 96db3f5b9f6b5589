//! Dispatch: evaluation and builds to agents with a free slot (build slots, and fetch slots
//! for fixed-output derivations): by critical path within a run, shortest remaining run first
//! across runs.

use super::eval::eval_slots;
use super::*;
use crate::credentials::Credential;
use nixfarm_core::cache_url::cache_listed;

impl Engine {
    pub(super) fn dispatch(&self, inner: &mut Inner) {
        let now = self.clock.now_ms();
        let names: Vec<String> = inner.agents.keys().cloned().collect();
        // Fetch and evaluation slots are offered only when some run has such a job waiting.
        let fetch_waiting = inner.runs.iter().any(|r| {
            !r.state.is_terminal()
                && r.sched
                    .as_ref()
                    .is_some_and(|s| s.may_have_ready(|c| c.fetch))
        });
        let eval_waiting = inner
            .runs
            .iter()
            .any(|r| !r.state.is_terminal() && !r.eval_queue.is_empty());
        for name in names {
            while let Some(agent) = inner.agents.get(&name) {
                // Three kinds of slot, each counted on its own. Builds: `max_jobs`.
                // Fixed-output derivations (fetches, mostly waiting on the network): as
                // many again, like Nix's substitutions, which do not count against max-jobs
                // either. Evaluation: half as many (eval::eval_slots), beside the builds, as
                // nix-fast-build's evaluation workers are: builds start with the first
                // evaluated task and never wait for a slot an evaluation holds, and a host
                // holds at most that many evaluation processes.
                let max = agent.reg.max_jobs as usize;
                if agent.tx.is_none() || agent.draining || !agent.paused.is_empty() {
                    break;
                }
                let (building, fetching) = (agent.running.builds(), agent.running.fetches());
                let build_free = building < max;
                let fetch_free = fetch_waiting && fetching < max;
                let eval_free = eval_waiting && agent.running.evals() < eval_slots(max);
                if !build_free && !fetch_free && !eval_free {
                    break;
                }
                let mut caps = agent.caps.clone();
                caps.fetches_only = !build_free;
                caps.builds_only = fetching >= max;
                // Evaluation first: it unlocks builds and their priorities.
                // A cross-check goes to an agent that is not the first one's holder.
                let mine = &agent.reg.credential;
                // Given the credential the other agent answered or built with.
                let independent_of = |other: &str, theirs: &Credential| {
                    Credential::independent((&name, mine), (other, theirs))
                };
                // Without the farm cache, where the others are, it can take part only in
                // runs that move things through a cache of their own.
                let own_cache_only = inner.hold_way == Hold::FarmCache && !agent.reg.has_farm_cache;
                let reach = (own_cache_only, agent.reg.run_caches.as_slice());
                let next = if eval_free {
                    Self::next_eval(&mut inner.runs, &self.opts, &independent_of, reach)
                } else {
                    None
                };
                let next = match next {
                    Some(n) => Some(n),
                    None if build_free || fetch_free => Self::next_build(
                        &mut inner.runs,
                        &caps,
                        (&name, &|hold| {
                            super::takes(&agent.reg, hold, inner.hold_way)
                        }),
                        &independent_of,
                        (&self.opts, inner.hold_way),
                        now,
                        reach,
                    ),
                    None => None,
                };
                let Some((run_id, job_ref, job, target)) = next else {
                    break;
                };
                let fetch = fetching < max
                    && match &job_ref {
                        JobRef::Build(n) => inner
                            .runs
                            .iter()
                            .find(|r| r.id == run_id)
                            .and_then(|r| r.sched.as_ref())
                            .is_some_and(|s| s.class(*n).fetch),
                        JobRef::Eval(_) | JobRef::Check(_) => false,
                    };
                let attempt = random_id("a");
                let kind = match &job {
                    Job::EvalList { .. } => AttemptKind::EvalList,
                    Job::EvalChunk { .. } => AttemptKind::EvalChunk,
                    Job::Build { check: true, .. } => AttemptKind::Check,
                    Job::Build { .. } => AttemptKind::Build,
                };
                let row = AttemptRow {
                    id: attempt.clone(),
                    run_id: run_id.clone(),
                    kind,
                    target: target.clone(),
                    agent: name.clone(),
                    state: AttemptState::Running,
                };
                if let Err(e) = inner.db.insert_attempt(&row, now) {
                    tracing::error!("cannot record attempt: {e}");
                    Self::unpop(&mut inner.runs, &run_id, &job_ref);
                    return;
                }
                let (hold, built_drv) = match &job {
                    Job::Build { hold, drv_path, .. } => (Some(*hold), Some(drv_path.clone())),
                    _ => (None, None),
                };
                let sent = inner
                    .agents
                    .get(&name)
                    .and_then(|a| a.tx.as_ref())
                    .is_some_and(|tx| {
                        tx.send(ToAgent::Assign {
                            attempt: attempt.clone(),
                            run_id: run_id.clone(),
                            job,
                        })
                        .is_ok()
                    });
                // A check's event names whose build it checks.
                let checking = match job_ref {
                    JobRef::Check(n) => inner
                        .runs
                        .iter()
                        .find(|r| r.id == run_id)
                        .and_then(|r| r.checks.get(&n))
                        .map(|c| c.built_by.clone()),
                    _ => None,
                };
                let mem = AttemptMem {
                    run_id: run_id.clone(),
                    job: job_ref,
                    agent: name.clone(),
                    fetch,
                    hold,
                };
                let slot = mem.slot();
                inner.attempts.insert(attempt.clone(), mem);
                if let Some(a) = inner.agents.get_mut(&name) {
                    a.running.insert(attempt.clone(), slot);
                }
                if !sent {
                    let _ = self.lose_attempt(inner, &attempt, "the agent's stream closed");
                    if let Some(a) = inner.agents.get_mut(&name) {
                        a.tx = None;
                    }
                    break;
                }
                let Some(drv) = built_drv else {
                    continue;
                };
                let name_of = store_name(&drv).to_string();
                if kind == AttemptKind::Build {
                    self.emit(
                        inner,
                        &run_id,
                        Ev::JobStarted {
                            name: name_of,
                            drv,
                            agent: name.clone(),
                        },
                    );
                } else if let Some(built_by) = checking {
                    self.emit(
                        inner,
                        &run_id,
                        Ev::JobCheckStarted {
                            name: name_of,
                            drv,
                            agent: name.clone(),
                            built_by,
                        },
                    );
                }
            }
        }
    }

    /// The next evaluation task `agent` may take, oldest run first: not one it answered
    /// already (a cross-checked task's second answer comes from another agent).
    fn next_eval(
        runs: &mut [RunMem],
        opts: &EngineOptions,
        independent_of: &dyn Fn(&str, &Credential) -> bool,
        reach: (bool, &[String]),
    ) -> Option<(String, JobRef, Job, String)> {
        for run in runs
            .iter_mut()
            .filter(|r| !r.state.is_terminal() && reaches(r, reach))
        {
            let opinions = &run.opinions;
            let Some(at) = run.eval_queue.iter().position(|t| {
                opinions
                    .get(&super::opinions::task_no(*t))
                    .is_none_or(|o| independent_of(&o.agent, &o.credential))
            }) else {
                continue;
            };
            if let Some(task) = run.eval_queue.remove(at) {
                let source = run.spec.source.clone();
                let attr_path = run.spec.attr_path.clone();
                return Some(match task {
                    EvalTask::List => (
                        run.id.clone(),
                        JobRef::Eval(task),
                        Job::EvalList {
                            source,
                            entry: Box::new(run.spec.entry.clone()),
                            attr_path,
                            memory_mib: opts.eval_memory_mib,
                            // A run of chosen attributes lists only to check they exist.
                            evaluate_up_to: if run.spec.attrs.is_empty() {
                                opts.list_eval_max
                            } else {
                                0
                            },
                            cache: run.spec.cache.clone(),
                            skip_cached: run.spec.skip_cached,
                            build_limits: run.build_limits(),
                            trusted_public_keys: run.spec.trusted_public_keys.clone(),
                        },
                        "list".into(),
                    ),
                    EvalTask::Chunk(n) => {
                        let attrs = run.chunk_attrs.get(&n).cloned().unwrap_or_default();
                        let listed_as_throwing = run.throwing_chunks.contains(&n);
                        (
                            run.id.clone(),
                            JobRef::Eval(task),
                            Job::EvalChunk {
                                source,
                                entry: Box::new(run.spec.entry.clone()),
                                attr_path,
                                attrs,
                                listed_as_throwing,
                                cache: run.spec.cache.clone(),
                                memory_mib: opts.eval_memory_mib,
                                skip_cached: run.spec.skip_cached,
                                build_limits: run.build_limits(),
                                trusted_public_keys: run.spec.trusted_public_keys.clone(),
                            },
                            n.to_string(),
                        )
                    }
                });
            }
        }
        None
    }

    /// The most urgent build this agent can take. Runs are served shortest remaining first,
    /// so a small run (a package's next hash-fixing stage, a quick check) does not queue
    /// behind a large one; a run's remaining count is divided by one plus the minutes since
    /// it was submitted, so a large run is not starved by a stream of small ones.
    fn next_build(
        runs: &mut [RunMem],
        caps: &Capabilities,
        (agent, agent_takes): (&str, &dyn Fn(Hold) -> bool),
        independent_of: &dyn Fn(&str, &Credential) -> bool,
        (opts, way): (&EngineOptions, Hold),
        now_ms: i64,
        reach: (bool, &[String]),
    ) -> Option<(String, JobRef, Job, String)> {
        let mut order: Vec<(f64, usize)> = runs
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.state.is_terminal())
            .filter_map(|(i, r)| {
                let left = r.sched.as_ref()?.unfinished() as f64;
                let minutes = (now_ms - r.created_ms).max(0) as f64 / 60_000.0;
                Some((left / (1.0 + minutes), i))
            })
            .collect();
        order.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        for (_, i) in order {
            let run = &mut runs[i];
            if run.sched.is_none() || !reaches(run, reach) {
                continue;
            }
            // A check first: the derivation's dependents wait for it.
            if let Some((job_ref, job, drv)) =
                Self::next_check(run, caps, agent_takes, independent_of)
            {
                return Some((run.id.clone(), job_ref, job, drv));
            }
            let hold = run.hold(opts, way);
            // An agent that predates holding would push held outputs to the run's cache:
            // it gets only this run's fixed outputs, which are not held.
            let restricted;
            let caps = if !agent_takes(hold) {
                restricted = Capabilities {
                    fetches_only: true,
                    ..caps.clone()
                };
                &restricted
            } else {
                caps
            };
            let RunMem {
                sched, built_on, ..
            } = &mut *run;
            let Some(sched) = sched.as_mut() else {
                continue;
            };
            let picked = if opts.locality {
                // Of equally urgent derivations, the one whose inputs this agent built: they
                // are in its store already, nothing travels through the cache.
                sched.pop_for_preferring(caps, |_, inputs| {
                    inputs
                        .iter()
                        .filter(|i| built_on.get(i).is_some_and(|a| a == agent))
                        .count() as u32
                })
            } else {
                sched.pop_for(caps)
            };
            if let Some(n) = picked {
                let background = sched.may_yield_cpu(n);
                let hold = super::hold_of(sched.class(n), hold);
                let drv = run.drv_of[n as usize].clone();
                let job = run.build_job(&drv, background, false, hold);
                return Some((run.id.clone(), JobRef::Build(n), job, drv.to_string()));
            }
        }
        None
    }

    pub(super) fn unpop(runs: &mut [RunMem], run_id: &str, job: &JobRef) {
        if let Some(run) = runs.iter_mut().find(|r| r.id == run_id) {
            match job {
                JobRef::Eval(t) => run.eval_queue.push_front(*t),
                JobRef::Build(n) => {
                    if let Some(s) = run.sched.as_mut() {
                        s.requeue(*n);
                    }
                }
                JobRef::Check(n) => run.check_queue.push_front(*n),
            }
        }
    }
}

/// Whether an agent can take part in `run`. One without the farm cache the others move
/// things through (`own_cache_only`) neither gets nor leaves anything there: it takes part
/// only in runs with a cache of their own. One whose operator listed the run caches it
/// substitutes from (`run_caches`) takes part only in runs with one of them, or with none.
fn reaches(run: &RunMem, (own_cache_only, run_caches): (bool, &[String])) -> bool {
    let cache = &run.spec.cache;
    (!own_cache_only || !cache.is_empty()) && cache_listed(run_caches, cache)
}

/// Whether agent `a` can take part in a run with `cache`, as dispatch judges it, where agents
/// hand each other unchecked outputs `way`.
pub(super) fn agent_reaches(a: &AgentMem, cache: &str, way: Hold) -> bool {
    let own_cache_only = way == Hold::FarmCache && !a.reg.has_farm_cache;
    (!own_cache_only || !cache.is_empty()) && cache_listed(&a.reg.run_caches, cache)
}
