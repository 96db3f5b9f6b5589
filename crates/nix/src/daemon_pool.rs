//! The pool of long-lived `nix-daemon --stdio` processes builds go through: idle ones by the
//! settings they were started with, ones started ahead of the builds that will take them,
//! and how long each lives.

use crate::daemon_cache::CacheDirs;
use crate::worker_protocol::Conn;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

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
/// The settings a daemon is started with (`--option NAME VALUE`): those of one kind of build.
pub(crate) type Settings = Vec<(String, String)>;

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
    pub(crate) async fn take(&self, settings: &Settings, nice: i32) -> Option<Conn> {
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
    pub(crate) fn prewarm(self: &Arc<Self>, settings: Settings, n: usize) {
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
