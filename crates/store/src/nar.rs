//! NAR serialization, streamed: file contents are copied in chunks, so memory stays bounded
//! whatever the size of the tree.

use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn padding(n: u64) -> usize {
    ((8 - (n % 8)) % 8) as usize
}

fn write_bytes(w: &mut impl Write, b: &[u8]) -> io::Result<()> {
    w.write_all(&(b.len() as u64).to_le_bytes())?;
    w.write_all(b)?;
    w.write_all(&[0u8; 8][..padding(b.len() as u64)])
}

fn write_str(w: &mut impl Write, s: &str) -> io::Result<()> {
    write_bytes(w, s.as_bytes())
}

/// Copies with a 1 MiB buffer (io::copy's 8 KiB means a write per 8 KiB through the hashers
/// and the compressor), allocated only for files larger than a small one.
fn copy_large(r: &mut impl Read, w: &mut impl Write) -> io::Result<u64> {
    let mut small = [0u8; 16 << 10];
    let mut large: Vec<u8> = Vec::new();
    let mut total = 0u64;
    loop {
        let buf: &mut [u8] = if total >= small.len() as u64 {
            if large.is_empty() {
                large = vec![0u8; 256 << 10];
            }
            &mut large
        } else {
            &mut small
        };
        let n = match r.read(buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        w.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// Writes the NAR of `path` (a file, directory or symlink) to `w`, as `nix-store --dump` does.
pub fn dump(path: &Path, w: &mut impl Write) -> io::Result<()> {
    write_str(w, "nix-archive-1")?;
    node(path, w)
}

fn node(path: &Path, w: &mut impl Write) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    write_str(w, "(")?;
    write_str(w, "type")?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        write_str(w, "symlink")?;
        write_str(w, "target")?;
        write_bytes(w, std::fs::read_link(path)?.as_os_str().as_bytes())?;
    } else if ft.is_file() {
        write_str(w, "regular")?;
        if meta.permissions().mode() & 0o100 != 0 {
            write_str(w, "executable")?;
            write_str(w, "")?;
        }
        write_str(w, "contents")?;
        let len = meta.len();
        w.write_all(&len.to_le_bytes())?;
        let f = std::fs::File::open(path)?;
        let copied = copy_large(&mut f.take(len), w)?;
        if copied != len {
            return Err(io::Error::other(format!(
                "{} changed size while being archived",
                path.display()
            )));
        }
        w.write_all(&[0u8; 8][..padding(len)])?;
    } else if ft.is_dir() {
        write_str(w, "directory")?;
        let mut entries: Vec<_> = std::fs::read_dir(path)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        // NAR orders entries by the bytes of their names.
        entries.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in entries {
            write_str(w, "entry")?;
            write_str(w, "(")?;
            write_str(w, "name")?;
            write_bytes(w, name.as_bytes())?;
            write_str(w, "node")?;
            node(&path.join(&name), w)?;
            write_str(w, ")")?;
        }
    } else {
        return Err(io::Error::other(format!(
            "{}: not a file, directory or symlink",
            path.display()
        )));
    }
    write_str(w, ")")
}

/// The contents of a NAR that holds one regular file (a derivation, say); None for any
/// other NAR or one that is not well formed.
pub fn single_file(nar: &[u8]) -> Option<&[u8]> {
    let mut at = 0usize;
    let mut next = || -> Option<&[u8]> {
        let len = u64::from_le_bytes(nar.get(at..at + 8)?.try_into().ok()?);
        let len = usize::try_from(len).ok()?;
        let start = at + 8;
        let end = start.checked_add(len)?;
        let bytes = nar.get(start..end)?;
        at = end + padding(len as u64);
        Some(bytes)
    };
    for want in [&b"nix-archive-1"[..], b"(", b"type", b"regular"] {
        if next()? != want {
            return None;
        }
    }
    let mut tag = next()?;
    if tag == b"executable" {
        if !next()?.is_empty() {
            return None;
        }
        tag = next()?;
    }
    if tag != b"contents" {
        return None;
    }
    let contents = next()?;
    if next()? != b")" {
        return None;
    }
    // Nothing may follow.
    (at == nar.len()).then_some(contents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn a_single_files_contents_are_read_back_and_anything_else_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let nar_of = |p: &Path| {
            let mut v = Vec::new();
            dump(p, &mut v).unwrap();
            v
        };
        for (name, body, exec) in [
            ("a.drv", &b"Derive([])"[..], false),
            ("e", b"12345678", true),
        ] {
            let f = dir.path().join(name);
            std::fs::write(&f, body).unwrap();
            if exec {
                std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
            }
            assert_eq!(single_file(&nar_of(&f)), Some(body));
        }
        let sub = dir.path().join("d");
        std::fs::create_dir(&sub).unwrap();
        assert_eq!(single_file(&nar_of(&sub)), None, "a directory");
        let mut nar = nar_of(&dir.path().join("a.drv"));
        assert_eq!(single_file(&nar[..nar.len() - 8]), None, "cut short");
        nar.extend_from_slice(&[0u8; 8]);
        assert_eq!(single_file(&nar), None, "something after it");
        let mut huge = nar_of(&dir.path().join("a.drv"));
        // The contents' length, made absurd.
        let at = huge.windows(8).position(|w| w == b"contents").unwrap() + 8;
        huge[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(single_file(&huge), None, "a length past the end");
    }

    #[test]
    fn matches_nix_store_dump_byte_for_byte() {
        let have_nix = std::process::Command::new("nix-store")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tree");
        std::fs::create_dir_all(root.join("empty-dir")).unwrap();
        std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
        std::fs::write(root.join("empty-file"), b"").unwrap();
        std::fs::write(root.join("seven"), b"1234567").unwrap();
        std::fs::write(root.join("eight"), b"12345678").unwrap();
        std::fs::write(root.join("sub/deeper/x"), vec![7u8; 100_003]).unwrap();
        std::fs::write(root.join("run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
        std::fs::set_permissions(root.join("run.sh"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        std::fs::write(root.join("we ird\u{e9}-n\tame"), b"x").unwrap();
        std::fs::write(root.join("B-upper"), b"sorted before lower").unwrap();
        symlink("sub/deeper/x", root.join("link")).unwrap();
        symlink("/nonexistent/target", root.join("dangling")).unwrap();
        let mut ours = Vec::new();
        dump(&root, &mut ours).unwrap();
        assert_eq!(&ours[8..21], b"nix-archive-1");
        assert_eq!(ours.len() % 8, 0);
        if !have_nix {
            eprintln!("nix-store not installed: compared structure only");
            return;
        }
        for target in [root.clone(), root.join("run.sh"), root.join("link")] {
            let theirs = std::process::Command::new("nix-store")
                .arg("--dump")
                .arg(&target)
                .output()
                .unwrap();
            assert!(theirs.status.success());
            let mut ours = Vec::new();
            dump(&target, &mut ours).unwrap();
            assert!(ours == theirs.stdout, "NAR of {} differs", target.display());
        }
    }
}
