//! GitHub Actions reads workflow commands (`::error::…`, `::add-mask::…`, `##[…]`) from a
//! step's output, and a run's messages are a repository's text: under Actions, command
//! processing is stopped while nixfarm prints, and resumed only for its own annotations.

use std::io::Read as _;
use std::io::Write as _;
use std::sync::Mutex;

static STOPPED: Mutex<Option<String>> = Mutex::new(None);

/// Under GitHub Actions (`GITHUB_ACTIONS=true`), stops workflow command processing until
/// [`resume_commands`], with a token nobody can guess to print in a log. Said on stderr,
/// where progress goes: stdout may be a report redirected to a file (JSON, JUnit).
pub fn stop_commands() {
    if std::env::var("GITHUB_ACTIONS").as_deref() != Ok("true") {
        return;
    }
    let mut bytes = [0u8; 16];
    let Ok(mut f) = std::fs::File::open("/dev/urandom") else {
        return;
    };
    if f.read_exact(&mut bytes).is_err() {
        return;
    }
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    if let Ok(mut s) = STOPPED.lock() {
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "::stop-commands::{token}");
        let _ = err.flush();
        *s = Some(token);
    }
}

/// Resumes workflow command processing, when it was stopped: on stdout just before
/// `--format github` prints its annotations there (`on_stdout`), else on stderr.
pub fn resume_commands(on_stdout: bool) {
    if let Ok(mut s) = STOPPED.lock()
        && let Some(token) = s.take()
    {
        let line = format!("::{token}::");
        if on_stdout {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        } else {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "{line}");
            let _ = err.flush();
        }
    }
}
