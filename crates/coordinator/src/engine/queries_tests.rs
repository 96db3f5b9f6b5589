//! Reads: a report is read beside the engine, and says what the engine's own would; which
//! uploaded snapshots runs still need.

use super::tests::{build_assigned, connect_agent, one_package_run};
use super::*;
use crate::db::Db;

/// Over a database file a report is read through the store's own reader: the same report
/// as the engine's own (a pending package's reason included), and one with nothing pending
/// does not wait for the engine at all (held here by another caller).
#[test]
fn a_report_is_read_beside_the_engine_and_says_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(
        Db::open(&dir.path().join("coordinator.sqlite")).unwrap(),
        dir.path().join("sources"),
        Arc::new(crate::clock::ManualClock::new(1_000_000)),
        EngineOptions {
            lease_ms: 5_000,
            ..EngineOptions::default()
        },
    )
    .unwrap();
    assert!(
        engine.reader.lock().unwrap().is_some(),
        "a file has a reader"
    );
    let mut a = connect_agent(&engine, "a");
    let (run, _drv, out) = one_package_run(&engine, &mut a);
    let read = engine.report(&run).unwrap();
    let locked = {
        let g = engine.lock();
        engine.report_locked(&g, &run).unwrap()
    };
    assert_eq!(read.packages[0].status, PackageStatus::Pending);
    assert!(!read.packages[0].reason.is_empty());
    assert_eq!(read.to_json(), locked.to_json());
    build_assigned(&engine, &mut a, &out);
    let held = engine.lock();
    let (e, r) = (engine.clone(), run.clone());
    let report = std::thread::spawn(move || e.report(&r).unwrap());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !report.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let done = report.is_finished();
    drop(held);
    assert!(done, "the report waited for the engine");
    let report = report.join().unwrap();
    assert_eq!(
        report.packages[0].status,
        PackageStatus::Ready,
        "{}",
        report.packages[0].reason
    );
    assert_eq!(report.state, RunState::Finished);
}

/// A run's events so far, as a watcher reads them.
pub(super) fn run_events(engine: &Engine, run: &str) -> Vec<nixfarm_core::RunEvent> {
    engine
        .events_after(run, 0)
        .unwrap()
        .iter()
        .map(|e| serde_json::from_str(&e.json).unwrap())
        .collect()
}

/// A run of a flake's packages.x86_64-linux, no cache.
pub(crate) fn flake_run() -> RunSpec {
    RunSpec {
        source: SourceSpec::FlakeRef("github:owner/repo".into()),
        attr_path: "packages.x86_64-linux".into(),
        label: String::new(),
        cache: String::new(),
        trusted_public_keys: vec![],
        timeout_secs: 0,
        max_silent_secs: 0,
        attrs: vec![],
        skip_cached: false,
        skip_listing: false,
        smoke: false,
        cross_check_builds: false,
        entry: Default::default(),
        stage_of: None,
    }
}

/// The sweep keeps the snapshots of runs going on and of runs begun in the last week, and
/// removes the rest once they are an hour old; a submit naming one it removed is refused.
#[test]
fn uploaded_snapshots_stay_while_a_run_needs_them() {
    let (engine, clock, _dir) = super::tests::test_engine(EngineOptions::default());
    let digest = |c: char| c.to_string().repeat(64);
    for c in ['a', 'b', 'c'] {
        let p = engine.sources_dir().join(format!("{}.tar", digest(c)));
        std::fs::write(&p, b"tar").unwrap();
        crate::upload::tests::older_than_unclaimed(&p);
    }
    let on = |c: char| RunSpec {
        source: SourceSpec::Snapshot(digest(c)),
        ..super::tests::flake_run()
    };
    engine.submit(on('a')).unwrap();
    let ended = engine.submit(on('b')).unwrap();
    assert!(engine.cancel(&ended).unwrap());
    let left = || {
        ['a', 'b', 'c'].map(|c| {
            engine
                .sources_dir()
                .join(format!("{}.tar", digest(c)))
                .is_file()
        })
    };
    // c: no run names it.
    assert_eq!(engine.sweep_snapshots().unwrap(), 1);
    assert_eq!(left(), [true, true, false]);
    let e = engine.submit(on('c')).unwrap_err().to_string();
    assert!(e.contains("upload it first"), "{e}");
    // A week on: b's run ended long ago; a's is still evaluating.
    clock.advance(crate::upload::SNAPSHOT_KEEP.as_millis() as i64 + 1);
    assert_eq!(engine.sweep_snapshots().unwrap(), 1);
    assert_eq!(left(), [true, false, false]);
}
