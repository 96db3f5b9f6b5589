//! The `.nix` files of uploaded snapshots, read once and kept for a few runs: the text the
//! coordinator's hash fixer searches to turn a run's hash mismatches into edits and a patch.

use nixfarm_fix::Tree;
use std::collections::VecDeque;
use std::io::Read as _;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Snapshots whose trees are kept in memory at once.
const KEPT: usize = 4;
/// Largest `.nix` file read, bytes (a bigger one is generated data, not a package).
const MAX_FILE: u64 = 4 << 20;
/// Most `.nix` text read from one snapshot, bytes.
const MAX_TOTAL: u64 = 64 << 20;

#[derive(Default)]
pub struct TreeCache {
    kept: Mutex<VecDeque<(String, Arc<Tree>)>>,
}

impl TreeCache {
    /// The tree of snapshot `digest` stored at `tar`, read on first use.
    pub fn get(&self, digest: &str, tar: &Path) -> std::io::Result<Arc<Tree>> {
        if let Ok(kept) = self.kept.lock()
            && let Some((_, t)) = kept.iter().find(|(d, _)| d == digest)
        {
            return Ok(t.clone());
        }
        let tree = Arc::new(load(tar)?);
        if let Ok(mut kept) = self.kept.lock() {
            if kept.len() >= KEPT {
                kept.pop_front();
            }
            kept.push_back((digest.to_string(), tree.clone()));
        }
        Ok(tree)
    }
}

/// The UTF-8 `.nix` files of a snapshot tar (already checked whole when it was uploaded),
/// within the size bounds above.
pub fn load(tar: &Path) -> std::io::Result<Tree> {
    let mut archive = tar::Archive::new(std::fs::File::open(tar)?);
    let mut tree = Tree::new();
    let mut total = 0u64;
    for entry in archive.entries()? {
        let mut entry = entry?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let size = entry.header().size()?;
        let path = entry.path()?.into_owned();
        let Some(name) = path.to_str() else { continue };
        let name = name.trim_start_matches("./").to_string();
        if !name.ends_with(".nix") || size > MAX_FILE || total + size > MAX_TOTAL {
            continue;
        }
        let mut bytes = Vec::with_capacity(size as usize);
        entry.by_ref().take(MAX_FILE).read_to_end(&mut bytes)?;
        total += bytes.len() as u64;
        if let Ok(text) = String::from_utf8(bytes) {
            tree.insert(name, text);
        }
    }
    Ok(tree)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_nix_files_of_a_snapshot_once() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir_all(src.join("pkgs")).unwrap();
        std::fs::write(src.join("flake.nix"), "{ }").unwrap();
        std::fs::write(src.join("pkgs/a.nix"), "{ hash = \"\"; }").unwrap();
        std::fs::write(src.join("README.md"), "not nix").unwrap();
        std::fs::write(src.join("pkgs/latin1.nix"), b"\xe9").unwrap();
        let files: Vec<std::path::PathBuf> =
            ["flake.nix", "pkgs/a.nix", "README.md", "pkgs/latin1.nix"]
                .iter()
                .map(std::path::PathBuf::from)
                .collect();
        let tar = nixfarm_core::snapshot::pack(&src, &files, Default::default()).unwrap();
        let path = d.path().join("x.tar");
        std::fs::write(&path, tar).unwrap();
        let cache = TreeCache::default();
        let t = cache.get("x", &path).unwrap();
        assert_eq!(
            t.keys().cloned().collect::<Vec<_>>(),
            vec!["flake.nix".to_string(), "pkgs/a.nix".to_string()]
        );
        // Kept: a second look does not read the file again.
        std::fs::remove_file(&path).unwrap();
        assert!(Arc::ptr_eq(&t, &cache.get("x", &path).unwrap()));
    }
}
