//! Evaluation tasks that keep failing with the machine's words (`eval_parked`): the task's
//! own failure when its agent evaluates the run's other tasks, the farm's otherwise.

use super::tests::{assigned, flake_run, registration, test_engine};
use super::*;

/// An engine with one retry and one attribute per task, and agent `a` with two evaluation
/// slots, asked to evaluate `names`. Returns the run and what `a` is sent.
fn listed(names: &[&str]) -> (Engine, Clock, String, Agent) {
    let (engine, clock, dir) = test_engine(EngineOptions {
        eval_chunk_size: 1,
        max_infra_retries: 1,
        ..Default::default()
    });
    let (tx, rx) = mpsc::unbounded_channel();
    let mut reg = registration("a", "");
    reg.max_jobs = 4;
    let (conn, _) = engine.connect_agent(reg, tx).unwrap();
    let run = engine.submit(flake_run()).unwrap();
    let mut a = Agent { conn, rx };
    let (attempt, job) = assigned(&mut a.rx);
    assert!(matches!(job, Job::EvalList { .. }), "{job:?}");
    let result = Ok((names.iter().map(ToString::to_string).collect(), vec![]));
    let list = FromAgent::EvalList {
        attempt,
        result,
        follows: false,
        evaluated: None,
    };
    engine.agent_message("a", conn, list).unwrap();
    (engine, (clock, dir), run, a)
}

/// The engine's clock (and what must outlive the engine).
type Clock = (Arc<crate::clock::ManualClock>, tempfile::TempDir);

struct Agent {
    conn: u64,
    rx: mpsc::UnboundedReceiver<ToAgent>,
}

/// Every evaluation task `a` holds now: (attempt, its one attribute).
fn tasks(a: &mut Agent) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while let Ok(m) = a.rx.try_recv() {
        if let ToAgent::Assign {
            attempt,
            job: Job::EvalChunk { attrs, .. },
            ..
        } = m
        {
            out.push((attempt, attrs.concat()));
        }
    }
    out
}

/// Answers every evaluation task `a` is given with `answer(a, attempt, attribute)` until it
/// is given none (`good` first, of those given at once).
fn answer_all(a: &mut Agent, mut answer: impl FnMut(&Agent, String, &str)) {
    loop {
        let mut held = tasks(a);
        if held.is_empty() {
            return;
        }
        held.sort_by_key(|(_, attr)| attr != "good");
        for (attempt, attr) in held {
            answer(a, attempt, &attr);
        }
    }
}

/// Fails every try of `bad` with the machine's words while `good`'s task is held unanswered
/// (still evaluating): `good`'s attempt, and how often `bad` failed.
fn fail_bad_holding_good(engine: &Engine, a: &mut Agent) -> (Option<String>, u32) {
    let (mut good, mut failures) = (None, 0);
    answer_all(a, |a, attempt, attr| {
        if attr == "good" {
            good = Some(attempt);
        } else {
            failures += 1;
            fail(engine, a, attempt);
        }
    });
    (good, failures)
}

const LOCKED: &str = "evaluation aborted with the following error message: 'database is locked'";

fn fail(engine: &Engine, a: &Agent, attempt: String) {
    fail_with(engine, a, attempt, LOCKED);
}

fn fail_with(engine: &Engine, a: &Agent, attempt: String, msg: &str) {
    let result = Err((msg.to_string(), true));
    let m = FromAgent::EvalChunk { attempt, result };
    engine.agent_message("a", a.conn, m).unwrap();
}

fn evaluate(engine: &Engine, a: &Agent, attempt: String, name: &str) {
    let h: String = std::iter::repeat_n('1', 32).collect();
    let (drv, out) = (
        format!("/nix/store/{h}-{name}.drv"),
        format!("/nix/store/{h}-{name}"),
    );
    let outputs: Outputs = [("out".to_string(), op(&out))].into();
    let node = DrvNode {
        system: "x86_64-linux".into(),
        outputs: outputs.clone(),
        ..Default::default()
    };
    let attr = EvaluatedAttr {
        attr: name.into(),
        info: PackageInfo {
            drv_path: Some(sp(&drv)),
            outputs,
            system: "x86_64-linux".into(),
            ..Default::default()
        },
    };
    let result = Ok((vec![attr], [(sp(&drv), node)].into()));
    let m = FromAgent::EvalChunk { attempt, result };
    engine.agent_message("a", a.conn, m).unwrap();
}

#[test]
fn a_task_failing_so_where_the_others_evaluate_fails_its_package_not_the_run() {
    let (engine, clock, run, mut a) = listed(&["bad", "good"]);
    // `bad` fails at once, every time, while `good` is still evaluating: the decision waits
    // for it.
    let (good, mut failures) = fail_bad_holding_good(&engine, &mut a);
    assert_eq!(failures, 2, "the first try and one retry");
    assert_eq!(engine.run_state(&run).unwrap(), RunState::Evaluating);
    clock.0.advance(1_000);
    evaluate(&engine, &a, good.expect("good's task"), "good");
    // Once more now that the others are done; failing so again, it is `bad`'s own.
    answer_all(&mut a, |a, attempt, _| {
        failures += 1;
        fail(&engine, a, attempt);
    });
    assert_eq!(failures, 3, "and one try after the others settled");
    let report = engine.report(&run).unwrap();
    assert_ne!(report.state, RunState::Failed, "{}", report.error);
    let p = |n: &str| report.packages.iter().find(|p| p.attr == n).unwrap();
    assert_eq!(p("bad").status, PackageStatus::EvalFailed);
    assert!(
        p("bad").reason.contains("database is locked"),
        "{}",
        p("bad").reason
    );
    assert_ne!(p("good").status, PackageStatus::EvalFailed);
}

#[test]
fn tasks_failing_so_where_nothing_evaluates_fail_the_run() {
    let (engine, _clock, run, mut a) = listed(&["one", "two"]);
    let mut failures = 0;
    answer_all(&mut a, |a, attempt, _| {
        failures += 1;
        fail(&engine, a, attempt);
    });
    assert_eq!(failures, 6, "two tasks, each tried twice and once more");
    let report = engine.report(&run).unwrap();
    assert_eq!(report.state, RunState::Failed);
    assert!(
        report.error.contains("evaluation kept failing on agents")
            && report.error.contains("database is locked"),
        "{}",
        report.error
    );
}

#[test]
fn a_task_failing_so_only_after_the_others_evaluated_fails_the_run() {
    // `good` evaluated first; then every try of `bad` fails: the agent's store may have
    // broken since, so nothing says the failure is `bad`'s own.
    let (engine, clock, run, mut a) = listed(&["bad", "good"]);
    let mut failures = 0;
    answer_all(&mut a, |a, attempt, attr| {
        if attr == "good" {
            evaluate(&engine, a, attempt, "good");
            clock.0.advance(1_000);
        } else {
            failures += 1;
            fail(&engine, a, attempt);
        }
    });
    assert_eq!(failures, 3);
    let report = engine.report(&run).unwrap();
    assert_eq!(report.state, RunState::Failed);
    assert!(
        report.error.contains("database is locked"),
        "{}",
        report.error
    );
}

#[test]
fn a_task_failing_with_other_words_fails_the_run_as_before() {
    // Not the machine's words (a source that cannot be fetched): never the package's.
    let (engine, _clock, run, mut a) = listed(&["bad", "good"]);
    let mut good = None;
    answer_all(&mut a, |a, attempt, attr| {
        if attr == "good" {
            good = Some(attempt);
        } else {
            fail_with(&engine, a, attempt, "cannot fetch source: connection reset");
        }
    });
    assert_eq!(engine.run_state(&run).unwrap(), RunState::Failed);
    drop(good);
}

#[test]
fn a_task_that_evaluates_on_its_try_after_the_others_is_blamed_for_nothing() {
    // An outage that ended meanwhile (a lock held, a daemon restarting): `bad` evaluates
    // on the try it is given once the others are done.
    let (engine, _clock, run, mut a) = listed(&["bad", "good"]);
    let (good, failures) = fail_bad_holding_good(&engine, &mut a);
    evaluate(&engine, &a, good.expect("good's task"), "good");
    answer_all(&mut a, |a, attempt, attr| {
        evaluate(&engine, a, attempt, attr)
    });
    assert_eq!(failures, 2);
    let report = engine.report(&run).unwrap();
    assert_ne!(report.state, RunState::Failed, "{}", report.error);
    for p in &report.packages {
        assert_ne!(
            p.status,
            PackageStatus::EvalFailed,
            "{}: {}",
            p.attr,
            p.reason
        );
    }
}
