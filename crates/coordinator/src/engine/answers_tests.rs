//! What an agent's messages settle, and only that: an answer must fit its attempt's job, a
//! hash mismatch its derivation, and upload claims are bounded.

use super::tests::*;
use super::*;

#[test]
fn an_agent_holds_a_bounded_number_of_upload_claims_and_stale_ones_lapse() {
    use super::claims::MAX_UPLOAD_CLAIMS;
    let (engine, clock, _dir) = test_engine(EngineOptions::default());
    let a = connect_agent(&engine, "a");
    let paths = |from: usize, n: usize| -> Vec<String> {
        (from..from + n)
            .map(|i| format!("/nix/store/p{i}"))
            .collect()
    };
    let half = MAX_UPLOAD_CLAIMS / 2;
    // Under each cache's name: the cache is whatever the agent says.
    for (i, cache) in ["file:///a", "file:///b"].into_iter().enumerate() {
        let granted = engine
            .claim_unchecked("a", &a.session, cache, &paths(i * half, half))
            .unwrap();
        assert!(granted.iter().all(|g| *g));
    }
    let err = engine
        .claim_unchecked("a", &a.session, "file:///c", &paths(0, 1))
        .unwrap_err();
    assert!(
        matches!(err, EngineError::Invalid(ref m) if m.contains("upload claims")),
        "{err:?}"
    );
    // Claims older than any upload lapse, and make room.
    clock.advance(UPLOAD_CLAIM_TTL_MS + 1);
    assert_eq!(
        engine
            .claim_unchecked("a", &a.session, "file:///c", &paths(0, 1))
            .unwrap(),
        [true]
    );
}

#[test]
fn an_answer_of_another_kind_than_the_attempts_job_settles_nothing() {
    let (engine, _clock, _dir) = test_engine(EngineOptions::default());
    let mut a = connect_agent(&engine, "a");
    let (run, drv, out) = one_package_run(&engine, &mut a);
    let (attempt, _) = assigned(&mut a.rx);
    // An evaluation's answer to a build's attempt: a violation, and the build goes back to
    // the queue rather than running for ever with nobody on it.
    engine
        .agent_message(
            "a",
            a.conn,
            FromAgent::EvalChunk {
                attempt: attempt.clone(),
                result: Ok((vec![], BTreeMap::new())),
            },
        )
        .unwrap();
    assert_eq!(violations(&engine, "a"), 1);
    let (again, job) = assigned(&mut a.rx);
    assert_ne!(again, attempt);
    assert!(matches!(job, Job::Build { ref drv_path, .. } if *drv_path == drv));
    // A listing's answer to it changes nothing either.
    engine
        .agent_message(
            "a",
            a.conn,
            FromAgent::EvalList {
                attempt: again.clone(),
                result: Ok((vec!["other".into()], vec![])),
                follows: false,
                evaluated: None,
            },
        )
        .unwrap();
    assert_eq!(violations(&engine, "a"), 2);
    let (third, _) = assigned(&mut a.rx);
    let report = engine.report(&run).unwrap();
    assert_eq!(report.packages.len(), 1, "the listing was not taken");
    engine
        .agent_message(
            "a",
            a.conn,
            FromAgent::Build {
                attempt: third,
                report: built(&out),
            },
        )
        .unwrap();
    assert_eq!(engine.run_state(&run).unwrap(), RunState::Finished);
    assert_eq!(
        engine.report(&run).unwrap().packages[0].status,
        PackageStatus::Ready
    );
}

#[test]
fn a_hash_mismatch_counts_only_where_the_derivation_declares_the_specified_hash() {
    const FAKE: &str = "sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    const GOT: &str = "sha256-PVeE0nwHh0ZHzgquwGISnMlgMM5757mfRZ2F6p65gDc=";
    let sha512_zero = format!("sha512-{}==", "A".repeat(86));
    let fod = |hash: &str| DrvNode {
        fixed_output: true,
        output_hash: hash.into(),
        ..Default::default()
    };
    // (the derivation, what the build reports as specified, whether it counts)
    let cases = [
        (DrvNode::default(), FAKE, false),
        (
            fod("sha256:0000000000000000000000000000000000000000000000000000"),
            GOT,
            false,
        ),
        (
            fod("sha256:0000000000000000000000000000000000000000000000000000"),
            FAKE,
            true,
        ),
        // Another algorithm than the declared hash's (and than got's).
        (fod(FAKE), sha512_zero.as_str(), false),
    ];
    for (i, (node, specified, counts)) in cases.into_iter().enumerate() {
        let (engine, _clock, _dir) = test_engine(EngineOptions::default());
        let mut a = connect_agent(&engine, "a");
        let (run, _, _, _) = one_node_run(&engine, &mut a, false, node);
        let (attempt, _) = assigned(&mut a.rx);
        let report = BuildReport {
            kind: BuildOutcome::HashMismatch,
            message: "hash mismatch".into(),
            specified: Some(Sri::parse(specified).unwrap()),
            got: Some(Sri::parse(GOT).unwrap()),
            ..Default::default()
        };
        engine
            .agent_message("a", a.conn, FromAgent::Build { attempt, report })
            .unwrap();
        let p = &engine.report(&run).unwrap().packages[0];
        let want = if counts {
            PackageStatus::NeedsHash
        } else {
            PackageStatus::BuildFailed
        };
        assert_eq!(p.status, want, "case {i}: {p:?}");
    }
}

#[test]
fn a_result_counts_only_from_the_agent_that_holds_the_attempt() {
    let (engine, _clock, _dir) = test_engine(EngineOptions::default());
    let mut a = connect_agent(&engine, "a");
    let (run, _drv, out) = one_package_run(&engine, &mut a);
    let (attempt, _) = assigned(&mut a.rx);
    let b = connect_agent(&engine, "b");
    // b claims a's build succeeded, with a path nobody built.
    let forged = "/nix/store/22222222222222222222222222222222-evil".to_string();
    engine
        .agent_message(
            "b",
            b.conn,
            FromAgent::Build {
                attempt: attempt.clone(),
                report: built(&forged),
            },
        )
        .unwrap();
    assert_eq!(violations(&engine, "b"), 1);
    assert!(!engine.run_state(&run).unwrap().is_terminal());
    // a's own result still counts, once.
    for _ in 0..2 {
        engine
            .agent_message(
                "a",
                a.conn,
                FromAgent::Build {
                    attempt: attempt.clone(),
                    report: built(&out),
                },
            )
            .unwrap();
    }
    let report = engine.report(&run).unwrap();
    assert_eq!(report.packages[0].status, PackageStatus::Ready);
    assert_eq!(report.packages[0].agent, "a");
    assert_eq!(violations(&engine, "a"), 0);
}

#[test]
fn a_build_reporting_outputs_that_are_not_the_derivations_is_refused_and_retried() {
    let (engine, _clock, _dir) = test_engine(EngineOptions::default());
    let mut a = connect_agent(&engine, "a");
    let (run, drv, out) = one_package_run(&engine, &mut a);
    let (attempt, _) = assigned(&mut a.rx);
    let forged = "/nix/store/22222222222222222222222222222222-pkg".to_string();
    let report = built(&forged);
    engine
        .agent_message("a", a.conn, FromAgent::Build { attempt, report })
        .unwrap();
    assert_eq!(violations(&engine, "a"), 1);
    // Requeued as an infrastructure failure, not ready with the forged path.
    let (again, job) = assigned(&mut a.rx);
    assert!(matches!(job, Job::Build { ref drv_path, .. } if *drv_path == drv));
    let report = built(&out);
    engine
        .agent_message(
            "a",
            a.conn,
            FromAgent::Build {
                attempt: again,
                report,
            },
        )
        .unwrap();
    let report = engine.report(&run).unwrap();
    assert_eq!(report.packages[0].status, PackageStatus::Ready);
    assert_eq!(
        report.packages[0].outputs.get("out").map(|o| o.as_str()),
        Some(out.as_str())
    );
}

/// A claim on `cache` for one path, or none, in `agent`'s name with `session`.
fn claim(
    engine: &Engine,
    (agent, session): (&str, &str),
    attempt: &str,
    cache: &str,
    path: Option<&str>,
) -> Result<Vec<bool>, EngineError> {
    let paths: Vec<String> = path.into_iter().map(String::from).collect();
    engine.claim_uploads(&UploadClaim {
        agent,
        session,
        attempt,
        cache,
        paths: &paths,
    })
}

#[test]
fn upload_claims_are_made_for_an_attempt_held_and_a_cache_its_run_pushes_to() {
    let (engine, _clock, _dir) = test_engine(EngineOptions::default());
    let mut a = connect_agent(&engine, "a");
    let b = connect_agent(&engine, "b");
    let with_cache = |cache: &str| RunSpec {
        cache: cache.into(),
        ..flake_run()
    };
    engine.submit(with_cache("file:///mine")).unwrap();
    let (attempt, job) = assigned(&mut a.rx);
    assert!(matches!(job, Job::EvalList { .. }), "{job:?}");
    engine.submit(with_cache("file:///theirs")).unwrap();
    // Its run's cache, and the farm cache (no run's).
    let key = |agent: &str| if agent == "a" { &a.session } else { &b.session };
    let path = Some("/nix/store/44444444444444444444444444444444-source");
    claim(&engine, ("a", key("a")), &attempt, "file:///mine", path).unwrap();
    claim(&engine, ("a", key("a")), &attempt, "http://farm:8081", path).unwrap();
    let denied = |agent: &str, attempt: &str, cache: &str| {
        let e = claim(&engine, (agent, key(agent)), attempt, cache, path).unwrap_err();
        assert!(matches!(e, EngineError::Denied(_)), "{e:?}");
        e.to_string()
    };
    // Another run's cache, an attempt another agent holds, or none at all: refused.
    assert!(denied("a", &attempt, "file:///theirs").contains("another run's cache"));
    assert!(denied("b", &attempt, "file:///mine").contains("no attempt the agent holds"));
    assert!(denied("a", "", "file:///mine").contains("no attempt the agent holds"));
    // Without its session key nothing is said about the attempt.
    let e = claim(&engine, ("a", &b.session), &attempt, "file:///mine", path).unwrap_err();
    assert!(e.to_string().contains("session key"), "{e}");
}

/// A claim makes other agents wait for its paths: an attempt claims only what its build
/// may upload, its derivation's outputs and what they depend on (and paths that are no
/// derivation's output, sources), never another build's outputs.
#[test]
fn upload_claims_name_only_what_the_attempts_build_depends_on() {
    use super::checks_tests::{APP_OUT, LIB_OUT, answer, list_lib_and_app};
    let (engine, _clock, _dir) = test_engine(EngineOptions::default());
    let mut a = connect_agent(&engine, "a");
    let cache = "file:///mine";
    let spec = RunSpec {
        cache: cache.into(),
        ..flake_run()
    };
    engine.submit(spec.clone()).unwrap();
    list_lib_and_app(&engine, "a", &mut a);
    let (lib, job) = assigned(&mut a.rx);
    assert!(matches!(job, Job::Build { .. }), "{job:?}");
    let me = ("a", a.session.as_str());
    let source = Some("/nix/store/44444444444444444444444444444444-source");
    assert_eq!(
        claim(&engine, me, &lib, cache, Some(LIB_OUT)).unwrap(),
        [true]
    );
    assert_eq!(claim(&engine, me, &lib, cache, source).unwrap(), [true]);
    // app is built on lib, not the other way round.
    let e = claim(&engine, me, &lib, cache, Some(APP_OUT)).unwrap_err();
    assert!(e.to_string().contains("does not depend on"), "{e}");
    // An evaluation uploads derivations and sources, no output of a run's derivation.
    engine.submit(spec).unwrap();
    let (list, job) = assigned(&mut a.rx);
    assert!(matches!(job, Job::EvalList { .. }), "{job:?}");
    assert!(claim(&engine, me, &list, cache, Some(LIB_OUT)).is_err());
    assert_eq!(claim(&engine, me, &list, cache, source).unwrap(), [true]);
    // app's build may claim lib's output, which it depends on.
    answer(&engine, "a", &a, lib, built(LIB_OUT));
    let app = std::iter::from_fn(|| Some(assigned(&mut a.rx)))
        .find(|(_, j)| matches!(j, Job::Build { .. }))
        .unwrap()
        .0;
    assert_eq!(
        claim(&engine, me, &app, cache, Some(LIB_OUT)).unwrap(),
        [true]
    );
    assert_eq!(
        claim(&engine, me, &app, cache, Some(APP_OUT)).unwrap(),
        [true]
    );
}

/// A fixed output's path is its content's: two fetches of the same source have it, and so
/// may a flake input. Claims on it are nobody's to refuse.
#[test]
fn a_fixed_output_may_be_claimed_by_any_attempt() {
    let (engine, _clock, _dir) = test_engine(EngineOptions::default());
    let mut a = connect_agent(&engine, "a");
    let cache = "file:///mine";
    engine
        .submit(RunSpec {
            cache: cache.into(),
            ..flake_run()
        })
        .unwrap();
    let src = "/nix/store/44444444444444444444444444444444-source";
    let fetch = |attr: &str, drv: &str| {
        let node = DrvNode {
            system: "x86_64-linux".into(),
            outputs: [("out".to_string(), op(src))].into(),
            fixed_output: true,
            output_hash: "sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into(),
            ..Default::default()
        };
        let attr = EvaluatedAttr {
            attr: attr.into(),
            info: PackageInfo {
                drv_path: Some(sp(drv)),
                outputs: [("out".to_string(), op(src))].into(),
                system: "x86_64-linux".into(),
                ..Default::default()
            },
        };
        (attr, (sp(drv), node))
    };
    let (f1, n1) = fetch(
        "f1",
        "/nix/store/55555555555555555555555555555555-source.drv",
    );
    let (f2, n2) = fetch(
        "f2",
        "/nix/store/66666666666666666666666666666666-source.drv",
    );
    let names = vec!["f1".to_string(), "f2".into()];
    let evaluated = Some((vec![f1, f2], [n1, n2].into()));
    super::opinions_tests::send_listing(&engine, "a", &mut a, names, evaluated);
    let (fetching, job) = assigned(&mut a.rx);
    assert!(matches!(job, Job::Build { .. }), "{job:?}");
    let me = ("a", a.session.as_str());
    assert_eq!(
        claim(&engine, me, &fetching, cache, Some(src)).unwrap(),
        [true]
    );
    // An evaluation uploads its flake's inputs, a `-source` path that may be the same.
    engine
        .submit(RunSpec {
            cache: cache.into(),
            ..flake_run()
        })
        .unwrap();
    let (listing, job) = std::iter::from_fn(|| Some(assigned(&mut a.rx)))
        .find(|(_, j)| matches!(j, Job::EvalList { .. }))
        .unwrap();
    assert!(matches!(job, Job::EvalList { .. }));
    assert_eq!(
        claim(&engine, me, &listing, cache, Some(src)).unwrap(),
        [true]
    );
}
