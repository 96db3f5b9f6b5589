//! The fixer applied to a readiness report: each needs-hash package's mismatches are located
//! in the submitted tree, and the edits become the report's `hash_fixes` and a patch.

use crate::{Fix, PackageMismatches, Plan, Tree, apply, plan, relative_position, unified_diff};
use nixfarm_core::report::{HashFix, PackageReport, Report};
use nixfarm_core::status::PackageStatus;

/// A package's mismatches as the fixer takes them.
pub fn package_mismatches(p: &PackageReport, tree: &Tree) -> PackageMismatches {
    PackageMismatches {
        attr: p.attr.clone(),
        own_file: relative_position(&p.position, tree),
        mismatches: p
            .hash_mismatches
            .iter()
            .map(|m| crate::Mismatch {
                fod_drv: m.fod_drv.clone(),
                hints: m.hints.clone(),
                specified: m.specified.clone(),
                got: m.got.clone(),
            })
            .collect(),
    }
}

/// An edit as the report shows it.
pub fn to_hash_fix(f: &Fix) -> HashFix {
    HashFix {
        file: f.file.clone(),
        attribute: f.attribute.clone(),
        old: f.old.clone(),
        new: f.new.clone(),
        line: f.line,
        written: f.old_text.clone(),
    }
}

/// The plan for every needs-hash package of `report` in `tree`.
pub fn plan_report(report: &Report, tree: &Tree) -> Plan {
    let broken: Vec<PackageMismatches> = report
        .packages
        .iter()
        .filter(|p| p.status() == PackageStatus::NeedsHash && !p.hash_mismatches.is_empty())
        .map(|p| package_mismatches(p, tree))
        .collect();
    plan(tree, &broken)
}

/// Fills in each needs-hash package's `hash_fixes` (packages that already carry some keep
/// theirs) and returns the plan.
pub fn annotate(report: &mut Report, tree: &Tree) -> Plan {
    let plan = plan_report(report, tree);
    for p in &mut report.packages {
        if p.hash_fixes.is_empty()
            && let Some(list) = plan.fixes.get(&p.attr)
        {
            p.hash_fixes = list.iter().map(to_hash_fix).collect();
        }
    }
    plan
}

/// The patch that applies `plan` to `tree` (empty when there is nothing to change).
pub fn patch(tree: &Tree, plan: &Plan) -> Result<String, crate::FixError> {
    let changed = apply(tree, plan.fixes.values().flatten())?;
    Ok(unified_diff(tree, &changed))
}
