//! Which caches runs may name, and which runs an agent whose operator listed its run caches
//! takes part in.

use super::tests::*;
use super::*;

#[test]
fn runs_name_only_the_caches_and_keys_the_operator_listed() {
    let key = "team-1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let (engine, _clock, _dir) = test_engine(EngineOptions {
        run_caches: vec!["cachix://team".into(), "https://cache.example.org/".into()],
        run_cache_keys: vec![key.into()],
        ..Default::default()
    });
    let with = |cache: &str, keys: &[&str]| RunSpec {
        cache: cache.into(),
        trusted_public_keys: keys.iter().map(|k| k.to_string()).collect(),
        ..flake_run()
    };
    for ok in [
        with("cachix://team", &[]),
        with("https://cache.example.org", &[key]),
        with("", &[]),
    ] {
        engine.submit(ok).unwrap();
    }
    let e = engine
        .submit(with("https://evil.example.org", &[]))
        .unwrap_err();
    assert!(
        matches!(&e, EngineError::Denied(m) if m.contains("run_caches") && m.contains("evil.example.org")),
        "{e}"
    );
    let e = engine
        .submit(with("cachix://team", &[key, "evil-1:BBBB"]))
        .unwrap_err();
    assert!(
        matches!(&e, EngineError::Denied(m) if m.contains("run_cache_keys") && m.contains("evil-1")),
        "{e}"
    );
    // Keys listed, caches not: a Cachix cache brings Cachix's keys, so it must be listed.
    let (keyed, _clock, _dir) = test_engine(EngineOptions {
        run_cache_keys: vec![key.into()],
        ..Default::default()
    });
    keyed
        .submit(with("https://any.example.org", &[key]))
        .unwrap();
    let e = keyed
        .submit(with("cachix://evil?api=http://evil.example/", &[]))
        .unwrap_err();
    assert!(
        matches!(&e, EngineError::Denied(m) if m.contains("run_caches")),
        "{e}"
    );
    // Without a list, any cache (the default).
    let (open, _clock, _dir) = test_engine(EngineOptions::default());
    open.submit(with("https://anywhere.example.org", &["k:AAAA"]))
        .unwrap();
}

#[test]
fn an_agent_whose_operator_listed_its_run_caches_takes_part_only_in_runs_with_one() {
    let (engine, _clock, _dir) = test_engine(EngineOptions::default());
    let (tx, mut rx) = mpsc::unbounded_channel();
    // Four build slots: two evaluation slots, one for each run it may take.
    engine
        .connect_agent(
            Registration {
                run_caches: vec!["cachix://team".into()],
                max_jobs: 4,
                ..registration("picky", "")
            },
            tx,
        )
        .unwrap();
    let with = |cache: &str| RunSpec {
        cache: cache.into(),
        ..flake_run()
    };
    let assigned_runs = |rx: &mut mpsc::UnboundedReceiver<ToAgent>| {
        let mut runs = Vec::new();
        while let Ok(m) = rx.try_recv() {
            if let ToAgent::Assign { run_id, .. } = m {
                runs.push(run_id);
            }
        }
        runs
    };
    // `nixfarm agents` shows the list.
    assert_eq!(engine.list_agents()[0].run_caches, ["cachix://team"]);
    let other = engine.submit(with("https://other.example.org")).unwrap();
    assert!(
        assigned_runs(&mut rx).is_empty(),
        "nothing of a run with another cache"
    );
    let why = engine.waiting_jobs();
    assert!(
        why.iter()
            .any(|(r, _, ex)| r.contains("run_caches") && *ex == other),
        "{why:?}"
    );
    let listed = engine.submit(with("cachix://team/")).unwrap();
    assert_eq!(
        assigned_runs(&mut rx),
        [listed],
        "a listed cache (its trailing / aside)"
    );
    let own = engine.submit(with("")).unwrap();
    assert_eq!(
        assigned_runs(&mut rx),
        [own],
        "no cache of its own: the farm's"
    );
    // An agent of an open mind takes the other.
    let mut open = connect_agent(&engine, "open");
    assert_eq!(assigned_runs(&mut open.rx), [other]);
}
