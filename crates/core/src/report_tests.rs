//! Unit tests of `report.rs`.
use super::*;

fn pkg(attr: &str, status: &str) -> PackageReport {
    PackageReport {
        kind: PackageKind::Package,
        attr: attr.into(),
        status: status.parse().unwrap(),
        reason: format!("because <{attr}> & \"x\""),
        pname: String::new(),
        version: String::new(),
        drv_path: None,
        outputs: BTreeMap::new(),
        pinned: true,
        rev: String::new(),
        position: String::new(),
        duration_ms: 1500,
        agent: "a1".into(),
        failed_dependency: String::new(),
        hash_mismatches: vec![],
        hash_fixes: vec![],
        log_tail: "line1\nline2".into(),
        smoke: Smoke::NotRun,
    }
}

fn report() -> Report {
    Report::new(
        "r1".into(),
        RunState::Finished,
        "repo".into(),
        String::new(),
        vec![
            pkg("b", "build-failed"),
            pkg("a", "ready"),
            pkg("c", "ready"),
        ],
    )
}

#[test]
fn summary_counts_and_percent() {
    let r = report();
    assert_eq!(r.summary.total, 3);
    assert_eq!(r.summary.ready, 2);
    assert_eq!(r.summary.percent, 66.7);
    assert_eq!(r.packages[0].attr, "a");
    assert_eq!(r.summary_line(), "Ready: 2/3 (66.7%); 1 build-failed");
}

/// A CI gate counts packages, not the rounded percentage: one failure in 2501 is below 100,
/// 9 of 19 (47.37%) below 47.38; a gate of 0 passes anything, nothing at all fails any other.
#[test]
fn a_gate_counts_exactly() {
    let summary = |ready: usize, total: usize| {
        let mut p: Vec<PackageReport> =
            (0..ready).map(|i| pkg(&format!("r{i}"), "ready")).collect();
        p.extend((ready..total).map(|i| pkg(&format!("f{i}"), "build-failed")));
        summarize(&p)
    };
    let big = summary(2500, 2501);
    assert_eq!(big.percent, 100.0);
    assert!(big.below(100.0));
    assert!(!big.below(99.9));
    assert!(summary(9, 19).below(47.38));
    assert!(!summary(9, 19).below(47.36));
    assert!(!summary(19, 19).below(100.0));
    assert!(summary(0, 0).below(1.0));
    assert!(!summary(0, 0).below(0.0));
}

#[test]
fn json_has_the_documented_shape() {
    let v: serde_json::Value = serde_json::from_str(&report().to_json()).unwrap();
    assert_eq!(v["summary"]["total"], 3);
    assert_eq!(v["summary"]["ready"], 2);
    assert_eq!(v["packages"][1]["attr"], "b");
    assert_eq!(v["packages"][1]["status"], "build-failed");
    assert!(v["packages"][0]["hash_fixes"].is_array());
    // Every key is always there, empty or not: scripts index without checking.
    let empty = Report::new(
        "r2".into(),
        RunState::Finished,
        String::new(),
        String::new(),
        vec![PackageReport {
            attr: "x".into(),
            ..Default::default()
        }],
    );
    let v: serde_json::Value = serde_json::from_str(&empty.to_json()).unwrap();
    for key in [
        "agent",
        "log_tail",
        "rev",
        "position",
        "pname",
        "version",
        "drv_path",
        "failed_dependency",
        "hash_mismatches",
    ] {
        assert!(v["packages"][0].get(key).is_some(), "{key} is missing");
    }
    assert!(v.get("error").is_some() && v.get("fix_rounds").is_some());
}

#[test]
fn markdown_cells_stay_cells() {
    let mut bad = pkg("a|b", "build-failed");
    bad.reason = "a | b <script>alert(1)</script>\nline two".into();
    let r = Report::new(
        "r".into(),
        RunState::Finished,
        String::new(),
        String::new(),
        vec![bad],
    );
    let md = r.to_markdown();
    let row = md.lines().find(|l| l.contains("build-failed")).unwrap();
    // Three cells, whatever the attribute and the reason hold.
    assert!(row.starts_with("| ") && row.ends_with(" |"), "{row}");
    assert_eq!(row.matches(" | ").count(), 2, "{row}");
    assert!(!md.contains("<script>"), "{md}");
    assert!(row.contains("&lt;script&gt;"), "{row}");
}

#[test]
fn junit_escapes_and_counts_failures() {
    let x = report().to_junit();
    assert!(x.contains("tests=\"3\" failures=\"1\""));
    assert!(x.contains("&lt;b&gt; &amp; &quot;x&quot;"));
    assert_eq!(x.matches("<failure").count(), 1);
    // The repository's checks are test cases too, and counted as such.
    let mut r = report();
    r.repository = vec![
        crate::report::RepoCheck {
            name: "overlays.bad".into(),
            ok: false,
            message: "is not a function".into(),
        },
        crate::report::RepoCheck {
            name: "overlays.good".into(),
            ok: true,
            message: String::new(),
        },
    ];
    let x = r.to_junit();
    assert!(x.contains("tests=\"5\" failures=\"2\""), "{x}");
    assert_eq!(x.matches("<testcase").count(), 5);
    assert_eq!(x.matches("<failure").count(), 2);
}

#[test]
fn junit_names_the_file_and_line() {
    let mut p = pkg("a", "build-failed");
    p.position = "pkgs/a.nix:3".into();
    let mut q = pkg("q", "eval-failed");
    q.position = "/nix/store/x-source/q.nix:1".into();
    let r = Report::new(
        "r".into(),
        RunState::Finished,
        "l".into(),
        String::new(),
        vec![p, q],
    );
    let x = r.to_junit();
    assert!(
        x.contains("name=\"a\" time=\"1.500\" file=\"pkgs/a.nix\" line=\"3\""),
        "{x}"
    );
    assert!(!x.contains("q.nix"), "{x}");
}

#[test]
fn markdown_and_table_list_every_package() {
    let r = report();
    let md = r.to_markdown();
    assert!(md.contains("66.7%"));
    assert!(md.contains("| `b` | ❌ build-failed |"));
    let t = r.to_table();
    for a in ["a", "b", "c"] {
        assert!(t.contains(a));
    }
}

/// What a hostile repository can put in names and logs stays text in every rendering: no
/// escape sequence or workflow command on the terminal, no HTML in Markdown, no character
/// XML cannot hold.
#[test]
fn names_and_logs_from_a_repository_stay_text() {
    let mut r = report();
    r.packages[0].attr = "`<img src=https://t.example/p>".into();
    r.packages[0].log_tail = "a\u{FFFF}b\u{1}c".into();
    // A failed build's log tail, which the Markdown report shows whole.
    r.packages[1].log_tail = "compiling\n\u{1b}]0;owned\u{7}\u{1b}[2Jdone".into();
    r.repository = vec![crate::report::RepoCheck {
        name: "overlays.a\n::stop-commands::x\u{1b}[2J".into(),
        ok: false,
        message: "no".into(),
    }];
    let table = r.to_table_in(crate::TableWidth::Columns(80));
    assert!(!table.contains('\u{1b}'), "{table}");
    assert!(
        !table.lines().any(|l| l.trim_start().starts_with("::")),
        "{table}"
    );
    // A hash fix as a hostile coordinator could report it (its hashes are hashes: a report
    // with others is refused when read).
    r.packages[0].hash_fixes = vec![crate::report::HashFix {
        file: "pkgs/a.nix\n::error::forged".into(),
        attribute: "hash\u{1b}]0;owned\u{7}".into(),
        old: crate::Sri::parse("sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=").unwrap(),
        new: crate::Sri::parse("sha256-61WeR6/hoYwd5GsHVR2+sgD/QcMTsCKiZHJ7o8yKEbQ=").unwrap(),
        line: 3,
        written: "lib.fakeHash\n::error::forged\u{1b}[2J".into(),
    }];
    for t in [
        r.to_table_in(crate::TableWidth::Columns(80)),
        r.to_table_in(crate::TableWidth::Columns(30)),
        r.to_markdown(),
    ] {
        assert!(!t.contains('\u{1b}') && !t.contains('\u{7}'), "{t}");
        assert!(!t.lines().any(|l| l.trim_start().starts_with("::")), "{t}");
    }
    let md = r.to_markdown();
    // The backtick stays (the name is not renamed) and cannot close the span: the fence is
    // longer than any run of them inside.
    assert!(
        md.contains("| `` `<img src=https://t.example/p> `` |"),
        "{md}"
    );
    assert_eq!(crate::report::md_code("back`tick"), "``back`tick``");
    assert_eq!(crate::report::md_code("a``b|c"), "```a``b\\|c```");
    assert!(md.contains("compiling\n ]0;owned  [2Jdone"), "{md}");
    let junit = r.to_junit();
    assert!(
        !junit.contains('\u{FFFF}') && !junit.contains('\u{1}'),
        "{junit}"
    );
}

/// A run that failed or was cancelled is a failure in CI's own formats too: a JUnit test
/// case of its own and a GitHub error annotation, so an empty or partial report is not
/// green.
#[test]
fn a_run_that_did_not_finish_fails_in_ci_formats() {
    for (state, error, want) in [
        (
            crate::RunState::Failed,
            "syntax error, unexpected ';' (at flake.nix:1:55)",
            "the run failed: syntax error, unexpected &apos;;&apos; (at flake.nix:1:55)",
        ),
        (
            crate::RunState::Cancelled,
            "",
            "the run was cancelled before it finished",
        ),
    ] {
        let mut r = report();
        r.state = state;
        r.error = error.into();
        let junit = r.to_junit();
        assert!(
            junit.contains("<testsuites name=\"nixfarm\" tests=\"4\" failures=\"2\">"),
            "{junit}"
        );
        assert!(
            junit.contains(&format!(
                "<failure type=\"{}\" message=\"{want}\"/>",
                state.as_str()
            )),
            "{junit}"
        );
        let github = r.to_github();
        assert!(
            github.contains(&format!(
                "::error title=nixfarm%3A run {}::the run ",
                r.run_id
            )),
            "{github}"
        );
    }
    let finished = report();
    assert!(!finished.to_junit().contains("nixfarm.run"));
    assert!(!finished.to_github().contains("nixfarm%3A run "));
}
