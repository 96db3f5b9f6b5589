//! Cross-checked builds of a run with a cache of its own: nothing unchecked goes there. The
//! build and its check are told to hold the outputs back, the check's own push is what
//! puts them in the cache, and a build whose check never comes is not counted as cached.

use super::checks_tests::{
    APP, APP_OUT, LIB, LIB_OUT, answer, checked, cross_checked, lib_built_then_stopped,
    list_lib_and_app, restartable, status_of,
};
use super::queries_tests::flake_run;
use super::recovery_tests::open_in;
use super::tests::{TestAgent, assigned, built, connect_agent, test_engine};
use super::*;

fn holding() -> EngineOptions {
    EngineOptions {
        hold_unchecked: true,
        ..cross_checked()
    }
}

fn with_cache() -> RunSpec {
    RunSpec {
        cache: "cachix://users".into(),
        ..flake_run()
    }
}

/// The build `a` was handed: (attempt, derivation, check, hold_outputs).
fn handed(a: &mut TestAgent) -> (String, String, bool, bool) {
    match assigned(&mut a.rx) {
        (
            attempt,
            Job::Build {
                drv_path,
                check,
                hold_outputs,
                ..
            },
        ) => (attempt, drv_path, check, hold_outputs),
        (_, job) => panic!("not a build: {job:?}"),
    }
}

#[test]
fn a_build_and_its_check_hold_outputs_back_and_the_checks_push_is_what_counts() {
    let (engine, _clock, _dir) = test_engine(holding());
    let mut a = connect_agent(&engine, "a");
    let run = engine.submit(with_cache()).unwrap();
    list_lib_and_app(&engine, "a", &mut a);
    let (attempt, drv, check, hold) = handed(&mut a);
    assert_eq!((drv.as_str(), check, hold), (LIB, false, true));
    let mut b = connect_agent(&engine, "b");
    // The build's own push (to the farm cache) failed: its check may still publish it.
    answer(
        &engine,
        "a",
        &a,
        attempt,
        BuildReport {
            kind: BuildOutcome::NotCached,
            ..built(LIB_OUT)
        },
    );
    let (attempt, drv, check, hold) = handed(&mut b);
    assert_eq!((drv.as_str(), check, hold), (LIB, true, true));
    answer(&engine, "b", &b, attempt, checked(LIB_OUT));
    let (status, reason) = status_of(&engine, &run, "lib");
    assert_eq!(status, PackageStatus::Ready, "{reason}");
    // app's check agrees, but its push to the run's cache fails: built, not cached.
    let (builder, first, mut other) = match a.rx.try_recv() {
        Ok(ToAgent::Assign { attempt, job, .. }) => (("a", attempt, job), a, b),
        _ => {
            let (attempt, job) = assigned(&mut b.rx);
            (("b", attempt, job), b, a)
        }
    };
    let (name, attempt, job) = builder;
    assert!(
        matches!(&job, Job::Build { drv_path, hold_outputs: true, .. } if drv_path == APP),
        "{job:?}"
    );
    let other_name = if name == "a" { "b" } else { "a" };
    answer(&engine, name, &first, attempt, built(APP_OUT));
    let (attempt, drv, check, hold) = handed(&mut other);
    assert_eq!((drv.as_str(), check, hold), (APP, true, true));
    answer(
        &engine,
        other_name,
        &other,
        attempt,
        BuildReport {
            kind: BuildOutcome::NotCached,
            message: "the push to the run's cache failed: HTTP 503".into(),
            ..checked(APP_OUT)
        },
    );
    let (status, reason) = status_of(&engine, &run, "app");
    assert_eq!(status, PackageStatus::NotCached, "{reason}");
    assert!(
        reason.contains("got the same outputs, but the push to the run's cache failed"),
        "{reason}"
    );
}

#[test]
fn outputs_are_held_only_for_a_cache_of_the_runs_own_with_another_way_between_agents() {
    // No cache of the run's own (the farm cache carries everything): nothing to hold.
    let (engine, _clock, _dir) = test_engine(holding());
    let mut a = connect_agent(&engine, "a");
    engine.submit(flake_run()).unwrap();
    list_lib_and_app(&engine, "a", &mut a);
    assert!(!handed(&mut a).3);
    // No farm cache, no shared store: the run's cache is the only way between agents.
    let (engine, _clock, _dir) = test_engine(cross_checked());
    let mut a = connect_agent(&engine, "a");
    engine.submit(with_cache()).unwrap();
    list_lib_and_app(&engine, "a", &mut a);
    assert!(!handed(&mut a).3);
    // Without cross-checks.
    let (engine, _clock, _dir) = test_engine(EngineOptions {
        cross_check_builds: false,
        ..holding()
    });
    let mut a = connect_agent(&engine, "a");
    engine.submit(with_cache()).unwrap();
    list_lib_and_app(&engine, "a", &mut a);
    assert!(!handed(&mut a).3);
}

#[test]
fn held_builds_whose_checks_were_turned_off_across_a_restart_are_not_cached() {
    let (dir, clock, opts) = restartable();
    let opts = EngineOptions {
        hold_unchecked: true,
        ..opts
    };
    let run = lib_built_then_stopped(dir.path(), &clock, opts.clone(), with_cache());
    let off = EngineOptions {
        cross_check_builds: false,
        ..opts
    };
    let engine = open_in(dir.path(), &clock, off);
    let (status, reason) = status_of(&engine, &run, "lib");
    assert_eq!(status, PackageStatus::NotCached, "{reason}");
    assert!(
        reason.contains("held back from the run's cache"),
        "{reason}"
    );
}
