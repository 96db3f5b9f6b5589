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

/// The copied-hash repository with `packages` (Nix bindings) in place of alpha and beta,
/// run with `--fix-hashes --apply`: the report.
fn fix_with_packages(
    dir: &std::path::Path,
    repo: &std::path::Path,
    packages: &str,
) -> serde_json::Value {
    let flake = std::fs::read_to_string(repo.join("flake.nix"))
        .unwrap()
        .replace(
            "alpha = call ./pkgs/alpha.nix; beta = call ./pkgs/beta.nix;",
            packages,
        );
    std::fs::write(repo.join("flake.nix"), flake).unwrap();
    let host = Host::new(&dir.join("host"));
    local(
        &host,
        &dir.join("state"),
        repo,
        &["--fix-hashes", "--apply"],
    )
}

fn local(
    host: &Host,
    state: &std::path::Path,
    repo: &std::path::Path,
    extra: &[&str],
) -> serde_json::Value {
    let out = local_output(host, state, repo, extra);
    serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", stdout(&out), stderr(&out)))
}

/// `nixfarm local REPO --format json` on `host` with its state in `state`: what it printed.
fn local_output(
    host: &Host,
    state: &std::path::Path,
    repo: &std::path::Path,
    extra: &[&str],
) -> std::process::Output {
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
    // A secret in the agents' environment, which no evaluation may read.
    host.command(&refs)
        .env("NIXFARM_TEST_SECRET", "s3cret")
        .output()
        .unwrap()
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
fn with_skip_cached_a_copied_hash_already_in_the_store_is_still_caught() {
    let dir = scratch();
    let repo = copied_hash_repo(dir.path());
    let host = Host::new(&dir.path().join("host"));
    // Both built with plain Nix before nixfarm ever ran: beta against alpha's source, as Nix
    // found that output path valid and never ran beta's fetcher.
    for attr in ["alpha", "beta"] {
        let out = host.run(&[
            "nix",
            "build",
            "--no-link",
            &format!("path:{}#{attr}", repo.display()),
        ]);
        assert!(out.status.success(), "nix build {attr}: {}", stderr(&out));
    }
    // Warm mode skips what the store has, but not a fixed output another derivation produced.
    let report = local(&host, &dir.path().join("state"), &repo, &["--skip-cached"]);
    assert_caught(&report);
}

/// The same across hosts, through a binary cache: plain Nix built both on one host and
/// `nix copy` put them (and the shared source) in a signed file:// cache; a warm run on
/// another, empty host finds beta's source there with alpha's source as its deriver.
#[test]
fn with_skip_cached_a_copied_hash_already_in_the_cache_is_still_caught() {
    let dir = scratch();
    let repo = copied_hash_repo(dir.path());
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    set_mode(&cache, 0o755);
    let (sk, _pk) = cache_key(dir.path(), "copied-1");
    let elsewhere = Host::new(&dir.path().join("elsewhere"));
    let installables: Vec<String> = ["alpha", "beta", "alpha.src", "beta.src"]
        .iter()
        .map(|a| format!("path:{}#{a}", repo.display()))
        .collect();
    // One at a time, alpha first: its source is the output path both sources name.
    for i in &installables {
        let out = elsewhere.run(&["nix", "build", "--no-link", i]);
        assert!(out.status.success(), "nix build {i}: {}", stderr(&out));
    }
    let to = format!("file://{}?secret-key={}", cache.display(), sk.display());
    let mut argv = vec!["nix", "copy", "--to", &to];
    argv.extend(installables.iter().map(String::as_str));
    let out = elsewhere.run(&argv);
    assert!(out.status.success(), "nix copy: {}", stderr(&out));
    assert_caught(&warm_elsewhere(dir.path(), &repo, &cache, &sk));
}

/// A warm run (`--skip-cached`) of `repo` on a new, empty host against the file:// `cache`
/// signed with `sk`: the report.
fn warm_elsewhere(
    dir: &std::path::Path,
    repo: &std::path::Path,
    cache: &std::path::Path,
    sk: &std::path::Path,
) -> serde_json::Value {
    let here = Host::new(&dir.join("here"));
    let cache_url = format!("file://{}", cache.display());
    local(
        &here,
        &dir.join("state-here"),
        repo,
        &[
            "--skip-cached",
            "--cache",
            &cache_url,
            "--signing-key-file",
            sk.to_str().unwrap(),
        ],
    )
}

/// Nothing records which derivation produced alpha's source: the maintainer prefetched it
/// (`nix-store --add-fixed`, as `nix-prefetch-url` does), and a cache it was copied to
/// says no `Deriver`. A build that finds the path valid, and a warm run that finds it in
/// that cache, check its fetcher rather than trust it; beta's copied hash is caught both
/// ways.
#[test]
fn a_copied_hash_whose_output_no_derivation_is_recorded_for_is_caught() {
    let dir = scratch();
    let repo = copied_hash_repo(dir.path());
    let host = Host::new(&dir.path().join("host"));
    let prefetched = dir.path().join("prefetch/source");
    std::fs::create_dir_all(prefetched.parent().unwrap()).unwrap();
    std::fs::write(&prefetched, "alpha source\n").unwrap();
    set_mode(prefetched.parent().unwrap(), 0o755);
    let out = host.run(&[
        "nix-store",
        "--add-fixed",
        "sha256",
        prefetched.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "nix-store --add-fixed: {}",
        stderr(&out)
    );
    let source = stdout(&out).trim().to_string();
    let deriver = host.run(&["nix-store", "--query", "--deriver", &source]);
    assert_eq!(stdout(&deriver).trim(), "unknown-deriver");
    let report = local(&host, &dir.path().join("state"), &repo, &[]);
    assert_caught(&report);

    // The same source in a signed cache that records no deriver; a warm run elsewhere.
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    set_mode(&cache, 0o755);
    let (sk, _pk) = cache_key(dir.path(), "prefetched-1");
    let to = format!("file://{}?secret-key={}", cache.display(), sk.display());
    let out = host.run(&["nix", "copy", "--to", &to, &source]);
    assert!(out.status.success(), "nix copy: {}", stderr(&out));
    let narinfo = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "narinfo"))
        .expect("a narinfo");
    let text = std::fs::read_to_string(&narinfo).unwrap();
    assert!(!text.contains("Deriver:"), "{text}");
    assert_caught(&warm_elsewhere(dir.path(), &repo, &cache, &sk));
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

/// Packages whose programs work, die at start, or have none; one with two programs and
/// meta.mainProgram. The working one checks it runs with an empty HOME and no network.
fn smoke_repo(dir: &std::path::Path) -> std::path::PathBuf {
    let repo = dir.join("smoke");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(
        repo.join("flake.nix"),
        r#"{
  outputs = { self }: let
    sys = "x86_64-linux";
    # A package whose bin/ holds the given scripts (name = body).
    pkg = name: bins: meta: derivation {
      inherit name; system = sys; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
      args = [ "-c" (''mkdir -p $out/share; echo data > $out/share/x;''
        + builtins.concatStringsSep "" (map (b: ''
          mkdir -p $out/bin; printf '#!/bin/sh\n%s\n' '${bins.${b}}' > $out/bin/${b}; chmod +x $out/bin/${b};
        '') (builtins.attrNames bins))) ];
    } // { inherit meta; };
  in { packages.${sys} = {
    good = pkg "good" {
      # Fails unless HOME is empty and only the loopback interface exists.
      good = ''[ -z "$(ls -A "$HOME")" ] || exit 3; [ "$(grep -c : /proc/net/dev)" = 1 ] || exit 4; echo "good 1.0"'';
    } { };
    broken = pkg "broken" {
      broken = ''echo "broken: error while loading shared libraries: libssl.so.3: cannot open shared object file" >&2; exit 127'';
    } { };
    library = pkg "library" { } { };
    tools = pkg "tools" { tools-a = "exit 1"; tools-b = ''echo b 2.0''; } { mainProgram = "tools-b"; };
    misnamed = pkg "misnamed" { real = "echo real"; } { mainProgram = "missing"; };
  }; };
}
"#,
    )
    .unwrap();
    repo
}

#[test]
fn smoke_tests_run_each_main_program_as_a_user_would() {
    let dir = scratch();
    let repo = smoke_repo(dir.path());
    let host = Host::new(&dir.path().join("host"));
    let state = dir.path().join("state");
    let report = local(&host, &state, &repo, &["--smoke"]);
    let got = packages_by_attr(&report);
    assert_eq!(got["good"]["status"], "ready", "{}", got["good"]);
    assert_eq!(got["good"]["smoke"], "passed", "{}", got["good"]);
    assert_eq!(got["tools"]["status"], "ready", "{}", got["tools"]);
    assert_eq!(got["tools"]["smoke"], "passed");
    assert_eq!(got["library"]["status"], "ready");
    assert_eq!(got["library"]["smoke"], "skipped");
    let broken = &got["broken"];
    assert_eq!(broken["status"], "smoke-failed", "{broken}");
    assert_eq!(broken["smoke"], "failed");
    let reason = broken["reason"].as_str().unwrap();
    assert!(
        reason.contains("broken --version` exited 127") && reason.contains("libssl.so.3"),
        "{reason}"
    );
    assert!(broken["log_tail"].as_str().unwrap().contains("--help"));
    assert_eq!(
        report["summary"]["smoke"]["skipped"], 1,
        "{}",
        report["summary"]
    );
    assert_eq!(report["summary"]["smoke"]["passed"], 2);
    assert_eq!(report["summary"]["smoke"]["failed"], 2);
    // A main program named and not there: what `nix run` fails on.
    let misnamed = &got["misnamed"];
    assert_eq!(misnamed["status"], "smoke-failed", "{misnamed}");
    assert!(
        misnamed["reason"]
            .as_str()
            .unwrap()
            .contains("no output has an executable bin/missing"),
        "{misnamed}"
    );
    // Without --smoke nothing is run and the key says so.
    let plain = local(&host, &state, &repo, &[]);
    let got = packages_by_attr(&plain);
    assert_eq!(got["broken"]["status"], "ready");
    assert_eq!(got["broken"]["smoke"], "not-run");
    assert_eq!(plain["summary"]["smoke"], serde_json::json!({}));
}

/// A classic NUR repository: no flake.nix; default.nix (a function of `pkgs` and more)
/// returns the packages beside `lib`, `modules` and `overlays`; ci.nix lists buildOutputs.
fn nur_repo(dir: &std::path::Path) -> std::path::PathBuf {
    let repo = dir.join("nur");
    std::fs::create_dir_all(repo.join("pkgs")).unwrap();
    std::fs::write(
        repo.join("default.nix"),
        r#"{ pkgs ? null, greeting ? "hello" }:
let
  sys = "x86_64-linux";
  pkg = args@{ pname, script, src ? null }: let
    pos = builtins.unsafeGetAttrPos "pname" args;
  in derivation ({ name = pname; system = sys; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
    args = [ "-c" script ]; } // (if src == null then { } else { inherit src; }))
    // { inherit pname; meta.position = "${pos.file}:${toString pos.line}"; };
  fod = { text, hash }: derivation { name = "source"; system = sys; builder = "/bin/sh";
    PATH = "/usr/bin:/bin"; args = [ "-c" "printf '%s\\n' '${text}' > $out" ];
    outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = hash; };
in {
  lib = { helper = x: x; };
  modules = { };
  overlays = { };
  # Followed, as nix-build follows it, each derivation once (`self` holds it again); an
  # unmarked set is not.
  tools = let t = { recurseForDerivations = true; fmt = pkg { pname = "fmt"; script = "echo fmt > $out"; }; self = t; }; in t;
  extra = { hidden = pkg { pname = "hidden"; script = "echo > $out"; }; };
  hello = import ./pkgs/hello.nix { inherit pkg greeting; };
  fixme = import ./pkgs/fixme.nix { inherit pkg fod; };
  # Reads the agent's environment: empty.
  leak = pkg { pname = "leak"; script = "echo '${builtins.getEnv "NIXFARM_TEST_SECRET"}' > $out"; };
  # Reads outside the checkout: refused in restricted mode.
  snoop = pkg { pname = "snoop"; script = "echo ${builtins.readFile /etc/hostname} > $out"; };
}
"#,
    )
    .unwrap();
    std::fs::write(
        repo.join("pkgs/hello.nix"),
        "{ pkg, greeting }:\npkg {\n  pname = \"hello\";\n  script = \"echo ${greeting} > $out\";\n}\n",
    )
    .unwrap();
    std::fs::write(
        repo.join("pkgs/fixme.nix"),
        "{ pkg, fod }:\npkg {\n  pname = \"fixme\";\n  src = fod {\n    text = \"fixme source\";\n    hash = \"sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\";\n  };\n  script = \"cat $src > $out\";\n}\n",
    )
    .unwrap();
    std::fs::write(
        repo.join("ci.nix"),
        "let all = import ./default.nix { }; in { buildOutputs = [ all.hello all.fixme ]; }\n",
    )
    .unwrap();
    repo
}

#[test]
fn classic_nur_layouts_default_nix_and_ci_nix() {
    let dir = scratch();
    let repo = nur_repo(dir.path());
    let host = Host::new(&dir.path().join("host"));
    let state = dir.path().join("state");
    // No flake.nix: default.nix is taken, called with the run's arguments.
    let report = local(&host, &state, &repo, &["--argstr", "greeting", "hi there"]);
    let got = packages_by_attr(&report);
    let names: Vec<&String> = got.keys().collect();
    assert_eq!(
        names,
        ["fixme", "hello", "leak", "snoop", "tools.fmt"],
        "lib, modules, overlays are not packages: {report}"
    );
    assert_eq!(got["tools.fmt"]["status"], "ready", "{}", got["tools.fmt"]);
    assert_eq!(got["hello"]["status"], "ready", "{}", got["hello"]);
    let out = got["hello"]["outputs"]["out"].as_str().unwrap();
    let cat = host.run(&["cat", out]);
    assert_eq!(stdout(&cat).trim(), "hi there");
    // Chosen by name: `lib` is there, but no package.
    let lib = local(
        &host,
        &state,
        &repo,
        &["--argstr", "greeting", "hi there", "--attr", "lib"],
    );
    assert_eq!(
        lib["error"],
        "no package lib in the file (its top level, and sets marked recurseForDerivations): --attr names a derivation there",
        "{lib}"
    );
    assert_eq!(got["hello"]["position"], "pkgs/hello.nix:3");
    let leak = got["leak"]["outputs"]["out"].as_str().unwrap();
    assert_eq!(
        stdout(&host.run(&["cat", leak])).trim(),
        "",
        "the agent's environment leaked"
    );
    assert_eq!(got["fixme"]["status"], "needs-hash", "{}", got["fixme"]);
    assert_eq!(got["fixme"]["hash_fixes"][0]["file"], "pkgs/fixme.nix");
    // As the file has it, beside the hash Nix called it.
    assert_eq!(
        got["fixme"]["hash_fixes"][0]["written"],
        "\"sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\""
    );
    // The file cannot read the agent's disk.
    assert_eq!(got["snoop"]["status"], "eval-failed");
    assert!(
        got["snoop"]["reason"]
            .as_str()
            .unwrap()
            .contains("restricted mode"),
        "{}",
        got["snoop"]["reason"]
    );
    // One of a marked set's, by its path.
    let fmt = local(
        &host,
        &state,
        &repo,
        &["--argstr", "greeting", "hi there", "--attr", "tools.fmt"],
    );
    let got_fmt = packages_by_attr(&fmt);
    assert_eq!(got_fmt.keys().collect::<Vec<_>>(), ["tools.fmt"], "{fmt}");
    assert_eq!(got_fmt["tools.fmt"]["status"], "ready");
    // ci.nix's buildOutputs (a list): its derivations, by name.
    let ci = local(
        &host,
        &state,
        &repo,
        &["--file", "ci.nix", "--attr-path", "buildOutputs"],
    );
    let got = packages_by_attr(&ci);
    assert_eq!(got.keys().collect::<Vec<_>>(), ["fixme", "hello"]);
    assert_eq!(got["hello"]["status"], "ready");
    // Hash fixing works the same: the verifying round builds it.
    let fixed = local(
        &host,
        &state,
        &repo,
        &[
            "--file",
            "ci.nix",
            "--attr-path",
            "buildOutputs",
            "--fix-hashes",
            "--apply",
        ],
    );
    let got = packages_by_attr(&fixed);
    assert_eq!(got["fixme"]["status"], "ready", "{}", got["fixme"]);
    assert!(
        std::fs::read_to_string(repo.join("pkgs/fixme.nix"))
            .unwrap()
            .contains(&sri("fixme source"))
    );
}

/// A flake with checks, overlays, modules and a formatter, some of them broken.
fn checks_repo(dir: &std::path::Path) -> std::path::PathBuf {
    let repo = dir.join("checks");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(
        repo.join("flake.nix"),
        r#"{
  outputs = { self }: let
    sys = "x86_64-linux";
    mk = name: script: derivation { inherit name; system = sys; builder = "/bin/sh";
      PATH = "/usr/bin:/bin"; args = [ "-c" script ]; };
  in {
    packages.${sys}.tool = mk "tool" "echo tool > $out";
    checks.${sys} = {
      unit = mk "unit" "echo passed > $out";
      lint = mk "lint" "echo 'lint: 3 problems' >&2; exit 1";
    };
    overlays = {
      default = final: prev: { tool = self.packages.${sys}.tool; };
      bad = { tool = 1; };
    };
    nixosModules = {
      server = { config, ... }: { };
      broken = "services.tool.enable = true";
    };
    formatter.${sys} = mk "fmt" "echo fmt > $out";
  };
}
"#,
    )
    .unwrap();
    repo
}

#[test]
fn the_flakes_checks_and_other_outputs_are_reported() {
    let dir = scratch();
    let repo = checks_repo(dir.path());
    let host = Host::new(&dir.path().join("host"));
    let state = dir.path().join("state");
    let report = local(&host, &state, &repo, &[]);
    let got = packages_by_attr(&report);
    assert_eq!(got["tool"]["status"], "ready");
    assert_eq!(got["tool"]["kind"], "package");
    assert_eq!(
        got["checks.unit"]["status"], "ready",
        "{}",
        got["checks.unit"]
    );
    assert_eq!(got["checks.unit"]["kind"], "check");
    assert_eq!(got["checks.lint"]["status"], "build-failed");
    assert!(
        got["checks.lint"]["log_tail"]
            .as_str()
            .unwrap()
            .contains("3 problems")
    );
    let repo_checks: std::collections::BTreeMap<String, (bool, String)> = report["repository"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                (
                    c["ok"].as_bool().unwrap(),
                    c["message"].as_str().unwrap().to_string(),
                ),
            )
        })
        .collect();
    let names: Vec<&String> = repo_checks.keys().collect();
    assert_eq!(
        names,
        [
            "formatter.x86_64-linux",
            "nixosModules.broken",
            "nixosModules.server",
            "overlays.bad",
            "overlays.default"
        ],
        "{repo_checks:?}"
    );
    assert!(repo_checks["overlays.default"].0);
    assert!(repo_checks["nixosModules.server"].0);
    assert!(repo_checks["formatter.x86_64-linux"].0);
    assert!(!repo_checks["overlays.bad"].0);
    assert!(repo_checks["overlays.bad"].1.contains("not a function"));
    assert!(!repo_checks["nixosModules.broken"].0);
    assert!(
        repo_checks["nixosModules.broken"]
            .1
            .contains("not a NixOS module")
    );
    // The bundled example has none of these: no repository section entries, no checks.
    let example = local(&host, &dir.path().join("state2"), &example_repo(), &[]);
    assert_eq!(example["repository"], serde_json::json!([]));
}

/// A flake with checks and no packages: its checks are the run. One with an empty package
/// set finishes at once, 0 of 0; one with neither fails, saying so in the flake's terms.
#[test]
fn a_flake_of_checks_only_or_of_nothing_is_reported_as_such() {
    let dir = scratch();
    let host = Host::new(&dir.path().join("host"));
    let flake = |name: &str, outputs: &str| {
        let repo = dir.path().join(name);
        std::fs::create_dir_all(&repo).unwrap();
        std::fs::write(
            repo.join("flake.nix"),
            format!(
                r#"{{
  outputs = {{ self }}: let
    sys = "x86_64-linux";
    mk = name: script: derivation {{ inherit name; system = sys; builder = "/bin/sh";
      args = [ "-c" script ]; }};
  in {{ {outputs} }};
}}
"#
            ),
        )
        .unwrap();
        local(&host, &dir.path().join(format!("{name}-state")), &repo, &[])
    };
    let report = flake(
        "checks-only",
        r#"checks.${sys} = { unit = mk "unit" "echo passed > $out"; lint = mk "lint" "exit 1"; };"#,
    );
    assert_eq!(report["state"], "finished", "{report}");
    let got = packages_by_attr(&report);
    assert_eq!(got["checks.unit"]["status"], "ready", "{report}");
    assert_eq!(got["checks.lint"]["status"], "build-failed", "{report}");
    assert_eq!(got.len(), 2);
    // Said, so that packages gone missing are not taken for all of them ready.
    let said = &report["repository"][0];
    assert_eq!(said["name"], "packages.x86_64-linux", "{report}");
    assert_eq!(said["ok"], false);
    assert!(
        said["message"]
            .as_str()
            .unwrap()
            .contains("the flake has no packages.x86_64-linux: the run is its checks"),
        "{report}"
    );

    let report = flake("empty", "packages.${sys} = { };");
    assert_eq!(report["state"], "finished", "{report}");
    assert_eq!(report["summary"]["total"], 0);

    let report = flake("nothing", "");
    assert_eq!(report["state"], "failed", "{report}");
    let error = report["error"].as_str().unwrap();
    assert!(
        error.contains("the flake has no packages.x86_64-linux and no checks.x86_64-linux"),
        "{error}"
    );
    assert!(!error.contains("/sources/"), "{error}");

    // Names nixfarm does not accept (empty, with a control character) are left out, and
    // said, escaped, among the repository's checks; the rest is the run.
    let report = flake(
        "odd-names",
        r#"packages.${sys} = { ok = mk "ok" "echo > $out"; "" = mk "e" "echo > $out"; "tab\there" = mk "t" "echo > $out"; };"#,
    );
    assert_eq!(report["state"], "finished", "{report}");
    let got = packages_by_attr(&report);
    assert_eq!(got.keys().collect::<Vec<_>>(), ["ok"], "{report}");
    assert_eq!(got["ok"]["status"], "ready");
    let check = &report["repository"][0];
    assert_eq!(check["name"], "packages.x86_64-linux", "{report}");
    assert_eq!(check["ok"], false);
    let message = check["message"].as_str().unwrap();
    assert!(
        message.contains("2 attribute(s) left out") && message.contains(r#""", "tab\there""#),
        "{message}"
    );
}

#[test]
fn a_matrix_over_an_input_reports_each_value_side_by_side() {
    let dir = scratch();
    for (name, message) in [("dep-a", "ok"), ("dep-b", "changed")] {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("flake.nix"),
            format!("{{ outputs = {{ self }}: {{ message = \"{message}\"; }}; }}\n"),
        )
        .unwrap();
    }
    let repo = dir.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let a = format!("path:{}", dir.path().join("dep-a").display());
    let b = format!("path:{}", dir.path().join("dep-b").display());
    std::fs::write(
        repo.join("flake.nix"),
        format!(
            r#"{{
  inputs.dep.url = "{a}";
  outputs = {{ self, dep }}: let
    mk = name: script: derivation {{ inherit name; system = "x86_64-linux"; builder = "/bin/sh";
      PATH = "/usr/bin:/bin"; args = [ "-c" script ]; }};
  in {{ packages.x86_64-linux = {{
    same = mk "same" "echo same > $out";
    varies = mk "varies" (if dep.message == "ok" then "echo ok > $out"
      else "echo 'uses an API the new input removed' >&2; exit 1");
  }}; }};
}}
"#
        ),
    )
    .unwrap();
    let host = Host::new(&dir.path().join("host"));
    let state = dir.path().join("state");
    let matrix = format!("dep={a},{b}");
    let m = local(&host, &state, &repo, &["--matrix", &matrix]);
    assert_eq!(m["input"], "dep");
    let cells = m["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 2);
    assert_eq!(cells[0]["ref"], a.as_str());
    assert_eq!(cells[0]["summary"]["ready"], 2, "{m}");
    assert_eq!(cells[1]["summary"]["ready"], 1, "{m}");
    let packages = m["packages"].as_array().unwrap();
    let varies = packages.iter().find(|p| p["attr"] == "varies").unwrap();
    assert_eq!(varies["differs"], true);
    assert_eq!(varies["cells"][0]["status"], "ready");
    assert_eq!(varies["cells"][1]["status"], "build-failed");
    let same = packages.iter().find(|p| p["attr"] == "same").unwrap();
    assert_eq!(same["differs"], false);
    // Each cell's report is checked against the cache as a single run's is: `same`'s output,
    // held there under its path by someone else and signed by no key the runs are checked
    // by, is not-cached in both.
    let cache = dir.path().join("cache");
    let same_out = host.run(&[
        "nix",
        "eval",
        "--raw",
        &format!("path:{}#packages.x86_64-linux.same.outPath", repo.display()),
    ]);
    assert!(same_out.status.success(), "{}", stderr(&same_out));
    let same_out = stdout(&same_out).trim().to_string();
    plant_foreign(&cache, &same_out, &same_out);
    let (sk, pk) = cache_key(dir.path(), "farm-1");
    let cache_url = format!("file://{}", cache.display());
    let m = local(
        &host,
        &state,
        &repo,
        &[
            "--matrix",
            &matrix,
            "--cache",
            &cache_url,
            "--signing-key-file",
            sk.to_str().unwrap(),
            "--trusted-public-key",
            &pk,
        ],
    );
    let packages = m["packages"].as_array().unwrap();
    let same = packages.iter().find(|p| p["attr"] == "same").unwrap();
    for cell in 0..2 {
        assert_eq!(same["cells"][cell]["status"], "not-cached", "{m}");
    }
    let varies = packages.iter().find(|p| p["attr"] == "varies").unwrap();
    assert_eq!(varies["cells"][0]["status"], "ready", "{m}");

    // One value alone, as --override-input.
    let one = local(&host, &state, &repo, &["--override-input", "dep", &b]);
    assert_eq!(packages_by_attr(&one)["varies"]["status"], "build-failed");
    // An input the flake does not have (a typo) is refused by name, not overridden in name
    // only: the run would be the flake as it is.
    let typo = local(&host, &state, &repo, &["--override-input", "dpe", &b]);
    assert_eq!(typo["state"], "failed", "{typo}");
    let error = typo["error"].as_str().unwrap();
    assert!(
        error.contains(
            "--override-input dpe: the flake has no input of that name (its inputs: dep)"
        ),
        "{error}"
    );
}

/// Twenty packages, each with a fake source hash: many stages are due at once (the session
/// keeps at most eight runs in flight and batches the packages that wait), and every package
/// must still reach its verifying stage and end ready, with its own hash written in.
#[test]
fn twenty_broken_packages_are_all_fixed_with_runs_in_flight_bounded() {
    let dir = scratch();
    let repo = copied_hash_repo(dir.path());
    let mut attrs = String::new();
    for i in 0..20 {
        let name = format!("p{i:02}");
        std::fs::write(
            repo.join(format!("pkgs/{name}.nix")),
            format!(
                "{{ fod, pkg }}:\npkg {{\n  pname = \"{name}\";\n  src = fod {{\n    url = \"https://example.org/{name}.tar.gz\";\n    text = \"{name} source\";\n    hash = \"sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\";\n  }};\n}}\n"
            ),
        )
        .unwrap();
        attrs.push_str(&format!("{name} = call ./pkgs/{name}.nix; "));
    }
    let report = fix_with_packages(dir.path(), &repo, &attrs);
    let got = packages_by_attr(&report);
    assert_eq!(got.len(), 20);
    for i in 0..20 {
        let name = format!("p{i:02}");
        assert_eq!(
            got[&name]["status"], "ready",
            "{name}: {}",
            got[&name]["reason"]
        );
        let text = std::fs::read_to_string(repo.join(format!("pkgs/{name}.nix"))).unwrap();
        assert!(text.contains(&sri(&format!("{name} source"))), "{text}");
    }
    // The first run, then the stages (13 runs in the run this was written with).
    let runs = report["fix_rounds"].as_array().unwrap();
    assert!(runs.len() >= 2 && runs.len() <= 21, "{runs:?}");
}

/// A library whose source hash is fake, and two packages built on it: the one fix is the
/// library's (in its file), and the packages that depend on it go on to their next stage
/// and end ready with no fix of their own. They used to end needs-hash: by the time their
/// mismatch (the library's source) was taken in, the fake hash was no longer in the tree.
#[test]
fn packages_built_on_a_library_with_a_fake_hash_end_ready_once_it_is_fixed() {
    let dir = scratch();
    let repo = copied_hash_repo(dir.path());
    std::fs::write(
        repo.join("pkgs/lib.nix"),
        "{ fod, pkg }:\npkg {\n  pname = \"lib\";\n  src = fod {\n    url = \"https://example.org/lib.tar.gz\";\n    text = \"lib source\";\n    hash = \"sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\";\n  };\n}\n",
    )
    .unwrap();
    let report = fix_with_packages(
        dir.path(),
        &repo,
        // app2 also needs a slow build, so its needs-hash comes in after lib's fix.
        "lib = call ./pkgs/lib.nix; app1 = pkg { pname = \"app1\"; src = self.packages.${sys}.lib; }; app2 = pkg { pname = \"app2\"; src = derivation { name = \"both\"; system = sys; builder = \"/bin/sh\"; PATH = \"/usr/bin:/bin\"; a = self.packages.${sys}.lib; b = derivation { name = \"slow\"; system = sys; builder = \"/bin/sh\"; PATH = \"/usr/bin:/bin\"; args = [ \"-c\" \"sleep 2; echo slow > $out\" ]; }; args = [ \"-c\" \"cat $a $b > $out\" ]; }; };",
    );
    let got = packages_by_attr(&report);
    for attr in ["lib", "app1", "app2"] {
        assert_eq!(
            got[attr]["status"], "ready",
            "{attr}: {}",
            got[attr]["reason"]
        );
    }
    let fixes = got["lib"]["hash_fixes"].as_array().unwrap();
    assert_eq!(fixes.len(), 1, "{fixes:?}");
    assert_eq!(fixes[0]["file"], "pkgs/lib.nix");
    assert_eq!(fixes[0]["new"], sri("lib source").as_str());
    for app in ["app1", "app2"] {
        let own = &got[app]["hash_fixes"];
        assert!(own.as_array().is_none_or(|a| a.is_empty()), "{app}: {own}");
    }
    let text = std::fs::read_to_string(repo.join("pkgs/lib.nix")).unwrap();
    assert!(text.contains(&sri("lib source")), "{text}");
}

/// `nixfarm local --agents 2 --cross-check-builds` is a reproducibility check on one
/// machine: each package is built once and again by the other local agent (`--check`
/// against the shared store); one that writes the time into its output is
/// `not-reproducible`. With a cache, only what its check vouched for is pushed there (by
/// the checking agent), and a fresh store substitutes it with signatures required. With one
/// agent there is nobody to check, and it says so at once.
#[test]
fn local_cross_checked_builds_find_what_is_not_reproducible() {
    let dir = scratch();
    let repo = stable_and_stamp_repo(dir.path());
    let host = Host::new(&dir.path().join("host"));
    let state = dir.path().join("state");
    let (sk, pk) = cache_key(dir.path(), "checked-1");
    let cache = dir.path().join("cache");
    let cache_url = format!("file://{}", cache.display());
    let report = local(
        &host,
        &state,
        &repo,
        &[
            "--agents",
            "2",
            "--cross-check-builds",
            "--cache",
            &cache_url,
            "--signing-key-file",
            sk.to_str().unwrap(),
        ],
    );
    assert_stamp_not_reproducible(&report);
    let got = packages_by_attr(&report);
    let narinfo = |attr: &str| {
        let out = got[attr]["outputs"]["out"].as_str().unwrap();
        cache.join(format!("{}.narinfo", &out["/nix/store/".len()..][..32]))
    };
    assert!(narinfo("stable").exists(), "stable is in the cache");
    assert!(
        !narinfo("stamp").exists(),
        "the output that failed its check never reached the cache"
    );
    substitute_into_fresh_store(
        &dir.path().join("fresh"),
        &[&got["stable"]],
        &cache_url,
        &pk,
    );
    let out = host
        .command(&[
            bin("nixfarm").to_str().unwrap(),
            "local",
            repo.to_str().unwrap(),
            "--cross-check-builds",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--cross-check-builds has a second agent build everything again: run with --agents 2 or more"),
        "{}",
        stderr(&out)
    );
}

/// `nixfarm local` (with `extra`) of [`stable_and_stamp_repo`], signing with a key and checked
/// by it, over a file:// cache that holds someone else's upload under `stable`'s output path
/// (not what the derivation builds, signed by nobody): the report, and stable's path.
fn local_over_a_foreign_stable(extra: &[&str]) -> (serde_json::Value, String) {
    local_over_a_foreign_stable_as(extra, |stable| stable.to_string())
}

/// [`local_over_a_foreign_stable`], the planted narinfo's `StorePath:` line naming
/// `store_path(stable)`.
fn local_over_a_foreign_stable_as(
    extra: &[&str],
    store_path: fn(&str) -> String,
) -> (serde_json::Value, String) {
    let dir = scratch();
    let repo = stable_and_stamp_repo(dir.path());
    let host = Host::new(&dir.path().join("host"));
    let (sk, pk) = cache_key(dir.path(), "farm-1");
    let cache = dir.path().join("cache");
    let flake_attr = format!(
        "path:{}#packages.x86_64-linux.stable.outPath",
        repo.display()
    );
    let eval = host.run(&["nix", "eval", "--raw", &flake_attr]);
    assert!(eval.status.success(), "{}", stderr(&eval));
    let stable = stdout(&eval).trim().to_string();
    plant_foreign(&cache, &stable, &store_path(&stable));
    let cache_url = format!("file://{}", cache.display());
    let mut args = vec![
        "--cache",
        &cache_url,
        "--signing-key-file",
        sk.to_str().unwrap(),
        "--trusted-public-key",
        &pk,
    ];
    args.extend_from_slice(extra);
    let report = local(&host, &dir.path().join("state"), &repo, &args);
    (report, stable)
}

/// Puts into the file cache `cache` a narinfo for `path`, signed by no one, of a NAR that is
/// not what any derivation here builds; its `StorePath:` line says `says`.
fn plant_foreign(cache: &std::path::Path, path: &str, says: &str) {
    std::fs::create_dir_all(cache.join("nar")).unwrap();
    let nar = single_file_nar(b"not what the derivation builds\n");
    let hash = nixfarm_nix::hash::nix32_encode(&sha2::Sha256::digest(&nar));
    std::fs::write(cache.join(format!("nar/{hash}.nar")), &nar).unwrap();
    std::fs::write(
        cache.join(format!("{}.narinfo", &path["/nix/store/".len()..][..32])),
        format!(
            "StorePath: {says}\nURL: nar/{hash}.nar\nCompression: none\nFileHash: sha256:{hash}\nFileSize: {n}\nNarHash: sha256:{hash}\nNarSize: {n}\nReferences: \n",
            n = nar.len()
        ),
    )
    .unwrap();
}

/// "Ready" means a user can substitute it. An output the run's cache already held under its
/// path, uploaded by someone else (signed by no key the run is checked by, so the agents
/// build it themselves), stays there: the push uploads only what the cache lacks. The
/// building agent reads back what it pushed: that package is not-cached, naming both NAR
/// hashes; the one the farm pushed and signed is ready. (The CLI's own end-of-run check,
/// which would refuse it as unsigned, is `cmd::submit`'s unit test.)
#[test]
fn an_output_held_in_the_cache_under_its_path_but_unsigned_is_not_cached() {
    let (report, stable) = local_over_a_foreign_stable(&[]);
    let got = packages_by_attr(&report);
    assert_eq!(got["stable"]["outputs"]["out"], stable.as_str());
    assert_eq!(got["stable"]["status"], "not-cached", "{report}");
    let reason = got["stable"]["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!(
            "the cache already held {stable} with other contents"
        )) && reason.contains("something else was uploaded under its path"),
        "{reason}"
    );
    assert_eq!(got["stamp"]["status"], "ready", "{report}");
}

/// A cache that says it has an output (here: a file under its name) but answers a client
/// asking for its narinfo with another path's does not have it for anyone: the package is
/// not-cached, saying why.
#[test]
fn an_output_whose_narinfo_in_the_cache_is_another_paths_is_not_cached() {
    let (report, stable) =
        local_over_a_foreign_stable_as(&[], |_| format!("/nix/store/{}-elsewhere", "0".repeat(32)));
    let got = packages_by_attr(&report);
    assert_eq!(got["stable"]["status"], "not-cached", "{report}");
    let reason = got["stable"]["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!("cannot read back {stable} from the run's cache"))
            && reason.contains("answered for /nix/store/0000"),
        "{reason}"
    );
    assert_eq!(got["stamp"]["status"], "ready", "{report}");
}

/// With cross-checked builds the checking agent reads back what it published: the cache
/// holding other contents under a checked output's path (its dependents elsewhere would get
/// those) fails the publication, naming both NAR hashes, and the package is not ready.
#[test]
fn a_checked_output_the_cache_holds_with_other_contents_is_not_ready() {
    let (report, _) = local_over_a_foreign_stable(&["--agents", "2", "--cross-check-builds"]);
    let got = packages_by_attr(&report);
    assert_ne!(got["stable"]["status"], "ready", "{report}");
    let reason = got["stable"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("the cache already held") && reason.contains("with other contents"),
        "{reason}"
    );
}

/// A fixed-output derivation whose output refers to a store path makes Nix 2.8 abort on an
/// assertion (its daemon, which the local agents build through, dies with it). That is the
/// package's own failure, the same on every machine: build-failed, saying so, not
/// infra-failed after retries on each agent. Its neighbour builds.
#[test]
fn a_fixed_output_with_a_store_reference_is_the_packages_failure_not_the_machines() {
    let dir = scratch();
    let repo = dir.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(
        repo.join("flake.nix"),
        r#"{ outputs = { self }: let
      mk = name: script: derivation { inherit name; system = "x86_64-linux";
        builder = "/bin/sh"; PATH = "/usr/bin:/bin"; args = [ "-c" script ]; };
      dep = mk "dep" "echo dep > $out";
    in { packages.x86_64-linux = {
      fine = mk "fine" "echo fine > $out";
      refers = derivation {
        name = "refers"; system = "x86_64-linux"; builder = "/bin/sh";
        args = [ "-c" "echo ${dep} > $out" ];
        outputHashMode = "flat"; outputHashAlgo = "sha256";
        outputHash = builtins.hashString "sha256"
          (builtins.unsafeDiscardStringContext dep.outPath + "\n");
      };
    }; }; }"#,
    )
    .unwrap();
    let host = Host::new(&dir.path().join("host"));
    let report = local(&host, &dir.path().join("state"), &repo, &[]);
    let got = packages_by_attr(&report);
    assert_eq!(got["fine"]["status"], "ready", "{report}");
    assert_eq!(got["refers"]["status"], "build-failed", "{report}");
    let reason = got["refers"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("Nix aborted building it") && reason.contains("refers to a store path"),
        "{reason}"
    );
}

/// Runs `git` in `repo` as a test's committer; it must succeed.
fn git_in(repo: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["-c", "user.email=t@t", "-c", "user.name=t"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {}", stderr(&out));
}

/// A git flake is read as Nix reads it: tracked files as they are now (uncommitted edits
/// included), and no file that was never `git add`ed, so "ready" is what `nix build` on this
/// checkout, and on a clone of it, says. The file left out is named.
#[test]
fn a_git_flake_is_its_tracked_files_with_uncommitted_edits_an_untracked_file_left_out() {
    let dir = scratch();
    let repo = dir.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let git = |args: &[&str]| git_in(&repo, args);
    let pkg = |name: &str, text: &str| {
        format!(
            "{{ system }}: derivation {{ name = \"{name}\"; inherit system; builder = \"/bin/sh\"; args = [ \"-c\" \"echo {text} > $out\" ]; }}\n"
        )
    };
    std::fs::write(
        repo.join("flake.nix"),
        "{ outputs = { self }: let system = \"x86_64-linux\"; in { packages.${system} = { edited = import ./edited.nix { inherit system; }; added = import ./added.nix { inherit system; }; forgotten = import ./forgotten.nix { inherit system; }; }; }; }\n",
    )
    .unwrap();
    std::fs::write(repo.join("edited.nix"), pkg("edited", "committed")).unwrap();
    git(&["init", "-q"]);
    git(&["add", "flake.nix", "edited.nix"]);
    git(&["commit", "-qm", "init"]);
    // Uncommitted: an edit, a file added but not committed, a file never added.
    std::fs::write(repo.join("edited.nix"), pkg("edited", "uncommitted")).unwrap();
    std::fs::write(repo.join("added.nix"), pkg("added", "added")).unwrap();
    git(&["add", "added.nix"]);
    std::fs::write(repo.join("forgotten.nix"), pkg("forgotten", "forgotten")).unwrap();
    let host = Host::new(&dir.path().join("host"));
    let state = dir.path().join("state");
    let out = local_output(&host, &state, &repo, &[]);
    let report: serde_json::Value = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", stdout(&out), stderr(&out)));
    let got = packages_by_attr(&report);
    assert_eq!(got["edited"]["status"], "ready", "{}", got["edited"]);
    let edited = got["edited"]["outputs"]["out"].as_str().unwrap();
    assert_eq!(stdout(&host.run(&["cat", edited])).trim(), "uncommitted");
    assert_eq!(got["added"]["status"], "ready", "{}", got["added"]);
    assert_eq!(
        got["forgotten"]["status"], "eval-failed",
        "{}",
        got["forgotten"]
    );
    assert!(
        got["forgotten"]["reason"]
            .as_str()
            .unwrap()
            .contains("forgotten.nix"),
        "{}",
        got["forgotten"]
    );
    let err = stderr(&out);
    assert!(
        err.contains("left out of the snapshot: 1 file(s) git does not track: forgotten.nix"),
        "{err}"
    );
    // A flake.nix never added: refused here, saying what to do.
    let fresh = dir.path().join("fresh");
    std::fs::create_dir_all(&fresh).unwrap();
    std::fs::write(fresh.join("flake.nix"), "{ outputs = { self }: { }; }\n").unwrap();
    let init = std::process::Command::new("git")
        .args(["init", "-q"])
        .arg(&fresh)
        .status()
        .unwrap();
    assert!(init.success());
    let out = host.run(&[
        bin("nixfarm").to_str().unwrap(),
        "local",
        fresh.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("flake.nix is not tracked by git")
            && stderr(&out).contains("git add flake.nix"),
        "{}",
        stderr(&out)
    );
}

/// `--apply` refused (a file it would edit changed during the run): nothing is written, and
/// the report, with every fix it found, is still printed before the refusal.
#[test]
fn a_refused_apply_still_prints_the_report_and_its_fixes() {
    let dir = scratch();
    let repo = dir.path().join("repo");
    std::fs::create_dir_all(repo.join("pkgs")).unwrap();
    let fixme = repo.join("pkgs/fixme.nix");
    std::fs::write(
        repo.join("flake.nix"),
        format!(
            r#"{{
  outputs = {{ self }}: let
    sys = "x86_64-linux";
    src = import ./pkgs/fixme.nix;
  in {{ packages.${{sys}} = {{
    fixme = derivation {{ name = "fixme"; system = sys; builder = "/bin/sh"; inherit src;
      PATH = "/usr/bin:/bin"; args = [ "-c" "cat $src > $out" ]; }};
    # The maintainer's edit while the run goes, played by a build (no sandbox here).
    toucher = derivation {{ name = "toucher"; system = sys; builder = "/bin/sh";
      PATH = "/usr/bin:/bin"; args = [ "-c" "echo '# edited meanwhile' >> {}; echo > $out" ]; }};
  }}; }};
}}
"#,
            fixme.display()
        ),
    )
    .unwrap();
    let original = format!(
        "derivation {{\n  name = \"source\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; PATH = \"/usr/bin:/bin\";\n  args = [ \"-c\" \"printf '%s\\\\n' 'fixme source' > $out\" ];\n  outputHashMode = \"flat\"; outputHashAlgo = \"sha256\";\n  outputHash = \"{}\";\n}}\n",
        "sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
    );
    std::fs::write(&fixme, &original).unwrap();
    let host = Host::new(&dir.path().join("host"));
    let state = dir.path().join("state");
    let out = local_output(&host, &state, &repo, &["--fix-hashes", "--apply"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("refusing to apply: pkgs/fixme.nix changed since the submit"),
        "{err}"
    );
    let report: serde_json::Value = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("no report ({e}): {}\n{err}", stdout(&out)));
    let got = packages_by_attr(&report);
    assert_eq!(got["fixme"]["status"], "ready", "{}", got["fixme"]);
    assert_eq!(got["fixme"]["hash_fixes"][0]["new"], sri("fixme source"));
    // Nothing written: the file is as the maintainer left it.
    let now = std::fs::read_to_string(&fixme).unwrap();
    assert_eq!(now, format!("{original}# edited meanwhile\n"));
}

/// After `--fix-hashes` the run id the report names is the session's: `nixfarm report` of
/// it (and its web page) shows what the session came to, each package as its latest stage
/// left it, with the fixes; not the first run alone, from before any fix.
#[test]
fn the_first_run_of_a_fixing_session_reports_what_the_session_came_to() {
    let dir = scratch();
    let repo = nur_repo(dir.path());
    let host = Host::new(&dir.path().join("host"));
    let state = dir.path().join("state");
    let printed = local(&host, &state, &repo, &["--fix-hashes"]);
    let root = printed["run_id"].as_str().unwrap().to_string();
    let rounds = printed["fix_rounds"].as_array().unwrap().clone();
    assert!(rounds.len() >= 2, "{printed}");
    assert_eq!(packages_by_attr(&printed)["fixme"]["status"], "ready");
    // The farm's own record of it, as anyone later asks for it.
    let coordinator = Coordinator::start(&state).unwrap();
    let out = cli(&coordinator.url, &["report", &root, "--format", "json"]);
    let asked: serde_json::Value = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", stderr(&out)));
    let status = |r: &serde_json::Value| -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = r["packages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["attr"].as_str().unwrap().to_string(),
                    p["status"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        v.sort();
        v
    };
    assert_eq!(status(&asked), status(&printed), "{asked}");
    assert_eq!(asked["fix_rounds"].as_array().unwrap(), &rounds);
    let fixme = &packages_by_attr(&asked)["fixme"];
    assert_eq!(
        fixme["hash_fixes"][0]["new"],
        sri("fixme source"),
        "{fixme}"
    );
    // A stage alone is still itself.
    let stage = rounds[1].as_str().unwrap();
    let out = cli(&coordinator.url, &["report", stage, "--format", "json"]);
    let alone: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(alone["run_id"], stage);
    assert!(alone["fix_rounds"].as_array().is_none_or(|r| r.is_empty()));
}

/// A key rotated: the cache holds the outputs signed by the old key. A warm run with the new
/// signing key and no key given checks the cache by the new key's public half (what users
/// will be told to trust): what only the old key signed is not-cached, not ready.
#[test]
fn a_cache_is_checked_by_the_local_signing_key_when_no_key_is_given() {
    let dir = scratch();
    let repo = sh_flake(
        dir.path(),
        "rotated",
        r#"one = mk "one" "echo one > $out";"#,
    );
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    set_mode(&cache, 0o755);
    for d in ["old", "new"] {
        std::fs::create_dir_all(dir.path().join(d)).unwrap();
    }
    let (old, _) = cache_key(&dir.path().join("old"), "old-1");
    let (new, new_pk) = cache_key(&dir.path().join("new"), "new-1");
    let filled = warm_elsewhere(&dir.path().join("a"), &repo, &cache, &old);
    assert_eq!(
        packages_by_attr(&filled)["one"]["status"],
        "ready",
        "{filled}"
    );
    let rotated = warm_elsewhere(&dir.path().join("b"), &repo, &cache, &new);
    let one = &packages_by_attr(&rotated)["one"];
    assert_eq!(one["status"], "not-cached", "{rotated}");
    assert!(one["reason"].as_str().unwrap().contains(&new_pk), "{one}");
}

/// Three packages of one source share a hash file (`hashes.nix`, imported by each); their
/// second-stage hashes (`vendorHash`, one value, three fetches) are filled in once, in that
/// file: all three end ready, the two that had no fix of their own saying whose they build
/// with. One of them used to stay needs-hash, "no binding … found", though the patch fixed it.
#[test]
fn packages_sharing_a_hash_file_are_all_fixed_by_its_one_edit() {
    let dir = scratch();
    let repo = dir.path().join("widgets");
    copy_tree(&example_repo(), &repo);
    std::fs::remove_dir_all(repo.join("pkgs")).unwrap();
    std::fs::create_dir_all(repo.join("pkgs/widgets")).unwrap();
    let call: String = ["core", "gtk", "qt"]
        .iter()
        .map(|w| format!("    widgets-{w} = callPackage ./widgets/widgets-{w}.nix {{ }};\n"))
        .collect();
    std::fs::write(
        repo.join("pkgs/default.nix"),
        format!(
            "{{ lib }}:\nlet\n  callPackage = path: overrides: let f = import path; scope = {{ inherit lib; inherit (lib) mkPackage fetchSrc fetchDeps; }} // self; in f (builtins.intersectAttrs (builtins.functionArgs f) scope // overrides);\n  self = {{\n{call}  }};\nin self\n"
        ),
    )
    .unwrap();
    std::fs::write(
        repo.join("pkgs/widgets/hashes.nix"),
        "{\n  rev = \"2d8ba804c79141991b71b2a9513e56817c9de8de\";\n  srcHash = \"\";\n  vendorHash = \"\";\n}\n",
    )
    .unwrap();
    for w in ["core", "gtk", "qt"] {
        std::fs::write(
            repo.join(format!("pkgs/widgets/widgets-{w}.nix")),
            format!(
                "{{ lib, mkPackage, fetchSrc }}:\nlet hashes = import ./hashes.nix; in\nmkPackage {{\n  pname = \"widgets-{w}\";\n  version = \"3.1.0\";\n  src = fetchSrc {{ owner = \"nurorg\"; repo = \"widgets\"; inherit (hashes) rev; hash = hashes.srcHash; }};\n  vendorHash = hashes.vendorHash;\n  script = \"mkdir -p $out\";\n}}\n"
            ),
        )
        .unwrap();
    }
    let host = Host::new(&dir.path().join("host"));
    let report = local(
        &host,
        &dir.path().join("state"),
        &repo,
        &["--fix-hashes", "--apply"],
    );
    let got = packages_by_attr(&report);
    let mut own = 0;
    for w in ["core", "gtk", "qt"] {
        let p = &got[format!("widgets-{w}").as_str()];
        assert_eq!(p["status"], "ready", "{p}");
        let reason = p["reason"].as_str().unwrap();
        if reason.starts_with("builds with") && reason.contains("(see hash_fixes)") {
            own += 1;
        } else {
            assert!(reason.contains("filled in for widgets-"), "{p}");
        }
    }
    assert!(own >= 1, "{report}");
    let hashes = std::fs::read_to_string(repo.join("pkgs/widgets/hashes.nix")).unwrap();
    assert!(!hashes.contains("\"\""), "{hashes}");
}

/// A file:// cache whose disk is full: the package is not-cached, the reason naming the
/// cache's directory as the one without room (not the store it was archived from).
#[test]
fn a_full_cache_disk_is_named_as_such() {
    let dir = scratch();
    let repo = sh_flake(
        dir.path(),
        "big",
        r#"big = mk "big" "mkdir $out; dd if=/dev/urandom of=$out/blob bs=1M count=1 2>/dev/null";"#,
    );
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    set_mode(&cache, 0o755);
    std::fs::create_dir_all(dir.path().join("key")).unwrap();
    let (sk, _) = cache_key(&dir.path().join("key"), "full-1");
    let host = Host::new(&dir.path().join("host"));
    let script = format!(
        "mount -t tmpfs -o size=64k,mode=755 full {} && exec \"$@\"",
        cache.display()
    );
    let out = host
        .command(&[
            "sh",
            "-c",
            &script,
            "sh",
            bin("nixfarm").to_str().unwrap(),
            "local",
            repo.to_str().unwrap(),
            "--state-dir",
            dir.path().join("state").to_str().unwrap(),
            "--format",
            "json",
            "--cache",
            &format!("file://{}", cache.display()),
            "--signing-key-file",
            sk.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", stdout(&out), stderr(&out)));
    let big = &packages_by_attr(&report)["big"];
    assert_eq!(big["status"], "not-cached", "{big}");
    let reason = big["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!(
            "no room left where it is staged, {}",
            cache.join("nar").display()
        )),
        "{reason}"
    );
}

/// A flake in a subdirectory of a git repository is read with the whole repository, as
/// `nix build ./sub` reads it: an expression may read `../`, and the fixes' paths are the
/// repository's, so the patch applies with `git apply` at its root.
#[test]
fn a_flake_in_a_subdirectory_of_a_git_repository_reads_the_repository() {
    let dir = scratch();
    let repo = dir.path().join("mono");
    std::fs::create_dir_all(repo.join("nix/pkgs")).unwrap();
    std::fs::create_dir_all(repo.join("shared")).unwrap();
    std::fs::write(
        repo.join("shared/greeting.txt"),
        "hello from the repository\n",
    )
    .unwrap();
    std::fs::write(
        repo.join("nix/flake.nix"),
        r#"{ outputs = { self }: let
    sys = "x86_64-linux";
    greeting = builtins.readFile ../shared/greeting.txt;
  in { packages.${sys} = {
    greet = derivation { name = "greet"; system = sys; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
      args = [ "-c" "echo '${greeting}' > $out" ]; };
    fetched = import ./pkgs/fetched.nix { inherit sys; };
  }; }; }
"#,
    )
    .unwrap();
    std::fs::write(
        repo.join("nix/pkgs/fetched.nix"),
        "{ sys }:\nderivation {\n  name = \"fetched\"; system = sys; builder = \"/bin/sh\"; PATH = \"/usr/bin:/bin\";\n  args = [ \"-c\" \"printf '%s\\\\n' 'fetched source' > $out\" ];\n  outputHashMode = \"flat\"; outputHashAlgo = \"sha256\";\n  outputHash = \"sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\";\n}\n",
    )
    .unwrap();
    let git = |args: &[&str]| git_in(&repo, args);
    git(&["init", "-q"]);
    git(&["add", "."]);
    git(&["commit", "-qm", "init"]);
    let host = Host::new(&dir.path().join("host"));
    let patch = dir.path().join("fix.patch");
    let report = local(
        &host,
        &dir.path().join("state"),
        &repo.join("nix"),
        &["--patch-out", patch.to_str().unwrap()],
    );
    let got = packages_by_attr(&report);
    assert_eq!(got["greet"]["status"], "ready", "{}", got["greet"]);
    let out = got["greet"]["outputs"]["out"].as_str().unwrap();
    assert_eq!(
        stdout(&host.run(&["cat", out])).trim(),
        "hello from the repository"
    );
    // --patch-out fixes hashes: its stages go on with the same whole-repository tree.
    let fetched = &got["fetched"];
    assert_eq!(fetched["status"], "ready", "{fetched}");
    assert_eq!(
        fetched["hash_fixes"][0]["file"], "nix/pkgs/fetched.nix",
        "{fetched}"
    );
    git(&["apply", patch.to_str().unwrap()]);
    assert!(
        std::fs::read_to_string(repo.join("nix/pkgs/fetched.nix"))
            .unwrap()
            .contains(&sri("fetched source"))
    );
    // On a farm, whose agents evaluate with their host's secrets (HOME too) covered.
    let coordinator = Coordinator::start(&dir.path().join("farm")).unwrap();
    let farm_host = Host::new(&dir.path().join("farm-host"));
    let _agent = farm_host
        .start_agent("a1", &coordinator.url, None, 2)
        .unwrap();
    let out = farm_host.run(&[
        bin("nixfarm").to_str().unwrap(),
        "--coordinator",
        &coordinator.url,
        "submit",
        repo.join("nix").to_str().unwrap(),
        "--format",
        "json",
    ]);
    let farm: serde_json::Value = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", stderr(&out)));
    let got = packages_by_attr(&farm);
    assert_eq!(got["greet"]["status"], "ready", "{farm}");
    assert_eq!(got["fetched"]["status"], "ready", "{farm}");
}
