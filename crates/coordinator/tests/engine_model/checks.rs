//! The invariants checked after every step, and every run driven to its end.

use super::*;

impl World {
    /// Every run's state and package statuses.
    pub(super) fn observe_all(&self) -> Checked<Vec<RunStatuses>> {
        let mut out = vec![];
        for r in &self.runs {
            let (st, rep) = self.observe(&r.id)?;
            out.push((
                r.id.clone(),
                st,
                rep.packages
                    .iter()
                    .map(|p| (p.attr.clone(), p.status.to_string()))
                    .collect(),
            ));
        }
        Ok(out)
    }

    pub(super) fn observe(&self, id: &str) -> Checked<(RunState, Report)> {
        let e = self.engine();
        let st = e
            .run_state(id)
            .map_err(|err| violation(0, format!("run_state: {err}")))?;
        let rep = e
            .report(id)
            .map_err(|err| violation(0, format!("report: {err}")))?;
        Ok((st, rep))
    }

    pub(super) fn check(&mut self) -> Checked {
        let attrs_all: BTreeSet<String> = (0..self.farm.packages.len())
            .map(|j| format!("p{j}"))
            .collect();
        for ri in 0..self.runs.len() {
            let id = self.runs[ri].id.clone();
            let rn = format!("r{ri}");
            let (state, rep) = self.observe(&id)?;
            // 1. one status per package; the summary counts them.
            let mut seen = BTreeSet::new();
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            for p in &rep.packages {
                if !seen.insert(p.attr.clone()) {
                    return Err(violation(
                        1,
                        format!("{rn}: package {} listed twice", p.attr),
                    ));
                }
                if !attrs_all.contains(&p.attr) {
                    return Err(violation(1, format!("{rn}: unknown package {}", p.attr)));
                }
                let s = p.status.to_string();
                if s.parse::<PackageStatus>().is_err() {
                    return Err(violation(
                        1,
                        format!("{rn}: {} has no valid status: {s:?}", p.attr),
                    ));
                }
                *counts.entry(s).or_default() += 1;
            }
            let summary: BTreeMap<String, usize> = rep
                .summary
                .by_status
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect();
            let ready = counts.get("ready").copied().unwrap_or(0);
            if summary != counts
                || rep.summary.total != rep.packages.len()
                || rep.summary.ready != ready
            {
                return Err(violation(
                    1,
                    format!(
                        "{rn}: summary {:?} (total {}, ready {}) does not count the statuses {counts:?} of {} packages",
                        summary,
                        rep.summary.total,
                        rep.summary.ready,
                        rep.packages.len()
                    ),
                ));
            }
            if matches!(state, RunState::Building | RunState::Finished) && seen != attrs_all {
                return Err(violation(
                    1,
                    format!("{rn} is {state} but reports packages {seen:?}, not {attrs_all:?}"),
                ));
            }
            // 2. dependency failures come from failed dependencies.
            for p in &rep.packages {
                if p.status.to_string() != PackageStatus::DependencyFailed.as_str() {
                    continue;
                }
                let j = package_index(&p.attr).unwrap_or(0);
                let top = self.farm.packages[j].0;
                let mut below = self.closure(top);
                below.remove(&top);
                // "dependency X failed: KIND" or "dependency X failed: KIND: message"; the
                // kind's spelling is read back into the outcome it spells.
                let kind = p
                    .reason
                    .split_once(" failed: ")
                    .and_then(|(_, k)| k.split(':').next())
                    .and_then(|k| k.trim().parse::<BuildOutcome>().ok());
                let Some(kind) = kind.filter(|k| is_failing_kind(*k)) else {
                    return Err(violation(
                        2,
                        format!(
                            "{rn}: {} is dependency-failed with reason {:?}: the dependency did not fail",
                            p.attr, p.reason
                        ),
                    ));
                };
                // A package's own derivation is named by the package ("p3"); any other by
                // the package it belongs to ("p3's d5").
                let root = match p.failed_dependency.split_once("'s ") {
                    Some((_, drv)) => drv_index(drv),
                    None => package_index(&p.failed_dependency)
                        .filter(|_| p.failed_dependency.starts_with('p'))
                        .map(|q| self.farm.packages[q].0)
                        .or_else(|| drv_index(&p.failed_dependency)),
                };
                // The dependency it blames is below it and did fail that way.
                let evidence = &self.runs[ri].failure_evidence;
                let blamed = root
                    .filter(|d| below.contains(d))
                    .is_some_and(|d| evidence.get(&d).is_some_and(|kinds| kinds.contains(&kind)));
                if !blamed {
                    return Err(violation(
                        2,
                        format!(
                            "{rn}: {} is dependency-failed ({:?}, failed_dependency {:?}) but no derivation below d{top} failed that way (failures seen: {:?})",
                            p.attr, p.reason, p.failed_dependency, evidence
                        ),
                    ));
                }
            }
            // 3. terminal statuses stay.
            let now: BTreeMap<String, String> = rep
                .packages
                .iter()
                .map(|p| (p.attr.clone(), p.status.to_string()))
                .collect();
            for (attr, before) in &self.runs[ri].statuses {
                let after = now.get(attr).cloned().unwrap_or_else(|| "<gone>".into());
                if before != PackageStatus::Pending.as_str() && *before != after {
                    let reason = rep
                        .packages
                        .iter()
                        .find(|p| p.attr == *attr)
                        .map(|p| p.reason.clone())
                        .unwrap_or_default();
                    return Err(violation(
                        3,
                        format!(
                            "{rn} ({state}): {attr} went from terminal status {before} to {after} ({reason:?})"
                        ),
                    ));
                }
            }
            self.runs[ri].statuses = now;
            // 5. a finished run has nothing pending.
            if state.is_terminal()
                && let Some(p) = rep
                    .packages
                    .iter()
                    .find(|p| p.status.to_string() == PackageStatus::Pending.as_str())
            {
                return Err(violation(
                    5,
                    format!(
                        "{rn} is {state} (error {:?}) but {} is pending ({:?})",
                        rep.error, p.attr, p.reason
                    ),
                ));
            }
        }
        self.check_model()
    }

    /// The model and the engine agree on who is connected and how many jobs each runs (a
    /// disagreement is an engine bug or a harness bug; either way it is reported).
    pub(super) fn check_model(&self) -> Checked {
        let listed = self.engine().list_agents();
        for ag in &self.agents {
            let Some(st) = listed.iter().find(|a| a.name == ag.name) else {
                if ag.known {
                    return Err(violation(
                        0,
                        format!("agent {} is not listed any more", ag.name),
                    ));
                }
                continue;
            };
            if st.connected != ag.link.is_some() || st.building.len() != ag.held.len() {
                let held: Vec<String> = ag.held.iter().map(|a| self.describe(a)).collect();
                return Err(violation(
                    0,
                    format!(
                        "model and engine disagree on agent {}: engine says connected {}, building {:?}; model says connected {}, holding {:?}",
                        ag.name,
                        st.connected,
                        st.building,
                        ag.link.is_some(),
                        held
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Reconnects every agent and answers everything successfully until every run ends.
    pub(super) fn finish(&mut self) -> Checked {
        self.log("--- every run is driven to its end ---".into());
        for k in 0..self.agents.len() {
            if self.agents[k].link.is_none() {
                let all = (1u16 << self.agents[k].held.len().min(8)) - 1;
                self.reconnect(k, all as u8, false)?;
                self.check()?;
            }
        }
        for _round in 0..500 {
            self.drain();
            let mut open = vec![];
            for r in &self.runs {
                if !self.observe(&r.id)?.0.is_terminal() {
                    open.push(r.id.clone());
                }
            }
            if open.is_empty() {
                return Ok(());
            }
            let Some(k) = (0..self.agents.len()).find(|&k| !self.agents[k].held.is_empty()) else {
                let mut why = vec![];
                for id in &open {
                    let (st, rep) = self.observe(id)?;
                    let pend: Vec<String> = rep
                        .packages
                        .iter()
                        .filter(|p| p.status == nixfarm_core::PackageStatus::Pending)
                        .map(|p| format!("{}: {}", p.attr, p.reason))
                        .collect();
                    why.push(format!("{} {st} [{}]", self.run_no(id), pend.join("; ")));
                }
                return Err(violation(
                    5,
                    format!(
                        "runs never finish: nothing is assigned to any agent while {}",
                        why.join(", ")
                    ),
                ));
            };
            let a = self.agents[k].held.remove(0);
            // An agent told to cancel (or whose run was cancelled) reports the build cancelled.
            let cancelled = self.observe(&a.run)?.0 == RunState::Cancelled;
            let outcome = if cancelled || self.agents[k].cancel_asked.contains(&a.attempt) {
                Outcome::Cancelled
            } else {
                Outcome::Built
            };
            let msg = self.answer(&a, outcome);
            self.log(format!(
                "{} answers {} with {}",
                self.agents[k].name,
                self.describe(&a),
                outcome_text(&msg)
            ));
            let conn = self.agents[k].link.as_ref().map(|l| l.conn).unwrap_or(0);
            self.agents[k].last_seen = self.now();
            self.send(k, conn, msg.clone())?;
            self.agents[k].answered.push((a, msg));
            self.drain();
            self.check()?;
        }
        Err(violation(5, "runs still unfinished after 500 answers"))
    }
}

pub(super) fn outcome_text(msg: &FromAgent) -> String {
    match msg {
        FromAgent::EvalList {
            result: Ok((a, _)), ..
        } => format!("the list {a:?}"),
        FromAgent::EvalChunk {
            result: Ok((a, g)), ..
        } => format!("{} attributes and {} derivations", a.len(), g.len()),
        FromAgent::EvalList { result: Err(e), .. }
        | FromAgent::EvalChunk { result: Err(e), .. } => {
            format!(
                "an evaluation error ({})",
                if e.1 { "infrastructure" } else { "the flake's" }
            )
        }
        FromAgent::Build { report, .. } => {
            let own = report
                .outputs
                .values()
                .all(|p| !p.as_str().ends_with("-evil"));
            format!(
                "{}{}",
                report.kind,
                if own { "" } else { " with foreign outputs" }
            )
        }
        FromAgent::Heartbeat { .. } => "a heartbeat".into(),
        FromAgent::Log { .. } => "a log".into(),
        FromAgent::RepoChecks { checks, .. } => format!("{} repository checks", checks.len()),
    }
}

pub(super) fn diff_snapshots(a: &Snapshot, b: &Snapshot, w: &World) -> String {
    let mut out = vec![];
    for ((id, ra), (_, rb)) in a.runs.iter().zip(&b.runs) {
        if ra.state != rb.state {
            out.push(format!(
                "  {} state {} -> {}",
                w.run_no(id),
                ra.state,
                rb.state
            ));
        }
        for (pa, pb) in ra.packages.iter().zip(&rb.packages) {
            if pa != pb {
                out.push(format!(
                    "  {} {}: {} {:?} -> {} {:?}",
                    w.run_no(id),
                    pa.attr,
                    pa.status,
                    pa.reason,
                    pb.status,
                    pb.reason
                ));
            }
        }
        if ra.packages.len() != rb.packages.len() {
            out.push(format!(
                "  {} packages {} -> {}",
                w.run_no(id),
                ra.packages.len(),
                rb.packages.len()
            ));
        }
    }
    if a.agents != b.agents {
        out.push(format!("  agents {:?} -> {:?}", a.agents, b.agents));
    }
    out.join("\n")
}
