//! The agent reads derivation files itself (one Nix process fewer per build and per
//! evaluation chunk); what it reads must be what Nix itself says about the same files. Checked
//! on every derivation of the example repository as real Nix instantiates them: fixed-output
//! sources with hints, second-stage dependency bundles, multi-input packages.

use nixfarm_nix::{Nix, aterm};

#[tokio::test]
async fn derivation_files_read_in_process_match_nix_show_derivation() {
    let repo = nixfarm_tests::example_repo();
    let out = std::process::Command::new("nix")
        .args([
            "--extra-experimental-features",
            "nix-command flakes",
            "eval",
            "--json",
            "--no-eval-cache",
            &format!("path:{}#packages.x86_64-linux", repo.display()),
            "--apply",
            "s: builtins.concatMap (n: let r = builtins.tryEval s.${n}.drvPath; in if r.success then [ r.value ] else []) (builtins.attrNames s)",
        ])
        .env("NIX_CONFIG", "build-users-group = ")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tops: Vec<String> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(tops.len() >= 15, "{tops:?}");
    let nix = Nix::default();
    let ours = aterm::closure(&tops).unwrap();
    let theirs = nix.show_derivations_nix(&tops).await.unwrap();
    assert_eq!(ours.len(), theirs.len());
    assert!(ours.iter().filter(|d| d.fixed_output).count() >= 10);
    for (a, b) in ours.iter().zip(&theirs) {
        assert_eq!(a, b, "{} read differently", a.path);
    }
    // And through the public entry point, which must take the in-process path.
    assert_eq!(nix.show_derivations(&tops).await.unwrap(), theirs);
    for d in &theirs {
        assert_eq!(&nix.derivation(&d.path).await.unwrap(), d);
    }
}

/// A package that throws (or fails an assertion) is caught inside its group's one Nix
/// process: the others come back evaluated, it comes back empty (the agent then evaluates it
/// alone for its message), where the group used to fail as a whole and be bisected.
#[tokio::test]
async fn attributes_that_throw_are_caught_within_a_group() {
    let dir = tempfile::tempdir().unwrap();
    let mk = |n: &str| {
        format!(
            r#"{n} = derivation {{ name = "{n}"; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "echo > $out" ]; }};"#
        )
    };
    std::fs::write(
        dir.path().join("flake.nix"),
        format!(
            "{{ outputs = {{ self }}: {{ packages.x86_64-linux = {{ {} {} thrown = throw \"unsupported on this platform\"; asserted = assert false; {{ }}; broken = (derivation {{ name = \"x\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; }}) // {{ drvPath = throw \"no drv\"; }}; }}; }}; }}",
            mk("good"),
            mk("fine")
        ),
    )
    .unwrap();
    let nix = Nix::default();
    let entry = nixfarm_nix::entry::Entry::Flake(format!("path:{}", dir.path().display()), vec![]);
    let attrs: Vec<String> = ["good", "thrown", "fine", "asserted", "broken"]
        .map(String::from)
        .to_vec();
    let got = nix
        .eval_attrs_caught(&entry, "packages.x86_64-linux", &attrs, 0)
        .await
        .unwrap();
    assert_eq!(got.len(), 5, "{got:?}");
    for ok in ["good", "fine"] {
        let info = got[ok]
            .as_ref()
            .unwrap_or_else(|| panic!("{ok} not evaluated"));
        assert!(info.drv_path.ends_with(&format!("-{ok}.drv")), "{info:?}");
    }
    for caught in ["thrown", "asserted", "broken"] {
        assert!(got[caught].is_none(), "{caught}: {:?}", got[caught]);
    }
    // Alone, the failure keeps its message.
    let alone = nix
        .eval_attrs(&entry, "packages.x86_64-linux", &["thrown".to_string()], 0)
        .await
        .unwrap_err();
    assert!(
        alone.to_string().contains("unsupported on this platform"),
        "{alone}"
    );
}

/// A small repository is listed and evaluated by one Nix process: the names, and each one
/// evaluated as a group would be (what throws comes back empty). A larger one is only listed,
/// and an error `tryEval` cannot catch fails the process (the agent then lists alone).
#[tokio::test]
async fn a_small_repository_is_listed_and_evaluated_in_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let mk = |n: &str| {
        format!(
            r#"{n} = derivation {{ name = "{n}"; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "echo > $out" ]; }};"#
        )
    };
    let flake = |extra: &str| {
        format!(
            "{{ outputs = {{ self }}: {{ packages.x86_64-linux = {{ {} {} thrown = throw \"unsupported on this platform\"; {extra} }}; }}; }}",
            mk("good"),
            mk("fine")
        )
    };
    std::fs::write(dir.path().join("flake.nix"), flake("")).unwrap();
    let nix = Nix::default();
    let entry = nixfarm_nix::entry::Entry::Flake(format!("path:{}", dir.path().display()), vec![]);
    let got = nix
        .list_and_eval(&entry, "packages.x86_64-linux", 3, 0)
        .await
        .unwrap();
    assert_eq!(got.names, ["fine", "good", "thrown"]);
    let evaluated = got.evaluated.expect("3 attributes, up to 3 evaluated");
    for ok in ["good", "fine"] {
        let info = evaluated[ok].as_ref().unwrap_or_else(|| panic!("{ok}"));
        assert!(info.drv_path.ends_with(&format!("-{ok}.drv")), "{info:?}");
        assert!(std::path::Path::new(&info.drv_path).exists());
    }
    assert!(evaluated["thrown"].is_none(), "{evaluated:?}");
    // One more than it may evaluate: listed only.
    let got = nix
        .list_and_eval(&entry, "packages.x86_64-linux", 2, 0)
        .await
        .unwrap();
    assert_eq!(got.names.len(), 3);
    assert!(got.evaluated.is_none());
    // abort is not caught by tryEval: the process fails, the listing alone still works.
    std::fs::write(
        dir.path().join("flake.nix"),
        flake("aborts = abort \"broken beyond tryEval\";"),
    )
    .unwrap();
    let err = nix
        .list_and_eval(&entry, "packages.x86_64-linux", 8, 0)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("broken beyond tryEval"), "{err}");
    let names = nix
        .list_attrs(&entry, "packages.x86_64-linux", 0)
        .await
        .unwrap();
    assert_eq!(names, ["aborts", "fine", "good", "thrown"]);
}
