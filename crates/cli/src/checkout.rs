//! The checkout a fixing session edits: its `.nix` files as submitted, and the fixes written
//! back into it (`--apply`), all or nothing.

use crate::source;
use anyhow::{Context, bail};
use nixfarm_fix::Tree;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The checkout as submitted: its `.nix` files' text.
pub(crate) struct Checkout {
    pub(crate) dir: PathBuf,
    pub(crate) original: Tree,
}

impl Checkout {
    /// The files `reader` sees (those a snapshot holds).
    pub(crate) fn read(dir: &Path, reader: source::Reader) -> anyhow::Result<Checkout> {
        let mut original = Tree::new();
        for rel in source::snapshot_files(dir, reader)?.files {
            if rel.extension().is_some_and(|e| e == "nix") {
                let full = dir.join(&rel);
                // A regular file of the tree only (a link could point anywhere, /proc
                // included), and no larger than a snapshot may be.
                let max = nixfarm_core::snapshot::Limits::MAX_BYTES;
                match std::fs::symlink_metadata(&full) {
                    Ok(m) if m.is_file() && m.len() <= max => {}
                    _ => continue,
                }
                let mut bytes = Vec::new();
                std::fs::File::open(&full)
                    .and_then(|f| {
                        std::io::Read::read_to_end(&mut std::io::Read::take(f, max), &mut bytes)
                    })
                    .with_context(|| format!("cannot read {}", full.display()))?;
                // A file (or a name) that is not UTF-8 cannot be edited as text; it is left
                // alone (and still snapshotted exactly).
                if let (Some(name), Ok(text)) = (rel.to_str(), String::from_utf8(bytes)) {
                    original.insert(name.to_string(), text);
                }
            }
        }
        Ok(Checkout {
            dir: dir.to_path_buf(),
            original,
        })
    }

    pub(crate) fn overrides(&self, current: &Tree) -> BTreeMap<PathBuf, Vec<u8>> {
        current
            .iter()
            .filter(|(k, v)| self.original.get(*k) != Some(*v))
            .map(|(k, v)| (PathBuf::from(k), v.clone().into_bytes()))
            .collect()
    }
}

/// Writes the edited files into the checkout, all or nothing, after checking that none of
/// them changed since the submit.
/// Whether the patch can be written to `path` (`--patch-out`), asked before the run rather
/// than found out after it: an existing file is opened to append (nothing written), a new
/// one created and removed again.
pub(crate) fn check_patch_out(path: &Path) -> anyhow::Result<()> {
    let writable = if path.exists() {
        std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map(drop)
    } else {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .and_then(|_| std::fs::remove_file(path))
    };
    writable.with_context(|| format!("cannot write the patch to {} (--patch-out)", path.display()))
}

pub(crate) fn apply_to_checkout(checkout: &Checkout, changed: &Tree) -> anyhow::Result<()> {
    apply_staged_then(checkout, changed, || {})
}

/// [`apply_to_checkout`], running `meanwhile` once every file is staged (tests: an edit
/// made while the others were being written).
fn apply_staged_then(
    checkout: &Checkout,
    changed: &Tree,
    meanwhile: impl FnOnce(),
) -> anyhow::Result<()> {
    if changed.is_empty() {
        note!("nothing to apply: no hash needed filling in");
        return Ok(());
    }
    let unchanged = |file: &str| -> anyhow::Result<()> {
        let full = checkout.dir.join(file);
        let now =
            std::fs::read(&full).with_context(|| format!("cannot read {}", full.display()))?;
        if checkout.original.get(file).map(|s| s.as_bytes()) != Some(now.as_slice()) {
            bail!(
                "refusing to apply: {file} changed since the submit; nothing was written (the report lists each fix; --patch-out FILE writes them as a patch to merge by hand)"
            );
        }
        Ok(())
    };
    for file in changed.keys() {
        unchanged(file)?;
    }
    let mut staged: Vec<(PathBuf, PathBuf)> = Vec::new();
    for (file, text) in changed {
        let full = checkout.dir.join(file);
        let perms = std::fs::metadata(&full)?.permissions();
        if let Err(e) =
            staged_copy(&full, text.as_bytes(), perms).map(|tmp| staged.push((tmp, full.clone())))
        {
            // Only what this created: a name in the tree is never removed.
            for (t, _) in &staged {
                let _ = std::fs::remove_file(t);
            }
            return Err(e).with_context(|| format!("cannot write beside {}", full.display()));
        }
    }
    meanwhile();
    // Again, now that everything is staged (writing them took a while): an editor that
    // saved one meanwhile keeps its edit, and nothing is written.
    let drop_staged = |from: usize| {
        for (t, _) in &staged[from..] {
            let _ = std::fs::remove_file(t);
        }
    };
    if let Err(e) = changed.keys().try_for_each(|f| unchanged(f)) {
        drop_staged(0);
        return Err(e);
    }
    for (i, (tmp, full)) in staged.iter().enumerate() {
        if let Err(e) = std::fs::rename(tmp, full) {
            drop_staged(i);
            return Err(e).with_context(|| {
                format!(
                    "cannot replace {} ({i} of {} files were written)",
                    full.display(),
                    staged.len()
                )
            });
        }
    }
    // The renames themselves reach the disk (a power cut would otherwise keep the old names).
    let dirs: std::collections::BTreeSet<&Path> = staged
        .iter()
        .filter_map(|(_, full)| full.parent())
        .collect();
    for d in dirs {
        let _ = std::fs::File::open(d).and_then(|f| f.sync_all());
    }
    note!(
        "applied hash fixes to {} file(s) in {}",
        staged.len(),
        checkout.dir.display()
    );
    Ok(())
}

/// Writes `text` to a new file beside `full` (a name nothing in the tree has: created with
/// O_EXCL, so a link the repository put there is never followed), with `perms`; its path.
fn staged_copy(full: &Path, text: &[u8], perms: std::fs::Permissions) -> std::io::Result<PathBuf> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let (Some(dir), Some(name)) = (full.parent(), full.file_name()) else {
        return Err(std::io::Error::other("not a file's path"));
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    for attempt in 0..16 {
        let tmp = dir.join(format!(
            ".{}.nixfarm-{}-{nanos:x}-{attempt}.tmp",
            name.to_string_lossy(),
            std::process::id()
        ));
        let mut f = match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(perms.mode() & 0o7777)
            .open(&tmp)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        };
        // On the handle (the umask narrowed the mode at creation).
        let written = f
            .write_all(text)
            .and_then(|()| f.set_permissions(perms.clone()))
            .and_then(|()| f.sync_all());
        return match written {
            Ok(()) => Ok(tmp),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        };
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AlreadyExists,
        "no free temporary name beside it",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkout() -> (tempfile::TempDir, Checkout, Tree) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("flake.nix"), "{ }").unwrap();
        std::fs::create_dir(dir.path().join("pkgs")).unwrap();
        std::fs::write(dir.path().join("pkgs/a.nix"), "{ hash = lib.fakeHash; }\n").unwrap();
        std::fs::write(dir.path().join("pkgs/b.nix"), "{ hash = lib.fakeHash; }\n").unwrap();
        let c = Checkout::read(dir.path(), source::Reader::File).unwrap();
        let mut changed = Tree::new();
        for f in ["pkgs/a.nix", "pkgs/b.nix"] {
            changed.insert(f.into(), "{ hash = \"sha256-x\"; }\n".into());
        }
        (dir, c, changed)
    }

    #[test]
    fn a_nix_file_that_is_a_link_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("x.nix"), "{ secret = 1; }").unwrap();
        std::fs::write(dir.path().join("flake.nix"), "{ }").unwrap();
        std::os::unix::fs::symlink(outside.path().join("x.nix"), dir.path().join("x.nix")).unwrap();
        let c = Checkout::read(dir.path(), source::Reader::File).unwrap();
        assert!(!c.original.contains_key("x.nix"));
        assert!(c.original.contains_key("flake.nix"));
    }

    #[test]
    fn apply_writes_every_file() {
        let (dir, c, changed) = checkout();
        assert_eq!(c.original.len(), 3);
        apply_to_checkout(&c, &changed).unwrap();
        for f in ["pkgs/a.nix", "pkgs/b.nix"] {
            assert_eq!(
                std::fs::read_to_string(dir.path().join(f)).unwrap(),
                changed[f]
            );
        }
    }

    #[test]
    fn apply_follows_no_link_the_repository_put_beside_a_file() {
        let (dir, c, changed) = checkout();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("bashrc");
        std::fs::write(&victim, "mine\n").unwrap();
        // Every name an older nixfarm used for its temporary copy, as links out of the tree.
        for f in ["pkgs/a.nix", "pkgs/b.nix"] {
            let tmp = dir.path().join(f).with_extension("nix.nixfarm-tmp");
            std::os::unix::fs::symlink(&victim, tmp).unwrap();
        }
        apply_to_checkout(&c, &changed).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "mine\n");
        for f in ["pkgs/a.nix", "pkgs/b.nix"] {
            let full = dir.path().join(f);
            assert!(std::fs::symlink_metadata(&full).unwrap().is_file());
            assert_eq!(std::fs::read_to_string(full).unwrap(), changed[f]);
        }
    }

    #[test]
    fn apply_refuses_when_a_file_changed_since_the_submit_and_writes_nothing() {
        let (dir, c, changed) = checkout();
        std::fs::write(
            dir.path().join("pkgs/b.nix"),
            "{ hash = lib.fakeHash; x = 1; }\n",
        )
        .unwrap();
        let err = apply_to_checkout(&c, &changed).unwrap_err().to_string();
        assert!(err.contains("pkgs/b.nix changed since the submit"), "{err}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("pkgs/a.nix")).unwrap(),
            "{ hash = lib.fakeHash; }\n",
            "nothing written"
        );
        let leftovers = std::fs::read_dir(dir.path().join("pkgs")).unwrap().count();
        assert_eq!(leftovers, 2);
    }

    /// An editor saving a file while the fixes are being staged keeps its edit: the files
    /// are compared again just before any is replaced, and nothing is written.
    #[test]
    fn apply_refuses_a_file_changed_while_the_fixes_were_staged() {
        let (dir, c, changed) = checkout();
        let b = dir.path().join("pkgs/b.nix");
        let saved = "{ hash = lib.fakeHash; saved = true; }\n";
        let err = apply_staged_then(&c, &changed, || std::fs::write(&b, saved).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("pkgs/b.nix changed since the submit"), "{err}");
        assert_eq!(std::fs::read_to_string(&b).unwrap(), saved);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("pkgs/a.nix")).unwrap(),
            "{ hash = lib.fakeHash; }\n",
            "nothing written"
        );
        let leftovers = std::fs::read_dir(dir.path().join("pkgs")).unwrap().count();
        assert_eq!(leftovers, 2, "staged copies removed");
    }
}
