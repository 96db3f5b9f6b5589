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
