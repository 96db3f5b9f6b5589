//! Source snapshots: a deterministic tar of a checkout's files, content-addressed by SHA-256,
//! and a checked unpacker that refuses anything that could escape the target directory.

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// Limits on what a snapshot may hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Total size of the tar, in bytes.
    pub max_bytes: u64,
    /// Number of entries (files, directories, links).
    pub max_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 256 * 1024 * 1024,
            max_entries: 100_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("snapshot holds more than {limit} files")]
    TooManyEntries { limit: usize },
    #[error("snapshot entry '{0}' is an absolute path or leaves the tree")]
    UnsafePath(String),
    #[error("snapshot entry '{0}' is a link that points outside the tree")]
    UnsafeLink(String),
    #[error("snapshot entry '{0}' has an unsupported type")]
    UnsupportedEntry(String),
    #[error("cannot read {path}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

fn io(path: impl AsRef<Path>) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.as_ref().display().to_string();
    move |source| SnapshotError::Io { path, source }
}

/// Hex SHA-256 of bytes: a snapshot's identity.
pub fn digest(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(&Sha256::digest(bytes))
}

/// Packs `files` (paths relative to `root`) into a tar with fixed metadata, so the same
/// tree always gives the same bytes and the same digest.
pub fn pack(root: &Path, files: &[PathBuf], limits: Limits) -> Result<Vec<u8>, SnapshotError> {
    pack_with(root, files, &BTreeMap::new(), limits)
}

/// Like [`pack`], with the content of some regular files replaced (an edited tree that is not
/// written to disk).
pub fn pack_with(
    root: &Path,
    files: &[PathBuf],
    overrides: &BTreeMap<PathBuf, Vec<u8>>,
    limits: Limits,
) -> Result<Vec<u8>, SnapshotError> {
    let mut files: Vec<&PathBuf> = files.iter().collect();
    files.sort();
    files.dedup();
    if files.len() > limits.max_entries {
        return Err(SnapshotError::TooManyEntries {
            limit: limits.max_entries,
        });
    }
    let mut builder = tar::Builder::new(Vec::new());
    let mut total: u64 = 0;
    for rel in files {
        check_relative(rel)?;
        let full = root.join(rel);
        let meta = std::fs::symlink_metadata(&full).map_err(io(&full))?;
        let mut header = tar::Header::new_gnu();
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&full).map_err(io(&full))?;
            check_link(rel, &target)?;
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            header.set_mode(0o777);
            builder
                .append_link(&mut header, rel, &target)
                .map_err(io(&full))?;
        } else if meta.is_file() {
            use std::os::unix::fs::PermissionsExt;
            let replaced = overrides.get(rel.as_path());
            let len = replaced.map_or(meta.len(), |b| b.len() as u64);
            total += len;
            if total > limits.max_bytes {
                return Err(SnapshotError::TooLarge {
                    limit: limits.max_bytes,
                });
            }
            let exec = meta.permissions().mode() & 0o111 != 0;
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(len);
            header.set_mode(if exec { 0o755 } else { 0o644 });
            if let Some(bytes) = replaced {
                builder
                    .append_data(&mut header, rel, bytes.as_slice())
                    .map_err(io(&full))?;
            } else {
                let f = std::fs::File::open(&full).map_err(io(&full))?;
                builder
                    .append_data(&mut header, rel, f)
                    .map_err(io(&full))?;
            }
        }
        // Directories are implied by their files; sockets and devices are skipped.
    }
    builder.into_inner().map_err(io(root))
}

fn check_relative(rel: &Path) -> Result<(), SnapshotError> {
    let ok = !rel.as_os_str().is_empty()
        && rel
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if ok {
        Ok(())
    } else {
        Err(SnapshotError::UnsafePath(rel.display().to_string()))
    }
}

/// A link is safe when, resolved lexically from its own directory, it stays inside the tree.
fn check_link(rel: &Path, target: &Path) -> Result<(), SnapshotError> {
    if target.is_absolute() {
        return Err(SnapshotError::UnsafeLink(rel.display().to_string()));
    }
    let mut depth: i64 = rel.components().count() as i64 - 1;
    for c in target.components() {
        match c {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            _ => return Err(SnapshotError::UnsafeLink(rel.display().to_string())),
        }
        if depth < 0 {
            return Err(SnapshotError::UnsafeLink(rel.display().to_string()));
        }
    }
    Ok(())
}

/// Checks a snapshot without unpacking it: sizes, entry count, paths and links.
pub fn verify(bytes: &[u8], limits: Limits) -> Result<usize, SnapshotError> {
    walk(bytes, limits, |_, _| Ok(()))
}

/// Unpacks a verified snapshot into `dest` (which must exist).
pub fn unpack(bytes: &[u8], dest: &Path, limits: Limits) -> Result<usize, SnapshotError> {
    verify(bytes, limits)?;
    walk(bytes, limits, |entry, rel| {
        let out = dest.join(rel);
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        match entry.header().entry_type() {
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(io(&out))?
                    .unwrap_or_default()
                    .into_owned();
                std::os::unix::fs::symlink(&target, &out).map_err(io(&out))?;
            }
            tar::EntryType::Directory => std::fs::create_dir_all(&out).map_err(io(&out))?,
            _ => {
                use std::os::unix::fs::PermissionsExt;
                let mode = entry.header().mode().map_err(io(&out))?;
                let mut data = Vec::new();
                entry.read_to_end(&mut data).map_err(io(&out))?;
                std::fs::write(&out, &data).map_err(io(&out))?;
                let perm = if mode & 0o111 != 0 { 0o755 } else { 0o644 };
                std::fs::set_permissions(&out, std::fs::Permissions::from_mode(perm))
                    .map_err(io(&out))?;
            }
        }
        Ok(())
    })
}

fn walk(
    bytes: &[u8],
    limits: Limits,
    mut f: impl FnMut(&mut tar::Entry<'_, &[u8]>, &Path) -> Result<(), SnapshotError>,
) -> Result<usize, SnapshotError> {
    if bytes.len() as u64 > limits.max_bytes + (limits.max_entries as u64 + 2) * 1024 {
        return Err(SnapshotError::TooLarge {
            limit: limits.max_bytes,
        });
    }
    let mut archive = tar::Archive::new(bytes);
    let mut count = 0;
    let mut total = 0u64;
    for entry in archive.entries().map_err(io("snapshot"))? {
        let mut entry = entry.map_err(io("snapshot"))?;
        count += 1;
        if count > limits.max_entries {
            return Err(SnapshotError::TooManyEntries {
                limit: limits.max_entries,
            });
        }
        let rel = entry.path().map_err(io("snapshot"))?.into_owned();
        check_relative(&rel)?;
        match entry.header().entry_type() {
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(io(&rel))?
                    .unwrap_or_default()
                    .into_owned();
                check_link(&rel, &target)?;
            }
            tar::EntryType::Regular | tar::EntryType::Directory | tar::EntryType::Continuous => {}
            _ => return Err(SnapshotError::UnsupportedEntry(rel.display().to_string())),
        }
        total += entry.header().size().map_err(io(&rel))?;
        if total > limits.max_bytes {
            return Err(SnapshotError::TooLarge {
                limit: limits.max_bytes,
            });
        }
        f(&mut entry, &rel)?;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
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
            verify(&bytes, Limits::default()),
            Err(SnapshotError::UnsafePath(_))
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
}
