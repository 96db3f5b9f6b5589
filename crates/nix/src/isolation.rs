//! What an evaluation may read of its host: nothing of the agent's secrets. A flake's code
//! can copy any path the evaluating process can read into the store and return it in an
//! error (`builtins.fetchTree { type = "path"; path = …; rev = …; }` passes pure
//! evaluation). So each evaluation process starts in a mount namespace of its own where the
//! agent's secret files and the usual places of a host's secrets are empty, with none of the
//! agent's environment but what Nix needs, and in a PID namespace with a /proc of its own
//! (through another process's `/proc/<pid>/root` every cover would be stepped around).

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
        let mut v: Vec<(PathBuf, CString, bool)> = Vec::new();
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
            v.push((p, c, meta.is_dir()));
        }
        // Shortest first: a path beneath a directory covered already is covered with it
        // (and cannot be covered once it is hidden).
        v.sort_by_key(|(p, _, _)| p.as_os_str().len());
        let mut kept: Vec<(PathBuf, CString, bool)> = Vec::new();
        for (p, c, dir) in v {
            if !kept
                .iter()
                .any(|(q, _, d)| *q == p || (*d && p.starts_with(q)))
            {
                kept.push((p, c, dir));
            }
        }
        Masks(Arc::new(kept.into_iter().map(|(_, c, d)| (c, d)).collect()))
    }

    /// A command that runs `program` in mount and PID namespaces of its own, with a /proc
    /// of that PID namespace only (no other process's `/proc/<pid>/root` leads around the
    /// covers) and these paths covered; it fails (exit 125) when they cannot be.
    pub(crate) fn command(&self, program: &Path) -> tokio::process::Command {
        use std::os::unix::ffi::OsStrExt;
        let mut c = tokio::process::Command::new("unshare");
        c.args([
            "--mount",
            "--pid",
            "--fork",
            "--kill-child=SIGTERM",
            "--mount-proc",
        ]);
        c.args([
            "--propagation",
            "private",
            "--",
            "/bin/sh",
            "-c",
            COVER,
            "nixfarm-eval",
        ]);
        for (p, _) in self.0.iter() {
            c.arg(std::ffi::OsStr::from_bytes(p.as_bytes()));
        }
        c.arg("--").arg(program);
        c
    }
}

/// Covers each argument before `--` (a directory by an empty read-only file system, a file
/// by /dev/null), then runs what follows it.
const COVER: &str = r#"while [ "$1" != -- ]; do
  if [ -d "$1" ]; then mount -t tmpfs -o ro,nosuid,nodev,noexec,size=4k,mode=0755 nixfarm-masked "$1" || exit 125
  elif [ -e "$1" ]; then mount --bind /dev/null "$1" || exit 125
  fi
  shift
done
shift
exec "$@""#;

/// Whether this process may make the namespaces [`Masks::command`] needs (root, or
/// CAP_SYS_ADMIN): tried once.
pub fn can_isolate() -> bool {
    let mut c = std::process::Command::new("unshare");
    c.args([
        "--mount",
        "--pid",
        "--fork",
        "--mount-proc",
        "--",
        "/bin/sh",
        "-c",
    ])
    .arg(COVER)
    .args(["nixfarm-eval", "--", "/bin/sh", "-c", "exit 0"])
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    c.status().is_ok_and(|s| s.success())
}
