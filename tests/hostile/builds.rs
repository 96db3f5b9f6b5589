//! Hostile builds: with `cross_check_builds`, what one agent built counts only once another
//! agent, on a store of its own, built it again and got the bytes the cache holds. An agent
//! that pushes something else is caught, and so is a build that is not reproducible.

use super::*;

const CHECKED: &str =
    "[scheduler]\ncross_check_builds = true\nlease_secs = 4\nheartbeat_secs = 1\n";

/// A flake of `names` packages, each `builtins.derivation` running `script` (with `$name`);
/// its listing first burns about a second of evaluation.
fn packages(dir: &Path, packages: &[(&str, &str)]) -> PathBuf {
    let repo = dir.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let body: String = packages
        .iter()
        .map(|(name, script)| {
            format!(
                r#"      {name} = derivation {{ name = "{name}"; system = "x86_64-linux"; builder = "/bin/sh";
        PATH = "/usr/bin:/bin"; args = [ "-c" "{script}" ]; }};
"#
            )
        })
        .collect();
    std::fs::write(
        repo.join("flake.nix"),
        format!(
            r#"{{ outputs = {{ self }}: let
      slow = builtins.foldl' (a: b: a + b) 0 (builtins.genList (x: x) 3000000);
    in {{ packages.x86_64-linux = if slow > 0 then {{
{body}    }} else {{ }}; }}; }}"#
        ),
    )
    .unwrap();
    repo
}

fn submit(url: &str, repo: &Path) -> String {
    let out = cli(url, &["submit", repo.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out).trim().to_string()
}

/// (who built, who checked) each derivation of `run`, from the coordinator's attempts.
fn builders_and_checkers(c: &Coordinator, run: &str) -> Vec<(String, String, String)> {
    let db = rusqlite::Connection::open(c.state_dir.join("coordinator.sqlite")).unwrap();
    let mut st = db
        .prepare(
            "SELECT b.target, b.agent, k.agent FROM attempts b JOIN attempts k ON k.run_id = b.run_id AND k.target = b.target
             WHERE b.run_id = ?1 AND b.kind = 'build' AND b.state = 'done' AND k.kind = 'check' AND k.state = 'done' ORDER BY b.target",
        )
        .unwrap();
    st.query_map([run], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Two real agents, each with a store of its own, check each other's builds through the
/// farm cache: a deterministic package is ready once both built the same; one that writes
/// the time into its output is `not-reproducible`, naming both agents. `watch` tells it.
#[test]
fn agents_check_each_others_builds_and_a_build_that_differs_is_not_reproducible() {
    let dir = scratch();
    let coordinator = Coordinator::start_with_config(dir.path(), CHECKED).unwrap();
    let url = coordinator.url.clone();
    let repo = packages(
        dir.path(),
        &[
            ("stable", "echo stable > $out"),
            ("stamp", "date +%s%N > $out"),
        ],
    );
    let (h1, h2) = (
        Host::new(&dir.path().join("h1")),
        Host::new(&dir.path().join("h2")),
    );
    let a1 = h1.start_agent("one", &url, None, 1).unwrap();
    let a2 = h2.start_agent("two", &url, None, 1).unwrap();
    let run = submit(&url, &repo);
    let r = wait_terminal(&url, &run, Duration::from_secs(120));
    drop((a1, a2));
    assert_eq!(r["state"], "finished", "{r}");
    let by = packages_by_attr(&r);
    assert_eq!(by["stable"]["status"], "ready", "{r}");
    assert_eq!(by["stamp"]["status"], "not-reproducible", "{r}");
    let reason = by["stamp"]["reason"].as_str().unwrap();
    assert!(
        (reason.starts_with("one and two built different outputs")
            || reason.starts_with("two and one built different outputs"))
            && reason.contains("may not be deterministic"),
        "{reason}"
    );
    // Each was built by one agent and checked by the other.
    let pairs = builders_and_checkers(&coordinator, &run);
    assert_eq!(pairs.len(), 2, "{pairs:?}");
    for (drv, built, checked) in &pairs {
        assert_ne!(built, checked, "{drv}");
    }
    let watched = cli(&url, &["watch", &run]);
    let text = format!("{}{}", stdout(&watched), stderr(&watched));
    assert!(
        text.contains("waiting for another agent to check it")
            && text.contains("checked stable: built on")
            && text.contains("not-reproducible: stamp on"),
        "{text}"
    );
}

/// The output path a derivation in `host`'s store names first (`out`).
fn first_output(host_root: &Path, drv: &str) -> String {
    let text = std::fs::read_to_string(host_root.join(drv.trim_start_matches('/'))).unwrap();
    let start = text.find("\"/nix/store/").unwrap() + 1;
    let len = text[start..].find('"').unwrap();
    text[start..start + len].to_string()
}

/// A fake agent takes one of two builds and, instead of building, pushes an output of its
/// own making to the farm cache (which signs it, as it signs any agent's push) and says
/// "built". The real agent checks it: fetches that output from the cache, builds the
/// derivation again, and finds it differs. The package is not ready, nothing is built on
/// it, and the real agent's build, which the fake agent checks honestly, is ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_an_agent_forged_is_caught_by_the_check() {
    let dir = scratch();
    let coordinator = Coordinator::start_with_config(dir.path(), CHECKED).unwrap();
    let url = coordinator.url.clone();
    let farm = farm_cache_addr(&coordinator);
    let repo = packages(
        dir.path(),
        &[
            ("left", "echo left > $out"),
            ("right", "echo right > $out"),
            (
                "top",
                "echo top > $out; echo ${self.packages.x86_64-linux.left} >> $out",
            ),
        ],
    );
    let host = Host::new(&dir.path().join("host"));
    let _honest = host.start_agent("b-honest", &url, None, 1).unwrap();
    wait_for(
        Duration::from_secs(30),
        "the real agent to register",
        || {
            let n: i64 = coordinator
                .db()
                .query_row(
                    "SELECT count(*) FROM agents WHERE name = 'b-honest'",
                    [],
                    |r| r.get(0),
                )
                .ok()?;
            (n == 1).then_some(())
        },
    );
    // The real agent lists and evaluates (a second's work); the fake one registers
    // meanwhile, first in dispatch's order, and is handed one of the two builds.
    let run = submit(&url, &repo);
    let mut liar = FakeAgent::register(&url, "a-liar", "x86_64-linux").await;
    let keep_alive = liar.keep_alive();
    let mut forged = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while report_json(&url, &run)["state"] != "finished" && std::time::Instant::now() < deadline {
        let Ok(a) = tokio::time::timeout(Duration::from_secs(1), liar.assignment()).await else {
            continue;
        };
        let Some(pb::assignment::Job::Build(job)) = a.job else {
            panic!("the fake agent was handed {a:?}");
        };
        let out = first_output(&host.root, &job.drv_path);
        if !job.check {
            let (status, body) = upload_nar(&farm, None, &out, &single_file_nar(b"a backdoor\n"));
            assert!(status.contains(" 200 "), "{status} {body}");
            forged.push(job.drv_path.clone());
        }
        // Its own builds "built", and any check of the real agent's builds agreed to.
        liar.send(pb::agent_message::Msg::Build(pb::BuildResult {
            attempt_id: a.attempt_id,
            status: pb::BuildStatus::Built as i32,
            outputs: vec![pb::DrvOutput {
                name: "out".into(),
                path: out,
                ..Default::default()
            }],
            checked: job.check,
            ..Default::default()
        }))
        .await;
    }
    let r = wait_terminal_async(&url, &run).await;
    keep_alive.abort();
    assert!(
        !forged.is_empty(),
        "the fake agent was handed no build: {r}"
    );
    let by = packages_by_attr(&r);
    let lied = |name: &str| forged.iter().any(|d| d.ends_with(&format!("-{name}.drv")));
    // Nobody substitutes what was forged from the farm cache any more.
    for drv in &forged {
        let out = first_output(&host.root, drv);
        let info = format!("/{}.narinfo", &out["/nix/store/".len()..][..32]);
        let got = http_get(&farm, &info, None);
        assert!(got.contains(" 404 "), "{out}: {got}");
    }
    for name in ["left", "right", "top"] {
        let status = &by[name]["status"];
        if lied(name) {
            assert_eq!(status, "not-reproducible", "{name}: {r}");
            let reason = by[name]["reason"].as_str().unwrap();
            assert!(
                reason.starts_with("a-liar and b-honest built different outputs"),
                "{reason}"
            );
        } else if name == "top" && lied("left") {
            assert_eq!(status, "dependency-failed", "{r}");
        } else {
            assert_eq!(status, "ready", "{name}: {r}");
        }
    }
}

/// Two real agents admitted by the same join token are one holder: neither checks the
/// other's build, and once the wait is over the package says why it is not ready.
#[test]
fn two_agents_on_one_join_token_cannot_check_each_other() {
    let dir = scratch();
    let token = dir.path().join("join.token");
    std::fs::write(&token, "join-0123456789abcdef\n").unwrap();
    let config = format!(
        "{CHECKED}cross_check_wait_secs = 10\n[auth]\nagent_token_file = \"{}\"\n",
        token.display()
    );
    let coordinator = Coordinator::start_with_config(dir.path(), &config).unwrap();
    let url = coordinator.url.clone();
    let repo = packages(dir.path(), &[("stable", "echo stable > $out")]);
    let flags = ["--token-file", token.to_str().unwrap()];
    let (h1, h2) = (
        Host::new(&dir.path().join("h1")),
        Host::new(&dir.path().join("h2")),
    );
    let _a1 = h1
        .start_agent_with("one", &url, None, 1, &[], &flags)
        .unwrap();
    let _a2 = h2
        .start_agent_with("two", &url, None, 1, &[], &flags)
        .unwrap();
    let run = submit(&url, &repo);
    let r = wait_terminal(&url, &run, Duration::from_secs(120));
    let by = packages_by_attr(&r);
    assert_eq!(by["stable"]["status"], "infra-failed", "{r}");
    let reason = by["stable"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("no other agent took its check within 10 s")
            && reason.contains("with a credential of its own"),
        "{reason}"
    );
    assert!(builders_and_checkers(&coordinator, &run).is_empty());
}
