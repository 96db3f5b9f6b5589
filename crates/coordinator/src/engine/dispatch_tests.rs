//! Dispatch policy, end to end through the engine: which job an agent is given next (builds
//! beside evaluation, fetch slots, remembered build times).

use super::tests::{
    TestAgent, assigned, built, connect_agent, flake_run, registration, test_engine,
};
use super::*;

/// Agent `a` lists `names` for attempt `list`; with `evaluated`, the listing evaluated those.
fn send_listing(
    engine: &Engine,
    conn: u64,
    list: String,
    names: Vec<String>,
    evaluated: Option<EvalChunkOutput>,
) {
    engine
        .agent_message(
            "a",
            conn,
            FromAgent::EvalList {
                attempt: list,
                result: Ok((names, vec![])),
                follows: false,
                evaluated,
            },
        )
        .unwrap();
}

/// An engine evaluating one attribute per task, and agent `a` with two slots.
fn two_slot_agent() -> (
    Engine,
    tempfile::TempDir,
    mpsc::UnboundedReceiver<ToAgent>,
    u64,
) {
    let (engine, _clock, dir) = test_engine(EngineOptions {
        eval_chunk_size: 1,
        ..Default::default()
    });
    let (tx, rx) = mpsc::unbounded_channel();
    let mut reg = registration("a", "");
    reg.max_jobs = 2;
    let (conn, _) = engine.connect_agent(reg, tx).unwrap();
    (engine, dir, rx, conn)
}

#[test]
fn evaluation_has_slots_of_its_own_beside_the_builds() {
    let (engine, _clock, _dir) = test_engine(EngineOptions {
        eval_chunk_size: 1,
        ..Default::default()
    });
    // One build slot: evaluation must not take it, nor wait for it.
    let mut a = connect_agent(&engine, "a");
    // Evaluations are told the keys the run's builds will trust: the agent starts their
    // daemons ahead with them.
    let keys = vec!["team-1:AAAA".to_string()];
    engine
        .submit(RunSpec {
            trusted_public_keys: keys.clone(),
            ..flake_run()
        })
        .unwrap();
    let (list, j0) = assigned(&mut a.rx);
    assert!(
        matches!(j0, Job::EvalList { ref trusted_public_keys, .. } if *trusted_public_keys == keys),
        "{j0:?}"
    );
    let names = vec!["p0".to_string(), "p1".into(), "p2".into()];
    send_listing(&engine, a.conn, list, names, None);
    // One evaluation at a time (half the build slots, at least one)...
    let (first, j1) = assigned(&mut a.rx);
    // The listing evaluated nothing: no task is said to throw.
    assert!(
        matches!(
            j1,
            Job::EvalChunk {
                listed_as_throwing: false,
                ref trusted_public_keys,
                ..
            } if *trusted_public_keys == keys
        ),
        "{j1:?}"
    );
    assert!(
        a.rx.try_recv().is_err(),
        "a second evaluation at once on a one-slot agent"
    );
    let (attr, drv, node) = p0_evaluated("p0");
    engine
        .agent_message(
            "a",
            a.conn,
            FromAgent::EvalChunk {
                attempt: first,
                result: Ok((vec![attr], [(sp(&drv), node)].into())),
            },
        )
        .unwrap();
    // ...and beside it the build slot builds what is evaluated: the next chunk and p0 at once.
    let mut jobs = vec![assigned(&mut a.rx).1, assigned(&mut a.rx).1];
    jobs.sort_by_key(|j| matches!(j, Job::Build { .. }));
    assert!(matches!(jobs[0], Job::EvalChunk { .. }), "{jobs:?}");
    assert!(
        matches!(jobs[1], Job::Build { ref drv_path, .. } if *drv_path == drv),
        "{jobs:?}"
    );
    assert!(a.rx.try_recv().is_err(), "both slots are busy");
}

#[test]
fn an_attribute_the_listing_caught_throwing_is_evaluated_for_its_message_behind_the_builds() {
    let (engine, _clock, _dir) = test_engine(EngineOptions::default());
    let mut a = connect_agent(&engine, "a");
    engine.submit(flake_run()).unwrap();
    let (list, _) = assigned(&mut a.rx);
    // The listing evaluated p0 and gave nothing for p1: it threw.
    let (attr, drv, node) = p0_evaluated("p0");
    let names = vec!["p0".to_string(), "p1".into(), "checks.c1".into()];
    let evaluated = (vec![attr], [(sp(&drv), node)].into());
    send_listing(&engine, a.conn, list, names, Some(evaluated));
    let jobs = [assigned(&mut a.rx), assigned(&mut a.rx)];
    let chunk = jobs.iter().find_map(|(attempt, j)| match j {
        Job::EvalChunk {
            attrs,
            listed_as_throwing,
            ..
        } => Some((attempt.clone(), attrs.clone(), *listed_as_throwing)),
        _ => None,
    });
    let Some((attempt, attrs, true)) = chunk else {
        panic!("{jobs:?}");
    };
    assert_eq!(attrs, ["p1"]);
    assert!(
        jobs.iter()
            .any(|(_, j)| matches!(j, Job::Build { drv_path, .. } if *drv_path == drv)),
        "{jobs:?}"
    );
    // The flake's checks come in a task of their own: the listing evaluates none of them,
    // so none is said to throw.
    let thrown = EvaluatedAttr {
        attr: "p1".into(),
        info: PackageInfo {
            eval_error: "p1: unsupported".into(),
            ..Default::default()
        },
    };
    answer_chunk(&engine, a.conn, attempt, vec![thrown], BTreeMap::new());
    let (_, job) = assigned(&mut a.rx);
    assert!(
        matches!(
            &job,
            Job::EvalChunk { attrs, listed_as_throwing: false, .. } if attrs == &["checks.c1"]
        ),
        "{job:?}"
    );
}

/// Evaluates a run of `pkgs` (name, hash digit) on the one-slot agent `a`; returns each
/// one's (drv, output) and the first build it is then given.
fn packages_run(
    engine: &Engine,
    a: &mut TestAgent,
    pkgs: &[(&str, char)],
) -> (Vec<(String, String)>, (String, Job)) {
    engine.submit(flake_run()).unwrap();
    let (list, _) = assigned(&mut a.rx);
    let names = pkgs.iter().map(|(n, _)| n.to_string()).collect();
    send_listing(engine, a.conn, list, names, None);
    let mut attrs = BTreeMap::new();
    let mut drvs = BTreeMap::new();
    let mut out = Vec::new();
    for (name, digit) in pkgs {
        let h: String = std::iter::repeat_n(*digit, 32).collect();
        let drv = format!("/nix/store/{h}-{name}.drv");
        let o = format!("/nix/store/{h}-{name}");
        let outputs: Outputs = [("out".to_string(), op(&o))].into();
        let node = DrvNode {
            system: "x86_64-linux".into(),
            outputs: outputs.clone(),
            // A fetch, as fetchers are: fixed output.
            fixed_output: name.starts_with("src-"),
            ..Default::default()
        };
        let attr = EvaluatedAttr {
            attr: name.to_string(),
            info: PackageInfo {
                drv_path: Some(sp(&drv)),
                outputs,
                system: "x86_64-linux".into(),
                ..Default::default()
            },
        };
        attrs.insert(name.to_string(), (attr, drv.clone(), node));
        drvs.insert(drv.clone(), ());
        out.push((drv, o));
    }
    // The one evaluation task (a chunk holds both packages), then the first build.
    loop {
        let (attempt, job) = assigned(&mut a.rx);
        let Job::EvalChunk { attrs: asked, .. } = &job else {
            return (out, (attempt, job));
        };
        let mut evaluated = Vec::new();
        let mut nodes = BTreeMap::new();
        for name in asked {
            let (attr, drv, node) = attrs[name].clone();
            evaluated.push(attr);
            nodes.insert(sp(&drv), node);
        }
        answer_chunk(engine, a.conn, attempt, evaluated, nodes);
    }
}

/// Agent `a` (on `conn`) answers evaluation task `attempt` with `attrs` and `nodes`.
fn answer_chunk(
    engine: &Engine,
    conn: u64,
    attempt: String,
    attrs: Vec<EvaluatedAttr>,
    nodes: BTreeMap<StorePath, DrvNode>,
) {
    engine
        .agent_message(
            "a",
            conn,
            FromAgent::EvalChunk {
                attempt,
                result: Ok((attrs, nodes)),
            },
        )
        .unwrap();
}

#[test]
fn what_took_long_last_time_is_built_first_next_time() {
    let (engine, _clock, _dir) = test_engine(EngineOptions::default());
    let mut a = connect_agent(&engine, "a");
    // First run: nothing known, so the tie goes to the first node: fast, then slow.
    let (first, given) = packages_run(&engine, &mut a, &[("fast", '0'), ("slow", '1')]);
    let mut next = Some(given);
    for (i, (drv, out)) in first.iter().enumerate() {
        let (attempt, job) = next.take().unwrap_or_else(|| assigned(&mut a.rx));
        assert!(
            matches!(job, Job::Build { ref drv_path, .. } if drv_path == drv),
            "{i}: {job:?}"
        );
        let mut report = built(out);
        report.duration_ms = if drv.ends_with("-slow.drv") {
            5_000
        } else {
            20
        };
        engine
            .agent_message("a", a.conn, FromAgent::Build { attempt, report })
            .unwrap();
    }
    // Next run, new versions of both (other hashes): slow goes first.
    let (second, (_, job)) = packages_run(&engine, &mut a, &[("fast", '2'), ("slow", '3')]);
    assert!(
        matches!(job, Job::Build { ref drv_path, .. } if *drv_path == second[1].0),
        "{job:?}"
    );
}

#[test]
fn fetches_have_slots_of_their_own_beside_the_build_slots() {
    let (engine, _clock, _dir) = test_engine(EngineOptions::default());
    let mut a = connect_agent(&engine, "a");
    // One build slot (and so one fetch slot): two packages and two fetches, all ready.
    let (drvs, (_, first)) = packages_run(
        &engine,
        &mut a,
        &[
            ("pkg-a", '0'),
            ("pkg-b", '1'),
            ("src-a", '2'),
            ("src-b", '3'),
        ],
    );
    let mut given = vec![first];
    while let Ok(ToAgent::Assign { job, .. }) = a.rx.try_recv() {
        given.push(job);
    }
    let names: Vec<String> = given
        .iter()
        .map(|j| match j {
            Job::Build { drv_path, .. } => store_name(drv_path).to_string(),
            other => format!("{other:?}"),
        })
        .collect();
    // A package and a fetch at once, not two of either.
    assert_eq!(names.len(), 2, "{names:?}");
    assert_eq!(
        names.iter().filter(|n| n.starts_with("src-")).count(),
        1,
        "{names:?}"
    );
    assert_eq!(drvs.len(), 4);
}

/// p0's attribute and its one-derivation closure, as an evaluation reports them.
fn p0_evaluated(attr_name: &str) -> (EvaluatedAttr, String, DrvNode) {
    let drv = "/nix/store/00000000000000000000000000000000-p0.drv".to_string();
    let out = "/nix/store/11111111111111111111111111111111-p0".to_string();
    let node = DrvNode {
        system: "x86_64-linux".into(),
        outputs: [("out".to_string(), op(&out))].into(),
        ..Default::default()
    };
    let attr = EvaluatedAttr {
        attr: attr_name.into(),
        info: PackageInfo {
            drv_path: Some(sp(&drv)),
            outputs: [("out".to_string(), op(&out))].into(),
            system: "x86_64-linux".into(),
            ..Default::default()
        },
    };
    (attr, drv, node)
}

#[test]
fn what_a_listing_evaluated_builds_at_once_and_only_the_rest_is_left_to_tasks() {
    let (engine, _dir, mut rx, conn) = two_slot_agent();
    let run = engine.submit(flake_run()).unwrap();
    let (list, job) = assigned(&mut rx);
    assert!(
        matches!(
            job,
            Job::EvalList {
                evaluate_up_to: 32,
                ..
            }
        ),
        "a whole repository is listed and, if small, evaluated at once: {job:?}"
    );
    let (attr, drv, node) = p0_evaluated("p0");
    let names = vec!["p0".to_string(), "p1".into(), "p2".into()];
    send_listing(
        &engine,
        conn,
        list,
        names,
        Some((vec![attr], [(sp(&drv), node)].into())),
    );
    let jobs = [assigned(&mut rx).1, assigned(&mut rx).1];
    assert!(
        jobs.iter()
            .any(|j| matches!(j, Job::Build { drv_path, .. } if *drv_path == drv)),
        "p0 builds before any task is evaluated: {jobs:?}"
    );
    assert!(
        jobs.iter()
            .any(|j| matches!(j, Job::EvalChunk { attrs, .. } if *attrs == ["p1"])),
        "{jobs:?}"
    );
    let events = super::queries_tests::run_events(&engine, &run);
    assert!(
        events.contains(&nixfarm_core::RunEvent::EvalListed { attrs: 3, tasks: 3 }),
        "the listing's evaluation is one of the run's tasks, done: {events:?}"
    );
    let progress = events
        .iter()
        .filter(|e| matches!(e, nixfarm_core::RunEvent::EvalProgress { .. }))
        .count();
    assert_eq!(progress, 1, "{events:?}");
}

#[test]
fn a_listing_that_evaluated_an_attribute_it_did_not_list_is_evaluated_by_tasks() {
    let (engine, _clock, _dir) = test_engine(EngineOptions {
        eval_chunk_size: 1,
        ..Default::default()
    });
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (conn, _) = engine.connect_agent(registration("a", ""), tx).unwrap();
    engine.submit(flake_run()).unwrap();
    let (list, _) = assigned(&mut rx);
    let (attr, drv, node) = p0_evaluated("not-listed");
    send_listing(
        &engine,
        conn,
        list,
        vec!["p0".to_string()],
        Some((vec![attr], [(sp(&drv), node)].into())),
    );
    let (_, job) = assigned(&mut rx);
    assert!(
        matches!(job, Job::EvalChunk { ref attrs, .. } if *attrs == ["p0"]),
        "{job:?}"
    );
}

#[test]
fn a_package_that_declares_a_long_timeout_starts_first_on_a_coordinator_that_never_built_it_and_the_rest_yield_the_cpu()
 {
    let (engine, _clock, _dir) = test_engine(EngineOptions::default());
    let mut a = connect_agent(&engine, "a");
    engine.submit(flake_run()).unwrap();
    let (list, _) = assigned(&mut a.rx);
    let mut attrs = Vec::new();
    let mut drvs = BTreeMap::new();
    // p0 comes first in every other order; p1's maintainers say it may take 200 s.
    for (name, digit, timeout_secs) in [("p0", '0', 0), ("p1", '1', 200)] {
        let h: String = std::iter::repeat_n(digit, 32).collect();
        let drv = format!("/nix/store/{h}-{name}.drv");
        let outputs: Outputs = [("out".to_string(), op(&format!("/nix/store/{h}-{name}")))].into();
        drvs.insert(
            sp(&drv),
            DrvNode {
                system: "x86_64-linux".into(),
                outputs: outputs.clone(),
                ..Default::default()
            },
        );
        attrs.push(EvaluatedAttr {
            attr: name.into(),
            info: PackageInfo {
                drv_path: Some(sp(&drv)),
                outputs,
                system: "x86_64-linux".into(),
                timeout_secs,
                ..Default::default()
            },
        });
    }
    send_listing(
        &engine,
        a.conn,
        list,
        vec!["p0".into(), "p1".into()],
        Some((attrs, drvs)),
    );
    let (_, job) = assigned(&mut a.rx);
    assert!(
        matches!(job, Job::Build { ref drv_path, background: false, .. } if drv_path.ends_with("-p1.drv")),
        "{job:?}"
    );
    // A second agent takes p0, far shorter than the longest chain: it builds at a lower CPU
    // priority.
    let mut b = connect_agent(&engine, "b");
    let (_, job) = assigned(&mut b.rx);
    assert!(
        matches!(job, Job::Build { ref drv_path, background: true, .. } if drv_path.ends_with("-p0.drv")),
        "{job:?}"
    );
}

#[test]
fn an_evaluation_tasks_answer_counts_only_for_the_tasks_own_attributes() {
    let (engine, _clock, _dir) = test_engine(EngineOptions {
        eval_chunk_size: 1,
        ..Default::default()
    });
    let mut a = connect_agent(&engine, "a");
    let run = engine.submit(flake_run()).unwrap();
    let (list, _) = assigned(&mut a.rx);
    send_listing(&engine, a.conn, list, vec!["p0".into(), "p1".into()], None);
    // The next evaluation task handed out (what is evaluated builds meanwhile).
    let chunk = |a: &mut TestAgent| loop {
        if let (attempt, Job::EvalChunk { attrs, .. }) = assigned(&mut a.rx) {
            return (attempt, attrs);
        }
    };
    let answer = |a: &TestAgent, attempt: String, names: &[String]| {
        let mut attrs = Vec::new();
        let mut drvs = BTreeMap::new();
        for n in names {
            let (attr, drv, node) = p0_evaluated(n);
            attrs.push(attr);
            drvs.insert(sp(&drv), node);
        }
        engine
            .agent_message(
                "a",
                a.conn,
                FromAgent::EvalChunk {
                    attempt,
                    result: Ok((attrs, drvs)),
                },
            )
            .unwrap();
    };
    // Task p0 is answered with its own attribute and another's, then with the other's
    // alone: both refused, the task asked again each time. Task p1 is answered as asked.
    let own = vec!["p0".to_string()];
    let other = "p1".to_string();
    let wrong = [vec![own[0].clone(), other.clone()], vec![other.clone()]];
    let mut tries = 0;
    loop {
        let (attempt, asked) = chunk(&mut a);
        if asked != own {
            answer(&a, attempt, &asked);
            continue;
        }
        if tries < wrong.len() {
            answer(&a, attempt, &wrong[tries]);
            tries += 1;
            assert_eq!(super::tests::violations(&engine, "a"), tries as u64);
            let report = engine.report(&run).unwrap();
            let p0 = report.packages.iter().find(|p| p.attr == "p0");
            assert!(p0.is_none_or(|p| p.drv_path.is_none()), "{p0:?}");
            continue;
        }
        answer(&a, attempt, &own);
        break;
    }
    assert_eq!(super::tests::violations(&engine, "a"), 2);
    let report = engine.report(&run).unwrap();
    let taken: Vec<_> = report
        .packages
        .iter()
        .filter(|p| p.drv_path.is_some())
        .map(|p| p.attr.clone())
        .collect();
    assert_eq!(taken, ["p0", "p1"]);
}
