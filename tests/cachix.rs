//! End to end with Cachix: two agents, each in its own Nix store, push to the Cachix test
//! server (which answers some requests with 502 and drops some connections after doing the
//! work); the run's only shared store is that cache. Then a fresh, empty store substitutes
//! every ready package from the cache with signatures required, and a warm run uploads nothing.

use nixfarm_tests::cachix_server::{CachixServer, ServerConfig};
use nixfarm_tests::*;
use std::sync::atomic::Ordering;
use std::time::Duration;

const TOKEN: &str = "test-token-0123456789";

/// A self-signed Cachix test cache NAME in `dir`: the server, the public key it publishes
/// (NAME.cachix.org-1:…), and the signing key as CACHIX_SIGNING_KEY takes it.
fn self_signed_cachix(
    dir: &std::path::Path,
    name: &str,
    fail_every: u64,
    drop_every: u64,
    refuse_prefix: Option<String>,
) -> (CachixServer, String, String) {
    let (sk, pk) = cache_key(dir, &format!("{name}.cachix.org-1"));
    let sk_text = std::fs::read_to_string(&sk).unwrap();
    let signing_key = sk_text.trim().split_once(':').unwrap().1.to_string();
    let server = CachixServer::start(ServerConfig {
        name: name.into(),
        token: TOKEN.into(),
        public_key: pk.clone(),
        dir: dir.join("cachix"),
        fail_every,
        drop_every,
        refuse_prefix,
        serves_cache_info: true,
    })
    .unwrap();
    (server, pk, signing_key)
}

/// Whether the Cachix test server in `dir` holds a narinfo for `package`'s output.
fn has_narinfo(dir: &std::path::Path, package: &serde_json::Value) -> bool {
    let out = package["outputs"]["out"].as_str().unwrap();
    let hash = &out["/nix/store/".len()..][..32];
    dir.join(format!("cachix/{hash}.narinfo")).exists()
}

#[test]
fn outputs_reach_cachix_through_faults_once_each_and_real_nix_substitutes_them() {
    let dir = scratch();
    // A self-signed Cachix cache: the agents hold the signing key, the server publishes the
    // public half under NAME.cachix.org-1.
    let name = "nixfarm-e2e";
    let (server, pk, signing_key) = self_signed_cachix(dir.path(), name, 7, 11, None);
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).expect("coordinator");
    // The test server is an API root the agents' operator allows (their token goes nowhere
    // else).
    let api_root = server.api_url();
    let env = [
        ("CACHIX_AUTH_TOKEN", TOKEN),
        ("CACHIX_SIGNING_KEY", signing_key.as_str()),
        ("NIXFARM_CACHIX_API_URL", api_root.as_str()),
        // Nix's daemons say which builds took one started ahead of them.
        ("RUST_LOG", "info,nixfarm_nix::daemon=debug"),
    ];
    let mut agents = Vec::new();
    let mut hosts = Vec::new();
    for i in 0..2 {
        let host = Host::new(&dir.path().join(format!("host{i}")));
        agents.push(
            host.start_agent_with_env(&format!("agent{i}"), &coordinator.url, None, 2, &env)
                .unwrap(),
        );
        hosts.push(host);
    }
    wait_for(Duration::from_secs(30), "agents to connect", || {
        (stdout(&cli(&coordinator.url, &["agents"]))
            .matches(" yes ")
            .count()
            >= 2)
            .then_some(())
    });
    let api = server.api_url();
    let cache = format!("cachix://{name}");
    let run = |cmd: &str| {
        let out = std::process::Command::new(bin("nixfarm"))
            .args([
                cmd,
                example_repo().to_str().unwrap(),
                "--cache",
                &cache,
                "--cachix-api-url",
                &api,
                "--format",
                "json",
            ])
            .args(if cmd == "submit" {
                vec!["--watch"]
            } else {
                vec![]
            })
            .env("NIXFARM_COORDINATOR", &coordinator.url)
            .env("CACHIX_AUTH_TOKEN", TOKEN)
            .output()
            .unwrap();
        let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap_or_else(|e| {
            panic!(
                "{cmd}: not JSON ({e}): {}\n{}",
                stderr(&out),
                agents
                    .iter()
                    .map(|a| a.log_text())
                    .collect::<Vec<_>>()
                    .join("\n---\n")
            )
        });
        // The token is a secret: never in what the user sees.
        assert!(!stderr(&out).contains(TOKEN) && !stdout(&out).contains(TOKEN));
        report
    };
    let report = run("submit");
    let got = packages_by_attr(&report);
    let expected = expected();
    for (attr, e) in expected.as_object().unwrap() {
        assert_eq!(
            got[attr]["status"], e["status"],
            "{attr}: {}",
            got[attr]["reason"]
        );
    }
    // Faults happened, and still nothing was uploaded twice.
    assert!(
        server.counters.faults.load(Ordering::SeqCst) > 0,
        "faults were injected"
    );
    let created = server.counters.created.lock().unwrap().clone();
    assert!(!created.is_empty());
    // Every path is uploaded exactly once, faults or not: outputs by the agent that built
    // them, derivations and sources by one of the agents whose evaluations share them (they
    // claim uploads at the coordinator).
    let twice: Vec<_> = created.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "paths uploaded twice: {twice:?}");
    // Claims on the run's cache; daemons started ahead with the cache's URI and keys, as
    // Cachix told them.
    assert_agents_claimed_and_took_daemons_ahead(&agents);
    eprintln!(
        "cachix: {} paths created, {} faults injected, {} part PUTs",
        created.len(),
        server.counters.faults.load(Ordering::SeqCst),
        server.counters.parts_put.load(Ordering::SeqCst)
    );

    // A fresh, empty store substitutes each ready package's closure from the cache's URI,
    // with signatures required and only the cache's public key trusted.
    let ready: Vec<&serde_json::Value> = got.values().filter(|p| p["status"] == "ready").collect();
    substitute_into_fresh_store(&dir.path().join("fresh"), &ready, &server.uri(name), &pk);

    // Warm again: everything ready is already cached, so nothing is uploaded and none of the
    // ready packages' derivations is built.
    let uploads_before = server.counters.multipart_started.load(Ordering::SeqCst);
    let report = run("warm");
    let got2 = packages_by_attr(&report);
    for attr in got
        .iter()
        .filter(|(_, p)| p["status"] == "ready")
        .map(|(a, _)| a)
    {
        assert_eq!(
            got2[attr]["status"], "ready",
            "{attr}: {}",
            got2[attr]["reason"]
        );
    }
    assert_eq!(
        server.counters.multipart_started.load(Ordering::SeqCst),
        uploads_before,
        "a warm run of an unchanged repository uploads nothing"
    );
    let run_id = report["run_id"].as_str().unwrap();
    let db = coordinator.db();
    for (attr, p) in got.iter().filter(|(_, p)| p["status"] == "ready") {
        let n: i64 = db
            .query_row(
                "SELECT count(*) FROM attempts WHERE run_id = ?1 AND kind = 'build' AND target = ?2",
                [run_id, p["drv_path"].as_str().unwrap()],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 0, "{attr} was built again in the warm run");
    }
}

/// An `http(s)://` cache that accepts PUT, with xz chosen on the URL: the local farm pushes
/// to it, and a fresh store substitutes the result with signatures required.
#[test]
fn an_http_put_cache_with_xz_serves_real_nix() {
    let dir = scratch();
    let (sk, pk) = cache_key(dir.path(), "http-cache-1");
    let server = CachixServer::start(ServerConfig {
        name: "plain".into(),
        token: TOKEN.into(),
        public_key: pk.clone(),
        dir: dir.path().join("cache"),
        fail_every: 0,
        drop_every: 0,
        refuse_prefix: None,
        serves_cache_info: false,
    })
    .unwrap();
    let cache = format!("{}?compression=xz", server.uri("plain"));
    let host = Host::new(&dir.path().join("builder"));
    let state = dir.path().join("state");
    let nixfarm = bin("nixfarm");
    let out = host.run(&[
        nixfarm.to_str().unwrap(),
        "local",
        example_repo().to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
        "--attr",
        "goat",
        "--cache",
        &cache,
        "--signing-key-file",
        sk.to_str().unwrap(),
        "--format",
        "json",
    ]);
    let report: serde_json::Value = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", stderr(&out)));
    let goat = &packages_by_attr(&report)["goat"];
    assert_eq!(goat["status"], "ready", "{}", goat["reason"]);
    let narinfos: Vec<_> = std::fs::read_dir(dir.path().join("cache"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".narinfo"))
        .collect();
    assert!(!narinfos.is_empty());
    // A server that only stores what it is sent gets its nix-cache-info from the pusher.
    let info = std::fs::read_to_string(dir.path().join("cache/nix-cache-info"))
        .expect("nix-cache-info was written to the HTTP cache");
    assert!(info.contains("StoreDir: /nix/store"), "{info}");
    for e in &narinfos {
        let text = std::fs::read_to_string(e.path()).unwrap();
        assert!(
            text.contains("Compression: xz\n") && text.contains(".nar.xz\n"),
            "{text}"
        );
    }
    substitute_into_fresh_store(
        &dir.path().join("fresh"),
        &[goat],
        &server.uri("plain"),
        &pk,
    );
}

/// The main job against Cachix, as a user runs it: `nixfarm local --cache cachix://NAME`
/// (an embedded coordinator and two local agents) leaves every ready package's closure in
/// the cache, where real Nix substitutes it with signatures required. A package whose
/// upload Cachix keeps refusing (403 at `complete`, every time) is `not-cached`, not
/// failed, and no narinfo exists for it. A second run with --skip-cached builds and uploads
/// none of what is cached.
#[test]
fn nixfarm_local_publishes_to_cachix_and_a_refused_push_is_not_cached() {
    let dir = scratch();
    let name = "nixfarm-local";
    let (server, pk, signing_key) =
        self_signed_cachix(dir.path(), name, 0, 0, Some("goat-".into()));
    let host = Host::new(&dir.path().join("builder"));
    let state = dir.path().join("state");
    let nixfarm = bin("nixfarm").display().to_string();
    let api = server.api_url();
    let cache = format!("cachix://{name}");
    let repo = example_repo();
    let local = |extra: &[&str]| -> serde_json::Value {
        let mut argv = vec![
            nixfarm.as_str(),
            "local",
            repo.to_str().unwrap(),
            "--agents",
            "2",
            "--state-dir",
            state.to_str().unwrap(),
            "--cache",
            &cache,
            "--cachix-api-url",
            &api,
            "--format",
            "json",
        ];
        argv.extend_from_slice(extra);
        let out = host
            .command(&argv)
            .env("CACHIX_AUTH_TOKEN", TOKEN)
            .env("CACHIX_SIGNING_KEY", &signing_key)
            .output()
            .unwrap();
        let err = stderr(&out);
        assert!(!err.contains(TOKEN) && !err.contains(&signing_key));
        serde_json::from_str(&stdout(&out)).unwrap_or_else(|e| panic!("not JSON ({e}): {err}"))
    };
    let report = local(&[]);
    let got = packages_by_attr(&report);
    for (attr, e) in expected().as_object().unwrap() {
        let want = if attr == "goat" {
            "not-cached"
        } else {
            e["status"].as_str().unwrap()
        };
        assert_eq!(got[attr]["status"], want, "{attr}: {}", got[attr]["reason"]);
    }
    let reason = got["goat"]["reason"].as_str().unwrap();
    assert!(reason.contains("storage quota exceeded"), "{reason}");
    // Retried from scratch, each refused upload aborted, and no narinfo without its NAR.
    let refused = server.counters.refused.load(Ordering::SeqCst);
    assert!(refused >= 2, "the refused path was started again");
    assert!(server.counters.aborted.load(Ordering::SeqCst) >= refused);
    assert!(
        !has_narinfo(dir.path(), &got["goat"]),
        "no narinfo for the refused path"
    );
    // Real Nix, in an empty store, with signatures required.
    let ready: Vec<&serde_json::Value> = got.values().filter(|p| p["status"] == "ready").collect();
    substitute_into_fresh_store(&dir.path().join("fresh"), &ready, &server.uri(name), &pk);
    // Again, warm: what is cached is neither built nor uploaded.
    let created_before = server.counters.created.lock().unwrap().clone();
    let report = local(&["--skip-cached"]);
    let again = packages_by_attr(&report);
    let db = rusqlite::Connection::open(state.join("coordinator.sqlite")).unwrap();
    for (attr, p) in got.iter().filter(|(_, p)| p["status"] == "ready") {
        assert_eq!(
            again[attr]["status"], "ready",
            "{attr}: {}",
            again[attr]["reason"]
        );
        let builds: i64 = db
            .query_row(
                "SELECT count(*) FROM attempts WHERE run_id = ?1 AND kind = 'build' AND target = ?2",
                [report["run_id"].as_str().unwrap(), p["drv_path"].as_str().unwrap()],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(builds, 0, "{attr} was not built again");
    }
    assert_eq!(again["goat"]["status"], "not-cached");
    assert_eq!(
        *server.counters.created.lock().unwrap(),
        created_before,
        "the second run uploaded nothing new"
    );
    // Warm again with every NAR downloaded back from the cache's URI, as a user would: all
    // whole. Then one damaged in the cache's storage is found, and only that one.
    let verified = packages_by_attr(&local(&["--skip-cached", "--verify-nars"]));
    let mut ready: Vec<&String> = got
        .iter()
        .filter(|(_, p)| p["status"] == "ready")
        .map(|(a, _)| a)
        .collect();
    ready.sort();
    for attr in &ready {
        let p = &verified[attr.as_str()];
        assert_eq!(p["status"], "ready", "{attr}: {}", p["reason"]);
    }
    let victim = ready[0].as_str();
    let out = got[victim]["outputs"]["out"].as_str().unwrap();
    let narinfo = std::fs::read_to_string(dir.path().join(format!(
        "cachix/{}.narinfo",
        &out["/nix/store/".len()..][..32]
    )))
    .unwrap();
    let url = narinfo
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap();
    let nar = dir.path().join("cachix").join(url);
    let mut bytes = std::fs::read(&nar).unwrap();
    let last = bytes.len() - 1;
    bytes[last / 2] ^= 0xff;
    std::fs::write(&nar, bytes).unwrap();
    let damaged = packages_by_attr(&local(&["--skip-cached", "--verify-nars"]));
    for attr in &ready {
        let want = if attr.as_str() == victim {
            "not-cached"
        } else {
            "ready"
        };
        let p = &damaged[attr.as_str()];
        assert_eq!(p["status"], want, "{attr}: {}", p["reason"]);
    }
}

/// Cross-checked builds against Cachix: each of two agents (separate stores) checks the
/// other's builds by fetching them from the farm cache, signatures required, and building
/// them again; nothing reaches Cachix before its check agreed. A deterministic package is
/// ready, pushed to Cachix by its checker, and a fresh store substitutes it from there with
/// signatures required; one that writes the time into its output is `not-reproducible`,
/// and Cachix never saw it.
#[test]
fn agents_check_each_others_builds_through_cachix() {
    check_each_others_builds_through_cachix("", "may not be deterministic");
}

/// The same with the farm cache turned off, so the two hosts share nothing but the
/// coordinator and Cachix: a build's outputs stay in its agent's store and only their NAR
/// hashes travel; the other agent builds the derivation again from scratch, compares, and
/// is the one that uploads.
#[test]
fn agents_check_each_others_builds_through_cachix_without_a_farm_cache() {
    check_each_others_builds_through_cachix(
        "[farm_cache]\nenabled = false\n",
        "on the first build",
    );
}

/// `config` for the coordinator; `how` the stamp's reason says the builds differ.
fn check_each_others_builds_through_cachix(config: &str, how: &str) {
    let dir = scratch();
    let name = "nixfarm-checked";
    let (server, pk, signing_key) = self_signed_cachix(dir.path(), name, 0, 0, None);
    let coordinator = Coordinator::start_with_config(
        &dir.path().join("coordinator"),
        &format!("[scheduler]\ncross_check_builds = true\n{config}"),
    )
    .unwrap();
    // The test server is an API root the agents' operator allows (their token goes nowhere
    // else).
    let api_root = server.api_url();
    let env = [
        ("CACHIX_AUTH_TOKEN", TOKEN),
        ("CACHIX_SIGNING_KEY", signing_key.as_str()),
        ("NIXFARM_CACHIX_API_URL", api_root.as_str()),
    ];
    let (h0, h1) = (
        Host::new(&dir.path().join("host0")),
        Host::new(&dir.path().join("host1")),
    );
    let _a0 = h0
        .start_agent_with_env("one", &coordinator.url, None, 1, &env)
        .unwrap();
    let _a1 = h1
        .start_agent_with_env("two", &coordinator.url, None, 1, &env)
        .unwrap();
    let repo = stable_and_stamp_repo(dir.path());
    let out = std::process::Command::new(bin("nixfarm"))
        .args([
            "submit",
            repo.to_str().unwrap(),
            "--watch",
            "--format",
            "json",
        ])
        .args(["--cache", &format!("cachix://{name}")])
        .args(["--cachix-api-url", &server.api_url()])
        .env("NIXFARM_COORDINATOR", &coordinator.url)
        .env("CACHIX_AUTH_TOKEN", TOKEN)
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", stderr(&out)));
    assert_stamp_differs(&report, how);
    // Only what its check vouched for went to Cachix, once: stable, not stamp.
    let created = server.counters.created.lock().unwrap().clone();
    for (p, uploads) in [("stable", 1), ("stamp", 0)] {
        let n: u32 = created
            .iter()
            .filter(|(k, _)| k.ends_with(&format!("-{p}")))
            .map(|(_, n)| *n)
            .sum();
        assert_eq!(n, uploads, "{p}: {created:?}");
    }
    let got = packages_by_attr(&report);
    assert_eq!(
        got["stable"]["status"], "ready",
        "{}",
        got["stable"]["reason"]
    );
    assert!(
        !has_narinfo(dir.path(), &got["stamp"]),
        "Cachix has no narinfo for the output that failed its check"
    );
    substitute_into_fresh_store(
        &dir.path().join("fresh"),
        &[&got["stable"]],
        &server.uri(name),
        &pk,
    );
    // Each was built by one agent and checked by the other.
    let db = coordinator.db();
    let mut st = db
        .prepare("SELECT kind, agent, target FROM attempts WHERE state = 'done' AND kind IN ('build', 'check') ORDER BY target, kind")
        .unwrap();
    let rows: Vec<(String, String, String)> = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows.len(), 4, "{rows:?}");
    for pair in rows.chunks(2) {
        assert_eq!((pair[0].0.as_str(), pair[1].0.as_str()), ("build", "check"));
        assert_eq!(pair[0].2, pair[1].2);
        assert_ne!(pair[0].1, pair[1].1, "{pair:?}");
    }
}
