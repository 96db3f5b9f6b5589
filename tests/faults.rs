//! Faults with real processes: kill -9 of the coordinator mid-run (it resumes from SQLite,
//! agents reconnect, `watch` resumes), kill -9 of an agent mid-build (its jobs are
//! requeued after the lease and the run completes on the other agent), and an agent's
//! network cut (in its own network namespace) for less and for more than the lease.

use nixfarm_tests::*;
use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

/// A flake of `n` independent packages that each build for `secs` seconds, printing as they
/// go, and one that depends on all of them. Every builder that starts writes its name to
/// `dir/builds-ran` (the sandbox is off), so a test counts the builds that really ran.
fn slow_repo(dir: &std::path::Path, n: usize, secs: u32) -> std::path::PathBuf {
    let repo = dir.join("slow");
    std::fs::create_dir_all(&repo).unwrap();
    let ran = dir.join("builds-ran");
    std::fs::write(&ran, "").unwrap();
    set_mode(&ran, 0o666);
    std::fs::write(
        repo.join("flake.nix"),
        format!(
            r#"{{ outputs = {{ self }}: let
      mk = name: script: deps: derivation {{ inherit name; system = "x86_64-linux"; builder = "/bin/sh";
        PATH = "/usr/bin:/bin"; args = [ "-c" ("echo $name >> {ran}; " + script) ]; inherit deps; }};
      leaf = i: mk "leaf-${{toString i}}" "for s in $(seq 1 {secs}); do echo tick $s; sleep 1; done; echo ${{toString i}} > $out" [];
      leaves = builtins.genList leaf {n};
      pkgs = builtins.listToAttrs (map (d: {{ name = d.name; value = d; }}) leaves);
    in {{ packages.x86_64-linux = pkgs // {{ all = mk "all" "cat $deps > $out" leaves; }}; }}; }}"#,
            ran = ran.display()
        ),
    )
    .unwrap();
    repo
}

/// How many times each builder of `slow_repo` really ran.
fn builds_ran(dir: &std::path::Path) -> BTreeMap<String, usize> {
    let mut n = BTreeMap::new();
    for l in std::fs::read_to_string(dir.join("builds-ran"))
        .unwrap()
        .lines()
    {
        *n.entry(l.to_string()).or_default() += 1;
    }
    n
}

/// The cache the agents share (their stores are separate): (URL, secret key file, public key).
fn cache(dir: &std::path::Path) -> (String, std::path::PathBuf, String) {
    let c = dir.join("cache");
    std::fs::create_dir_all(&c).unwrap();
    set_mode(&c, 0o755);
    let (sk, pk) = cache_key(dir, "faults-1");
    (format!("file://{}", c.display()), sk, pk)
}

/// Submits `repo` with the cache the agents share; returns the run id.
fn submit_shared(url: &str, repo: &std::path::Path, cache_url: &str, pk: &str) -> String {
    let out = cli(
        url,
        &[
            "submit",
            repo.to_str().unwrap(),
            "--cache",
            cache_url,
            "--trusted-public-key",
            pk,
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out).trim().to_string()
}

/// A coordinator config with a grace period of `lease` seconds before a silent agent's jobs
/// are requeued.
fn config(dir: &std::path::Path, lease: u64) -> std::path::PathBuf {
    let p = dir.join("coordinator.toml");
    std::fs::write(
        &p,
        format!("[scheduler]\nlease_secs = {lease}\nheartbeat_secs = 1\n"),
    )
    .unwrap();
    p
}

/// `nixfarm watch RUN --format json`, running: the report on stdout, progress on stderr.
fn watch_json(url: &str, run: &str) -> std::process::Child {
    Command::new(bin("nixfarm"))
        .args(["watch", run, "--format", "json"])
        .env("NIXFARM_COORDINATOR", url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// How many of the run's attempts match `cond` (SQL over the attempts table).
fn attempts(db: &rusqlite::Connection, run: &str, cond: &str) -> Option<i64> {
    db.query_row(
        &format!("SELECT count(*) FROM attempts WHERE run_id = ?1 AND {cond}"),
        [run],
        |r| r.get(0),
    )
    .ok()
}

fn builds_per_drv(db: &rusqlite::Connection, run: &str) -> BTreeMap<String, (i64, i64)> {
    let mut st = db
        .prepare(
            "SELECT target, count(*), sum(outcome = 'built') FROM attempts WHERE run_id = ?1 AND kind = 'build' GROUP BY target",
        )
        .unwrap();
    st.query_map([run], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))
        .unwrap()
        .map(|r| r.unwrap())
        .collect()
}

#[test]
fn kill_9_of_the_coordinator_mid_run_loses_nothing_and_redoes_nothing() {
    let dir = scratch();
    // A grace period longer than the outage: builds running at the kill must reattach.
    let cfg = config(dir.path(), 30);
    let state = dir.path().join("coordinator");
    let (cache_url, sk, pk) = cache(dir.path());
    let mut coordinator =
        Coordinator::start_on(&state, "127.0.0.1:0", &["--config", cfg.to_str().unwrap()]).unwrap();
    let listen = coordinator.url.trim_start_matches("http://").to_string();
    let mut agents = Vec::new();
    for i in 0..2 {
        let host = Host::new(&dir.path().join(format!("host{i}")));
        agents.push((
            host.start_agent(&format!("agent{i}"), &coordinator.url, Some(&sk), 2)
                .unwrap(),
            host,
        ));
    }
    let repo = slow_repo(dir.path(), 8, 3);
    let run = submit_shared(&coordinator.url, &repo, &cache_url, &pk);
    // A watcher that must live through the restart.
    let watcher = watch_json(&coordinator.url, &run);
    // Some builds done, others running: then kill -9.
    wait_for(Duration::from_secs(120), "two finished builds", || {
        let n: i64 = attempts(
            &coordinator.db(),
            &run,
            "kind = 'build' AND outcome = 'built'",
        )?;
        (n >= 2).then_some(())
    });
    let done_before: Vec<String> = {
        let db = coordinator.db();
        let mut st = db
            .prepare("SELECT target FROM attempts WHERE run_id = ?1 AND kind = 'build' AND outcome = 'built'")
            .unwrap();
        st.query_map([&run], |r| r.get(0))
            .unwrap()
            .map(|r| r.unwrap())
            .collect()
    };
    coordinator.proc.kill();
    std::thread::sleep(Duration::from_secs(2));
    let coordinator =
        Coordinator::start_on(&state, &listen, &["--config", cfg.to_str().unwrap()]).unwrap();
    let out = watcher.wait_with_output().unwrap();
    let report: serde_json::Value = serde_json::from_str(&String::from_utf8_lossy(&out.stdout))
        .unwrap_or_else(|e| {
            panic!(
                "watch did not end with a report ({e}): {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert_eq!(report["state"], "finished");
    assert_eq!(
        report["summary"]["ready"], 9,
        "every package ready: {report}"
    );
    let per_drv = builds_per_drv(&coordinator.db(), &run);
    assert_eq!(per_drv.len(), 9);
    for d in &done_before {
        assert_eq!(
            per_drv[d].0, 1,
            "{d} finished before the kill and was not built again"
        );
    }
    // Builds running at the kill were reattached, not started again: each builder ran once.
    // (An assignment still on the wire at the kill never reached the agent; it is requeued
    // as lost, which is no second build.)
    let ran = builds_ran(dir.path());
    assert_eq!(ran.len(), 9, "{ran:?}");
    assert!(
        ran.values().all(|n| *n == 1),
        "each build ran once: {ran:?}"
    );
    for (d, (tries, built)) in &per_drv {
        assert_eq!(*built, 1, "{d}: one successful build");
        let lost_unreceived = attempts(
            &coordinator.db(),
            &run,
            &format!(
                "target = '{d}' AND state = 'lost' AND outcome = 'the agent reconnected without it'"
            ),
        )
        .unwrap();
        if *tries != 1 + lost_unreceived {
            let db = coordinator.db();
            let mut st = db
                .prepare("SELECT id, agent, state, outcome FROM attempts WHERE target = ?1")
                .unwrap();
            let rows: Vec<(String, String, String, String)> = st
                .query_map([d], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                .unwrap()
                .map(|r| r.unwrap())
                .collect();
            panic!(
                "{d}: builds running at the kill reattached, not restarted: {rows:?}\n{}",
                coordinator.proc.log_text()
            );
        }
    }
    // The watcher saw each build finish exactly once, across the restart.
    let log = String::from_utf8_lossy(&out.stderr);
    for i in 0..8 {
        let name = format!("built leaf-{i} ");
        assert_eq!(log.matches(&name).count(), 1, "'{name}' once in:\n{log}");
    }
    drop(agents);
}

#[test]
fn kill_9_of_an_agent_mid_build_requeues_its_jobs_after_the_lease() {
    let dir = scratch();
    let cfg = config(dir.path(), 4);
    let metrics = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let coordinator = Coordinator::start_on(
        &dir.path().join("coordinator"),
        "127.0.0.1:0",
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--metrics-listen",
            &metrics,
        ],
    )
    .unwrap();
    let (cache_url, sk, pk) = cache(dir.path());
    let hosts: Vec<Host> = (0..2)
        .map(|i| Host::new(&dir.path().join(format!("host{i}"))))
        .collect();
    let mut victim = hosts[0]
        .start_agent("victim", &coordinator.url, Some(&sk), 2)
        .unwrap();
    let _survivor = hosts[1]
        .start_agent("survivor", &coordinator.url, Some(&sk), 2)
        .unwrap();
    wait_for(Duration::from_secs(30), "agents", || {
        (stdout(&cli(&coordinator.url, &["agents"]))
            .matches(" yes ")
            .count()
            >= 2)
            .then_some(())
    });
    let repo = slow_repo(dir.path(), 6, 4);
    let run = submit_shared(&coordinator.url, &repo, &cache_url, &pk);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    wait_for(Duration::from_secs(61), "the victim to be building", || {
        if std::time::Instant::now() > deadline {
            panic!(
                "the victim never built: {}\n{}\n{}",
                stdout(&cli(&coordinator.url, &["report", &run])),
                stdout(&cli(&coordinator.url, &["agents"])),
                coordinator.proc.log_text()
            );
        }
        let n: i64 = attempts(
            &coordinator.db(),
            &run,
            "kind = 'build' AND agent = 'victim' AND state = 'running'",
        )?;
        (n >= 1).then_some(())
    });
    victim.kill();
    let report = wait_for_state(&coordinator.url, &run, "finished", Duration::from_secs(120));
    assert_eq!(report["summary"]["ready"], 7, "{report}");
    let names: Vec<&str> = report["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["attr"].as_str().unwrap())
        .collect();
    let mut unique = names.clone();
    unique.dedup();
    assert_eq!(names, unique, "each package reported once");
    let per_drv = builds_per_drv(&coordinator.db(), &run);
    for (d, (_, built)) in &per_drv {
        assert_eq!(*built, 1, "{d}: exactly one successful build counted");
    }
    let lost: i64 = attempts(
        &coordinator.db(),
        &run,
        "agent = 'victim' AND state = 'lost'",
    )
    .unwrap();
    assert!(
        lost >= 1,
        "the victim's running attempts were given up, not reported"
    );
    // The same figures on /metrics, as Prometheus scrapes them.
    let text = http_get(&metrics, "/metrics");
    assert!(text.contains("nixfarm_agents_connected 1"), "{text}");
    assert!(
        text.contains("nixfarm_builds_total{outcome=\"built\"} 7"),
        "{text}"
    );
    assert!(
        text.contains(&format!("nixfarm_attempts_lost_total {lost}")),
        "{text}"
    );
    assert!(text.contains("nixfarm_jobs{state=\"queued\"} 0"), "{text}");
    // Prometheus's own linter accepts the exposition (names, types, HELP, units).
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let mut lint = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (scripts/setup installs Debian's prometheus)");
    std::io::Write::write_all(&mut lint.stdin.take().unwrap(), body.as_bytes()).unwrap();
    let lint = lint.wait_with_output().unwrap();
    assert!(
        lint.status.success() && lint.stdout.is_empty() && lint.stderr.is_empty(),
        "promtool: {}{}\n{body}",
        stdout(&lint),
        stderr(&lint)
    );
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(
        out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200"),
        "{out}"
    );
    out
}

#[test]
fn a_corrupt_database_stops_the_coordinator_with_a_clear_error_and_is_left_untouched() {
    let dir = scratch();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let garbage: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 13) as u8).collect();
    std::fs::write(state.join("coordinator.sqlite"), &garbage).unwrap();
    let out = Command::new(bin("nixfarm-coordinator"))
        .args(["--listen", "127.0.0.1:0", "--state-dir"])
        .arg(&state)
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("cannot open database"), "{err}");
    assert!(err.contains("not a database"), "{err}");
    assert_eq!(
        std::fs::read(state.join("coordinator.sqlite")).unwrap(),
        garbage
    );
}

#[test]
fn a_waiting_job_says_why_it_waits() {
    let dir = scratch();
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).unwrap();
    let host = Host::new(&dir.path().join("host"));
    let _agent = host
        .start_agent("plain", &coordinator.url, None, 1)
        .unwrap();
    let repo = dir.path().join("gpu");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(
        repo.join("flake.nix"),
        r#"{ outputs = { self }: let
      mk = name: extra: derivation ({ inherit name; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "echo > $out" ]; } // extra);
      trainer = mk "trainer" { requiredSystemFeatures = [ "gpu" ]; };
    in { packages.x86_64-linux = { inherit trainer; app = mk "app" { dep = trainer; }; }; }; }"#,
    )
    .unwrap();
    let out = cli(&coordinator.url, &["submit", repo.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let run = stdout(&out).trim().to_string();
    let report: serde_json::Value =
        wait_for(Duration::from_secs(60), "a report with reasons", || {
            let r: serde_json::Value = serde_json::from_str(&stdout(&cli(
                &coordinator.url,
                &["report", &run, "--format", "json"],
            )))
            .ok()?;
            let p = packages_by_attr(&r);
            (p.get("trainer")?["reason"] != "" && p["trainer"]["reason"] != "evaluating")
                .then_some(r)
        });
    let p = packages_by_attr(&report);
    assert_eq!(p["trainer"]["status"], "pending");
    assert_eq!(
        p["trainer"]["reason"],
        "no connected agent builds x86_64-linux with gpu"
    );
    let app = p["app"]["reason"].as_str().unwrap();
    assert!(
        app.starts_with("waiting on 1 dependencies") && app.contains("trainer: no connected agent"),
        "{app}"
    );
    // The farm's view says the same, for every waiting job.
    let agents = stdout(&cli(&coordinator.url, &["agents"]));
    let waiting = agents
        .split_once("waiting jobs:")
        .map(|(_, w)| w)
        .unwrap_or_else(|| panic!("no waiting jobs in:\n{agents}"));
    assert!(
        waiting.contains("1  no connected agent builds x86_64-linux with gpu (e.g. trainer)"),
        "{agents}"
    );
    assert!(
        waiting.contains("1  waiting on dependencies (e.g. app)"),
        "{agents}"
    );
}

#[test]
fn sigterm_drains_an_agent_its_running_build_finishes_and_is_reported() {
    let dir = scratch();
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).unwrap();
    let (cache_url, sk, pk) = cache(dir.path());
    let first = Host::new(&dir.path().join("first"));
    let mut draining = first
        .start_agent("draining", &coordinator.url, Some(&sk), 1)
        .unwrap();
    let repo = slow_repo(dir.path(), 2, 3);
    let run = submit_shared(&coordinator.url, &repo, &cache_url, &pk);
    let building: String = wait_for(Duration::from_secs(60), "a build on the agent", || {
        coordinator
            .db()
            .query_row(
                "SELECT target FROM attempts WHERE run_id = ?1 AND kind = 'build' AND state = 'running'",
                [&run],
                |r| r.get(0),
            )
            .ok()
    });
    let pid = draining.child.id().to_string();
    // The agent runs under `unshare … sh -c exec`, so the pid is the agent itself.
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = draining.child.wait().unwrap();
    assert!(
        status.success(),
        "a drained agent exits cleanly: {status:?}"
    );
    let db = coordinator.db();
    let outcome: String = db
        .query_row(
            "SELECT outcome FROM attempts WHERE run_id = ?1 AND target = ?2",
            [&run, &building],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        outcome, "built",
        "the running build finished and was reported"
    );
    let started: i64 = attempts(
        &db,
        &run,
        "kind = 'build' AND agent = 'draining' AND outcome != 'cancelled'",
    )
    .unwrap();
    // (A job sent in the instant before the coordinator heard of the drain is handed back
    // unstarted, as `cancelled`, and requeued.)
    assert_eq!(started, 1, "no new job ran after SIGTERM");
    // Another agent finishes the run without rebuilding what the drained one built.
    let second = Host::new(&dir.path().join("second"));
    let _next = second
        .start_agent("next", &coordinator.url, Some(&sk), 2)
        .unwrap();
    let report = wait_for_state(&coordinator.url, &run, "finished", Duration::from_secs(90));
    assert_eq!(report["summary"]["ready"], 3, "{report}");
    let rebuilt: i64 = coordinator
        .db()
        .query_row(
            "SELECT count(*) FROM attempts WHERE run_id = ?1 AND target = ?2",
            [&run, &building],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(rebuilt, 1);
}

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

/// An agent "tiny" whose store is a 48 MiB file system.
fn tiny_agent(dir: &std::path::Path, url: &str, sk: &std::path::Path) -> (Host, Proc) {
    let tiny = Host::with_small_disk(&dir.join("tiny"), 48);
    let agent = tiny
        .start_agent_with("tiny", url, Some(sk), 2, &[], &["--min-free-mib", "4"])
        .unwrap();
    (tiny, agent)
}

#[test]
fn an_agent_whose_disk_fills_up_hands_the_build_on_and_takes_no_more_work() {
    let dir = scratch();
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).unwrap();
    let (cache_url, sk, pk) = cache(dir.path());
    // 48 MiB of store, and a package that writes 64 MiB.
    let _tiny = tiny_agent(dir.path(), &coordinator.url, &sk);
    let repo = dir.path().join("big");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(
        repo.join("flake.nix"),
        r#"{ outputs = { self }: let
      mk = name: script: derivation { inherit name; system = "x86_64-linux"; builder = "/bin/sh";
        PATH = "/usr/bin:/bin"; args = [ "-c" script ]; };
    in { packages.x86_64-linux = {
      big = mk "big" "head -c 67108864 /dev/zero > $out";
      small = mk "small" "echo small > $out";
    }; }; }"#,
    )
    .unwrap();
    let run = submit_shared(&coordinator.url, &repo, &cache_url, &pk);
    let watcher = watch_json(&coordinator.url, &run);
    // The build fails for want of space, and the agent stops taking work.
    wait_for(Duration::from_secs(90), "the disk to fill up", || {
        let n: i64 = attempts(
            &coordinator.db(),
            &run,
            "agent = 'tiny' AND outcome = 'infra-failed'",
        )?;
        (n >= 1).then_some(())
    });
    let agents = stdout(&cli(&coordinator.url, &["agents"]));
    assert!(agents.contains("yes (paused)"), "{agents}");
    assert!(
        agents.contains("tiny: a job ran out of disk space in /nix/store; no new jobs for"),
        "{agents}"
    );
    let report: serde_json::Value = serde_json::from_str(&stdout(&cli(
        &coordinator.url,
        &["report", &run, "--format", "json"],
    )))
    .unwrap();
    let p = packages_by_attr(&report);
    assert_eq!(p["big"]["status"], "pending", "{report}");
    assert!(
        p["big"]["reason"]
            .as_str()
            .unwrap()
            .starts_with("queued: all 1 agent(s) that build x86_64-linux are paused (tiny: a job ran out of disk space"),
        "{report}"
    );
    // An agent with room takes it over; the full one is not sent it again.
    let roomy = Host::new(&dir.path().join("roomy"));
    let _roomy = roomy
        .start_agent("roomy", &coordinator.url, Some(&sk), 2)
        .unwrap();
    let out = watcher.wait_with_output().unwrap();
    let report: serde_json::Value =
        serde_json::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
    let p = packages_by_attr(&report);
    assert_eq!(p["big"]["status"], "ready", "{report}");
    assert_eq!(p["big"]["agent"], "roomy");
    assert_eq!(p["small"]["status"], "ready", "{report}");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("retrying big: agent tiny ran out of disk space:")
            && log.contains("No space left on device"),
        "what the user sees: {log}"
    );
    let tiny_big: i64 = attempts(
        &coordinator.db(),
        &run,
        "agent = 'tiny' AND target LIKE '%-big.drv'",
    )
    .unwrap();
    assert_eq!(tiny_big, 1, "the full agent was not given the build again");
}

#[test]
fn an_agent_whose_disk_fills_up_while_evaluating_hands_the_evaluation_on() {
    let dir = scratch();
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).unwrap();
    let (cache_url, sk, pk) = cache(dir.path());
    let _tiny = tiny_agent(dir.path(), &coordinator.url, &sk);
    // Evaluating the flake copies it into the store: 64 MiB do not fit.
    let repo = dir.path().join("heavy");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(repo.join("data.bin"), vec![0u8; 64 << 20]).unwrap();
    std::fs::write(
        repo.join("flake.nix"),
        r#"{ outputs = { self }: { packages.x86_64-linux.app = derivation { name = "app";
      system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "echo app > $out" ]; }; }; }"#,
    )
    .unwrap();
    let run = submit_shared(&coordinator.url, &repo, &cache_url, &pk);
    wait_for(
        Duration::from_secs(90),
        "the evaluation to fill the disk",
        || {
            stdout(&cli(&coordinator.url, &["agents"]))
                .contains("tiny: a job ran out of disk space")
                .then_some(())
        },
    );
    let roomy = Host::new(&dir.path().join("roomy"));
    let _roomy = roomy
        .start_agent("roomy", &coordinator.url, Some(&sk), 2)
        .unwrap();
    let report = wait_for_state(&coordinator.url, &run, "finished", Duration::from_secs(90));
    let p = packages_by_attr(&report);
    assert_eq!(p["app"]["status"], "ready", "{report}");
    assert_eq!(p["app"]["agent"], "roomy");
    let lost_evals = attempts(
        &coordinator.db(),
        &run,
        "agent = 'tiny' AND kind != 'build' AND outcome LIKE '%No space left on device%'",
    )
    .unwrap();
    assert!(
        lost_evals >= 1,
        "the full agent's evaluation failed for want of space"
    );
}
