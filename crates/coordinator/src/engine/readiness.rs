//! The readiness rule: a package's status and reason from its derivations' outcomes.

use super::copied::copied_note;
use super::*;

/// Derives one package's status and reason from its evaluation and its closure's builds.
pub(super) fn package_report(
    attr: &str,
    p: &PackageInfo,
    run_state: RunState,
    results: &HashMap<&str, (DrvState, BuildReport)>,
    nodes: &HashMap<&str, DrvNode>,
    top_of: &HashMap<String, String>,
    tainted: &HashSet<&str>,
) -> PackageReport {
    let mut r = PackageReport {
        kind: nixfarm_core::report::PackageKind::of(attr),
        attr: attr.to_string(),
        status: PackageStatus::Pending,
        reason: String::new(),
        pname: p.pname.clone(),
        version: p.version.clone(),
        drv_path: p.drv_path.clone(),
        outputs: p.outputs.clone(),
        pinned: p.rev.is_empty() || rev_is_pinned(&p.rev),
        rev: p.rev.clone(),
        position: p.position.clone(),
        duration_ms: 0,
        agent: String::new(),
        failed_dependency: String::new(),
        hash_mismatches: vec![],
        hash_fixes: vec![],
        log_tail: String::new(),
        smoke: nixfarm_core::Smoke::NotRun,
    };
    let set = |r: &mut PackageReport, st: PackageStatus, reason: String| {
        r.status = st;
        r.reason = reason;
    };
    if !p.eval_error.is_empty() {
        set(&mut r, PackageStatus::EvalFailed, p.eval_error.clone());
        return r;
    }
    let Some((state, rep)) = results.get(p.drv_path.as_deref().unwrap_or("")) else {
        let (st, reason) = not_built(run_state);
        set(&mut r, st, reason);
        return r;
    };
    r.duration_ms = rep.duration_ms;
    r.agent = rep.agent.clone();
    r.smoke = rep.smoke;
    if !rep.outputs.is_empty() {
        r.outputs = rep.outputs.clone();
    }
    // Every hash mismatch in the closure: a package can need several hashes at once. Only a
    // closure that holds one (or a fake hash), or a failed dependency, needs walking.
    let closure = match &p.drv_path {
        Some(top) if tainted.contains(top.as_str()) || *state == DrvState::DependencyFailed => {
            closure_of(top, nodes)
        }
        _ => Vec::new(),
    };
    let mismatches = closure_mismatches(&closure, results, nodes);
    r.hash_mismatches = mismatches.clone();
    match *state {
        DrvState::Built => {
            let fake: Vec<&str> = closure
                .iter()
                .filter(|d| nodes.get(d.as_str()).is_some_and(has_fake_hash))
                .map(|d| store_name(d))
                .collect();
            if !fake.is_empty() {
                // Nix only accepts a fake hash when the output is already valid: what the
                // package built against is unverified.
                set(
                    &mut r,
                    PackageStatus::NeedsHash,
                    format!(
                        "fixed-output derivation {} succeeded with a fake hash (its output was already in a store or cache); set its real hash",
                        fake.join(", ")
                    ),
                );
            } else if rep.smoke == nixfarm_core::Smoke::Failed {
                // It builds, but what users run dies at start. The agent's output starts with
                // what it ran and how that ended; its last line is usually the cause.
                r.log_tail = rep.smoke_output.clone();
                let mut lines = rep.smoke_output.lines().filter(|l| !l.trim().is_empty());
                let ran = lines.next().unwrap_or("the main program failed");
                let cause = lines.next_back().unwrap_or_default();
                set(
                    &mut r,
                    PackageStatus::SmokeFailed,
                    if cause.is_empty() {
                        format!("smoke test: {ran}")
                    } else {
                        format!(
                            "smoke test: {ran}: {}",
                            nixfarm_core::limits::clip(cause, 300)
                        )
                    },
                );
            } else if rep.kind == BuildOutcome::NotCached {
                set(&mut r, PackageStatus::NotCached, rep.message.clone());
            } else if r.pinned {
                set(
                    &mut r,
                    PackageStatus::Ready,
                    if rep.substituted {
                        "already in the cache".into()
                    } else {
                        String::new()
                    },
                );
            } else {
                set(
                    &mut r,
                    PackageStatus::Unpinned,
                    if (7..40).contains(&p.rev.len())
                        && p.rev.bytes().all(|b| b.is_ascii_hexdigit())
                    {
                        format!(
                            "source rev '{}' looks like an abbreviated commit id: a full one (40 hex digits, or 64) cannot come to name another commit",
                            p.rev
                        )
                    } else {
                        format!(
                            "source rev '{}' is a branch or tag name, not a commit",
                            p.rev
                        )
                    },
                );
            }
        }
        DrvState::Failed => {
            r.log_tail = rep.log_tail.clone();
            match rep.kind {
                BuildOutcome::HashMismatch => set(
                    &mut r,
                    PackageStatus::NeedsHash,
                    format!(
                        "hash mismatch in {}: specified {}, got {}{}",
                        store_name(p.drv_path.as_deref().unwrap_or("")),
                        rep.specified.as_deref().unwrap_or("?"),
                        rep.got.as_deref().unwrap_or("?"),
                        copied_note(
                            rep,
                            p.drv_path.as_deref().unwrap_or(""),
                            nodes,
                            results,
                            top_of
                        )
                    ),
                ),
                BuildOutcome::TimedOut => set(&mut r, PackageStatus::TimedOut, rep.message.clone()),
                BuildOutcome::InfraFailed => {
                    set(&mut r, PackageStatus::InfraFailed, rep.message.clone())
                }
                BuildOutcome::NotReproducible => {
                    set(&mut r, PackageStatus::NotReproducible, rep.message.clone())
                }
                BuildOutcome::BuildFailed
                | BuildOutcome::Built
                | BuildOutcome::NotCached
                | BuildOutcome::Cancelled
                | BuildOutcome::DependencyFailed => {
                    set(&mut r, PackageStatus::BuildFailed, rep.message.clone())
                }
            }
        }
        // Which dependency failure decides the status (a hash mismatch anywhere in the closure
        // wins) is only known once nothing in the closure is still building: until then it
        // stays pending, so a status once reported never changes.
        DrvState::DependencyFailed
            if closure
                .iter()
                .any(|d| matches!(results.get(d.as_str()), Some((DrvState::Waiting, _))))
                && !run_state.is_terminal() =>
        {
            set(
                &mut r,
                PackageStatus::Pending,
                "a dependency failed; waiting for the rest of its closure".into(),
            );
        }
        DrvState::DependencyFailed => {
            let root = rep.failed_root.as_deref().unwrap_or_default();
            let root_rep = results
                .get(root)
                .map(|(_, b)| b.clone())
                .unwrap_or_default();
            r.log_tail = root_rep.log_tail.clone();
            if !mismatches.is_empty() {
                let list: Vec<String> = mismatches
                    .iter()
                    .map(|m| {
                        let note = results
                            .get(m.fod_drv.as_str())
                            .map(|(_, b)| {
                                copied_note(b, m.fod_drv.as_str(), nodes, results, top_of)
                            })
                            .unwrap_or_default();
                        format!(
                            "{}: specified {}, got {}{note}",
                            store_name(&m.fod_drv),
                            m.specified,
                            m.got
                        )
                    })
                    .collect();
                set(
                    &mut r,
                    PackageStatus::NeedsHash,
                    format!("hash mismatch in {}", list.join("; ")),
                );
            } else {
                let name = top_of
                    .get(root)
                    .cloned()
                    .unwrap_or_else(|| store_name(root).to_string());
                r.failed_dependency = name.clone();
                // The dependency's own cause, not just its kind: "infra-failed" alone says
                // nothing a user can act on.
                let cause = root_rep.message.lines().next().unwrap_or_default();
                let mut reason = if cause.is_empty() {
                    format!("dependency {name} failed: {}", root_rep.kind)
                } else {
                    format!(
                        "dependency {name} failed: {}: {}",
                        root_rep.kind,
                        nixfarm_core::limits::clip(cause, 300)
                    )
                };
                // A machine's failure says which machine.
                if root_rep.kind == BuildOutcome::InfraFailed
                    && !root_rep.agent.is_empty()
                    && !reason.contains(&root_rep.agent)
                {
                    reason.push_str(&format!(" (on agent {})", root_rep.agent));
                }
                set(&mut r, PackageStatus::DependencyFailed, reason);
            }
        }
        DrvState::Cancelled => set(
            &mut r,
            PackageStatus::Cancelled,
            "the run was cancelled".into(),
        ),
        DrvState::Waiting => {
            let (st, reason) = not_built(run_state);
            set(&mut r, st, reason);
        }
    }
    r
}

/// A package not built (yet): pending while the run goes on; once the run has ended
/// (cancelled, or failed as a whole) it never will be, and it says so.
fn not_built(run_state: RunState) -> (PackageStatus, String) {
    match run_state {
        RunState::Cancelled => (PackageStatus::Cancelled, "the run was cancelled".into()),
        RunState::Failed => (
            PackageStatus::Cancelled,
            "not built: the run failed (see its error)".into(),
        ),
        RunState::Queued | RunState::Evaluating | RunState::Building | RunState::Finished => {
            (PackageStatus::Pending, String::new())
        }
    }
}

/// Every derivation in a package's build closure, the package's own first.
pub(super) fn closure_of<'a>(
    top: &'a StorePath,
    nodes: &'a HashMap<&str, DrvNode>,
) -> Vec<&'a StorePath> {
    let mut seen = HashSet::new();
    let mut stack = vec![top];
    let mut out = Vec::new();
    while let Some(d) = stack.pop() {
        if !seen.insert(d) {
            continue;
        }
        if let Some(n) = nodes.get(d.as_str()) {
            stack.extend(n.input_drvs.iter());
        }
        out.push(d);
    }
    out
}

/// Derivations whose closure holds a hash mismatch or a fake hash (found upwards from those,
/// once per report): every other package's closure is clean and is not walked.
pub(super) fn tainted<'a>(
    nodes: &'a HashMap<&'a str, DrvNode>,
    results: &HashMap<&str, (DrvState, BuildReport)>,
) -> HashSet<&'a str> {
    let mut parents: HashMap<&'a str, Vec<&'a str>> = HashMap::new();
    for (d, n) in nodes {
        for i in &n.input_drvs {
            parents.entry(i.as_str()).or_default().push(d);
        }
    }
    let mut stack: Vec<&'a str> = nodes
        .iter()
        .filter(|(d, n)| {
            has_fake_hash(n)
                || results
                    .get(**d)
                    .is_some_and(|(_, r)| r.kind == BuildOutcome::HashMismatch)
        })
        .map(|(d, _)| *d)
        .collect();
    let mut out = HashSet::new();
    while let Some(d) = stack.pop() {
        if out.insert(d)
            && let Some(ps) = parents.get(d)
        {
            stack.extend(ps.iter().copied());
        }
    }
    out
}

/// A fixed output whose stated hash is all zeros (`lib.fakeHash`, `lib.fakeSha256`, `""`).
pub(super) fn has_fake_hash(n: &DrvNode) -> bool {
    n.fixed_output
        && nixfarm_nix::hash::Hash::parse(&n.output_hash, None)
            .is_some_and(|h| h.digest.iter().all(|&b| b == 0))
}

pub(super) fn closure_mismatches(
    closure: &[&StorePath],
    results: &HashMap<&str, (DrvState, BuildReport)>,
    nodes: &HashMap<&str, DrvNode>,
) -> Vec<HashMismatch> {
    let mut out: Vec<HashMismatch> = closure
        .iter()
        .filter_map(|d| {
            let (_, rep) = results.get(d.as_str())?;
            if rep.kind != BuildOutcome::HashMismatch {
                return None;
            }
            // Checked at the wire; a result an older coordinator stored unchecked has none.
            let (Some(specified), Some(got)) = (rep.specified.clone(), rep.got.clone()) else {
                return None;
            };
            Some(HashMismatch {
                fod_drv: (*d).clone(),
                specified,
                got,
                hints: nodes
                    .get(d.as_str())
                    .map(|n| n.hints.clone())
                    .unwrap_or_default(),
            })
        })
        .collect();
    out.sort_by(|a, b| a.fod_drv.cmp(&b.fod_drv));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOP: &str = "/nix/store/00000000000000000000000000000000-app.drv";
    const DEP: &str = "/nix/store/11111111111111111111111111111111-lib.drv";
    const SRC: &str = "/nix/store/22222222222222222222222222222222-source.drv";

    /// app -> lib -> source; `results` by derivation, then the package report of app.
    fn app(
        results: &[(&str, DrvState, BuildReport)],
        rev: &str,
        run_state: RunState,
    ) -> PackageReport {
        let node = |inputs: &[&str], fod: bool| DrvNode {
            system: "x86_64-linux".into(),
            input_drvs: inputs.iter().map(|s| sp(s)).collect(),
            fixed_output: fod,
            output_hash: if fod {
                "sha256-61WeR6/hoYwd5GsHVR2+sgD/QcMTsCKiZHJ7o8yKEbQ=".into()
            } else {
                String::new()
            },
            ..Default::default()
        };
        let nodes: HashMap<&str, DrvNode> = [
            (TOP, node(&[DEP], false)),
            (DEP, node(&[SRC], false)),
            (SRC, node(&[], true)),
        ]
        .into();
        let results: HashMap<&str, (DrvState, BuildReport)> = results
            .iter()
            .map(|(d, s, r)| (*d, (*s, r.clone())))
            .collect();
        let top_of: HashMap<String, String> = [(DEP.to_string(), "lib".to_string())].into();
        let info = PackageInfo {
            drv_path: Some(sp(TOP)),
            rev: rev.into(),
            ..Default::default()
        };
        let tainted = tainted(&nodes, &results);
        package_report("app", &info, run_state, &results, &nodes, &top_of, &tainted)
    }

    fn outcome(kind: BuildOutcome, message: &str) -> BuildReport {
        BuildReport {
            kind,
            message: message.into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_readiness_rule() {
        let built = outcome(BuildOutcome::Built, "");
        let pinned = "0123456789abcdef0123456789abcdef01234567";
        // Built and pinned: ready. Built from a branch: unpinned.
        let all_built = [
            (TOP, DrvState::Built, built.clone()),
            (DEP, DrvState::Built, built.clone()),
            (SRC, DrvState::Built, built.clone()),
        ];
        assert_eq!(
            app(&all_built, pinned, RunState::Finished).status,
            PackageStatus::Ready
        );
        let r = app(&all_built, "main", RunState::Finished);
        assert_eq!(r.status, PackageStatus::Unpinned);
        assert!(r.reason.contains("'main'"), "{}", r.reason);
        // An abbreviated commit is said to be one, not taken for a branch.
        let r = app(&all_built, "0123abc", RunState::Finished);
        assert_eq!(r.status, PackageStatus::Unpinned);
        assert!(
            r.reason
                .contains("'0123abc' looks like an abbreviated commit id"),
            "{}",
            r.reason
        );
        // Built but not pushed: not-cached.
        let r = app(
            &[(
                TOP,
                DrvState::Built,
                outcome(BuildOutcome::NotCached, "push failed"),
            )],
            pinned,
            RunState::Finished,
        );
        assert_eq!(r.status, PackageStatus::NotCached);
        // Its own failures, by kind.
        for (kind, status) in [
            (BuildOutcome::BuildFailed, PackageStatus::BuildFailed),
            (BuildOutcome::TimedOut, PackageStatus::TimedOut),
            (BuildOutcome::InfraFailed, PackageStatus::InfraFailed),
            (
                BuildOutcome::NotReproducible,
                PackageStatus::NotReproducible,
            ),
        ] {
            let r = app(
                &[(TOP, DrvState::Failed, outcome(kind, "why"))],
                pinned,
                RunState::Finished,
            );
            assert_eq!(r.status, status, "{kind}");
            assert_eq!(r.reason, "why");
        }
        // A dependency failed: named by its package, with its own cause.
        let dep = BuildReport {
            kind: BuildOutcome::DependencyFailed,
            failed_root: Some(sp(DEP)),
            ..Default::default()
        };
        let r = app(
            &[
                (TOP, DrvState::DependencyFailed, dep.clone()),
                (
                    DEP,
                    DrvState::Failed,
                    BuildReport {
                        agent: "a2".into(),
                        ..outcome(
                            BuildOutcome::InfraFailed,
                            "cannot build missing derivation\nmore",
                        )
                    },
                ),
            ],
            pinned,
            RunState::Finished,
        );
        assert_eq!(r.status, PackageStatus::DependencyFailed);
        assert_eq!(r.failed_dependency, "lib");
        assert_eq!(
            r.reason,
            "dependency lib failed: infra-failed: cannot build missing derivation (on agent a2)"
        );
        // A hash mismatch anywhere in the closure: needs-hash, with the mismatch listed.
        let r = app(
            &[
                (
                    TOP,
                    DrvState::DependencyFailed,
                    BuildReport {
                        failed_root: Some(sp(SRC)),
                        ..dep
                    },
                ),
                (
                    SRC,
                    DrvState::Failed,
                    BuildReport {
                        specified: Sri::parse(
                            "sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
                        )
                        .ok(),
                        got: Sri::parse("sha256-61WeR6/hoYwd5GsHVR2+sgD/QcMTsCKiZHJ7o8yKEbQ=").ok(),
                        ..outcome(BuildOutcome::HashMismatch, "")
                    },
                ),
            ],
            pinned,
            RunState::Finished,
        );
        assert_eq!(r.status, PackageStatus::NeedsHash);
        assert_eq!(r.hash_mismatches.len(), 1);
        assert_eq!(
            r.hash_mismatches[0].got,
            "sha256-61WeR6/hoYwd5GsHVR2+sgD/QcMTsCKiZHJ7o8yKEbQ="
        );
        // Not built yet: pending; the run cancelled: cancelled.
        assert_eq!(
            app(&[], pinned, RunState::Building).status,
            PackageStatus::Pending
        );
        assert_eq!(
            app(&[], pinned, RunState::Cancelled).status,
            PackageStatus::Cancelled
        );
    }

    #[test]
    fn fake_hashes_are_recognised_in_every_spelling() {
        let node = |h: &str| DrvNode {
            fixed_output: true,
            output_hash: h.into(),
            ..Default::default()
        };
        assert!(has_fake_hash(&node(&format!("sha256:{}", "0".repeat(52)))));
        assert!(has_fake_hash(&node(
            "sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
        )));
        assert!(!has_fake_hash(&node(
            "sha256-61WeR6/hoYwd5GsHVR2+sgD/QcMTsCKiZHJ7o8yKEbQ="
        )));
        let mut not_fixed = node("sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=");
        not_fixed.fixed_output = false;
        assert!(!has_fake_hash(&not_fixed));
    }
}
