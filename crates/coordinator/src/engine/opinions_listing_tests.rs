//! Cross-checked listings that evaluated their attributes: one an agent's listing left out
//! threw there, and counts as failed, as when an agent sends the failure.

use super::opinions_tests::{engine, handed, listing, send_listing};
use super::tests::{TestAgent, connect_agent, flake_run};
use super::*;

/// How an agent's listing answers for `broken`, the second of two packages.
#[derive(Clone, Copy)]
enum Broken {
    /// Evaluated to a derivation (it evaluates on this host).
    Evaluated,
    /// Sent as failed, with Nix's message (agents before listings left failures to tasks).
    Failed,
    /// Left out of what the listing evaluated: it threw, and evaluation tasks get its message.
    LeftOut,
}

/// `name` takes the listing and answers `hello` and `broken`, both evaluated by the listing.
fn answer_two(engine: &Engine, name: &str, a: &mut TestAgent, broken: Broken) {
    let (mut names, (mut attrs, mut drvs)) = listing('1');
    names.push("broken".into());
    match broken {
        Broken::Evaluated => {
            let (_, (mut more, more_drvs)) = listing('2');
            more[0].attr = "broken".into();
            attrs.append(&mut more);
            drvs.extend(more_drvs);
        }
        Broken::Failed => attrs.push(EvaluatedAttr {
            attr: "broken".into(),
            info: PackageInfo {
                eval_error: "error: broken: unsupported on this platform".into(),
                ..Default::default()
            },
        }),
        Broken::LeftOut => {}
    }
    send_listing(engine, name, a, names, Some((attrs, drvs)));
}

#[test]
fn an_attribute_a_listing_left_out_counts_as_failed_there() {
    // a's listing left `broken` out (it threw there); b evaluated it: one-sided, asked again.
    let (engine, _dir) = engine();
    let mut a = connect_agent(&engine, "a");
    let run = engine.submit(flake_run()).unwrap();
    let mut b = connect_agent(&engine, "b");
    answer_two(&engine, "a", &mut a, Broken::LeftOut);
    answer_two(&engine, "b", &mut b, Broken::Evaluated);
    let report = engine.report(&run).unwrap();
    assert_eq!(report.state, RunState::Evaluating, "{}", report.error);
    answer_two(&engine, "a", &mut a, Broken::Evaluated);
    let report = engine.report(&run).unwrap();
    assert_ne!(report.state, RunState::Failed, "{}", report.error);
    assert!(
        report.packages.iter().any(|p| p.attr == "broken"
            && p.drv_path
                .as_ref()
                .is_some_and(|d| d.ends_with("-hello.drv"))),
        "{report:?}"
    );
}

#[test]
fn a_failure_sent_and_a_failure_left_out_agree() {
    // An agent of the old kind sends the failure, one of the new kind leaves it out: the
    // same answer. What threw goes to an evaluation task, for its message.
    for (first, second) in [
        (Broken::Failed, Broken::LeftOut),
        (Broken::LeftOut, Broken::Failed),
        (Broken::LeftOut, Broken::LeftOut),
    ] {
        let (engine, _dir) = engine();
        let mut a = connect_agent(&engine, "a");
        let run = engine.submit(flake_run()).unwrap();
        let mut b = connect_agent(&engine, "b");
        answer_two(&engine, "a", &mut a, first);
        answer_two(&engine, "b", &mut b, second);
        let report = engine.report(&run).unwrap();
        assert_ne!(report.state, RunState::Failed, "{}", report.error);
        let events = super::queries_tests::run_events(&engine, &run);
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, nixfarm_core::RunEvent::EvalAwaitingCheck { agent, .. } if agent == "b")),
            "taken at once, not asked again: {events:?}"
        );
        if matches!(second, Broken::LeftOut) {
            let tasks: Vec<Job> = handed([&mut a, &mut b]);
            assert!(
                tasks.iter().any(
                    |j| matches!(j, Job::EvalChunk { attrs, .. } if attrs == &["broken".to_string()])
                ),
                "{tasks:?}"
            );
        }
    }
}
