//! Smoke tests: a built package's main program run as a user would first run it
//! (`--version`, else `--help`), with an empty HOME, no network and a time limit. A program
//! that dies at start (a missing library, a broken wrapper) fails the package.

use nixfarm_core::Smoke;
use nixfarm_nix::isolation::Masks;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// How long one invocation may take.
const TIME_LIMIT: Duration = Duration::from_secs(10);
/// Output kept for the report, bytes.
const MAX_OUTPUT: usize = 4000;

/// The program to run: `bin/<main_program>` of an output, else the only executable in the
/// outputs' `bin/` directories.
pub fn program(outputs: &[String], main_program: &str) -> Option<PathBuf> {
    if !main_program.is_empty() && !main_program.contains('/') {
        return outputs
            .iter()
            .map(|o| Path::new(o).join("bin").join(main_program))
            .find(|p| is_executable(p));
    }
    let mut found: Vec<PathBuf> = outputs
        .iter()
        .filter_map(|o| std::fs::read_dir(Path::new(o).join("bin")).ok())
        .flat_map(|d| d.filter_map(Result::ok).map(|e| e.path()))
        .filter(|p| is_executable(p))
        .collect();
    found.sort();
    found.dedup();
    (found.len() == 1).then(|| found.remove(0))
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Runs the package's main program; the output starts with what ran and how it ended. An
/// agent that is not root runs it as itself, under `covers` (its evaluations' covers, which
/// hide its secret files) when it has them.
pub async fn smoke(
    outputs: &[String],
    main_program: &str,
    covers: Option<&Masks>,
) -> (Smoke, String) {
    let Some(prog) = program(outputs, main_program) else {
        if main_program.is_empty() {
            return (
                Smoke::Skipped,
                "no meta.mainProgram and not exactly one executable in bin/".into(),
            );
        }
        // The package says what runs it, and it is not there: `nix run` fails on it.
        return (
            Smoke::Failed,
            format!(
                "meta.mainProgram is {:?}, but no output has an executable bin/{}: nix run would fail",
                nixfarm_core::limits::clip(main_program, 100),
                nixfarm_core::fit::one_line(nixfarm_core::limits::clip(main_program, 100))
            ),
        );
    };
    // Not run at all rather than blamed on the package.
    if let Some(Err(why)) = isolation().await {
        return (Smoke::Skipped, format!("not run: {why}"));
    }
    let Ok(home) = tempfile::Builder::new().prefix("nixfarm-smoke-").tempdir() else {
        return (Smoke::Skipped, "cannot make an empty HOME".into());
    };
    // Its own, as root too: the program runs as nobody there.
    if is_root() && std::os::unix::fs::chown(home.path(), Some(SMOKE_UID), Some(SMOKE_UID)).is_err()
    {
        return (Smoke::Skipped, "cannot hand the empty HOME over".into());
    }
    let mut tried = Vec::new();
    for flag in ["--version", "--help"] {
        let (ok, ended, out) = run_once(&prog, flag, home.path(), covers).await;
        if ended == COVERS_FAILED {
            return (Smoke::Skipped, format!("not run: {ended}"));
        }
        let name = prog.file_name().map_or_else(
            || prog.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        if ok {
            return (Smoke::Passed, format!("`{name} {flag}` {ended}\n{out}"));
        }
        tried.push(format!("`{name} {flag}` {ended}\n{out}"));
    }
    let mut text = tried.join("\n");
    if text.len() > MAX_OUTPUT {
        let mut cut = text.len() - MAX_OUTPUT;
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        text = text[cut..].to_string();
    }
    (Smoke::Failed, text)
}

/// Whether this process runs as root (owner of its own /proc entry).
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The user a root agent runs smoke tests as: `nobody`, who can read none of root's files
/// (cache keys, tokens) nor its processes' environments.
const SMOKE_UID: u32 = 65534;

/// How a smoke test's program was started.
enum Kind {
    /// By a root agent, as [`SMOKE_UID`] in namespaces of its own.
    Root,
    /// Under the agent's covers, in namespaces of its own.
    Covered,
    /// As the agent, in a process group of its own.
    Plain,
}

/// How a root agent isolates a smoke test: `unshare` and `setpriv` as found on the agent's
/// own PATH (the program's is /usr/bin:/bin only).
struct Isolation {
    unshare: PathBuf,
    setpriv: PathBuf,
}

impl Isolation {
    fn command(&self, prog: &Path) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(&self.unshare);
        c.args(["--net", "--pid", "--fork", "--kill-child", "--"])
            .arg(&self.setpriv)
            .arg(format!("--reuid={SMOKE_UID}"))
            .arg(format!("--regid={SMOKE_UID}"))
            .args(["--clear-groups", "--no-new-privs", "--"])
            .arg(prog);
        c
    }
}

/// None for an agent that is not root (its programs run as itself); for root, the
/// isolation, or why there is none: found and tried once (`setpriv --version` in it), so that a host
/// without `unshare`/`setpriv`, or a container that may not make namespaces, says so
/// instead of failing every package's smoke test.
async fn isolation() -> Option<Result<&'static Isolation, &'static str>> {
    static ISOLATION: tokio::sync::OnceCell<Result<Isolation, String>> =
        tokio::sync::OnceCell::const_new();
    if !is_root() {
        return None;
    }
    let i = ISOLATION
        .get_or_init(|| async {
            let find = |name: &str| {
                nixfarm_nix::isolation::find_program(name)
                    .ok_or_else(|| format!("no {name} on this agent's PATH to isolate it with"))
            };
            let i = Isolation {
                unshare: find("unshare")?,
                setpriv: find("setpriv")?,
            };
            // setpriv itself, which is there: NixOS has no /bin/true.
            let tried = i
                .command(&i.setpriv)
                .arg("--version")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output()
                .await
                .map_err(|e| e.to_string())?;
            if !tried.status.success() {
                return Err(format!(
                    "cannot isolate it here (namespaces or a change of user refused): {}",
                    String::from_utf8_lossy(&tried.stderr).trim()
                ));
            }
            Ok(i)
        })
        .await;
    Some(i.as_ref().map_err(String::as_str))
}

/// How [`run_once`] says the covers could not be put in place (the cover script's exit 125).
const COVERS_FAILED: &str = "its namespace could not hide the agent's secrets";

/// One invocation: (exited 0, how it ended, its output's tail). The program is a build's
/// output, so anything: as root, it runs as [`SMOKE_UID`] with no network, in a PID
/// namespace of its own (whatever it leaves running dies with it); otherwise under `covers`
/// (namespaces of its own too, the agent's secrets and the Nix daemon hidden, no network),
/// or, without them, as the agent does. Either way in a process group of its own, killed
/// after. At most [`MAX_OUTPUT`] bytes of each stream are read.
async fn run_once(
    prog: &Path,
    flag: &str,
    home: &Path,
    covers: Option<&Masks>,
) -> (bool, String, String) {
    let (mut c, c_kind) = match (isolation().await, covers) {
        (Some(Ok(i)), _) => (i.command(prog), Kind::Root),
        (Some(Err(why)), _) => return (false, format!("could not start: {why}"), String::new()),
        (None, Some(m)) => (m.offline_command(prog), Kind::Covered),
        (None, None) => (tokio::process::Command::new(prog), Kind::Plain),
    };
    c.arg(flag)
        .env_clear()
        .env("HOME", home)
        .env("PATH", "/usr/bin:/bin")
        .env("TMPDIR", home)
        .env("LANG", "C.UTF-8")
        .current_dir(home)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = match c.spawn() {
        Ok(c) => c,
        Err(e) => return (false, format!("could not start: {e}"), String::new()),
    };
    let group = child.id();
    // In namespaces, whatever it left behind dies with the namespace; otherwise with its
    // process group.
    let namespaced = !matches!(c_kind, Kind::Plain);
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let ran = tokio::time::timeout(TIME_LIMIT, async {
        let (out, err) = tokio::join!(read_capped(stdout), read_capped(stderr));
        (child.wait().await, out, err)
    })
    .await;
    // Once the program is reaped its number may be another process's (a covered Nix leads
    // a group of its own): only a plain program's group is killed then.
    if let Some(pid) = group
        && (ran.is_err() || !namespaced)
    {
        // SAFETY: kill(2) on the process group this program was started in; no memory is
        // touched. Whatever it left behind goes with it.
        unsafe {
            libc::kill(-(pid as libc::pid_t), libc::SIGKILL);
        }
    }
    match ran {
        Err(_) => (
            false,
            format!("did not end within {} s", TIME_LIMIT.as_secs()),
            String::new(),
        ),
        Ok((Err(e), _, _)) => (false, format!("failed: {e}"), String::new()),
        Ok((Ok(status), out, err)) => {
            let mut text = String::from_utf8_lossy(&out).into_owned();
            text.push_str(&String::from_utf8_lossy(&err));
            let text = nixfarm_core::limits::truncate(text, MAX_OUTPUT);
            let ended = match status.code() {
                Some(0) => "exited 0".to_string(),
                // The cover script's own failure (a program of its own that exits 125 is
                // taken for it, and skipped).
                Some(125) if matches!(c_kind, Kind::Covered) => COVERS_FAILED.to_string(),
                Some(c) => format!("exited {c}"),
                None => "was killed by a signal".to_string(),
            };
            (status.success(), ended, text)
        }
    }
}

/// Up to [`MAX_OUTPUT`] bytes of a stream, kept; the rest is read and dropped (a closed
/// pipe would fail a program that writes a long `--help`), within the time limit.
async fn read_capped(stream: Option<impl tokio::io::AsyncRead + Unpin>) -> Vec<u8> {
    use tokio::io::AsyncReadExt as _;
    let mut out = Vec::new();
    if let Some(mut s) = stream {
        let _ = (&mut s).take(MAX_OUTPUT as u64).read_to_end(&mut out).await;
        let _ = tokio::io::copy(&mut s, &mut tokio::io::sink()).await;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(dir: &Path, name: &str, body: &str) {
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let p = bin.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// A scratch directory anyone may read (a root agent runs the program as nobody).
    fn open_dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        d
    }

    #[tokio::test]
    async fn what_the_program_leaves_running_dies_and_its_output_is_read_only_so_far() {
        let d = open_dir();
        let out = d.path().join("out");
        // A drop box anyone may write: the program's own rights decide what lands there.
        let drop_box = d.path().join("box");
        std::fs::create_dir(&drop_box).unwrap();
        std::fs::set_permissions(&drop_box, std::fs::Permissions::from_mode(0o777)).unwrap();
        let late = drop_box.join("late");
        script(
            &out,
            "tool",
            &format!(
                "id -u > {b}/uid; (sleep 1; touch {late}) >/dev/null 2>&1 & echo v1",
                b = drop_box.display(),
                late = late.display()
            ),
        );
        let (s, text) = smoke(&[out.display().to_string()], "", None).await;
        assert_eq!(s, Smoke::Passed, "{text}");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!late.exists(), "a process the program left behind ran on");
        if is_root() {
            let uid = std::fs::read_to_string(drop_box.join("uid")).unwrap();
            assert_eq!(
                uid.trim(),
                SMOKE_UID.to_string(),
                "a root agent runs it as nobody"
            );
        }
        // A long --help, written in many pieces: all of it is read (a closed pipe would
        // fail it), only its start kept.
        script(
            &out,
            "tool",
            "[ \"$1\" = --help ] || exit 2; i=0; while [ $i -lt 2000 ]; do echo \"line $i of a long help text\"; i=$((i+1)); done",
        );
        let (s, text) = smoke(&[out.display().to_string()], "", None).await;
        assert_eq!(s, Smoke::Passed, "{text}");
        assert!(text.len() <= 2 * MAX_OUTPUT + 200, "{} bytes", text.len());
        // Endless output: only the first bytes are kept, and the time limit stops it.
        script(
            &out,
            "tool",
            "[ \"$1\" = --version ] && exec yes 0123456789abcdef; exit 0",
        );
        let started = std::time::Instant::now();
        let (s, text) = smoke(&[out.display().to_string()], "", None).await;
        assert_eq!(s, Smoke::Passed, "{text}");
        assert!(text.len() <= 2 * MAX_OUTPUT + 200, "{} bytes", text.len());
        assert!(
            started.elapsed() < TIME_LIMIT + Duration::from_secs(5),
            "{s:?} {:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn runs_the_main_program_and_falls_back_to_help() {
        let d = open_dir();
        let out = d.path().join("out");
        script(
            &out,
            "tool",
            "[ \"$1\" = --help ] && echo usage && exit 0; exit 2",
        );
        let outs = vec![out.display().to_string()];
        let (s, text) = smoke(&outs, "", None).await;
        assert_eq!(s, Smoke::Passed, "{text}");
        assert!(text.starts_with("`tool --help` exited 0"), "{text}");
        // Two programs and no mainProgram: nothing to pick.
        script(&out, "other", "exit 0");
        assert_eq!(smoke(&outs, "", None).await.0, Smoke::Skipped);
        // meta.mainProgram naming none of them: what `nix run` meets.
        let (s, text) = smoke(&outs, "missing", None).await;
        assert_eq!(s, Smoke::Failed, "{text}");
        assert!(
            text.contains("no output has an executable bin/missing"),
            "{text}"
        );
        // meta.mainProgram picks one; a failing one says why.
        script(
            &out,
            "broken",
            "echo 'error while loading shared libraries: libfoo.so' >&2; exit 127",
        );
        let (s, text) = smoke(&outs, "broken", None).await;
        assert_eq!(s, Smoke::Failed);
        assert!(
            text.contains("`broken --version` exited 127") && text.contains("libfoo.so"),
            "{text}"
        );
        // No bin/ at all: a library.
        assert_eq!(
            smoke(&[d.path().join("lib").display().to_string()], "", None)
                .await
                .0,
            Smoke::Skipped
        );
    }
}
