//! The Prometheus exposition of the farm's state.

use super::*;

impl Engine {
    /// The Prometheus text exposition of the farm's state: agents, jobs by state, builds by
    /// outcome with durations, retries and attempts lost to vanished agents.
    pub fn metrics_text(&self) -> Result<String, EngineError> {
        use std::fmt::Write as _;
        let g = self.lock();
        let mut out = String::new();
        let connected = g.agents.values().filter(|a| a.tx.is_some()).count();
        let slots: u64 = g
            .agents
            .values()
            .filter(|a| a.tx.is_some())
            .map(|a| a.reg.max_jobs as u64)
            .sum();
        let _ = writeln!(
            out,
            "# HELP nixfarm_agents_connected Agents with a live stream.\n# TYPE nixfarm_agents_connected gauge\nnixfarm_agents_connected {connected}"
        );
        let _ = writeln!(
            out,
            "# HELP nixfarm_agent_slots Job slots of connected agents.\n# TYPE nixfarm_agent_slots gauge\nnixfarm_agent_slots {slots}"
        );
        let mut by_state: BTreeMap<&str, u64> = BTreeMap::new();
        for run in &g.runs {
            if let Some(s) = &run.sched {
                for id in 0..s.len() as NodeId {
                    let k = match s.state(id) {
                        NodeState::Waiting => "waiting-on-dependencies",
                        NodeState::Ready => "queued",
                        // Built once, its second build (cross_check_builds) to come or going.
                        NodeState::Running if run.checks.contains_key(&id) => "awaiting-check",
                        NodeState::Running => "running",
                        _ => continue,
                    };
                    *by_state.entry(k).or_default() += 1;
                }
            }
        }
        let _ = writeln!(
            out,
            "# HELP nixfarm_jobs Build jobs of unfinished runs by state.\n# TYPE nixfarm_jobs gauge"
        );
        for k in [
            "waiting-on-dependencies",
            "queued",
            "running",
            "awaiting-check",
        ] {
            let _ = writeln!(
                out,
                "nixfarm_jobs{{state=\"{k}\"}} {}",
                by_state.get(k).copied().unwrap_or(0)
            );
        }
        let violations: Vec<(String, u64)> = g
            .agents
            .iter()
            .map(|(n, a)| (n.clone(), a.violations))
            .collect();
        // The counts scan the whole history: read beside the engine, not holding it up.
        drop(g);
        let counts = self.history_counts()?;
        let _ = writeln!(
            out,
            "# HELP nixfarm_runs Runs by state.\n# TYPE nixfarm_runs gauge"
        );
        for (state, n) in &counts.runs_by_state {
            let _ = writeln!(out, "nixfarm_runs{{state=\"{state}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP nixfarm_builds_total Finished build jobs by outcome.\n# TYPE nixfarm_builds_total counter"
        );
        let mut durations = String::new();
        for (outcome, n, ms) in &counts.builds {
            let _ = writeln!(out, "nixfarm_builds_total{{outcome=\"{outcome}\"}} {n}");
            let _ = writeln!(
                durations,
                "nixfarm_build_duration_seconds_sum{{outcome=\"{outcome}\"}} {:.3}\nnixfarm_build_duration_seconds_count{{outcome=\"{outcome}\"}} {n}",
                *ms as f64 / 1000.0
            );
        }
        let _ = writeln!(
            out,
            "# HELP nixfarm_build_duration_seconds Time from dispatch to result.\n# TYPE nixfarm_build_duration_seconds summary\n{}",
            durations.trim_end()
        );
        let (retries, lost) = (counts.retries, counts.lost);
        let _ = writeln!(
            out,
            "# HELP nixfarm_retries_total Jobs requeued after an infrastructure failure.\n# TYPE nixfarm_retries_total counter\nnixfarm_retries_total {retries}"
        );
        let _ = writeln!(
            out,
            "# HELP nixfarm_agent_protocol_violations_total Messages refused from an agent: results for attempts it does not hold, outputs that are not the derivation's.\n# TYPE nixfarm_agent_protocol_violations_total counter"
        );
        for (name, n) in &violations {
            let _ = writeln!(
                out,
                "nixfarm_agent_protocol_violations_total{{agent=\"{}\"}} {n}",
                prometheus_label(name),
            );
        }
        let _ = writeln!(
            out,
            "# HELP nixfarm_attempts_lost_total Attempts given up because their agent vanished or the coordinator restarted (counted apart from build failures).\n# TYPE nixfarm_attempts_lost_total counter\nnixfarm_attempts_lost_total {lost}"
        );
        Ok(out)
    }

    /// Runs by state and builds by outcome since the database began: through the store's
    /// reader when it has one (off the engine's lock), else the engine's own handle.
    fn history_counts(&self) -> Result<crate::db::MetricsCounts, EngineError> {
        {
            let reader = self.reader.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(db) = reader.as_deref() {
                return Ok(db.metrics_counts()?);
            }
        }
        Ok(self.lock().db.metrics_counts()?)
    }
}
