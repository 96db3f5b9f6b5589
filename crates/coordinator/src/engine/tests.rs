use super::*;
use crate::db::Db;

#[test]
fn an_upload_is_claimed_by_one_agent_until_released_or_its_holder_is_gone() {
    let (engine, clock, _dir) = test_engine(EngineOptions::default());
    let connect = |name: &str| connect_agent(&engine, name);
    let a = connect("a");
    let b = connect("b");
    let (conn_a, conn_b) = (a.conn, b.conn);
    let paths = vec!["/nix/store/p1".to_string(), "/nix/store/p2".to_string()];
    let c = "file:///cache";
    assert_eq!(
        engine.claim_unchecked("a", &a.session, c, &paths).unwrap(),
        [true, true]
    );
    // Held by a: b waits; a asking again keeps its claim.
    assert_eq!(
        engine.claim_unchecked("b", &b.session, c, &paths).unwrap(),
        [false, false]
    );
    assert_eq!(
        engine.claim_unchecked("a", &a.session, c, &paths).unwrap(),
        [true, true]
    );
    // Another cache is another claim.
    assert_eq!(
        engine
            .claim_unchecked("b", &b.session, "file:///other", &paths[..1])
            .unwrap(),
        [true]
    );
    // a uploaded p1: b may claim it (and will find it in the cache).
    engine
        .release_uploads("a", &a.session, c, &paths[..1])
        .unwrap();
    assert_eq!(
        engine.claim_unchecked("b", &b.session, c, &paths).unwrap(),
        [true, false]
    );
    // The streams drop: a's claim holds through the lease, then lapses.
    engine.disconnect_agent("b", conn_b);
    engine.disconnect_agent("a", conn_a);
    clock.advance(4_000);
    assert_eq!(
        engine
            .claim_unchecked("b", &b.session, c, &paths[1..])
            .unwrap(),
        [false]
    );
    clock.advance(2_000);
    assert_eq!(
        engine
            .claim_unchecked("b", &b.session, c, &paths[1..])
            .unwrap(),
        [true]
    );
    // A holder that registers again with nothing running has no upload in flight.
    let a2 = connect("a");
    assert_eq!(
        engine
            .claim_unchecked("a", &a2.session, c, &paths[1..])
            .unwrap(),
        [false]
    );
    // The old registration's key (or none) claims nothing in a's name any more.
    assert!(
        engine
            .claim_unchecked("a", &a.session, c, &paths[1..])
            .is_err()
    );
    assert!(engine.claim_unchecked("a", "", c, &paths[1..]).is_err());
    let _b2 = connect("b");
    assert_eq!(
        engine
            .claim_unchecked("a", &a2.session, c, &paths[1..])
            .unwrap(),
        [true]
    );
}

/// An engine over an in-memory database with a manual clock and a 5 s lease.
pub(super) fn test_engine(
    opts: EngineOptions,
) -> (Engine, Arc<crate::clock::ManualClock>, tempfile::TempDir) {
    let clock = Arc::new(crate::clock::ManualClock::new(1_000_000));
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(
        Db::open_in_memory().unwrap(),
        dir.path().join("sources"),
        clock.clone(),
        EngineOptions {
            lease_ms: 5_000,
            ..opts
        },
    )
    .unwrap();
    (engine, clock, dir)
}

/// A registered test agent: its connection, session key and what it is sent.
pub(super) struct TestAgent {
    pub(super) conn: u64,
    pub(super) session: String,
    pub(super) rx: mpsc::UnboundedReceiver<ToAgent>,
}

pub(super) fn registration(name: &str, session_key: &str) -> Registration {
    Registration {
        name: name.into(),
        systems: vec!["x86_64-linux".into()],
        features: vec![],
        max_jobs: 1,
        nix_version: "2.8.0".into(),
        running_attempts: vec![],
        session_key: session_key.into(),
        credential: Default::default(),
        admitted_at: 0,
        token_digest: String::new(),
        holds_outputs: true,
        holds_in_builder_store: true,
        takes_farm_cache_token: true,
        has_farm_cache: true,
        run_caches: vec![],
    }
}

/// Registers a one-job x86_64-linux agent (any earlier stream of that name closed).
pub(super) fn connect_agent(engine: &Engine, name: &str) -> TestAgent {
    let (tx, rx) = mpsc::unbounded_channel();
    let (conn, session) = engine.connect_agent(registration(name, ""), tx).unwrap();
    TestAgent { conn, session, rx }
}

pub(super) use super::queries_tests::flake_run;

/// The next assignment sent to an agent: (attempt, job).
pub(super) fn assigned(rx: &mut mpsc::UnboundedReceiver<ToAgent>) -> (String, Job) {
    loop {
        match rx.try_recv().expect("an assignment") {
            ToAgent::Assign { attempt, job, .. } => return (attempt, job),
            _ => continue,
        }
    }
}

/// Submits a run whose one package (`crash`) has one derivation, and answers its listing
/// and evaluation as agent `a`: the build is then due. Returns the run's id and the
/// derivation's path.
pub(super) fn one_build_run(engine: &Engine, name: &str, a: &mut TestAgent) -> (String, String) {
    let run = engine.submit(flake_run()).unwrap();
    let (list, _) = assigned(&mut a.rx);
    engine
        .agent_message(
            name,
            a.conn,
            FromAgent::EvalList {
                attempt: list,
                result: Ok((vec!["crash".into()], vec![])),
                follows: false,
                evaluated: None,
            },
        )
        .unwrap();
    let (chunk, _) = assigned(&mut a.rx);
    let drv = "/nix/store/00000000000000000000000000000000-crash.drv".to_string();
    let node = DrvNode {
        system: "x86_64-linux".into(),
        outputs: [(
            "out".to_string(),
            op("/nix/store/11111111111111111111111111111111-crash"),
        )]
        .into(),
        ..Default::default()
    };
    let attr = EvaluatedAttr {
        attr: "crash".into(),
        info: PackageInfo {
            drv_path: Some(sp(&drv)),
            system: "x86_64-linux".into(),
            ..Default::default()
        },
    };
    engine
        .agent_message(
            name,
            a.conn,
            FromAgent::EvalChunk {
                attempt: chunk,
                result: Ok((vec![attr], [(sp(&drv), node)].into())),
            },
        )
        .unwrap();
    (run, drv)
}

#[test]
fn a_build_whose_agents_keep_vanishing_is_given_up_after_the_retry_budget() {
    let (engine, clock, _dir) = test_engine(EngineOptions {
        max_infra_retries: 2,
        ..Default::default()
    });
    let connect = || connect_agent(&engine, "a");
    let mut a = connect();
    let (run, drv) = one_build_run(&engine, "a", &mut a);
    // Each time the build starts, the agent falls silent and its lease runs out.
    let mut builds = 0;
    loop {
        let (_, job) = assigned(&mut a.rx);
        assert!(matches!(job, Job::Build { ref drv_path, .. } if *drv_path == drv));
        builds += 1;
        clock.advance(6_000);
        engine.check_leases();
        if engine.run_state(&run).unwrap().is_terminal() {
            break;
        }
        assert!(builds < 10, "requeued for ever");
        drop(a);
        a = connect();
    }
    // The first attempt and two retries, then it is given up: reported, not failed.
    assert_eq!(builds, 3);
    let report = engine.report(&run).unwrap();
    let p = &report.packages[0];
    assert_eq!(p.status, PackageStatus::InfraFailed);
    assert!(
        p.reason
            .contains("given up after 3 attempts lost with their agents"),
        "{}",
        p.reason
    );
    assert!(
        p.reason.contains("the agent stopped responding"),
        "{}",
        p.reason
    );
}

#[test]
fn runs_in_flight_are_limited_and_a_finished_one_frees_its_place() {
    let (engine, _clock, _dir) = test_engine(EngineOptions {
        max_runs_in_flight: 1,
        ..Default::default()
    });
    let spec = flake_run();
    let first = engine.submit(spec.clone()).unwrap();
    let err = engine.submit(spec.clone()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "too many runs in flight (limit 1); wait for one to finish"
    );
    assert!(engine.cancel(&first).unwrap());
    engine.submit(spec).unwrap();
}

#[test]
fn a_listing_that_keeps_failing_on_the_machine_fails_the_run_after_the_retry_budget() {
    let (engine, _clock, _dir) = test_engine(EngineOptions {
        max_infra_retries: 2,
        ..Default::default()
    });
    let TestAgent { conn, mut rx, .. } = connect_agent(&engine, "a");
    let run = engine.submit(flake_run()).unwrap();
    let mut tries = 0;
    while !engine.run_state(&run).unwrap().is_terminal() {
        assert!(tries < 10, "retried for ever");
        let (attempt, job) = assigned(&mut rx);
        assert!(matches!(job, Job::EvalList { .. }));
        tries += 1;
        let result = Err(("writing to file: No space left on device".into(), true));
        engine
            .agent_message(
                "a",
                conn,
                FromAgent::EvalList {
                    attempt,
                    result,
                    follows: false,
                    evaluated: None,
                },
            )
            .unwrap();
    }
    assert_eq!(tries, 3, "the first try and two retries");
    let report = engine.report(&run).unwrap();
    assert_eq!(report.state, RunState::Failed);
    assert!(
        report.error.contains("No space left on device"),
        "{}",
        report.error
    );
}

/// Evaluates a one-package run on `a` and returns (run, drv, its output).
pub(super) fn one_package_run(engine: &Engine, a: &mut TestAgent) -> (String, String, String) {
    let (run, drv, out, _) = one_package_run_with(engine, a, false);
    (run, drv, out)
}

/// [`one_package_run`], the listing saying whether the repository checks follow; also the
/// listing's attempt.
pub(super) fn one_package_run_with(
    engine: &Engine,
    a: &mut TestAgent,
    follows: bool,
) -> (String, String, String, String) {
    one_node_run(engine, a, follows, DrvNode::default())
}

/// [`one_package_run_with`], the package's derivation being `node` (its system and output
/// filled in).
pub(super) fn one_node_run(
    engine: &Engine,
    a: &mut TestAgent,
    follows: bool,
    node: DrvNode,
) -> (String, String, String, String) {
    let run = engine.submit(flake_run()).unwrap();
    let (list, _) = assigned(&mut a.rx);
    let result = Ok((vec!["pkg".into()], vec![]));
    engine
        .agent_message(
            "a",
            a.conn,
            FromAgent::EvalList {
                attempt: list.clone(),
                result,
                follows,
                evaluated: None,
            },
        )
        .unwrap();
    let (chunk, _) = assigned(&mut a.rx);
    let drv = "/nix/store/00000000000000000000000000000000-pkg.drv".to_string();
    let out = "/nix/store/11111111111111111111111111111111-pkg".to_string();
    let node = DrvNode {
        system: "x86_64-linux".into(),
        outputs: [("out".to_string(), op(&out))].into(),
        ..node
    };
    let attr = EvaluatedAttr {
        attr: "pkg".into(),
        info: PackageInfo {
            drv_path: Some(sp(&drv)),
            outputs: [("out".to_string(), op(&out))].into(),
            system: "x86_64-linux".into(),
            ..Default::default()
        },
    };
    let result = Ok((vec![attr], [(sp(&drv), node)].into()));
    engine
        .agent_message(
            "a",
            a.conn,
            FromAgent::EvalChunk {
                attempt: chunk,
                result,
            },
        )
        .unwrap();
    (run, drv, out, list)
}

/// Agent `a` builds what it was assigned, with `out` as its output.
pub(super) fn build_assigned(engine: &Engine, a: &mut TestAgent, out: &str) {
    let (attempt, _) = assigned(&mut a.rx);
    report_built(engine, "a", a.conn, attempt, out);
}

/// Agent `name` on stream `conn` reports `attempt` built, with `out` as its output.
pub(super) fn report_built(engine: &Engine, name: &str, conn: u64, attempt: String, out: &str) {
    engine
        .agent_message(
            name,
            conn,
            FromAgent::Build {
                attempt,
                report: built(out),
            },
        )
        .unwrap();
}

pub(super) fn built(out: &str) -> BuildReport {
    BuildReport {
        kind: BuildOutcome::Built,
        outputs: [("out".to_string(), op(out))].into(),
        ..Default::default()
    }
}

pub(super) fn violations(engine: &Engine, name: &str) -> u64 {
    engine
        .list_agents()
        .into_iter()
        .find(|a| a.name == name)
        .map_or(0, |a| a.violations)
}

#[test]
fn a_live_agents_name_is_refused_to_others_and_kept_for_its_own_reconnect() {
    let (engine, _clock, _dir) = test_engine(EngineOptions::default());
    let first = connect_agent(&engine, "x");
    let (tx, _rx) = mpsc::unbounded_channel();
    let err = engine
        .connect_agent(registration("x", ""), tx.clone())
        .unwrap_err();
    assert!(matches!(err, EngineError::Conflict(_)), "{err}");
    assert!(err.to_string().contains("already connected"), "{err}");
    let err = engine
        .connect_agent(registration("x", "guess"), tx.clone())
        .unwrap_err();
    assert!(matches!(err, EngineError::Conflict(_)), "{err}");
    // The same agent, proving itself, takes its name over; its old stream is not heard.
    let (conn, _) = engine
        .connect_agent(registration("x", &first.session), tx)
        .unwrap();
    assert_ne!(conn, first.conn);
    // Once the stream is gone, the name is free again.
    drop(_rx);
    let (tx2, _rx2) = mpsc::unbounded_channel();
    engine.connect_agent(registration("x", ""), tx2).unwrap();
}

#[test]
fn known_attributes_are_evaluated_without_listing_the_attribute_path() {
    let (engine, _clock, _dir) = test_engine(EngineOptions::default());
    let mut a = connect_agent(&engine, "a");
    let spec = RunSpec {
        attrs: vec!["pkg".into(), "pkg".into()],
        skip_listing: true,
        ..flake_run()
    };
    engine.submit(spec).unwrap();
    let (_, job) = assigned(&mut a.rx);
    assert!(
        matches!(job, Job::EvalChunk { ref attrs, .. } if *attrs == ["pkg"]),
        "{job:?}"
    );
}

/// A repository with no packages ends once its listing and the checks that follow it are
/// in: finished, 0 of 0, rather than evaluating for ever (no scheduler is ever made for it).
#[test]
fn a_repository_with_no_packages_finishes() {
    let (engine, _clock, _dir) = test_engine(EngineOptions::default());
    let mut a = connect_agent(&engine, "a");
    let run = engine.submit(flake_run()).unwrap();
    let (list, _) = assigned(&mut a.rx);
    for (follows, m) in [
        (
            true,
            FromAgent::EvalList {
                attempt: list.clone(),
                result: Ok((vec![], vec![])),
                follows: true,
                evaluated: None,
            },
        ),
        (
            false,
            FromAgent::RepoChecks {
                attempt: list.clone(),
                checks: vec![],
            },
        ),
    ] {
        engine.agent_message("a", a.conn, m).unwrap();
        if follows {
            assert_ne!(engine.run_state(&run).unwrap(), RunState::Finished);
        }
    }
    assert_eq!(engine.run_state(&run).unwrap(), RunState::Finished);
    assert_eq!(engine.report(&run).unwrap().summary.total, 0);
}

#[test]
fn repository_checks_that_follow_the_listing_hold_the_runs_end_until_they_come() {
    let (engine, clock, _dir) = test_engine(EngineOptions::default());
    let mut a = connect_agent(&engine, "a");
    let b = connect_agent(&engine, "b");
    let check = |msg: &str| nixfarm_core::report::RepoCheck {
        name: "overlays.default".into(),
        ok: false,
        message: msg.into(),
    };
    let build_it = |a: &mut TestAgent, out: &str| build_assigned(&engine, a, out);
    let (run, _, out, list) = one_package_run_with(&engine, &mut a, true);
    build_it(&mut a, &out);
    assert_ne!(
        engine.run_state(&run).unwrap(),
        RunState::Finished,
        "checks still to come"
    );
    // From another agent, or for another attempt: nothing changes.
    for (who, conn, attempt) in [("b", b.conn, list.clone()), ("a", a.conn, "a-other".into())] {
        engine
            .agent_message(
                who,
                conn,
                FromAgent::RepoChecks {
                    attempt,
                    checks: vec![check("forged")],
                },
            )
            .unwrap();
    }
    assert_ne!(engine.run_state(&run).unwrap(), RunState::Finished);
    engine
        .agent_message(
            "a",
            a.conn,
            FromAgent::RepoChecks {
                attempt: list.clone(),
                checks: vec![check("is not a function")],
            },
        )
        .unwrap();
    assert_eq!(engine.run_state(&run).unwrap(), RunState::Finished);
    assert_eq!(
        engine.report(&run).unwrap().repository,
        vec![check("is not a function")]
    );

    // An agent that stays but never sends them holds the run for the wait, no longer.
    let (run, _, out, _) = one_package_run_with(&engine, &mut a, true);
    build_it(&mut a, &out);
    for i in 0..120 {
        if i == 100 {
            assert_ne!(
                engine.run_state(&run).unwrap(),
                RunState::Finished,
                "500 s in"
            );
        }
        clock.advance(5_000);
        engine
            .agent_message(
                "a",
                a.conn,
                FromAgent::Heartbeat {
                    running: vec![],
                    draining: false,
                    paused: String::new(),
                },
            )
            .unwrap();
        engine.check_leases();
    }
    assert_eq!(engine.run_state(&run).unwrap(), RunState::Finished);
    let repo = engine.report(&run).unwrap().repository;
    assert!(
        repo.len() == 1 && !repo[0].ok && repo[0].message.contains("within 600 s"),
        "{repo:?}"
    );

    // An agent that goes silent owes them no longer than its lease: the run ends, and says so.
    let (run, _, out, _) = one_package_run_with(&engine, &mut a, true);
    build_it(&mut a, &out);
    clock.advance(6_000);
    engine.check_leases();
    assert_eq!(engine.run_state(&run).unwrap(), RunState::Finished);
    let repo = engine.report(&run).unwrap().repository;
    assert!(
        repo.len() == 1 && !repo[0].ok && repo[0].message.contains("stopped responding"),
        "{repo:?}"
    );
}
