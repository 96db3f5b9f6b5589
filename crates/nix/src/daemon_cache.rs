//! Nix's narinfo cache, one directory per live daemon: Nix 2.8 breaks when two daemons write one at once.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Nix's narinfo cache (`$XDG_CACHE_HOME/nix/binary-cache-v6.sqlite`), one per live daemon.
/// Nix 2.8 breaks when two processes write one at once: one's `insert or replace` of the
/// cache's row drops the rows the other refers to ("constraint failed"), and the build
/// fails. A directory is held by one daemon at a time and reused after it, so the cache
/// keeps what it learnt.
pub(crate) struct CacheDirs {
    base: PathBuf,
    used: Mutex<Vec<bool>>,
}

/// A daemon's hold on its narinfo cache directory, given back when dropped.
pub(crate) struct CacheSlot {
    dirs: Arc<CacheDirs>,
    index: usize,
}

impl CacheDirs {
    pub(crate) fn new(base: PathBuf) -> Arc<CacheDirs> {
        Arc::new(CacheDirs {
            base,
            used: Mutex::new(Vec::new()),
        })
    }

    /// The lowest free directory, now held.
    pub(crate) fn take(self: &Arc<Self>) -> Option<CacheSlot> {
        let mut used = self.used.lock().ok()?;
        let index = match used.iter().position(|u| !u) {
            Some(i) => {
                used[i] = true;
                i
            }
            None => {
                used.push(true);
                used.len() - 1
            }
        };
        Some(CacheSlot {
            dirs: self.clone(),
            index,
        })
    }
}

impl CacheSlot {
    pub(crate) fn dir(&self) -> PathBuf {
        self.dirs.base.join(format!("daemon-{}", self.index))
    }
}

impl Drop for CacheSlot {
    fn drop(&mut self) {
        if let Ok(mut used) = self.dirs.used.lock()
            && let Some(u) = used.get_mut(self.index)
        {
            *u = false;
        }
    }
}
