//! Readiness that holds up: a fixed-output hash copied from another package (both
//! fixed-output derivations then have one output path, and Nix never fetches the second) is
//! caught by running the copy's fetcher, reported needs-hash with where the hash came from,
//! and fixed like any other; within one run and across runs.

use nixfarm_tests::*;
use sha2::Digest as _;

/// SRI SHA-256 of `text` followed by a newline (what the fixture's fetcher writes).
fn sri(text: &str) -> String {
    let digest = sha2::Sha256::digest(format!("{text}\n").as_bytes());
    format!("sha256-{}", data_encoding::BASE64.encode(&digest))
}

/// Two packages whose sources are fetched from different URLs; beta's source hash was
/// copied from alpha's.
fn copied_hash_repo(dir: &std::path::Path) -> std::path::PathBuf {
    let repo = dir.join("copied");
    std::fs::create_dir_all(repo.join("pkgs")).unwrap();
    std::fs::write(
        repo.join("flake.nix"),
        r#"{
  outputs = { self }: let
    sys = "x86_64-linux";
    fod = { url, text, hash }: derivation {
      name = "source"; system = sys; builder = "/bin/sh"; PATH = "/usr/bin:/bin"; inherit url;
      args = [ "-c" "printf '%s\\n' '${text}' > $out" ];
      outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = hash;
    };
    pkg = args@{ pname, src }: let
      pos = builtins.unsafeGetAttrPos "pname" args;
      d = derivation { name = pname; inherit src; system = sys; builder = "/bin/sh";
        PATH = "/usr/bin:/bin"; args = [ "-c" "cat $src > $out" ]; };
    in d // { inherit pname src; meta.position = "${pos.file}:${toString pos.line}"; };
    call = f: import f { inherit fod pkg; };
  in { packages.${sys} = { alpha = call ./pkgs/alpha.nix; beta = call ./pkgs/beta.nix; }; };
}
"#,
    )
    .unwrap();
    for (name, text) in [("alpha", "alpha source"), ("beta", "beta source")] {
        std::fs::write(
            repo.join(format!("pkgs/{name}.nix")),
            format!(
                "{{ fod, pkg }}:\npkg {{\n  pname = \"{name}\";\n  src = fod {{\n    url = \"https://example.org/{name}.tar.gz\";\n    text = \"{text}\";\n    hash = \"{}\";\n  }};\n}}\n",
                // Both say alpha's hash: beta's was copied.
                sri("alpha source")
            ),
        )
        .unwrap();
    }
    repo
}

fn local(
    host: &Host,
    state: &std::path::Path,
    repo: &std::path::Path,
    extra: &[&str],
) -> serde_json::Value {
    let mut argv = vec![
        bin("nixfarm").display().to_string(),
        "local".into(),
        repo.display().to_string(),
        "--state-dir".into(),
        state.display().to_string(),
        "--format".into(),
        "json".into(),
    ];
    argv.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = host.command(&refs).output().unwrap();
    serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", stdout(&out), stderr(&out)))
}

fn assert_caught(report: &serde_json::Value) {
    let got = packages_by_attr(report);
    assert_eq!(
        got["alpha"]["status"], "ready",
        "{}",
        got["alpha"]["reason"]
    );
    let beta = &got["beta"];
    assert_eq!(beta["status"], "needs-hash", "{beta}");
    let reason = beta["reason"].as_str().unwrap();
    assert!(reason.contains(&sri("beta source")), "{reason}");
    let fixes = beta["hash_fixes"].as_array().unwrap();
    assert_eq!(fixes.len(), 1, "{beta}");
    assert_eq!(fixes[0]["file"], "pkgs/beta.nix");
    assert_eq!(fixes[0]["new"], sri("beta source"));
}

#[test]
fn a_hash_copied_from_a_package_built_in_an_earlier_run_is_caught() {
    let dir = scratch();
    let repo = copied_hash_repo(dir.path());
    let host = Host::new(&dir.path().join("host"));
    let state = dir.path().join("state");
    // An earlier run built alpha: its source is in this host's store.
    let first = local(&host, &state, &repo, &["--attr", "alpha"]);
    assert_eq!(packages_by_attr(&first)["alpha"]["status"], "ready");
    // Now beta: Nix finds its source's output path valid and would build it against alpha's
    // source.
    let report = local(&host, &state, &repo, &[]);
    assert_caught(&report);
    let reason = packages_by_attr(&report)["beta"]["reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(reason.contains("the hash was copied"), "{reason}");
    std::fs::write(
        repo_root().join("target/test-artifacts/copied-hash-report.json"),
        serde_json::to_string_pretty(&report).unwrap(),
    )
    .ok();
}

#[test]
fn a_hash_copied_within_one_run_is_caught_and_fixed() {
    let dir = scratch();
    let repo = copied_hash_repo(dir.path());
    let host = Host::new(&dir.path().join("host"));
    let state = dir.path().join("state");
    let report = local(&host, &state, &repo, &["--max-jobs", "2"]);
    assert_caught(&report);
    // --fix-hashes fills in beta's own hash; the verifying round builds it ready.
    let fixed = local(&host, &state, &repo, &["--fix-hashes", "--apply"]);
    let got = packages_by_attr(&fixed);
    assert_eq!(got["beta"]["status"], "ready", "{}", got["beta"]["reason"]);
    assert_eq!(got["alpha"]["status"], "ready");
    let beta = std::fs::read_to_string(repo.join("pkgs/beta.nix")).unwrap();
    assert!(beta.contains(&sri("beta source")), "{beta}");
}
