//! Removing an unpacked snapshot's tree: made writable again and removed through directory
//! handles, links removed and never followed, however long its paths.

use std::path::Path;

/// Removes a tree that [`crate::snapshot::unpack_file`] made read-only (links are removed, never followed).
/// Each directory is opened from its parent's handle, so a tree whose paths are longer than
/// the system takes whole is removed too.
pub fn remove_tree(dir: &Path) -> std::io::Result<()> {
    use rustix::fs::{Mode, OFlags};
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        return Err(std::io::ErrorKind::InvalidInput.into());
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let flags = OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC;
    let fd = match rustix::fs::open(parent, flags, Mode::empty()) {
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        r => r?,
    };
    match remove_at(&fd, name) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// Removes `name` in the directory `parent`, a directory with all it holds.
fn remove_at(parent: &std::os::fd::OwnedFd, name: &std::ffi::OsStr) -> std::io::Result<()> {
    use rustix::fs::{AtFlags, FileType, Mode, OFlags};
    let st = rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        return Ok(rustix::fs::unlinkat(parent, name, AtFlags::empty())?);
    }
    let flags = OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = rustix::fs::openat(parent, name, flags, Mode::empty())?;
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o755))?;
    let mut children = Vec::new();
    for e in rustix::fs::Dir::read_from(&fd)? {
        let e = e?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            children.push(n.to_vec());
        }
    }
    for c in children {
        use std::os::unix::ffi::OsStrExt;
        match remove_at(&fd, std::ffi::OsStr::from_bytes(&c)) {
            // Gone meanwhile (another removal of the same tree): what was wanted.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            r => r?,
        }
    }
    Ok(rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR)?)
}
