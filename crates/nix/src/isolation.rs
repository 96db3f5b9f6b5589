//! What an evaluation may read of its host: nothing of the agent's secrets. A flake's code
//! can copy any path the evaluating process can read into the store and return it in an
//! error (`builtins.fetchTree { type = "path"; path = …; rev = …; }` passes pure
//! evaluation). So each evaluation process starts in a mount namespace of its own where the
//! agent's secret files and the usual places of a host's secrets are empty, with none of the
//! agent's environment but what Nix needs.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Paths covered, each a directory (by an empty file system) or a file (by /dev/null).
#[derive(Debug, Clone, Default)]
pub struct Masks(Arc<Vec<(CString, bool)>>);

/// Where a host keeps secrets an evaluation never needs, covered when they exist.
const HOST_SECRETS: &[&str] = &[
    "/run/credentials",
    "/run/secrets",
    "/run/keys",
    "/root",
    "/etc/ssh",
    "/etc/shadow",
    "/etc/gshadow",
    "/etc/nixfarm",
    "/var/lib/nixfarm-coordinator",
];

impl Masks {
    /// The host's usual secret places and `own` (the agent's secret files and directories),
    /// those that exist now.
    pub fn of(own: &[PathBuf]) -> Masks {
        let mut v = Vec::new();
        let all = HOST_SECRETS
            .iter()
            .map(PathBuf::from)
            .chain(own.iter().cloned());
        for p in all {
            let Ok(meta) = std::fs::metadata(&p) else {
                continue;
            };
            let Ok(c) = CString::new(p.as_os_str().as_encoded_bytes()) else {
                continue;
            };
            if !v.iter().any(|(q, _)| *q == c) {
                v.push((c, meta.is_dir()));
            }
        }
        Masks(Arc::new(v))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The paths covered.
    pub fn paths(&self) -> Vec<PathBuf> {
        use std::os::unix::ffi::OsStrExt;
        self.0
            .iter()
            .map(|(c, _)| PathBuf::from(std::ffi::OsStr::from_bytes(c.as_bytes())))
            .collect()
    }

    /// Has `c` start in a mount namespace of its own with these paths covered; it fails to
    /// start when they cannot be (fail closed).
    pub(crate) fn apply(&self, c: &mut tokio::process::Command) {
        let masks = self.0.clone();
        // SAFETY: between fork and exec only async-signal-safe calls (unshare, mount) on
        // strings made before the fork.
        unsafe {
            c.pre_exec(move || cover(&masks));
        }
    }
}

/// In the child, before exec: a private mount namespace, then each path covered.
fn cover(masks: &[(CString, bool)]) -> std::io::Result<()> {
    let err = std::io::Error::last_os_error;
    let null = std::ptr::null();
    // SAFETY: plain system calls with NUL-terminated strings that outlive them.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(err());
        }
        if libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            null,
            libc::MS_REC | libc::MS_PRIVATE,
            null as *const libc::c_void,
        ) != 0
        {
            return Err(err());
        }
        for (path, dir) in masks {
            let r = if *dir {
                libc::mount(
                    c"nixfarm-masked".as_ptr(),
                    path.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_RDONLY,
                    c"size=4k,mode=0755".as_ptr() as *const libc::c_void,
                )
            } else {
                libc::mount(
                    c"/dev/null".as_ptr(),
                    path.as_ptr(),
                    null,
                    libc::MS_BIND,
                    null as *const libc::c_void,
                )
            };
            if r != 0 {
                return Err(err());
            }
        }
    }
    Ok(())
}

/// Whether this process may make the mount namespaces [`Masks::apply`] needs (root, or
/// CAP_SYS_ADMIN): tried once in a child.
pub fn can_isolate() -> bool {
    let mut c = std::process::Command::new("/bin/true");
    // SAFETY: as in `Masks::apply`.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut c, || cover(&[]));
    }
    c.status().is_ok_and(|s| s.success())
}

/// The files of `dir` an evaluation has no business reading (all but `keep`, by name).
pub fn entries_but(dir: &Path, keep: &[&str]) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| !keep.contains(&e.file_name().to_string_lossy().as_ref()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}
