//! Taking paths out of the farm cache: the least recently used when it is full, and outputs
//! a cross-check found were not what their derivation builds.

use super::{FarmCache, RECENT, is_nar_name, is_narinfo_name};
use nixfarm_store::narinfo::{NarInfo, store_hash};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

impl FarmCache {
    /// Removes least recently used paths (their narinfo, then their NAR) until the cache
    /// holds at most nine tenths of `max_bytes`; never what an active run needs, nor what
    /// was written or read in the last ten minutes. Returns the store hashes removed.
    pub fn evict(&self) -> Vec<String> {
        if self.total.load(Ordering::Relaxed) <= self.max_bytes {
            return Vec::new();
        }
        let Ok(_one) = self.evicting.try_lock() else {
            return Vec::new();
        };
        let protected = (self.protected)();
        let now = std::time::SystemTime::now();
        let mut infos: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&self.dir)
            .map(|d| {
                d.flatten()
                    .filter(|e| is_narinfo_name(&e.file_name().to_string_lossy()))
                    .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
                    .collect()
            })
            .unwrap_or_default();
        infos.sort();
        let target = self.max_bytes / 10 * 9;
        // Which NARs the narinfos point at, and how many point at each: two paths can share
        // one NAR (the same content), and a NAR goes only with the last of them.
        let nar_of = |path: &PathBuf| {
            std::fs::read_to_string(path)
                .ok()
                .and_then(|t| NarInfo::parse(&t).ok())
                .and_then(|ni| ni.url.strip_prefix("nar/").map(String::from))
                .filter(|n| is_nar_name(n))
        };
        let mut users: HashMap<String, usize> = HashMap::new();
        for (_, path) in &infos {
            if let Some(nar) = nar_of(path) {
                *users.entry(nar).or_default() += 1;
            }
        }
        // NARs no narinfo points at (an upload whose narinfo never came, a withdrawn path)
        // are served as nothing: they go first, once they are not recent.
        if let Ok(dir) = std::fs::read_dir(self.dir.join("nar")) {
            for e in dir.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Ok(m) = e.metadata() else { continue };
                let recent = m
                    .modified()
                    .ok()
                    .and_then(|t| now.duration_since(t).ok())
                    .is_none_or(|d| d < RECENT);
                if is_nar_name(&name)
                    && !users.contains_key(&name)
                    && !recent
                    && std::fs::remove_file(e.path()).is_ok()
                {
                    self.total.fetch_sub(m.len(), Ordering::Relaxed);
                }
            }
        }
        let mut removed = Vec::new();
        for (used, path) in infos {
            if self.total.load(Ordering::Relaxed) <= target {
                break;
            }
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            let Some(hash) = name.as_deref().and_then(|n| n.strip_suffix(".narinfo")) else {
                continue;
            };
            if protected.contains(hash) || now.duration_since(used).is_ok_and(|d| d < RECENT) {
                continue;
            }
            let nar = nar_of(&path);
            // The narinfo first: a NAR without one is never served as a path.
            if std::fs::remove_file(&path).is_err() {
                continue;
            }
            let last = nar.as_ref().is_some_and(|n| {
                let left = users.get_mut(n).map_or(0, |u| {
                    *u = u.saturating_sub(1);
                    *u
                });
                left == 0
            });
            if let Some(nar) = nar.filter(|_| last) {
                let p = self.dir.join("nar").join(nar);
                // Uploaded again just now, for a path whose narinfo is on the way.
                let recent = std::fs::metadata(&p)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| now.duration_since(t).ok())
                    .is_none_or(|d| d < RECENT);
                if recent {
                    removed.push(hash.to_string());
                    continue;
                }
                if let Ok(m) = std::fs::metadata(&p)
                    && std::fs::remove_file(&p).is_ok()
                {
                    self.total.fetch_sub(m.len(), Ordering::Relaxed);
                }
            }
            removed.push(hash.to_string());
        }
        if !removed.is_empty() {
            tracing::info!(
                paths = removed.len(),
                "farm cache: evicted least recently used paths"
            );
        }
        removed
    }

    /// Stops serving `paths` (their narinfo goes; a NAR is only ever served through one):
    /// outputs a check found were not what their derivation builds. Returns how many it
    /// held.
    pub fn withdraw(&self, paths: &[String]) -> usize {
        let mut n = 0;
        for p in paths.iter().filter(|p| p.starts_with("/nix/store/")) {
            let file = self.dir.join(format!("{}.narinfo", store_hash(p)));
            if std::fs::remove_file(&file).is_ok() {
                tracing::warn!(path = p, "farm cache: withdrawn (its check failed)");
                n += 1;
            }
        }
        n
    }
}
