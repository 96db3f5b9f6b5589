//! Faults with real processes: kill -9 of the coordinator mid-run (it resumes from SQLite,
//! agents reconnect, `watch` resumes), kill -9 of an agent mid-build (its jobs are
//! requeued after the lease and the run completes on the other agent), SIGTERM, a corrupt
//! database; an agent's network cut (`faults/network.rs`) and a full disk (`faults/disk.rs`).

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

/// Sends SIGTERM to an agent (it runs under `unshare … sh -c exec`, so the pid is the agent
/// itself).
fn sigterm(agent: &std::process::Child) {
    let pid = agent.id().to_string();
    let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(sent.success());
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
    sigterm(&draining.child);
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

#[path = "faults/network.rs"]
mod network;

#[path = "faults/disk.rs"]
mod disk;

/// An HTTP cache that takes derivations but never answers the upload of a built output's
/// narinfo (a cache stalled mid-push): lookups are answered at once (nothing there), NARs
/// and derivations' narinfos are taken. Returns its address and a flag set once an output's
/// narinfo is being held.
fn stalling_cache() -> (String, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::sync::atomic::{AtomicBool, Ordering};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let holding = std::sync::Arc::new(AtomicBool::new(false));
    let flag = holding.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let flag = flag.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut w = s;
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut len = 0usize;
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                            break;
                        }
                        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0u8; len];
                    if r.read_exact(&mut body).is_err() {
                        return;
                    }
                    let body = String::from_utf8_lossy(&body);
                    let answer = if line.starts_with("GET /nix-cache-info") {
                        "HTTP/1.1 200 OK\r\ncontent-length: 42\r\n\r\nStoreDir: /nix/store\nWantMassQuery: 1\n\n\n\n\n"
                            .to_string()
                    } else if line.starts_with("PUT ")
                        && line.contains(".narinfo")
                        && !body
                            .lines()
                            .any(|l| l.starts_with("StorePath:") && l.ends_with(".drv"))
                    {
                        flag.store(true, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_secs(3600));
                        return;
                    } else if line.starts_with("PUT ") {
                        "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_string()
                    } else {
                        "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_string()
                    };
                    if w.write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (format!("http://{addr}"), holding)
}

/// A run cancelled while its build's outputs are being pushed to a cache that does not
/// answer: the agent stops the push with the job and is free for the next one at once (a
/// request may otherwise take minutes, and be tried again).
#[test]
fn a_cancel_stops_a_push_to_a_cache_that_does_not_answer() {
    let dir = scratch();
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).unwrap();
    let (sk, pk) = cache_key(dir.path(), "stall-1");
    let host = Host::new(&dir.path().join("host"));
    let mut agent = host
        .start_agent("pusher", &coordinator.url, Some(&sk), 1)
        .unwrap();
    let (cache_url, holding) = stalling_cache();
    let repo = dir.path().join("quick");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(
        repo.join("flake.nix"),
        r#"{ outputs = { self }: { packages.x86_64-linux.quick = derivation { name = "quick";
      system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "echo stalled > $out" ]; }; }; }"#,
    )
    .unwrap();
    let run = submit_shared(&coordinator.url, &repo, &cache_url, &pk);
    wait_for(
        Duration::from_secs(60),
        "the output's push to stall",
        || {
            holding
                .load(std::sync::atomic::Ordering::SeqCst)
                .then_some(())
        },
    );
    let out = cli(&coordinator.url, &["cancel", &run]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The agent stopped the push with its job: told to drain, it has nothing to wait for
    // and exits at once (with the push still going it would wait for it, up to its drain
    // timeout).
    wait_for(
        Duration::from_secs(30),
        "the coordinator to end the run",
        || {
            (attempts(
                &coordinator.db(),
                &run,
                "kind = 'build' AND state = 'running'",
            )? == 0)
                .then_some(())
        },
    );
    // What it had claimed to upload is free at once for another pusher (a newer run with
    // the same closure, say), not for the ten minutes a live agent's claim lasts.
    wait_for(
        Duration::from_secs(30),
        "the push's claims to be released",
        || {
            let n: i64 = coordinator
                .db()
                .query_row(
                    "SELECT count(*) FROM upload_claims WHERE agent = 'pusher'",
                    [],
                    |r| r.get(0),
                )
                .ok()?;
            (n == 0).then_some(())
        },
    );
    sigterm(&agent.child);
    let exited = wait_for(Duration::from_secs(30), "the agent to exit", || {
        agent.child.try_wait().unwrap()
    });
    assert!(exited.success(), "{exited:?}");
}
