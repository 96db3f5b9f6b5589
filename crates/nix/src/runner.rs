//! The Nix child processes nixfarm runs: evaluation, derivation queries, builds and copies.

pub use crate::entry::Entry;
pub use crate::eval::{AttrInfo, ListedAndEvaluated};
use crate::messages::{Failure, classify_failure, first_error};
pub use crate::path_info::{StorePathInfo, parse_path_infos};
pub(crate) use crate::tail::TailBuffer;
pub use crate::tail::tail;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

/// Why a Nix call failed.
#[derive(Debug, thiserror::Error)]
pub enum NixError {
    /// Nix ran and reported an error about the input (evaluation error and the like).
    #[error("{message}")]
    Failed { message: String, log: String },
    /// Nix could not be started, was killed, or printed something we could not read.
    #[error("{0}")]
    Infra(String),
    /// An evaluation ran past its memory cap: the expression's doing, like an error it throws.
    #[error("{0}")]
    OutOfMemory(String),
    /// An evaluation ran past its time or output limit: the expression's doing, and not
    /// worth trying again in smaller pieces.
    #[error("{0}")]
    TooLong(String),
    /// An evaluation stopped past its time limit while it was on `attr`; it had evaluated
    /// `done` before (their results lost with the process), which took `before` of it.
    #[error("{message}")]
    TooLongAt {
        message: String,
        attr: String,
        before: Duration,
        done: Vec<String>,
    },
}

impl NixError {
    pub fn is_infra(&self) -> bool {
        matches!(self, NixError::Infra(_))
    }
}

/// Options of one build.
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// Binary cache to substitute from (empty: none, the local store only).
    pub substituter: String,
    pub trusted_public_keys: Vec<String>,
    pub timeout: Option<Duration>,
    pub max_silent: Option<Duration>,
    /// A netrc file with the substituter's credentials (a token-protected farm cache).
    pub netrc: Option<std::path::PathBuf>,
    /// CA certificates Nix trusts for the substituter (a farm cache behind a private CA).
    pub ssl_cert_file: Option<std::path::PathBuf>,
    /// Registers the outputs as GC roots (this path, and `-<n>` beside it for more outputs)
    /// as Nix builds them, so a collector running meanwhile cannot take them.
    pub gc_root: Option<std::path::PathBuf>,
    /// The system features this builder offers (what the coordinator was told); Nix then
    /// builds derivations that require them. Empty: Nix's own.
    pub system_features: Vec<String>,
    /// Build again although the outputs are valid, and fail if the result differs (`--check`;
    /// for a fixed-output derivation: runs its fetcher and compares the hash).
    pub check: bool,
    /// Far off its run's longest chain: built at a lower CPU priority (10 nicer than this
    /// process), so that the build the run waits on gets the CPU first.
    pub background: bool,
}

/// What one `nix-store --realise` did.
#[derive(Debug, Clone)]
pub struct BuildRun {
    pub result: Result<Vec<String>, Failure>,
    pub log_tail: String,
    pub duration: Duration,
    /// True when Nix fetched the outputs instead of building them.
    pub substituted: bool,
    /// True when Nix said it built this very derivation now (so a fixed output's hash was
    /// checked against what its own fetcher produced); false when unsure.
    pub built: bool,
    /// True when every output was valid already: Nix neither built nor fetched anything, so
    /// the duration says nothing of how long the build takes.
    pub already_valid: bool,
    pub cancelled: bool,
}

/// How to call Nix: binaries and options shared by every call.
#[derive(Debug, Clone)]
pub struct Nix {
    pub nix: PathBuf,
    pub nix_store: PathBuf,
    /// Bytes of log kept for reports.
    pub log_tail_bytes: usize,
    /// The build hook builds run with (see [`Nix::with_declining_hook`]); None: Nix's own.
    pub build_hook: Option<PathBuf>,
    /// Long-lived daemons builds go through (see [`Nix::with_daemon`]); None: one
    /// `nix-store --realise` per build.
    pub(crate) daemon: Option<std::sync::Arc<crate::daemon::DaemonPool>>,
    /// Longest one evaluation (or store query) process may run; [`EVAL_DEADLINE`] unless
    /// set.
    pub eval_deadline: Duration,
    /// Evaluations run isolated from this host's secrets (see [`crate::isolation`]): these
    /// are the agent's own secret files (covered whenever they exist, as a file written
    /// later does). None: they read all they can (a single user's own farm).
    pub isolation: Option<std::sync::Arc<Vec<PathBuf>>>,
    /// Where an isolated evaluation keeps Nix's fetcher cache (`XDG_CACHE_HOME`): its HOME
    /// is covered, and fetching a tarball (a flake in a subdirectory of its checkout) needs
    /// one. None: Nix's default.
    pub eval_cache_home: Option<PathBuf>,
    /// What builds in this process's own store may not read (see
    /// [`Nix::with_build_isolation`]); None: builds are not covered.
    pub(crate) build_covers: Option<std::sync::Arc<Vec<PathBuf>>>,
    /// Nix is given no global flake registry (see [`NO_FLAKE_REGISTRY`]): for an agent that
    /// refuses the indirect references it resolves, a fetch from the network (and a
    /// failure where that is out of reach) for nothing.
    pub no_flake_registry: bool,
    /// How much nicer than this process evaluations run (0: as this one); see
    /// [`Nix::niced_evals`].
    eval_nice: i32,
}

/// What `flake-registry` names when there is none: a path that does not exist, which every
/// Nix reads as an empty registry (2.8 downloads anything not absolute, so "" will not do),
/// under Nix's own state directory, which only the store's owner writes.
pub const NO_FLAKE_REGISTRY: &str = "/nix/var/nix/nixfarm-no-flake-registry.json";

/// Most JSON one Nix command may print, bytes.
pub const MAX_JSON_BYTES: usize = 512 << 20;
/// How long one evaluation (or store query) process may run, unless set otherwise.
pub const EVAL_DEADLINE: Duration = Duration::from_secs(3600);

impl Default for Nix {
    fn default() -> Self {
        Nix {
            nix: "nix".into(),
            nix_store: "nix-store".into(),
            log_tail_bytes: 16 * 1024,
            build_hook: None,
            daemon: None,
            eval_deadline: EVAL_DEADLINE,
            isolation: None,
            eval_cache_home: None,
            build_covers: None,
            no_flake_registry: false,
            eval_nice: 0,
        }
    }
}

/// What every Nix command of nixfarm's is run with (`c` runs Nix, or wraps it).
fn nix_flags(mut c: Command) -> Command {
    c.args(["--extra-experimental-features", "nix-command flakes"]);
    // A repository's `nixConfig` is its own word: a host whose nix.conf accepts it would let
    // it turn off pure evaluation, or set anything else, for the agent's Nix.
    c.args(["--option", "accept-flake-config", "false"]);
    c.kill_on_drop(true);
    c.stdin(Stdio::null());
    c
}

pub use crate::quote::{fragment, nix_string};

/// Gives `c` these settings, as `--option NAME VALUE`. The CA file goes in the environment
/// as well (`NIX_SSL_CERT_FILE`): Nix 2.8 takes `ssl-cert-file` from there and ignores it on
/// the command line, so a farm cache behind a private CA would fail its TLS handshake.
pub(crate) fn apply_settings<'a>(
    c: &mut Command,
    settings: impl IntoIterator<Item = (&'a str, &'a std::ffi::OsStr)>,
) {
    for (k, v) in settings {
        if k == "ssl-cert-file" {
            c.env("NIX_SSL_CERT_FILE", v);
        }
        c.arg("--option").arg(k).arg(v);
    }
}

impl Nix {
    pub(crate) fn nix_cmd(&self) -> Command {
        self.registry(nix_flags(Command::new(&self.nix)))
    }

    fn registry(&self, mut c: Command) -> Command {
        if self.no_flake_registry {
            c.args(["--option", "flake-registry", NO_FLAKE_REGISTRY]);
        }
        c
    }

    /// `nix --version`, e.g. "nix (Nix) 2.8.0".
    pub async fn version(&self) -> Result<String, NixError> {
        let out = Command::new(&self.nix)
            .arg("--version")
            .output()
            .await
            .map_err(|e| NixError::Infra(format!("cannot run {}: {e}", self.nix.display())))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Runs a Nix command that prints JSON; its output and time are bounded
    /// ([`MAX_JSON_BYTES`], [`Nix::eval_deadline`]).
    pub(crate) async fn run_json(&self, cmd: Command, mem_mib: u64) -> Result<String, NixError> {
        self.run_json_marked(cmd, mem_mib, None).await
    }

    /// [`Nix::run_json`], reading the `marks` the expression prints as it goes.
    pub(crate) async fn run_json_marked(
        &self,
        mut cmd: Command,
        mem_mib: u64,
        marks: Option<&crate::captured::Marks>,
    ) -> Result<String, NixError> {
        use crate::captured::{CaptureError, capture};
        limit_memory(&mut cmd, mem_mib);
        let out = match capture(&mut cmd, MAX_JSON_BYTES, self.eval_deadline, marks).await {
            Ok(out) => out,
            Err(e @ CaptureError::Spawn(_)) | Err(e @ CaptureError::Io(_)) => {
                return Err(NixError::Infra(format!("nix: {e}")));
            }
            // What the expression makes Nix do: its own failure. Past the output limit the
            // marks name no attribute (newer Nix prints its JSON at the end, every attribute
            // marked by then).
            Err(e) => {
                if let (CaptureError::TooMuch(_), Some(m)) = (&e, marks) {
                    m.forget();
                }
                return Err(NixError::TooLong(format!("nix evaluation stopped: {e}")));
            }
        };
        let stderr = out.stderr;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).to_string());
        }
        match first_error(&stderr) {
            // Under a cap, running out of memory is the expression's own doing.
            Some(message) if mem_mib > 0 && is_out_of_memory(&message) => {
                Err(NixError::OutOfMemory(format!(
                    "evaluation ran out of memory (the limit is {mem_mib} MiB per evaluation process: eval_memory_mib)"
                )))
            }
            // The store or the machine failed, not the expression: retried, never reported
            // as the package's own error. A full disk only when this host's is (`abort`
            // can say the words).
            Some(message) if crate::room::machine_error_here(&message) => {
                Err(NixError::Infra(message))
            }
            // The expression's own error, with where Nix says it is (a syntax error's line).
            Some(message) => Err(NixError::Failed {
                message: match crate::messages::error_position(&stderr) {
                    Some(at) if !message.contains(&at) => format!("{message} (at {at})"),
                    _ => message,
                },
                log: stderr,
            }),
            None => Err(NixError::Infra(format!(
                "nix failed ({}) without an error message: {}",
                out.status,
                tail(&stderr, 2000)
            ))),
        }
    }

    /// This Nix, its evaluations run as nice as background builds: for one whose result the
    /// run's builds do not wait on (only an error's message).
    pub fn niced_evals(&self) -> Nix {
        Nix {
            eval_nice: crate::daemon::BACKGROUND_NICE,
            ..self.clone()
        }
    }

    pub(crate) fn eval_cmd(&self, substituter: &str) -> Command {
        let mut c = match &self.isolation {
            Some(own) => {
                let mut c = self.registry(nix_flags(
                    crate::isolation::Masks::of(own).command(&self.nix),
                ));
                // None of the agent's environment (its tokens) either: what Nix needs.
                crate::entry::keep_env(&mut c, &["NIX_CONFIG"]);
                if let Some(cache) = &self.eval_cache_home {
                    c.env("XDG_CACHE_HOME", cache);
                }
                c
            }
            None => self.nix_cmd(),
        };
        // --no-eval-cache: the eval cache replays failures as misleading errors (NixOS/nix#3872).
        c.args([
            "eval",
            "--json",
            "--no-eval-cache",
            "--option",
            "substituters",
            substituter,
        ]);
        set_nice(&mut c, self.eval_nice);
        c
    }

    /// Copies `paths` (`.drv` files, or outputs: not both at once) and their closure from the
    /// binary cache `from` into this store, their signatures checked against
    /// `trusted_public_keys`.
    pub async fn copy_from(
        &self,
        from: &str,
        paths: &[String],
        trusted_public_keys: &[String],
        netrc: Option<&std::path::Path>,
        ssl_cert_file: Option<&std::path::Path>,
    ) -> Result<(), NixError> {
        let mut c = self.nix_cmd();
        let files = [("netrc-file", netrc), ("ssl-cert-file", ssl_cert_file)];
        apply_settings(
            &mut c,
            files
                .iter()
                .filter_map(|(k, v)| Some((*k, (*v)?.as_os_str()))),
        );
        // --derivation: a .drv path names the derivation itself, not its outputs (and an
        // output path, with it, would name its deriver).
        c.arg("copy");
        if paths.iter().all(|p| p.ends_with(".drv")) {
            c.arg("--derivation");
        }
        c.args(["--from", from])
            .args([
                "--option",
                "trusted-public-keys",
                &trusted_public_keys.join(" "),
            ])
            .args(paths)
            .stdout(Stdio::null());
        let o = c
            .output()
            .await
            .map_err(|e| NixError::Infra(format!("cannot run nix copy: {e}")))?;
        if o.status.success() {
            Ok(())
        } else {
            Err(NixError::Infra(format!(
                "nix copy --from {from} failed: {}",
                tail(
                    &crate::messages::strip_ansi(&String::from_utf8_lossy(&o.stderr)),
                    500
                )
            )))
        }
    }

    /// Builds one derivation with `nix-store --realise`, streaming its log to `on_log`.
    /// Cancelling `cancel` interrupts Nix (which stops the builder) and reports `cancelled`.
    pub async fn realise(
        &self,
        drv: &str,
        opts: &BuildOptions,
        cancel: CancellationToken,
        mut on_log: impl FnMut(&[u8]) + Send,
    ) -> BuildRun {
        // A check (`--check`) stays with nix-store: rare, and its mode is not worth a daemon.
        if !opts.check
            && let Some(pool) = &self.daemon
            && let Some(run) = self
                .realise_daemon(pool, drv, opts, &cancel, &mut on_log)
                .await
        {
            return run;
        }
        let start = Instant::now();
        let mut c = crate::isolation::build_command(
            &self.nix_store,
            self.build_covers.as_deref().map(Vec::as_slice),
        );
        c.kill_on_drop(true)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c.args(["--realise", drv]);
        let settings = self.build_settings(opts);
        apply_settings(
            &mut c,
            settings.iter().map(|(k, v)| (k.as_str(), v.as_ref())),
        );
        if let Some(r) = &opts.gc_root {
            c.arg("--add-root").arg(r).arg("--indirect");
        }
        if opts.check {
            c.arg("--check");
        }
        if opts.background {
            set_nice(&mut c, crate::daemon::BACKGROUND_NICE);
        }
        let mut child = match c.spawn() {
            Ok(ch) => ch,
            Err(e) => {
                return BuildRun {
                    result: Err(Failure::Infra(format!("cannot run nix-store: {e}"))),
                    log_tail: String::new(),
                    duration: start.elapsed(),
                    substituted: false,
                    built: false,
                    already_valid: false,
                    cancelled: false,
                };
            }
        };
        let mut stdout = child.stdout.take();
        let mut stderr = child.stderr.take();
        let out_task = tokio::spawn(async move {
            let mut s = String::new();
            if let Some(o) = stdout.as_mut() {
                let _ = o.read_to_string(&mut s).await;
            }
            s
        });
        let mut log = TailBuffer::build_log(self.log_tail_bytes.max(64 * 1024));
        let mut cancelled = false;
        if let Some(err) = stderr.as_mut() {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                tokio::select! {
                    n = read_some(err, &mut buf) => match n {
                        Some(n) => { on_log(&buf[..n]); log.push(&buf[..n]); }
                        None => break,
                    },
                    _ = cancel.cancelled(), if !cancelled => {
                        cancelled = true;
                        interrupt(&child);
                    }
                }
            }
        }
        let status = tokio::select! {
            s = child.wait() => s.ok(),
            _ = tokio::time::sleep(Duration::from_secs(30)) => {
                // The whole group: a covered Nix runs on in place of the `unshare` `kill` ends.
                if let Some(pid) = child.id() {
                    crate::isolation::signal(pid, libc::SIGKILL);
                }
                let _ = child.kill().await;
                None
            }
        };
        let stdout = out_task.await.unwrap_or_default();
        let full_log = log.text();
        let (substituted, built) = what_nix_did(&full_log, drv);
        let result = if cancelled {
            Err(Failure::Infra("cancelled".into()))
        } else if status.is_some_and(|s| s.success()) {
            // With --add-root Nix prints the roots it made: the outputs are their targets.
            Ok(stdout
                .lines()
                .map(str::trim)
                .filter(|l| l.starts_with('/'))
                .map(|l| match &opts.gc_root {
                    Some(_) => std::fs::read_link(l)
                        .map(|t| t.display().to_string())
                        .unwrap_or_else(|_| l.to_string()),
                    None => l.to_string(),
                })
                .collect())
        } else {
            use std::os::unix::process::ExitStatusExt as _;
            let signal = status.and_then(|s| s.signal());
            Err(crate::messages::aborted(signal, &full_log)
                .unwrap_or_else(|| classify_failure(status.and_then(|s| s.code()), &full_log)))
        };
        BuildRun {
            // A check (`--check`) builds again whatever it says.
            already_valid: !opts.check && result.is_ok() && did_nothing(&full_log),
            result,
            log_tail: tail(&full_log, self.log_tail_bytes),
            duration: start.elapsed(),
            substituted,
            built,
            cancelled,
        }
    }
}

/// From a build's log as `nix-store` prints it (or the daemon's activities, written the
/// same way): whether Nix fetched the outputs instead of building anything, and whether it
/// built `drv` itself.
pub(crate) fn what_nix_did(log: &str, drv: &str) -> (bool, bool) {
    let substituted = log.contains("copying path") && !log.contains("building '");
    (substituted, log.contains(&format!("building '{drv}'")))
}

/// Whether a successful `nix-store --realise` said nothing of building or fetching (every
/// Nix and Lix prints one of these whenever it does either).
fn did_nothing(log: &str) -> bool {
    ![
        "building '",
        "copying path",
        "will be built",
        "will be fetched",
    ]
    .iter()
    .any(|w| log.contains(w))
}

async fn read_some<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Option<usize> {
    match r.read(buf).await {
        Ok(0) | Err(_) => None,
        Ok(n) => Some(n),
    }
}

/// Asks Nix to stop (SIGINT), so it stops its builder and releases its locks.
fn interrupt(child: &tokio::process::Child) {
    if let Some(pid) = child.id() {
        crate::isolation::signal(pid, libc::SIGINT);
    }
}

/// Caps the child's address space (for evaluation workers), so one runaway evaluation
/// fails alone instead of exhausting the host.
/// Whether Nix's error says it ran out of memory.
fn is_out_of_memory(message: &str) -> bool {
    ["out of memory", "std::bad_alloc", "Cannot allocate memory"]
        .iter()
        .any(|m| message.contains(m))
}

fn limit_memory(cmd: &mut Command, mem_mib: u64) {
    if mem_mib == 0 {
        return;
    }
    let bytes = mem_mib.saturating_mul(1024 * 1024) as libc::rlim_t;
    // SAFETY: setrlimit is async-signal-safe and touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Has the process `c` starts run `nice` steps nicer than this one (0: as this one), and
/// everything it starts in turn (Nix's builders).
pub(crate) fn set_nice(c: &mut Command, nice: i32) {
    if nice == 0 {
        return;
    }
    // SAFETY: runs in the forked child before exec; nice(2) is a plain system call that
    // touches no memory of the parent. Becoming nicer needs no privilege; should it fail
    // anyway, the build runs at this process's priority.
    unsafe {
        c.pre_exec(move || {
            libc::nice(nice);
            Ok(())
        });
    }
}

#[cfg(test)]
#[path = "runner_tests.rs"]
mod tests;
