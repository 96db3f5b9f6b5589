//! GC roots for what a run still needs on this host: the derivations it evaluated and the
//! outputs it built, one directory of symlinks per run under Nix's `gcroots`, so a host's
//! garbage collector (`nix.gc` timers on spare machines) cannot break a run. Dropped when the
//! coordinator says the run ended.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// The GC roots of this agent.
#[derive(Debug, Clone)]
pub struct Roots {
    dir: PathBuf,
}

impl Roots {
    /// Roots under `dir`, which must lie below Nix's `gcroots` directory for Nix to honour it.
    pub fn new(dir: PathBuf) -> Roots {
        Roots { dir }
    }

    /// The default place: `$NIX_STATE_DIR/gcroots/per-user/$USER/nixfarm-NAME` (Nix scans
    /// `gcroots` recursively; `per-user/$USER` is writable by that user with a daemon too).
    pub fn default_dir(agent: &str) -> PathBuf {
        let state = std::env::var_os("NIX_STATE_DIR")
            .map_or_else(|| PathBuf::from("/nix/var/nix"), PathBuf::from);
        let user = std::env::var("USER")
            .or_else(|_| std::env::var("LOGNAME"))
            .unwrap_or_else(|_| "root".into());
        state
            .join("gcroots/per-user")
            .join(user)
            .join(format!("nixfarm-{agent}"))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Roots `paths` for `run` (an existing root is kept).
    pub fn add(&self, run: &str, paths: &[String]) -> std::io::Result<()> {
        if paths.is_empty() || !nixfarm_core::limits::is_run_id(run) {
            return Ok(());
        }
        let dir = self.dir.join(run);
        std::fs::create_dir_all(&dir)?;
        for p in paths {
            let Some(name) = Path::new(p).file_name() else {
                continue;
            };
            match std::os::unix::fs::symlink(p, dir.join(name)) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// Where Nix roots the outputs of `drv` for `run` as it builds them (None when the
    /// directory cannot be made: the build goes on unrooted, rooted right after).
    pub fn output_root(&self, run: &str, drv: &str) -> Option<PathBuf> {
        if !nixfarm_core::limits::is_run_id(run) {
            return None;
        }
        let dir = self.dir.join(run);
        std::fs::create_dir_all(&dir).ok()?;
        let name = Path::new(drv).file_name()?.to_string_lossy();
        Some(dir.join(format!("{}-out", name.trim_end_matches(".drv"))))
    }

    /// Drops the roots of `run`.
    pub fn release(&self, run: &str) {
        if nixfarm_core::limits::is_run_id(run) {
            let _ = std::fs::remove_dir_all(self.dir.join(run));
        }
    }

    /// Drops the roots of every run not in `active`.
    pub fn release_all_but(&self, active: &HashSet<String>) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !active.contains(&name) {
                self.release(&name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_are_kept_per_run_and_dropped_with_it() {
        let d = tempfile::tempdir().unwrap();
        let roots = Roots::new(d.path().join("roots"));
        let p = "/nix/store/00000000000000000000000000000000-a.drv".to_string();
        roots.add("r1", std::slice::from_ref(&p)).unwrap();
        roots.add("r1", std::slice::from_ref(&p)).unwrap();
        roots.add("r2", std::slice::from_ref(&p)).unwrap();
        let link = d
            .path()
            .join("roots/r1")
            .join(Path::new(&p).file_name().unwrap());
        assert_eq!(std::fs::read_link(&link).unwrap(), Path::new(&p));
        roots.release_all_but(&["r2".to_string()].into());
        assert!(!d.path().join("roots/r1").exists());
        assert!(d.path().join("roots/r2").exists());
        roots.release("r2");
        assert!(!d.path().join("roots/r2").exists());
        // Nothing outside the roots directory is ever named.
        roots.release("../..");
        assert!(d.path().exists());
    }
}
