//! Cross-checked evaluation (`[scheduler] cross_check_evaluation`): every evaluation task,
//! the attribute listing included, is answered by two different agents, and an answer is
//! taken only when both agree. One agent alone then cannot have the farm build, sign and
//! report as ready a derivation the repository does not evaluate to, nor hide a package
//! from the report.

use super::*;
use sha2::{Digest, Sha256};

/// What becomes of an evaluation answer.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Cross-checking is off, or another agent answered the same before: take it.
    Take,
    /// The first answer (or the same agent again): recorded, and the task is queued again
    /// for another agent.
    Wait,
    /// It differs from another agent's answer: the run fails, with this message.
    Disagree(String),
}

/// Answers to one task that may differ only by attributes failing on one side before the
/// run fails: the task is asked again each time, and an answer that failed fewer of them is
/// the one the next must match.
const ONE_SIDED_RETRIES: u32 = 2;

/// What the summary says of an attribute that failed to evaluate.
const FAILED: &str = "an evaluation error";
/// What an answer says of an attribute it listed and did not evaluate.
const NOT_EVALUATED: &str = "listed, not evaluated";

/// The task number an opinion is kept under: the listing is -1.
pub(super) fn task_no(task: EvalTask) -> i64 {
    match task {
        EvalTask::List => -1,
        EvalTask::Chunk(n) => n,
    }
}

impl Engine {
    /// Weighs `agent`'s answer to `task` against another agent's, when answers are
    /// cross-checked. `names` is what a listing lists; `evaluated`, what it evaluated. When
    /// taken, `evaluated` keeps only what both agreed on: a listing's evaluation that one
    /// of the two did not send is dropped (its attributes go to evaluation tasks), and an
    /// output counts as already in the cache only if both said so.
    pub(super) fn second_opinion(
        &self,
        inner: &mut Inner,
        run_id: &str,
        task: EvalTask,
        agent: &str,
        names: Option<&[String]>,
        evaluated: &mut Option<EvalChunkOutput>,
    ) -> Result<Verdict, EngineError> {
        if !self.opts.cross_check_eval {
            return Ok(Verdict::Take);
        }
        let Some(run) = inner.runs.iter_mut().find(|r| r.id == run_id) else {
            return Ok(Verdict::Take);
        };
        let answer = EvalOpinion {
            credential: inner
                .agents
                .get(agent)
                .map(|a| a.reg.credential.clone())
                .unwrap_or_default(),
            ..opinion(task_no(task), agent, names, evaluated.as_ref())
        };
        let n = answer.task;
        let mut first = false;
        // Two answers that differ only where one side failed to evaluate (out of memory on
        // one host, say) are no proof of a lie: the task is asked again, a bounded number
        // of times, and the answer that failed less is the one the next must match.
        let one_sided = run
            .opinions
            .get(&n)
            // A second opinion (another credential), both evaluated (a listing that
            // evaluated nothing is taken below as it was).
            .filter(|f| {
                crate::credentials::Credential::independent(
                    (&f.agent, &f.credential),
                    (agent, &answer.credential),
                ) && f.evaluated.is_some()
                    && answer.evaluated.is_some()
                    && f.evaluated != answer.evaluated
            })
            .filter(|f| f.one_sided < ONE_SIDED_RETRIES)
            .and_then(|f| {
                one_sided_failures(f, &answer).map(|n| (n, f.agent.clone(), f.one_sided + 1))
            });
        if let Some(((theirs, mine), first_agent, asked)) = one_sided {
            tracing::warn!(
                run = run_id,
                task = n,
                agent,
                first = first_agent,
                "two evaluations differ only by attributes one of them failed to evaluate: asking again"
            );
            run.opinion_since.insert(n, self.clock.now_ms());
            run.eval_queue.push_front(task);
            if mine < theirs {
                tracing::warn!(
                    run = run_id,
                    task = n,
                    replaced = first_agent,
                    digest = answer.evaluated.as_deref().unwrap_or(""),
                    "the answer with fewer failures is now the one to match: {agent}'s"
                );
                let answer = EvalOpinion {
                    one_sided: asked,
                    ..answer
                };
                inner.db.replace_eval_opinion(run_id, &answer)?;
                run.opinions.insert(n, answer);
                let agent = agent.to_string();
                self.emit(inner, run_id, Ev::EvalAwaitingCheck { task: n, agent });
            } else if let Some(first) = run.opinions.get_mut(&n) {
                first.one_sided = asked;
                let first = first.clone();
                inner.db.replace_eval_opinion(run_id, &first)?;
            }
            return Ok(Verdict::Wait);
        }
        let verdict = match run.opinions.get(&n) {
            // The same agent, or another name on the same credential: not a second opinion.
            Some(first)
                if !crate::credentials::Credential::independent(
                    (&first.agent, &first.credential),
                    (agent, &answer.credential),
                ) =>
            {
                Verdict::Wait
            }
            Some(first) if first.digest != answer.digest => {
                Verdict::Disagree(disagreement(first, &answer, false))
            }
            Some(first) => match (&first.evaluated, &answer.evaluated) {
                (Some(a), Some(b)) if a != b => {
                    Verdict::Disagree(disagreement(first, &answer, true))
                }
                (Some(_), Some(_)) => {
                    let agreed: HashSet<&StorePath> = first.present.iter().collect();
                    if let Some((attrs, nodes)) = evaluated.as_mut() {
                        for (path, node) in nodes.iter_mut() {
                            node.present &= agreed.contains(path);
                        }
                        // Where an attribute is defined steers hash fixes to a file: only
                        // where both said the same (a host whose checkout path shows
                        // through, or a liar, leaves the fixer to find the file itself).
                        let mut dropped = Vec::new();
                        for a in attrs.iter_mut() {
                            if first.positions.get(&a.attr) != Some(&a.info.position)
                                && !a.info.position.is_empty()
                            {
                                a.info.position.clear();
                                dropped.push(a.attr.as_str());
                            }
                        }
                        if let Some(one) = dropped.first() {
                            tracing::warn!(
                                run = run_id,
                                task = n,
                                first = first.agent,
                                second = agent,
                                "two evaluations place {} attribute(s) differently (first: {one}): their positions are dropped",
                                dropped.len()
                            );
                        }
                    }
                    Verdict::Take
                }
                // Only one of them evaluated beside listing (the other ran out of memory,
                // say): the names agree, and the attributes are evaluated by tasks.
                _ => {
                    *evaluated = None;
                    Verdict::Take
                }
            },
            None => {
                inner.db.record_eval_opinion(run_id, &answer)?;
                run.opinions.insert(n, answer);
                run.opinion_since.insert(n, self.clock.now_ms());
                first = true;
                Verdict::Wait
            }
        };
        if verdict == Verdict::Wait {
            run.eval_queue.push_front(task);
        }
        if first {
            if !super::checks::checker_connected(
                &inner.agents,
                (agent, &run.spec.cache),
                Hold::No,
                Hold::No,
            ) {
                tracing::warn!(
                    run = run_id,
                    task = n,
                    agent,
                    "evaluation waits for a second agent to check it (cross_check_evaluation): none with a credential of its own is connected"
                );
            }
            let agent = agent.to_string();
            self.emit(inner, run_id, Ev::EvalAwaitingCheck { task: n, agent });
        }
        Ok(verdict)
    }
}

/// An answer as it is compared: digests over everything honest agents agree on, a summary
/// (attribute: derivation) for the message when two differ, and what it says a cache holds.
/// A listing that evaluated its attributes evaluated every one of them: one it leaves out
/// threw there (agents leave those to evaluation tasks, for their messages), and counts as
/// failed, as an agent that sends the failure says.
/// Left out of the digests: where an attribute is defined (it may name the checkout's
/// path; kept apart, and taken only where both answers agree), error messages' wording (Nix versions word them differently; that an attribute failed
/// counts), and what a cache already holds (it may change between the two evaluations).
fn opinion(
    task: i64,
    agent: &str,
    names: Option<&[String]>,
    evaluated: Option<&EvalChunkOutput>,
) -> EvalOpinion {
    let mut summary = BTreeMap::new();
    let mut names: Vec<&String> = names.unwrap_or_default().iter().collect();
    names.sort();
    names.dedup();
    for n in &names {
        summary.insert(n.to_string(), NOT_EVALUATED.to_string());
    }
    let mut present = Vec::new();
    let mut positions = BTreeMap::new();
    let evaluated = evaluated.map(|(evaluated, nodes)| {
        let mut attrs: Vec<(&str, PackageInfo)> = Vec::new();
        for a in evaluated {
            let mut info = a.info.clone();
            if !info.position.is_empty() {
                positions.insert(a.attr.clone(), std::mem::take(&mut info.position));
            }
            if !info.eval_error.is_empty() {
                info.eval_error = "failed".into();
            }
            summary.insert(
                a.attr.clone(),
                if info.eval_error.is_empty() {
                    info.drv_path
                        .as_ref()
                        .map_or(String::new(), ToString::to_string)
                } else {
                    FAILED.into()
                },
            );
            attrs.push((&a.attr, info));
        }
        for n in &names {
            if summary.get(*n).map(String::as_str) != Some(NOT_EVALUATED) {
                continue;
            }
            summary.insert(n.to_string(), FAILED.into());
            let failed = PackageInfo {
                eval_error: "failed".into(),
                ..Default::default()
            };
            attrs.push((n.as_str(), failed));
        }
        attrs.sort_by(|a, b| a.0.cmp(b.0));
        let mut drvs: Vec<(&str, DrvNode)> = Vec::new();
        for (path, node) in nodes {
            if node.present {
                present.push(path.clone());
            }
            let mut node = node.clone();
            node.present = false;
            node.features.sort();
            node.input_drvs.sort();
            node.hints.sort();
            drvs.push((path, node));
        }
        sha256_hex(&(&attrs, &drvs))
    });
    EvalOpinion {
        task,
        agent: agent.to_string(),
        credential: Default::default(),
        digest: sha256_hex(&names),
        evaluated,
        present,
        summary,
        one_sided: 0,
        positions,
    }
}

/// Whether `a` and `b` list the same and differ only in attributes that one of them failed
/// to evaluate and the other evaluated: how many such failures each has.
fn one_sided_failures(a: &EvalOpinion, b: &EvalOpinion) -> Option<(usize, usize)> {
    if a.digest != b.digest {
        return None;
    }
    let keys: std::collections::BTreeSet<&String> =
        a.summary.keys().chain(b.summary.keys()).collect();
    let (mut fa, mut fb) = (0, 0);
    for k in keys {
        match (a.summary.get(k), b.summary.get(k)) {
            (x, y) if x == y => {}
            (Some(x), Some(_)) if x == FAILED => fa += 1,
            (Some(_), Some(y)) if y == FAILED => fb += 1,
            _ => return None,
        }
    }
    (fa + fb > 0).then_some((fa, fb))
}

/// SHA-256 (hex) of `v` as JSON: field order is fixed (structs, sorted lists), so equal
/// answers give equal bytes.
fn sha256_hex(v: &impl serde::Serialize) -> String {
    let bytes = serde_json::to_vec(v).unwrap_or_default();
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Why `first` and `second` disagree: on what they list, or (`evaluated`) on what an
/// attribute evaluates to.
fn disagreement(first: &EvalOpinion, second: &EvalOpinion, evaluated: bool) -> String {
    let what = if first.task < 0 {
        "the attribute listing".to_string()
    } else {
        format!("evaluation task {}", first.task)
    };
    let (a, b) = (&first.summary, &second.summary);
    let none = "it is not listed".to_string();
    let differing = a.keys().chain(b.keys()).find(|k| {
        if evaluated {
            a.contains_key(*k) && a.get(*k) != b.get(*k)
        } else {
            a.contains_key(*k) != b.contains_key(*k)
        }
    });
    let detail = match differing {
        Some(k) => format!(
            "attribute '{k}': agent {} says {}, agent {} says {}",
            first.agent,
            a.get(k).unwrap_or(&none),
            second.agent,
            b.get(k).unwrap_or(&none)
        ),
        None => "the derivation graphs or package details differ".to_string(),
    };
    format!(
        "agents {} and {} evaluated {what} differently ({detail}): one of them is compromised or broken, or the evaluation is impure; nothing of this run is built from either answer",
        first.agent, second.agent
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(drv: &str, position: &str, error: &str, present: bool) -> EvalChunkOutput {
        let attr = EvaluatedAttr {
            attr: "hello".into(),
            info: PackageInfo {
                drv_path: (!drv.is_empty()).then(|| sp(drv)),
                position: position.into(),
                eval_error: error.into(),
                ..Default::default()
            },
        };
        let node = DrvNode {
            system: "x86_64-linux".into(),
            input_drvs: vec![
                sp("/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-b.drv"),
                sp("/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a.drv"),
            ],
            present,
            ..Default::default()
        };
        let graph = match drv {
            "" => BTreeMap::new(),
            d => [(sp(d), node)].into(),
        };
        (vec![attr], graph)
    }

    /// What agent `agent` says to the listing (`names`) or to task 2 (`None`).
    fn say(agent: &str, names: Option<&[String]>, a: EvalChunkOutput) -> EvalOpinion {
        opinion(if names.is_some() { -1 } else { 2 }, agent, names, Some(&a))
    }

    fn same(a: &EvalOpinion, b: &EvalOpinion) -> bool {
        a.digest == b.digest && a.evaluated == b.evaluated
    }

    #[test]
    fn honest_differences_agree_and_another_derivation_does_not() {
        let names = vec!["hello".to_string(), "world".into()];
        let x = "/nix/store/xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx-hello.drv";
        let a = say("a", Some(&names), answer(x, "/tmp/a/x.nix:3", "", false));
        assert_eq!(a.summary["hello"], x);
        // A listing that evaluated evaluated everything it listed: what it left out threw.
        assert_eq!(a.summary["world"], FAILED);
        let listed_only = opinion(-1, "a", Some(&names), None);
        assert_eq!(listed_only.summary["world"], NOT_EVALUATED);
        assert!(a.present.is_empty());
        // Another checkout's path, listing order, a cache that gained the output since.
        let reordered = vec!["world".to_string(), "hello".into()];
        let b = say("b", Some(&reordered), answer(x, "/tmp/b/x.nix:3", "", true));
        assert!(same(&a, &b));
        assert_eq!(b.present, [x]);
        let forged = say(
            "b",
            Some(&names),
            answer(
                "/nix/store/yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy-hello.drv",
                "",
                "",
                false,
            ),
        );
        assert!(a.digest == forged.digest && a.evaluated != forged.evaluated);
        // A package hidden from the listing.
        let hidden = say("b", Some(&names[..1]), answer(x, "", "", false));
        assert_ne!(a.digest, hidden.digest);
        // An error's wording differs between Nix versions; that it failed does not.
        let e1 = say("a", None, answer("", "", "error: boom", false));
        let e2 = say("b", None, answer("", "", "error:\n  boom", false));
        assert!(same(&e1, &e2));
        assert!(!same(&e1, &say("b", None, answer("", "", "", false))));
    }

    #[test]
    fn only_failures_on_one_side_count_as_one_sided() {
        let x = "/nix/store/xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx-hello.drv";
        let ok = say("a", None, answer(x, "", "", false));
        let failed = say("b", None, answer("", "", "error: out of memory", false));
        assert_eq!(one_sided_failures(&ok, &failed), Some((0, 1)));
        assert_eq!(one_sided_failures(&failed, &ok), Some((1, 0)));
        // Another derivation is a disagreement, and so is the same answer (nothing failed).
        let other = say(
            "b",
            None,
            answer(
                "/nix/store/yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy-hello.drv",
                "",
                "",
                false,
            ),
        );
        assert_eq!(one_sided_failures(&ok, &other), None);
        assert_eq!(one_sided_failures(&ok, &ok), None);
    }

    #[test]
    fn a_disagreement_names_both_agents_and_the_attribute() {
        let first = say(
            "a",
            None,
            answer(
                "/nix/store/xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx-hello.drv",
                "",
                "",
                false,
            ),
        );
        let other = say(
            "b",
            None,
            answer(
                "/nix/store/yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy-hello.drv",
                "",
                "",
                false,
            ),
        );
        let msg = disagreement(&first, &other, true);
        assert!(
            msg.contains("agents a and b evaluated evaluation task 2 differently"),
            "{msg}"
        );
        assert!(
            msg.contains("attribute 'hello': agent a says /nix/store/xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx-hello.drv, agent b says /nix/store/yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy-hello.drv"),
            "{msg}"
        );
        // A listing that leaves a package out.
        let names = vec!["hello".to_string(), "world".into()];
        let full = say(
            "a",
            Some(&names),
            answer(
                "/nix/store/xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx-hello.drv",
                "",
                "",
                false,
            ),
        );
        let short = say(
            "b",
            Some(&names[..1]),
            answer(
                "/nix/store/xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx-hello.drv",
                "",
                "",
                false,
            ),
        );
        let msg = disagreement(&full, &short, false);
        assert!(
            msg.contains(
                "attribute 'world': agent a says an evaluation error, agent b says it is not listed"
            ),
            "{msg}"
        );
    }
}
