//! Smoke tests: a built package's main program run as a user would first run it
//! (`--version`, else `--help`), with an empty HOME, no network and a time limit. A program
//! that dies at start (a missing library, a broken wrapper) fails the package.

use nixfarm_core::Smoke;
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

/// Runs the package's main program; the output starts with what ran and how it ended.
pub async fn smoke(outputs: &[String], main_program: &str) -> (Smoke, String) {
    let Some(prog) = program(outputs, main_program) else {
        let why = if main_program.is_empty() {
            "no meta.mainProgram and not exactly one executable in bin/"
        } else {
            "meta.mainProgram names no executable in bin/"
        };
        return (Smoke::Skipped, why.to_string());
    };
    let Ok(home) = tempfile::Builder::new().prefix("nixfarm-smoke-").tempdir() else {
        return (Smoke::Skipped, "cannot make an empty HOME".into());
    };
    let mut tried = Vec::new();
    for flag in ["--version", "--help"] {
        let (ok, ended, out) = run_once(&prog, flag, home.path()).await;
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

/// One invocation: (exited 0, how it ended, its output's tail).
async fn run_once(prog: &Path, flag: &str, home: &Path) -> (bool, String, String) {
    // No network: a namespace of its own where there is the right to make one (root);
    // otherwise the program runs with the agent's network.
    let isolated = is_root();
    let mut c = if isolated {
        let mut c = tokio::process::Command::new("unshare");
        c.arg("--net").arg("--").arg(prog);
        c
    } else {
        tokio::process::Command::new(prog)
    };
    c.arg(flag)
        .env_clear()
        .env("HOME", home)
        .env("PATH", "/usr/bin:/bin")
        .env("TMPDIR", home)
        .env("LANG", "C.UTF-8")
        .current_dir(home)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = match c.spawn() {
        Ok(c) => c,
        Err(e) => return (false, format!("could not start: {e}"), String::new()),
    };
    match tokio::time::timeout(TIME_LIMIT, child.wait_with_output()).await {
        Err(_) => (
            false,
            format!("did not end within {} s", TIME_LIMIT.as_secs()),
            String::new(),
        ),
        Ok(Err(e)) => (false, format!("failed: {e}"), String::new()),
        Ok(Ok(o)) => {
            let mut out = String::from_utf8_lossy(&o.stdout).into_owned();
            out.push_str(&String::from_utf8_lossy(&o.stderr));
            let out = nixfarm_core::limits::truncate(out, MAX_OUTPUT);
            let ended = match o.status.code() {
                Some(0) => "exited 0".to_string(),
                Some(c) => format!("exited {c}"),
                None => "was killed by a signal".to_string(),
            };
            (o.status.success(), ended, out)
        }
    }
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

    #[tokio::test]
    async fn runs_the_main_program_and_falls_back_to_help() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out");
        script(
            &out,
            "tool",
            "[ \"$1\" = --help ] && echo usage && exit 0; exit 2",
        );
        let outs = vec![out.display().to_string()];
        let (s, text) = smoke(&outs, "").await;
        assert_eq!(s, Smoke::Passed, "{text}");
        assert!(text.starts_with("`tool --help` exited 0"), "{text}");
        // Two programs and no mainProgram: nothing to pick.
        script(&out, "other", "exit 0");
        assert_eq!(smoke(&outs, "").await.0, Smoke::Skipped);
        // meta.mainProgram picks one; a failing one says why.
        script(
            &out,
            "broken",
            "echo 'error while loading shared libraries: libfoo.so' >&2; exit 127",
        );
        let (s, text) = smoke(&outs, "broken").await;
        assert_eq!(s, Smoke::Failed);
        assert!(
            text.contains("`broken --version` exited 127") && text.contains("libfoo.so"),
            "{text}"
        );
        // No bin/ at all: a library.
        assert_eq!(
            smoke(&[d.path().join("lib").display().to_string()], "")
                .await
                .0,
            Smoke::Skipped
        );
    }
}
