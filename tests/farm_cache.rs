//! A farm of hosts that share nothing but the coordinator: two agents, each with its own Nix
//! store, and no `--cache`. Derivations and outputs travel through the coordinator's farm
//! cache, so the bundled example ends with exactly the statuses it has on one machine, and
//! a fresh empty store substitutes every ready output from the farm cache with signatures
//! required. With an agent token configured, the farm cache refuses requests without it.

use nixfarm_tests::*;
use std::time::Duration;

/// One POST of a JSON body; returns the status line and the body.
fn http_post_json(addr: &str, path: &str, auth: Option<&str>, json: &str) -> (String, String) {
    let out = http(addr, "POST", path, auth, Some(json));
    let status = out.lines().next().unwrap_or_default().to_string();
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
    (status, body.unwrap_or_default())
}

#[test]
fn hosts_that_share_nothing_but_the_coordinator_build_the_example() {
    let dir = scratch();
    let state = dir.path().join("coordinator");
    let coordinator = Coordinator::start(&state).unwrap();
    let mut agents = Vec::new();
    let mut hosts = Vec::new();
    for i in 0..2 {
        let host = Host::new(&dir.path().join(format!("host{i}")));
        // Nix's daemons say which builds took one started ahead of them.
        let env = [("RUST_LOG", "info,nixfarm_nix::daemon=debug")];
        agents.push(
            host.start_agent_with_env(&format!("lone{i}"), &coordinator.url, None, 2, &env)
                .unwrap(),
        );
        hosts.push(host);
    }
    let out = cli(
        &coordinator.url,
        &[
            "submit",
            example_repo().to_str().unwrap(),
            "--watch",
            "--format",
            "json",
        ],
    );
    let report: serde_json::Value = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", stderr(&out)));
    let expected = expected();
    let got = packages_by_attr(&report);
    for (attr, e) in expected.as_object().unwrap() {
        let p = &got[attr];
        assert_eq!(p["status"], e["status"], "{attr}: {}", p["reason"]);
    }
    // Work really was spread: both stores built something.
    for (i, h) in hosts.iter().enumerate() {
        let built = std::fs::read_dir(h.root.join("nix/store"))
            .unwrap()
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().ends_with(".drv"))
            .count();
        assert!(built > 0, "host{i} built nothing");
    }
    // A fresh store substitutes every ready output from the farm cache, signatures required.
    let addr = farm_cache_addr(&coordinator);
    let key = std::fs::read_to_string(state.join("farm-cache.key")).unwrap();
    let public = {
        let (name, b64) = key.trim().split_once(':').unwrap();
        let bytes = data_encoding::BASE64.decode(b64.as_bytes()).unwrap();
        format!("{name}:{}", data_encoding::BASE64.encode(&bytes[32..]))
    };
    let ready: Vec<&serde_json::Value> = got.values().filter(|p| p["status"] == "ready").collect();
    assert!(!ready.is_empty());
    substitute_into_fresh_store(
        &dir.path().join("fresh"),
        &ready,
        &format!("http://{addr}"),
        &public,
    );
    // Asked in bulk (one request, as pushers ask), the farm cache has every ready output and
    // lacks only what was never built.
    let never = "0123456789abcdfghijklmnpqrsvwxyz".to_string();
    let mut hashes: Vec<String> = ready
        .iter()
        .flat_map(|p| p["outputs"].as_object().unwrap().values())
        .map(|o| o.as_str().unwrap()[11..43].to_string())
        .collect();
    hashes.push(never.clone());
    let (status, body) = http_post_json(
        &addr,
        "/_nixfarm/missing",
        None,
        &serde_json::to_string(&hashes).unwrap(),
    );
    assert!(status.contains(" 200 "), "{status}");
    let missing: Vec<String> = serde_json::from_str(&body).unwrap();
    assert_eq!(missing, [never]);
    // Derivations travelled too: the farm cache holds .drv files as well as outputs.
    let drvs_in_cache = std::fs::read_dir(state.join("farm-cache"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".narinfo"))
        .filter(|e| {
            std::fs::read_to_string(e.path())
                .unwrap_or_default()
                .lines()
                .any(|l| l.starts_with("StorePath:") && l.ends_with(".drv"))
        })
        .count();
    assert!(
        drvs_in_cache > 0,
        "no derivation went through the farm cache"
    );
    // The coordinator found each claim the attempt's own (its build's outputs and what they
    // depend on; an evaluation's derivations and sources); the daemons started ahead had the
    // farm cache as substituter, with its key.
    assert_agents_claimed_and_took_daemons_ahead(&agents);
    drop(agents);
}

/// A coordinator in `dir` whose agents need `token`.
fn with_agent_token(dir: &std::path::Path, token: &str) -> Coordinator {
    let file = dir.join("agent-token");
    std::fs::write(&file, format!("{token}\n")).unwrap();
    Coordinator::start_with_config(
        dir,
        &format!("[auth]\nagent_token_file = \"{}\"\n", file.display()),
    )
    .unwrap()
}

/// Uploads `content` as the derivation `path` (its NAR uncompressed, then its narinfo):
/// the status line and body of the narinfo's answer.
fn upload_drv(addr: &str, auth: &str, path: &str, content: &str) -> (String, String) {
    upload_nar(addr, Some(auth), path, &single_file_nar(content.as_bytes()))
}

/// The farm cache signs what agents upload, and every agent trusts that signature: a
/// derivation whose content does not give its (text-addressed) path is refused, so no
/// agent can have others build a forged derivation under a real one's name. Nix 2.8's own
/// `nix-instantiate` wrote the genuine one.
#[test]
fn a_forged_derivation_is_refused_and_a_genuine_one_signed() {
    let dir = scratch();
    let coordinator = with_agent_token(dir.path(), "farm-secret-2");
    let addr = farm_cache_addr(&coordinator);
    let auth = "Bearer farm-secret-2";
    let path = "/nix/store/mh3rz2qzm0lrcxk22g2b1kifak7q2nj9-x.drv";
    let info = "/mh3rz2qzm0lrcxk22g2b1kifak7q2nj9.narinfo";
    let genuine = r#"Derive([("out","/nix/store/zr2knphxg8yyy2mkq8akf2hfknjvdiz7-x","","")],[],[],"x86_64-linux","/bin/sh",["-c","echo hi > $out"],[("builder","/bin/sh"),("name","x"),("out","/nix/store/zr2knphxg8yyy2mkq8akf2hfknjvdiz7-x"),("system","x86_64-linux")])"#;
    let forged = genuine.replace("echo hi", "echo pwned");
    let (status, body) = upload_drv(&addr, auth, path, &forged);
    assert!(status.contains(" 400 "), "{status} {body}");
    assert!(body.contains("do not give its store path"), "{body}");
    assert!(http_get(&addr, info, Some(auth)).contains(" 404 "));
    let (status, body) = upload_drv(&addr, auth, path, genuine);
    assert!(status.contains(" 200 "), "{status} {body}");
    let served = http(&addr, "GET", info, Some(auth), None);
    assert!(served.contains("Sig: nixfarm-farm-1:"), "{served}");
}

#[test]
fn the_farm_cache_refuses_requests_without_the_agent_token() {
    let dir = scratch();
    let coordinator = with_agent_token(dir.path(), "farm-secret-1");
    let addr = farm_cache_addr(&coordinator);
    assert!(http_get(&addr, "/nix-cache-info", None).contains(" 401 "));
    assert!(http_get(&addr, "/nix-cache-info", Some("Bearer guess")).contains(" 401 "));
    assert!(http_get(&addr, "/nix-cache-info", Some("Bearer farm-secret-1")).contains(" 200 "));
    // What Nix sends from a netrc file: Basic, the token as the password.
    let basic = format!(
        "Basic {}",
        data_encoding::BASE64.encode(b"nixfarm:farm-secret-1")
    );
    assert!(http_get(&addr, "/nix-cache-info", Some(&basic)).contains(" 200 "));
    assert!(
        http_get(
            &addr,
            "/0123456789abcdfghijklmnpqrsvwxyz.narinfo",
            Some(&basic)
        )
        .contains(" 404 ")
    );
    // The bulk query: the token, store hashes only, at most 4,096 of them.
    let one = r#"["0123456789abcdfghijklmnpqrsvwxyz"]"#;
    let bearer = Some("Bearer farm-secret-1");
    assert!(
        http_post_json(&addr, "/_nixfarm/missing", None, one)
            .0
            .contains(" 401 ")
    );
    let (status, body) = http_post_json(&addr, "/_nixfarm/missing", bearer, one);
    assert!(status.contains(" 200 "), "{status}");
    assert_eq!(body, one);
    let bad = r#"["../../etc/passwd"]"#;
    assert!(
        http_post_json(&addr, "/_nixfarm/missing", bearer, bad)
            .0
            .contains(" 400 ")
    );
    let many = serde_json::to_string(&vec!["0123456789abcdfghijklmnpqrsvwxyz"; 4097]).unwrap();
    assert!(
        http_post_json(&addr, "/_nixfarm/missing", bearer, &many)
            .0
            .contains(" 413 ")
    );
    // Guessing is held back as on the coordinator's other services: after ten wrong
    // tokens from an address, even the right one waits (429, saying how long). Requests
    // with no token at all are no guesses (they would hold back agents sharing the
    // address).
    for _ in 0..20 {
        assert!(http_get(&addr, "/nix-cache-info", None).contains(" 401 "));
    }
    let right = Some("Bearer farm-secret-1");
    assert!(http_get(&addr, "/nix-cache-info", right).contains(" 200 "));
    // One wrong token was sent above.
    for _ in 0..9 {
        http_get(&addr, "/nix-cache-info", Some("Bearer guess"));
    }
    let held = http(&addr, "GET", "/nix-cache-info", right, None);
    assert!(
        held.contains(" 429 ") && held.contains("too many wrong tokens"),
        "{held}"
    );
    assert!(
        held.to_ascii_lowercase().contains("retry-after: "),
        "{held}"
    );
}

#[test]
fn an_agent_joining_mid_run_with_an_empty_store_builds_on_outputs_built_elsewhere() {
    let dir = scratch();
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).unwrap();
    let early = Host::new(&dir.path().join("early"));
    let _a = early
        .start_agent("early", &coordinator.url, None, 2)
        .unwrap();
    // Only an agent offering the "joiner" feature builds the top package.
    let repo = dir.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let ran = dir.path().join("ran");
    std::fs::write(&ran, "").unwrap();
    set_mode(&ran, 0o666);
    std::fs::write(
        repo.join("flake.nix"),
        r#"{ outputs = { self }: let
      mk = name: extra: derivation ({ inherit name; system = "x86_64-linux"; builder = "/bin/sh";
        PATH = "/usr/bin:/bin"; } // extra);
      leaf = i: mk "leaf-${toString i}" { args = [ "-c" "echo $name >> RAN; echo leaf ${toString i} > $out" ]; };
      leaves = builtins.genList leaf 3;
    in { packages.x86_64-linux = {
      leaf-0 = builtins.elemAt leaves 0;
      top = mk "top" { requiredSystemFeatures = [ "joiner" ]; deps = leaves;
        args = [ "-c" "cat $deps > $out" ]; };
    }; }; }"#
            .replace("RAN", ran.to_str().unwrap()),
    )
    .unwrap();
    let out = cli(&coordinator.url, &["submit", repo.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let run = stdout(&out).trim().to_string();
    wait_for(Duration::from_secs(60), "the leaves to be built", || {
        let r: serde_json::Value = serde_json::from_str(&stdout(&cli(
            &coordinator.url,
            &["report", &run, "--format", "json"],
        )))
        .ok()?;
        packages_by_attr(&r)
            .get("leaf-0")
            .is_some_and(|p| p["status"] == "ready")
            .then_some(())
    });
    let late = Host::new(&dir.path().join("late"));
    let cfg = dir.path().join("joiner.toml");
    std::fs::write(&cfg, "features = [\"joiner\"]\n").unwrap();
    let _b = late
        .start_agent_with(
            "late",
            &coordinator.url,
            None,
            1,
            &[],
            &["--config", cfg.to_str().unwrap()],
        )
        .unwrap();
    let r = wait_for_state(&coordinator.url, &run, "finished", Duration::from_secs(120));
    let p = packages_by_attr(&r);
    assert_eq!(p["top"]["status"], "ready", "{}", p["top"]["reason"]);
    assert_eq!(p["top"]["agent"], "late");
    assert_eq!(p["leaf-0"]["agent"], "early");
    // The late host got the leaves from the farm cache: each leaf was built once, early.
    let builds = std::fs::read_to_string(&ran).unwrap();
    assert_eq!(builds.lines().count(), 3, "{builds}");
    let out = p["top"]["outputs"]["out"].as_str().unwrap();
    let text = late.run(&["cat", out]);
    assert_eq!(
        String::from_utf8_lossy(&text.stdout),
        "leaf 0\nleaf 1\nleaf 2\n"
    );
}

/// What the farm cache published stays what it was: a narinfo for a path it already serves
/// with another NAR is refused (dependents and checks already took the first), the same
/// one again is taken; and a NAR is stored only under the hash of its own bytes, so nobody
/// can take an honest upload's name first with other bytes.
#[test]
fn a_published_path_is_never_replaced_and_a_nar_is_taken_only_under_its_hash() {
    use sha2::Digest as _;
    let dir = scratch();
    let coordinator = with_agent_token(dir.path(), "farm-secret-3");
    let addr = farm_cache_addr(&coordinator);
    let auth = "Bearer farm-secret-3";
    let path = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-out";
    let info = "/0123456789abcdfghijklmnpqrsvwxyz.narinfo";
    let first = single_file_nar(b"first");
    let (status, body) = upload_nar(&addr, Some(auth), path, &first);
    assert!(status.contains(" 200 "), "{status} {body}");
    let (status, body) = upload_nar(&addr, Some(auth), path, &first);
    assert!(status.contains(" 200 "), "the same again: {status} {body}");
    let (status, body) = upload_nar(&addr, Some(auth), path, &single_file_nar(b"second"));
    assert!(status.contains(" 409 "), "{status} {body}");
    let served = http(&addr, "GET", info, Some(auth), None);
    let first_hash = nixfarm_nix::hash::nix32_encode(&sha2::Sha256::digest(&first));
    assert!(
        served.contains(&format!("NarHash: sha256:{first_hash}")),
        "{served}"
    );
    // Other bytes under a NAR's name: refused, and the name stays free for the real ones.
    let third = single_file_nar(b"third");
    let name = nixfarm_nix::hash::nix32_encode(&sha2::Sha256::digest(&third));
    let (status, body) = http_put(&addr, &format!("/nar/{name}.nar"), Some(auth), b"garbage");
    assert!(status.contains(" 400 "), "{status} {body}");
    let (status, body) = http_put(&addr, &format!("/nar/{name}.nar"), Some(auth), &third);
    assert!(status.contains(" 200 "), "{status} {body}");
    // A narinfo a crash left cut short is no publication: the next upload replaces it.
    let on_disk = dir
        .path()
        .join("coordinator/farm-cache/0123456789abcdfghijklmnpqrsvwxyz.narinfo");
    std::fs::write(&on_disk, "StorePath: /nix/sto").unwrap();
    let (status, body) = upload_nar(&addr, Some(auth), path, &single_file_nar(b"second"));
    assert!(status.contains(" 200 "), "{status} {body}");
    let served = http(&addr, "GET", info, Some(auth), None);
    let second_hash =
        nixfarm_nix::hash::nix32_encode(&sha2::Sha256::digest(single_file_nar(b"second")));
    assert!(
        served.contains(&format!("NarHash: sha256:{second_hash}")),
        "{served}"
    );
}

/// The farm signs what it publishes, and never replaces it: a narinfo whose NarHash or
/// NarSize is not what its NAR unpacks to (a buggy or dishonest agent's) is refused, so the
/// honest upload of the path is the one published, not a lie every dependent would fail on.
#[test]
fn a_narinfo_that_misstates_its_nar_is_refused_and_the_true_one_published() {
    use sha2::Digest as _;
    let dir = scratch();
    let coordinator = with_agent_token(dir.path(), "farm-secret-4");
    let addr = farm_cache_addr(&coordinator);
    let auth = "Bearer farm-secret-4";
    let path = "/nix/store/1123456789abcdfghijklmnpqrsvwxyz-out";
    let info = "/1123456789abcdfghijklmnpqrsvwxyz.narinfo";
    let nar = single_file_nar(b"the real output");
    let hash = nixfarm_nix::hash::nix32_encode(&sha2::Sha256::digest(&nar));
    let (status, body) = http_put(&addr, &format!("/nar/{hash}.nar"), Some(auth), &nar);
    assert!(status.contains(" 200 "), "{status} {body}");
    let other = nixfarm_nix::hash::nix32_encode(&sha2::Sha256::digest(b"something else"));
    let n = nar.len();
    for (nar_hash, nar_size) in [(other.as_str(), n), (hash.as_str(), n + 1)] {
        let narinfo = format!(
            "StorePath: {path}\nURL: nar/{hash}.nar\nCompression: none\nFileHash: sha256:{hash}\nFileSize: {n}\nNarHash: sha256:{nar_hash}\nNarSize: {nar_size}\nReferences: \n"
        );
        let (status, body) = http_put(&addr, info, Some(auth), narinfo.as_bytes());
        assert!(status.contains(" 400 "), "{status} {body}");
        assert!(
            body.contains("does not unpack to the NarSize and NarHash"),
            "{body}"
        );
        assert!(http_get(&addr, info, Some(auth)).contains(" 404 "));
    }
    let (status, body) = upload_nar(&addr, Some(auth), path, &nar);
    assert!(status.contains(" 200 "), "{status} {body}");
    assert!(http_get(&addr, info, Some(auth)).contains(" 200 "));
}
