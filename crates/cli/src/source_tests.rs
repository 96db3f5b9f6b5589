//! Unit tests of `source.rs`.
use super::*;

#[test]
fn clear_errors_for_bad_sources() {
    let e = check_local_or_ref("/definitely/not/here")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no such file or directory"), "{e}");
    let d = tempfile::tempdir().unwrap();
    let e = check_local_or_ref(d.path().to_str().unwrap())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("is not a flake"), "{e}");
    let e = check_local_or_ref("github:only-owner")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("not a flake reference"), "{e}");
    assert!(matches!(
        check_local_or_ref("github:o/r").unwrap(),
        Named::FlakeRef(_)
    ));
}

#[test]
fn a_very_long_path_makes_a_label_within_the_limit() {
    let long = PathBuf::from(format!("/{}", "d/".repeat(2000)));
    let l = label_of(&long);
    assert!(l.len() <= nixfarm_core::limits::MAX_LABEL, "{}", l.len());
    assert!(l.starts_with('…'));
    assert_eq!(label_of(Path::new("/src/x")), "/src/x");
}

/// A `nix build` result link git does not ignore would fail every snapshot (it points
/// into /nix/store): it is left out. A tracked link out of the tree stays, for the
/// snapshot to refuse by name.
#[test]
fn untracked_links_out_of_the_checkout_are_left_out_tracked_ones_refused() {
    let d = tempfile::tempdir().unwrap();
    let git = |args: &[&str]| {
        let ok = std::process::Command::new("git")
            .arg("-C")
            .arg(d.path())
            .args(["-c", "user.email=t@t", "-c", "user.name=t"])
            .args(args)
            .status()
            .unwrap()
            .success();
        assert!(ok, "git {args:?}");
    };
    git(&["init", "-q"]);
    std::fs::write(d.path().join("flake.nix"), "{}").unwrap();
    std::fs::create_dir(d.path().join("pkgs")).unwrap();
    std::os::unix::fs::symlink("../flake.nix", d.path().join("pkgs/inside")).unwrap();
    git(&["add", "."]);
    let store = "/nix/store/00000000000000000000000000000000-x";
    std::os::unix::fs::symlink(store, d.path().join("result")).unwrap();
    std::os::unix::fs::symlink(store, d.path().join("pkgs/result-dev")).unwrap();
    let Snapshot {
        files,
        links_out: skipped,
        ..
    } = snapshot_files(d.path(), Reader::Flake).unwrap();
    let names = |v: &[PathBuf]| {
        let mut n: Vec<String> = v.iter().map(|p| p.display().to_string()).collect();
        n.sort();
        n
    };
    assert_eq!(names(&files), ["flake.nix", "pkgs/inside"]);
    assert_eq!(names(&skipped), ["pkgs/result-dev", "result"]);
    snapshot::pack(d.path(), &files, snapshot::Limits::default()).unwrap();
    // Tracked, the same link is the checkout's own: refused by name, not dropped.
    std::os::unix::fs::symlink("/etc", d.path().join("etc")).unwrap();
    git(&["add", "etc"]);
    let files = snapshot_files(d.path(), Reader::Flake).unwrap().files;
    assert!(files.iter().any(|f| f == Path::new("etc")));
    let e = snapshot::pack(d.path(), &files, snapshot::Limits::default()).unwrap_err();
    assert!(
        e.to_string()
            .contains("'etc' is a link that points outside"),
        "{e}"
    );
    // No git: nothing tells a build's link from the tree's own, so only the top-level
    // result links are left out; any other link out is refused by name.
    std::fs::remove_dir_all(d.path().join(".git")).unwrap();
    let Snapshot {
        files,
        links_out: skipped,
        ..
    } = snapshot_files(d.path(), Reader::Flake).unwrap();
    assert!(skipped.is_empty(), "{skipped:?}");
    assert!(!files.iter().any(|f| f == Path::new("result")), "{files:?}");
    assert!(files.iter().any(|f| f == Path::new("pkgs/result-dev")));
}

#[test]
fn a_checkout_too_large_to_send_names_its_largest_files() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("flake.nix"), "{}").unwrap();
    std::fs::write(d.path().join("big.bin"), vec![0u8; 3 << 20]).unwrap();
    let files = list_files(d.path()).unwrap();
    let limit = 1 << 20;
    let e = snapshot::pack(
        d.path(),
        &files,
        snapshot::Limits {
            max_bytes: limit,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(e, snapshot::SnapshotError::TooLarge { .. }), "{e}");
    let m = too_large(d.path(), &files, limit);
    assert!(
        m.contains("limit of 1.0 MiB (largest: big.bin (3.0 MiB), flake.nix (2 bytes))"),
        "{m}"
    );
    assert!(m.contains("every file under it is sent"), "{m}");
}

/// Nix reads a git flake's tracked files only; `nix-build` reads a file's whole tree.
#[test]
fn untracked_files_are_listed_ignored_ones_are_not_and_a_flake_leaves_them_out() {
    let d = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(d.path())
            .args(args)
            .output()
            .unwrap();
    };
    run(&["init", "-q"]);
    std::fs::write(d.path().join("flake.nix"), "{}").unwrap();
    std::fs::write(d.path().join(".gitignore"), "ignored.txt\n").unwrap();
    run(&["add", "flake.nix", ".gitignore"]);
    std::fs::write(d.path().join("new.nix"), "1").unwrap();
    std::fs::write(d.path().join("ignored.txt"), "x").unwrap();
    let mut files = list_files(d.path()).unwrap();
    files.sort();
    let names: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
    assert_eq!(names, vec![".gitignore", "flake.nix", "new.nix"]);
    let flake = snapshot_files(d.path(), Reader::Flake).unwrap();
    assert_eq!(flake.untracked, [PathBuf::from("new.nix")]);
    assert!(!flake.files.iter().any(|f| f == Path::new("new.nix")));
    let file = snapshot_files(d.path(), Reader::File).unwrap();
    assert!(file.untracked.is_empty());
    assert!(file.files.iter().any(|f| f == Path::new("new.nix")));
    // Added, it is the flake's, uncommitted as it is.
    run(&["add", "new.nix"]);
    let flake = snapshot_files(d.path(), Reader::Flake).unwrap();
    assert!(flake.untracked.is_empty());
    assert!(flake.files.iter().any(|f| f == Path::new("new.nix")));
    // When git cannot list them, nothing goes (every file, ignored ones too, did).
    std::fs::write(d.path().join(".git/HEAD"), "garbage").unwrap();
    let e = list_files(d.path()).unwrap_err().to_string();
    assert!(e.contains("git cannot list its files"), "{e}");
}

/// A tracked file under a directory that became a link out of the tree: refused, not
/// read through the link.
#[test]
fn a_file_beneath_a_link_out_of_the_tree_is_not_packed() {
    let d = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("passwd"), "SECRET").unwrap();
    std::fs::write(d.path().join("flake.nix"), "{}").unwrap();
    std::os::unix::fs::symlink(outside.path(), d.path().join("sub")).unwrap();
    let files = vec![PathBuf::from("flake.nix"), PathBuf::from("sub/passwd")];
    let packed = nixfarm_core::snapshot::pack(d.path(), &files, Default::default());
    assert!(
        matches!(
            packed,
            Err(nixfarm_core::snapshot::SnapshotError::ThroughLink(_))
        ),
        "{:?}",
        packed.map(|b| b.len())
    );
}

#[test]
fn names_that_are_not_utf8_are_carried_exactly() {
    use std::ffi::OsStr;
    let d = tempfile::tempdir().unwrap();
    let git = |args: &[&OsStr]| {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(d.path())
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    git(&[OsStr::new("init"), OsStr::new("-q")]);
    let tracked = OsStr::from_bytes(b"caf\xe9.nix");
    let untracked = OsStr::from_bytes(b"na\xefve.txt");
    std::fs::write(d.path().join("flake.nix"), "{}").unwrap();
    std::fs::write(d.path().join(tracked), "latin-1").unwrap();
    std::fs::write(d.path().join(untracked), "untracked").unwrap();
    git(&[OsStr::new("add"), OsStr::new("flake.nix"), tracked]);
    let files = list_files(d.path()).unwrap();
    assert!(files.iter().any(|f| f.as_os_str() == tracked), "{files:?}");
    assert!(
        files.iter().any(|f| f.as_os_str() == untracked),
        "{files:?}"
    );
    // Through a snapshot and back: the same bytes, the same content.
    let tar = snapshot::pack(d.path(), &files, snapshot::Limits::default()).unwrap();
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("t");
    std::fs::create_dir(&dest).unwrap();
    snapshot::unpack(&tar, &dest, snapshot::Limits::default()).unwrap();
    assert_eq!(std::fs::read(dest.join(tracked)).unwrap(), b"latin-1");
    assert_eq!(std::fs::read(dest.join(untracked)).unwrap(), b"untracked");
}
