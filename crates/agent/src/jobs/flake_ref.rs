//! References to a run's unpacked tree: `path:TREE`, and for a flake in a subdirectory of
//! its repository a tarball of the tree with `?dir=` (Nix 2.8 takes no `dir` of a `path:`).

use std::path::PathBuf;

/// The tree a reference to a run's unpacked snapshot names, and the directory of its flake:
/// `path:TREE` (the tree's root), or `file://TREE.flake.tar?dir=SUB` for a flake in a
/// subdirectory of its repository (see [`flake_in_dir`]). None for any other reference.
pub(super) fn local_flake(reference: &str) -> Option<(PathBuf, PathBuf)> {
    if let Some(root) = reference.strip_prefix("path:") {
        if root.contains('?') {
            return None;
        }
        return Some((PathBuf::from(root), PathBuf::from(root)));
    }
    let (tar, dir) = reference.strip_prefix("file://")?.split_once("?dir=")?;
    nixfarm_core::entry::check_flake_dir(dir).ok()?;
    let root = PathBuf::from(tar.strip_suffix(FLAKE_TAR)?);
    let flake = root.join(dir);
    Some((root, flake))
}

/// What a run's tree is packed as for a flake in a subdirectory, beside the tree.
pub(super) const FLAKE_TAR: &str = ".flake.tar";

/// The reference to the flake in `dir` of the run's unpacked tree `root`, read with the
/// whole tree as Nix reads `./sub` of a git repository. Nix 2.8 takes `?dir=` of a tarball
/// and not of a `path:`, so the tree (already checked, links and all) is packed once into a
/// tarball of one top directory beside it, which Nix unpacks into its store.
pub(super) fn flake_in_dir(root: &std::path::Path, dir: &str) -> Result<String, String> {
    let mut tar = root.as_os_str().to_owned();
    tar.push(FLAKE_TAR);
    let tar = PathBuf::from(tar);
    if !tar.is_file() {
        let tmp = tar.with_extension(format!("tmp-{:016x}", fastrand::u64(..)));
        let pack = || -> std::io::Result<()> {
            let mut b = ::tar::Builder::new(std::fs::File::create(&tmp)?);
            b.follow_symlinks(false);
            // No times of this host's unpacking: the flake's lastModified is the same on
            // every agent.
            b.mode(::tar::HeaderMode::Deterministic);
            b.append_dir_all("source", root)?;
            b.into_inner()?.sync_all()?;
            std::fs::rename(&tmp, &tar)
        };
        // A repository may be large: packed off the runtime's own threads.
        let packed = match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(pack)
            }
            _ => pack(),
        };
        if let Err(e) = packed {
            let _ = std::fs::remove_file(&tmp);
            return Err(format!(
                "cannot pack the checkout for its flake in {dir}: {e}"
            ));
        }
    }
    Ok(format!("file://{}?dir={dir}", tar.display()))
}
