//! What a person sees in a terminal of 80x24: `nixfarm local` on the bundled example runs in
//! a real tmux pane of that size, in a host with its own store. The live progress line and the
//! final table fit: no line is wider than 80 columns, nothing wraps, the first progress state
//! is not a full bar at 0/0, and every package still has its row.

use nixfarm_tests::*;
use std::process::Command;
use std::time::{Duration, Instant};
use unicode_width::UnicodeWidthStr;

/// `c` as one shell command line: its environment, program and arguments, each quoted.
fn shell_line(c: &Command) -> String {
    let q = |s: &std::ffi::OsStr| format!("'{}'", s.to_string_lossy().replace('\'', "'\\''"));
    let mut parts: Vec<String> = vec!["env".into()];
    for (k, v) in c.get_envs() {
        if let Some(v) = v {
            let mut kv = k.to_os_string();
            kv.push("=");
            kv.push(v);
            parts.push(q(&kv));
        }
    }
    parts.push(q(c.get_program()));
    parts.extend(c.get_args().map(q));
    parts.join(" ")
}

struct Tmux {
    socket: std::path::PathBuf,
}

impl Tmux {
    fn cmd(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .env("TERM", "xterm-256color")
            .output()
            .expect("tmux")
    }

    /// The visible screen.
    fn screen(&self) -> String {
        stdout(&self.cmd(&["capture-pane", "-p", "-t", "nf"]))
    }

    /// Everything the pane showed, wrapped lines joined back (so a line that wrapped shows
    /// up as one longer than the pane).
    fn history(&self) -> String {
        stdout(&self.cmd(&["capture-pane", "-p", "-J", "-S", "-", "-E", "-", "-t", "nf"]))
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd(&["kill-server"]);
    }
}

fn artifact(name: &str, text: &str) {
    let dir = repo_root().join("target/test-artifacts");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join(name), text);
}

#[test]
fn local_run_fits_an_80x24_terminal() {
    let dir = scratch();
    let repo = dir.path().join("repo");
    copy_tree(&example_repo(), &repo);
    let host = Host::new(&dir.path().join("host"));
    let state = dir.path().join("state");
    let mut c = host.command(&[
        bin("nixfarm").to_str().unwrap(),
        "local",
        repo.to_str().unwrap(),
        "--agents",
        "2",
        "--max-jobs",
        "2",
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    c.env("NO_COLOR", "1");
    let script = dir.path().join("run.sh");
    std::fs::write(
        &script,
        format!("{}\necho \"EXIT=$?\"\nsleep 600\n", shell_line(&c)),
    )
    .unwrap();
    let tmux = Tmux {
        socket: dir.path().join("tmux.sock"),
    };
    let start = tmux.cmd(&[
        "new-session",
        "-d",
        "-s",
        "nf",
        "-x",
        "80",
        "-y",
        "24",
        &format!("sh {}", script.display()),
    ]);
    assert!(start.status.success(), "tmux: {}", stderr(&start));
    // The pane really is 80x24.
    let size = stdout(&tmux.cmd(&[
        "display-message",
        "-p",
        "-t",
        "nf",
        "#{pane_width}x#{pane_height}",
    ]));
    assert_eq!(size.trim(), "80x24");

    // Watch the screen as a person would, until the run ends.
    let mut screens: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    let history = loop {
        let s = tmux.screen();
        if s.contains("EXIT=") {
            break tmux.history();
        }
        if screens.last() != Some(&s) {
            screens.push(s);
        }
        assert!(
            Instant::now() < deadline,
            "the run did not end:\n{}",
            tmux.history()
        );
        std::thread::sleep(Duration::from_millis(150));
    };
    artifact("terminal-80x24.txt", &history);
    artifact("terminal-80x24-screens.txt", &screens.join("\n=====\n"));

    assert!(history.contains("EXIT=0"), "{history}");
    for line in history.lines() {
        assert!(
            line.width() <= 80,
            "a line {} columns wide (it wrapped at 80):\n{line}\n\n{history}",
            line.width()
        );
    }
    // The progress line was seen live, counting real work, never a full bar at 0/0.
    let progress = |s: &String| {
        s.lines().any(|l| {
            l.split_whitespace().any(|w| {
                w.split_once('/')
                    .is_some_and(|(a, b)| is_num(a) && is_num(b))
            }) && l.contains("built")
        })
    };
    assert!(
        screens.iter().any(progress),
        "no progress line seen:\n{}",
        screens.join("\n=====\n")
    );
    assert!(
        !screens.iter().any(|s| s.contains(" 0/0")),
        "a bar at 0/0 was shown"
    );
    // The final table: a header, every package on its own line, the summary last.
    let table_start = history
        .lines()
        .position(|l| l.starts_with("package") && l.contains("status") && l.contains("reason"))
        .unwrap_or_else(|| panic!("no table header:\n{history}"));
    let rows: Vec<&str> = history.lines().skip(table_start + 2).collect();
    let expected = expected();
    for (attr, want) in expected.as_object().unwrap() {
        let row = rows
            .iter()
            .find(|l| l.split_whitespace().next() == Some(attr.as_str()))
            .unwrap_or_else(|| panic!("no row for {attr}:\n{history}"));
        let status = want["status"].as_str().unwrap();
        assert!(
            row.split_whitespace().nth(1) == Some(status),
            "{attr}: expected {status}: {row}"
        );
    }
    assert!(
        history.lines().any(|l| l.starts_with("Ready: ")),
        "{history}"
    );
}

fn is_num(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}
