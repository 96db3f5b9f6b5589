//! One coordinator per state directory: a second one on the same database would hand out the
//! first one's runs to its own agents and settle them with answers about another store.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// The state directory is held by another running coordinator.
#[derive(Debug, thiserror::Error)]
#[error(
    "the state directory {} is in use by another coordinator{}: stop that one first, or give this one a state directory of its own",
    dir.display(),
    pid.map(|p| format!(" (process {p})")).unwrap_or_default()
)]
pub struct StateInUse {
    pub dir: PathBuf,
    /// The holder's process id, as it wrote it (None: unreadable).
    pub pid: Option<u32>,
}

/// Held while the coordinator runs: an exclusive lock on `coordinator.lock` in its state
/// directory, released by the kernel however the process ends (`kill -9` too).
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

impl StateLock {
    /// Takes the lock of `dir`, without waiting: [`StateInUse`] (in the error) when another
    /// process holds it.
    pub fn take(dir: &Path) -> anyhow::Result<StateLock> {
        use anyhow::Context as _;
        let path = dir.join("coordinator.lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {
                // Who holds it, for the message a second coordinator gives.
                file.set_len(0)?;
                file.rewind()?;
                writeln!(file, "{}", std::process::id())?;
                Ok(StateLock { _file: file })
            }
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.take(32).read_to_string(&mut text);
                Err(StateInUse {
                    dir: dir.to_path_buf(),
                    pid: text.trim().parse().ok(),
                }
                .into())
            }
            Err(TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("cannot lock {}", path.display()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_naming_the_first_until_it_lets_go() {
        let d = tempfile::tempdir().unwrap();
        let first = StateLock::take(d.path()).unwrap();
        let e = StateLock::take(d.path()).unwrap_err();
        let in_use = e.downcast_ref::<StateInUse>().expect("StateInUse");
        assert_eq!(in_use.pid, Some(std::process::id()));
        assert!(
            e.to_string().contains("is in use by another coordinator"),
            "{e}"
        );
        drop(first);
        StateLock::take(d.path()).unwrap();
    }
}
