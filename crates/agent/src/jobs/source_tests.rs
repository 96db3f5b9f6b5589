//! Unit tests of `source.rs`.
use super::{local_flake, relative_in, repo_position, sweep};

/// Only the references this agent makes of a run's tree are taken for one: `path:TREE`
/// and `file://TREE.flake.tar?dir=SUB` with a plain relative SUB.
#[test]
fn a_runs_tree_is_known_by_the_references_made_of_it() {
    let p = std::path::PathBuf::from;
    assert_eq!(
        local_flake("path:/w/sources/r1-d"),
        Some((p("/w/sources/r1-d"), p("/w/sources/r1-d")))
    );
    assert_eq!(
        local_flake("file:///w/sources/r1-d.flake.tar?dir=nix/flake"),
        Some((p("/w/sources/r1-d"), p("/w/sources/r1-d/nix/flake")))
    );
    for other in [
        "path:/w/sources/r1-d?rev=abc",
        "file:///etc/passwd?dir=x",
        "file:///w/sources/r1-d.flake.tar?dir=../up",
        "file:///w/sources/r1-d.flake.tar",
        "github:o/r",
    ] {
        assert_eq!(local_flake(other), None, "{other}");
    }
}

/// The least recently used sources beyond the number kept go, but not one whose run
/// has a job going on here (an evaluation of a `--file` run reads its tree for as long
/// as it runs): the next oldest goes instead, or none while all are in use.
#[test]
fn the_sweep_keeps_the_sources_of_runs_with_a_job_going_on() {
    let mut lru: std::collections::VecDeque<String> = ["r1-aa", "r2-bb", "r3-cc", "r4-dd"]
        .map(String::from)
        .into();
    let in_use: std::collections::HashSet<String> = ["r1".to_string()].into();
    assert_eq!(sweep(&mut lru, 2, &in_use), ["r2-bb", "r3-cc"]);
    assert_eq!(lru, ["r1-aa", "r4-dd"]);
    let all: std::collections::HashSet<String> = ["r1", "r4"].map(String::from).into();
    lru.push_back("r5-ee".into());
    let mut busy = lru.clone();
    assert_eq!(sweep(&mut busy, 1, &all), ["r5-ee"]);
    assert_eq!(busy, ["r1-aa", "r4-dd"]);
}

#[test]
fn positions_in_the_runs_tree_become_repository_relative() {
    let d = tempfile::tempdir().unwrap();
    let tree = d.path().join("tree");
    let store = d.path().join("store");
    let copy = store.join("0a1b-source");
    for root in [&tree, &copy] {
        std::fs::create_dir_all(root.join("pkgs")).unwrap();
        std::fs::write(root.join("pkgs/a.nix"), "{ }").unwrap();
    }
    std::fs::write(tree.join("pkgs/b.nix"), "tree").unwrap();
    std::fs::write(copy.join("pkgs/b.nix"), "another input's").unwrap();
    let flake = format!("path:{}", tree.display());
    // Inside the tree itself.
    let p = format!("{}/pkgs/a.nix:12", tree.display());
    assert_eq!(repo_position(&p, &flake), "pkgs/a.nix:12");
    // Nix's store copy of the tree.
    let p = format!("{}/pkgs/a.nix:3", copy.display());
    assert_eq!(
        relative_in(&p, &flake, &store).as_deref(),
        Some("pkgs/a.nix:3")
    );
    // A file of the same name whose content is not the tree's: another input's.
    let p = format!("{}/pkgs/b.nix:1", copy.display());
    assert_eq!(relative_in(&p, &flake, &store), None);
    assert_eq!(repo_position(&p, &flake), p);
    // A remote flake: this host holds no tree to compare with.
    assert_eq!(
        repo_position("/nix/store/x-source/pkgs/a.nix:3", "github:o/r"),
        "/nix/store/x-source/pkgs/a.nix:3"
    );
}
