//! What an evaluation may read of its host: nothing of the agent's secrets. A flake's code
//! can copy any path the evaluating process can read into the store and return it in an
//! error (`builtins.fetchTree { type = "path"; path = …; rev = …; }` passes pure
//! evaluation). So each evaluation process starts in a mount namespace of its own where the
//! agent's secret files and the usual places of a host's secrets are empty, with none of the
//! agent's environment but what Nix needs, and in a PID namespace with a /proc of its own
//! (through another process's `/proc/<pid>/root` every cover would be stepped around).
//!
//! Root makes these namespaces directly. An unprivileged agent (the shipped systemd unit,
//! NixOS module and container) makes a user namespace first, in which its own UID and GID
//! map to themselves: the evaluation runs as the agent's user, as it would without the
//! namespaces, and the capabilities the namespace grants are dropped (`setpriv`) once the
//! covers are in place, so Nix runs with none.

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
    // sops-nix and agenix: /run/secrets and /run/agenix link to a generation in these, and a
    // switch makes a new one.
    "/run/secrets.d",
    "/run/agenix",
    "/run/agenix.d",
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
            .chain(own.iter().cloned())
            .chain(own.iter().filter_map(|p| secret_volume(p)));
        for p in all {
            // The file itself, wherever links lead (and relative paths are the agent's).
            let Ok(p) = std::fs::canonicalize(&p) else {
                continue;
            };
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
}

/// The directory of a secret mounted as Kubernetes mounts secrets (its name a link through
/// `..data`, which an update points at a new directory beside it): covered whole, so a
/// secret updated while a process runs is as covered as the one it started with.
fn secret_volume(p: &Path) -> Option<PathBuf> {
    let dir = p.parent()?;
    std::fs::symlink_metadata(dir.join("..data"))
        .is_ok_and(|m| m.file_type().is_symlink())
        .then(|| dir.to_path_buf())
}

impl Masks {
    /// A command that runs `program` in mount and PID namespaces of its own, with a /proc
    /// of that PID namespace only (no other process's `/proc/<pid>/root` leads around the
    /// covers) and these paths covered; it fails (exit 125) when they cannot be.
    pub(crate) fn command(&self, program: &Path) -> tokio::process::Command {
        self.command_in(program, false)
    }

    /// `program` (a built package's) as [`Masks::command`] runs it, but with no network
    /// either and the Nix daemon's socket covered as well: a program may not ask the daemon
    /// for anything in the agent's name (a trusted user may add unsigned paths to the store
    /// the agent pushes from).
    pub fn offline_command(&self, program: &Path) -> tokio::process::Command {
        self.command_in(program, true)
    }

    fn command_in(&self, program: &Path, offline: bool) -> tokio::process::Command {
        use std::os::unix::ffi::OsStrExt;
        // Without the tools there is no namespace: `can_isolate` said so at start, and
        // then this is never called. Their bare names fail to start rather than run bare.
        let tools = Tools::get().cloned().unwrap_or_default();
        let mut c = tokio::process::Command::new(&tools.unshare);
        if offline {
            // A network namespace with nothing in it but a loopback that is down; and a
            // built program is no Nix that stops cleanly: whatever it started dies with it.
            c.args(["--net", "--kill-child=SIGKILL"]);
        } else {
            // Nix stops what it started (an import from a derivation's build) on SIGTERM.
            c.arg("--kill-child=SIGTERM");
        }
        // Before the namespaces' arguments, which end with the shell's.
        c.args(Namespaces::for_this_process().unshare_args());
        c.arg(&tools.mount).arg(&tools.setpriv);
        // `unshare --fork` blocks SIGINT and SIGTERM (util-linux up to 2.41): a group of its
        // own lets [`signal`] reach Nix, which runs on in its place.
        c.process_group(0);
        for (p, _) in self.0.iter() {
            c.arg(std::ffi::OsStr::from_bytes(p.as_bytes()));
        }
        if offline && Path::new(DAEMON_SOCKET_DIR).is_dir() {
            c.arg(DAEMON_SOCKET_DIR);
        }
        c.arg("--").arg(program);
        c
    }
}

/// `program` (a Nix that builds) under `covers` when given: its builders run in its
/// namespaces, as the agent's user with the agent's secret files covered and none of the
/// agent's processes in their /proc, and of the agent's environment only what Nix needs.
pub(crate) fn build_command(program: &Path, covers: Option<&[PathBuf]>) -> tokio::process::Command {
    match covers {
        Some(own) => {
            let mut c = Masks::of(own).command(program);
            // None of the agent's environment (its tokens: the daemon is in the builds'
            // /proc, as their user) but what Nix needs.
            crate::entry::keep_env(&mut c, &["NIX_CONFIG"]);
            c
        }
        None => tokio::process::Command::new(program),
    }
}

/// Sends `sig` to a child this process spawned: to its process group when it leads one (a
/// command of [`Masks`]: `unshare` and the Nix it runs), else to it alone.
pub(crate) fn signal(pid: u32, sig: libc::c_int) {
    let pid = pid as libc::pid_t;
    // SAFETY: getpgid(2) and kill(2) on a child this process spawned and has not reaped;
    // no memory is touched.
    unsafe {
        if libc::getpgid(pid) == pid {
            libc::kill(-pid, sig);
        } else {
            libc::kill(pid, sig);
        }
    }
}

/// Whether this process runs as root (and makes namespaces without a user namespace).
pub(crate) fn is_root() -> bool {
    Namespaces::for_this_process() == Namespaces::Root
}

/// Where the Nix daemon listens (Nix's default `nix-daemon` socket path's directory).
const DAEMON_SOCKET_DIR: &str = "/nix/var/nix/daemon-socket";

/// How the namespaces are made: by root directly, or by anyone else inside a user
/// namespace of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Namespaces {
    Root,
    /// The agent's own UID and GID, mapped to themselves.
    User {
        uid: u32,
        gid: u32,
    },
}

impl Namespaces {
    fn for_this_process() -> Namespaces {
        // SAFETY: geteuid and getegid cannot fail and touch no memory of ours.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        if uid == 0 {
            Namespaces::Root
        } else {
            Namespaces::User { uid, gid }
        }
    }

    /// `unshare`'s arguments up to the program's (the covered paths, `--`, the program).
    fn unshare_args(self) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        let cover = match self {
            Namespaces::Root => COVER_AS_ROOT,
            Namespaces::User { uid, gid } => {
                v.extend([
                    "--user".to_string(),
                    format!("--map-user={uid}"),
                    format!("--map-group={gid}"),
                    // The shell needs CAP_SYS_ADMIN (of this namespace only) to mount;
                    // it drops every capability before Nix starts.
                    "--keep-caps".to_string(),
                ]);
                COVER_AS_USER
            }
        };
        v.extend(
            [
                "--mount",
                "--pid",
                "--fork",
                "--mount-proc",
                "--propagation",
                "private",
                "--",
                "/bin/sh",
                "-c",
                cover,
                "nixfarm-eval",
            ]
            .map(String::from),
        );
        v
    }
}

/// With `mount` and `setpriv` (absolute paths) first, covers each argument before `--` (a
/// directory by an empty read-only file system, a file by /dev/null), then runs what
/// follows it. A path gone since it was listed stops it (exit 125): it may be back.
macro_rules! cover {
    ($exec:literal) => {
        concat!(
            r#"m=$1; sp=$2; shift 2
while [ "$1" != -- ]; do
  if [ -d "$1" ]; then "$m" -t tmpfs -o ro,nosuid,nodev,noexec,size=4k,mode=0755 nixfarm-masked "$1" || exit 125
  elif [ -e "$1" ]; then "$m" --bind /dev/null "$1" || exit 125
  else exit 125
  fi
  shift
done
shift
"#,
            $exec
        )
    };
}
const COVER_AS_ROOT: &str = cover!(r#"exec "$@""#);
/// The same, then without any capability: none inherited, none ambient, none to regain.
const COVER_AS_USER: &str =
    cover!(r#"exec "$sp" --inh-caps=-all --ambient-caps=-all --bounding-set=-all -- "$@""#);

/// The absolute path of program `name`: the first executable of that name on this
/// process's PATH (absolute entries only), else in the usual places.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let usual = [
        "/run/current-system/sw/bin",
        "/usr/bin",
        "/bin",
        "/usr/sbin",
        "/sbin",
    ];
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(usual.map(PathBuf::from))
        .filter(|d| d.is_absolute())
        .map(|d| d.join(name))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The programs the namespaces are made with, by absolute path: found once on this
/// process's PATH and the usual places (a smoke test's PATH is /usr/bin:/bin only, where
/// NixOS keeps none of them).
#[derive(Debug, Clone, Default)]
struct Tools {
    unshare: PathBuf,
    mount: PathBuf,
    setpriv: PathBuf,
}

impl Tools {
    fn get() -> Option<&'static Tools> {
        static TOOLS: std::sync::OnceLock<Option<Tools>> = std::sync::OnceLock::new();
        TOOLS
            .get_or_init(|| {
                Some(Tools {
                    unshare: find_program("unshare")?,
                    mount: find_program("mount")?,
                    setpriv: find_program("setpriv")?,
                })
            })
            .as_ref()
    }
}

/// Whether this process may make the namespaces [`Masks::command`] and
/// [`Masks::offline_command`] need: root, or a user whose kernel, `unshare` (util-linux
/// 2.38 or later) and service manager allow a user namespace with mount, PID and network
/// namespaces and a /proc of its own. Tried once, covering a directory as an evaluation
/// would.
pub fn can_isolate() -> bool {
    let Some(tools) = Tools::get() else {
        return false;
    };
    // A directory to cover, as an evaluation would (in the probe's own namespace only).
    let Some(probe) = [
        std::env::temp_dir(),
        "/tmp".into(),
        "/var/tmp".into(),
        "/dev/shm".into(),
    ]
    .into_iter()
    .find(|d| d.is_dir()) else {
        return false;
    };
    let mut c = std::process::Command::new(&tools.unshare);
    c.arg("--net")
        .args(Namespaces::for_this_process().unshare_args())
        .arg(&tools.mount)
        .arg(&tools.setpriv)
        .arg(&probe)
        .args(["--", "/bin/sh", "-c", "exit 0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    c.status().is_ok_and(|s| s.success())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    /// What an evaluation started by an unprivileged agent sees: its own user, no
    /// capability, the covered file empty, the uncovered one whole, and no process of the
    /// host in /proc.
    #[test]
    fn an_unprivileged_agents_evaluation_runs_covered_and_without_capabilities() {
        const NOBODY: u32 = 65534;
        let dir = tempfile::tempdir().unwrap();
        let (secret, other) = (dir.path().join("secret"), dir.path().join("other"));
        std::fs::write(&secret, "s3cret").unwrap();
        std::fs::write(&other, "plain").unwrap();
        for p in [dir.path(), &secret, &other] {
            std::os::unix::fs::chown(p, Some(NOBODY), Some(NOBODY)).unwrap();
        }
        let script = "id -u; cat \"$1\"; echo; cat \"$2\"; echo; grep CapEff /proc/self/status; ls /proc | grep -c '^[0-9]'";
        let tools = Tools::get().unwrap();
        let out = std::process::Command::new(&tools.unshare)
            .args(
                Namespaces::User {
                    uid: NOBODY,
                    gid: NOBODY,
                }
                .unshare_args(),
            )
            .arg(&tools.mount)
            .arg(&tools.setpriv)
            .arg(&secret)
            .args(["--", "/bin/sh", "-c", script, "probe"])
            .args([&secret, &other])
            .uid(NOBODY)
            .gid(NOBODY)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], NOBODY.to_string(), "{text}");
        assert_eq!(lines[1], "", "{text}");
        assert_eq!(lines[2], "plain", "{text}");
        assert_eq!(
            lines[3].split_whitespace().last(),
            Some("0000000000000000"),
            "{text}"
        );
        // unshare's child, the shell it runs and ls: nothing of the host.
        assert!(lines[4].parse::<u32>().unwrap() <= 3, "{text}");
    }

    /// A secret in a Kubernetes secret volume (`token` -> `..data/token`, `..data` ->
    /// `..<timestamp>`): an update while a covered process runs points `..data` at a new
    /// directory, which is covered too.
    #[tokio::test]
    async fn a_kubernetes_secret_updated_while_a_process_runs_stays_covered() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let volume = dir.path().join("secrets");
        std::fs::create_dir_all(volume.join("..2026_12_05_01")).unwrap();
        std::fs::write(volume.join("..2026_12_05_01/token"), "old-secret").unwrap();
        symlink("..2026_12_05_01", volume.join("..data")).unwrap();
        symlink("..data/token", volume.join("token")).unwrap();
        let token = volume.join("token");
        let mut c = Masks::of(std::slice::from_ref(&token)).command(Path::new("/bin/sh"));
        c.args(["-c", "cat \"$1\"; echo; sleep 1; cat \"$1\"", "probe"])
            .arg(&token)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        let child = c.spawn().unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        // The kubelet's update: a new directory, then `..data` renamed over.
        std::fs::create_dir_all(volume.join("..2026_12_05_02")).unwrap();
        std::fs::write(volume.join("..2026_12_05_02/token"), "new-secret").unwrap();
        symlink("..2026_12_05_02", volume.join("..data_tmp")).unwrap();
        std::fs::rename(volume.join("..data_tmp"), volume.join("..data")).unwrap();
        assert_eq!(std::fs::read_to_string(&token).unwrap(), "new-secret");
        let out = child.wait_with_output().await.unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains("secret"), "{text:?}");
        assert_eq!(text.lines().next(), Some(""), "{text:?}");
    }

    /// A stop reaches the program in the namespaces, though `unshare` in front of it does
    /// not pass SIGTERM on.
    #[tokio::test]
    async fn a_covered_program_is_told_to_stop() {
        let mut c = Masks::of(&[]).command(Path::new("/bin/sh"));
        c.args(["-c", "trap 'exit 7' TERM; sleep 30 & wait"]);
        let mut child = c.spawn().unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        signal(child.id().unwrap(), libc::SIGTERM);
        let status = tokio::time::timeout(std::time::Duration::from_secs(5), child.wait())
            .await
            .expect("it stopped")
            .unwrap();
        assert_eq!(status.code(), Some(7));
    }
}
