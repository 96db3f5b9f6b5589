//! Builds over Nix's daemon protocol: a long-lived `nix-daemon --stdio` per set of build
//! settings, reused build after build, so a build costs no Nix process start. With Nix 2.8 a
//! trivial derivation takes about 8 ms this way against about 40 ms with one
//! `nix-store --realise` each (measured here). Only for a store this process owns (no
//! `NIX_REMOTE`): in front of a system daemon `--stdio` only relays bytes, and the settings
//! given to it would not reach the builds. Any failure to start or speak to it falls back to
//! `nix-store`.
//! The protocol itself is in `worker_protocol.rs`.

use crate::daemon_cache::CacheDirs;
use crate::messages::{Failure, classify_nix_failure};
use crate::runner::{BuildOptions, BuildRun, Nix, TailBuffer, tail};
use crate::worker_protocol::{Conn, DaemonError, exit_code, is_already_valid, succeeded};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

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
/// How much nicer than the agent a build far off its run's longest chain runs: a build the
/// run waits on gets the CPU first, and these still get what it leaves.
pub(crate) const BACKGROUND_NICE: i32 = 10;
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The settings a daemon is started with (`--option NAME VALUE`): those of one kind of build.
pub(crate) type Settings = Vec<(String, String)>;

/// Whether builds land in a store this process owns: no `NIX_REMOTE` naming another, and
/// the store's state directory writable here.
fn owns_store() -> bool {
    let remote = std::env::var("NIX_REMOTE").unwrap_or_default();
    let state = std::env::var_os("NIX_STATE_DIR")
        .map_or_else(|| PathBuf::from("/nix/var/nix"), PathBuf::from);
    let probe = if state.exists() {
        state
    } else {
        PathBuf::from("/nix")
    };
    let writable = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes())
        // SAFETY: access(2) reads a NUL-terminated path we own; no memory is written.
        .is_ok_and(|c| unsafe { libc::access(c.as_ptr(), libc::W_OK) } == 0);
    (remote.is_empty() || remote == "local") && writable
}

/// Idle connections by the settings they were started with.
pub(crate) struct DaemonPool {
    program: PathBuf,
    /// What its daemons' builds may not read (see [`Nix::with_build_isolation`]).
    covers: Option<Arc<Vec<PathBuf>>>,
    disabled: AtomicBool,
    idle: Mutex<Vec<Idle>>,
    /// Each daemon being started ahead ([`DaemonPool::prewarm`]).
    ahead: Mutex<Vec<Ahead>>,
    next_ahead: std::sync::atomic::AtomicU64,
    /// Told when one of those is ready (or failed to start).
    ready: tokio::sync::Notify,
    reaper: AtomicBool,
    caches: Arc<CacheDirs>,
}

impl std::fmt::Debug for DaemonPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonPool")
            .field("program", &self.program)
            .field("disabled", &self.disabled.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// A daemon being started ahead of the builds that will want it.
struct Ahead {
    id: u64,
    settings: Settings,
    /// A build waits for it.
    claimed: bool,
}

/// Strikes its daemon's entry from those being started ahead when dropped (started, failed
/// or abandoned alike), and tells the waiters.
struct AheadGuard {
    pool: Arc<DaemonPool>,
    id: u64,
}

impl Drop for AheadGuard {
    fn drop(&mut self) {
        if let Ok(mut ahead) = self.pool.ahead.lock() {
            ahead.retain(|a| a.id != self.id);
        }
        self.pool.ready.notify_waiters();
    }
}

struct Idle {
    settings: Settings,
    conn: Conn,
    since: Instant,
}

impl DaemonPool {
    /// Daemons running `program`, their narinfo caches under `cache_base`.
    pub(crate) fn new(
        program: PathBuf,
        cache_base: PathBuf,
        covers: Option<Arc<Vec<PathBuf>>>,
    ) -> DaemonPool {
        DaemonPool {
            program,
            covers,
            disabled: AtomicBool::new(false),
            idle: Mutex::new(Vec::new()),
            ahead: Mutex::new(Vec::new()),
            next_ahead: std::sync::atomic::AtomicU64::new(0),
            ready: tokio::sync::Notify::new(),
            reaper: AtomicBool::new(false),
            caches: CacheDirs::new(cache_base),
        }
    }

    /// A live connection with `settings`, pooled or new, its daemon at CPU priority `nice`;
    /// None once a daemon could not be started (this Nix has none, or speaks an older
    /// protocol): builds use `nix-store`. A daemon being started ahead with these settings
    /// that no other build waits for is waited for rather than another started.
    async fn take(&self, settings: &Settings, nice: i32) -> Option<Conn> {
        if self.disabled.load(Ordering::Relaxed) {
            return None;
        }
        let mut claim: Option<u64> = None;
        loop {
            // Armed before looking, so a daemon that comes ready meanwhile is not missed.
            let ready = self.ready.notified();
            tokio::pin!(ready);
            ready.as_mut().enable();
            let pooled = {
                let mut idle = self.idle.lock().ok()?;
                let mut ahead = self.ahead.lock().ok()?;
                // A claim lasts one wait: whatever came ready is looked for first.
                release(&mut ahead, claim.take());
                prune(&mut idle);
                let pooled = idle
                    .iter()
                    .position(|i| &i.settings == settings && i.conn.nice == nice)
                    .map(|at| idle.swap_remove(at).conn);
                if pooled.is_none()
                    && nice == 0
                    && let Some(a) = ahead
                        .iter_mut()
                        .find(|a| !a.claimed && &a.settings == settings)
                {
                    a.claimed = true;
                    claim = Some(a.id);
                }
                pooled
            };
            match pooled {
                Some(mut c) => {
                    if matches!(c.child.try_wait(), Ok(None)) {
                        if std::mem::take(&mut c.ahead) {
                            tracing::debug!("a build takes a daemon started ahead of it");
                        }
                        return Some(c);
                    }
                }
                // One is being started ahead with these settings: it is nearer than a new one.
                None if claim.is_some() => {
                    if tokio::time::timeout(HANDSHAKE_TIMEOUT, ready)
                        .await
                        .is_err()
                    {
                        self.unclaim(claim.take());
                        break;
                    }
                }
                None => break,
            }
        }
        tracing::debug!(
            nice,
            "a build starts a daemon: none waits with its settings"
        );
        let cache = self.caches.take();
        let started = Conn::start(&self.program, self.covers.as_deref(), settings, cache, nice);
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, started).await {
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

    fn unclaim(&self, claim: Option<u64>) {
        if let Ok(mut ahead) = self.ahead.lock() {
            release(&mut ahead, claim);
        }
    }

    /// A live connection for store queries (validity, path infos), which no build setting
    /// changes: an idle one with `settings`, else the longest idle at full CPU priority
    /// (the newest are likely started ahead for builds about to come), else one started with
    /// `settings`; with the settings it was started with, to be put back under.
    pub(crate) async fn take_for_query(&self, settings: &Settings) -> Option<(Settings, Conn)> {
        if self.disabled.load(Ordering::Relaxed) {
            return None;
        }
        loop {
            let pooled = {
                let mut idle = self.idle.lock().ok()?;
                prune(&mut idle);
                let at = idle
                    .iter()
                    .position(|i| &i.settings == settings && i.conn.nice == 0)
                    .or_else(|| idle.iter().position(|i| i.conn.nice == 0));
                at.map(|at| idle.remove(at)).map(|i| (i.settings, i.conn))
            };
            match pooled {
                Some((s, mut c)) => {
                    if matches!(c.child.try_wait(), Ok(None)) {
                        return Some((s, c));
                    }
                }
                None => return Some((settings.clone(), self.take(settings, 0).await?)),
            }
        }
    }

    /// Starts daemons with `settings` until `n` of them wait idle or are starting, so that
    /// the first builds of a run do not each wait for a daemon to start; never more than the
    /// pool keeps. Each is pooled as soon as it is ready. One that fails to start stops the
    /// pool, as a build's would: builds use `nix-store`.
    fn prewarm(self: &Arc<Self>, settings: Settings, n: usize) {
        if self.disabled.load(Ordering::Relaxed) {
            return;
        }
        let (Ok(idle), Ok(mut ahead)) = (self.idle.lock(), self.ahead.lock()) else {
            return;
        };
        let have = idle
            .iter()
            .filter(|i| i.settings == settings && i.conn.nice == 0)
            .count()
            + ahead.iter().filter(|a| a.settings == settings).count();
        let room = MAX_POOLED.saturating_sub(idle.len() + ahead.len());
        drop(idle);
        for _ in 0..n.min(MAX_POOLED).saturating_sub(have).min(room) {
            let id = self.next_ahead.fetch_add(1, Ordering::Relaxed);
            ahead.push(Ahead {
                id,
                settings: settings.clone(),
                claimed: false,
            });
            let guard = AheadGuard {
                pool: self.clone(),
                id,
            };
            let settings = settings.clone();
            tokio::spawn(async move {
                let pool = &guard.pool;
                let cache = pool.caches.take();
                let started =
                    Conn::start(&pool.program, pool.covers.as_deref(), &settings, cache, 0);
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, started).await {
                    Ok(Ok(mut c)) => {
                        c.ahead = true;
                        pool.put(settings, c)
                    }
                    Ok(Err(e)) => pool.disable(&e.to_string()),
                    Err(_) => pool.disable("no handshake within 10 s"),
                }
                // The guard goes here: its entry is struck and the waiters told.
                drop(guard);
            });
        }
    }

    /// Stops every idle daemon: each holds temporary GC roots for what it fetched or built,
    /// which keep those paths from being deleted.
    pub(crate) fn close_idle(&self) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.clear();
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

    pub(crate) fn put(self: &Arc<Self>, settings: Settings, conn: Conn) {
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

/// Gives up `claim` on a daemon being started ahead, if it is still starting.
fn release(ahead: &mut [Ahead], claim: Option<u64>) {
    if let Some(a) = claim.and_then(|id| ahead.iter_mut().find(|a| a.id == id)) {
        a.claimed = false;
    }
}

fn prune(idle: &mut Vec<Idle>) {
    idle.retain(|i| i.since.elapsed() < MAX_IDLE && i.conn.born.elapsed() < MAX_AGE);
}

impl Nix {
    /// The settings of a build, as `--option NAME VALUE` pairs: the same for `nix-store` and
    /// for a daemon started for such builds.
    pub(crate) fn build_settings(&self, opts: &BuildOptions) -> Vec<(String, String)> {
        // A cache with no key to check what it serves is no substituter: a run's cache is
        // its submitter's choice, and what is substituted lands in this store for every
        // later run (Nix's own rule: signatures are required).
        let substituter = if opts.trusted_public_keys.is_empty() {
            String::new()
        } else {
            opts.substituter.clone()
        };
        let mut out = vec![
            ("substituters".to_string(), substituter.clone()),
            ("builders".to_string(), String::new()),
        ];
        let mut set = |k: &str, v: String| out.push((k.to_string(), v));
        if let Some(h) = &self.build_hook {
            set("build-hook", h.display().to_string());
        }
        if !opts.system_features.is_empty() {
            set("system-features", opts.system_features.join(" "));
        }
        if let Some(n) = &opts.netrc {
            set("netrc-file", n.display().to_string());
        }
        if let Some(ca) = &opts.ssl_cert_file {
            set("ssl-cert-file", ca.display().to_string());
            // Fixed-output builds get the CA file's path (NIX_SSL_CERT_FILE): in a sandbox
            // it must be there too (`?`: a build does not fail for want of it).
            set("extra-sandbox-paths", format!("{}?", ca.display()));
        }
        if !substituter.is_empty() {
            // The farm's cache gains paths while a run goes: a "not there" remembered from
            // a minute ago would have Nix build an input again instead of fetching it.
            set("narinfo-cache-negative-ttl", "0".into());
            set("trusted-public-keys", opts.trusted_public_keys.join(" "));
        }
        if let Some(t) = opts.timeout {
            set("timeout", t.as_secs().max(1).to_string());
        }
        if let Some(t) = opts.max_silent {
            set("max-silent-time", t.as_secs().max(1).to_string());
        }
        out
    }

    /// Has builds go through long-lived `nix-daemon --stdio` processes (no Nix process start
    /// per build) when this process owns its store: not when `NIX_REMOTE` names another
    /// store, or the store's state directory is not writable here. Falls back to
    /// `nix-store --realise` by itself if no daemon can be started. Each daemon keeps its
    /// narinfo cache in a directory of its own under `work_dir/nix-cache`.
    pub fn with_daemon(mut self, work_dir: &std::path::Path) -> Nix {
        if !owns_store() {
            tracing::info!("builds use nix-store --realise: the store is not this process's own");
            return self;
        }
        let program = match self.nix_store.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.join("nix-daemon"),
            _ => PathBuf::from("nix-daemon"),
        };
        self.daemon = Some(std::sync::Arc::new(crate::daemon::DaemonPool::new(
            program,
            work_dir.join("nix-cache"),
            self.build_covers.clone(),
        )));
        self
    }

    /// Whether builds run under covers (see [`Nix::with_build_isolation`]): they read what
    /// was left readable to them.
    pub fn builds_covered(&self) -> bool {
        self.build_covers.is_some()
    }

    /// Builds in a store this process owns run as its user when that is not root (there
    /// are no build users then, and no sandbox here): they get the covers evaluations get
    /// (`own`), but for `readable` (what Nix itself reads while building: the farm cache's
    /// netrc). Call before [`Nix::with_daemon`], whose daemons run so. Builds through a
    /// system daemon run as its build users, and a root agent's as root or its build users:
    /// neither is covered.
    pub fn with_build_isolation(
        mut self,
        own: Option<&std::sync::Arc<Vec<PathBuf>>>,
        readable: &[PathBuf],
    ) -> Nix {
        if let Some(own) = own
            && !crate::isolation::is_root()
            && owns_store()
        {
            let covered = own
                .iter()
                .filter(|p| !readable.contains(p))
                .cloned()
                .collect();
            self.build_covers = Some(std::sync::Arc::new(covered));
        }
        self
    }

    /// Starts `n` daemons for builds with `opts` ahead of them, in the background (when
    /// builds go through daemons): a run's first builds then find one waiting instead of
    /// starting it on their critical path. Unused ones stop after a few seconds.
    pub fn prewarm(&self, opts: &BuildOptions, n: usize) {
        let Some(pool) = self.daemon.clone() else {
            return;
        };
        pool.prewarm(self.build_settings(opts), n);
    }

    /// True while builds go through daemons (set up with [`Nix::with_daemon`], and none has
    /// failed to start).
    pub fn daemon_active(&self) -> bool {
        self.daemon.as_ref().is_some_and(|p| p.active())
    }

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
        let nice = if opts.background { BACKGROUND_NICE } else { 0 };
        let mut conn = pool.take(&settings, nice).await?;
        let mut log = TailBuffer::build_log(self.log_tail_bytes.max(64 * 1024));
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
                        crate::isolation::signal(pid, libc::SIGINT);
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
        let mut already_valid = false;
        let result = match outcome {
            _ if cancelled => Err(Failure::Infra("cancelled".into())),
            Ok(o) if succeeded(o.status) => {
                already_valid = is_already_valid(o.status);
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
                // Through the tail's buffer: Nix's message repeats the log's last lines,
                // a long one too.
                log.push(format!("error: {}\n", o.error).as_bytes());
                full = log.text();
                Err(classify_nix_failure(
                    Some(exit_code(o.status)),
                    &full,
                    &o.error,
                ))
            }
            Err(DaemonError::Nix(msg)) => {
                log.push(format!("error: {msg}\n").as_bytes());
                full = log.text();
                Err(classify_nix_failure(Some(1), &full, &msg))
            }
            Err(e) => Err(conn.broken(e).await),
        };
        if reusable {
            pool.put(settings, conn);
        }
        let (substituted, built) = crate::runner::what_nix_did(&full, drv);
        Some(BuildRun {
            substituted,
            built,
            already_valid,
            log_tail: tail(&full, self.log_tail_bytes),
            duration: start.elapsed(),
            result,
            cancelled,
        })
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
        let mut conn = pool.take(&settings, 0).await?;
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
