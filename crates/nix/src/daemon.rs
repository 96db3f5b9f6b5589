//! Builds over Nix's daemon protocol: a long-lived `nix-daemon --stdio` per set of build
//! settings, reused build after build, so a build costs no Nix process start. With Nix 2.8 a
//! trivial derivation takes about 8 ms this way against about 40 ms with one
//! `nix-store --realise` each (measured here). Only for a store this process owns (no
//! `NIX_REMOTE`): in front of a system daemon `--stdio` only relays bytes, and the settings
//! given to it would not reach the builds. Any failure to start or speak to it falls back to
//! `nix-store`.
//!
//! The protocol (worker protocol 1.34, which Nix 2.8 and every later Nix and Lix speak):
//! little-endian u64s, strings as a length and bytes padded to 8; a client's operation is
//! answered by log messages (`STDERR_*`) until `STDERR_LAST`, then the result.

use crate::messages::{Failure, classify_failure};
use crate::runner::{BuildOptions, BuildRun, Nix, NixError, StorePathInfo, TailBuffer, tail};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio_util::sync::CancellationToken;

const WORKER_MAGIC_1: u64 = 0x6e69_7863;
const WORKER_MAGIC_2: u64 = 0x6478_696f;
/// 1.34: the first version with `BuildPathsWithResults` (a status per build, not one
/// error for all).
const PROTOCOL: u64 = (1 << 8) | 34;
const STDERR_NEXT: u64 = 0x6f6c_6d67;
const STDERR_READ: u64 = 0x6461_7461;
const STDERR_WRITE: u64 = 0x6461_7416;
const STDERR_LAST: u64 = 0x616c_7473;
const STDERR_ERROR: u64 = 0x6378_7470;
const STDERR_START_ACTIVITY: u64 = 0x5354_5254;
const STDERR_STOP_ACTIVITY: u64 = 0x5354_4f50;
const STDERR_RESULT: u64 = 0x5253_4c54;
const OP_ADD_INDIRECT_ROOT: u64 = 12;
const OP_QUERY_PATH_INFO: u64 = 26;
const OP_BUILD_PATHS_WITH_RESULTS: u64 = 46;
const RES_BUILD_LOG_LINE: u64 = 101;
const RES_POST_BUILD_LOG_LINE: u64 = 107;
/// Activities at this level or below are what `nix-store` prints (`building '…'`,
/// `copying path '…'`); the rest is progress.
const LVL_INFO: u64 = 3;
/// Bounds on what the daemon may send: one string, one message's fields, one result's
/// outputs.
const MAX_STRING: u64 = 16 << 20;
const MAX_FIELDS: u64 = 1024;
const MAX_OUTPUTS: u64 = 4096;
/// A connection is reused for this many builds, or this long, then replaced: a daemon holds
/// everything it built as temporary GC roots until it exits.
const MAX_BUILDS: u32 = 64;
const MAX_AGE: Duration = Duration::from_secs(60);
/// An idle connection is closed after this long (its temporary roots go with it).
const MAX_IDLE: Duration = Duration::from_secs(5);
/// Most idle connections kept.
const MAX_POOLED: usize = 16;
/// Longest wait for the handshake, and for a build to stop once interrupted.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub(crate) enum DaemonError {
    #[error("cannot talk to nix-daemon: {0}")]
    Io(#[from] std::io::Error),
    #[error("nix-daemon sent something unexpected: {0}")]
    Protocol(String),
    /// The daemon's own error for the operation (an invalid path, say).
    #[error("{0}")]
    Nix(String),
}

/// The settings a daemon is started with (`--option NAME VALUE`): those of one kind of build.
pub(crate) type Settings = Vec<(String, String)>;

/// Idle connections by the settings they were started with.
pub(crate) struct DaemonPool {
    program: PathBuf,
    disabled: AtomicBool,
    idle: Mutex<Vec<Idle>>,
    reaper: AtomicBool,
}

impl std::fmt::Debug for DaemonPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonPool")
            .field("program", &self.program)
            .field("disabled", &self.disabled.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

struct Idle {
    settings: Settings,
    conn: Conn,
    since: Instant,
}

impl DaemonPool {
    pub(crate) fn new(program: PathBuf) -> DaemonPool {
        DaemonPool {
            program,
            disabled: AtomicBool::new(false),
            idle: Mutex::new(Vec::new()),
            reaper: AtomicBool::new(false),
        }
    }

    /// A live connection with `settings`, pooled or new; None once a daemon could not be
    /// started (this Nix has none, or speaks an older protocol): builds use `nix-store`.
    async fn take(&self, settings: &Settings) -> Option<Conn> {
        if self.disabled.load(Ordering::Relaxed) {
            return None;
        }
        let pooled = {
            let mut idle = self.idle.lock().ok()?;
            prune(&mut idle);
            idle.iter()
                .position(|i| &i.settings == settings)
                .map(|at| idle.swap_remove(at).conn)
        };
        if let Some(mut c) = pooled
            && matches!(c.child.try_wait(), Ok(None))
        {
            return Some(c);
        }
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, Conn::start(&self.program, settings)).await {
            Ok(Ok(c)) => Some(c),
            Ok(Err(e)) => {
                self.disable(&e.to_string());
                None
            }
            Err(_) => {
                self.disable("no handshake within 10 s");
                None
            }
        }
    }

    pub(crate) fn active(&self) -> bool {
        !self.disabled.load(Ordering::Relaxed)
    }

    fn disable(&self, why: &str) {
        if !self.disabled.swap(true, Ordering::Relaxed) {
            tracing::info!("builds use nix-store --realise: {why}");
        }
    }

    fn put(self: &Arc<Self>, settings: Settings, conn: Conn) {
        if conn.builds >= MAX_BUILDS || conn.born.elapsed() >= MAX_AGE {
            return;
        }
        if let Ok(mut idle) = self.idle.lock() {
            prune(&mut idle);
            if idle.len() >= MAX_POOLED {
                idle.remove(0);
            }
            idle.push(Idle {
                settings,
                conn,
                since: Instant::now(),
            });
        }
        if !self.reaper.swap(true, Ordering::Relaxed) {
            // Idle daemons go after MAX_IDLE even if no build comes to prune them.
            let pool: Weak<DaemonPool> = Arc::downgrade(self);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(MAX_IDLE).await;
                    let Some(p) = pool.upgrade() else { return };
                    if let Ok(mut idle) = p.idle.lock() {
                        prune(&mut idle);
                    }
                }
            });
        }
    }
}

fn prune(idle: &mut Vec<Idle>) {
    idle.retain(|i| i.since.elapsed() < MAX_IDLE && i.conn.born.elapsed() < MAX_AGE);
}

/// One `nix-daemon --stdio` and its pipes.
struct Conn {
    child: Child,
    r: BufReader<ChildStdout>,
    w: BufWriter<ChildStdin>,
    born: Instant,
    builds: u32,
}

/// What the daemon said of one build.
#[derive(Debug)]
struct Outcome {
    status: u64,
    error: String,
    /// (output name, store path).
    outputs: Vec<(String, String)>,
}

impl Conn {
    async fn start(program: &Path, settings: &Settings) -> Result<Conn, DaemonError> {
        let mut c = Command::new(program);
        c.arg("--stdio");
        for (k, v) in settings {
            c.arg("--option").arg(k).arg(v);
        }
        let mut child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let (Some(w), Some(r)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(DaemonError::Protocol("no pipes".into()));
        };
        let mut conn = Conn {
            child,
            r: BufReader::new(r),
            w: BufWriter::new(w),
            born: Instant::now(),
            builds: 0,
        };
        conn.u64(WORKER_MAGIC_1).await?;
        conn.w.flush().await?;
        if conn.read_u64().await? != WORKER_MAGIC_2 {
            return Err(DaemonError::Protocol("not a Nix daemon".into()));
        }
        let server = conn.read_u64().await?;
        if server >> 8 != 1 || server & 0xff < 34 {
            return Err(DaemonError::Protocol(format!(
                "protocol {}.{} (1.34 or later needed)",
                server >> 8,
                server & 0xff
            )));
        }
        conn.u64(PROTOCOL).await?;
        conn.u64(0).await?; // no CPU affinity
        conn.u64(0).await?; // reserveSpace: obsolete
        conn.w.flush().await?;
        conn.read_string().await?; // the daemon's Nix version
        conn.messages(&mut |_| {}, &mut Vec::new()).await?;
        Ok(conn)
    }

    async fn u64(&mut self, n: u64) -> std::io::Result<()> {
        self.w.write_all(&n.to_le_bytes()).await
    }

    async fn string(&mut self, s: &str) -> std::io::Result<()> {
        self.u64(s.len() as u64).await?;
        self.w.write_all(s.as_bytes()).await?;
        let pad = (8 - s.len() % 8) % 8;
        self.w.write_all(&[0u8; 8][..pad]).await
    }

    async fn read_u64(&mut self) -> Result<u64, DaemonError> {
        let mut b = [0u8; 8];
        self.r.read_exact(&mut b).await?;
        Ok(u64::from_le_bytes(b))
    }

    async fn read_string(&mut self) -> Result<String, DaemonError> {
        let n = self.read_u64().await?;
        if n > MAX_STRING {
            return Err(DaemonError::Protocol(format!("a string of {n} bytes")));
        }
        let padded = (n as usize).div_ceil(8) * 8;
        let mut b = vec![0u8; padded];
        self.r.read_exact(&mut b).await?;
        b.truncate(n as usize);
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

    /// An activity's or a result's fields; the strings among them.
    async fn read_fields(&mut self) -> Result<Vec<String>, DaemonError> {
        let n = self.read_u64().await?;
        if n > MAX_FIELDS {
            return Err(DaemonError::Protocol(format!("{n} fields")));
        }
        let mut out = Vec::new();
        for _ in 0..n {
            match self.read_u64().await? {
                0 => {
                    self.read_u64().await?;
                }
                1 => out.push(self.read_string().await?),
                t => return Err(DaemonError::Protocol(format!("field type {t}"))),
            }
        }
        Ok(out)
    }

    /// Log messages up to `STDERR_LAST`: what `nix-store` would print goes to `log` as text,
    /// the builder's lines included; the texts of started activities to `activities`.
    async fn messages(
        &mut self,
        log: &mut (dyn FnMut(&[u8]) + Send),
        activities: &mut Vec<String>,
    ) -> Result<(), DaemonError> {
        loop {
            match self.read_u64().await? {
                STDERR_LAST => return Ok(()),
                STDERR_NEXT => {
                    let mut s = self.read_string().await?;
                    if !s.ends_with('\n') {
                        s.push('\n');
                    }
                    log(s.as_bytes());
                }
                STDERR_START_ACTIVITY => {
                    let _id = self.read_u64().await?;
                    let level = self.read_u64().await?;
                    let _kind = self.read_u64().await?;
                    let text = self.read_string().await?;
                    self.read_fields().await?;
                    let _parent = self.read_u64().await?;
                    if level <= LVL_INFO && !text.is_empty() {
                        log(format!("{text}...\n").as_bytes());
                        activities.push(text);
                    }
                }
                STDERR_STOP_ACTIVITY => {
                    self.read_u64().await?;
                }
                STDERR_RESULT => {
                    let _id = self.read_u64().await?;
                    let kind = self.read_u64().await?;
                    let fields = self.read_fields().await?;
                    if matches!(kind, RES_BUILD_LOG_LINE | RES_POST_BUILD_LOG_LINE)
                        && let Some(line) = fields.first()
                    {
                        log(format!("{line}\n").as_bytes());
                    }
                }
                STDERR_WRITE => {
                    self.read_string().await?;
                }
                STDERR_ERROR => {
                    let _type = self.read_string().await?;
                    let _level = self.read_u64().await?;
                    let _name = self.read_string().await?;
                    let msg = self.read_string().await?;
                    if self.read_u64().await? != 0 {
                        return Err(DaemonError::Protocol("an error with a position".into()));
                    }
                    let traces = self.read_u64().await?;
                    if traces > MAX_FIELDS {
                        return Err(DaemonError::Protocol(format!("{traces} traces")));
                    }
                    for _ in 0..traces {
                        if self.read_u64().await? != 0 {
                            return Err(DaemonError::Protocol("a trace with a position".into()));
                        }
                        self.read_string().await?;
                    }
                    return Err(DaemonError::Nix(msg));
                }
                STDERR_READ => {
                    return Err(DaemonError::Protocol("asked for data".into()));
                }
                m => return Err(DaemonError::Protocol(format!("message {m:#x}"))),
            }
        }
    }

    /// Realises one derived path (`BuildPathsWithResults`, normal mode): `DRV!*` builds
    /// every output of a derivation, a plain store path is substituted.
    async fn build(
        &mut self,
        path: &str,
        log: &mut (dyn FnMut(&[u8]) + Send),
    ) -> Result<Outcome, DaemonError> {
        self.builds += 1;
        self.u64(OP_BUILD_PATHS_WITH_RESULTS).await?;
        self.u64(1).await?;
        self.string(path).await?;
        self.u64(0).await?;
        self.w.flush().await?;
        self.messages(log, &mut Vec::new()).await?;
        let n = self.read_u64().await?;
        if n != 1 {
            return Err(DaemonError::Protocol(format!("{n} results for one build")));
        }
        let _path = self.read_string().await?;
        let status = self.read_u64().await?;
        let error = self.read_string().await?;
        for _ in 0..4 {
            // timesBuilt, isNonDeterministic, startTime, stopTime
            self.read_u64().await?;
        }
        let m = self.read_u64().await?;
        if m > MAX_OUTPUTS {
            return Err(DaemonError::Protocol(format!("{m} outputs")));
        }
        let mut outputs = Vec::new();
        for _ in 0..m {
            let id = self.read_string().await?;
            let realisation = self.read_string().await?;
            let name = id.rsplit_once('!').map(|(_, n)| n.to_string());
            let path = serde_json::from_str::<serde_json::Value>(&realisation)
                .ok()
                .and_then(|v| v.get("outPath")?.as_str().map(String::from))
                .map(|p| {
                    if p.starts_with('/') {
                        p
                    } else {
                        format!("/nix/store/{p}")
                    }
                });
            match (name, path) {
                (Some(n), Some(p)) if is_store_path(&p) => outputs.push((n, p)),
                _ => {
                    return Err(DaemonError::Protocol(format!(
                        "an output {id}: {}",
                        tail(&realisation, 200)
                    )));
                }
            }
        }
        outputs.sort();
        Ok(Outcome {
            status,
            error,
            outputs,
        })
    }

    /// What the store knows of `path` (None: not valid).
    async fn query_path_info(&mut self, path: &str) -> Result<Option<StorePathInfo>, DaemonError> {
        self.u64(OP_QUERY_PATH_INFO).await?;
        self.string(path).await?;
        self.w.flush().await?;
        self.messages(&mut |_| {}, &mut Vec::new()).await?;
        if self.read_u64().await? == 0 {
            return Ok(None);
        }
        let deriver = self.read_string().await?;
        let hex = self.read_string().await?;
        let n = self.read_u64().await?;
        if n > MAX_OUTPUTS * 16 {
            return Err(DaemonError::Protocol(format!("{n} references")));
        }
        let mut references = Vec::new();
        for _ in 0..n {
            references.push(self.read_string().await?);
        }
        let _registered = self.read_u64().await?;
        let nar_size = self.read_u64().await?;
        let _ultimate = self.read_u64().await?;
        let sigs = self.read_u64().await?;
        if sigs > MAX_FIELDS {
            return Err(DaemonError::Protocol(format!("{sigs} signatures")));
        }
        for _ in 0..sigs {
            self.read_string().await?;
        }
        let ca = self.read_string().await?;
        // The NAR hash travels as bare SHA-256 hex; Nix prints it as SRI.
        let nar_hash = crate::hash::Hash::parse(&format!("sha256:{hex}"), None)
            .ok_or_else(|| DaemonError::Protocol(format!("a NAR hash {hex:?}")))?
            .to_sri();
        references.sort();
        Ok(Some(StorePathInfo {
            path: path.to_string(),
            nar_hash,
            nar_size,
            references,
            deriver: (!deriver.is_empty()).then_some(deriver),
            ca: (!ca.is_empty()).then_some(ca),
        }))
    }

    /// Registers `link` (a symlink into the store) as an indirect GC root.
    async fn add_indirect_root(&mut self, link: &Path) -> Result<(), DaemonError> {
        self.u64(OP_ADD_INDIRECT_ROOT).await?;
        self.string(&link.to_string_lossy()).await?;
        self.w.flush().await?;
        self.messages(&mut |_| {}, &mut Vec::new()).await?;
        self.read_u64().await?;
        Ok(())
    }
}

/// `/nix/store/NAME`, one component, no `..`: what an output path from the daemon must be
/// before it is linked to.
fn is_store_path(p: &str) -> bool {
    p.strip_prefix("/nix/store/")
        .is_some_and(|n| !n.is_empty() && n.len() <= 211 && !n.contains('/') && !n.starts_with('.'))
}

/// The exit code `nix-store --realise` gives for a build status, for the one classifier of
/// failures (0x60 | 0x04 permanent | 0x01 timed out | 0x02 hash mismatch; 1 for the rest).
fn exit_code(status: u64) -> i32 {
    match status {
        // TimedOut
        8 => 101,
        // OutputRejected: a fixed output's hash mismatch
        5 => 102,
        // PermanentFailure, InputRejected, CachedFailure, DependencyFailed,
        // LogLimitExceeded, NotDeterministic
        3 | 4 | 7 | 10 | 11 | 12 => 100,
        // TransientFailure, MiscFailure, NoSubstituters, anything newer
        _ => 1,
    }
}

/// Built, substituted or already valid (or resolved to a valid one).
fn succeeded(status: u64) -> bool {
    matches!(status, 0..=2 | 13)
}

impl Nix {
    /// Builds `drv` through a pooled daemon; None when no daemon can be had (the caller
    /// runs `nix-store`).
    pub(crate) async fn realise_daemon(
        &self,
        pool: &Arc<DaemonPool>,
        drv: &str,
        opts: &BuildOptions,
        cancel: &CancellationToken,
        on_log: &mut (dyn FnMut(&[u8]) + Send),
    ) -> Option<BuildRun> {
        let start = Instant::now();
        let settings = self.build_settings(opts);
        let mut conn = pool.take(&settings).await?;
        let mut log = TailBuffer::new(self.log_tail_bytes.max(64 * 1024));
        let pid = conn.child.id();
        let mut cancelled = false;
        let outcome = {
            let mut sink = |b: &[u8]| {
                on_log(b);
                log.push(b);
            };
            let wanted = format!("{drv}!*");
            let fut = conn.build(&wanted, &mut sink);
            tokio::pin!(fut);
            tokio::select! {
                r = &mut fut => r,
                _ = cancel.cancelled() => {
                    cancelled = true;
                    if let Some(pid) = pid {
                        // SAFETY: kill(2) on the daemon we spawned; no memory is touched.
                        unsafe { libc::kill(pid as libc::pid_t, libc::SIGINT); }
                    }
                    tokio::time::timeout(STOP_TIMEOUT, fut)
                        .await
                        .unwrap_or_else(|_| Err(DaemonError::Protocol("did not stop".into())))
                }
            }
        };
        let mut full = log.text();
        // Reused only when the exchange ended where the protocol says it does.
        let mut reusable = false;
        let result = match outcome {
            _ if cancelled => Err(Failure::Infra("cancelled".into())),
            Ok(o) if succeeded(o.status) => {
                match self.root_outputs(&mut conn, opts, &o.outputs).await {
                    Ok(()) => {
                        reusable = true;
                        Ok(o.outputs.into_iter().map(|(_, p)| p).collect())
                    }
                    Err(e) => Err(Failure::Infra(format!(
                        "cannot add a GC root for {drv}: {e}"
                    ))),
                }
            }
            Ok(o) => {
                reusable = true;
                full.push_str(&format!("error: {}\n", o.error));
                Err(classify_failure(Some(exit_code(o.status)), &full))
            }
            Err(DaemonError::Nix(msg)) => {
                full.push_str(&format!("error: {msg}\n"));
                Err(classify_failure(Some(1), &full))
            }
            Err(e) => Err(Failure::Infra(e.to_string())),
        };
        if reusable {
            pool.put(settings, conn);
        }
        Some(BuildRun {
            substituted: full.contains("copying path") && !full.contains("building '"),
            built: full.contains(&format!("building '{drv}'")),
            log_tail: tail(&full, self.log_tail_bytes),
            duration: start.elapsed(),
            result,
            cancelled,
        })
    }

    /// [`Nix::closure_infos`] through a pooled daemon, one query per path of the closure
    /// (in this process, not a `nix path-info` each time). None when no daemon can be had.
    pub(crate) async fn closure_infos_daemon(
        &self,
        paths: &[String],
    ) -> Option<Result<Vec<StorePathInfo>, NixError>> {
        let pool = self.daemon.as_ref()?;
        let settings = self.build_settings(&BuildOptions::default());
        let mut conn = pool.take(&settings).await?;
        let mut seen: std::collections::BTreeMap<String, StorePathInfo> = Default::default();
        let mut todo: Vec<String> = paths.to_vec();
        while let Some(p) = todo.pop() {
            if seen.contains_key(&p) {
                continue;
            }
            if seen.len() >= 1_000_000 {
                return Some(Err(NixError::Infra(
                    "a closure of over 1,000,000 paths".into(),
                )));
            }
            match conn.query_path_info(&p).await {
                Ok(Some(info)) => {
                    todo.extend(
                        info.references
                            .iter()
                            .filter(|r| !seen.contains_key(*r))
                            .cloned(),
                    );
                    seen.insert(p, info);
                }
                Ok(None) => {
                    pool.put(settings, conn);
                    return Some(Err(NixError::Infra(format!("path '{p}' is not valid"))));
                }
                Err(e) => return Some(Err(NixError::Infra(e.to_string()))),
            }
        }
        pool.put(settings, conn);
        Some(Ok(seen.into_values().collect()))
    }

    /// Substitutes `path` (with its references) from the build's substituter through a
    /// pooled daemon, as `nix copy --from` would: how a derivation evaluated on another host
    /// gets here. None when no daemon can be had.
    pub async fn substitute_daemon(
        &self,
        path: &str,
        opts: &BuildOptions,
    ) -> Option<Result<(), String>> {
        let pool = self.daemon.as_ref()?;
        let settings = self.build_settings(opts);
        let mut conn = pool.take(&settings).await?;
        let mut said = String::new();
        let r = conn
            .build(path, &mut |b: &[u8]| {
                if said.len() < 4096 {
                    said.push_str(&String::from_utf8_lossy(b));
                }
            })
            .await;
        Some(match r {
            Ok(o) => {
                pool.put(settings, conn);
                if succeeded(o.status) {
                    Ok(())
                } else {
                    Err(crate::messages::strip_ansi(&o.error))
                }
            }
            Err(e) => Err(format!("{e} {}", tail(&said, 500))),
        })
    }

    /// What `--add-root R --indirect` does: `R` links to the output `out`, `R-NAME` to each
    /// other output, and each link is registered as a root.
    async fn root_outputs(
        &self,
        conn: &mut Conn,
        opts: &BuildOptions,
        outputs: &[(String, String)],
    ) -> Result<(), DaemonError> {
        let Some(root) = &opts.gc_root else {
            return Ok(());
        };
        for (name, path) in outputs {
            let link = if name == "out" {
                root.clone()
            } else {
                PathBuf::from(format!("{}-{name}", root.display()))
            };
            let tmp = PathBuf::from(format!("{}.tmp-{}", link.display(), std::process::id()));
            let _ = std::fs::remove_file(&tmp);
            std::os::unix::fs::symlink(path, &tmp)?;
            std::fs::rename(&tmp, &link)?;
            conn.add_indirect_root(&link).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_what_nix_store_exits_with() {
        assert!(succeeded(0) && succeeded(1) && succeeded(2) && succeeded(13));
        assert!(!succeeded(3) && !succeeded(8));
        assert_eq!(exit_code(8), 101);
        assert_eq!(exit_code(5), 102);
        assert_eq!(exit_code(3), 100);
        assert_eq!(exit_code(10), 100);
        assert_eq!(exit_code(6), 1);
        assert_eq!(exit_code(99), 1);
    }
}
