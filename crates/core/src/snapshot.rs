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

impl Limits {
    /// Most a coordinator may set (its config's own bounds): 4 GiB, 1,000,000 entries.
    pub const MAX_BYTES: u64 = 4 << 30;
    pub const MAX_ENTRIES: usize = 1_000_000;

    /// The limits a coordinator told an agent, within [`Limits::MAX_BYTES`] and
    /// [`Limits::MAX_ENTRIES`] whatever it said: they bound what is unpacked on the agent's disk.
    pub fn from_coordinator(max_bytes: u64, max_entries: u64) -> Limits {
        Limits {
            max_bytes: max_bytes.clamp(1, Self::MAX_BYTES),
            max_entries: max_entries.clamp(1, Self::MAX_ENTRIES as u64) as usize,
        }
    }
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
    #[error(
        "snapshot entry '{0}' is a link that points outside the tree (or through another link)"
    )]
    UnsafeLink(String),
    #[error("snapshot entry '{0}' has an unsupported type (only files, directories and links)")]
    UnsupportedEntry(String),
    #[error("snapshot entry '{0}' is a hard link; snapshots hold no hard links")]
    HardLink(String),
    #[error("snapshot holds '{0}' twice")]
    Duplicate(String),
    #[error("snapshot entry '{0}' lies beneath a symbolic link")]
    ThroughLink(String),
    #[error("snapshot entry '{0}' lies beneath a regular file")]
    BeneathFile(String),
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
/// Whether `d` is a snapshot's digest as [`digest`] spells it: 64 lowercase hex digits (one
/// spelling, so a file system that folds case cannot make two of it).
pub fn is_digest(d: &str) -> bool {
    d.len() == 64 && d.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

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
    // What was packed, for the whole-tree rules a receiver checks (see [`verify`]): a
    // snapshot that breaks them fails here, before its upload, not after.
    let mut packed: Vec<(PathBuf, Kind, Option<PathBuf>)> = Vec::with_capacity(files.len());
    let mut checked_dirs: std::collections::HashSet<PathBuf> = std::collections::HashSet::new();
    for rel in files {
        check_relative(rel)?;
        // Every directory above it is a directory of the tree, not a link out of it (a
        // tracked `sub/passwd` whose `sub` became a link to /etc would read /etc/passwd).
        for dir in rel
            .ancestors()
            .skip(1)
            .filter(|d| !d.as_os_str().is_empty())
        {
            if checked_dirs.contains(dir) {
                break;
            }
            let m = std::fs::symlink_metadata(root.join(dir)).map_err(io(root.join(dir)))?;
            if !m.is_dir() {
                return Err(SnapshotError::ThroughLink(rel.display().to_string()));
            }
            checked_dirs.insert(dir.to_path_buf());
        }
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
            packed.push((normal(rel), Kind::Link, Some(target)));
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
                // Exactly the length the header says: a file that grows while it is read
                // (or a /proc file that says 0) cannot pass the size limit or corrupt the tar.
                use std::io::Read as _;
                let f = std::fs::File::open(&full).map_err(io(&full))?;
                let mut bytes = Vec::with_capacity(len as usize);
                f.take(len + 1).read_to_end(&mut bytes).map_err(io(&full))?;
                if bytes.len() as u64 != len {
                    return Err(SnapshotError::Io {
                        path: full.display().to_string(),
                        source: std::io::Error::other("it changed while it was read"),
                    });
                }
                builder
                    .append_data(&mut header, rel, bytes.as_slice())
                    .map_err(io(&full))?;
            }
            packed.push((normal(rel), Kind::File, None));
        }
        // Directories are implied by their files; sockets and devices are skipped.
    }
    check_tree(&packed)?;
    builder.into_inner().map_err(io(root))
}

/// One spelling per path ("a/./b/" is "a/b"), as a receiver reads it.
fn normal(rel: &Path) -> PathBuf {
    rel.components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect()
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

/// Whether a link at `rel` to `target` stays inside the tree, as a snapshot must hold it.
pub fn link_stays_inside(rel: &Path, target: &Path) -> bool {
    check_link(rel, target).is_ok()
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

/// Upper bound on the bytes of a tar holding at most `limits` (headers and padding included).
pub fn max_tar_bytes(limits: Limits) -> u64 {
    limits.max_bytes.saturating_add(
        (limits.max_entries as u64)
            .saturating_add(2)
            .saturating_mul(2048),
    )
}

/// Longest path (or link target) accepted in a snapshot, in bytes (Linux's PATH_MAX).
const MAX_PATH_BYTES: usize = 4096;
/// Most components of a path in a snapshot: checking a path costs a look at each of its
/// ancestors, and a tree far deeper than any checkout's is work for nothing.
const MAX_DEPTH: usize = 256;
/// Longest component of a path, in bytes (what Linux file systems take).
const MAX_COMPONENT_BYTES: usize = 255;

/// What a checked entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    Link,
}

/// A reader that refuses to go past `limit` bytes.
struct Capped<R> {
    inner: R,
    left: u64,
    limit: u64,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            // One byte more than allowed tells a tar that is too long from one that fits.
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(std::io::Error::other(format!(
                    "snapshot is larger than the limit of {} bytes",
                    self.limit
                ))),
            };
        }
        let n = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let got = self.inner.read(&mut buf[..n])?;
        self.left -= got as u64;
        Ok(got)
    }
}

/// Checks a snapshot without unpacking it: sizes, entry count, entry types, and the shape of
/// the whole tree (no duplicate paths, nothing beneath a file or link, every link resolving
/// inside the tree without passing through another link). Returns the number of entries.
pub fn verify(reader: impl Read, limits: Limits) -> Result<usize, SnapshotError> {
    let mut entries: Vec<(PathBuf, Kind, Option<PathBuf>)> = Vec::new();
    walk(reader, limits, |entry, rel, kind| {
        let target = match kind {
            Kind::Link => Some(link_target(entry, rel)?),
            _ => None,
        };
        entries.push((rel.to_path_buf(), kind, target));
        Ok(())
    })?;
    check_tree(&entries)?;
    Ok(entries.len())
}

/// The target of a symlink entry, bounded.
fn link_target(entry: &tar::Entry<'_, impl Read>, rel: &Path) -> Result<PathBuf, SnapshotError> {
    let target = entry
        .link_name()
        .map_err(io(rel))?
        .map(|t| t.into_owned())
        .unwrap_or_default();
    if target.as_os_str().is_empty() || target.as_os_str().len() > MAX_PATH_BYTES {
        return Err(SnapshotError::UnsafeLink(shown(rel)));
    }
    Ok(target)
}

/// A path as error messages show it: bounded, so hostile input is never echoed whole.
fn shown(p: &Path) -> String {
    let s = p.display().to_string();
    if s.len() <= 200 {
        return s;
    }
    let mut end = 200;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Unpacks a snapshot held in memory into `dest` (an existing, empty directory).
pub fn unpack(bytes: &[u8], dest: &Path, limits: Limits) -> Result<usize, SnapshotError> {
    verify(bytes, limits)?;
    extract(bytes, dest, limits)
}

/// Unpacks the snapshot in the file `tar` into `dest` (an existing, empty directory): checked
/// whole first, then written without ever following a link, read-only.
pub fn unpack_file(tar: &Path, dest: &Path, limits: Limits) -> Result<usize, SnapshotError> {
    let open = || {
        std::fs::File::open(tar)
            .map(std::io::BufReader::new)
            .map_err(io(tar))
    };
    verify(open()?, limits)?;
    extract(open()?, dest, limits)
}

/// Writes the entries of a verified tar beneath `dest`. Every path is resolved one component
/// at a time from a directory handle with `O_NOFOLLOW`, and every file is created with
/// `O_EXCL`, so no link (whatever the tar's order) and no pre-existing file is written through.
fn extract(reader: impl Read, dest: &Path, limits: Limits) -> Result<usize, SnapshotError> {
    use rustix::fs::{Mode, OFlags};
    let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let root = rustix::fs::open(dest, dir_flags, Mode::empty()).map_err(|e| errno(dest, e))?;
    let mut dirs: Vec<PathBuf> = Vec::new();
    let mut cached: Option<(PathBuf, std::os::fd::OwnedFd)> = None;
    let count = walk(reader, limits, |entry, rel, kind| {
        let parent = rel.parent().unwrap_or(Path::new(""));
        let name = rel
            .file_name()
            .ok_or_else(|| SnapshotError::UnsafePath(shown(rel)))?;
        if cached.as_ref().is_none_or(|(p, _)| p != parent) {
            let fd = open_beneath(&root, parent, true, &mut dirs)?;
            cached = Some((parent.to_path_buf(), fd));
        }
        let Some((_, dirfd)) = cached.as_ref() else {
            return Err(SnapshotError::UnsafePath(shown(rel)));
        };
        match kind {
            Kind::Dir => match rustix::fs::mkdirat(dirfd, name, Mode::from_raw_mode(0o755)) {
                Ok(()) => dirs.push(rel.to_path_buf()),
                // Implied by an earlier entry: it must be a real directory, not a link.
                Err(rustix::io::Errno::EXIST) => {
                    rustix::fs::openat(dirfd, name, dir_flags, Mode::empty())
                        .map_err(|e| errno(rel, e))?;
                }
                Err(e) => return Err(errno(rel, e)),
            },
            Kind::Link => {
                let target = link_target(entry, rel)?;
                rustix::fs::symlinkat(&target, dirfd, name).map_err(|e| errno(rel, e))?;
            }
            Kind::File => {
                let exec = entry.header().mode().map_err(io(rel))? & 0o111 != 0;
                let mode = if exec { 0o555 } else { 0o444 };
                let fd = rustix::fs::openat(
                    dirfd,
                    name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(mode),
                )
                .map_err(|e| errno(rel, e))?;
                let mut out = std::io::BufWriter::with_capacity(256 << 10, std::fs::File::from(fd));
                std::io::copy(entry, &mut out).map_err(io(rel))?;
                std::io::Write::flush(&mut out).map_err(io(rel))?;
            }
        }
        Ok(())
    })?;
    drop(cached);
    // Read-only once complete: nothing later changes what the run evaluates.
    for d in dirs.iter().rev() {
        let fd = open_beneath(&root, d, false, &mut Vec::new())?;
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o555)).map_err(|e| errno(d, e))?;
    }
    rustix::fs::fchmod(&root, Mode::from_raw_mode(0o555)).map_err(|e| errno(dest, e))?;
    Ok(count)
}

/// Opens the directory `rel` beneath `root`, one component at a time, never following a
/// link; with `create`, missing directories are made (and recorded in `made`).
fn open_beneath(
    root: &std::os::fd::OwnedFd,
    rel: &Path,
    create: bool,
    made: &mut Vec<PathBuf>,
) -> Result<std::os::fd::OwnedFd, SnapshotError> {
    use rustix::fs::{Mode, OFlags};
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut fd = rustix::fs::openat(root, ".", flags, Mode::empty()).map_err(|e| errno(rel, e))?;
    let mut sofar = PathBuf::new();
    for c in rel.components() {
        let Component::Normal(n) = c else {
            return Err(SnapshotError::UnsafePath(shown(rel)));
        };
        sofar.push(n);
        let next = match rustix::fs::openat(&fd, n, flags, Mode::empty()) {
            Err(rustix::io::Errno::NOENT) if create => {
                rustix::fs::mkdirat(&fd, n, Mode::from_raw_mode(0o755))
                    .map_err(|e| errno(&sofar, e))?;
                made.push(sofar.clone());
                rustix::fs::openat(&fd, n, flags, Mode::empty())
            }
            other => other,
        }
        .map_err(|e| errno(&sofar, e))?;
        fd = next;
    }
    Ok(fd)
}

fn errno(path: &Path, e: rustix::io::Errno) -> SnapshotError {
    SnapshotError::Io {
        path: shown(path),
        source: e.into(),
    }
}

pub use crate::tree_remove::remove_tree;

fn walk<R: Read>(
    reader: R,
    limits: Limits,
    mut f: impl FnMut(&mut tar::Entry<'_, Capped<R>>, &Path, Kind) -> Result<(), SnapshotError>,
) -> Result<usize, SnapshotError> {
    let cap = max_tar_bytes(limits);
    let mut archive = tar::Archive::new(Capped {
        inner: reader,
        left: cap,
        limit: limits.max_bytes,
    });
    let mut count = 0;
    let mut total = 0u64;
    let too_large = |e: &std::io::Error| e.to_string().contains("larger than the limit");
    for entry in archive.entries().map_err(io("snapshot"))? {
        let mut entry = entry.map_err(|e| {
            if too_large(&e) {
                SnapshotError::TooLarge {
                    limit: limits.max_bytes,
                }
            } else {
                SnapshotError::Io {
                    path: "snapshot".into(),
                    source: e,
                }
            }
        })?;
        count += 1;
        if count > limits.max_entries {
            return Err(SnapshotError::TooManyEntries {
                limit: limits.max_entries,
            });
        }
        let raw = entry.path().map_err(io("snapshot"))?.into_owned();
        if raw.as_os_str().len() > MAX_PATH_BYTES {
            return Err(SnapshotError::UnsafePath(shown(&raw)));
        }
        check_relative(&raw)?;
        // One spelling per path ("a/./b/" is "a/b"), so duplicates are seen as such.
        let rel = normal(&raw);
        if rel.components().count() > MAX_DEPTH
            || rel
                .components()
                .any(|c| c.as_os_str().len() > MAX_COMPONENT_BYTES)
        {
            return Err(SnapshotError::UnsafePath(shown(&raw)));
        }
        let kind = match entry.header().entry_type() {
            tar::EntryType::Symlink => Kind::Link,
            tar::EntryType::Directory => Kind::Dir,
            tar::EntryType::Regular | tar::EntryType::Continuous => Kind::File,
            tar::EntryType::Link => return Err(SnapshotError::HardLink(shown(&rel))),
            _ => return Err(SnapshotError::UnsupportedEntry(shown(&rel))),
        };
        if rel.as_os_str().is_empty() {
            // "./": the root itself, which exists already; nothing else may name it.
            if kind == Kind::Dir {
                continue;
            }
            return Err(SnapshotError::UnsafePath(shown(&raw)));
        }
        if kind == Kind::File {
            // The size the entry has (a PAX header's, when it gives one), not its header's.
            total = total.saturating_add(entry.size());
            if total > limits.max_bytes {
                return Err(SnapshotError::TooLarge {
                    limit: limits.max_bytes,
                });
            }
        }
        f(&mut entry, &rel, kind).map_err(|e| match e {
            SnapshotError::Io { source, .. } if too_large(&source) => SnapshotError::TooLarge {
                limit: limits.max_bytes,
            },
            e => e,
        })?;
    }
    Ok(count)
}

#[path = "snapshot_tree.rs"]
mod tree;
use tree::check_tree;

#[cfg(test)]
#[path = "snapshot_tests.rs"]
mod tests;
