//! Publishing store paths to binary caches: NAR streaming, narinfo and signatures, and the
//! Cachix, `file://` and HTTP cache clients.
//!
//! A push asks the cache which paths of the closure are missing (in batches), then for each
//! missing path, dependencies first: streams its NAR through SHA-256 and zstd into a staging
//! file (memory stays bounded by the part size whatever the path's size), checks the NAR hash
//! against the store's, signs the fingerprint, uploads, and only then writes the narinfo, so a
//! narinfo never exists without its NAR.

pub mod nar;
pub mod narinfo;

use futures_util::StreamExt;
use md5::Md5;
use narinfo::{Key, NarInfo, basename, sha256_nix32, store_hash};
use nixfarm_nix::Nix;
use nixfarm_nix::runner::StorePathInfo;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Cachix's own API root.
pub use nixfarm_core::cache_url::CACHIX_API;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unsupported cache URL '{0}': use cachix://NAME, file:///path or http(s)://host/path")]
    BadUrl(String),
    #[error("{0}")]
    Nix(#[from] nixfarm_nix::NixError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Http(String),
    #[error("{0}")]
    Key(#[from] narinfo::KeyError),
    #[error("{path} is corrupt in the local store: its NAR hashes to {got}, the store says {want}")]
    Corrupt {
        path: String,
        got: String,
        want: String,
    },
    #[error(
        "cache {0} needs a signing key: set CACHIX_SIGNING_KEY or give the agent --signing-key-file"
    )]
    NoKey(String),
    #[error("pushing to Cachix needs CACHIX_AUTH_TOKEN on the agent")]
    NoToken,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
    let what = what.into();
    move |source| StoreError::Io { what, source }
}

/// Where a run's outputs go (parsed by nixfarm-core, so every part of the farm agrees).
pub use nixfarm_core::cache_url::CacheTarget as Target;

impl From<nixfarm_core::cache_url::BadCacheUrl> for StoreError {
    fn from(e: nixfarm_core::cache_url::BadCacheUrl) -> StoreError {
        StoreError::BadUrl(e.0)
    }
}

/// `cachix://NAME` with the API host folded in, as runs carry it to the agents.
pub fn cachix_url(name: &str, api: Option<&str>) -> String {
    match api {
        Some(a) if !a.is_empty() => format!("cachix://{name}?api={a}"),
        _ => format!("cachix://{name}"),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CachixCache {
    pub name: String,
    pub uri: String,
    #[serde(default)]
    pub is_public: bool,
    #[serde(default)]
    pub public_signing_keys: Vec<String>,
    #[serde(default)]
    pub preferred_compression_method: Option<String>,
}

/// What the pusher did, for reports and tests.
#[derive(Debug, Default)]
pub struct Stats {
    pub paths_uploaded: AtomicU64,
    pub bytes_uploaded: AtomicU64,
    pub retries: AtomicU64,
}

/// Tuning; the defaults follow the reference Cachix client, with smaller parts to bound memory.
#[derive(Debug, Clone)]
pub struct Options {
    /// Bytes per multipart part (object stores refuse parts under 5 MiB but the last).
    pub part_size: usize,
    /// Parts of one path in flight.
    pub parts_in_flight: usize,
    /// Paths uploaded at once (within one wave of the closure).
    pub paths_in_flight: usize,
    /// Explicit compression (None: the cache's preference, else zstd).
    pub compression: Option<Compression>,
    /// Attempts per request on 429, 5xx and connection errors.
    pub request_attempts: u32,
    /// Time a request may spend retrying in all (the reference client's 90 s): no new
    /// attempt starts after it.
    pub retry_budget: Duration,
    /// Extra attempts per path after a failed upload.
    pub path_retries: u32,
    /// First retry delay; doubles, jittered, capped at 15 s.
    pub backoff: Duration,
    pub zstd_level: i32,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            part_size: 8 << 20,
            parts_in_flight: 4,
            paths_in_flight: 8,
            compression: None,
            request_attempts: 12,
            retry_budget: Duration::from_secs(90),
            path_retries: 3,
            backoff: Duration::from_millis(200),
            zstd_level: 3,
        }
    }
}

/// Pushes store paths to one cache.
pub struct Pusher {
    target: Target,
    nix: Nix,
    key: Option<Key>,
    token: Option<String>,
    http: reqwest::Client,
    cachix: tokio::sync::OnceCell<CachixCache>,
    /// Paths being uploaded by this pusher: concurrent pushes of one path wait for the first.
    in_flight: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    pub opts: Options,
    pub stats: Arc<Stats>,
}

/// Decides which pusher uploads a path when several push overlapping closures to one cache
/// (agents on separate hosts: the coordinator decides).
pub trait Arbiter: Sync {
    /// Per path, in order: true when this pusher should upload it, false when another one
    /// is. An arbiter that cannot be asked answers true (a second upload beats a hang).
    fn claim(&self, paths: &[String]) -> impl std::future::Future<Output = Vec<bool>> + Send;
    /// This pusher is done with `paths`: uploaded, or given up.
    fn release(&self, paths: &[String]) -> impl std::future::Future<Output = ()> + Send;
}

/// The arbiter of a pusher that is alone: every path is its own.
pub struct Alone;

impl Arbiter for Alone {
    async fn claim(&self, paths: &[String]) -> Vec<bool> {
        vec![true; paths.len()]
    }
    async fn release(&self, _: &[String]) {}
}

/// A NAR staged on disk, compressed, with its hashes.
struct Staged {
    file: std::fs::File,
    /// Set when staged inside a file:// cache: the NAR is renamed into place, not copied.
    named: Option<tempfile::TempPath>,
    nar_hash: Vec<u8>,
    nar_size: u64,
    file_hash: Vec<u8>,
    file_size: u64,
}

/// Hashes and counts what passes through it.
struct Tee<W> {
    inner: W,
    hash: Sha256,
    len: u64,
}

impl<W: Write> Write for Tee<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// How NARs are compressed on their way to the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Zstd,
    Xz,
}

impl Compression {
    /// The narinfo's `Compression:` value.
    pub fn narinfo_name(self) -> &'static str {
        match self {
            Compression::Zstd => "zstd",
            Compression::Xz => "xz",
        }
    }
    fn extension(self) -> &'static str {
        match self {
            Compression::Zstd => "nar.zst",
            Compression::Xz => "nar.xz",
        }
    }
    /// Cachix's `compression` query parameter.
    fn cachix_param(self) -> &'static str {
        match self {
            Compression::Zstd => "zst",
            Compression::Xz => "xz",
        }
    }
    /// `zstd`/`zst`/`ZSTD`, `xz`/`XZ`.
    pub fn parse(s: &str) -> Option<Compression> {
        match s.to_ascii_lowercase().as_str() {
            "zstd" | "zst" => Some(Compression::Zstd),
            "xz" => Some(Compression::Xz),
            _ => None,
        }
    }
}

/// The two encoders behind one writer.
enum Encoder<W: Write> {
    Zstd(zstd::stream::Encoder<'static, W>),
    Xz(xz2::write::XzEncoder<W>),
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Encoder::Zstd(e) => e.write(buf),
            Encoder::Xz(e) => e.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Encoder::Zstd(e) => e.flush(),
            Encoder::Xz(e) => e.flush(),
        }
    }
}

impl<W: Write> Encoder<W> {
    fn finish(self) -> std::io::Result<W> {
        match self {
            Encoder::Zstd(e) => e.finish(),
            Encoder::Xz(e) => e.finish(),
        }
    }
}

fn stage(
    path: &Path,
    compression: Compression,
    level: i32,
    dir: Option<&Path>,
    multithread: bool,
) -> Result<Staged, StoreError> {
    let (tmp, named) = match dir {
        Some(d) => {
            let (f, p) = tempfile::NamedTempFile::new_in(d)
                .map_err(io(format!(
                    "cannot create a staging file in {}",
                    d.display()
                )))?
                .into_parts();
            (f, Some(p))
        }
        None => (
            tempfile::tempfile().map_err(io("cannot create a staging file"))?,
            None,
        ),
    };
    let compressed = Tee {
        inner: std::io::BufWriter::with_capacity(1 << 20, tmp),
        hash: Sha256::new(),
        len: 0,
    };
    let encoder = match compression {
        Compression::Zstd => {
            let mut e = zstd::stream::Encoder::new(compressed, level)
                .map_err(io("cannot start the zstd encoder"))?;
            // Compression runs on worker threads while this one archives and hashes (only
            // worth the threads' start-up for large paths).
            let workers = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
            if multithread && workers > 1 {
                let _ = e.multithread(workers);
                // Smaller jobs than zstd's default (4 windows) bound what the workers hold.
                let _ = e.set_parameter(zstd::zstd_safe::CParameter::JobSize(2 << 20));
            }
            Encoder::Zstd(e)
        }
        // Level 6, xz's default, as Nix uses.
        Compression::Xz => Encoder::Xz(xz2::write::XzEncoder::new(compressed, 6)),
    };
    let mut nar = Tee {
        inner: encoder,
        hash: Sha256::new(),
        len: 0,
    };
    // Buffered: the NAR's many small tokens reach the hasher and the encoder in large writes.
    let mut buffered = std::io::BufWriter::with_capacity(256 << 10, &mut nar);
    nar::dump(path, &mut buffered).map_err(io(format!("cannot archive {}", path.display())))?;
    buffered
        .flush()
        .map_err(io(format!("cannot archive {}", path.display())))?;
    drop(buffered);
    let nar_hash = nar.hash.finalize().to_vec();
    let nar_size = nar.len;
    let compressed = nar.inner.finish().map_err(io("compression failed"))?;
    let file_hash = compressed.hash.finalize().to_vec();
    let file_size = compressed.len;
    let mut file = compressed.inner.into_inner().map_err(|e| StoreError::Io {
        what: "cannot write the staging file".into(),
        source: e.into_error(),
    })?;
    file.seek(SeekFrom::Start(0))
        .map_err(io("cannot rewind the staging file"))?;
    Ok(Staged {
        file,
        named,
        nar_hash,
        nar_size,
        file_hash,
        file_size,
    })
}

fn retryable(status: reqwest::StatusCode) -> bool {
    status.as_u16() == 429 || status.is_server_error()
}

impl Pusher {
    /// A pusher for a cache URL; `?compression=xz|zstd` on it is an explicit choice.
    pub fn for_url(
        url: &str,
        nix: Nix,
        key: Option<Key>,
        token: Option<String>,
    ) -> Result<Pusher, StoreError> {
        let mut p = Pusher::new(Target::parse(url)?, nix, key, token)?;
        p.opts.compression = url
            .split_once('?')
            .and_then(|(_, q)| q.split('&').find_map(|kv| kv.strip_prefix("compression=")))
            .map(|c| Compression::parse(c).ok_or_else(|| StoreError::BadUrl(url.into())))
            .transpose()?;
        Ok(p)
    }

    /// `token` is Cachix's auth token; `key` signs (required for file:// and HTTP caches and
    /// for self-signed Cachix caches).
    pub fn new(
        target: Target,
        nix: Nix,
        key: Option<Key>,
        token: Option<String>,
    ) -> Result<Pusher, StoreError> {
        // reqwest is built without a default TLS provider: the workspace uses ring only.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(300))
            .build()
            .map_err(|e| StoreError::Http(format!("cannot build the HTTP client: {e}")))?;
        Ok(Pusher {
            target,
            nix,
            key,
            token,
            http,
            cachix: tokio::sync::OnceCell::new(),
            in_flight: std::sync::Mutex::new(std::collections::HashMap::new()),
            opts: Options::default(),
            stats: Arc::new(Stats::default()),
        })
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// An explicit choice (`?compression=` on the cache URL) wins, then the cache's
    /// preference (Cachix's `preferredCompressionMethod`), then zstd.
    pub async fn compression(&self) -> Result<Compression, StoreError> {
        if let Some(c) = self.opts.compression {
            return Ok(c);
        }
        if let Target::Cachix { .. } = &self.target {
            let pref = self
                .cachix_cache()
                .await?
                .preferred_compression_method
                .clone();
            return Ok(pref
                .as_deref()
                .and_then(Compression::parse)
                .unwrap_or(Compression::Zstd));
        }
        Ok(Compression::Zstd)
    }

    /// Sends a request, retrying on connection errors, 429 and 5xx with jittered backoff.
    async fn send(
        &self,
        what: &str,
        mk: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, StoreError> {
        let mut delay = self.opts.backoff;
        let mut last = String::new();
        let started = std::time::Instant::now();
        for attempt in 0..self.opts.request_attempts.max(1) {
            if attempt > 0 {
                if started.elapsed() + delay > self.opts.retry_budget {
                    break;
                }
                self.stats.retries.fetch_add(1, Ordering::Relaxed);
                let jitter = delay.mul_f64(0.5 + fastrand::f64());
                tokio::time::sleep(jitter).await;
                delay = (delay * 2).min(Duration::from_secs(15));
            }
            match mk().send().await {
                Ok(r) if retryable(r.status()) => {
                    if let Some(s) = r
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok())
                    {
                        delay = Duration::from_secs(s.min(15));
                    }
                    last = format!("{what}: HTTP {}", r.status());
                }
                Ok(r) if r.status().is_success() || r.status().as_u16() == 404 => return Ok(r),
                Ok(r) => {
                    let status = r.status();
                    let body = r.text().await.unwrap_or_default();
                    return Err(StoreError::Http(format!(
                        "{what}: HTTP {status}: {}",
                        body.chars().take(300).collect::<String>()
                    )));
                }
                Err(e) => last = format!("{what}: {}", error_chain(&e)),
            }
        }
        Err(StoreError::Http(format!("{last} (gave up after retries)")))
    }

    fn bearer(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    /// The Cachix cache's description (`GET cache/NAME`), fetched once.
    pub async fn cachix_cache(&self) -> Result<&CachixCache, StoreError> {
        let Target::Cachix { name, api } = &self.target else {
            return Err(StoreError::BadUrl("not a cachix:// cache".into()));
        };
        self.cachix
            .get_or_try_init(|| async {
                let url = format!("{api}cache/{name}");
                let r = self
                    .send("reading the Cachix cache", || {
                        self.bearer(self.http.get(&url))
                    })
                    .await?;
                if r.status().as_u16() == 404 {
                    return Err(StoreError::Http(format!(
                        "Cachix has no cache named '{name}'"
                    )));
                }
                r.json::<CachixCache>()
                    .await
                    .map_err(|e| StoreError::Http(format!("unreadable cache description: {e}")))
            })
            .await
    }

    /// The URL Nix substitutes from, and the keys its signatures verify against.
    pub async fn substituter(&self) -> Result<(String, Vec<String>), StoreError> {
        let own: Vec<String> = self.key.iter().map(|k| k.public()).collect();
        match &self.target {
            Target::File(p) => Ok((format!("file://{}", p.display()), own)),
            Target::Http(u) => Ok((u.clone(), own)),
            Target::Cachix { .. } => {
                let c = self.cachix_cache().await?;
                Ok((c.uri.clone(), c.public_signing_keys.clone()))
            }
        }
    }

    /// Which of `paths` the cache lacks, in the order given.
    pub async fn missing(&self, paths: &[String]) -> Result<Vec<String>, StoreError> {
        match &self.target {
            Target::File(dir) => Ok(paths
                .iter()
                .filter(|p| !dir.join(format!("{}.narinfo", store_hash(p))).exists())
                .cloned()
                .collect()),
            Target::Http(base) => {
                // A plain binary cache has no bulk query: one HEAD per path, 16 at a time.
                // (Futures built eagerly: a mapping closure would make callers' futures not
                // provably Send.)
                let mut futs = Vec::with_capacity(paths.len());
                for p in paths {
                    futs.push(self.http_missing(base, p));
                }
                let answers: Vec<Result<Option<String>, StoreError>> =
                    futures_util::stream::iter(futs)
                        .buffered(16)
                        .collect()
                        .await;
                answers.into_iter().filter_map(Result::transpose).collect()
            }
            Target::Cachix { name, api } => {
                let url = format!("{api}cache/{name}/narinfo");
                let mut missing = std::collections::HashSet::new();
                for chunk in paths.chunks(4096) {
                    let hashes: Vec<&str> = chunk.iter().map(|p| store_hash(p)).collect();
                    let r = self
                        .send("asking Cachix which paths are missing", || {
                            self.bearer(self.http.post(&url)).json(&hashes)
                        })
                        .await?;
                    let list: Vec<String> = r
                        .json()
                        .await
                        .map_err(|e| StoreError::Http(format!("unreadable narinfo answer: {e}")))?;
                    missing.extend(list);
                }
                Ok(paths
                    .iter()
                    .filter(|p| missing.contains(store_hash(p)))
                    .cloned()
                    .collect())
            }
        }
    }

    /// `Some(path)` when the HTTP cache at `base` lacks it.
    async fn http_missing(&self, base: &str, path: &str) -> Result<Option<String>, StoreError> {
        let url = format!("{base}/{}.narinfo", store_hash(path));
        let r = self
            .send("asking the cache", || self.http.head(&url))
            .await?;
        Ok((!r.status().is_success()).then(|| path.to_string()))
    }

    /// Pushes the closure of `paths`: asks which are missing and uploads only those,
    /// dependencies first. Returns the paths uploaded.
    pub async fn push_closure(&self, paths: &[String]) -> Result<Vec<String>, StoreError> {
        self.push_closure_with(paths, &Alone).await
    }

    /// Like [`Pusher::push_closure`], with other pushers to the same cache: `arbiter` says
    /// which missing paths this one uploads; for the others it waits until the cache has
    /// them (taking them over when their claim lapses). Returns once the whole closure is in
    /// the cache, so each path is uploaded once however the pushers' closures overlap.
    pub async fn push_closure_with<A: Arbiter>(
        &self,
        paths: &[String],
        arbiter: &A,
    ) -> Result<Vec<String>, StoreError> {
        if matches!(self.target, Target::Cachix { .. }) && self.token.is_none() {
            return Err(StoreError::NoToken);
        }
        let infos = self.nix.closure_infos(paths).await?;
        let closure: Vec<String> = infos.iter().map(|i| i.path.clone()).collect();
        let known: std::collections::HashSet<&str> = closure.iter().map(String::as_str).collect();
        if let Some(p) = paths.iter().find(|p| !known.contains(p.as_str())) {
            return Err(StoreError::Http(format!(
                "{p} is not valid in the local store"
            )));
        }
        let missing = self.missing(&closure).await?;
        if missing.is_empty() {
            return Ok(Vec::new());
        }
        let mut by_path: std::collections::HashMap<String, StorePathInfo> =
            infos.into_iter().map(|i| (i.path.clone(), i)).collect();
        let granted = arbiter.claim(&missing).await;
        let mut remaining: Vec<StorePathInfo> = Vec::with_capacity(missing.len());
        // Paths another pusher is uploading: waited for, not uploaded here.
        let mut theirs: Vec<String> = Vec::new();
        for (i, p) in missing.iter().enumerate() {
            if granted.get(i).copied().unwrap_or(true) {
                remaining.extend(by_path.remove(p));
            } else {
                theirs.push(p.clone());
            }
        }
        let result = self
            .push_waves(&missing, remaining, theirs, by_path, arbiter)
            .await;
        if result.is_err() {
            // Whatever is not uploaded is free for another pusher at once.
            arbiter.release(&missing).await;
        }
        result
    }

    async fn push_waves<A: Arbiter>(
        &self,
        missing: &[String],
        mut remaining: Vec<StorePathInfo>,
        mut theirs: Vec<String>,
        mut infos: std::collections::HashMap<String, StorePathInfo>,
        arbiter: &A,
    ) -> Result<Vec<String>, StoreError> {
        let pending: std::collections::HashSet<&str> = missing.iter().map(String::as_str).collect();
        // Missing paths that are in the cache by now, uploaded here or by another pusher.
        let mut in_cache: std::collections::HashSet<String> = std::collections::HashSet::new();
        let mut done = Vec::new();
        let mut wait = Duration::from_millis(100);
        let mut waited = Duration::ZERO;
        while !remaining.is_empty() || !theirs.is_empty() {
            // Waves of paths whose missing references are all in the cache: dependencies
            // first, independent paths in parallel.
            let (mut ready, rest): (Vec<StorePathInfo>, Vec<StorePathInfo>) =
                remaining.into_iter().partition(|i| {
                    i.references.iter().all(|r| {
                        r == &i.path || !pending.contains(r.as_str()) || in_cache.contains(r)
                    })
                });
            remaining = rest;
            if ready.is_empty() && !theirs.is_empty() {
                // Everything left waits on paths another pusher is uploading.
                tokio::time::sleep(wait).await;
                waited += wait;
                wait = (wait * 2).min(Duration::from_secs(2));
                let still = self.missing(&theirs).await?;
                in_cache.extend(theirs.iter().filter(|p| !still.contains(p)).cloned());
                theirs = still;
                if waited >= Duration::from_secs(3) && !theirs.is_empty() {
                    // Take over what the other pusher gave up (its claim lapsed or was released).
                    waited = Duration::ZERO;
                    let granted = arbiter.claim(&theirs).await;
                    let mut keep = Vec::new();
                    for (p, g) in theirs.into_iter().zip(granted) {
                        match (g, infos.remove(&p)) {
                            (true, Some(i)) => remaining.push(i),
                            _ => keep.push(p),
                        }
                    }
                    theirs = keep;
                }
                continue;
            }
            if ready.is_empty() {
                // Cannot happen for a valid store; never loop forever on a bad answer.
                ready = remaining.drain(..1).collect();
            }
            // Futures built eagerly (they do nothing until polled): a closure returning a
            // borrowing future here makes the caller's future not provably Send.
            let mut futs = Vec::with_capacity(ready.len());
            for i in ready {
                futs.push(self.push_path(i));
            }
            let results: Vec<Result<(String, bool), StoreError>> = futures_util::stream::iter(futs)
                .buffer_unordered(self.opts.paths_in_flight.max(1))
                .collect()
                .await;
            let mut wave = Vec::with_capacity(results.len());
            let mut failed = None;
            for r in results {
                match r {
                    Ok((path, up)) => {
                        if up {
                            done.push(path.clone());
                        }
                        wave.push(path);
                    }
                    Err(e) => failed = failed.or(Some(e)),
                }
            }
            arbiter.release(&wave).await;
            in_cache.extend(wave);
            if let Some(e) = failed {
                return Err(e);
            }
        }
        Ok(done)
    }

    /// Uploads one path unless it is (by now) in the cache; true when it was uploaded.
    async fn push_path(&self, info: StorePathInfo) -> Result<(String, bool), StoreError> {
        let p = &info.path;
        // One upload per path at a time here, and a last look at the cache just before
        // uploading: another job or agent may have pushed it meanwhile.
        let lock = {
            let mut m = self
                .in_flight
                .lock()
                .map_err(|_| StoreError::Http("push lock poisoned".into()))?;
            m.entry(p.clone()).or_default().clone()
        };
        let _guard = lock.lock().await;
        if self.missing(std::slice::from_ref(p)).await?.is_empty() {
            return Ok((p.clone(), false));
        }
        let mut attempt = 0;
        loop {
            match self.push_one(&info).await {
                Ok(()) => return Ok((p.clone(), true)),
                Err(
                    e @ (StoreError::Corrupt { .. } | StoreError::NoKey(_) | StoreError::NoToken),
                ) => return Err(e),
                Err(e) if attempt < self.opts.path_retries => {
                    attempt += 1;
                    tracing::warn!(path = %p, error = %e, attempt, "push failed; starting the path again");
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn push_one(&self, info: &StorePathInfo) -> Result<(), StoreError> {
        let path = PathBuf::from(&info.path);
        let level = self.opts.zstd_level;
        let compression = self.compression().await?;
        let big = info.nar_size > 8 << 20;
        let stage_dir = match &self.target {
            Target::File(d) => {
                let nar = d.join("nar");
                std::fs::create_dir_all(&nar)
                    .map_err(io(format!("cannot create {}", nar.display())))?;
                Some(nar)
            }
            _ => None,
        };
        let staged = tokio::task::spawn_blocking(move || {
            stage(&path, compression, level, stage_dir.as_deref(), big)
        })
        .await
        .map_err(|e| StoreError::Http(format!("staging task failed: {e}")))??;
        if let Some(want) = narinfo::nar_hash_bytes(&info.nar_hash)
            && want != staged.nar_hash
        {
            return Err(StoreError::Corrupt {
                path: info.path.clone(),
                got: sha256_nix32(&staged.nar_hash),
                want: info.nar_hash.clone(),
            });
        }
        let mut refs = info.references.clone();
        refs.sort();
        let mut ni = NarInfo {
            store_path: info.path.clone(),
            url: format!(
                "nar/{}.{}",
                nixfarm_nix::hash::nix32_encode(&staged.file_hash),
                compression.extension()
            ),
            compression: compression.narinfo_name().into(),
            file_hash: staged.file_hash.clone(),
            file_size: staged.file_size,
            nar_hash: staged.nar_hash.clone(),
            nar_size: staged.nar_size,
            references: refs,
            deriver: info.deriver.clone(),
            sigs: Vec::new(),
            ca: info.ca.clone(),
        };
        match &self.target {
            Target::File(dir) => {
                let key = self
                    .key
                    .as_ref()
                    .ok_or_else(|| StoreError::NoKey(format!("file://{}", dir.display())))?;
                ni.sign(key);
                self.push_file(dir, staged, &ni).await?
            }
            Target::Http(base) => {
                let key = self
                    .key
                    .as_ref()
                    .ok_or_else(|| StoreError::NoKey(base.clone()))?;
                ni.sign(key);
                self.push_http(base, staged, &ni).await?
            }
            Target::Cachix { name, api } => self.push_cachix(name, api, staged, &ni).await?,
        }
        self.stats.paths_uploaded.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn push_file(&self, dir: &Path, staged: Staged, ni: &NarInfo) -> Result<(), StoreError> {
        let dir = dir.to_path_buf();
        let ni_text = ni.render();
        let nar_rel = ni.url.clone();
        let hash = store_hash(&ni.store_path).to_string();
        let size = staged.file_size;
        tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            std::fs::create_dir_all(dir.join("nar"))
                .map_err(io(format!("cannot create {}", dir.display())))?;
            let info = dir.join("nix-cache-info");
            if !info.exists() {
                write_atomic(
                    &info,
                    b"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n",
                )?;
            }
            let nar_path = dir.join(&nar_rel);
            match staged.named {
                // Staged in the cache's own nar/ directory: renamed into place.
                Some(tmp) => {
                    // Readable by whoever serves the cache (staging files start private).
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
                        .map_err(io(format!("cannot write {}", nar_path.display())))?;
                    tmp.persist(&nar_path).map_err(|e| StoreError::Io {
                        what: format!("cannot write {}", nar_path.display()),
                        source: e.error,
                    })?;
                }
                None => {
                    let mut src = staged.file;
                    let tmp = nar_path.with_extension("tmp");
                    let mut out = std::fs::File::create(&tmp)
                        .map_err(io(format!("cannot write {}", tmp.display())))?;
                    std::io::copy(&mut src, &mut out)
                        .map_err(io(format!("cannot write {}", tmp.display())))?;
                    std::fs::rename(&tmp, &nar_path)
                        .map_err(io(format!("cannot write {}", nar_path.display())))?;
                }
            }
            // The narinfo last: it never points at a NAR that is not there.
            write_atomic(&dir.join(format!("{hash}.narinfo")), ni_text.as_bytes())
        })
        .await
        .map_err(|e| StoreError::Http(format!("file push task failed: {e}")))??;
        self.stats.bytes_uploaded.fetch_add(size, Ordering::Relaxed);
        Ok(())
    }

    async fn push_http(&self, base: &str, staged: Staged, ni: &NarInfo) -> Result<(), StoreError> {
        let nar_url = format!("{base}/{}", ni.url);
        let size = staged.file_size;
        let file = staged.file;
        // Streamed from the staging file; each attempt reads it again from the start. The
        // declared length makes a short read fail the request instead of uploading less.
        self.send("uploading the NAR", || {
            let body = match file.try_clone().and_then(|mut c| {
                c.seek(SeekFrom::Start(0))?;
                Ok(c)
            }) {
                Ok(c) => reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(
                    tokio::fs::File::from_std(c),
                )),
                Err(_) => reqwest::Body::from(Vec::new()),
            };
            self.http
                .put(&nar_url)
                .header("content-type", "application/x-nix-nar")
                .header("content-length", size)
                .body(body)
        })
        .await?;
        let ni_url = format!("{base}/{}.narinfo", store_hash(&ni.store_path));
        let text = ni.render();
        self.send("uploading the narinfo", || {
            self.http
                .put(&ni_url)
                .header("content-type", "text/x-nix-narinfo")
                .body(text.clone())
        })
        .await?;
        self.stats.bytes_uploaded.fetch_add(size, Ordering::Relaxed);
        Ok(())
    }

    /// Tells Cachix to drop a multipart upload that will not complete (best effort).
    async fn abort(&self, base: &str, upload_id: &str) {
        let _ = self
            .send("aborting the upload", || {
                self.bearer(
                    self.http
                        .post(format!("{base}/abort"))
                        .query(&[("uploadId", upload_id)]),
                )
            })
            .await;
    }

    async fn push_cachix(
        &self,
        name: &str,
        api: &str,
        staged: Staged,
        ni: &NarInfo,
    ) -> Result<(), StoreError> {
        let cache = self.cachix_cache().await?;
        // Self-signed caches publish our key; server-signed ones sign themselves.
        let sig = match &self.key {
            Some(k) => Some(k.sign_raw(&ni.fingerprint())),
            None if cache.public_signing_keys.is_empty() => None,
            None => return Err(StoreError::NoKey(format!("cachix://{name}"))),
        };
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Created {
            nar_id: String,
            upload_id: String,
        }
        let compression = self.compression().await?;
        let r = self
            .send("starting the upload", || {
                self.bearer(self.http.post(format!(
                    "{api}cache/{name}/multipart-nar?compression={}",
                    compression.cachix_param()
                )))
            })
            .await?;
        let created: Created = r
            .json()
            .await
            .map_err(|e| StoreError::Http(format!("unreadable multipart answer: {e}")))?;
        let size = staged.file_size;
        let file = Arc::new(std::sync::Mutex::new(staged.file));
        let ranges: Vec<(u32, u64, usize)> = (0..size.max(1))
            .step_by(self.opts.part_size)
            .enumerate()
            .map(|(i, o)| {
                (
                    i as u32 + 1,
                    o,
                    self.opts.part_size.min((size - o) as usize),
                )
            })
            .collect();
        let base = format!("{api}cache/{name}/multipart-nar/{}", created.nar_id);
        let upload_id = created.upload_id.clone();
        let results: Vec<Result<(u32, String), StoreError>> =
            futures_util::stream::iter(ranges.into_iter().map(|(n, offset, len)| {
                let file = file.clone();
                let base = base.clone();
                let upload_id = upload_id.clone();
                async move {
                    let bytes = {
                        let file = file.clone();
                        tokio::task::spawn_blocking(move || read_part(&file, offset, len))
                            .await
                            .map_err(|e| StoreError::Http(format!("read task failed: {e}")))??
                    };
                    let md5 = data_encoding::BASE64.encode(&Md5::digest(&bytes));
                    #[derive(Deserialize)]
                    #[serde(rename_all = "camelCase")]
                    struct Url {
                        upload_url: String,
                    }
                    let r = self
                        .send("getting a part's upload URL", || {
                            self.bearer(self.http.post(&base).query(&[
                                ("uploadId", upload_id.as_str()),
                                ("partNumber", &n.to_string()),
                            ]))
                            .json(&serde_json::json!({ "contentMD5": md5 }))
                        })
                        .await?;
                    let url: Url = r
                        .json()
                        .await
                        .map_err(|e| StoreError::Http(format!("unreadable part answer: {e}")))?;
                    let bytes = bytes::Bytes::from(bytes);
                    // The presigned URL is the credential: no Authorization header here.
                    let r = self
                        .send("uploading a part", || {
                            self.http
                                .put(&url.upload_url)
                                .header("content-type", "application/octet-stream")
                                .header("content-md5", &md5)
                                .body(bytes.clone())
                        })
                        .await?;
                    let etag = r
                        .headers()
                        .get("etag")
                        .and_then(|v| v.to_str().ok())
                        .map(String::from)
                        .ok_or_else(|| {
                            StoreError::Http("part upload answered without an ETag".into())
                        })?;
                    self.stats
                        .bytes_uploaded
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    Ok((n, etag))
                }
            }))
            .buffer_unordered(self.opts.parts_in_flight.max(1))
            .collect()
            .await;
        let mut parts = Vec::new();
        for r in results {
            match r {
                Ok(p) => parts.push(p),
                Err(e) => {
                    self.abort(&base, &upload_id).await;
                    return Err(e);
                }
            }
        }
        parts.sort_by_key(|p| p.0);
        let mut refs: Vec<&str> = ni.references.iter().map(|r| basename(r)).collect();
        refs.sort();
        let body = serde_json::json!({
            "parts": parts.iter().map(|(n, e)| serde_json::json!({"partNumber": n, "eTag": e})).collect::<Vec<_>>(),
            "narInfoCreate": {
                "cStoreHash": store_hash(&ni.store_path),
                "cStoreSuffix": basename(&ni.store_path).split_once('-').map(|x| x.1).unwrap_or_default(),
                "cNarHash": sha256_nix32(&ni.nar_hash),
                "cNarSize": ni.nar_size,
                "cFileHash": data_encoding::HEXLOWER.encode(&ni.file_hash),
                "cFileSize": ni.file_size,
                "cReferences": refs,
                "cDeriver": ni.deriver.as_deref().map(basename).unwrap_or("unknown-deriver"),
                "cSig": sig,
            }
        });
        let done = self
            .send("completing the upload", || {
                self.bearer(
                    self.http
                        .post(format!("{base}/complete"))
                        .query(&[("uploadId", upload_id.as_str())]),
                )
                .json(&body)
            })
            .await;
        if let Err(e) = done {
            self.abort(&base, &upload_id).await;
            return Err(e);
        }
        Ok(())
    }
}

fn read_part(
    file: &std::sync::Mutex<std::fs::File>,
    offset: u64,
    len: usize,
) -> Result<Vec<u8>, StoreError> {
    let mut f = file
        .lock()
        .map_err(|_| StoreError::Http("staging file lock poisoned".into()))?;
    f.seek(SeekFrom::Start(offset)).map_err(io("seek"))?;
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf)
        .map_err(io("cannot read the staging file"))?;
    Ok(buf)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = path.with_extension("tmp-nixfarm");
    std::fs::write(&tmp, bytes).map_err(io(format!("cannot write {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io(format!("cannot write {}", path.display())))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_urls() {
        assert_eq!(
            Target::parse("cachix://my-cache").unwrap(),
            Target::Cachix {
                name: "my-cache".into(),
                api: CACHIX_API.into()
            }
        );
        assert_eq!(
            Target::parse(&cachix_url("c", Some("http://127.0.0.1:9/api/v1"))).unwrap(),
            Target::Cachix {
                name: "c".into(),
                api: "http://127.0.0.1:9/api/v1/".into()
            }
        );
        assert_eq!(
            Target::parse("file:///srv/cache?compression=zstd").unwrap(),
            Target::File("/srv/cache".into())
        );
        assert!(
            matches!(Target::parse("https://c.example/x/").unwrap(), Target::Http(u) if u == "https://c.example/x")
        );
        for bad in [
            "s3://bucket",
            "cachix://",
            "cachix://a/b",
            "file://relative",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn staging_hashes_both_streams_and_compresses() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("blob");
        std::fs::write(&f, vec![b'a'; 300_000]).unwrap();
        let mut xz = stage(&f, Compression::Xz, 3, None, false).unwrap();
        let mut xz_bytes = Vec::new();
        xz.file.read_to_end(&mut xz_bytes).unwrap();
        let mut unpacked = Vec::new();
        xz2::read::XzDecoder::new(xz_bytes.as_slice())
            .read_to_end(&mut unpacked)
            .unwrap();
        assert_eq!(xz.file_size, xz_bytes.len() as u64);
        let mut staged = stage(&f, Compression::Zstd, 3, None, true).unwrap();
        let mut nar = Vec::new();
        nar::dump(&f, &mut nar).unwrap();
        assert_eq!(staged.nar_size, nar.len() as u64);
        assert_eq!(staged.nar_hash, Sha256::digest(&nar).to_vec());
        let mut compressed = Vec::new();
        staged.file.read_to_end(&mut compressed).unwrap();
        assert_eq!(staged.file_size, compressed.len() as u64);
        assert!(staged.file_size < 10_000);
        assert_eq!(staged.file_hash, Sha256::digest(&compressed).to_vec());
        assert_eq!(zstd::decode_all(compressed.as_slice()).unwrap(), nar);
        assert_eq!(unpacked, nar);
        assert_eq!(xz.nar_hash, staged.nar_hash);
    }
}
