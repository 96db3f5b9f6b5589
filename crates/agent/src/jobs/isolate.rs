//! Evaluation in isolation: attributes in groups, one Nix process each, bisected until one broken attribute (a throw, the memory cap, a hang, the machine's words from an expression) hides no other.

use super::*;

/// Parts a group past its time or output limit is split into at once (each attribute alone,
/// for groups up to this size): each part's Nix process evaluates the repository's common
/// part again.
const SPLIT_WAYS: usize = 32;

/// Evaluates attributes in groups, one Nix process each. An attribute that throws is caught
/// within its group and evaluated again alone, for its message; a group that fails as a whole
/// (an error `tryEval` cannot catch) is split in two until each failing attribute stands
/// alone. One past its time limit names the attribute it was on (Nix marks each as it
/// starts on it): that one failed, when it had nine tenths of the limit to itself, else it
/// runs alone; the others go on. Without a mark the group is split into its attributes at
/// once. Either way one broken attribute never hides the others.
pub(super) async fn eval_isolated(
    shared: &Arc<Shared>,
    entry: &Entry,
    attr_path: &str,
    (groups, listed_as_throwing): (Vec<Vec<String>>, bool),
    mem: u64,
) -> Result<BTreeMap<String, Result<AttrInfo, String>>, NixError> {
    let sem = Arc::new(tokio::sync::Semaphore::new(shared.cfg.eval_workers.max(1)));
    let limit = shared.nix.eval_deadline;
    let mut out = BTreeMap::new();
    // Attributes the coordinator says threw when listed: each is evaluated alone at once, as
    // one caught here would be (one Nix process each, not a group's first), behind the
    // run's builds. Only its nice and that shortcut come from the coordinator's word: what
    // each evaluates to, or its failure, is this evaluation's.
    let (mut pending, nix) = if listed_as_throwing {
        let alone = groups.into_iter().flatten().map(|a| vec![a]).collect();
        (alone, Arc::new(shared.nix.niced_evals()))
    } else {
        (groups, Arc::new(shared.nix.clone()))
    };
    let mut direct: std::collections::HashSet<String> = if listed_as_throwing {
        pending.iter().flatten().cloned().collect()
    } else {
        std::collections::HashSet::new()
    };
    // Attributes `tryEval` caught: they throw (or fail an assertion), whatever their message
    // says. Nix's own failures (the store's, the machine's) are never caught by it.
    let mut thrown: std::collections::HashSet<String> = std::collections::HashSet::new();
    // Attributes that failed alone with Nix's words for a machine failure: how often, and
    // the last message. An expression can print those words where `tryEval` cannot catch
    // them (`abort "database is locked"`), so a group failing so is bisected like any other.
    let mut suspects: BTreeMap<String, (u32, String)> = BTreeMap::new();
    let mut round = 0u32;
    while !pending.is_empty() {
        let mut set = tokio::task::JoinSet::new();
        let mut machine_failed: Option<String> = None;
        // Whether any process of this round got further than the machine's words.
        let mut evaluating = false;
        for group in pending.drain(..) {
            let alone =
                group.len() == 1 && (thrown.contains(&group[0]) || direct.contains(&group[0]));
            // A suspect evaluated again waits a little: a real outage (a lock held, a
            // daemon restarting) may pass meanwhile.
            let pause = match group.as_slice() {
                [a] => suspects.get(a).map_or(0, |(n, _)| *n),
                _ => 0,
            };
            let (nix, entry, attr_path, sem) = (
                nix.clone(),
                entry.clone(),
                attr_path.to_string(),
                sem.clone(),
            );
            set.spawn(async move {
                tokio::time::sleep(SUSPECT_PAUSE * pause).await;
                let _permit = sem.acquire_owned().await;
                // A group catches what throws; one attribute caught is evaluated again as
                // it is, alone, for the message of its failure.
                let r = if alone {
                    nix.eval_attrs(&entry, &attr_path, &group, mem)
                        .await
                        .map(|m| m.into_iter().map(|(k, v)| (k, Some(v))).collect())
                } else {
                    nix.eval_attrs_caught(&entry, &attr_path, &group, mem).await
                };
                (group, r)
            });
        }
        while let Some(joined) = set.join_next().await {
            let (group, r) =
                joined.map_err(|e| NixError::Infra(format!("evaluation task failed: {e}")))?;
            evaluating |= !matches!(r, Err(NixError::Infra(_)));
            match r {
                Ok(map) => {
                    for (k, v) in map {
                        match v {
                            Some(info) => {
                                out.insert(k, Ok(info));
                            }
                            // Caught in a group: alone again, for its message.
                            None => {
                                thrown.insert(k.clone());
                                pending.push(vec![k]);
                            }
                        }
                    }
                }
                // Caught before, it throws: a message that reads like the machine's (`throw
                // "database is locked"`) is its own words, not retried as an outage.
                Err(NixError::Infra(message)) if group.len() == 1 && thrown.contains(&group[0]) => {
                    out.insert(group[0].clone(), Err(message));
                }
                // Said to throw, it failed with the machine's words: evaluated again as any
                // attribute is (under tryEval first), to tell its own throw from the machine.
                Err(NixError::Infra(_)) if group.len() == 1 && direct.remove(&group[0]) => {
                    pending.push(group);
                }
                // An attribute that throws, or that runs past the memory cap, is the
                // attribute's own failure: isolated, while the others go on.
                Err(NixError::Failed { message, .. } | NixError::OutOfMemory(message))
                    if group.len() == 1 =>
                {
                    out.insert(group[0].clone(), Err(message));
                }
                Err(NixError::TooLong(message) | NixError::TooLongAt { message, .. })
                    if group.len() == 1 =>
                {
                    out.insert(group[0].clone(), Err(message));
                }
                // Stopped on one attribute (the last Nix marked starting). When those before
                // it took at most a tenth of the limit, it had the rest to itself: its own
                // failure, as alone (a hanging attribute costs the limit once). Else it may
                // be slow rather than stuck: alone, with the whole limit. Those evaluated
                // before it go again together; the rest as below.
                Err(NixError::TooLongAt {
                    attr, before, done, ..
                }) if group.contains(&attr) => {
                    if before <= limit / 10 {
                        out.insert(
                            attr.clone(),
                            Err(format!(
                                "evaluation did not end within the limit of {} s (the agent's eval_timeout_secs; the attributes evaluated before it in its process took {} s of it)",
                                limit.as_secs(),
                                before.as_secs()
                            )),
                        );
                    } else {
                        pending.push(vec![attr.clone()]);
                    }
                    let others: Vec<String> = group
                        .into_iter()
                        .filter(|a| *a != attr && !done.contains(a))
                        .collect();
                    let done: Vec<String> = done.into_iter().filter(|a| *a != attr).collect();
                    if !done.is_empty() {
                        pending.push(done);
                    }
                    if !others.is_empty() {
                        let size = others.len().div_ceil(SPLIT_WAYS);
                        pending.extend(others.chunks(size).map(<[String]>::to_vec));
                    }
                }
                // Past the time or output limit together: each alone at once, side by side
                // (a large group in at most SPLIT_WAYS parts). Halving would cost the limit
                // once per level (five hours for a group of 16 with one hanging
                // attribute); this costs it twice, and the rest are not blamed for it.
                Err(NixError::TooLong(_) | NixError::TooLongAt { .. }) => {
                    let size = group.len().div_ceil(SPLIT_WAYS);
                    pending.extend(group.chunks(size).map(<[String]>::to_vec));
                }
                Err(NixError::Failed { .. } | NixError::OutOfMemory(_)) => {
                    let mid = group.len() / 2;
                    pending.push(group[..mid].to_vec());
                    pending.push(group[mid..].to_vec());
                }
                // Words no expression is taken to have printed (a failed download, a full
                // disk, memory running out): the machine's, the task goes elsewhere.
                Err(NixError::Infra(message))
                    if !nixfarm_nix::messages::is_machine_error_to_weigh(&message) =>
                {
                    return Err(NixError::Infra(message));
                }
                // The machine's words: bisected, and an attribute failing so alone is tried
                // again, up to SUSPECT_TRIES times (what it is is settled below).
                Err(NixError::Infra(message)) => {
                    if let [attr] = group.as_slice() {
                        let tries = suspects.entry(attr.clone()).or_default();
                        tries.0 += 1;
                        tries.1.clone_from(&message);
                        if tries.0 < SUSPECT_TRIES {
                            pending.push(group);
                        }
                    } else {
                        let mid = group.len() / 2;
                        pending.push(group[..mid].to_vec());
                        pending.push(group[mid..].to_vec());
                    }
                    machine_failed.get_or_insert(message);
                }
            }
        }
        // Split once and still nothing evaluates: the machine, not an attribute.
        let evaluated_here = !thrown.is_empty() || out.values().any(Result::is_ok);
        if let Some(message) = machine_failed
            && round > 0
            && !evaluating
            && !evaluated_here
        {
            return Err(NixError::Infra(message));
        }
        round += 1;
    }
    settle_suspects(shared, (entry, attr_path, mem), &mut out, suspects).await?;
    Ok(out)
}

/// How often an attribute failing alone with the machine's words is evaluated, and how long
/// each try waits more than the one before.
const SUSPECT_TRIES: u32 = 3;
const SUSPECT_PAUSE: Duration = Duration::from_secs(1);

/// Attributes that failed alone every time with the machine's words: their own failure (an
/// `abort` worded so) when an attribute that evaluated here before evaluates again after
/// them, so the machine works now. Otherwise (nothing evaluated here, or that control fails
/// too: an outage that began partway) the machine is blamed, for the task to go elsewhere;
/// so is a full disk (its words count only when this host's disk is full: `room`), a fetch
/// that failed in transport, and memory running out.
async fn settle_suspects(
    shared: &Arc<Shared>,
    (entry, attr_path, mem): (&Entry, &str, u64),
    out: &mut BTreeMap<String, Result<AttrInfo, String>>,
    suspects: BTreeMap<String, (u32, String)>,
) -> Result<(), NixError> {
    use nixfarm_nix::messages::is_machine_error_to_weigh;
    let suspects: Vec<(String, (u32, String))> = suspects
        .into_iter()
        .filter(|(a, _)| !out.contains_key(a))
        .collect();
    let Some((_, (_, first))) = suspects.first() else {
        return Ok(());
    };
    if let Some((_, (_, m))) = suspects
        .iter()
        .find(|(_, (_, m))| !is_machine_error_to_weigh(m))
    {
        return Err(NixError::Infra(m.clone()));
    }
    let Some(control) = out.iter().find(|(_, r)| r.is_ok()).map(|(a, _)| a.clone()) else {
        return Err(NixError::Infra(first.clone()));
    };
    if let Err(e) = shared
        .nix
        .eval_attrs(entry, attr_path, std::slice::from_ref(&control), mem)
        .await
    {
        return Err(NixError::Infra(format!(
            "{first} (and {control}, which evaluated on this machine before, failed when evaluated again: {e})"
        )));
    }
    // The machine works now: each suspect once more, so an outage that ended before the
    // control blames none of them.
    for (attr, (tries, _)) in suspects {
        let again = shared
            .nix
            .eval_attrs(entry, attr_path, std::slice::from_ref(&attr), mem)
            .await;
        let result = match again {
            Ok(mut infos) => infos
                .remove(&attr)
                .ok_or_else(|| format!("the evaluation of {attr} gave no result for it")),
            Err(NixError::Infra(message)) if is_machine_error_to_weigh(&message) => Err(format!(
                "{message} (Nix's words for a failure of the machine, but this attribute failed so alone {} times, the last after another evaluated on the same machine: taken as its own failure)",
                tries + 1
            )),
            Err(NixError::Infra(message)) => return Err(NixError::Infra(message)),
            Err(e) => Err(e.to_string()),
        };
        out.insert(attr, result);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Told that attributes threw, the agent evaluates each alone, and what it reports is
    /// still its own evaluation's: one that evaluates is evaluated, and one that throws the
    /// machine's words (which alone, uncaught, read as an outage) fails as its own.
    #[tokio::test]
    async fn attributes_said_to_throw_are_judged_by_their_own_evaluation() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("default.nix"),
            r#"{
  good = derivation { name = "good"; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "echo > $out" ]; };
  bad = throw "bad: unsupported on this platform";
  oom = throw "Cannot allocate memory in the vendored allocator";
  nested = { inner = 1; };
}"#,
        )
        .unwrap();
        let agent = crate::Agent::new(crate::AgentConfig {
            work_dir: d.path().join("work"),
            gc_roots_dir: Some(d.path().join("roots")),
            ..Default::default()
        })
        .unwrap();
        let entry = Entry::File {
            root: d.path().to_path_buf(),
            file: "default.nix".into(),
            args: vec![],
        };
        let attrs: Vec<String> = ["good", "bad", "oom", "nested"].map(String::from).to_vec();
        for said in [false, true] {
            let out = eval_isolated(&agent.shared, &entry, "", (vec![attrs.clone()], said), 0)
                .await
                .unwrap();
            let good = out["good"].as_ref().unwrap();
            assert!(good.drv_path.ends_with("-good.drv"), "{said}: {good:?}");
            let bad = out["bad"].as_ref().unwrap_err();
            assert!(
                bad.contains("bad: unsupported on this platform"),
                "{said}: {bad}"
            );
            let oom = out["oom"].as_ref().unwrap_err();
            assert!(
                oom.contains("Cannot allocate memory in the vendored"),
                "{said}: {oom}"
            );
            // A set of packages where a package should be says so, not which attribute
            // nixfarm's own expression missed.
            let nested = out["nested"].as_ref().unwrap_err();
            assert_eq!(
                nested,
                "not a derivation but an attribute set without type = \"derivation\" (a set of packages, say)",
                "{said}"
            );
        }
    }
}
