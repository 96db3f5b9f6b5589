//! Reads: events, reports, runs and agents.

use super::readiness::{package_report, tainted};
use super::waiting::waiting_reason;
use super::*;

impl Engine {
    /// Events of a run after `after`, from the database.
    pub fn events_after(&self, run_id: &str, after: u64) -> Result<Vec<RunEvent>, EngineError> {
        let g = self.lock();
        if g.db.run(run_id)?.is_none() {
            return Err(EngineError::NotFound(format!("run {run_id}")));
        }
        Ok(g.db
            .events_after(run_id, after as i64)?
            .into_iter()
            .map(|(seq, kind, json)| RunEvent {
                run_id: run_id.into(),
                seq: seq as u64,
                kind,
                json,
            })
            .collect())
    }

    /// The snapshots runs still need: those of runs going on, or begun in the last `keep`.
    /// What uploads into [`Engine::sources_dir`] hold while they put a snapshot in place.
    pub fn snapshots_lock(&self) -> crate::upload::SnapshotsLock {
        self.snapshots.clone()
    }

    /// Removes the uploaded snapshots no run needs (see [`crate::upload::sweep_snapshots`]),
    /// holding off submits and uploads meanwhile; blocking. Returns how many went.
    pub fn sweep_snapshots(&self) -> Result<usize, EngineError> {
        let _held = self.snapshots.hold();
        let wanted = self.snapshots_wanted(crate::upload::SNAPSHOT_KEEP)?;
        Ok(crate::upload::sweep_snapshots(&self.sources_dir, &wanted))
    }

    fn snapshots_wanted(&self, keep: std::time::Duration) -> Result<HashSet<String>, EngineError> {
        let since = self.clock.now_ms() - keep.as_millis().min(i64::MAX as u128) as i64;
        let runs = self.lock().db.runs()?;
        Ok(runs
            .into_iter()
            .filter(|r| !r.state.is_terminal() || r.created_ms >= since)
            .filter_map(
                |r| match serde_json::from_str::<RunSpec>(&r.spec).ok()?.source {
                    SourceSpec::Snapshot(d) => Some(d),
                    SourceSpec::FlakeRef(_) => None,
                },
            )
            .collect())
    }

    pub fn run_state(&self, run_id: &str) -> Result<RunState, EngineError> {
        let g = self.lock();
        let row =
            g.db.run(run_id)?
                .ok_or_else(|| EngineError::NotFound(format!("run {run_id}")))?;
        Ok(row.state)
    }

    /// A run's report. Read through the store's own reader when it has one, off the engine's
    /// lock (a 10,000-package report takes a while, and dispatch need not wait for it); only
    /// pending packages' reasons, which come from the scheduler, take the engine, briefly.
    pub fn report(&self, run_id: &str) -> Result<Report, EngineError> {
        {
            let reader = self.reader.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(db) = reader.as_deref() {
                // One snapshot: the run, its derivations and packages as of one moment.
                db.begin_snapshot()?;
                let built = build_report(db, run_id, |_| String::new());
                let ended = db.end_snapshot();
                drop(reader);
                let mut report = built?;
                ended?;
                if report
                    .packages
                    .iter()
                    .any(|p| p.status == PackageStatus::Pending)
                {
                    let g = self.lock();
                    for p in &mut report.packages {
                        if p.status == PackageStatus::Pending {
                            p.reason = waiting_reason(&g, &self.opts, run_id, p.drv_path.as_ref());
                        }
                    }
                }
                return Ok(report);
            }
        }
        let g = self.lock();
        self.report_locked(&g, run_id)
    }

    pub(super) fn report_locked(&self, inner: &Inner, run_id: &str) -> Result<Report, EngineError> {
        build_report(&*inner.db, run_id, |drv| {
            waiting_reason(inner, &self.opts, run_id, drv)
        })
    }
}

/// A run's report from `db`; `waiting` says why a pending package (by its derivation) waits.
fn build_report(
    db: &dyn StateStore,
    run_id: &str,
    mut waiting: impl FnMut(Option<&StorePath>) -> String,
) -> Result<Report, EngineError> {
    let row = db
        .run(run_id)?
        .ok_or_else(|| EngineError::NotFound(format!("run {run_id}")))?;
    let run_state = row.state;
    // A graph stored by an older coordinator that this one reads stricter: its run failed
    // at start-up, saying why, and its report still shows the packages and that error.
    let unreadable = |e: &crate::state::StateError| e.is_unreadable();
    let drv_rows = match db.drvs(run_id) {
        Err(e) if unreadable(&e) => Vec::new(),
        r => r?,
    };
    let mut results: HashMap<&str, (DrvState, BuildReport)> = HashMap::new();
    let mut nodes: HashMap<&str, DrvNode> = HashMap::new();
    for r in &drv_rows {
        let rep = r.result.clone().unwrap_or_default();
        results.insert(r.drv_path.as_str(), (r.state, rep));
        nodes.insert(r.drv_path.as_str(), r.node.clone());
    }
    let packages = match db.packages(run_id) {
        Err(e) if unreadable(&e) => Vec::new(),
        r => r?,
    };
    let of_a_file =
        serde_json::from_str::<RunSpec>(&row.spec).is_ok_and(|s| !s.entry.file.is_empty());
    let packages = if of_a_file {
        one_name_per_derivation(packages)
    } else {
        packages
    };
    // What to call a derivation in a reason: its package, or the package it belongs to
    // ("aurora-core's source"), never a bare store hash when a package owns it.
    let mut top_of: HashMap<String, String> = packages
        .iter()
        .filter_map(|(attr, p)| Some((p.drv_path.as_ref()?.to_string(), attr.clone())))
        .collect();
    // Each derivation is walked once: one already walked had its whole closure named by
    // an earlier package, which is the name it keeps.
    let mut walked: HashSet<&str> = HashSet::new();
    for (attr, p) in &packages {
        let mut stack: Vec<&str> = p.drv_path.iter().map(|d| d.as_str()).collect();
        while let Some(d) = stack.pop() {
            if !walked.insert(d) {
                continue;
            }
            if !top_of.contains_key(d) {
                top_of.insert(d.to_string(), format!("{attr}'s {}", store_name(d)));
            }
            if let Some(n) = nodes.get(d) {
                stack.extend(n.input_drvs.iter().map(StorePath::as_str));
            }
        }
    }
    let tainted = tainted(&nodes, &results);
    let mut out = Vec::new();
    for (attr, p) in &packages {
        let mut r = package_report(attr, p, run_state, &results, &nodes, &top_of, &tainted);
        if r.status == PackageStatus::Pending {
            r.reason = waiting(p.drv_path.as_ref());
        }
        out.push(r);
    }
    let mut report = Report::new(row.id, row.state, row.label, row.error, out);
    report.repository = db.repo_checks(run_id)?;
    Ok(report)
}

/// A Nix file's derivation reached under several paths through sets marked
/// `recurseForDerivations` (a set that holds itself, one that two others hold) is one
/// package, as `nix-build` builds it once: under its shortest name, the longer paths to it
/// left out. Two names at one depth (two top-level names for one derivation) both stay.
fn one_name_per_derivation(packages: Vec<(String, PackageInfo)>) -> Vec<(String, PackageInfo)> {
    let depth = |a: &str| a.matches('.').count();
    let mut shallowest: HashMap<&str, usize> = HashMap::new();
    for (attr, p) in &packages {
        if let Some(d) = &p.drv_path {
            let e = shallowest.entry(d.as_str()).or_insert(usize::MAX);
            *e = (*e).min(depth(attr));
        }
    }
    let keep: Vec<bool> = packages
        .iter()
        .map(|(attr, p)| {
            p.drv_path
                .as_ref()
                .is_none_or(|d| shallowest.get(d.as_str()).is_none_or(|s| *s >= depth(attr)))
        })
        .collect();
    packages
        .into_iter()
        .zip(keep)
        .filter_map(|(p, keep)| keep.then_some(p))
        .collect()
}

impl Engine {
    pub fn list_runs(&self) -> Result<Vec<RunListing>, EngineError> {
        let runs = self.lock().db.runs()?;
        let mut out = Vec::new();
        for r in runs {
            // An ended run's counts never change: computed once, not on every listing (a
            // coordinator keeps every run it ever had).
            let cached = if r.state.is_terminal() {
                self.ended_counts
                    .lock()
                    .ok()
                    .and_then(|m| m.get(&r.id).cloned())
            } else {
                None
            };
            let (total, ready, by_status) = match cached {
                Some(c) => c,
                None => {
                    let rep = self.report(&r.id)?;
                    let c = (
                        rep.summary.total as u64,
                        rep.summary.ready as u64,
                        rep.summary
                            .by_status
                            .iter()
                            .map(|(k, v)| (*k, *v as u64))
                            .collect(),
                    );
                    if r.state.is_terminal()
                        && let Ok(mut m) = self.ended_counts.lock()
                    {
                        m.insert(r.id.clone(), c.clone());
                    }
                    c
                }
            };
            let partial = serde_json::from_str::<RunSpec>(&r.spec)
                .is_ok_and(|s: RunSpec| !s.attrs.is_empty());
            out.push(RunListing {
                id: r.id,
                state: r.state,
                label: r.label,
                total,
                ready,
                by_status,
                created_ms: r.created_ms,
                finished_ms: r.finished_ms,
                partial,
            });
        }
        Ok(out)
    }

    pub fn list_agents(&self) -> Vec<AgentStatus> {
        let g = self.lock();
        g.agents
            .iter()
            .map(|(name, a)| AgentStatus {
                name: name.clone(),
                systems: a.reg.systems.clone(),
                features: a.reg.features.clone(),
                max_jobs: a.reg.max_jobs,
                nix_version: a.reg.nix_version.clone(),
                connected: a.tx.is_some(),
                building: a
                    .running
                    .iter()
                    .filter_map(|id| g.attempts.get(id))
                    .filter_map(|at| {
                        let run = g.runs.iter().find(|r| r.id == at.run_id)?;
                        Some(run.target_text(&at.job))
                    })
                    .collect(),
                last_seen_ms: a.last_seen_ms,
                paused: a.paused.clone(),
                draining: a.draining,
                violations: a.violations,
                holds_outputs: a.reg.can_hold(g.hold_way),
                without_farm_cache: g.hold_way == Hold::FarmCache && !a.reg.has_farm_cache,
                // One revoked since shows as such: it cannot come back.
                admitted_by: match (&a.reg.credential, self.refusal(&a.reg.credential, 0)) {
                    (crate::credentials::Credential::Certificate(_), Some(_)) => {
                        format!("{} (revoked)", a.reg.credential.describe())
                    }
                    (c, _) => c.describe(),
                },
                run_caches: a.reg.run_caches.clone(),
            })
            .collect()
    }

    /// How many build attempts a run made for a derivation.
    pub fn build_attempts(&self, run_id: &str, drv: &str) -> Result<i64, EngineError> {
        Ok(self.lock().db.build_attempts(run_id, drv)?)
    }
}
