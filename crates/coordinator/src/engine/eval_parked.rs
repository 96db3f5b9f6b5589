//! Evaluation tasks that kept failing with the machine's words: parked until the run's other
//! tasks have settled, then blamed on their attributes or on the farm.
//!
//! Nix's words for a failing machine ("database is locked") are retried as an outage, but an
//! expression can print them where `tryEval` cannot catch them (`abort`). An agent bisects
//! such a failure among a task's attributes itself; a task of one attribute has nothing
//! there to compare with. Here the comparison is across the run: when an agent that failed
//! the task evaluated another of the run's tasks after that, its machine works, and the
//! task's attributes fail alone (`eval-failed`) instead of the whole run.

use super::*;

impl Engine {
    /// A task past its retries: parked, and settled now if nothing else is still evaluating.
    pub(super) fn park_eval(
        &self,
        inner: &mut Inner,
        run_id: &str,
        task: i64,
        msg: &str,
    ) -> Result<(), EngineError> {
        let Some(run) = inner.runs.iter_mut().find(|r| r.id == run_id) else {
            return Ok(());
        };
        tracing::warn!(
            run = run_id,
            task,
            "evaluation task kept failing on agents, parked until the others settle: {msg}"
        );
        run.parked_eval.insert(task, msg.to_string());
        self.settle_parked(inner, run_id)
    }

    /// Once every other task of the run is done (or parked too): each parked task is tried
    /// once more, then blamed on its attributes when an agent that failed it evaluated
    /// others after a failure, else the run fails as the farm's.
    pub(super) fn settle_parked(&self, inner: &mut Inner, run_id: &str) -> Result<(), EngineError> {
        let Some(run) = inner.runs.iter_mut().find(|r| r.id == run_id) else {
            return Ok(());
        };
        let total = run.eval_tasks_total.unwrap_or(0);
        if run.parked_eval.is_empty()
            || run.state.is_terminal()
            || run.eval_tasks_done.len() + run.parked_eval.len() < total
        {
            return Ok(());
        }
        // Each once more first, now that the others are done: an outage that has ended
        // since (a lock held, a daemon restarting) blames none of them.
        let again: Vec<i64> = run
            .parked_eval
            .keys()
            .filter(|t| !run.final_tried.contains(t))
            .copied()
            .collect();
        if !again.is_empty() {
            let now = self.clock.now_ms();
            for task in again {
                run.parked_eval.remove(&task);
                run.final_tried.insert(task);
                run.requeue_eval(EvalTask::Chunk(task), now, true);
            }
            return Ok(());
        }
        // Taken out whole: accepting one below must not settle the others again. With each,
        // whether another agent answered it (cross-checked: its answer is not outweighed by
        // an agent's outage, or its word) and its attributes.
        let parked: Vec<(i64, String, bool, Vec<String>)> = std::mem::take(&mut run.parked_eval)
            .into_iter()
            .map(|(task, msg)| {
                let answered = run.opinions.contains_key(&task);
                let attrs = run.chunk_attrs.get(&task).cloned().unwrap_or_default();
                (task, msg, answered, attrs)
            })
            .collect();
        for (task, msg, answered, _) in &parked {
            if *answered || !inner.db.failed_where_others_evaluated(run_id, *task)? {
                return self.fail_run(
                    inner,
                    run_id,
                    &format!("evaluation kept failing on agents: {msg}"),
                );
            }
        }
        // Its retries, and the one more try once the others were done.
        let failures = self.opts.max_infra_retries + 2;
        for (task, msg, _, attrs) in parked {
            let attrs = attrs
                .into_iter()
                .map(|attr| EvaluatedAttr {
                    attr,
                    info: PackageInfo {
                        eval_error: format!(
                            "{msg} (Nix's words for a failure of the machine, but its evaluation failed so {failures} times on agents that evaluated the run's other packages: taken as its own failure)"
                        ),
                        ..Default::default()
                    },
                })
                .collect();
            self.accept_chunk(inner, run_id, task, attrs, BTreeMap::new())?;
        }
        Ok(())
    }
}
