//! Cross-checked evaluation through the engine: two agents must agree before anything
//! builds, an agent never checks itself, and a restart between the answers loses neither.

use super::tests::{TestAgent, assigned, connect_agent, flake_run};
use super::*;
use crate::db::Db;

fn cross_checked() -> EngineOptions {
    EngineOptions {
        cross_check_eval: true,
        lease_ms: 5_000,
        ..Default::default()
    }
}

/// The listing an agent answers: package `hello`, evaluated to the derivation `hash`.
pub(super) fn listing(hash: char) -> (Vec<String>, EvalChunkOutput) {
    let h: String = std::iter::repeat_n(hash, 32).collect();
    let drv = format!("/nix/store/{h}-hello.drv");
    let out = format!("/nix/store/{h}-hello");
    let outputs: Outputs = [("out".to_string(), op(&out))].into();
    let attr = EvaluatedAttr {
        attr: "hello".into(),
        info: PackageInfo {
            drv_path: Some(sp(&drv)),
            outputs: outputs.clone(),
            system: "x86_64-linux".into(),
            ..Default::default()
        },
    };
    let node = DrvNode {
        system: "x86_64-linux".into(),
        outputs,
        ..Default::default()
    };
    (
        vec!["hello".into()],
        (vec![attr], [(sp(&drv), node)].into()),
    )
}

/// `name` takes the listing it is given and answers it with `hash`'s evaluation.
fn answer_listing(engine: &Engine, name: &str, a: &mut TestAgent, hash: char) {
    let (names, evaluated) = listing(hash);
    send_listing(engine, name, a, names, Some(evaluated));
}

/// `name` takes the listing it is given and answers it: `names`, and what it evaluated.
pub(super) fn send_listing(
    engine: &Engine,
    name: &str,
    a: &mut TestAgent,
    names: Vec<String>,
    evaluated: Option<EvalChunkOutput>,
) {
    let (attempt, job) = assigned(&mut a.rx);
    assert!(matches!(job, Job::EvalList { .. }), "{name} got {job:?}");
    engine
        .agent_message(
            name,
            a.conn,
            FromAgent::EvalList {
                attempt,
                result: Ok((names, vec![])),
                follows: false,
                evaluated,
            },
        )
        .unwrap();
}

/// An engine cross-checking evaluation, its state in memory.
pub(super) fn engine() -> (Engine, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(
        Db::open_in_memory().unwrap(),
        dir.path().join("sources"),
        Arc::new(crate::clock::ManualClock::new(1_000_000)),
        cross_checked(),
    )
    .unwrap();
    (engine, dir)
}

/// The run failed saying `why` about package `hello`, and knows no package.
fn failed_on(engine: &Engine, run: &str, why: &str) {
    let report = engine.report(run).unwrap();
    assert_eq!(report.state, RunState::Failed);
    assert!(
        report.error.contains(why) && report.error.contains("attribute 'hello'"),
        "{}",
        report.error
    );
    assert!(report.packages.is_empty(), "{:?}", report.packages);
}

/// The jobs handed to `agents` so far, at most one each.
pub(super) fn handed(agents: [&mut TestAgent; 2]) -> Vec<Job> {
    agents
        .into_iter()
        .filter_map(|t| match t.rx.try_recv() {
            Ok(ToAgent::Assign { job, .. }) => Some(job),
            _ => None,
        })
        .collect()
}

#[test]
fn nothing_builds_until_a_second_agent_agrees() {
    let (engine, _dir) = engine();
    let mut a = connect_agent(&engine, "a");
    let run = engine.submit(flake_run()).unwrap();
    answer_listing(&engine, "a", &mut a, '1');
    // Not checked by itself, and nothing to build yet; a watcher is told why.
    assert!(a.rx.try_recv().is_err(), "agent a was given more work");
    assert!(engine.report(&run).unwrap().packages.is_empty());
    let events = super::queries_tests::run_events(&engine, &run);
    let awaiting = nixfarm_core::RunEvent::EvalAwaitingCheck {
        task: -1,
        agent: "a".into(),
    };
    assert!(events.contains(&awaiting), "{events:?}");
    let mut b = connect_agent(&engine, "b");
    answer_listing(&engine, "b", &mut b, '1');
    // Agreed: the package is known and builds.
    let (_, job) = assigned(&mut a.rx);
    assert!(
        matches!(job, Job::Build { ref drv_path, .. } if drv_path.ends_with("-hello.drv")),
        "{job:?}"
    );
    assert_eq!(engine.report(&run).unwrap().packages.len(), 1);
}

#[test]
fn a_second_agent_that_disagrees_fails_the_run_and_nothing_builds() {
    let (engine, _dir) = engine();
    let mut a = connect_agent(&engine, "a");
    let run = engine.submit(flake_run()).unwrap();
    let mut b = connect_agent(&engine, "b");
    answer_listing(&engine, "a", &mut a, '1');
    answer_listing(&engine, "b", &mut b, '2');
    failed_on(
        &engine,
        &run,
        "agents a and b evaluated the attribute listing differently",
    );
    for (n, t) in [("a", &mut a), ("b", &mut b)] {
        while let Ok(m) = t.rx.try_recv() {
            assert!(
                !matches!(
                    m,
                    ToAgent::Assign {
                        job: Job::Build { .. },
                        ..
                    }
                ),
                "{n} was given a build"
            );
        }
    }
}

#[test]
fn a_first_answer_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(crate::clock::ManualClock::new(1_000_000));
    let open = || super::recovery_tests::open_in(dir.path(), &clock, cross_checked());
    let engine = open();
    let mut a = connect_agent(&engine, "a");
    let run = engine.submit(flake_run()).unwrap();
    answer_listing(&engine, "a", &mut a, '1');
    drop(engine);
    let engine = open();
    // Agent a is still not asked to check itself; b disagrees with what a said before.
    let mut a = connect_agent(&engine, "a");
    assert!(
        a.rx.try_recv().is_err(),
        "agent a was given its own listing"
    );
    let mut b = connect_agent(&engine, "b");
    answer_listing(&engine, "b", &mut b, '2');
    let report = engine.report(&run).unwrap();
    assert_eq!(report.state, RunState::Failed, "{}", report.error);
    assert!(report.error.contains("agents a and b"), "{}", report.error);
}

#[test]
fn an_evaluation_task_is_cross_checked_like_the_listing() {
    let (engine, _dir) = engine();
    let mut a = connect_agent(&engine, "a");
    let run = engine.submit(flake_run()).unwrap();
    let mut b = connect_agent(&engine, "b");
    let (a_conn, b_conn) = (a.conn, b.conn);
    // Listings that only list (a larger repository): they agree.
    for (name, t) in [("a", &mut a), ("b", &mut b)] {
        let (attempt, _) = assigned(&mut t.rx);
        engine
            .agent_message(
                name,
                t.conn,
                FromAgent::EvalList {
                    attempt,
                    result: Ok((vec!["hello".into()], vec![])),
                    follows: false,
                    evaluated: None,
                },
            )
            .unwrap();
    }
    // The task goes to one of them (whichever dispatch reached first), then to the other;
    // their answers differ.
    let first = match a.rx.try_recv() {
        Ok(ToAgent::Assign { attempt, job, .. }) => ("a", attempt, job),
        _ => {
            let (attempt, job) = assigned(&mut b.rx);
            ("b", attempt, job)
        }
    };
    let answer = |name: &str, conn: u64, attempt: String, job: Job, hash: char| {
        assert!(matches!(job, Job::EvalChunk { .. }), "{name} got {job:?}");
        let result = Ok(listing(hash).1);
        engine
            .agent_message(name, conn, FromAgent::EvalChunk { attempt, result })
            .unwrap();
    };
    let (other, other_name) = if first.0 == "a" {
        (&mut b, "b")
    } else {
        (&mut a, "a")
    };
    let first_conn = if first.0 == "a" { a_conn } else { b_conn };
    answer(first.0, first_conn, first.1, first.2, '1');
    let (attempt, job) = assigned(&mut other.rx);
    answer(other_name, other.conn, attempt, job, '2');
    failed_on(&engine, &run, "evaluated evaluation task 0 differently");
}

#[test]
fn a_listing_only_one_agent_evaluated_goes_to_tasks() {
    let (engine, _dir) = engine();
    let mut a = connect_agent(&engine, "a");
    let run = engine.submit(flake_run()).unwrap();
    let mut b = connect_agent(&engine, "b");
    answer_listing(&engine, "a", &mut a, '1');
    // b lists the same but evaluated nothing itself (it ran out of memory, say).
    send_listing(&engine, "b", &mut b, vec!["hello".into()], None);
    assert_ne!(engine.run_state(&run).unwrap(), RunState::Failed);
    // Not a disagreement: the package is evaluated by a task, which is checked in turn.
    let got: Vec<Job> = handed([&mut a, &mut b]);
    assert!(
        matches!(got.as_slice(), [Job::EvalChunk { attrs, .. }] if attrs == &["hello"]),
        "{got:?}"
    );
    assert!(engine.report(&run).unwrap().packages.is_empty());
}

/// An output counts as already in the cache (warm mode) only if both agents say so; and
/// only in a run that asked to skip what the cache holds.
#[test]
fn what_one_agent_alone_says_the_cache_holds_is_built() {
    for (cross_check, skip_cached) in [(true, true), (false, false)] {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(
            Db::open_in_memory().unwrap(),
            dir.path().join("sources"),
            Arc::new(crate::clock::ManualClock::new(1_000_000)),
            EngineOptions {
                cross_check_eval: cross_check,
                ..cross_checked()
            },
        )
        .unwrap();
        let mut a = connect_agent(&engine, "a");
        let run = engine
            .submit(RunSpec {
                skip_cached,
                ..flake_run()
            })
            .unwrap();
        let mut b = connect_agent(&engine, "b");
        // The one claiming it answers last (when cross-checked, its answer is the one taken).
        let (names, (attrs, mut drvs)) = listing('1');
        for n in drvs.values_mut() {
            n.present = true;
        }
        if cross_check {
            answer_listing(&engine, "a", &mut a, '1');
            send_listing(&engine, "b", &mut b, names, Some((attrs, drvs)));
        } else {
            send_listing(&engine, "a", &mut a, names, Some((attrs, drvs)));
        }
        let built = engine
            .report(&run)
            .unwrap()
            .packages
            .iter()
            .filter(|p| p.status == nixfarm_core::PackageStatus::Ready)
            .count();
        let report = engine.report(&run).unwrap();
        assert_eq!(built, 0, "cross-check {cross_check}: {report:?}");
        let sent: Vec<Job> = handed([&mut a, &mut b]);
        assert!(
            matches!(sent.as_slice(), [Job::Build { .. }]),
            "cross-check {cross_check}: {sent:?}"
        );
    }
}

#[test]
fn a_second_name_on_the_same_join_token_is_not_a_second_opinion() {
    use super::checks_tests::{connect_with, idle};
    use crate::credentials::Credential;
    let (engine, _dir) = engine();
    let mut a = connect_with(&engine, "a", Credential::JoinToken);
    let run = engine.submit(flake_run()).unwrap();
    answer_listing(&engine, "a", &mut a, '1');
    let mut twin = connect_with(&engine, "a-twin", Credential::JoinToken);
    assert!(
        idle(&mut twin),
        "a second name on a's token was asked to check it"
    );
    assert!(engine.report(&run).unwrap().packages.is_empty());
    let mut b = connect_with(&engine, "b", Credential::NamedToken("b".into()));
    answer_listing(&engine, "b", &mut b, '1');
    assert_eq!(engine.report(&run).unwrap().packages.len(), 1);
}

#[test]
fn an_answer_is_judged_by_the_credential_it_was_given_with() {
    use super::checks_tests::{connect_with, idle};
    use crate::credentials::Credential;
    let (engine, _dir) = engine();
    let mut x = connect_with(&engine, "x", Credential::JoinToken);
    engine.submit(flake_run()).unwrap();
    answer_listing(&engine, "x", &mut x, '1');
    // x's name comes back under a certificate: its answer was still given on the join token.
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let again = Registration {
        credential: Credential::Certificate("c1".into()),
        ..super::tests::registration("x", &x.session)
    };
    engine.connect_agent(again, tx).unwrap();
    let mut y = connect_with(&engine, "y", Credential::JoinToken);
    assert!(
        idle(&mut y),
        "a second name on x's token was asked to check it"
    );
    let mut z = connect_with(&engine, "z", Credential::Certificate("c2".into()));
    answer_listing(&engine, "z", &mut z, '1');
}

/// `name` takes the listing and answers that `hello` failed to evaluate (out of memory).
fn answer_failed_listing(engine: &Engine, name: &str, a: &mut TestAgent) {
    let (names, (mut attrs, _)) = listing('1');
    attrs[0].info = PackageInfo {
        eval_error: "error: out of memory".into(),
        ..Default::default()
    };
    send_listing(engine, name, a, names, Some((attrs, BTreeMap::new())));
}

/// Why a run fails once `hello` kept failing on agent a alone.
const A_KEPT_FAILING: &str = "agent b says /nix/store/11111111111111111111111111111111-hello.drv, agent a says an evaluation error";

/// A run whose listing a answered with hello failed (out of memory) and b with hello
/// evaluated: (engine, its directory, a, b, run).
fn failed_on_a_only() -> (Engine, tempfile::TempDir, TestAgent, TestAgent, String) {
    let (engine, _dir) = engine();
    let mut a = connect_agent(&engine, "a");
    let run = engine.submit(flake_run()).unwrap();
    let mut b = connect_agent(&engine, "b");
    answer_failed_listing(&engine, "a", &mut a);
    answer_listing(&engine, "b", &mut b, '1');
    // Asked again, not failed.
    assert_eq!(engine.report(&run).unwrap().state, RunState::Evaluating);
    (engine, _dir, a, b, run)
}

#[test]
fn an_attribute_failing_on_one_host_only_is_evaluated_again() {
    let (engine, _dir, mut a, _b, run) = failed_on_a_only();
    // b's answer is the one to match now (a watcher is told), so a is asked again; this
    // time it agrees.
    let awaiting_b = nixfarm_core::RunEvent::EvalAwaitingCheck {
        task: -1,
        agent: "b".into(),
    };
    let events = super::queries_tests::run_events(&engine, &run);
    assert!(events.contains(&awaiting_b), "{events:?}");
    answer_listing(&engine, "a", &mut a, '1');
    let report = engine.report(&run).unwrap();
    assert_ne!(report.state, RunState::Failed, "{}", report.error);
    let hello = report.packages.iter().find(|p| p.attr == "hello");
    assert!(
        hello.is_some_and(|p| p
            .drv_path
            .as_ref()
            .is_some_and(|d| d.ends_with("-hello.drv"))),
        "{report:?}"
    );
}

#[test]
fn an_attribute_that_keeps_failing_on_one_host_fails_the_run_after_two_more_tries() {
    let (engine, _dir, mut a, _b, run) = failed_on_a_only();
    answer_failed_listing(&engine, "a", &mut a);
    assert_eq!(engine.report(&run).unwrap().state, RunState::Evaluating);
    answer_failed_listing(&engine, "a", &mut a);
    failed_on(&engine, &run, A_KEPT_FAILING);
}

#[test]
fn a_listing_one_agent_evaluated_is_taken_at_once_even_if_it_failed_there() {
    let (engine, _dir) = engine();
    let mut a = connect_agent(&engine, "a");
    let run = engine.submit(flake_run()).unwrap();
    let mut b = connect_agent(&engine, "b");
    answer_failed_listing(&engine, "a", &mut a);
    // b listed without evaluating: the names agree, and hello goes to an evaluation task.
    send_listing(&engine, "b", &mut b, vec!["hello".into()], None);
    let report = engine.report(&run).unwrap();
    assert_eq!(report.state, RunState::Evaluating, "{}", report.error);
    let tasks: Vec<Job> = handed([&mut a, &mut b]);
    assert!(
        tasks
            .iter()
            .any(|j| matches!(j, Job::EvalChunk { attrs, .. } if attrs == &["hello".to_string()])),
        "{tasks:?}"
    );
}

#[test]
fn the_tries_left_for_a_one_sided_failure_are_kept_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(crate::clock::ManualClock::new(1_000_000));
    let open = || super::recovery_tests::open_in(dir.path(), &clock, cross_checked());
    let run = {
        let engine = open();
        let mut a = connect_agent(&engine, "a");
        let run = engine.submit(flake_run()).unwrap();
        let mut b = connect_agent(&engine, "b");
        answer_failed_listing(&engine, "a", &mut a);
        answer_listing(&engine, "b", &mut b, '1');
        // The second of the two tries.
        answer_failed_listing(&engine, "a", &mut a);
        assert_eq!(engine.report(&run).unwrap().state, RunState::Evaluating);
        run
    };
    // A restart does not hand out the tries afresh: the next one-sided answer fails it.
    let engine = open();
    let mut a = connect_agent(&engine, "a");
    answer_failed_listing(&engine, "a", &mut a);
    failed_on(&engine, &run, A_KEPT_FAILING);
}

/// Where an attribute is defined steers a hash fix to a file: it is taken only where both
/// agents said the same, and dropped (the fixer then finds the file itself) where not.
#[test]
fn an_attributes_position_counts_only_where_both_agents_say_the_same() {
    for (second, kept) in [("pkgs/hello.nix:3", true), ("pkgs/other.nix:1", false)] {
        let (engine, _dir) = engine();
        let mut a = connect_agent(&engine, "a");
        let mut b = connect_agent(&engine, "b");
        let run = engine.submit(flake_run()).unwrap();
        for (name, agent, position) in [("a", &mut a, "pkgs/hello.nix:3"), ("b", &mut b, second)] {
            let (names, (mut attrs, drvs)) = listing('1');
            attrs[0].info.position = position.into();
            send_listing(&engine, name, agent, names, Some((attrs, drvs)));
        }
        let report = engine.report(&run).unwrap();
        assert_eq!(report.packages.len(), 1, "{report:?}");
        let expected = if kept { "pkgs/hello.nix:3" } else { "" };
        assert_eq!(
            report.packages[0].position, expected,
            "second said {second}"
        );
    }
}

/// With evaluation cross-checked, the flake's other outputs are checked by both agents that
/// listed: the run waits for both, and a check passes only if both said it did (an agent
/// cannot pass what the other found broken, whichever answers last).
#[test]
fn both_listing_agents_repository_checks_count_and_a_failure_stays() {
    use nixfarm_core::report::RepoCheck;
    let (engine, _dir) = engine();
    let mut a = connect_agent(&engine, "a");
    let mut b = connect_agent(&engine, "b");
    let run = engine.submit(flake_run()).unwrap();
    let mut listings = Vec::new();
    for (name, agent) in [("a", &mut a), ("b", &mut b)] {
        let (attempt, _) = assigned(&mut agent.rx);
        let (names, evaluated) = listing('1');
        engine
            .agent_message(
                name,
                agent.conn,
                FromAgent::EvalList {
                    attempt: attempt.clone(),
                    result: Ok((names, vec![])),
                    follows: true,
                    evaluated: Some(evaluated),
                },
            )
            .unwrap();
        listings.push(attempt);
    }
    // The package builds, on whichever agent was handed it.
    let (builder, attempt, conn) = match (a.rx.try_recv(), b.rx.try_recv()) {
        (Ok(ToAgent::Assign { attempt, .. }), _) => ("a", attempt, a.conn),
        (_, Ok(ToAgent::Assign { attempt, .. })) => ("b", attempt, b.conn),
        other => panic!("no build handed out: {other:?}"),
    };
    let (_, out) = listing('1');
    let out = out.0[0].info.outputs["out"].to_string();
    engine
        .agent_message(
            builder,
            conn,
            FromAgent::Build {
                attempt,
                report: super::tests::built(&out),
            },
        )
        .unwrap();
    let check = |ok: bool, message: &str| RepoCheck {
        name: "overlays.default".into(),
        ok,
        message: message.into(),
    };
    let broken = check(false, "is not a function");
    for (name, conn, attempt, said) in [
        ("a", a.conn, &listings[0], broken.clone()),
        ("b", b.conn, &listings[1], check(true, "")),
    ] {
        assert_ne!(
            engine.run_state(&run).unwrap(),
            RunState::Finished,
            "finished before {name}'s checks came"
        );
        engine
            .agent_message(
                name,
                conn,
                FromAgent::RepoChecks {
                    attempt: attempt.clone(),
                    checks: vec![said],
                },
            )
            .unwrap();
    }
    assert_eq!(engine.run_state(&run).unwrap(), RunState::Finished);
    assert_eq!(engine.report(&run).unwrap().repository, vec![broken]);
}
