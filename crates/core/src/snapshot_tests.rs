//! Unit tests of `snapshot.rs`.
use super::*;

fn tree() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("pkgs/a")).unwrap();
    std::fs::write(d.path().join("flake.nix"), "{ outputs = _: {}; }").unwrap();
    std::fs::write(d.path().join("pkgs/a/x.nix"), "1").unwrap();
    std::os::unix::fs::symlink("x.nix", d.path().join("pkgs/a/link.nix")).unwrap();
    d
}

#[test]
fn pack_is_deterministic_and_round_trips() {
    let d = tree();
    let files: Vec<PathBuf> = ["pkgs/a/x.nix", "flake.nix", "pkgs/a/link.nix"]
        .iter()
        .map(PathBuf::from)
        .collect();
    let a = pack(d.path(), &files, Limits::default()).unwrap();
    let b = pack(d.path(), &files, Limits::default()).unwrap();
    assert_eq!(digest(&a), digest(&b));
    let out = tempfile::tempdir().unwrap();
    assert_eq!(unpack(&a, out.path(), Limits::default()).unwrap(), 3);
    assert_eq!(
        std::fs::read_to_string(out.path().join("pkgs/a/link.nix")).unwrap(),
        "1"
    );
}

#[test]
fn refuses_escaping_links_and_paths() {
    let d = tree();
    std::os::unix::fs::symlink("../../../etc/passwd", d.path().join("pkgs/a/evil")).unwrap();
    let err = pack(d.path(), &[PathBuf::from("pkgs/a/evil")], Limits::default()).unwrap_err();
    assert!(matches!(err, SnapshotError::UnsafeLink(_)));
    assert!(matches!(
        pack(d.path(), &[PathBuf::from("../x")], Limits::default()),
        Err(SnapshotError::UnsafePath(_))
    ));
}

#[test]
fn refuses_hand_made_tar_with_dotdot() {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(1);
    h.set_entry_type(tar::EntryType::Regular);
    // Write the name into the header directly: the builder itself refuses "..".
    let name = b"../escape";
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.set_cksum();
    b.append(&h, &b"x"[..]).unwrap();
    let bytes = b.into_inner().unwrap();
    assert!(matches!(
        verify(&bytes[..], Limits::default()),
        Err(SnapshotError::UnsafePath(_))
    ));
}

/// A hand-made tar: (path, type, link target or file content), names written raw so
/// nothing on the way refuses them.
type RawEntry<'a> = (&'a str, tar::EntryType, &'a str);

fn raw_tar(entries: &[RawEntry<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, kind, extra) in entries {
        let mut h = tar::Header::new_old();
        h.set_entry_type(*kind);
        h.set_mode(0o644);
        let data: &[u8] = if *kind == tar::EntryType::Regular {
            extra.as_bytes()
        } else {
            b""
        };
        h.set_size(data.len() as u64);
        h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        if *kind != tar::EntryType::Regular {
            h.as_old_mut().linkname[..extra.len()].copy_from_slice(extra.as_bytes());
        }
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

use tar::EntryType::{Directory as D, Link as H, Regular as F, Symlink as L};

/// The escape from the trust-boundaries issue: a link to `.` makes a deep lexical path
/// shallow, so a `..` chain that looks inside the tree leaves it.
fn self_link_escape(target_file: &str) -> Vec<u8> {
    let deep = "a/".repeat(12);
    let up = "../".repeat(12);
    raw_tar(&[
        ("flake.nix", F, "{}"),
        ("a", L, "."),
        (&format!("{deep}esc"), L, &up),
        (&format!("esc{target_file}"), F, "pwned"),
    ])
}

#[test]
fn links_created_earlier_in_the_same_tar_are_taken_into_account() {
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("X");
    let bytes = self_link_escape(victim.to_str().unwrap());
    let err = verify(&bytes[..], Limits::default()).unwrap_err();
    assert!(matches!(err, SnapshotError::ThroughLink(_)), "{err}");
    let dest = tempfile::tempdir().unwrap();
    assert!(unpack(&bytes, dest.path(), Limits::default()).is_err());
    // Even with the tree check skipped, extraction follows no link.
    let dest2 = tempfile::tempdir().unwrap();
    assert!(extract(&bytes[..], dest2.path(), Limits::default()).is_err());
    assert!(!victim.exists(), "a file was written outside the tree");
}

#[test]
fn every_shape_of_escape_is_refused() {
    let cases: Vec<(&str, Vec<RawEntry<'_>>)> = vec![
        ("absolute link", vec![("x", L, "/etc")]),
        ("link above the root", vec![("x", L, "..")]),
        ("deep .. chain", vec![("p/q/x", L, "../../../../../../etc")]),
        (
            "'..' through another link",
            vec![("p/q/x", L, "../.."), ("p/q/y", L, "x/../../..")],
        ),
        (
            "directory replaced by a link later",
            vec![("d", D, ""), ("d/f", F, "1"), ("d", L, "..")],
        ),
        (
            "file beneath a link made earlier",
            vec![("sub/d", L, ".."), ("sub/d/f", F, "1")],
        ),
        (
            "file beneath a link made later",
            vec![("sub/d/f", F, "1"), ("sub/d", L, "..")],
        ),
        ("file beneath a file", vec![("f", F, "1"), ("f/g", F, "2")]),
        ("the same file twice", vec![("f", F, "1"), ("./f", F, "2")]),
        ("hard link", vec![("f", F, "1"), ("g", H, "f")]),
        ("hard link out", vec![("g", H, "/etc/shadow")]),
        ("fifo", vec![("p", tar::EntryType::Fifo, "")]),
        ("char device", vec![("c", tar::EntryType::Char, "")]),
        ("block device", vec![("b", tar::EntryType::Block, "")]),
    ];
    for (what, entries) in cases {
        let bytes = raw_tar(&entries);
        assert!(
            verify(&bytes[..], Limits::default()).is_err(),
            "{what} was accepted"
        );
    }
}

#[test]
fn links_inside_the_tree_and_chains_of_them_are_fine() {
    let bytes = raw_tar(&[
        ("flake.nix", F, "{}"),
        ("lib/a.nix", F, "1"),
        ("lib/b.nix", L, "a.nix"),
        ("c.nix", L, "lib/b.nix"),
        ("lib/up", L, ".."),
        ("lib/dangling", L, "nowhere/x"),
    ]);
    let dest = tempfile::tempdir().unwrap();
    assert_eq!(unpack(&bytes, dest.path(), Limits::default()).unwrap(), 6);
    assert_eq!(
        std::fs::read_to_string(dest.path().join("c.nix")).unwrap(),
        "1"
    );
    // Read-only: nothing can change what a run evaluates.
    assert!(
        std::fs::metadata(dest.path().join("lib/a.nix"))
            .unwrap()
            .permissions()
            .readonly()
    );
    remove_tree(dest.path()).unwrap();
    assert!(!dest.path().exists());
}

#[test]
fn a_tar_longer_than_the_limit_is_refused_while_reading() {
    let big = "x".repeat(4096);
    let bytes = raw_tar(&[("a", F, &big), ("b", F, &big)]);
    let small = Limits {
        max_bytes: 5000,
        max_entries: 10,
    };
    assert!(matches!(
        verify(&bytes[..], small),
        Err(SnapshotError::TooLarge { .. })
    ));
}

#[test]
fn enforces_limits() {
    let d = tree();
    let files = vec![PathBuf::from("flake.nix"), PathBuf::from("pkgs/a/x.nix")];
    let small = Limits {
        max_bytes: 5,
        max_entries: 10,
    };
    assert!(matches!(
        pack(d.path(), &files, small),
        Err(SnapshotError::TooLarge { .. })
    ));
    let few = Limits {
        max_bytes: 1 << 20,
        max_entries: 1,
    };
    assert!(matches!(
        pack(d.path(), &files, few),
        Err(SnapshotError::TooManyEntries { .. })
    ));
}

#[test]
fn an_agent_takes_a_coordinators_limits_only_within_its_own() {
    let l = Limits::from_coordinator(u64::MAX, u64::MAX);
    assert_eq!(
        (l.max_bytes, l.max_entries),
        (Limits::MAX_BYTES, Limits::MAX_ENTRIES)
    );
    let l = Limits::from_coordinator(1 << 20, 10);
    assert_eq!((l.max_bytes, l.max_entries), (1 << 20, 10));
}

/// A tar with one file at `path` (a GNU long name when it needs one) of `content`.
fn one_file(path: &str, content: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(content.len() as u64);
    b.append_data(&mut h, path, content).unwrap();
    b.into_inner().unwrap()
}

/// Paths deeper or with longer components than any checkout's are refused before anything
/// is written; one deep enough that its whole path is longer than the system takes (from
/// the tree's own directory) is still unpacked and removed.
#[test]
fn deep_paths_are_bounded_and_a_deep_tree_is_removed() {
    let deep = vec!["d"; 300].join("/") + "/f";
    let long = format!("{}/f", "x".repeat(256));
    for path in [deep.as_str(), long.as_str()] {
        let tar = one_file(path, b"1");
        assert!(
            matches!(
                verify(&tar[..], Limits::default()),
                Err(SnapshotError::UnsafePath(_))
            ),
            "{}",
            &path[..20]
        );
    }
    // 250 components of 15 bytes: 4 KB of path below the tree's root.
    let within = vec!["ddddddddddddddd"; 250].join("/") + "/f";
    let tar = one_file(&within, b"1");
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("tree");
    std::fs::create_dir_all(&dest).unwrap();
    unpack(&tar, &dest, Limits::default()).unwrap();
    remove_tree(&dest).unwrap();
    assert!(!dest.exists());
    remove_tree(&dest).unwrap();
}

/// A file's size is what its PAX header says, when it says one: counted against the limit.
#[test]
fn a_pax_size_counts_against_the_limit() {
    let mut b = tar::Builder::new(Vec::new());
    let content = vec![b'x'; 4096];
    b.append_pax_extensions([("size", b"4096".as_slice())])
        .unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(0);
    h.set_path("big").unwrap();
    h.set_cksum();
    // The header says 0 bytes; the PAX header, and what follows, 4096.
    b.append(&h, content.as_slice()).unwrap();
    let bytes = b.into_inner().unwrap();
    let limits = Limits {
        max_bytes: 1000,
        ..Limits::default()
    };
    let r = verify(&bytes[..], limits);
    assert!(matches!(r, Err(SnapshotError::TooLarge { .. })), "{r:?}");
}

/// Thousands of links whose targets are thousands of components long (as long as a target
/// may be) are checked in time that grows with their bytes: each prefix of each target was
/// hashed whole before, minutes of a coordinator's CPU for one upload, and again on every
/// agent that unpacked it.
#[test]
fn long_link_targets_are_checked_in_linear_time() {
    let target = format!("{}a", "a/".repeat(2047));
    assert_eq!(target.len(), 4095);
    let mut b = tar::Builder::new(Vec::new());
    for i in 0..3000 {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        b.append_link(&mut h, format!("links/l{i}"), &target)
            .unwrap();
    }
    let bytes = b.into_inner().unwrap();
    let started = std::time::Instant::now();
    assert_eq!(verify(&bytes[..], Limits::default()).unwrap(), 3000);
    // Quadratic, this took minutes; linear, well under a second here.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

/// A link whose target steps through another link of the tree (`README -> docs/README.md`
/// with `docs -> doc`) is refused by whoever receives the snapshot: packing refuses it too,
/// naming it, rather than upload a snapshot only to have it refused.
#[test]
fn pack_refuses_a_link_through_another_link_as_receivers_do() {
    let d = tree();
    std::fs::create_dir_all(d.path().join("doc")).unwrap();
    std::fs::write(d.path().join("doc/README.md"), "hi").unwrap();
    std::os::unix::fs::symlink("doc", d.path().join("docs")).unwrap();
    std::os::unix::fs::symlink("docs/README.md", d.path().join("README")).unwrap();
    let files: Vec<PathBuf> = ["doc/README.md", "docs", "README", "flake.nix"]
        .iter()
        .map(PathBuf::from)
        .collect();
    let e = pack(d.path(), &files, Limits::default()).unwrap_err();
    assert!(
        matches!(&e, SnapshotError::UnsafeLink(p) if p == "README"),
        "{e}"
    );
    // Through the directory itself it packs, and unpacks as it was.
    std::fs::remove_file(d.path().join("README")).unwrap();
    std::os::unix::fs::symlink("doc/README.md", d.path().join("README")).unwrap();
    let tar = pack(d.path(), &files, Limits::default()).unwrap();
    verify(&tar[..], Limits::default()).unwrap();
}
