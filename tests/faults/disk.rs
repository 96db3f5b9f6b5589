//! An agent whose disk fills up, while building and while evaluating: it hands the work on
//! and takes no more until it has room again.

use super::*;

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
    let repo = sh_flake(
        dir.path(),
        "big",
        r#"      big = mk "big" "head -c 67108864 /dev/zero > $out";
      small = mk "small" "echo small > $out";"#,
    );
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

#[test]
fn a_package_that_only_says_the_machine_failed_pauses_no_agent_and_fails_alone() {
    let dir = scratch();
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).unwrap();
    let (cache_url, sk, pk) = cache(dir.path());
    let roomy = Host::new(&dir.path().join("roomy"));
    let _agent = roomy
        .start_agent("roomy", &coordinator.url, Some(&sk), 2)
        .unwrap();
    // A builder and expressions that print a machine's words, on a host with room to
    // spare and a store that is not busy.
    let repo = sh_flake(
        dir.path(),
        "liar",
        r#"      liar = mk "liar" "echo 'cp: error writing out: No space left on device' >&2; exit 1";
      aborts = abort "writing to file: No space left on device";
      busy = throw "SQLite database '/nix/var/nix/db/db.sqlite' is busy";
      locked = abort "error: database is locked";
      fine = mk "fine" "echo fine > $out";"#,
    );
    let run = submit_shared(&coordinator.url, &repo, &cache_url, &pk);
    // A paused agent would take nothing for 60 s: the run ends well before.
    let report = wait_for_state(&coordinator.url, &run, "finished", Duration::from_secs(50));
    let agents = stdout(&cli(&coordinator.url, &["agents"]));
    assert!(!agents.contains("paused"), "{agents}");
    let p = packages_by_attr(&report);
    assert_eq!(p["fine"]["status"], "ready", "{report}");
    assert_eq!(p["aborts"]["status"], "eval-failed", "{report}");
    // Not retried as an outage until the run fails: the package's own failure.
    assert_eq!(p["busy"]["status"], "eval-failed", "{report}");
    assert!(
        p["busy"]["reason"].as_str().unwrap().contains("is busy"),
        "{report}"
    );
    // Nix's words, where `tryEval` cannot catch them: the package's, for the others
    // evaluate on the same machine.
    assert_eq!(p["locked"]["status"], "eval-failed", "{report}");
    assert!(
        p["locked"]["reason"]
            .as_str()
            .unwrap()
            .contains("database is locked"),
        "{report}"
    );
    assert_eq!(p["liar"]["status"], "infra-failed", "{report}");
    let why = p["liar"]["reason"].as_str().unwrap();
    assert!(
        why.contains("No space left on device")
            && why.contains("MiB free in the store and its temporary directory: not taken as its disk being full"),
        "{why}"
    );
}
