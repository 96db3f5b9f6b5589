//! An attribute whose evaluation exhausts memory is that attribute's failure: it is isolated
//! like one that throws and ends `eval-failed` (out of memory) while the others build; a
//! listing that exhausts memory fails its run with that reason instead of being retried.

use nixfarm_tests::*;
use std::time::Duration;

fn flake(dir: &std::path::Path, name: &str, body: &str) -> std::path::PathBuf {
    let repo = dir.join(name);
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(
        repo.join("flake.nix"),
        format!("{{ outputs = {{ self }}: {{ packages.x86_64-linux = {body}; }}; }}"),
    )
    .unwrap();
    repo
}

#[test]
fn an_attribute_that_exhausts_memory_fails_alone() {
    let dir = scratch();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[scheduler]\neval_memory_mib = 256\n").unwrap();
    let coordinator = Coordinator::start_on(
        &dir.path().join("coordinator"),
        "127.0.0.1:0",
        &["--config", cfg.to_str().unwrap()],
    )
    .unwrap();
    let host = Host::new(&dir.path().join("host"));
    let _agent = host.start_agent("m1", &coordinator.url, None, 2).unwrap();
    let ok = r#"derivation { name = "ok"; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "echo ok > $out" ]; }"#;
    let repo = flake(
        dir.path(),
        "greedy",
        &format!(
            "{{ big = builtins.length (builtins.genList (i: i) 1000000000); ok = {ok}; also-ok = {ok} // {{ name = \"also\"; }}; }}"
        ),
    );
    let out = cli(
        &coordinator.url,
        &[
            "submit",
            repo.to_str().unwrap(),
            "--watch",
            "--format",
            "json",
        ],
    );
    let report: serde_json::Value =
        serde_json::from_str(&stdout(&out)).unwrap_or_else(|e| panic!("{e}: {}", stderr(&out)));
    assert_eq!(report["state"], "finished", "{report}");
    let p = packages_by_attr(&report);
    assert_eq!(p["big"]["status"], "eval-failed", "{report}");
    assert!(
        p["big"]["reason"]
            .as_str()
            .unwrap()
            .contains("out of memory"),
        "{report}"
    );
    assert_eq!(p["ok"]["status"], "ready", "{report}");
    assert_eq!(p["also-ok"]["status"], "ready", "{report}");

    // The listing itself exhausts memory: the run fails saying so, without retrying for ever.
    let repo = flake(
        dir.path(),
        "huge",
        "builtins.listToAttrs (builtins.genList (i: { name = toString i; value = i; }) 1000000000)",
    );
    let out = cli(&coordinator.url, &["submit", repo.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let run = stdout(&out).trim().to_string();
    let r = wait_for_state(&coordinator.url, &run, "failed", Duration::from_secs(120));
    assert!(
        r["error"].as_str().unwrap().contains("out of memory"),
        "{r}"
    );
}
