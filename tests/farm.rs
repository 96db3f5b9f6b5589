//! End to end: the coordinator binary, two agents each in its own Nix store, the CLI, real
//! Nix, and the example repository. Outputs travel between agents only through the cache.

use nixfarm_tests::*;
use std::time::Duration;

struct Farm {
    _dir: tempfile::TempDir,
    coordinator: Coordinator,
    hosts: Vec<Host>,
    agents: Vec<Proc>,
    cache_url: String,
    public_key: String,
}

fn farm(agents: usize) -> Farm {
    farm_with(agents, &[])
}

/// A farm whose agents take extra flags.
fn farm_with(agents: usize, flags: &[&str]) -> Farm {
    let dir = scratch();
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).expect("coordinator");
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    set_mode(&cache, 0o755);
    let (sk, pk) = cache_key(dir.path(), "nixfarm-test-1");
    let mut hosts = Vec::new();
    let mut procs = Vec::new();
    for i in 0..agents {
        let host = Host::new(&dir.path().join(format!("host{i}")));
        procs.push(
            host.start_agent_with(
                &format!("agent{i}"),
                &coordinator.url,
                Some(&sk),
                2,
                &[],
                flags,
            )
            .expect("agent"),
        );
        hosts.push(host);
    }
    wait_for(Duration::from_secs(30), "agents to connect", || {
        let out = cli(&coordinator.url, &["agents"]);
        (stdout(&out).matches(" yes ").count() >= agents).then_some(())
    });
    Farm {
        cache_url: format!("file://{}", cache.display()),
        public_key: pk,
        _dir: dir,
        coordinator,
        hosts,
        agents: procs,
    }
}

impl Farm {
    fn submit_json(
        &self,
        source: &str,
        extra: &[&str],
    ) -> (std::process::Output, serde_json::Value) {
        let mut args = vec![
            "submit",
            source,
            "--watch",
            "--format",
            "json",
            "--cache",
            &self.cache_url,
            "--trusted-public-key",
            &self.public_key,
        ];
        args.extend_from_slice(extra);
        let out = cli(&self.coordinator.url, &args);
        let json = serde_json::from_str(&stdout(&out)).unwrap_or_else(|e| {
            panic!(
                "report is not JSON ({e}): stdout={} stderr={}\ncoordinator:\n{}\nagents:\n{}",
                stdout(&out),
                stderr(&out),
                self.coordinator.proc.log_text(),
                self.agents
                    .iter()
                    .map(|a| a.log_text())
                    .collect::<Vec<_>>()
                    .join("\n----\n")
            )
        });
        (out, json)
    }
}

#[test]
fn every_status_matches_the_repository_and_outputs_travel_through_the_cache() {
    let f = farm(2);
    let (_out, report) = f.submit_json(example_repo().to_str().unwrap(), &[]);
    let expected = expected();
    let got = packages_by_attr(&report);
    let exp = expected.as_object().unwrap();
    assert_eq!(
        got.len(),
        exp.len(),
        "every attribute is reported: {:?}",
        got.keys()
    );
    for (attr, e) in exp {
        let p = &got[attr];
        assert_eq!(p["status"], e["status"], "{attr}: {}", p["reason"]);
        if let Some(dep) = e.get("dependency") {
            assert_eq!(
                &p["failed_dependency"], dep,
                "{attr} names the dependency that failed"
            );
            assert!(
                p["reason"]
                    .as_str()
                    .unwrap()
                    .contains(dep.as_str().unwrap())
            );
        }
    }
    // Positions name the repository's own file, as a maintainer opens it.
    let pos = got["pds"]["position"].as_str().unwrap();
    assert!(
        pos.starts_with(&format!("{}pkgs/bluesky-social/pds.nix:", example_prefix()))
            && pos.rsplit(':').next().unwrap().parse::<u32>().is_ok(),
        "position of pds: {pos}"
    );
    // Reasons a user can act on.
    assert!(
        got["jetstream"]["reason"]
            .as_str()
            .unwrap()
            .contains("'main'")
    );
    assert!(
        got["feed-generator"]["reason"]
            .as_str()
            .unwrap()
            .contains("unsupported on this platform")
    );
    assert!(
        got["ozone"]["log_tail"].as_str().unwrap().contains("exit")
            || !got["ozone"]["log_tail"].as_str().unwrap().is_empty()
    );
    // Without --fix-hashes the report still names every mismatch and the edit that fixes it.
    for (attr, e) in exp.iter().filter(|(_, e)| e["status"] == "needs-hash") {
        let p = &got[attr];
        assert!(
            p["hash_mismatches"][0]["got"]
                .as_str()
                .unwrap()
                .starts_with("sha256-"),
            "{attr}"
        );
        let first = &e["fixes"][0];
        let file = format!("{}{}", example_prefix(), first["file"].as_str().unwrap());
        assert!(
            p["hash_fixes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["file"] == file.as_str() && f["new"] == first["new"]),
            "{attr}: {}",
            p["hash_fixes"]
        );
    }
    assert!(
        got["relay"]["reason"]
            .as_str()
            .unwrap()
            .contains("timed out")
    );
    let total = exp.len() as u64;
    let ready = exp.values().filter(|e| e["status"] == "ready").count() as u64;
    assert_eq!(report["summary"]["total"], total);
    assert_eq!(report["summary"]["ready"], ready);

    // Each ready package's outputs are in the store of the agent that built it, and in the
    // cache: a fresh, empty store substitutes them with signatures required.
    let fresh = Host::new(&f._dir.path().join("fresh"));
    for (attr, p) in got.iter().filter(|(_, p)| p["status"] == "ready") {
        let agent = p["agent"].as_str().unwrap();
        let idx: usize = agent.trim_start_matches("agent").parse().unwrap();
        for (_, path) in p["outputs"].as_object().unwrap() {
            let path = path.as_str().unwrap();
            assert!(
                f.hosts[idx].has_path(path),
                "{attr}: {path} is in {agent}'s store"
            );
            let out = fresh.run(&[
                "nix-store",
                "--realise",
                path,
                "--option",
                "substituters",
                &f.cache_url,
                "--option",
                "trusted-public-keys",
                &f.public_key,
                "--option",
                "require-sigs",
                "true",
            ]);
            assert!(
                out.status.success(),
                "{attr}: fresh store substitutes {path}: {}",
                stderr(&out)
            );
        }
    }
    // Work really was spread: both agents built something.
    let db = f.coordinator.db();
    let agents: i64 = db
        .query_row(
            "SELECT count(DISTINCT agent) FROM attempts WHERE kind = 'build'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(agents, 2, "both agents took build jobs");
}

#[test]
fn a_shared_dependency_is_built_exactly_once() {
    let f = farm(2);
    let (_out, report) = f.submit_json(example_repo().to_str().unwrap(), &[]);
    let got = packages_by_attr(&report);
    let lexicons = got["atproto-lexicons"]["drv_path"]
        .as_str()
        .unwrap()
        .to_string();
    let run_id = report["run_id"].as_str().unwrap();
    let db = f.coordinator.db();
    let n: i64 = db
        .query_row(
            "SELECT count(*) FROM attempts WHERE run_id = ?1 AND kind = 'build' AND target = ?2",
            [run_id, &lexicons],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        n, 1,
        "atproto-lexicons (a dependency of six packages) is built once"
    );
    let dup: i64 = db
        .query_row(
            "SELECT count(*) FROM (SELECT target FROM attempts WHERE run_id = ?1 AND kind = 'build' GROUP BY target HAVING count(*) > 1)",
            [run_id],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(dup, 0, "no derivation was built twice");
}

#[test]
fn bad_input_gets_a_clear_error_and_leaves_nothing_half_done() {
    let f = farm(1);
    let check = |args: &[&str], needle: &str| {
        let out = cli(&f.coordinator.url, args);
        assert!(!out.status.success(), "{args:?} must fail");
        let err = stderr(&out);
        assert!(
            err.contains(needle),
            "{args:?}: expected '{needle}' in: {err}"
        );
    };
    check(&["submit", "/no/such/dir"], "no such file or directory");
    let notflake = scratch();
    check(
        &["submit", notflake.path().to_str().unwrap()],
        "is not a flake",
    );
    check(&["submit", "github:only-an-owner"], "not a flake reference");
    check(&["submit", "/etc/hostname"], "is not a directory");
    // Unreadable input, as a user who may not read it (root reads everything).
    let unreadable = scratch();
    let repo = unreadable.path().join("repo");
    copy_tree(&example_repo(), &repo);
    std::fs::write(repo.join("secret.txt"), "x").unwrap();
    set_mode(&repo.join("secret.txt"), 0o600);
    // A copy of the CLI that user can run wherever the checkout lives.
    let cli_copy = unreadable.path().join("nixfarm");
    std::fs::copy(bin("nixfarm"), &cli_copy).unwrap();
    set_mode(&cli_copy, 0o755);
    let as_nobody = |needle: &str| {
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&cli_copy)
            .args(["submit", repo.to_str().unwrap()])
            .env("NIXFARM_COORDINATOR", &f.coordinator.url)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err = stderr(&out);
        assert!(err.contains(needle), "expected '{needle}' in: {err}");
    };
    as_nobody(&format!(
        "cannot read {}/secret.txt: Permission denied",
        repo.display()
    ));
    set_mode(&repo.join("flake.nix"), 0o600);
    as_nobody(&format!("cannot read {}/flake.nix", repo.display()));
    set_mode(&repo, 0o700);
    as_nobody("permission denied");
    check(&["submit", "gopher:whatever"], "unknown type 'gopher'");
    // None of those created a run.
    let runs = stdout(&cli(&f.coordinator.url, &["runs"]));
    assert_eq!(runs.lines().count(), 2, "only the header: {runs}");

    // A missing attribute path: the run fails as a whole, saying why, and builds nothing.
    let out = cli(
        &f.coordinator.url,
        &[
            "submit",
            example_repo().to_str().unwrap(),
            "--attr-path",
            "packages.aarch64-darwin",
            "--watch",
            "--format",
            "json",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("packages.aarch64-darwin"), "{err}");
    assert!(
        err.contains("the flake has no packages.aarch64-darwin"),
        "{err}"
    );
    let db = f.coordinator.db();
    let builds: i64 = db
        .query_row(
            "SELECT count(*) FROM attempts WHERE kind = 'build'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(builds, 0);
    // An unreachable coordinator.
    let out = cli("http://127.0.0.1:9", &["runs"]);
    assert!(
        stderr(&out).contains("cannot reach the coordinator"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn cancel_stops_a_run_and_reports_cancelled() {
    let f = farm(1);
    let dir = scratch();
    let repo = dir.path().join("slow");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(
        repo.join("flake.nix"),
        r#"{ outputs = { self }: let
      mk = name: script: deps: derivation { inherit name; system = "x86_64-linux"; builder = "/bin/sh";
        PATH = "/usr/bin:/bin"; args = [ "-c" script ]; inherit deps; };
      slow = mk "slow" "for i in $(seq 1 120); do echo tick $i; sleep 1; done; echo done > $out" [];
    in { packages.x86_64-linux = { inherit slow; after = mk "after" "echo ${slow} > $out" [ slow ]; }; }; }"#,
    )
    .unwrap();
    let out = cli(
        &f.coordinator.url,
        &[
            "submit",
            repo.to_str().unwrap(),
            "--cache",
            &f.cache_url,
            "--trusted-public-key",
            &f.public_key,
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let run = stdout(&out).trim().to_string();
    wait_for(Duration::from_secs(60), "the slow build to start", || {
        stdout(&cli(&f.coordinator.url, &["agents"]))
            .contains("slow")
            .then_some(())
    });
    let out = cli(&f.coordinator.url, &["cancel", &run]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report = wait_for_state(
        &f.coordinator.url,
        &run,
        "cancelled",
        Duration::from_secs(30),
    );
    let got = packages_by_attr(&report);
    assert_eq!(got["slow"]["status"], "cancelled");
    assert_eq!(got["after"]["status"], "cancelled");
    // Its report is partial: CI's gate fails on it, saying why, in every format.
    for format in ["table", "junit"] {
        let out = cli(&f.coordinator.url, &["report", &run, "--format", format]);
        assert_eq!(out.status.code(), Some(2), "{format}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("was cancelled before it finished"),
            "{}",
            stderr(&out)
        );
    }
    // The agent stopped the build: it is free again soon.
    wait_for(
        Duration::from_secs(30),
        "the agent to stop building",
        || (!stdout(&cli(&f.coordinator.url, &["agents"])).contains("slow")).then_some(()),
    );
}

/// Processes whose command line holds `needle` (and is not this test's own search).
fn processes_with(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) {
            found.push(format!("{}: {cmd}", e.file_name().to_string_lossy()));
        }
    }
    found
}

/// An evaluation that never ends (it imports from a derivation that sleeps) is stopped by
/// a cancel: the agent kills its Nix process instead of holding it, and the slot, for ever.
#[test]
fn cancel_stops_an_evaluation_that_never_ends() {
    let f = farm(1);
    let dir = scratch();
    let repo = dir.path().join("hang");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(
        repo.join("flake.nix"),
        r#"{ outputs = { self }: let
      ifd = derivation { name = "ifd"; system = "x86_64-linux"; builder = "/bin/sh";
        PATH = "/usr/bin:/bin"; args = [ "-c" "sleep 4321; echo '{}' > $out" ]; };
    in { packages.x86_64-linux.hang = import ifd; }; }"#,
    )
    .unwrap();
    let out = cli(&f.coordinator.url, &["submit", repo.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let run = stdout(&out).trim().to_string();
    // The agent's evaluation of the run (its source is unpacked under the run's id).
    let evaluating = || {
        processes_with(&run)
            .into_iter()
            .filter(|p| p.contains(" eval "))
            .collect::<Vec<_>>()
    };
    wait_for(
        Duration::from_secs(60),
        "the evaluation to hang on its import",
        || (!evaluating().is_empty() && !processes_with("sleep 4321").is_empty()).then_some(()),
    );
    let out = cli(&f.coordinator.url, &["cancel", &run]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for_state(
        &f.coordinator.url,
        &run,
        "cancelled",
        Duration::from_secs(30),
    );
    wait_for(
        Duration::from_secs(20),
        "the evaluation to be stopped",
        || evaluating().is_empty().then_some(()),
    );
    // Nix was asked to stop, so it stopped the import's builder too.
    wait_for(
        Duration::from_secs(20),
        "the import's builder to be stopped",
        || processes_with("sleep 4321").is_empty().then_some(()),
    );
}

/// An attribute whose evaluation never ends costs its group the agent's evaluation limit
/// once, and nothing more: the group's process marks each attribute as it starts on it, so
/// the one it was stopped on is known, and with the limit (nearly) to itself it failed as it
/// would alone. None of the others is blamed. (Halving the group cost the limit once per
/// level; evaluating each attribute alone, once more.)
#[test]
fn a_hanging_attribute_costs_the_evaluation_limit_once_and_blames_no_other() {
    let dir = scratch();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(&cfg, "eval_timeout_secs = 10\n").unwrap();
    let f = farm_with(1, &["--config", cfg.to_str().unwrap()]);
    // Each evaluation that reaches `hang` starts its import's builder, which says so.
    let starts = dir.path().join("starts");
    let repo = dir.path().join("hang");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(
        repo.join("flake.nix"),
        format!(
            r#"{{ outputs = {{ self }}: let
      mk = name: derivation {{ inherit name; system = "x86_64-linux"; builder = "/bin/sh";
        args = [ "-c" "echo ok > $out" ]; }};
      ifd = derivation {{ name = "ifd"; system = "x86_64-linux"; builder = "/bin/sh";
        PATH = "/usr/bin:/bin"; args = [ "-c" "echo started >> {}; sleep 4322; echo '{{}}' > $out" ]; }};
    in {{ packages.x86_64-linux = {{ a = mk "a"; b = mk "b"; c = mk "c"; hang = import ifd; }}; }}; }}"#,
            starts.display()
        ),
    )
    .unwrap();
    let (out, report) = f.submit_json(repo.to_str().unwrap(), &[]);
    let got = packages_by_attr(&report);
    for a in ["a", "b", "c"] {
        assert_eq!(got[a]["status"], "ready", "{a}: {}", stderr(&out));
    }
    assert_eq!(got["hang"]["status"], "eval-failed", "{}", got["hang"]);
    // The listing (which evaluates a repository this small itself, unmarked) and the task's
    // group of four: two. Evaluating `hang` alone after took three, halving four.
    let n = std::fs::read_to_string(&starts).unwrap().lines().count();
    assert_eq!(n, 2, "evaluations that reached the hanging attribute");
    let reason = got["hang"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("within the limit of 10 s"), "{reason}");
}

/// The five hash-broken packages of the example: single stage, two stage (source plus
/// npmDepsHash), a stale literal, lib.fakeSha256, and two fake hashes in one file.
#[test]
fn fix_hashes_yields_a_patch_that_makes_every_broken_package_build_with_plain_nix() {
    let f = farm(2);
    let dir = scratch();
    let work = dir.path().join("work");
    copy_tree(&example_repo(), &work);
    let patch = dir.path().join("fix.patch");
    let (out, report) = f.submit_json(
        work.to_str().unwrap(),
        &["--fix-hashes", "--patch-out", patch.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let expected = expected();
    let got = packages_by_attr(&report);
    let mut fixed_files = std::collections::BTreeSet::new();
    for (attr, e) in expected.as_object().unwrap() {
        let p = &got[attr];
        let fixes = p["hash_fixes"].as_array().unwrap();
        match e.get("fixes") {
            Some(want) => {
                assert_eq!(
                    p["status"], "ready",
                    "{attr} builds with its fixes: {}",
                    p["reason"]
                );
                let mut want: Vec<(String, String, u64, String, String)> = want
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|w| {
                        fixed_files.insert(w["file"].as_str().unwrap().to_string());
                        (
                            w["file"].as_str().unwrap().into(),
                            w["attribute"].as_str().unwrap().into(),
                            w["line"].as_u64().unwrap(),
                            w["old"].as_str().unwrap().into(),
                            w["new"].as_str().unwrap().into(),
                        )
                    })
                    .collect();
                let mut have: Vec<(String, String, u64, String, String)> = fixes
                    .iter()
                    .map(|w| {
                        (
                            w["file"].as_str().unwrap().into(),
                            w["attribute"].as_str().unwrap().into(),
                            w["line"].as_u64().unwrap(),
                            w["old"].as_str().unwrap().into(),
                            w["new"].as_str().unwrap().into(),
                        )
                    })
                    .collect();
                want.sort();
                have.sort();
                assert_eq!(have, want, "{attr}: hash_fixes");
            }
            None => {
                assert!(fixes.is_empty(), "{attr} needs no fix: {fixes:?}");
                assert_eq!(p["status"], e["status"], "{attr}: {}", p["reason"]);
            }
        }
    }
    // Every package goes its own way: the first run, then a run per batch of packages whose
    // mismatches became known together; statusphere needs three stages (source hash, the
    // npm bundle built from it, verification), so at least 3 runs and at most the first
    // plus one per broken package plus statusphere's third.
    let runs = report["fix_rounds"].as_array().unwrap();
    assert!((3..=7).contains(&runs.len()), "{runs:?}");
    // ... and without waiting for the first run's end: relay's 3 s of silence ends it, long
    // after every broken package's own mismatches are known, so each package's second stage
    // is launched before relay is reported timed out.
    let err = stderr(&out);
    let relay = err
        .find("timed-out: relay")
        .unwrap_or_else(|| panic!("relay's timeout is reported: {err}"));
    let second: Vec<usize> = err.match_indices(": stage 2 of ").map(|(i, _)| i).collect();
    assert!(!second.is_empty(), "{err}");
    assert!(
        second.iter().all(|i| *i < relay),
        "a second stage waited for the first run to end: {err}"
    );
    assert_eq!(runs[0], report["run_id"], "{runs:?}");
    // Without --apply the checkout is untouched.
    for file in &fixed_files {
        assert_eq!(
            std::fs::read(work.join(file)).unwrap(),
            std::fs::read(example_repo().join(file)).unwrap(),
            "{file} untouched"
        );
    }
    // The patch touches exactly the broken packages' files and applies with both tools.
    let text = std::fs::read_to_string(&patch).unwrap();
    let touched: std::collections::BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("+++ b/"))
        .map(String::from)
        .collect();
    assert_eq!(touched, fixed_files);
    let clean = dir.path().join("clean");
    copy_tree(&example_repo(), &clean);
    let git = std::process::Command::new("git")
        .args(["apply", "--check", "-v"])
        .arg(&patch)
        .current_dir(&clean)
        .output()
        .unwrap();
    assert!(git.status.success(), "git apply --check: {}", stderr(&git));
    let p1 = std::process::Command::new("patch")
        .args(["-p1", "--forward", "-i"])
        .arg(&patch)
        .current_dir(&clean)
        .output()
        .unwrap();
    assert!(p1.status.success(), "patch -p1: {}", stdout(&p1));
    // Plain Nix, on a fresh store that has seen nothing of the farm, builds every fixed package.
    let fresh = Host::new(&dir.path().join("fresh"));
    for attr in expected
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, e)| e.get("fixes").is_some())
        .map(|(a, _)| a)
    {
        let out = fresh.run(&[
            "nix",
            "build",
            "--no-link",
            &format!("path:{}#{attr}", clean.display()),
        ]);
        assert!(out.status.success(), "nix build {attr}: {}", stderr(&out));
    }
}

#[test]
fn apply_writes_the_fixes_into_the_checkout_and_round_limits_are_reported() {
    let f = farm(1);
    let dir = scratch();
    let work = dir.path().join("work");
    copy_tree(&example_repo(), &work);
    let file = "pkgs/bluesky-social/statusphere-example-app.nix";
    // Two rounds cannot verify a two-stage package: the bundle's hash is found in round 2.
    let (out, report) = f.submit_json(
        work.to_str().unwrap(),
        &[
            "--attr",
            "statusphere-example-app",
            "--fix-hashes",
            "--max-rounds",
            "2",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let p = &packages_by_attr(&report)["statusphere-example-app"];
    assert_eq!(report["summary"]["total"], 1, "--attr selects one package");
    assert_eq!(p["status"], "needs-hash");
    assert!(
        p["reason"].as_str().unwrap().contains("not verified"),
        "{}",
        p["reason"]
    );
    assert_eq!(p["hash_fixes"].as_array().unwrap().len(), 2);
    assert_eq!(
        std::fs::read(work.join(file)).unwrap(),
        std::fs::read(example_repo().join(file)).unwrap()
    );
    // --apply edits the checkout in place; only the hash values change.
    let (out, report) = f.submit_json(
        work.to_str().unwrap(),
        &["--attr", "statusphere-example-app", "--apply"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        packages_by_attr(&report)["statusphere-example-app"]["status"],
        "ready"
    );
    let before = std::fs::read_to_string(example_repo().join(file)).unwrap();
    let after = std::fs::read_to_string(work.join(file)).unwrap();
    let fixes = &expected()["statusphere-example-app"]["fixes"];
    let mut want = before.clone();
    for (needle, fix) in [
        ("    hash = lib.fakeHash;", &fixes[0]),
        ("  npmDepsHash = lib.fakeHash;", &fixes[1]),
    ] {
        let attr = fix["attribute"].as_str().unwrap();
        want = want.replacen(
            needle,
            &needle.replace(
                "lib.fakeHash",
                &format!("\"{}\"", fix["new"].as_str().unwrap()),
            ),
            1,
        );
        assert!(after.contains(&format!("{attr} = \"{}\";", fix["new"].as_str().unwrap())));
    }
    assert_eq!(after, want, "byte for byte apart from the two values");
    // A second run of the fixed checkout needs nothing.
    let (_, report) = f.submit_json(
        work.to_str().unwrap(),
        &["--attr", "statusphere-example-app"],
    );
    let p = &packages_by_attr(&report)["statusphere-example-app"];
    assert_eq!(p["status"], "ready");
    assert!(p["hash_fixes"].as_array().unwrap().is_empty());
}
