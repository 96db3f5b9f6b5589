//! Restarts: what a coordinator that stopped mid-run still knows when it opens its database again.

use super::tests::{build_assigned, connect_agent, one_package_run_with};
use super::*;
use crate::db::Db;

/// A directory for a database a test opens again (a restart), and the clock it runs by.
fn restartable() -> (tempfile::TempDir, Arc<crate::clock::ManualClock>) {
    let dir = tempfile::tempdir().unwrap();
    (dir, Arc::new(crate::clock::ManualClock::new(1_000_000)))
}

/// Options with a 5 s lease.
fn leased() -> EngineOptions {
    EngineOptions {
        lease_ms: 5_000,
        ..Default::default()
    }
}

/// Agent "a" (session `session`) registers with a restarted `engine`, claims the attempt
/// `report` answers and hands that result over again; what the engine tells it after.
fn hand_over_again(
    engine: &Engine,
    session: &str,
    report: FromAgent,
) -> mpsc::UnboundedReceiver<ToAgent> {
    let attempt = match &report {
        FromAgent::Build { attempt, .. } => attempt.clone(),
        other => panic!("{other:?}"),
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let reg = Registration {
        running_attempts: vec![attempt],
        ..super::tests::registration("a", session)
    };
    let (conn, _) = engine.connect_agent(reg, tx).unwrap();
    engine.agent_message("a", conn, report).unwrap();
    rx
}

/// An engine on the database in `dir`: opened again, it is the coordinator restarted.
pub(super) fn open_in(
    dir: &std::path::Path,
    clock: &Arc<crate::clock::ManualClock>,
    opts: EngineOptions,
) -> Engine {
    Engine::open(
        Db::open(&dir.join("coordinator.sqlite")).unwrap(),
        dir.join("sources"),
        clock.clone(),
        opts,
    )
    .unwrap()
}

#[test]
fn repository_checks_owed_when_the_coordinator_restarts_still_count() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(crate::clock::ManualClock::new(1_000_000));
    let open = || {
        open_in(
            dir.path(),
            &clock,
            EngineOptions {
                lease_ms: 5_000,
                ..Default::default()
            },
        )
    };
    let engine = open();
    let mut a = connect_agent(&engine, "a");
    let (run, _, out, list) = one_package_run_with(&engine, &mut a, true);
    build_assigned(&engine, &mut a, &out);
    assert_ne!(engine.run_state(&run).unwrap(), RunState::Finished);
    drop(engine);

    // The agent dials back in and sends the checks it owed, for the same listing.
    let engine = open();
    let mut a = connect_agent(&engine, "a");
    let check = nixfarm_core::report::RepoCheck {
        name: "overlays.default".into(),
        ok: false,
        message: "is not a function".into(),
    };
    assert_ne!(
        engine.run_state(&run).unwrap(),
        RunState::Finished,
        "still owed after the restart"
    );
    engine
        .agent_message(
            "a",
            a.conn,
            FromAgent::RepoChecks {
                attempt: list,
                checks: vec![check.clone()],
            },
        )
        .unwrap();
    assert_eq!(engine.run_state(&run).unwrap(), RunState::Finished);
    assert_eq!(engine.report(&run).unwrap().repository, vec![check]);

    // Owed by an agent that does not come back: the run ends after its lease, and says so.
    let (run, _, out, _) = one_package_run_with(&engine, &mut a, true);
    build_assigned(&engine, &mut a, &out);
    drop(engine);
    let engine = open();
    clock.advance(6_000);
    engine.check_leases();
    assert_eq!(engine.run_state(&run).unwrap(), RunState::Finished);
    let repo = engine.report(&run).unwrap().repository;
    assert!(
        repo.len() == 1 && repo[0].message.contains("stopped responding"),
        "{repo:?}"
    );
}

/// A coordinator that dies between an attempt's end and its build's outcome has stored
/// neither: once restarted, the agent hands the result over again and the derivation is
/// not built a second time; watchers heard nothing of what was not stored.
#[test]
fn an_attempts_end_is_stored_with_its_outcome_or_not_at_all() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (dir, clock) = restartable();
    let opts = leased;
    let die = Arc::new(AtomicBool::new(false));
    let mut db = Db::open(&dir.path().join("coordinator.sqlite")).unwrap();
    db.die_in_finish_drv = Some(die.clone());
    let engine = Engine::open(db, dir.path().join("sources"), clock.clone(), opts()).unwrap();
    let mut a = connect_agent(&engine, "a");
    let (run, drv, out) = super::tests::one_package_run(&engine, &mut a);
    let (attempt, _) = super::tests::assigned(&mut a.rx);
    let mut events = engine.subscribe();
    let report = || FromAgent::Build {
        attempt: attempt.clone(),
        report: super::tests::built(&out),
    };
    die.store(true, Ordering::SeqCst);
    let died = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        engine.agent_message("a", a.conn, report())
    }));
    assert!(
        died.is_err(),
        "the coordinator was to die storing the outcome"
    );
    // Gone with the process: its connection, and the transaction it had open.
    drop(engine);
    if let Ok(e) = events.try_recv() {
        panic!("watchers were told of what was not stored: {e:?}");
    }
    let side = rusqlite::Connection::open(dir.path().join("coordinator.sqlite")).unwrap();
    let attempts = |cond: &str| -> i64 {
        side.query_row(
            &format!("SELECT count(*) FROM attempts WHERE kind = 'build' AND {cond}"),
            [],
            |r| r.get(0),
        )
        .unwrap()
    };
    assert_eq!(
        attempts("state = 'running'"),
        1,
        "the attempt is still running"
    );

    // Restarted: the agent claims the attempt and hands its result over again.
    let engine = open_in(dir.path(), &clock, opts());
    let mut rx = hand_over_again(&engine, &a.session, report());
    assert_eq!(engine.run_state(&run).unwrap(), RunState::Finished);
    while let Ok(m) = rx.try_recv() {
        assert!(
            !matches!(m, ToAgent::Assign { .. }),
            "{drv} assigned again: {m:?}"
        );
    }
    assert_eq!(attempts("1"), 1, "{drv} built once");
}

/// A store path an older coordinator stored that this one no longer reads (its shape check
/// took any letters and digits): that run fails, saying why, and the coordinator starts
/// with the others.
#[test]
fn a_run_whose_stored_graph_no_longer_reads_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(crate::clock::ManualClock::new(1_000_000));
    let open = || open_in(dir.path(), &clock, EngineOptions::default());
    let engine = open();
    let mut a = connect_agent(&engine, "a");
    let (bad, _, _, _) = one_package_run_with(&engine, &mut a, false);
    let (good, _, _, _) = one_package_run_with(&engine, &mut a, false);
    drop(engine);
    let conn = rusqlite::Connection::open(dir.path().join("coordinator.sqlite")).unwrap();
    let n = conn
        .execute(
            "UPDATE drvs SET drv_path = '/nix/store/EEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEE-pkg@x.drv' WHERE run_id = ?1",
            [&bad],
        )
        .unwrap();
    assert_eq!(n, 1);
    drop(conn);
    let engine = open();
    assert_eq!(engine.run_state(&bad).unwrap(), RunState::Failed);
    let report = engine.report(&bad).unwrap();
    assert!(
        report.error.contains("unreadable stored state"),
        "{}",
        report.error
    );
    assert!(!engine.run_state(&good).unwrap().is_terminal());
    // Its watchers hear it ended.
    let events = engine.events_after(&bad, 0).unwrap();
    assert!(
        events.iter().any(|e| matches!(
            serde_json::from_str::<nixfarm_core::RunEvent>(&e.json),
            Ok(nixfarm_core::RunEvent::RunFailed { .. })
        )),
        "{events:?}"
    );
}

/// The store fails in the middle of a step (a full disk, an I/O error): the step is dropped
/// whole (its attempt is still running in the database), the engine stores nothing after
/// (its memory went on where the store did not), and the server is told to stop. Started
/// again on the mended store, the coordinator goes on from it: the agent hands its result
/// over and the run ends, built once.
#[test]
fn a_step_the_store_fails_in_stops_the_engine_and_a_restart_goes_on() {
    let (dir, clock) = restartable();
    let opts = leased;
    let engine = open_in(dir.path(), &clock, opts());
    let mut a = connect_agent(&engine, "a");
    let (run, _drv, out) = super::tests::one_package_run(&engine, &mut a);
    let (attempt, _) = super::tests::assigned(&mut a.rx);
    let side = rusqlite::Connection::open(dir.path().join("coordinator.sqlite")).unwrap();
    side.execute_batch(
        "CREATE TRIGGER broken BEFORE UPDATE ON drvs BEGIN SELECT RAISE(ABORT, 'disk on fire'); END;",
    )
    .unwrap();
    let report = || FromAgent::Build {
        attempt: attempt.clone(),
        report: super::tests::built(&out),
    };
    let e = engine.agent_message("a", a.conn, report()).unwrap_err();
    assert!(
        matches!(&e, EngineError::Halted(w) if w.contains("disk on fire")),
        "{e}"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    assert!(rt.block_on(engine.halted()).contains("disk on fire"));
    let count = |sql: &str| -> i64 { side.query_row(sql, [], |r| r.get(0)).unwrap() };
    let running = "SELECT count(*) FROM attempts WHERE kind = 'build' AND state = 'running'";
    assert_eq!(
        count(running),
        1,
        "the failed step's end of the attempt was dropped"
    );
    // Nothing lands after: not a step, not a write outside one.
    let events = count("SELECT count(*) FROM events");
    let b = engine.connect_agent(
        super::tests::registration("b", ""),
        mpsc::unbounded_channel().0,
    );
    assert!(b.is_err(), "{b:?}");
    assert!(engine.cancel(&run).is_err());
    assert_eq!(count("SELECT count(*) FROM events"), events);
    drop(engine);

    side.execute_batch("DROP TRIGGER broken").unwrap();
    let engine = open_in(dir.path(), &clock, opts());
    let _rx = hand_over_again(&engine, &a.session, report());
    assert_eq!(engine.run_state(&run).unwrap(), RunState::Finished);
    assert_eq!(
        count("SELECT count(*) FROM attempts WHERE kind = 'build'"),
        1
    );
}

/// A run that ended leaves memory once no attempt of it is out (a long-lived coordinator
/// would otherwise keep every graph it ever had, until a restart): its report, state and
/// events still come from the store, and a late copy of its result changes nothing.
#[test]
fn an_ended_run_leaves_memory_and_still_answers() {
    let (engine, _clock, _dir) = super::tests::test_engine(EngineOptions::default());
    let mut a = connect_agent(&engine, "a");
    let (run, _drv, out) = super::tests::one_package_run(&engine, &mut a);
    let (attempt, _) = super::tests::assigned(&mut a.rx);
    let in_memory = |e: &Engine| e.lock().runs.iter().any(|r| r.id == run);
    engine.check_leases();
    assert!(in_memory(&engine), "going on");
    super::tests::report_built(&engine, "a", a.conn, attempt.clone(), &out);
    assert_eq!(engine.run_state(&run).unwrap(), RunState::Finished);
    let report = engine.report(&run).unwrap();
    engine.check_leases();
    assert!(!in_memory(&engine), "ended, nothing out");
    assert_eq!(engine.report(&run).unwrap(), report);
    assert!(!engine.events_after(&run, 0).unwrap().is_empty());
    assert!(!engine.cancel(&run).unwrap(), "ended already");
    super::tests::report_built(&engine, "a", a.conn, attempt, &out);
    assert_eq!(engine.report(&run).unwrap(), report);
    assert_eq!(engine.list_runs().unwrap().len(), 1);
}

/// A hash-fixing stage's submit stores its run and its evaluation tasks together: the store
/// failing on the tasks leaves no run behind (one would be queued for a full listing after a
/// restart, or sit in memory for ever).
#[test]
fn a_submit_lands_whole_or_not_at_all() {
    let (dir, clock) = restartable();
    let engine = open_in(dir.path(), &clock, EngineOptions::default());
    let side = rusqlite::Connection::open(dir.path().join("coordinator.sqlite")).unwrap();
    side.execute_batch(
        "CREATE TRIGGER broken BEFORE INSERT ON eval_tasks BEGIN SELECT RAISE(ABORT, 'disk on fire'); END;",
    )
    .unwrap();
    let stage = RunSpec {
        attrs: vec!["hello".into()],
        skip_listing: true,
        ..super::queries_tests::flake_run()
    };
    assert!(engine.submit(stage).is_err());
    let runs: i64 = side
        .query_row("SELECT count(*) FROM runs", [], |r| r.get(0))
        .unwrap();
    assert_eq!(runs, 0, "no run without its tasks");
    assert!(engine.lock().runs.is_empty());
}
