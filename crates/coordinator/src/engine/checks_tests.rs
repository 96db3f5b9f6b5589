//! Cross-checked builds through the engine: a build counts only once another agent built the
//! same, its dependents wait for that, a difference fails it, an agent never checks itself,
//! the wait is bounded and a restart loses nothing.

use super::queries_tests::run_events;
use super::recovery_tests::open_in;
use super::tests::{
    TestAgent, assigned, built, connect_agent, flake_run, registration, test_engine,
};
use super::*;
use crate::credentials::Credential;
use nixfarm_core::RunEvent;

pub(super) const LIB: &str = "/nix/store/00000000000000000000000000000000-lib.drv";
pub(super) const LIB_OUT: &str = "/nix/store/11111111111111111111111111111111-lib";
pub(super) const APP: &str = "/nix/store/22222222222222222222222222222222-app.drv";
pub(super) const APP_OUT: &str = "/nix/store/33333333333333333333333333333333-app";

pub(super) fn cross_checked() -> EngineOptions {
    EngineOptions {
        cross_check_builds: true,
        cross_check_wait_ms: 60_000,
        ..Default::default()
    }
}

/// `agent` answers the listing it was given with two packages, `app` built on `lib`.
pub(super) fn list_lib_and_app(engine: &Engine, agent: &str, a: &mut TestAgent) {
    let (attempt, job) = assigned(&mut a.rx);
    assert!(matches!(job, Job::EvalList { .. }), "{job:?}");
    let package = |attr: &str, drv: &str, out: &str| EvaluatedAttr {
        attr: attr.into(),
        info: PackageInfo {
            drv_path: Some(sp(drv)),
            outputs: [("out".to_string(), op(out))].into(),
            system: "x86_64-linux".into(),
            ..Default::default()
        },
    };
    let node = |out: &str, inputs: &[&str]| DrvNode {
        system: "x86_64-linux".into(),
        outputs: [("out".to_string(), op(out))].into(),
        input_drvs: inputs.iter().map(|s| sp(s)).collect(),
        ..Default::default()
    };
    let evaluated = (
        vec![package("lib", LIB, LIB_OUT), package("app", APP, APP_OUT)],
        [
            (sp(LIB), node(LIB_OUT, &[])),
            (sp(APP), node(APP_OUT, &[LIB])),
        ]
        .into(),
    );
    engine
        .agent_message(
            agent,
            a.conn,
            FromAgent::EvalList {
                attempt,
                result: Ok((vec!["lib".into(), "app".into()], vec![])),
                follows: false,
                evaluated: Some(evaluated),
            },
        )
        .unwrap();
}

/// The build or check `agent` was handed: (attempt, derivation, whether it is a check).
fn handed(a: &mut TestAgent) -> (String, StorePath, bool) {
    match assigned(&mut a.rx) {
        (
            attempt,
            Job::Build {
                drv_path, check, ..
            },
        ) => (attempt, drv_path, check),
        (_, job) => panic!("not a build: {job:?}"),
    }
}

/// A check's answer: built again, and the same.
pub(super) fn checked(out: &str) -> BuildReport {
    BuildReport {
        checked: true,
        ..built(out)
    }
}

/// Whether `a` was handed no job (other messages, such as a run's end, aside).
pub(super) fn idle(a: &mut TestAgent) -> bool {
    std::iter::from_fn(|| a.rx.try_recv().ok()).all(|m| !matches!(m, ToAgent::Assign { .. }))
}

pub(super) fn answer(
    engine: &Engine,
    agent: &str,
    a: &TestAgent,
    attempt: String,
    report: BuildReport,
) {
    engine
        .agent_message(agent, a.conn, FromAgent::Build { attempt, report })
        .unwrap();
}

pub(super) fn status_of(engine: &Engine, run: &str, attr: &str) -> (PackageStatus, String) {
    let r = engine.report(run).unwrap();
    let p = r.packages.iter().find(|p| p.attr == attr).unwrap();
    (p.status, p.reason.clone())
}

/// A run of `lib` and `app` where agent a built `lib` and b is connected: (run, a, b, the
/// check b was handed).
fn lib_built_by_a(engine: &Engine) -> (String, TestAgent, TestAgent, String) {
    let mut a = connect_agent(engine, "a");
    let run = engine.submit(flake_run()).unwrap();
    list_lib_and_app(engine, "a", &mut a);
    let (attempt, drv, check) = handed(&mut a);
    assert_eq!((drv.as_str(), check), (LIB, false));
    let mut b = connect_agent(engine, "b");
    answer(engine, "a", &a, attempt, built(LIB_OUT));
    let (check_attempt, drv, check) = handed(&mut b);
    assert_eq!((drv.as_str(), check), (LIB, true), "b checks a's build");
    (run, a, b, check_attempt)
}

#[test]
fn a_build_counts_once_another_agent_built_the_same_and_only_then_its_dependents_start() {
    let (engine, _clock, _dir) = test_engine(cross_checked());
    let (run, mut a, mut b, check) = lib_built_by_a(&engine);
    // Built once: not ready, and nothing builds on it yet; operators see it waiting.
    assert_eq!(
        status_of(&engine, &run, "lib"),
        (
            PackageStatus::Pending,
            "built on a; b builds it again to check it".to_string()
        )
    );
    let metrics = engine.metrics_text().unwrap();
    assert!(
        metrics.contains("nixfarm_jobs{state=\"awaiting-check\"} 1"),
        "{metrics}"
    );
    assert!(idle(&mut a), "app started before lib was checked");
    let events = run_events(&engine, &run);
    assert!(events.iter().any(|e| matches!(e,
        RunEvent::JobAwaitingCheck { drv, agent, .. } if drv == LIB && agent == "a")));
    assert!(events.iter().any(|e| matches!(e,
        RunEvent::JobCheckStarted { drv, agent, built_by, .. } if drv == LIB && agent == "b" && built_by == "a")));
    answer(&engine, "b", &b, check, checked(LIB_OUT));
    let (status, reason) = status_of(&engine, &run, "lib");
    assert_eq!(status, PackageStatus::Ready, "{reason}");
    // app goes to whichever agent is free first; its check goes to the other.
    let (builder, mut first, mut other) = match a.rx.try_recv() {
        Ok(ToAgent::Assign { attempt, job, .. }) => (("a", attempt, job), a, b),
        _ => {
            let (attempt, job) = assigned(&mut b.rx);
            (("b", attempt, job), b, a)
        }
    };
    let (name, attempt, job) = builder;
    assert!(matches!(&job, Job::Build { drv_path, check: false, .. } if drv_path == APP));
    let other_name = if name == "a" { "b" } else { "a" };
    answer(&engine, name, &first, attempt, built(APP_OUT));
    assert!(idle(&mut first), "{name} was handed its own check");
    let (attempt, drv, check) = handed(&mut other);
    assert_eq!((drv.as_str(), check), (APP, true));
    answer(&engine, other_name, &other, attempt, checked(APP_OUT));
    let report = engine.report(&run).unwrap();
    assert_eq!(report.state, RunState::Finished);
    assert_eq!(report.summary.ready, 2, "{:?}", report.packages);
    let finished = run_events(&engine, &run)
        .into_iter()
        .find_map(|e| match e {
            RunEvent::JobFinished { drv, message, .. } if drv == LIB => Some(message),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        finished,
        "built on a; b built it again and got the same outputs"
    );
}

#[test]
fn a_check_that_differs_fails_the_package_as_not_reproducible_and_its_dependents() {
    let (engine, _clock, _dir) = test_engine(cross_checked());
    let told = Arc::new(Mutex::new(Vec::new()));
    let t = told.clone();
    engine.attach_farm_cache(Arc::new(move |paths: &[String]| {
        t.lock().unwrap().extend_from_slice(paths)
    }));
    let (run, mut a, b, check) = lib_built_by_a(&engine);
    let differs = BuildReport {
        kind: BuildOutcome::NotReproducible,
        message: format!("derivation '{LIB}' may not be deterministic: output '{LIB_OUT}' differs"),
        ..Default::default()
    };
    answer(&engine, "b", &b, check, differs);
    let (status, reason) = status_of(&engine, &run, "lib");
    assert_eq!(status, PackageStatus::NotReproducible);
    assert!(
        reason.contains("a and b built different outputs")
            && reason.contains("may not be deterministic"),
        "{reason}"
    );
    assert_eq!(
        status_of(&engine, &run, "app").0,
        PackageStatus::DependencyFailed
    );
    assert!(idle(&mut a), "app was built on an unchecked lib");
    // The farm cache is told to stop serving what a built.
    assert_eq!(*told.lock().unwrap(), [LIB_OUT]);
    assert_eq!(engine.report(&run).unwrap().state, RunState::Finished);
}

#[test]
fn a_check_that_fails_to_build_fails_the_package_and_a_broken_one_is_tried_again() {
    let (engine, _clock, _dir) = test_engine(cross_checked());
    let (run, _a, mut b, check) = lib_built_by_a(&engine);
    let broke = BuildReport {
        kind: BuildOutcome::InfraFailed,
        message: "cannot connect to the daemon".into(),
        ..Default::default()
    };
    answer(&engine, "b", &b, check, broke);
    // Broken on b's side: checked again (by b, the only agent that may).
    let (check, drv, is_check) = handed(&mut b);
    assert_eq!((drv.as_str(), is_check), (LIB, true));
    let failed = BuildReport {
        kind: BuildOutcome::BuildFailed,
        message: "builder for 'lib' failed with exit code 2".into(),
        ..Default::default()
    };
    answer(&engine, "b", &b, check, failed);
    let (status, reason) = status_of(&engine, &run, "lib");
    assert_eq!(status, PackageStatus::BuildFailed);
    assert_eq!(
        reason,
        "built on a, but building it again on b failed: builder for 'lib' failed with exit code 2"
    );
}

#[test]
fn an_agent_never_checks_its_own_build_and_nobody_else_checking_it_fails_it_after_the_wait() {
    let (engine, clock, _dir) = test_engine(cross_checked());
    let mut a = connect_agent(&engine, "a");
    let run = engine.submit(flake_run()).unwrap();
    list_lib_and_app(&engine, "a", &mut a);
    let (attempt, _, _) = handed(&mut a);
    answer(&engine, "a", &a, attempt, built(LIB_OUT));
    assert!(idle(&mut a), "a was handed a check of its own build");
    clock.advance(59_000);
    engine.check_leases();
    assert_eq!(
        status_of(&engine, &run, "lib"),
        (
            PackageStatus::Pending,
            "built on a; waiting for another agent to check it".to_string()
        )
    );
    // `nixfarm agents` lists it among the farm's waiting jobs.
    assert!(
        engine.waiting_jobs().contains(&(
            "built, waiting for another agent to check it".to_string(),
            1,
            "lib".to_string()
        )),
        "{:?}",
        engine.waiting_jobs()
    );
    clock.advance(1_000);
    engine.check_leases();
    let (status, reason) = status_of(&engine, &run, "lib");
    assert_eq!(status, PackageStatus::InfraFailed);
    assert_eq!(
        reason,
        "built on a, but no other agent took its check within 60 s (cross_check_builds needs a second agent, with a credential of its own, that can build it)"
    );
    assert_eq!(engine.report(&run).unwrap().state, RunState::Finished);
}

#[test]
fn an_evaluation_nobody_else_answers_fails_the_run_after_the_wait() {
    let (engine, clock, _dir) = test_engine(EngineOptions {
        cross_check_eval: true,
        ..cross_checked()
    });
    let mut a = connect_agent(&engine, "a");
    let run = engine.submit(flake_run()).unwrap();
    list_lib_and_app(&engine, "a", &mut a);
    clock.advance(60_000);
    engine.check_leases();
    let report = engine.report(&run).unwrap();
    assert_eq!(report.state, RunState::Failed);
    assert_eq!(
        report.error,
        "the attribute listing was answered by a, and no other agent answered it within 60 s to check it (cross_check_evaluation needs two connected agents with credentials of their own)"
    );
}

/// A database directory, a clock and cross-checking options for coordinators that restart.
pub(super) fn restartable() -> (
    tempfile::TempDir,
    Arc<crate::clock::ManualClock>,
    EngineOptions,
) {
    let opts = EngineOptions {
        lease_ms: 5_000,
        ..cross_checked()
    };
    let clock = Arc::new(crate::clock::ManualClock::new(1_000_000));
    (tempfile::tempdir().unwrap(), clock, opts)
}

/// In a coordinator on the database in `dir`: agent a built `lib` of a run of `spec` (not
/// ready: its check is to come), and the coordinator stops. Returns the run.
pub(super) fn lib_built_then_stopped(
    dir: &std::path::Path,
    clock: &Arc<crate::clock::ManualClock>,
    opts: EngineOptions,
    spec: RunSpec,
) -> String {
    let engine = open_in(dir, clock, opts);
    let mut a = connect_agent(&engine, "a");
    let run = engine.submit(spec).unwrap();
    list_lib_and_app(&engine, "a", &mut a);
    let (attempt, _, _) = handed(&mut a);
    answer(&engine, "a", &a, attempt, built(LIB_OUT));
    assert_eq!(status_of(&engine, &run, "lib").0, PackageStatus::Pending);
    run
}

#[test]
fn a_build_awaiting_its_check_survives_a_restart() {
    let (dir, clock, opts) = restartable();
    let run = lib_built_then_stopped(dir.path(), &clock, opts.clone(), flake_run());
    let engine = open_in(dir.path(), &clock, opts);
    assert_eq!(status_of(&engine, &run, "lib").0, PackageStatus::Pending);
    let mut a = connect_agent(&engine, "a");
    assert!(idle(&mut a), "a was handed app or its own check");
    let mut b = connect_agent(&engine, "b");
    let (check, drv, is_check) = handed(&mut b);
    assert_eq!((drv.as_str(), is_check), (LIB, true));
    answer(&engine, "b", &b, check, checked(LIB_OUT));
    assert_eq!(status_of(&engine, &run, "lib").0, PackageStatus::Ready);
}

/// Registers a one-job agent admitted by `credential`.
pub(super) fn connect_with(engine: &Engine, name: &str, credential: Credential) -> TestAgent {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let reg = Registration {
        credential,
        ..registration(name, "")
    };
    let (conn, session) = engine.connect_agent(reg, tx).unwrap();
    TestAgent { conn, session, rx }
}

#[test]
fn two_names_on_one_join_token_do_not_check_each_other() {
    let (engine, _clock, _dir) = test_engine(cross_checked());
    let mut a = connect_with(&engine, "a", Credential::JoinToken);
    let run = engine.submit(flake_run()).unwrap();
    list_lib_and_app(&engine, "a", &mut a);
    let (attempt, _, _) = handed(&mut a);
    // The same holder under a second name, idle: not handed the check.
    let mut twin = connect_with(&engine, "a-twin", Credential::JoinToken);
    answer(&engine, "a", &a, attempt, built(LIB_OUT));
    assert!(
        idle(&mut twin),
        "a second name on a's token was handed its check"
    );
    assert_eq!(status_of(&engine, &run, "lib").0, PackageStatus::Pending);
    // An agent with a certificate of its own is.
    let mut other = connect_with(&engine, "b", Credential::Certificate("ab12".into()));
    let (_, drv, check) = handed(&mut other);
    assert_eq!((drv.as_str(), check), (LIB, true));
}

#[test]
fn built_from_an_agent_that_did_not_check_is_not_a_check() {
    let (engine, _clock, _dir) = test_engine(EngineOptions {
        max_infra_retries: 1,
        ..cross_checked()
    });
    let (run, _a, mut b, check) = lib_built_by_a(&engine);
    // An agent that predates checks builds (substitutes) and says "built".
    answer(&engine, "b", &b, check, built(LIB_OUT));
    assert_eq!(status_of(&engine, &run, "lib").0, PackageStatus::Pending);
    let (check, drv, is_check) = handed(&mut b);
    assert_eq!((drv.as_str(), is_check), (LIB, true));
    answer(&engine, "b", &b, check, built(LIB_OUT));
    let (status, reason) = status_of(&engine, &run, "lib");
    assert_eq!(status, PackageStatus::InfraFailed);
    assert_eq!(
        reason,
        "built on a, but it could not be checked on b: agent b answered without checking (is it older than cross_check_builds?)"
    );
}

fn heartbeat(engine: &Engine, agent: &str, a: &TestAgent, paused: &str) {
    let beat = FromAgent::Heartbeat {
        running: vec![],
        draining: false,
        paused: paused.into(),
    };
    engine.agent_message(agent, a.conn, beat).unwrap();
}

#[test]
fn a_check_waits_its_turn_while_an_agent_that_may_take_it_is_connected() {
    let (engine, clock, _dir) = test_engine(cross_checked());
    let mut a = connect_agent(&engine, "a");
    let run = engine.submit(flake_run()).unwrap();
    list_lib_and_app(&engine, "a", &mut a);
    let (attempt, _, _) = handed(&mut a);
    // b is connected but takes no work for now (its disk is full).
    let mut b = connect_agent(&engine, "b");
    heartbeat(&engine, "b", &b, "disk full");
    answer(&engine, "a", &a, attempt, built(LIB_OUT));
    assert!(idle(&mut b));
    for _ in 0..3 {
        clock.advance(40_000);
        heartbeat(&engine, "b", &b, "disk full");
        engine.check_leases();
    }
    assert_eq!(status_of(&engine, &run, "lib").0, PackageStatus::Pending);
    heartbeat(&engine, "b", &b, "");
    let (_, drv, check) = handed(&mut b);
    assert_eq!((drv.as_str(), check), (LIB, true));
}

#[test]
fn a_check_lost_with_its_agent_waits_afresh_for_another() {
    let (engine, clock, _dir) = test_engine(cross_checked());
    let (run, _a, _b, _check) = lib_built_by_a(&engine);
    // b went silent while checking, long after the build: its attempt is lost, and the
    // check waits the whole wait again (a alone may not take it).
    clock.advance(120_000);
    engine.check_leases();
    assert_eq!(status_of(&engine, &run, "lib").0, PackageStatus::Pending);
    clock.advance(59_000);
    engine.check_leases();
    assert_eq!(status_of(&engine, &run, "lib").0, PackageStatus::Pending);
    clock.advance(1_000);
    engine.check_leases();
    assert_eq!(
        status_of(&engine, &run, "lib").0,
        PackageStatus::InfraFailed
    );
}

#[test]
fn a_build_its_agent_says_it_could_not_push_is_checked_too() {
    let (engine, _clock, _dir) = test_engine(cross_checked());
    let mut a = connect_agent(&engine, "a");
    engine.submit(flake_run()).unwrap();
    list_lib_and_app(&engine, "a", &mut a);
    let (attempt, _, _) = handed(&mut a);
    let mut b = connect_agent(&engine, "b");
    let not_cached = BuildReport {
        kind: BuildOutcome::NotCached,
        ..built(LIB_OUT)
    };
    answer(&engine, "a", &a, attempt, not_cached);
    assert!(idle(&mut a), "app started on an unchecked lib");
    let (_, drv, check) = handed(&mut b);
    assert_eq!((drv.as_str(), check), (LIB, true));
}

#[test]
fn a_run_cancelled_before_a_check_withdraws_what_it_would_have_vouched_for() {
    let (engine, _clock, _dir) = test_engine(cross_checked());
    let told = Arc::new(Mutex::new(Vec::new()));
    let t = told.clone();
    engine.attach_farm_cache(Arc::new(move |paths: &[String]| {
        t.lock().unwrap().extend_from_slice(paths)
    }));
    let (run, _a, _b, _check) = lib_built_by_a(&engine);
    assert!(engine.cancel(&run).unwrap());
    assert_eq!(*told.lock().unwrap(), [LIB_OUT]);
    assert_eq!(engine.report(&run).unwrap().state, RunState::Cancelled);
}

#[test]
fn turned_off_across_a_restart_the_builds_awaiting_checks_count_as_built() {
    let (dir, clock, opts) = restartable();
    let run = lib_built_then_stopped(dir.path(), &clock, opts.clone(), flake_run());
    let off = EngineOptions {
        cross_check_builds: false,
        ..opts
    };
    let engine = open_in(dir.path(), &clock, off);
    assert_eq!(status_of(&engine, &run, "lib").0, PackageStatus::Ready);
    let mut a = connect_agent(&engine, "a");
    let (_, drv, check) = handed(&mut a);
    assert_eq!((drv.as_str(), check), (APP, false));
}

#[test]
fn a_run_may_ask_for_checks_the_coordinator_does_not_make_and_keeps_them_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(crate::clock::ManualClock::new(1_000_000));
    let off = EngineOptions {
        lease_ms: 5_000,
        cross_check_wait_ms: 60_000,
        ..Default::default()
    };
    let run = lib_built_then_stopped(
        dir.path(),
        &clock,
        off.clone(),
        RunSpec {
            cross_check_builds: true,
            ..flake_run()
        },
    );
    let engine = open_in(dir.path(), &clock, off);
    assert_eq!(status_of(&engine, &run, "lib").0, PackageStatus::Pending);
    let mut b = connect_agent(&engine, "b");
    let (check, drv, is_check) = handed(&mut b);
    assert_eq!((drv.as_str(), is_check), (LIB, true));
    answer(&engine, "b", &b, check, checked(LIB_OUT));
    assert_eq!(status_of(&engine, &run, "lib").0, PackageStatus::Ready);
}

#[test]
fn a_check_is_judged_by_the_credential_the_build_was_made_with() {
    let (engine, _clock, _dir) = test_engine(cross_checked());
    let mut x = connect_with(&engine, "x", Credential::JoinToken);
    engine.submit(flake_run()).unwrap();
    list_lib_and_app(&engine, "x", &mut x);
    let (attempt, _, _) = handed(&mut x);
    answer(&engine, "x", &x, attempt, built(LIB_OUT));
    // x's name comes back under a certificate: its build was still made on the join token.
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let again = Registration {
        credential: Credential::Certificate("c1".into()),
        ..registration("x", &x.session)
    };
    engine.connect_agent(again, tx).unwrap();
    let mut y = connect_with(&engine, "y", Credential::JoinToken);
    assert!(
        idle(&mut y),
        "a second name on the builder's token was handed its check"
    );
    let mut z = connect_with(&engine, "z", Credential::Certificate("c2".into()));
    let (_, drv, check) = handed(&mut z);
    assert_eq!((drv.as_str(), check), (LIB, true));
}
