//! `--fix-hashes`: fills in each hash-broken package's hashes and builds it again, stage by
//! stage, until it builds or fails for another reason. A package's next stage starts as soon
//! as its own mismatches are known (a run of that package only, beside the others), and the
//! session hands back the edits (report, unified diff, or the checkout itself with `--apply`).

use crate::checkout::{Checkout, apply_to_checkout};
use crate::cmd::submit::{report_of, submit};
use crate::fix_asks::Asks;
use crate::{Client, RunArgs, watch};
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
    /// Most runs of one package with --fix-hashes, its stages (a source hash plus a
    /// dependency bundle needs 3: find the source hash, find the bundle's, verify). Each
    /// package goes through its stages on its own, not in lockstep with the others.
    #[arg(long, default_value_t = 5, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100))]
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

/// What a fixing session ends with.
pub struct Outcome {
    pub report: Report,
    /// Exit code 130 when the user detached from a round.
    pub detached: bool,
    /// Why `--apply` wrote nothing: said after the report, which stands regardless.
    pub not_applied: Option<anyhow::Error>,
}

/// Most runs of one session in flight at once; more packages ready for their next stage
/// wait and go together in the next run.
const MAX_LIVE_RUNS: usize = 8;

/// What a followed run tells the session.
enum Note {
    /// One of the run's builds ended; `mismatch` when it was a hash mismatch.
    Finished { run: String, mismatch: bool },
    Ended {
        run: String,
        end: anyhow::Result<watch::End>,
    },
}

/// A fixing session: the checkout's text as edited so far and what each package came to.
struct Session<'a> {
    client: &'a Client,
    dir: &'a Path,
    run_args: &'a RunArgs,
    fixing: bool,
    max_rounds: u32,
    checkout: Checkout,
    current: Tree,
    /// Each package as the run that decides it (its latest) reported it.
    packages: BTreeMap<String, PackageReport>,
    fixes: BTreeMap<String, Vec<HashFix>>,
    unlocated: BTreeMap<String, Vec<String>>,
    /// Every run of the session, in the order submitted.
    runs: Vec<String>,
    /// Each package's stage (1: the first run) and the run that decides it.
    stage: BTreeMap<String, u32>,
    latest: BTreeMap<String, String>,
    /// Needs-hash packages already acted on, per run.
    handled: BTreeSet<(String, String)>,
    /// Fixed-output derivations whose hash the session has filled in: (derivation, got).
    /// A package whose mismatch is only in one of them (a dependency's source, say) needs no
    /// fix of its own, only its next stage.
    filled: BTreeSet<(nixfarm_core::StorePath, nixfarm_core::Sri)>,
    /// The values the session wrote: (as it was, as it is now). A mismatch from another
    /// derivation with the same pair whose text cannot be found any more had its value in
    /// a place it shares (a hash file several packages import): it needs only its stage.
    written: BTreeSet<(nixfarm_core::Sri, nixfarm_core::Sri)>,
    /// Packages that go on with hashes another package's fix wrote: the values they got.
    refilled: BTreeMap<String, Vec<nixfarm_core::Sri>>,
    unverified: BTreeSet<String>,
    /// Runs with a hash mismatch so far: the only ones worth asking mid-run.
    mismatched: BTreeSet<String>,
    /// Packages whose next stage waits for a run of the session to end (at most
    /// [`MAX_LIVE_RUNS`] at once: the coordinator bounds the runs in flight).
    pending: Vec<String>,
    live: usize,
    first: Option<Report>,
    last_state: nixfarm_core::RunState,
    last_error: String,
    printer: watch::Printer,
    tx: tokio::sync::mpsc::UnboundedSender<Note>,
}

impl Session<'_> {
    /// Submits a run of `only` (every package when empty) with the fixes so far and follows
    /// it; the first run gets the progress bar, later ones say only how they ended.
    async fn launch(&mut self, only: &[String]) -> anyhow::Result<String> {
        let overrides = self.checkout.overrides(&self.current);
        let id = submit(
            self.client,
            &self.dir.to_string_lossy(),
            self.run_args,
            &overrides,
            only,
            // A later stage's packages were evaluated by the first run: no listing again;
            // and the first run's report reads over it.
            self.runs.first().map(String::as_str),
        )
        .await?;
        let view = if self.runs.is_empty() {
            let v = watch::View::live();
            self.printer = v.printer();
            if self.fixing {
                self.printer.say(format!("run {id}: every package"));
            } else {
                self.printer.say(format!("submitted run {id}"));
            }
            v
        } else {
            let stage = only
                .iter()
                .filter_map(|a| self.stage.get(a))
                .max()
                .copied()
                .unwrap_or(2);
            self.printer.say(format!(
                "run {id}: stage {stage} of {} with filled-in hashes",
                only.join(", ")
            ));
            watch::View::quiet(self.printer.clone())
        };
        self.runs.push(id.clone());
        self.live += 1;
        let (client, tx, run) = (self.client.clone(), self.tx.clone(), id.clone());
        tokio::spawn(async move {
            let (notes, r) = (tx.clone(), run.clone());
            // Its end is told whatever happens while following: a follower that died
            // without a word would leave the session waiting for it for ever.
            let end = tokio::spawn(async move {
                watch::watch_with(&client, &r.clone(), view, move |e| {
                    if let nixfarm_core::RunEvent::JobFinished { outcome, .. } = e {
                        let _ = notes.send(Note::Finished {
                            run: r.clone(),
                            mismatch: *outcome == nixfarm_core::BuildOutcome::HashMismatch,
                        });
                    }
                })
                .await
            })
            .await
            .unwrap_or_else(|e| Err(anyhow::anyhow!("following run {run} stopped: {e}")));
            let _ = tx.send(Note::Ended { run, end });
        });
        Ok(id)
    }

    /// Takes in a run's report, mid-run (`ended` false: only its settled needs-hash
    /// packages matter) or at its end; a package whose hashes are now filled in goes on at
    /// once in a run of its own, without waiting for the rest.
    async fn absorb(&mut self, report: Report, ended: bool) -> anyhow::Result<()> {
        let run = report.run_id.clone();
        let mine = |s: &Self, attr: &str| s.latest.get(attr).is_none_or(|r| *r == run);
        if ended {
            // A run that failed as a whole (its evaluation, say) is the session's outcome.
            if self.last_state != nixfarm_core::RunState::Failed {
                self.last_state = report.state;
                self.last_error = report.error.clone();
            }
            if self.runs.first() == Some(&run) {
                self.first = Some(report.clone());
            }
        }
        let mut settled = Vec::new();
        for p in &report.packages {
            if !mine(self, &p.attr) {
                continue;
            }
            if ended {
                self.packages.insert(p.attr.clone(), p.clone());
                self.stage.entry(p.attr.clone()).or_insert(1);
                self.latest.entry(p.attr.clone()).or_insert(run.clone());
            }
            if p.status() == PackageStatus::NeedsHash
                && self.handled.insert((run.clone(), p.attr.clone()))
            {
                settled.push(p.clone());
            }
        }
        if settled.is_empty() {
            return Ok(());
        }
        // Bounded, whatever a report says: each mismatch may cost a look through every
        // `.nix` file of the checkout.
        let mut budget = nixfarm_core::limits::MAX_MISMATCHES;
        for p in &mut settled {
            let n = p.hash_mismatches.len();
            let keep = n
                .min(nixfarm_core::limits::MAX_MISMATCHES_PER_PACKAGE)
                .min(budget);
            if keep < n {
                p.hash_mismatches.truncate(keep);
                self.unlocated
                    .entry(p.attr.clone())
                    .or_default()
                    .push(format!(
                        "{} hash mismatch(es) not looked for: more than the fixer takes at once",
                        n - keep
                    ));
            }
            budget -= keep;
        }
        // What another package's fix filled in already is not this package's to fix again
        // (its text is no longer there to be found): it only needs its next stage.
        let mut refilled = Vec::new();
        let mut to_plan = Vec::new();
        for p in &settled {
            let mut left = p.clone();
            left.hash_mismatches
                .retain(|m| !self.filled.contains(&(m.fod_drv.clone(), m.got.clone())));
            if left.hash_mismatches.is_empty() {
                refilled.push(p.attr.clone());
            } else {
                to_plan.push(left);
            }
        }
        let part = Report::new(
            run.clone(),
            report.state,
            report.label.clone(),
            String::new(),
            to_plan,
        );
        let mut plan = nixfarm_fix::report::plan_report(&part, &self.current);
        let mut by_value = BTreeSet::new();
        plan.unlocated.retain(|u| {
            let written = self
                .written
                .contains(&(u.mismatch.specified.clone(), u.mismatch.got.clone()));
            if written {
                by_value.insert(u.attr.clone());
            }
            !written
        });
        for attr in by_value {
            let waits = plan.fixes.contains_key(&attr)
                || plan.unlocated.iter().any(|u| u.attr == attr)
                || refilled.contains(&attr);
            if !waits {
                refilled.push(attr);
            }
        }
        for attr in &refilled {
            if let Some(p) = settled.iter().find(|p| p.attr == *attr) {
                self.refilled.insert(
                    attr.clone(),
                    p.hash_mismatches.iter().map(|m| m.got.clone()).collect(),
                );
            }
        }
        for u in &plan.unlocated {
            self.unlocated
                .entry(u.attr.clone())
                .or_default()
                .push(format!(
                    "cannot fill in {} for {}: {}",
                    u.mismatch.got,
                    u.mismatch.fod_name(),
                    u.why
                ));
        }
        // A place several packages need (a library's source hash, and each package that
        // depends on it) is one fix: it is listed under the package whose file holds it, else
        // under the first that needed it.
        let mut owners: BTreeMap<(&str, usize), (&String, &nixfarm_fix::Fix)> = BTreeMap::new();
        for (attr, list) in &plan.fixes {
            let own = settled
                .iter()
                .find(|p| p.attr == *attr)
                .and_then(|p| nixfarm_fix::relative_position(&p.position, &self.current));
            for fix in list {
                let place = owners.entry((fix.file.as_str(), fix.start));
                if own.as_deref() == Some(fix.file.as_str()) {
                    place.insert_entry((attr, fix));
                } else {
                    place.or_insert((attr, fix));
                }
            }
        }
        // A package whose every fix is listed under another (the one whose file holds it)
        // builds on that package's fix: said so at the end.
        for (attr, list) in &plan.fixes {
            if !owners.values().any(|(owner, _)| *owner == attr) {
                self.refilled
                    .insert(attr.clone(), list.iter().map(|f| f.new.clone()).collect());
            }
        }
        for (attr, fix) in owners.into_values() {
            self.fixes
                .entry(attr.clone())
                .or_default()
                .push(nixfarm_fix::report::to_hash_fix(fix));
        }
        for p in &settled {
            for m in &p.hash_mismatches {
                let fixed = plan
                    .fixes
                    .get(&p.attr)
                    .is_some_and(|l| l.iter().any(|f| f.old == m.specified && f.new == m.got));
                if fixed {
                    self.filled.insert((m.fod_drv.clone(), m.got.clone()));
                    self.written.insert((m.specified.clone(), m.got.clone()));
                }
            }
        }
        if !self.fixing || (plan.fixes.is_empty() && refilled.is_empty()) || self.first_failed() {
            return Ok(());
        }
        let edited = nixfarm_fix::apply(&self.current, plan.fixes.values().flatten())
            .context("cannot apply the hash fixes to the submitted tree")?;
        for (file, text) in edited {
            self.current.insert(file, text);
        }
        let mut next = Vec::new();
        for attr in plan.fixes.keys().chain(&refilled) {
            // Until its next run reports, the package stands as this one said.
            if let Some(p) = settled.iter().find(|p| p.attr == *attr) {
                self.packages.insert(attr.clone(), p.clone());
            }
            let stage = self.stage.get(attr).copied().unwrap_or(1);
            if stage >= self.max_rounds {
                self.unverified.insert(attr.clone());
            } else {
                self.stage.insert(attr.clone(), stage + 1);
                next.push(attr.clone());
            }
        }
        self.pending.extend(next);
        self.flush().await
    }

    /// Starts the next stage of the packages waiting for one, when a run may start.
    async fn flush(&mut self) -> anyhow::Result<()> {
        if self.pending.is_empty() || self.live >= MAX_LIVE_RUNS {
            return Ok(());
        }
        let next = std::mem::take(&mut self.pending);
        let id = self.launch(&next).await?;
        for attr in next {
            self.latest.insert(attr, id.clone());
        }
        Ok(())
    }

    fn first_failed(&self) -> bool {
        self.first
            .as_ref()
            .is_some_and(|f| f.state == nixfarm_core::RunState::Failed)
    }
}

/// Submits `dir` and, with `fix.enabled()`, keeps going until every package with filled-in
/// hashes has built or failed for another reason: each package's next stage starts the
/// moment its own mismatches are known, beside the rest of the run, and evaluates only that
/// package. Without fixing, the single run's report still gets each needs-hash package's
/// `hash_fixes`.
pub async fn run(
    client: &Client,
    dir: &Path,
    run_args: &RunArgs,
    fix: &FixArgs,
) -> anyhow::Result<Outcome> {
    let reader = match crate::source::entry_file(dir, run_args.file.as_deref())? {
        Some(_) => crate::source::Reader::File,
        None => crate::source::Reader::Flake,
    };
    // The tree the snapshot is of: a flake's repository, for one in a subdirectory of it.
    let (root, _) = crate::source::snapshot_root(dir, reader)?;
    let checkout = Checkout::read(&root, reader)?;
    let fixing = fix.enabled();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut s = Session {
        client,
        dir,
        run_args,
        fixing,
        max_rounds: if fixing { fix.max_rounds.max(1) } else { 1 },
        current: checkout.original.clone(),
        checkout,
        packages: BTreeMap::new(),
        fixes: BTreeMap::new(),
        unlocated: BTreeMap::new(),
        runs: Vec::new(),
        stage: BTreeMap::new(),
        latest: BTreeMap::new(),
        handled: BTreeSet::new(),
        filled: BTreeSet::new(),
        written: BTreeSet::new(),
        refilled: BTreeMap::new(),
        unverified: BTreeSet::new(),
        mismatched: BTreeSet::new(),
        pending: Vec::new(),
        live: 0,
        first: None,
        last_state: nixfarm_core::RunState::Evaluating,
        last_error: String::new(),
        printer: watch::Printer::default(),
        tx,
    };
    let first_id = s.launch(&run_args.attrs).await?;
    let mut asks = Asks::default();
    while s.live > 0 {
        // A note, or the moment a held-back report question is due, whichever comes first.
        let due = asks.next_due();
        let mut notes = Vec::new();
        tokio::select! {
            n = rx.recv() => match n {
                Some(n) => notes.push(n),
                None => break,
            },
            () = async {
                match due {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
        // Everything already waiting, then one report per run that needs one.
        while let Ok(n) = rx.try_recv() {
            notes.push(n);
        }
        let mut ask: BTreeSet<String> = asks.due(std::time::Instant::now());
        let mut ended = Vec::new();
        for n in notes {
            match n {
                Note::Finished { run, mismatch } => {
                    if mismatch {
                        s.mismatched.insert(run.clone());
                    }
                    if fixing && s.mismatched.contains(&run) {
                        ask.insert(run);
                    }
                }
                Note::Ended { run, end } => ended.push((run, end)),
            }
        }
        for (run, end) in ended {
            s.live -= 1;
            ask.remove(&run);
            asks.forget(&run);
            if let watch::End::Detached = end? {
                watch::say_detached(std::slice::from_ref(&run));
                let report = report_of(client, &run, true).await?;
                return Ok(Outcome {
                    report,
                    detached: true,
                    not_applied: None,
                });
            }
            let report = report_of(client, &run, true).await?;
            s.absorb(report, true).await?;
            s.flush().await?;
        }
        for run in ask {
            if !asks.may_ask(&run, std::time::Instant::now()) {
                continue;
            }
            // Mid-run: a package's needs-hash status is final once reported (the coordinator
            // keeps it pending while anything in its closure still builds).
            let at = std::time::Instant::now();
            let report = report_of(client, &run, true).await?;
            asks.asked(&run, at, at.elapsed());
            s.absorb(report, false).await?;
        }
    }
    let Some(first) = s.first.clone() else {
        bail!("run {first_id} reported nothing");
    };
    let max_rounds = s.max_rounds;
    let mut pkgs: Vec<PackageReport> = std::mem::take(&mut s.packages).into_values().collect();
    for p in &mut pkgs {
        if let Some(list) = s.fixes.get(&p.attr) {
            p.hash_fixes = list.clone();
        }
        if s.unverified.contains(&p.attr) {
            p.reason = format!(
                "hashes filled in during the last round (--max-rounds {max_rounds}) were not verified by a build; raise --max-rounds"
            );
        } else if let Some(why) = s.unlocated.get(&p.attr)
            && p.status() == PackageStatus::NeedsHash
        {
            p.reason = format!("{}; {}", p.reason, why.join("; "));
        } else if fixing && p.status() == PackageStatus::Ready && !p.hash_fixes.is_empty() {
            p.reason = format!(
                "builds with {} filled-in hash(es) (see hash_fixes)",
                p.hash_fixes.len()
            );
        } else if let Some(gots) = s.refilled.get(&p.attr)
            && fixing
            && p.status() == PackageStatus::Ready
        {
            // Ready on the fixes only: the checkout as submitted does not build it.
            let owners: BTreeSet<&String> = s
                .fixes
                .iter()
                .filter(|(_, list)| list.iter().any(|f| gots.contains(&f.new)))
                .map(|(attr, _)| attr)
                .collect();
            let owners: Vec<&str> = owners.into_iter().map(String::as_str).collect();
            p.reason = format!(
                "builds with hash(es) filled in for {} (see their hash_fixes)",
                if owners.is_empty() {
                    "other packages".to_string()
                } else {
                    owners.join(", ")
                }
            );
        }
    }
    let mut report = Report::new(
        first.run_id.clone(),
        s.last_state,
        first.label.clone(),
        s.last_error.clone(),
        pkgs,
    );
    // The flake's other outputs do not change with the hashes: the first run's stand.
    report.repository = first.repository.clone();
    if first.state == nixfarm_core::RunState::Failed {
        report = first;
    }
    let mut not_applied = None;
    if fixing {
        report.fix_rounds = s.runs.clone();
        let changed: Tree = s
            .current
            .into_iter()
            .filter(|(k, v)| s.checkout.original.get(k) != Some(v))
            .collect();
        let patch = nixfarm_fix::unified_diff(&s.checkout.original, &changed);
        if let Some(path) = &fix.patch_out {
            std::fs::write(path, &patch)
                .with_context(|| format!("cannot write the patch to {}", path.display()))?;
            note!(
                "wrote {} ({} file(s) changed)",
                path.display(),
                changed.len()
            );
        }
        if fix.apply {
            not_applied = apply_to_checkout(&s.checkout, &changed).err();
        }
    }
    Ok(Outcome {
        report,
        detached: false,
        not_applied,
    })
}
