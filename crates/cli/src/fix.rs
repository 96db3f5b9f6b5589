//! `--fix-hashes`: runs rounds until every hash-broken package builds or fails for another
//! reason, each round building only the packages whose hashes the previous one filled in,
//! and hands back the edits (report, unified diff, or the checkout itself with `--apply`).

use crate::cmd::submit::{get_report, submit};
use crate::{Client, RunArgs, source, watch};
use anyhow::{Context, bail};
use clap::Args;
use nixfarm_core::PackageStatus;
use nixfarm_core::report::{HashFix, PackageReport, Report};
use nixfarm_fix::Tree;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

#[derive(Args, Debug, Clone, Default)]
pub struct FixArgs {
    /// Compute every missing or wrong fixed-output hash (lib.fakeHash, "", stale literals,
    /// npmDepsHash/cargoHash/vendorHash after their source) and rebuild with them until each
    /// package builds or fails for another reason. Needs a local checkout; it is not modified
    /// unless --apply is given.
    #[arg(long)]
    pub fix_hashes: bool,
    /// Most build rounds with --fix-hashes (a source hash plus a dependency bundle needs 3:
    /// find the source hash, find the bundle's, verify).
    #[arg(long, default_value_t = 5, value_name = "N")]
    pub max_rounds: u32,
    /// Write the fixes as a unified diff to FILE (accepted by `git apply` and `patch -p1`).
    /// Implies --fix-hashes.
    #[arg(long, value_name = "FILE")]
    pub patch_out: Option<PathBuf>,
    /// Apply the fixes to the checkout; refused, changing nothing, when a file to edit changed
    /// since the submit. Implies --fix-hashes.
    #[arg(long)]
    pub apply: bool,
}

impl FixArgs {
    pub fn enabled(&self) -> bool {
        self.fix_hashes || self.patch_out.is_some() || self.apply
    }
}

/// The checkout as submitted: its `.nix` files' text.
struct Checkout {
    dir: PathBuf,
    original: Tree,
}

impl Checkout {
    fn read(dir: &Path) -> anyhow::Result<Checkout> {
        let mut original = Tree::new();
        for rel in source::list_files(dir)? {
            if rel.extension().is_some_and(|e| e == "nix") {
                let full = dir.join(&rel);
                if !full.is_file() {
                    continue;
                }
                let bytes = std::fs::read(&full)
                    .with_context(|| format!("cannot read {}", full.display()))?;
                // A file (or a name) that is not UTF-8 cannot be edited as text; it is left
                // alone (and still snapshotted exactly).
                if let (Some(name), Ok(text)) = (rel.to_str(), String::from_utf8(bytes)) {
                    original.insert(name.to_string(), text);
                }
            }
        }
        Ok(Checkout {
            dir: dir.to_path_buf(),
            original,
        })
    }

    fn overrides(&self, current: &Tree) -> BTreeMap<PathBuf, Vec<u8>> {
        current
            .iter()
            .filter(|(k, v)| self.original.get(*k) != Some(*v))
            .map(|(k, v)| (PathBuf::from(k), v.clone().into_bytes()))
            .collect()
    }
}

/// What a fixing session ends with.
pub struct Outcome {
    pub report: Report,
    /// Exit code 130 when the user detached from a round.
    pub detached: bool,
}

/// Submits `dir`, then (with `fix.enabled()`) further rounds with the hashes filled in. Without
/// fixing, the single run's report still gets each needs-hash package's `hash_fixes`.
pub async fn run(
    client: &Client,
    dir: &Path,
    run_args: &RunArgs,
    fix: &FixArgs,
) -> anyhow::Result<Outcome> {
    let checkout = Checkout::read(dir)?;
    let fixing = fix.enabled();
    let max_rounds = if fixing { fix.max_rounds.max(1) } else { 1 };
    let mut current = checkout.original.clone();
    let mut packages: BTreeMap<String, PackageReport> = BTreeMap::new();
    let mut fixes: BTreeMap<String, Vec<HashFix>> = BTreeMap::new();
    let mut unlocated: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut rounds: Vec<String> = Vec::new();
    let mut only: Vec<String> = run_args.attrs.clone();
    let mut first: Option<Report> = None;
    let mut last_state = nixfarm_core::RunState::Evaluating;
    let mut last_error = String::new();
    let mut unverified: BTreeSet<String> = BTreeSet::new();
    for round in 1..=max_rounds {
        let overrides = checkout.overrides(&current);
        let id = submit(client, &dir.to_string_lossy(), run_args, &overrides, &only).await?;
        rounds.push(id.clone());
        if fixing {
            eprintln!(
                "round {round}: run {id}{}",
                if round == 1 {
                    String::new()
                } else {
                    format!(" ({} package(s) with filled-in hashes)", only.len())
                }
            );
        } else {
            eprintln!("submitted run {id}");
        }
        if let watch::End::Detached = watch::watch(client, &id).await? {
            eprintln!("detached; run {id} continues. Follow it with: nixfarm watch {id}");
            let report = get_report(client, &id).await?;
            return Ok(Outcome {
                report,
                detached: true,
            });
        }
        let report = get_report(client, &id).await?;
        last_state = report.state;
        last_error = report.error.clone();
        if report.state == nixfarm_core::RunState::Failed {
            first.get_or_insert(report);
            break;
        }
        for p in &report.packages {
            packages.insert(p.attr.clone(), p.clone());
            unverified.remove(&p.attr);
        }
        first.get_or_insert_with(|| report.clone());
        let plan = nixfarm_fix::report::plan_report(&report, &current);
        for u in &plan.unlocated {
            unlocated.entry(u.attr.clone()).or_default().push(format!(
                "cannot fill in {} for {}: {}",
                u.mismatch.got,
                u.mismatch.fod_name(),
                u.why
            ));
        }
        for (attr, list) in &plan.fixes {
            fixes
                .entry(attr.clone())
                .or_default()
                .extend(list.iter().map(nixfarm_fix::report::to_hash_fix));
        }
        if !fixing || plan.fixes.is_empty() {
            break;
        }
        let edited = nixfarm_fix::apply(&current, plan.fixes.values().flatten())
            .context("cannot apply the hash fixes to the submitted tree")?;
        for (file, text) in edited {
            current.insert(file, text);
        }
        only = plan.fixes.keys().cloned().collect();
        if round == max_rounds {
            unverified.extend(only.iter().cloned());
        }
    }
    let Some(first) = first else {
        bail!("no run was submitted");
    };
    let mut pkgs: Vec<PackageReport> = packages.into_values().collect();
    for p in &mut pkgs {
        if let Some(list) = fixes.get(&p.attr) {
            p.hash_fixes = list.clone();
        }
        if unverified.contains(&p.attr) {
            p.reason = format!(
                "hashes filled in during the last round (--max-rounds {max_rounds}) were not verified by a build; raise --max-rounds"
            );
        } else if let Some(why) = unlocated.get(&p.attr)
            && p.status() == PackageStatus::NeedsHash
        {
            p.reason = format!("{}; {}", p.reason, why.join("; "));
        } else if fixing && p.status() == PackageStatus::Ready && !p.hash_fixes.is_empty() {
            p.reason = format!(
                "builds with {} filled-in hash(es) (see hash_fixes)",
                p.hash_fixes.len()
            );
        }
    }
    let mut report = Report::new(
        first.run_id.clone(),
        last_state,
        first.label.clone(),
        last_error,
        pkgs,
    );
    // The flake's other outputs do not change with the hashes: the first round's stand.
    report.repository = first.repository.clone();
    if first.state == nixfarm_core::RunState::Failed {
        report = first;
    }
    if fixing {
        report.fix_rounds = rounds;
        let changed: Tree = current
            .into_iter()
            .filter(|(k, v)| checkout.original.get(k) != Some(v))
            .collect();
        let patch = nixfarm_fix::unified_diff(&checkout.original, &changed);
        if let Some(path) = &fix.patch_out {
            std::fs::write(path, &patch)
                .with_context(|| format!("cannot write the patch to {}", path.display()))?;
            eprintln!(
                "wrote {} ({} file(s) changed)",
                path.display(),
                changed.len()
            );
        }
        if fix.apply {
            apply_to_checkout(&checkout, &changed)?;
        }
    }
    Ok(Outcome {
        report,
        detached: false,
    })
}

/// Writes the edited files into the checkout, all or nothing, after checking that none of
/// them changed since the submit.
fn apply_to_checkout(checkout: &Checkout, changed: &Tree) -> anyhow::Result<()> {
    if changed.is_empty() {
        eprintln!("nothing to apply: no hash needed filling in");
        return Ok(());
    }
    for file in changed.keys() {
        let full = checkout.dir.join(file);
        let now =
            std::fs::read(&full).with_context(|| format!("cannot read {}", full.display()))?;
        if checkout.original.get(file).map(|s| s.as_bytes()) != Some(now.as_slice()) {
            bail!(
                "refusing to apply: {file} changed since the submit; nothing was written (use --patch-out and merge by hand)"
            );
        }
    }
    let mut staged = Vec::new();
    for (file, text) in changed {
        let full = checkout.dir.join(file);
        let tmp = full.with_extension("nix.nixfarm-tmp");
        let perms = std::fs::metadata(&full)?.permissions();
        if let Err(e) =
            std::fs::write(&tmp, text).and_then(|_| std::fs::set_permissions(&tmp, perms))
        {
            for (t, _) in &staged {
                let _ = std::fs::remove_file(t);
            }
            let _ = std::fs::remove_file(&tmp);
            return Err(e).with_context(|| format!("cannot write {}", tmp.display()));
        }
        staged.push((tmp, full));
    }
    for (tmp, full) in &staged {
        std::fs::rename(tmp, full).with_context(|| format!("cannot replace {}", full.display()))?;
    }
    eprintln!(
        "applied hash fixes to {} file(s) in {}",
        staged.len(),
        checkout.dir.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkout() -> (tempfile::TempDir, Checkout, Tree) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("flake.nix"), "{ }").unwrap();
        std::fs::create_dir(dir.path().join("pkgs")).unwrap();
        std::fs::write(dir.path().join("pkgs/a.nix"), "{ hash = lib.fakeHash; }\n").unwrap();
        std::fs::write(dir.path().join("pkgs/b.nix"), "{ hash = lib.fakeHash; }\n").unwrap();
        let c = Checkout::read(dir.path()).unwrap();
        let mut changed = Tree::new();
        for f in ["pkgs/a.nix", "pkgs/b.nix"] {
            changed.insert(f.into(), "{ hash = \"sha256-x\"; }\n".into());
        }
        (dir, c, changed)
    }

    #[test]
    fn apply_writes_every_file() {
        let (dir, c, changed) = checkout();
        assert_eq!(c.original.len(), 3);
        apply_to_checkout(&c, &changed).unwrap();
        for f in ["pkgs/a.nix", "pkgs/b.nix"] {
            assert_eq!(
                std::fs::read_to_string(dir.path().join(f)).unwrap(),
                changed[f]
            );
        }
    }

    #[test]
    fn apply_refuses_when_a_file_changed_since_the_submit_and_writes_nothing() {
        let (dir, c, changed) = checkout();
        std::fs::write(
            dir.path().join("pkgs/b.nix"),
            "{ hash = lib.fakeHash; x = 1; }\n",
        )
        .unwrap();
        let err = apply_to_checkout(&c, &changed).unwrap_err().to_string();
        assert!(err.contains("pkgs/b.nix changed since the submit"), "{err}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("pkgs/a.nix")).unwrap(),
            "{ hash = lib.fakeHash; }\n",
            "nothing written"
        );
        let leftovers = std::fs::read_dir(dir.path().join("pkgs")).unwrap().count();
        assert_eq!(leftovers, 2);
    }
}
