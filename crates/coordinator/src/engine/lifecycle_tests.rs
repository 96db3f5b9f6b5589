//! Engine tests of agents that misbehave or go: unasked cancels, dropped jobs, forgotten
//! agents.

use super::tests::{assigned, connect_agent, one_build_run, registration, test_engine};
use super::*;

/// An agent that answers every build it is given with "cancelled", without saying it drains
/// or pauses, gets it back only within the retry budget: the run ends (before, each cancel
/// requeued the build to the same agent, a new attempt and event each time, for ever). A
/// draining agent's hand-back still costs nothing.
#[test]
fn a_build_an_agent_keeps_cancelling_unasked_is_given_up_after_the_retry_budget() {
    let (engine, _clock, _dir) = test_engine(EngineOptions {
        max_infra_retries: 2,
        ..Default::default()
    });
    let mut a = connect_agent(&engine, "a");
    let (run, drv) = one_build_run(&engine, "a", &mut a);
    let cancel = |attempt: String| FromAgent::Build {
        attempt,
        report: BuildReport {
            kind: BuildOutcome::Cancelled,
            message: "cancelled".into(),
            ..Default::default()
        },
    };
    let mut builds = 0;
    while !engine.run_state(&run).unwrap().is_terminal() {
        let (attempt, job) = assigned(&mut a.rx);
        assert!(matches!(job, Job::Build { ref drv_path, .. } if *drv_path == drv));
        builds += 1;
        assert!(builds < 10, "requeued for ever");
        engine.agent_message("a", a.conn, cancel(attempt)).unwrap();
    }
    assert_eq!(builds, 3);
    let p = &engine.report(&run).unwrap().packages[0];
    assert_eq!(p.status, PackageStatus::InfraFailed);
    assert!(
        p.reason
            .contains("neither the run nor the agent was stopping"),
        "{}",
        p.reason
    );
    // The same, from an agent that said it drains: handed back, free, as often as it comes;
    // the build waits for another agent.
    let (engine, _clock, _dir) = test_engine(EngineOptions {
        max_infra_retries: 2,
        ..Default::default()
    });
    let mut b = connect_agent(&engine, "b");
    let (run, drv) = one_build_run(&engine, "b", &mut b);
    let (attempt, _) = assigned(&mut b.rx);
    let beat = FromAgent::Heartbeat {
        running: vec![],
        draining: true,
        paused: String::new(),
    };
    engine.agent_message("b", b.conn, beat).unwrap();
    engine.agent_message("b", b.conn, cancel(attempt)).unwrap();
    assert!(!engine.run_state(&run).unwrap().is_terminal());
    let mut c = connect_agent(&engine, "c");
    let (_, job) = assigned(&mut c.rx);
    assert!(matches!(job, Job::Build { ref drv_path, .. } if *drv_path == drv));
}

/// An agent that keeps beating but has dropped a job (its task ended without a result) no
/// longer holds it once its heartbeats have left it out for a lease: the build is assigned
/// again. Heartbeats that list it, or leave it out now and then, keep it.
#[test]
fn a_build_an_agent_drops_while_it_keeps_beating_is_assigned_again() {
    // A lease of 5 s; a beat a second.
    let (engine, clock, _dir) = test_engine(EngineOptions::default());
    let mut a = connect_agent(&engine, "a");
    let (run, drv) = one_build_run(&engine, "a", &mut a);
    let (first, _) = assigned(&mut a.rx);
    let beat = |running: Vec<String>| FromAgent::Heartbeat {
        running,
        draining: false,
        paused: String::new(),
    };
    let no_assignment = |rx: &mut mpsc::UnboundedReceiver<ToAgent>| {
        while let Ok(m) = rx.try_recv() {
            assert!(!matches!(m, ToAgent::Assign { .. }), "assigned again");
        }
    };
    for i in 0..12 {
        clock.advance(1_000);
        // Every third beat leaves it out (an assignment on its way, a result behind).
        let running = if i % 3 == 2 {
            vec![]
        } else {
            vec![first.clone()]
        };
        engine.agent_message("a", a.conn, beat(running)).unwrap();
        engine.check_leases();
    }
    no_assignment(&mut a.rx);
    for _ in 0..7 {
        clock.advance(1_000);
        engine.agent_message("a", a.conn, beat(vec![])).unwrap();
        engine.check_leases();
    }
    let (second, job) = assigned(&mut a.rx);
    assert_ne!(second, first);
    assert!(matches!(job, Job::Build { ref drv_path, .. } if *drv_path == drv));
    assert!(!engine.run_state(&run).unwrap().is_terminal());
}

/// The coordinator does not remember every name that ever registered: an agent gone (its
/// stream closed, nothing running) for longer than the retention is forgotten, its name
/// handed back for its farm cache token to be withdrawn; and past `max_agents` a new name
/// takes the place of the one gone longest, or is refused while none is gone.
#[test]
fn agents_gone_long_enough_are_forgotten_and_their_number_is_bounded() {
    let (engine, clock, _dir) = test_engine(EngineOptions {
        max_agents: 3,
        agent_retention_ms: 3_600_000,
        ..Default::default()
    });
    let names =
        |e: &Engine| -> Vec<String> { e.list_agents().into_iter().map(|a| a.name).collect() };
    let a = connect_agent(&engine, "a");
    let b = connect_agent(&engine, "b");
    let _c = connect_agent(&engine, "c");
    // Full, everyone connected: a new name is refused, saying why.
    let (tx, _rx) = mpsc::unbounded_channel();
    let e = engine
        .connect_agent(registration("d", ""), tx)
        .expect_err("refused");
    assert!(e.to_string().contains("remembers 3 agents"), "{e}");
    engine.disconnect_agent("a", a.conn);
    clock.advance(1_000);
    engine.disconnect_agent("b", b.conn);
    // One gone: it makes room (the one gone longest), and is handed back once.
    let _d = connect_agent(&engine, "d");
    assert_eq!(names(&engine), ["b", "c", "d"]);
    assert_eq!(engine.forget_idle_agents(), ["a"]);
    assert!(engine.forget_idle_agents().is_empty());
    // Gone past the retention: forgotten; the connected ones stay.
    clock.advance(3_600_001);
    assert_eq!(engine.forget_idle_agents(), ["b"]);
    assert_eq!(names(&engine), ["c", "d"]);
}
