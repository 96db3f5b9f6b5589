//! Publishing a narinfo in the farm cache: once, synced, never over another; and marking a
//! file used so eviction spares it.

use super::{FarmCache, NarInfo};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// Publishes `text` as `dest` unless a readable narinfo is there already (returned). The
/// file is synced and then linked in, not renamed over: of two uploads at once one
/// publishes and the other finds it. One left unreadable (cut short by a crash) is
/// replaced. On a file system without hard links it is created in place, never over
/// another.
pub(super) fn publish(
    tmp: &std::path::Path,
    dest: &std::path::Path,
    text: &str,
) -> std::io::Result<Option<String>> {
    use std::io::{ErrorKind, Write as _};
    let write_new = |path: &std::path::Path| -> std::io::Result<()> {
        let mut f = std::fs::File::options()
            .write(true)
            .create_new(true)
            .open(path)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()
    };
    let result = (|| {
        write_new(tmp)?;
        for _ in 0..2 {
            let linked = match std::fs::hard_link(tmp, dest) {
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::Unsupported | ErrorKind::PermissionDenied
                    ) =>
                {
                    write_new(dest)
                }
                r => r,
            };
            match linked {
                Ok(()) => return Ok(None),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    let old = std::fs::read_to_string(dest).unwrap_or_default();
                    if NarInfo::parse(&old).is_ok() {
                        return Ok(Some(old));
                    }
                    std::fs::remove_file(dest)?;
                }
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::other(
            "the narinfo kept changing while it was published",
        ))
    })();
    let _ = std::fs::remove_file(tmp);
    result
}

/// Marks a cache file used now (its modification time): eviction spares what was used in
/// the last [`RECENT`].
pub(super) fn touch(path: &std::path::Path) {
    if let Ok(f) = std::fs::File::options().write(true).open(path) {
        let _ = f.set_modified(std::time::SystemTime::now());
    }
}

impl FarmCache {
    /// The answer to a narinfo upload for a path already published as `old`: the same
    /// publication again is taken (200), another is a conflict (409).
    pub(super) fn published_already(&self, old: &str, ni: &NarInfo) -> Response {
        let same = NarInfo::parse(old).is_ok_and(|old| {
            old.store_path == ni.store_path
                && old.nar_hash == ni.nar_hash
                && old.nar_size == ni.nar_size
                && old.references == ni.references
        });
        if same {
            StatusCode::OK.into_response()
        } else {
            self.refuse(
                StatusCode::CONFLICT,
                "another NAR is already published for this path; published paths are never replaced",
            )
        }
    }
}
