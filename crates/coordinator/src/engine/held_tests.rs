//! Cross-checked builds of a run with a cache of its own: nothing unchecked goes there. The
//! build and its check are told where the outputs wait (the farm cache, the store the
//! agents share, or the builder's own store, whose NAR hashes the check must reproduce),
//! the check's own push is what puts them in the run's cache, a push that fails on the way
//! is tried again, and agents that predate holding get none of it.

use super::checks_tests::{
    APP, LIB, LIB_OUT, answer, checked, cross_checked, lib_built_then_stopped, list_lib_and_app,
    restartable, status_of,
};
use super::queries_tests::flake_run;
use super::recovery_tests::open_in;
use super::tests::{TestAgent, assigned, built, connect_agent, registration, test_engine};
use super::*;
use nixfarm_core::RunEvent;

/// A cross-checking engine whose farm cache has started.
fn with_farm_cache() -> (Engine, Arc<crate::clock::ManualClock>, tempfile::TempDir) {
    let (engine, clock, dir) = test_engine(cross_checked());
    engine.attach_farm_cache(Arc::new(|_: &[String]| {}));
    (engine, clock, dir)
}

fn with_cache() -> RunSpec {
    RunSpec {
        cache: "cachix://users".into(),
        ..flake_run()
    }
}

/// The build `a` was handed: (attempt, derivation, check, hold).
fn handed(a: &mut TestAgent) -> (String, StorePath, bool, Hold) {
    match assigned(&mut a.rx) {
        (
            attempt,
            Job::Build {
                drv_path,
                check,
                hold,
                ..
            },
        ) => (attempt, drv_path, check, hold),
        (_, job) => panic!("not a build: {job:?}"),
    }
}

fn retries(engine: &Engine, run: &str) -> Vec<String> {
    super::queries_tests::run_events(engine, run)
        .into_iter()
        .filter_map(|e| match e {
            RunEvent::JobRetry { message, .. } => Some(message),
            _ => None,
        })
        .collect()
}

#[test]
fn a_build_and_its_check_hold_outputs_in_the_farm_cache_and_the_checks_push_is_what_counts() {
    let (engine, _clock, _dir) = with_farm_cache();
    let mut a = connect_agent(&engine, "a");
    let run = engine.submit(with_cache()).unwrap();
    list_lib_and_app(&engine, "a", &mut a);
    let (attempt, drv, check, hold) = handed(&mut a);
    assert_eq!((drv.as_str(), check, hold), (LIB, false, Hold::FarmCache));
    // Its push to the farm cache failed: no other host could check it, so it is built again.
    let failed = BuildReport {
        kind: BuildOutcome::NotCached,
        message: "built, but the push to the cache failed: HTTP 503".into(),
        ..built(LIB_OUT)
    };
    answer(&engine, "a", &a, attempt, failed);
    assert_eq!(
        retries(&engine, &run),
        [
            "built, but the push to the cache failed: HTTP 503 (the farm cache, where its outputs wait for their check)"
        ]
    );
    let (attempt, drv, check, _) = handed(&mut a);
    assert_eq!((drv.as_str(), check), (LIB, false));
    let mut b = connect_agent(&engine, "b");
    answer(&engine, "a", &a, attempt, built(LIB_OUT));
    let (attempt, drv, check, hold) = handed(&mut b);
    assert_eq!((drv.as_str(), check, hold), (LIB, true, Hold::FarmCache));
    // The check agrees, but its push to the run's cache fails: tried again, not counted.
    let unpublished = BuildReport {
        kind: BuildOutcome::NotCached,
        message: "the push to the run's cache failed: HTTP 503".into(),
        ..checked(LIB_OUT)
    };
    answer(&engine, "b", &b, attempt, unpublished);
    assert_eq!(status_of(&engine, &run, "lib").0, PackageStatus::Pending);
    assert_eq!(retries(&engine, &run).len(), 2);
    let (attempt, drv, check, hold) = handed(&mut b);
    assert_eq!((drv.as_str(), check, hold), (LIB, true, Hold::FarmCache));
    answer(&engine, "b", &b, attempt, checked(LIB_OUT));
    let (status, reason) = status_of(&engine, &run, "lib");
    assert_eq!(status, PackageStatus::Ready, "{reason}");
    assert_eq!(reason, "", "ready says nothing more");
    let app = match a.rx.try_recv() {
        Ok(ToAgent::Assign { job, .. }) => job,
        _ => assigned(&mut b.rx).1,
    };
    assert!(
        matches!(&app, Job::Build { drv_path, hold: Hold::FarmCache, check: false, .. } if drv_path == APP),
        "{app:?}"
    );
}

#[test]
fn outputs_are_held_only_for_a_cache_of_the_runs_own_with_another_way_between_agents() {
    let first_hold = |engine: &Engine, spec: RunSpec| {
        let mut a = connect_agent(engine, "a");
        engine.submit(spec).unwrap();
        list_lib_and_app(engine, "a", &mut a);
        handed(&mut a).3
    };
    // No cache of the run's own (the farm cache carries everything): nothing to hold.
    assert_eq!(first_hold(&with_farm_cache().0, flake_run()), Hold::No);
    // No farm cache, no shared store: held in the builder's own store.
    assert_eq!(
        first_hold(&test_engine(cross_checked()).0, with_cache()),
        Hold::BuilderStore
    );
    // Without cross-checks.
    let (engine, _clock, _dir) = test_engine(EngineOptions::default());
    engine.attach_farm_cache(Arc::new(|_: &[String]| {}));
    assert_eq!(first_hold(&engine, with_cache()), Hold::No);
    // `nixfarm local`: the agents share a store.
    let shared = test_engine(EngineOptions {
        agents_share_store: true,
        ..cross_checked()
    });
    assert_eq!(first_hold(&shared.0, with_cache()), Hold::SharedStore);
}

#[test]
fn a_check_whose_push_to_the_runs_cache_keeps_failing_fails_the_package_saying_so() {
    let (engine, _clock, _dir) = with_farm_cache();
    let mut a = connect_agent(&engine, "a");
    let run = engine.submit(with_cache()).unwrap();
    list_lib_and_app(&engine, "a", &mut a);
    let (attempt, _, _, _) = handed(&mut a);
    let mut b = connect_agent(&engine, "b");
    answer(&engine, "a", &a, attempt, built(LIB_OUT));
    let unpublished = || BuildReport {
        kind: BuildOutcome::NotCached,
        message: "the push to the run's cache failed: HTTP 503".into(),
        ..checked(LIB_OUT)
    };
    // Tried again within the budget (3), then the package fails, and app with it.
    for _ in 0..4 {
        let (attempt, drv, check, _) = handed(&mut b);
        assert_eq!((drv.as_str(), check), (LIB, true));
        answer(&engine, "b", &b, attempt, unpublished());
    }
    let (status, reason) = status_of(&engine, &run, "lib");
    assert_eq!(status, PackageStatus::InfraFailed, "{reason}");
    assert_eq!(
        reason,
        "built on a; b built it again and got the same outputs, but the push to the run's cache failed: HTTP 503"
    );
    assert_eq!(
        status_of(&engine, &run, "app").0,
        PackageStatus::DependencyFailed
    );
}

#[test]
fn an_agent_that_predates_holding_is_handed_neither_held_builds_nor_their_checks() {
    let (engine, clock, _dir) = with_farm_cache();
    let connect_old = |name: &str| {
        connect_as(
            &engine,
            Registration {
                holds_outputs: false,
                ..registration(name, "")
            },
        )
    };
    let mut old = connect_old("old");
    let run = engine.submit(with_cache()).unwrap();
    list_lib_and_app(&engine, "old", &mut old);
    assert!(super::checks_tests::idle(&mut old), "old was handed lib");
    let (_, reason) = status_of(&engine, &run, "lib");
    assert_eq!(
        reason,
        "queued: the 1 connected agent(s) that build x86_64-linux predate held outputs (cross-checked builds keep unchecked outputs out of the run's cache); upgrade them"
    );
    let mut a = connect_agent(&engine, "a");
    let (attempt, drv, _, hold) = handed(&mut a);
    assert_eq!((drv.as_str(), hold), (LIB, Hold::FarmCache));
    answer(&engine, "a", &a, attempt, built(LIB_OUT));
    assert!(
        super::checks_tests::idle(&mut old),
        "old was handed lib's check"
    );
    // Nobody connected may take the check, so its wait runs out (old does not count).
    clock.advance(60_000);
    engine.check_leases();
    let (status, reason) = status_of(&engine, &run, "lib");
    assert_eq!(status, PackageStatus::InfraFailed, "{reason}");
    assert!(
        reason.starts_with("built on a, but no other agent took its check within 60 s"),
        "{reason}"
    );
}

#[test]
fn held_builds_whose_checks_were_turned_off_across_a_restart_are_not_cached() {
    let (dir, clock, opts) = restartable();
    let opts = EngineOptions {
        agents_share_store: true,
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

/// `reg` connected to `engine`, as an agent the tests play.
fn connect_as(engine: &Engine, reg: Registration) -> TestAgent {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (conn, session) = engine.connect_agent(reg, tx).unwrap();
    TestAgent { conn, session, rx }
}

fn nar(byte: u8) -> NarHash {
    NarHash([byte; 32])
}

/// `report` with the NAR hash of its output `out`.
fn hashed(report: BuildReport, h: NarHash) -> BuildReport {
    BuildReport {
        nar_hashes: [("out".to_string(), h)].into(),
        ..report
    }
}

/// The check `b` was handed of outputs held in their builder's store: (attempt, expected).
fn handed_check(b: &mut TestAgent) -> (String, Vec<(String, StorePath, NarHash)>) {
    match assigned(&mut b.rx) {
        (
            attempt,
            Job::Build {
                drv_path,
                check: true,
                hold: Hold::BuilderStore,
                expect,
                ..
            },
        ) if drv_path == LIB => (attempt, expect),
        (_, job) => panic!("not a check of lib held in its builder's store: {job:?}"),
    }
}

/// No farm cache: a's build of lib, held in its own store with NAR hash `nar(1)`, and b
/// connected to check it: (engine, run, a, b, b's check attempt).
fn lib_held_in_as_store() -> (
    Engine,
    tempfile::TempDir,
    String,
    TestAgent,
    TestAgent,
    String,
) {
    let (engine, _clock, dir) = test_engine(cross_checked());
    let mut a = connect_agent(&engine, "a");
    let run = engine.submit(with_cache()).unwrap();
    list_lib_and_app(&engine, "a", &mut a);
    let (attempt, drv, check, hold) = handed(&mut a);
    assert_eq!(
        (drv.as_str(), check, hold),
        (LIB, false, Hold::BuilderStore)
    );
    // A build that does not say its NAR hash cannot be checked: built again.
    answer(&engine, "a", &a, attempt, built(LIB_OUT));
    assert_eq!(
        retries(&engine, &run),
        ["agent a built it but did not report the NAR hash of out, which its check compares"]
    );
    let (attempt, _, _, _) = handed(&mut a);
    let mut b = connect_agent(&engine, "b");
    answer(&engine, "a", &a, attempt, hashed(built(LIB_OUT), nar(1)));
    let (check, expect) = handed_check(&mut b);
    assert_eq!(expect, [("out".to_string(), sp(LIB_OUT), nar(1))]);
    (engine, dir, run, a, b, check)
}

#[test]
fn without_a_farm_cache_outputs_wait_in_their_builders_store_and_the_check_reproduces_their_nar_hashes()
 {
    let (engine, _dir, run, mut a, b, check) = lib_held_in_as_store();
    answer(&engine, "b", &b, check, hashed(checked(LIB_OUT), nar(1)));
    let (status, reason) = status_of(&engine, &run, "lib");
    assert_eq!(status, PackageStatus::Ready, "{reason}");
    // Its dependent starts only now, on the copy b published.
    let (_, drv, check, hold) = handed(&mut a);
    assert_eq!(
        (drv.as_str(), check, hold),
        (APP, false, Hold::BuilderStore)
    );
}

#[test]
fn a_check_with_another_nar_hash_fails_the_build_held_in_its_builders_store() {
    // Another hash: not reproducible, and app with it.
    let (engine, _dir, run, _a, b, check) = lib_held_in_as_store();
    answer(&engine, "b", &b, check, hashed(checked(LIB_OUT), nar(2)));
    let (status, reason) = status_of(&engine, &run, "lib");
    assert_eq!(status, PackageStatus::NotReproducible, "{reason}");
    assert!(
        reason.contains(&format!(
            "{LIB_OUT}: NAR hash {} on the first build, {} on the check",
            nar(1),
            nar(2)
        )),
        "{reason}"
    );
    assert_eq!(
        status_of(&engine, &run, "app").0,
        PackageStatus::DependencyFailed
    );
}

#[test]
fn a_check_that_names_no_nar_hash_proves_nothing_and_is_asked_again() {
    let (engine, _dir, run, _a, mut b, check) = lib_held_in_as_store();
    answer(&engine, "b", &b, check, checked(LIB_OUT));
    assert_eq!(
        retries(&engine, &run).last().map(String::as_str),
        Some("agent b answered without checking: no NAR hash of output out to compare")
    );
    assert_eq!(status_of(&engine, &run, "lib").0, PackageStatus::Pending);
    let (check, _) = handed_check(&mut b);
    answer(&engine, "b", &b, check, hashed(checked(LIB_OUT), nar(1)));
    assert_eq!(status_of(&engine, &run, "lib").0, PackageStatus::Ready);
}

#[test]
fn outputs_held_in_their_builders_store_are_checked_after_a_restart_that_started_the_farm_cache() {
    let (dir, clock, opts) = restartable();
    let with_farm = |engine: &Engine| engine.attach_farm_cache(Arc::new(|_: &[String]| {}));
    // Before: no farm cache; a is building lib when the coordinator stops.
    let engine = open_in(dir.path(), &clock, opts.clone());
    let mut a = connect_agent(&engine, "a");
    let run = engine.submit(with_cache()).unwrap();
    list_lib_and_app(&engine, "a", &mut a);
    let (attempt, _, _, hold) = handed(&mut a);
    assert_eq!(hold, Hold::BuilderStore);
    drop(engine);
    // After: the farm cache started. a reconnects still building lib, and reports it with
    // its NAR hash: the check is still one from scratch, not of a farm cache copy that
    // does not exist.
    let engine = open_in(dir.path(), &clock, opts.clone());
    with_farm(&engine);
    let a = connect_as(
        &engine,
        Registration {
            running_attempts: vec![attempt.clone()],
            ..registration("a", "")
        },
    );
    answer(&engine, "a", &a, attempt, hashed(built(LIB_OUT), nar(1)));
    drop((a, engine));
    // And again, with the check pending in the database: it is still handed out.
    let engine = open_in(dir.path(), &clock, opts);
    with_farm(&engine);
    let mut b = connect_agent(&engine, "b");
    let (check, expect) = handed_check(&mut b);
    assert_eq!(expect, [("out".to_string(), sp(LIB_OUT), nar(1))]);
    answer(&engine, "b", &b, check, hashed(checked(LIB_OUT), nar(1)));
    assert_eq!(status_of(&engine, &run, "lib").0, PackageStatus::Ready);
}

/// `reg`, which cannot hold outputs the way `engine` holds them (`way`), is handed neither
/// lib (its reason says to upgrade such agents) nor lib's check, once a capable agent built
/// it (`report`).
fn handed_neither_build_nor_check(
    engine: &Engine,
    reg: Registration,
    way: Hold,
    report: BuildReport,
) {
    let name = reg.name.clone();
    let mut it = connect_as(engine, reg);
    let run = engine.submit(with_cache()).unwrap();
    list_lib_and_app(engine, &name, &mut it);
    assert!(super::checks_tests::idle(&mut it), "{name} was handed lib");
    let (_, reason) = status_of(engine, &run, "lib");
    assert!(reason.contains("predate held outputs"), "{reason}");
    assert!(
        !engine
            .list_agents()
            .iter()
            .any(|a| a.name == name && a.holds_outputs)
    );
    let mut a = connect_agent(engine, "a");
    let (attempt, drv, _, hold) = handed(&mut a);
    assert_eq!((drv.as_str(), hold), (LIB, way));
    answer(engine, "a", &a, attempt, report);
    assert!(
        super::checks_tests::idle(&mut it),
        "{name} was handed lib's check"
    );
}

#[test]
fn an_agent_that_cannot_hold_in_its_own_store_gets_no_such_build_nor_check() {
    let (engine, _clock, _dir) = test_engine(cross_checked());
    let older = Registration {
        holds_in_builder_store: false,
        ..registration("older", "")
    };
    handed_neither_build_nor_check(
        &engine,
        older,
        Hold::BuilderStore,
        hashed(built(LIB_OUT), nar(1)),
    );
}

#[test]
fn an_agent_not_told_of_the_farm_cache_gets_nothing_that_waits_there() {
    let (engine, _clock, _dir) = with_farm_cache();
    // Admitted by a certificate, it predates the farm cache tokens: no farm cache for it.
    let certified = Registration {
        has_farm_cache: false,
        ..registration("certified", "")
    };
    handed_neither_build_nor_check(&engine, certified, Hold::FarmCache, built(LIB_OUT));
}

#[test]
fn an_agent_not_told_of_the_farm_cache_takes_part_only_in_runs_with_a_cache_of_their_own() {
    let (engine, _clock, _dir) = with_farm_cache();
    let mut certified = connect_as(
        &engine,
        Registration {
            has_farm_cache: false,
            ..registration("certified", "")
        },
    );
    // Everything of this run moves through the farm cache: not even its listing.
    engine.submit(flake_run()).unwrap();
    assert!(super::checks_tests::idle(&mut certified), "handed a job");
    let mut a = connect_agent(&engine, "a");
    assert!(matches!(assigned(&mut a.rx).1, Job::EvalList { .. }));
    // A run with a cache of its own: it lists that one.
    engine.submit(with_cache()).unwrap();
    assert!(matches!(
        assigned(&mut certified.rx).1,
        Job::EvalList { cache, .. } if cache == "cachix://users"
    ));
}
