//! What the first hour with nixfarm meets: logs a machine can read (JSON lines on request,
//! never colour codes in a file), and flags that do not apply refused rather than ignored.

use nixfarm_tests::*;

#[test]
fn logs_are_plain_text_in_files_or_json_lines_on_request() {
    let dir = scratch();
    let text = Coordinator::start(&dir.path().join("text")).unwrap();
    let json = Coordinator::start_on(
        &dir.path().join("json"),
        "127.0.0.1:0",
        &["--log-format", "json"],
    )
    .unwrap();
    let log = wait_for(std::time::Duration::from_secs(10), "the logs", || {
        let t = text.proc.log_text();
        let j = json.proc.log_text();
        (t.contains("coordinator listening") && j.contains("coordinator listening"))
            .then_some((t, j))
    });
    assert!(
        !log.0.contains('\u{1b}'),
        "colour codes in a log file:\n{}",
        log.0
    );
    for line in log.1.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{line}"
        );
    }
}

#[test]
fn local_refuses_flags_meant_for_another_coordinator() {
    for args in [
        vec!["--coordinator", "http://farm:7420", "local", "."],
        vec!["local", ".", "--token", "x"],
        vec!["local", ".", "--tls-ca", "/etc/ca.pem"],
    ] {
        let out = std::process::Command::new(bin("nixfarm"))
            .args(&args)
            .env_remove("NIXFARM_COORDINATOR")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(stderr(&out).contains("does not apply"), "{}", stderr(&out));
    }
    // The environment is not a flag: a user with NIXFARM_COORDINATOR set can still run local
    // (here it stops later, at the missing flake, not at the variable).
    let out = std::process::Command::new(bin("nixfarm"))
        .args(["local", "/definitely/not/here"])
        .env("NIXFARM_COORDINATOR", "http://farm:7420")
        .output()
        .unwrap();
    assert!(!stderr(&out).contains("does not apply"), "{}", stderr(&out));
}
