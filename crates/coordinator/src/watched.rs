//! A configuration file read again when it changes (the revoked certificates, the agents'
//! named tokens): a cheap look every second tells one version from the next.

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
    seen: Mutex<Stamp>,
}

impl Watched {
    /// `path`, as it is now: only later changes count.
    pub fn new(path: PathBuf) -> Watched {
        let seen = Mutex::new(stamp(&path));
        Watched { path, seen }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file changed (or went, or came back) since the last look.
    pub fn changed(&self) -> bool {
        let now = stamp(&self.path);
        match self.seen.lock() {
            Ok(mut seen) if *seen != now => {
                *seen = now;
                true
            }
            _ => false,
        }
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
