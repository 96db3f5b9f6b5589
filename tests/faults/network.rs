//! An agent's network cut (in its own network namespace), for less and for more than the
//! lease: no build lost, none repeated, the run completes.

use super::*;

/// What a partition test saw.
struct Partitioned {
    report: serde_json::Value,
    per_drv: BTreeMap<String, (i64, i64)>,
    lost: i64,
    /// How many times each builder really ran.
    ran: BTreeMap<String, usize>,
    watch_log: String,
    /// The far agent's line of `nixfarm agents` at the end of the cut.
    far_during_cut: String,
}

/// Two agents, one on a network of its own; cuts that agent's link for `cut` once it is
/// building, with a lease of `lease` seconds; waits for the run to finish.
fn partition(lease: u64, cut: Duration) -> Partitioned {
    let dir = scratch();
    let cfg = config(dir.path(), lease);
    let net = NetNs::new();
    let coordinator = Coordinator::start_on(
        &dir.path().join("coordinator"),
        "0.0.0.0:0",
        &["--config", cfg.to_str().unwrap()],
    )
    .unwrap();
    let port = coordinator.url.rsplit(':').next().unwrap().to_string();
    let (cache_url, sk, pk) = cache(dir.path());
    let far = Host::in_netns(&dir.path().join("far"), &net);
    let _far = far
        .start_agent(
            "far",
            &format!("http://{}:{port}", net.host_ip),
            Some(&sk),
            2,
        )
        .unwrap();
    let near = Host::new(&dir.path().join("near"));
    let _near = near
        .start_agent("near", &coordinator.url, Some(&sk), 2)
        .unwrap();
    wait_for(Duration::from_secs(30), "both agents", || {
        (stdout(&cli(&coordinator.url, &["agents"]))
            .matches(" yes ")
            .count()
            >= 2)
            .then_some(())
    });
    let repo = slow_repo(dir.path(), 6, 8);
    let run = submit_shared(&coordinator.url, &repo, &cache_url, &pk);
    let watcher = watch_json(&coordinator.url, &run);
    wait_for(
        Duration::from_secs(90),
        "the far agent to be building",
        || {
            let n: i64 = attempts(
                &coordinator.db(),
                &run,
                "kind = 'build' AND agent = 'far' AND state = 'running'",
            )?;
            (n >= 1).then_some(())
        },
    );
    net.cut();
    std::thread::sleep(cut);
    let far_during_cut = stdout(&cli(&coordinator.url, &["agents"]))
        .lines()
        .find(|l| l.starts_with("far "))
        .unwrap_or_default()
        .to_string();
    net.restore();
    let out = watcher.wait_with_output().unwrap();
    let report: serde_json::Value = serde_json::from_str(&String::from_utf8_lossy(&out.stdout))
        .unwrap_or_else(|e| {
            panic!(
                "watch did not end with a report ({e}): {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                coordinator.proc.log_text()
            )
        });
    let db = coordinator.db();
    let lost: i64 = attempts(&db, &run, "state = 'lost'").unwrap();
    Partitioned {
        report,
        per_drv: builds_per_drv(&db, &run),
        lost,
        ran: builds_ran(dir.path()),
        watch_log: String::from_utf8_lossy(&out.stderr).to_string(),
        far_during_cut,
    }
}

/// Each package once in the report, all ready; each derivation built successfully once;
/// each build reported once to `watch`.
fn assert_nothing_lost_or_repeated(p: &Partitioned) {
    assert_eq!(p.report["state"], "finished");
    assert_eq!(p.report["summary"]["ready"], 7, "{}", p.report);
    let names: Vec<&str> = p.report["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["attr"].as_str().unwrap())
        .collect();
    let unique: std::collections::BTreeSet<&str> = names.iter().copied().collect();
    assert_eq!(names.len(), unique.len(), "each package reported once");
    assert_eq!(p.per_drv.len(), 7);
    for (d, (_, built)) in &p.per_drv {
        assert_eq!(*built, 1, "{d}: exactly one successful build counted");
    }
    for i in 0..6 {
        let name = format!("built leaf-{i} ");
        assert_eq!(
            p.watch_log.matches(&name).count(),
            1,
            "'{name}' once in:\n{}",
            p.watch_log
        );
    }
}

#[test]
fn a_network_cut_shorter_than_the_lease_loses_no_build() {
    // Heartbeats every second, so 6 s of silence is several missed heartbeats, but less than
    // the 30 s grace period: the far agent's builds go on and are reported once, by it.
    let p = partition(30, Duration::from_secs(6));
    // The cut was real: the coordinator had not heard from the agent for seconds, and
    // still counted its builds as its own.
    let line = &p.far_during_cut;
    let silent: u64 = line
        .split_once("s ago")
        .and_then(|(before, _)| before.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no 'last seen' in {line:?}"));
    assert!(silent >= 4, "silent for {silent}s: {line}");
    assert!(
        line.contains(" yes ") && line.contains("leaf-"),
        "still its builds: {line}"
    );
    assert_nothing_lost_or_repeated(&p);
    assert_eq!(p.lost, 0, "no attempt was given up");
    assert!(
        p.ran.values().all(|n| *n == 1),
        "each build ran once: {:?}",
        p.ran
    );
    for (d, (attempts, _)) in &p.per_drv {
        assert_eq!(*attempts, 1, "{d} was not started again elsewhere");
    }
}

#[test]
fn a_network_cut_longer_than_the_lease_requeues_and_the_run_completes() {
    // 15 s of silence against a 4 s grace period: the far agent's jobs are requeued on the
    // near one; what the far one finishes meanwhile is reported late and ignored.
    let p = partition(4, Duration::from_secs(15));
    assert!(
        p.far_during_cut.contains(" no "),
        "given up as disconnected: {}",
        p.far_during_cut
    );
    assert_nothing_lost_or_repeated(&p);
    assert!(p.lost >= 1, "the cut agent's attempts were given up");
}
