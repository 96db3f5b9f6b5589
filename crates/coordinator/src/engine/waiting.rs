//! Why a job waits: for people reading `nixfarm agents` and pending packages' reasons.

use super::*;

impl Engine {
    /// Every job of the unfinished runs that is not running, grouped by why it waits:
    /// (reason, number of jobs, one of them), most jobs first.
    pub fn waiting_jobs(&self) -> Vec<(String, u64, String)> {
        let g = self.lock();
        let mut groups: BTreeMap<String, (u64, String)> = BTreeMap::new();
        // One look at the agents per class of job, not per job: runs can hold 100k jobs.
        let mut by_class: HashMap<(&Class, Hold, &str), String> = HashMap::new();
        for run in g.runs.iter().filter(|r| !r.state.is_terminal()) {
            let hold = run.hold(&self.opts, g.hold_way);
            let refused = cache_refused(&g, run);
            let Some(sched) = &run.sched else {
                if !run.eval_queue.is_empty() {
                    let e = groups
                        .entry(
                            refused
                                .clone()
                                .unwrap_or_else(|| "evaluation: waiting for an agent".into()),
                        )
                        .or_insert((0, run.id.clone()));
                    e.0 += run.eval_queue.len() as u64;
                }
                continue;
            };
            for id in 0..sched.len() as NodeId {
                let reason = match sched.state(id) {
                    NodeState::Ready if refused.is_some() => refused.clone().unwrap_or_default(),
                    NodeState::Ready => {
                        let class = sched.class(id);
                        let hold = super::hold_of(class, hold);
                        by_class
                            .entry((class, hold, &run.spec.cache))
                            .or_insert_with(|| queued_reason(&g, class, hold, &run.spec.cache))
                            .clone()
                    }
                    NodeState::Waiting => "waiting on dependencies".into(),
                    // Built once; its check not taken yet (cross-checked builds).
                    NodeState::Running if run.check_queue.contains(&id) => {
                        "built, waiting for another agent to check it".into()
                    }
                    _ => continue,
                };
                let e = groups
                    .entry(reason)
                    .or_insert_with(|| (0, store_name(&run.drv_of[id as usize]).to_string()));
                e.0 += 1;
            }
        }
        let mut out: Vec<(String, u64, String)> =
            groups.into_iter().map(|(r, (n, ex))| (r, n, ex)).collect();
        out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        out
    }
}

/// Why none of a run's jobs can start: every connected agent's operator listed the run
/// caches it substitutes from (`run_caches`), and the run's cache is none of them.
fn cache_refused(inner: &Inner, run: &RunMem) -> Option<String> {
    let cache = &run.spec.cache;
    let mut connected = inner.agents.values().filter(|a| a.tx.is_some()).peekable();
    connected.peek()?;
    let refused =
        connected.all(|a| !nixfarm_core::cache_url::cache_listed(&a.reg.run_caches, cache));
    refused.then(|| {
        format!(
            "queued: no connected agent substitutes from this run's cache ({}): their operators list the caches they take (run_caches)",
            nixfarm_core::limits::clip(cache, 200)
        )
    })
}

/// Why a package of an unfinished run is not done yet: evaluating, building where, queued
/// (and whether any connected agent can take it), or waiting on dependencies.
/// Why a derivation that is ready to build is not running yet.
pub(super) fn queued_reason(inner: &Inner, class: &Class, hold: Hold, cache: &str) -> String {
    let describe = || {
        if class.features.is_empty() {
            class.system.clone()
        } else {
            format!("{} with {}", class.system, class.features.join(", "))
        }
    };
    let (capable, older): (Vec<&AgentMem>, Vec<&AgentMem>) = inner
        .agents
        .values()
        .filter(|a| {
            a.tx.is_some()
                && !a.draining
                && a.caps.can_build(class)
                && super::dispatch::agent_reaches(a, cache, inner.hold_way)
        })
        .partition(|a| super::may_take(a, hold, inner.hold_way));
    if capable.is_empty() && !older.is_empty() {
        return format!(
            "queued: the {} connected agent(s) that build {} predate held outputs (cross-checked builds keep unchecked outputs out of the run's cache); upgrade them",
            older.len(),
            describe()
        );
    }
    let (capable, paused): (Vec<&AgentMem>, Vec<&AgentMem>) =
        capable.into_iter().partition(|a| a.paused.is_empty());
    if capable.is_empty() && !paused.is_empty() {
        format!(
            "queued: all {} agent(s) that build {} are paused ({}: {})",
            paused.len(),
            describe(),
            paused[0].reg.name,
            paused[0].paused
        )
    } else if capable.is_empty() {
        format!("no connected agent builds {}", describe())
    } else if capable
        .iter()
        .all(|a| a.running.builds() >= a.reg.max_jobs as usize)
    {
        format!(
            "queued: all {} agent(s) that build {} are busy",
            capable.len(),
            describe()
        )
    } else {
        "queued".into()
    }
}

pub(super) fn waiting_reason(
    inner: &Inner,
    opts: &EngineOptions,
    run_id: &str,
    drv: Option<&StorePath>,
) -> String {
    let Some(run) = inner.runs.iter().find(|r| r.id == run_id) else {
        return String::new();
    };
    let hold = run.hold(opts, inner.hold_way);
    let Some(drv) = drv else {
        return "evaluating".into();
    };
    let (Some(sched), Some(&top)) = (&run.sched, run.node_of.get(drv.as_str())) else {
        return "evaluating".into();
    };
    let refused = cache_refused(inner, run);
    let queued = |id: NodeId| {
        if let Some(r) = &refused {
            return r.clone();
        }
        let class = sched.class(id);
        queued_reason(inner, class, super::hold_of(class, hold), &run.spec.cache)
    };
    match sched.state(top) {
        NodeState::Running => {
            let agent = inner
                .attempts
                .values()
                .find(|a| {
                    a.run_id == run_id
                        && matches!(a.job, JobRef::Build(n) | JobRef::Check(n) if n == top)
                })
                .map(|a| a.agent.clone());
            match (run.checks.get(&top), agent) {
                (Some(c), Some(agent)) => {
                    format!(
                        "built on {}; {agent} builds it again to check it",
                        c.built_by
                    )
                }
                (Some(c), None) => format!(
                    "built on {}; waiting for another agent to check it",
                    c.built_by
                ),
                (None, agent) => format!("building on {}", agent.unwrap_or_default()),
            }
        }
        NodeState::Ready => queued(top),
        NodeState::Waiting => {
            // The unbuilt derivations below it, and what holds the first ready one.
            let mut seen = HashSet::new();
            let mut stack = vec![top];
            let mut unbuilt = 0usize;
            let mut blocked: Option<String> = None;
            while let Some(n) = stack.pop() {
                if !seen.insert(n) {
                    continue;
                }
                for &i in sched.inputs(n) {
                    match sched.state(i) {
                        NodeState::Built => {}
                        NodeState::Ready => {
                            unbuilt += 1;
                            let why = queued(i);
                            if blocked.is_none() && why != "queued" {
                                blocked =
                                    Some(format!("{}: {why}", store_name(&run.drv_of[i as usize])));
                            }
                            stack.push(i);
                        }
                        _ => {
                            unbuilt += 1;
                            stack.push(i);
                        }
                    }
                }
            }
            match blocked {
                Some(b) => format!("waiting on {unbuilt} dependencies ({b})"),
                None => format!("waiting on {unbuilt} dependencies"),
            }
        }
        _ => String::new(),
    }
}
