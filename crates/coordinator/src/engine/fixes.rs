//! Reports with hash fixes: for a run of an uploaded snapshot, each needs-hash package's
//! mismatches located in the snapshot's own files, and the run's patch.

use super::*;
use nixfarm_fix::Tree;

impl Engine {
    /// A run's report, each needs-hash package with the edits that fill in its hashes when
    /// the run's source is an uploaded snapshot. Found outside the engine's lock. The first
    /// run of a hash-fixing session reads over its stages (see `sessions.rs`).
    pub fn report_with_fixes(&self, run_id: &str) -> Result<Report, EngineError> {
        let report = self.report_alone_with_fixes(run_id)?;
        let stages = self.lock().db.stages(run_id)?;
        if stages.is_empty() {
            return Ok(report);
        }
        self.over_stages(report, &stages)
    }

    /// [`Engine::report_with_fixes`] of the run alone, whatever stages it has.
    pub fn report_alone_with_fixes(&self, run_id: &str) -> Result<Report, EngineError> {
        let mut report = self.report(run_id)?;
        if let Some(tree) = self.run_tree(run_id)? {
            nixfarm_fix::report::annotate(&mut report, &tree);
        }
        Ok(report)
    }

    /// The patch that fills in every hash of a run that can be located (empty when there is
    /// none, or the run's source is not a snapshot).
    pub fn fix_patch(&self, run_id: &str) -> Result<String, EngineError> {
        let report = self.report(run_id)?;
        let Some(tree) = self.run_tree(run_id)? else {
            return Ok(String::new());
        };
        let plan = nixfarm_fix::report::plan_report(&report, &tree);
        nixfarm_fix::report::patch(&tree, &plan)
            .map_err(|e| EngineError::Conflict(format!("the fixes do not apply: {e}")))
    }

    fn run_tree(&self, run_id: &str) -> Result<Option<Arc<Tree>>, EngineError> {
        let spec = {
            let g = self.lock();
            g.db.run(run_id)?
                .ok_or_else(|| EngineError::NotFound(format!("run {run_id}")))?
                .spec
        };
        let Ok(spec) = serde_json::from_str::<RunSpec>(&spec) else {
            return Ok(None);
        };
        let SourceSpec::Snapshot(digest) = spec.source else {
            return Ok(None);
        };
        let tar = self.sources_dir.join(format!("{digest}.tar"));
        match self.trees.get(&digest, &tar) {
            Ok(t) => Ok(Some(t)),
            // The snapshot was removed (an old run): a report without fixes, not an error.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}
