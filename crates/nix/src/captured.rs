//! A child process's output read within bounds: its stdout up to a limit, the head and tail
//! of its stderr, and a deadline. Nix's evaluation prints what the expression makes it print
//! (`builtins.trace`), so nothing it says is read whole.

use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

/// Bytes kept of the start, and of the end, of stderr (the first error and the last).
const STDERR_HEAD: usize = 64 * 1024;
const STDERR_TAIL: usize = 192 * 1024;

/// What a finished child said.
#[derive(Debug)]
pub(crate) struct Captured {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    /// Its head and tail, with how much was left out between them.
    pub stderr: String,
}

/// Why a child's output could not be had.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CaptureError {
    #[error("cannot run it: {0}")]
    Spawn(std::io::Error),
    #[error("it printed more than {0} bytes")]
    TooMuch(usize),
    #[error("it did not end within {} s", .0.as_secs())]
    TimedOut(Duration),
    #[error("reading its output failed: {0}")]
    Io(std::io::Error),
}

/// Marks an evaluation prints on stderr as it starts on each attribute (`builtins.trace`),
/// read while it runs: when it is stopped, the last one names the attribute it was on.
/// Each carries a nonce the evaluated code does not see, so it cannot print one.
#[derive(Debug)]
pub(crate) struct Marks {
    prefix: String,
    seen: std::sync::Mutex<Vec<(String, std::time::Instant)>>,
}

/// The most marks kept (one per attribute of an evaluation).
const MAX_MARKS: usize = 100_000;
/// A line longer than this is no mark (marks are about 100 bytes).
const MAX_MARK_LINE: usize = 512;

impl Marks {
    pub fn new() -> Marks {
        let mut nonce = [0u8; 12];
        let random = std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut nonce));
        if random.is_err() {
            // Not a secret worth failing an evaluation for: a repository that prints a
            // forged mark only misleads the bookkeeping of its own run.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            nonce.copy_from_slice(&t.to_le_bytes()[..12]);
        }
        let hex: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
        Marks {
            prefix: format!("nixfarm-{hex}-"),
            seen: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// The mark's text before its key, for the expression to print.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Drops the marks read so far: they name nothing.
    pub fn forget(&self) {
        if let Ok(mut seen) = self.seen.lock() {
            seen.clear();
        }
    }

    /// The keys marked so far, in the order they were printed, each once, with when.
    pub fn seen(&self) -> Vec<(String, std::time::Instant)> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Reads a line of stderr: `<prefix><key>.` anywhere in it marks `key` (lowercase hex).
    pub(crate) fn line(&self, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        let Some(at) = text.find(&self.prefix) else {
            return;
        };
        let rest = &text[at + self.prefix.len()..];
        let Some((key, _)) = rest.split_once('.') else {
            return;
        };
        if key.is_empty() || key.len() > 128 || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
            return;
        }
        if let Ok(mut seen) = self.seen.lock()
            && seen.len() < MAX_MARKS
            && !seen.iter().any(|(k, _)| k == key)
        {
            seen.push((key.to_string(), std::time::Instant::now()));
        }
    }
}

/// Runs `cmd` to its end, within `deadline`, keeping at most `stdout_limit` bytes of stdout
/// (past it the child is killed), and reading `marks` from stderr as they come. A child that
/// outlives its deadline is killed.
pub(crate) async fn capture(
    cmd: &mut Command,
    stdout_limit: usize,
    deadline: Duration,
    marks: Option<&Marks>,
) -> Result<Captured, CaptureError> {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(CaptureError::Spawn)?;
    let (out, err) = (child.stdout.take(), child.stderr.take());
    let mut running = Running(Some(child));
    let run = async {
        let (stdout, stderr) =
            tokio::join!(read_limited(out, stdout_limit), head_and_tail(err, marks));
        let stdout = stdout?;
        let status = match running.0.as_mut() {
            Some(c) => c.wait().await.map_err(CaptureError::Io)?,
            None => return Err(CaptureError::Io(std::io::ErrorKind::NotFound.into())),
        };
        // Ended: nothing to stop.
        running.0 = None;
        Ok(Captured {
            status,
            stdout,
            stderr: stderr?,
        })
    };
    match tokio::time::timeout(deadline, run).await {
        Ok(r) => r,
        Err(_) => Err(CaptureError::TimedOut(deadline)),
    }
}

/// A child still running when its caller gives up on it (a deadline, a cancel that drops
/// the future): asked to stop with SIGTERM, which has Nix stop what it started (an import's
/// builder, in a session of its own), and killed if it has not ended 5 s later.
struct Running(Option<tokio::process::Child>);

/// Children told to stop (SIGTERM) whose grace has not run out and who have not exited yet.
static STOPPING: AtomicUsize = AtomicUsize::new(0);

/// One of [`STOPPING`], for as long as it lives (its task may also end with the runtime).
struct Stopping;

impl Stopping {
    fn new() -> Stopping {
        STOPPING.fetch_add(1, Ordering::SeqCst);
        Stopping
    }
}

impl Drop for Stopping {
    fn drop(&mut self) {
        STOPPING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Waits, at most `max`, for the processes told to stop to exit or be killed at the end of
/// their grace. A program about to return from `main` calls it: its runtime's end would kill
/// them at once, before Nix has stopped what an import started.
pub async fn let_stopping_children_finish(max: Duration) {
    let deadline = tokio::time::Instant::now() + max;
    while STOPPING.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let Some(mut child) = self.0.take() else {
            return;
        };
        if let Some(pid) = child.id() {
            crate::isolation::signal(pid, libc::SIGTERM);
        }
        // Without a runtime to wait in, kill_on_drop kills it at once.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let stopping = Stopping::new();
            rt.spawn(async move {
                let _stopping = stopping;
                if tokio::time::timeout(Duration::from_secs(5), child.wait())
                    .await
                    .is_err()
                {
                    // The whole group: a covered Nix runs on in place of the `unshare`
                    // `kill` ends.
                    if let Some(pid) = child.id() {
                        crate::isolation::signal(pid, libc::SIGKILL);
                    }
                    let _ = child.kill().await;
                }
            });
        }
    }
}

async fn read_limited(
    stream: Option<impl AsyncRead + Unpin>,
    limit: usize,
) -> Result<Vec<u8>, CaptureError> {
    let mut out = Vec::new();
    if let Some(s) = stream {
        s.take(limit as u64 + 1)
            .read_to_end(&mut out)
            .await
            .map_err(CaptureError::Io)?;
    }
    if out.len() > limit {
        return Err(CaptureError::TooMuch(limit));
    }
    Ok(out)
}

async fn head_and_tail(
    stream: Option<impl AsyncRead + Unpin>,
    marks: Option<&Marks>,
) -> Result<String, CaptureError> {
    let Some(mut s) = stream else {
        return Ok(String::new());
    };
    // The line being read, for marks (None: too long to be one).
    let mut line: Option<Vec<u8>> = Some(Vec::new());
    let mut head = Vec::new();
    let mut tail = crate::runner::TailBuffer::new(STDERR_TAIL);
    let mut skipped = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = s.read(&mut buf).await.map_err(CaptureError::Io)?;
        if n == 0 {
            break;
        }
        let mut chunk = &buf[..n];
        if let Some(m) = marks {
            for part in chunk.split_inclusive(|b| *b == b'\n') {
                if let Some(l) = &mut line {
                    l.extend_from_slice(part);
                }
                if line.as_ref().is_some_and(|l| l.len() > MAX_MARK_LINE) {
                    line = None;
                }
                if part.ends_with(b"\n") {
                    if let Some(l) = &line {
                        m.line(l);
                    }
                    line = Some(Vec::new());
                }
            }
        }
        if head.len() < STDERR_HEAD {
            let k = chunk.len().min(STDERR_HEAD - head.len());
            head.extend_from_slice(&chunk[..k]);
            chunk = &chunk[k..];
        }
        skipped += chunk.len();
        tail.push(chunk);
    }
    let tail = tail.text();
    skipped = skipped.saturating_sub(tail.len());
    let mut text = String::from_utf8_lossy(&head).into_owned();
    if skipped > 0 {
        text.push_str(&format!("\n… ({skipped} bytes left out) …\n"));
    }
    text.push_str(&tail);
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("/bin/sh");
        c.args(["-c", script]);
        c
    }

    #[tokio::test]
    async fn marks_are_read_as_they_come_and_only_with_the_nonce() {
        let m = Marks::new();
        let p = m.prefix().to_string();
        let forged = "nixfarm-000000000000000000000000-ee.";
        // A mark split across writes, noise between, a forged one, a repeat, one on an
        // over-long line; then the process hangs and is stopped.
        let script = format!(
            "printf 'trace: {p}aa.\\nnoise\\n' >&2; printf 'trace: {p}b' >&2; sleep 0.1; printf 'b.\\n{forged}\\n' >&2; printf 'trace: {p}aa.\\n' >&2; printf '%0600d {p}dd.\\n' 0 >&2; printf 'trace: {p}cc.\\n' >&2; sleep 30"
        );
        let r = capture(&mut sh(&script), 100, Duration::from_millis(700), Some(&m)).await;
        assert!(matches!(r, Err(CaptureError::TimedOut(_))), "{r:?}");
        let seen = m.seen();
        let keys: Vec<&str> = seen.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["aa", "bb", "cc"]);
        assert!(
            seen[1].1 >= seen[0].1 + Duration::from_millis(90),
            "when each came"
        );
        assert_ne!(Marks::new().prefix(), p, "a nonce per evaluation");
    }

    #[tokio::test]
    async fn output_is_read_within_its_bounds() {
        let ok = capture(
            &mut sh("echo out; echo err >&2"),
            100,
            Duration::from_secs(10),
            None,
        )
        .await
        .unwrap();
        assert!(ok.status.success());
        assert_eq!(ok.stdout, b"out\n");
        assert_eq!(ok.stderr, "err\n");
        // Too much on stdout: refused, not held.
        let big = capture(&mut sh("yes"), 1 << 20, Duration::from_secs(10), None).await;
        assert!(matches!(big, Err(CaptureError::TooMuch(_))), "{big:?}");
        // Endless traces on stderr, then the error: its head and its end are kept.
        let noisy = capture(
            &mut sh("echo 'error: first' >&2; head -c 50000000 /dev/zero | tr '\\0' x >&2; echo >&2; echo 'error: last' >&2; exit 1"),
            100,
            Duration::from_secs(30), None
        )
        .await
        .unwrap();
        assert!(!noisy.status.success());
        assert!(noisy.stderr.len() < 2 * (STDERR_HEAD + STDERR_TAIL) + 100);
        assert!(noisy.stderr.starts_with("error: first"));
        assert!(noisy.stderr.trim_end().ends_with("error: last"));
        assert!(noisy.stderr.contains("bytes left out"));
        // Past its deadline: stopped.
        let slow = capture(&mut sh("sleep 30"), 100, Duration::from_millis(200), None).await;
        assert!(matches!(slow, Err(CaptureError::TimedOut(_))), "{slow:?}");
    }

    #[test]
    fn a_stopped_child_gets_its_grace_before_the_runtime_ends() {
        let d = tempfile::tempdir().unwrap();
        let mark = d.path().join("stopped");
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            // Like Nix told to stop: it takes a moment to stop what it started.
            let child = sh(&format!(
                "trap 'sleep 1; touch {}; exit 0' TERM; while :; do sleep 0.1; done",
                mark.display()
            ))
            .kill_on_drop(true)
            .spawn()
            .unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
            drop(Running(Some(child)));
            let_stopping_children_finish(Duration::from_secs(10)).await;
        });
        drop(rt);
        assert!(mark.exists(), "it was killed before it could stop");
    }
}
