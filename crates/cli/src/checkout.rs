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
    pub(crate) fn read(dir: &Path) -> anyhow::Result<Checkout> {
        let mut original = Tree::new();
        for rel in source::list_files(dir)? {
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
pub(crate) fn apply_to_checkout(checkout: &Checkout, changed: &Tree) -> anyhow::Result<()> {
    if changed.is_empty() {
        eprintln!("nothing to apply: no hash needed filling in");
        return Ok(());
    }
    for file in changed.keys() {
        let full = checkout.dir.join(file);
        let now =
            std::fs::read(&full).with_context(|| format!("cannot read {}", full.display()))?;
        if checkout.original.get(file).map(|s| s.as_bytes()) != Some(now.as_slice()) {
            bail!(
                "refusing to apply: {file} changed since the submit; nothing was written (use --patch-out and merge by hand)"
            );
        }
    }
    let mut staged = Vec::new();
    for (file, text) in changed {
        let full = checkout.dir.join(file);
        let tmp = full.with_extension("nix.nixfarm-tmp");
        let perms = std::fs::metadata(&full)?.permissions();
        if let Err(e) =
            std::fs::write(&tmp, text).and_then(|_| std::fs::set_permissions(&tmp, perms))
        {
            for (t, _) in &staged {
                let _ = std::fs::remove_file(t);
            }
            let _ = std::fs::remove_file(&tmp);
            return Err(e).with_context(|| format!("cannot write {}", tmp.display()));
        }
        staged.push((tmp, full));
    }
    for (tmp, full) in &staged {
        std::fs::rename(tmp, full).with_context(|| format!("cannot replace {}", full.display()))?;
    }
    eprintln!(
        "applied hash fixes to {} file(s) in {}",
        staged.len(),
        checkout.dir.display()
    );
    Ok(())
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
        let c = Checkout::read(dir.path()).unwrap();
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
        let c = Checkout::read(dir.path()).unwrap();
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
}
