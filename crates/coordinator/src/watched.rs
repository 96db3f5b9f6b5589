//! A configuration file read again when it changes (the revoked certificates, the agents'
//! tokens): a cheap look every second tells one version from the next, and a version is
//! taken only once it has stood still for a look.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

/// What tells one version of a file from another: its device and inode (a file put in place
/// by a rename, or a link switched to another), its change time (which no copy preserves),
/// its modification time and its length. None: it cannot be looked at.
type Stamp = Option<(u64, u64, i64, i64, SystemTime, u64)>;

fn stamp(file: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(file).ok()?;
    Some((
        m.dev(),
        m.ino(),
        m.ctime(),
        m.ctime_nsec(),
        m.modified().ok()?,
        m.len(),
    ))
}

#[derive(Debug)]
pub struct Watched {
    path: PathBuf,
    looks: Mutex<Looks>,
}

#[derive(Debug)]
struct Looks {
    /// The version last read.
    read: Stamp,
    /// A newer version seen at the last look, not read yet: it is read once it has stood
    /// still for a look, so a file caught half-written is not taken.
    pending: Option<Stamp>,
}

impl Watched {
    /// `path`, as it is now: only later changes count.
    pub fn new(path: PathBuf) -> Watched {
        let looks = Mutex::new(Looks {
            read: stamp(&path),
            pending: None,
        });
        Watched { path, looks }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's new text, at most `max` bytes, once it changed (or went, or came back)
    /// and then stood still from one look to the next, and did not change while it was
    /// read; None when there is nothing new to take. Call once a second or so.
    pub fn read_settled(&self, max: u64) -> Option<Result<String, String>> {
        let now = stamp(&self.path);
        let Ok(mut looks) = self.looks.lock() else {
            return None;
        };
        if now == looks.read {
            looks.pending = None;
            return None;
        }
        if looks.pending != Some(now) {
            looks.pending = Some(now);
            return None;
        }
        let text = read_at_most(&self.path, max);
        let after = stamp(&self.path);
        if after != now {
            // Written to while it was read: the next look starts over.
            looks.pending = Some(after);
            return None;
        }
        looks.read = now;
        looks.pending = None;
        Some(text)
    }
}

/// Reads a watched file of at most `max` bytes.
pub fn read_at_most(path: &Path, max: u64) -> Result<String, String> {
    use std::io::Read as _;
    let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut text = String::new();
    f.take(max + 1)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > max {
        return Err(format!("larger than {max} bytes"));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A change is taken once it stood still from one look to the next.
    #[test]
    fn a_change_is_read_once_it_stands_still() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("f");
        std::fs::write(&file, "one").unwrap();
        let w = Watched::new(file.clone());
        assert!(w.read_settled(100).is_none(), "nothing new");
        std::fs::write(&file, "two, half").unwrap();
        assert!(w.read_settled(100).is_none(), "just changed: not yet");
        std::fs::write(&file, "two, whole").unwrap();
        assert!(w.read_settled(100).is_none(), "changed again: not yet");
        assert_eq!(w.read_settled(100), Some(Ok("two, whole".to_string())));
        assert!(w.read_settled(100).is_none(), "read once");
        std::fs::remove_file(&file).unwrap();
        assert!(w.read_settled(100).is_none());
        assert!(
            matches!(w.read_settled(100), Some(Err(_))),
            "gone: said once"
        );
        assert!(w.read_settled(100).is_none());
        std::fs::write(&file, "x".repeat(200)).unwrap();
        assert!(w.read_settled(100).is_none());
        assert!(matches!(w.read_settled(100), Some(Err(e)) if e.contains("larger")));
    }
}
