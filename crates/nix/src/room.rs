//! How much room the file systems Nix writes to have: what decides whether a "No space left
//! on device" is the machine's disk being full or only words a builder or an expression
//! printed.

use std::path::Path;

/// Below this much free space (MiB), a job's word that the disk is full is believed. Above
/// it the host has room, whatever a build printed: a package cannot pass its own failure off
/// as the machine's (retried elsewhere, or pausing every agent it is sent to).
pub const BELIEVED_BELOW_MIB: u64 = 1024;

/// Where Nix keeps store paths.
const STORE_DIR: &str = "/nix/store";

/// Free space (MiB) for unprivileged writers in the file system holding `path`.
pub fn free_mib(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated path and `st` a writable statvfs; statvfs(3) writes
    // only into it, and it is read only when the call succeeded.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: initialised by the successful call above.
    let st = unsafe { st.assume_init() };
    Some(st.f_bavail.saturating_mul(st.f_frsize) >> 20)
}

/// The least free space (MiB) now in the store's and the temporary directory's file systems
/// (builds and evaluations write to both). None when neither can be read.
pub fn least_free_mib() -> Option<u64> {
    [
        free_mib(Path::new(STORE_DIR)),
        free_mib(&std::env::temp_dir()),
    ]
    .into_iter()
    .flatten()
    .min()
}

/// Whether a "disk full" said now is believed: less than [`BELIEVED_BELOW_MIB`] free, or the
/// free space cannot be read.
pub fn full_now() -> bool {
    least_free_mib().is_none_or(|free| free < BELIEVED_BELOW_MIB)
}

/// Whether an error Nix printed is the machine's ([`crate::messages::is_machine_error`]),
/// a full disk only when this host's is ([`full_now`]).
pub fn machine_error_here(message: &str) -> bool {
    use crate::messages::{is_disk_full, is_machine_error_but_disk};
    is_machine_error_but_disk(message) || (is_disk_full(message) && full_now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_space_is_read() {
        let root = free_mib(Path::new("/")).expect("statvfs of /");
        assert!(least_free_mib().is_some());
        assert!(free_mib(Path::new("/no/such/place")).is_none());
        // The suite's machine has room: what a test says is not believed.
        assert_eq!(full_now(), root < BELIEVED_BELOW_MIB);
    }
}
