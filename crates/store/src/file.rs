//! `file://` caches: a directory in the binary cache layout, written in place.

use crate::backend::{Backend, Fut, NarSource};
use crate::narinfo::{NarInfo, store_hash};
use crate::stage::Staged;
use crate::{Pusher, StoreError, io};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

pub(crate) struct FileCache {
    pub(crate) dir: PathBuf,
}

impl Backend for FileCache {
    fn substituter<'a>(&'a self, p: &'a Pusher) -> Fut<'a, (String, Vec<String>)> {
        Box::pin(async move { Ok((format!("file://{}", self.dir.display()), p.own_keys())) })
    }

    fn missing<'a>(&'a self, _p: &'a Pusher, paths: &'a [String]) -> Fut<'a, Vec<String>> {
        Box::pin(async move {
            Ok(paths
                .iter()
                .filter(|p| !self.dir.join(format!("{}.narinfo", store_hash(p))).exists())
                .cloned()
                .collect())
        })
    }

    fn narinfo_text<'a>(&'a self, _p: &'a Pusher, path: &'a str) -> Fut<'a, Option<String>> {
        Box::pin(async move {
            use std::io::Read as _;
            let file = self.dir.join(format!("{}.narinfo", store_hash(path)));
            let f = match std::fs::File::open(&file) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(io(format!("cannot read {}", file.display()))(e)),
            };
            let mut text = String::new();
            f.take(crate::MAX_NARINFO_BYTES as u64 + 1)
                .read_to_string(&mut text)
                .map_err(io(format!("cannot read {}", file.display())))?;
            if text.len() > crate::MAX_NARINFO_BYTES {
                return Err(StoreError::Http(format!(
                    "{} is over {} bytes",
                    file.display(),
                    crate::MAX_NARINFO_BYTES
                )));
            }
            Ok(Some(text))
        })
    }

    fn nar_source<'a>(
        &'a self,
        _p: &'a Pusher,
        _client: &'a reqwest::Client,
        url: &'a str,
    ) -> Fut<'a, Option<NarSource>> {
        Box::pin(async move {
            let file = self.dir.join(url);
            match std::fs::File::open(&file) {
                Ok(f) => Ok(Some(NarSource::File(f))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(io(format!("cannot read {}", file.display()))(e)),
            }
        })
    }

    fn stage_dir(&self) -> Result<Option<PathBuf>, StoreError> {
        // Staged in the cache's own nar/ directory: renamed into place, never copied.
        let nar = self.dir.join("nar");
        std::fs::create_dir_all(&nar).map_err(io(format!("cannot create {}", nar.display())))?;
        Ok(Some(nar))
    }

    fn upload<'a>(&'a self, p: &'a Pusher, staged: Staged, mut ni: NarInfo) -> Fut<'a, ()> {
        Box::pin(async move {
            let key = p
                .key
                .as_ref()
                .ok_or_else(|| StoreError::NoKey(format!("file://{}", self.dir.display())))?;
            ni.sign(key);
            self.push_file(p, staged, &ni).await
        })
    }
}

impl FileCache {
    async fn push_file(&self, p: &Pusher, staged: Staged, ni: &NarInfo) -> Result<(), StoreError> {
        let dir = self.dir.clone();
        let ni_text = ni.render();
        let nar_rel = ni.url.clone();
        let hash = store_hash(&ni.store_path).to_string();
        let size = staged.file_size;
        tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            std::fs::create_dir_all(dir.join("nar"))
                .map_err(io(format!("cannot create {}", dir.display())))?;
            let info = dir.join("nix-cache-info");
            if !info.exists() {
                write_atomic(
                    &info,
                    b"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n",
                )?;
            }
            let nar_path = dir.join(&nar_rel);
            match staged.named {
                // Staged in the cache's own nar/ directory: renamed into place.
                Some(tmp) => {
                    // Readable by whoever serves the cache (staging files start private).
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
                        .map_err(io(format!("cannot write {}", nar_path.display())))?;
                    tmp.persist(&nar_path).map_err(|e| StoreError::Io {
                        what: format!("cannot write {}", nar_path.display()),
                        source: e.error,
                    })?;
                }
                None => {
                    let mut src = staged.file;
                    let (mut out, tmp) = temp_beside(&nar_path)?;
                    std::io::copy(&mut src, &mut out)
                        .map_err(io(format!("cannot write {}", nar_path.display())))?;
                    tmp.persist(&nar_path).map_err(|e| StoreError::Io {
                        what: format!("cannot write {}", nar_path.display()),
                        source: e.error,
                    })?;
                }
            }
            // The narinfo last: it never points at a NAR that is not there.
            write_atomic(&dir.join(format!("{hash}.narinfo")), ni_text.as_bytes())
        })
        .await
        .map_err(|e| StoreError::Http(format!("file push task failed: {e}")))??;
        p.stats.bytes_uploaded.fetch_add(size, Ordering::Relaxed);
        Ok(())
    }
}

/// A new file of its own beside `path` (pushers side by side each write theirs: a shared
/// temporary name had one rename another's half-written file), removed if it is never
/// put in place (a full disk leaves no debris), readable by whoever serves the cache.
fn temp_beside(path: &Path) -> Result<(std::fs::File, tempfile::TempPath), StoreError> {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".nixfarm-")
        .tempfile_in(dir)
        .map_err(io(format!(
            "cannot write in the cache at {}",
            dir.display()
        )))?;
    let (file, tmp) = tmp.into_parts();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
        .map_err(io(format!("cannot write {}", path.display())))?;
    Ok((file, tmp))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    use std::io::Write as _;
    let (mut file, tmp) = temp_beside(path)?;
    file.write_all(bytes)
        .map_err(io(format!("cannot write {} in the cache", path.display())))?;
    tmp.persist(path).map_err(|e| StoreError::Io {
        what: format!("cannot write {}", path.display()),
        source: e.error,
    })
}
