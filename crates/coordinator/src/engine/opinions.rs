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

/// The task number an opinion is kept under: the listing is -1.
pub(super) fn task_no(task: EvalTask) -> i64 {
    match task {
        EvalTask::List => -1,
        EvalTask::Chunk(n) => n,
    }
}

impl Engine {
    /// Weighs `agent`'s answer to `task` against another agent's, when answers are
    /// cross-checked. `names` is what a listing lists; `evaluated`, what it evaluated.
    pub(super) fn second_opinion(
        &self,
        inner: &mut Inner,
        run_id: &str,
        task: EvalTask,
        agent: &str,
        names: Option<&[String]>,
        evaluated: Option<&EvalChunkOutput>,
    ) -> Result<Verdict, EngineError> {
        if !self.opts.cross_check_eval {
            return Ok(Verdict::Take);
        }
        let others = inner
            .agents
            .iter()
            .filter(|(n, a)| *n != agent && a.tx.is_some())
            .count();
        let Some(run) = inner.runs.iter_mut().find(|r| r.id == run_id) else {
            return Ok(Verdict::Take);
        };
        let (digest, summary) = opinion(names, evaluated);
        let n = task_no(task);
        let verdict = match run.opinions.get(&n) {
            Some(first) if first.agent != agent && first.digest == digest => Verdict::Take,
            Some(first) if first.agent != agent => {
                Verdict::Disagree(disagreement(first, agent, &summary))
            }
            Some(_) => Verdict::Wait,
            None => {
                let o = EvalOpinion {
                    task: n,
                    agent: agent.to_string(),
                    digest,
                    summary,
                };
                inner.db.record_eval_opinion(run_id, &o)?;
                run.opinions.insert(n, o);
                if others == 0 {
                    tracing::warn!(
                        run = run_id,
                        task = n,
                        agent,
                        "evaluation waits for a second agent to check it (cross_check_evaluation): none other is connected"
                    );
                }
                Verdict::Wait
            }
        };
        if verdict == Verdict::Wait {
            run.eval_queue.push_front(task);
        }
        Ok(verdict)
    }
}

/// The digest of an answer over everything honest agents agree on, and a summary of it
/// (attribute: derivation) for the message when two differ. Left out: where an attribute
/// is defined (it names the checkout's path), error messages' wording (Nix versions word
/// them differently; that an attribute failed counts), and what a cache already holds (it
/// may change between the two evaluations).
fn opinion(
    names: Option<&[String]>,
    evaluated: Option<&EvalChunkOutput>,
) -> (String, BTreeMap<String, String>) {
    let mut summary = BTreeMap::new();
    let mut names: Vec<&String> = names.unwrap_or_default().iter().collect();
    names.sort();
    names.dedup();
    for n in &names {
        summary.insert(n.to_string(), "listed, not evaluated".to_string());
    }
    let mut attrs: Vec<(&str, PackageInfo)> = Vec::new();
    let mut drvs: Vec<(&str, DrvNode)> = Vec::new();
    if let Some((evaluated, nodes)) = evaluated {
        for a in evaluated {
            let mut info = a.info.clone();
            info.position.clear();
            if !info.eval_error.is_empty() {
                info.eval_error = "failed".into();
            }
            summary.insert(
                a.attr.clone(),
                if info.eval_error.is_empty() {
                    info.drv_path.clone()
                } else {
                    "an evaluation error".into()
                },
            );
            attrs.push((&a.attr, info));
        }
        attrs.sort_by(|a, b| a.0.cmp(b.0));
        for (path, node) in nodes {
            let mut node = node.clone();
            node.present = false;
            node.features.sort();
            node.input_drvs.sort();
            node.hints.sort();
            drvs.push((path, node));
        }
    }
    // Field order is fixed (structs, sorted lists), so equal answers give equal bytes.
    let canonical = serde_json::to_vec(&(&names, &attrs, &drvs)).unwrap_or_default();
    let digest = Sha256::digest(&canonical)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    (digest, summary)
}

fn disagreement(first: &EvalOpinion, agent: &str, summary: &BTreeMap<String, String>) -> String {
    let what = if first.task < 0 {
        "the attribute listing".to_string()
    } else {
        format!("evaluation task {}", first.task)
    };
    let none = "nothing".to_string();
    let differing = first
        .summary
        .keys()
        .chain(summary.keys())
        .find(|k| first.summary.get(*k) != summary.get(*k));
    let detail = match differing {
        Some(k) => format!(
            "attribute '{k}': agent {} says {}, agent {agent} says {}",
            first.agent,
            first.summary.get(k).unwrap_or(&none),
            summary.get(k).unwrap_or(&none)
        ),
        None => "the derivation graphs or package details differ".to_string(),
    };
    format!(
        "agents {} and {agent} evaluated {what} differently ({detail}): one of them is compromised or broken, or the evaluation is impure; nothing of this run is built from either answer",
        first.agent
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(drv: &str, position: &str, error: &str, present: bool) -> EvalChunkOutput {
        let attr = EvaluatedAttr {
            attr: "hello".into(),
            info: PackageInfo {
                drv_path: drv.into(),
                position: position.into(),
                eval_error: error.into(),
                ..Default::default()
            },
        };
        let node = DrvNode {
            system: "x86_64-linux".into(),
            input_drvs: vec!["/nix/store/b.drv".into(), "/nix/store/a.drv".into()],
            present,
            ..Default::default()
        };
        (vec![attr], [(drv.to_string(), node)].into())
    }

    #[test]
    fn honest_differences_agree_and_another_derivation_does_not() {
        let names = vec!["hello".to_string(), "world".into()];
        let (a, summary) = opinion(
            Some(&names),
            Some(&answer(
                "/nix/store/x-hello.drv",
                "/tmp/a/x.nix:3",
                "",
                false,
            )),
        );
        assert_eq!(summary["hello"], "/nix/store/x-hello.drv");
        assert_eq!(summary["world"], "listed, not evaluated");
        // Another checkout's path, listing order, a cache that gained the output since.
        let reordered = vec!["world".to_string(), "hello".into()];
        let (b, _) = opinion(
            Some(&reordered),
            Some(&answer(
                "/nix/store/x-hello.drv",
                "/tmp/b/x.nix:3",
                "",
                true,
            )),
        );
        assert_eq!(a, b);
        let (forged, _) = opinion(
            Some(&names),
            Some(&answer(
                "/nix/store/y-hello.drv",
                "/tmp/a/x.nix:3",
                "",
                false,
            )),
        );
        assert_ne!(a, forged);
        // A package hidden from the listing.
        let (hidden, _) = opinion(
            Some(&names[..1]),
            Some(&answer(
                "/nix/store/x-hello.drv",
                "/tmp/a/x.nix:3",
                "",
                false,
            )),
        );
        assert_ne!(a, hidden);
        // An error's wording differs between Nix versions; that it failed does not.
        let (e1, _) = opinion(None, Some(&answer("", "", "error: boom", false)));
        let (e2, _) = opinion(None, Some(&answer("", "", "error:\n  boom", false)));
        assert_eq!(e1, e2);
        assert_ne!(e1, opinion(None, Some(&answer("", "", "", false))).0);
    }

    #[test]
    fn a_disagreement_names_both_agents_and_the_attribute() {
        let (digest, summary) =
            opinion(None, Some(&answer("/nix/store/x-hello.drv", "", "", false)));
        let first = EvalOpinion {
            task: 2,
            agent: "a".into(),
            digest,
            summary,
        };
        let (_, other) = opinion(None, Some(&answer("/nix/store/y-hello.drv", "", "", false)));
        let msg = disagreement(&first, "b", &other);
        assert!(
            msg.contains("agents a and b evaluated evaluation task 2 differently"),
            "{msg}"
        );
        assert!(
            msg.contains("attribute 'hello': agent a says /nix/store/x-hello.drv, agent b says /nix/store/y-hello.drv"),
            "{msg}"
        );
    }
}
