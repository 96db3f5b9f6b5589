//! Publishing store paths to binary caches: NAR streaming, narinfo and signatures, and the
//! Cachix, `file://` and HTTP cache clients.
//!
//! A push asks the cache which paths of the closure are missing (in batches), then for each
//! missing path, dependencies first: streams its NAR through SHA-256 and zstd into a staging
//! file (memory stays bounded by the part size whatever the path's size), checks the NAR hash
//! against the store's, signs the fingerprint, uploads, and only then writes the narinfo, so a
//! narinfo never exists without its NAR.

mod backend;
mod cachix;
mod file;
mod http;
/// Where a nixfarm coordinator's farm cache answers, in one request, which of a list of store
/// hashes it lacks (a JSON array of hashes in, the missing ones out, as Cachix's narinfo
/// query); not a name a cache file can have.
pub const FARM_CACHE_BULK_MISSING: &str = "/_nixfarm/missing";

mod arbiter;
mod options;
mod probe;
pub use options::Options;
pub mod nar;
pub mod narinfo;
mod read;
pub mod repeats;
mod request;
mod stage;
mod text;
mod verify;

pub use arbiter::{Alone, Arbiter};
pub use cachix::CachixCache;
pub use read::MAX_NARINFO_BYTES;
pub use stage::Compression;
pub use verify::NarCheck;

use backend::Backend;
use futures_util::StreamExt;
use narinfo::{Key, NarInfo, sha256_nix32};
use nixfarm_nix::Nix;
use nixfarm_nix::runner::StorePathInfo;
use stage::stage;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
#[cfg(test)]
use text::one_line;

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
    /// The push was stopped from outside ([`Pusher::push_closure_until`]).
    #[error("the push was stopped")]
    Stopped,
    /// The cache answered with a status that asking again will not change (403, 413…).
    #[error("{0}")]
    Refused(String),
    /// 409: the cache already holds something else under that name.
    #[error("{0}")]
    Conflict(String),
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

/// What the pusher did, for reports and tests.
#[derive(Debug, Default)]
pub struct Stats {
    pub paths_uploaded: AtomicU64,
    pub bytes_uploaded: AtomicU64,
    pub retries: AtomicU64,
}

/// Pushes store paths to one cache.
pub struct Pusher {
    target: Target,
    backend: Box<dyn Backend>,
    nix: Nix,
    pub(crate) key: Option<Key>,
    token: Option<String>,
    /// Bearer token for a plain HTTP cache (a coordinator's farm cache); never Cachix's.
    http_token: Option<String>,
    pub(crate) http: reqwest::Client,
    /// A CA trusted besides the system's ([`Pusher::with_root_ca`]), for other clients.
    pub(crate) root_ca: Option<reqwest::Certificate>,
    /// Paths being uploaded by this pusher: concurrent pushes of one path wait for the first.
    in_flight: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    pub opts: Options,
    pub stats: Arc<Stats>,
}

/// Push warnings, each distinct one said once a minute at most.
pub static PUSH_WARNINGS: repeats::Repeats = repeats::Repeats::new(Duration::from_secs(60));

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
        // Only Cachix files a signature under its cache's name; anywhere else Nix reads the
        // key's own, and refuses an empty one.
        if key.as_ref().is_some_and(|k| k.name.is_empty())
            && !matches!(target, Target::Cachix { .. })
        {
            return Err(narinfo::KeyError::Nameless.into());
        }
        // reqwest is built without a default TLS provider: the workspace uses ring only.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(300))
            // A redirect is never followed: a write redirected (303 to a login page, say)
            // would end in a 200 that wrote nothing, and a lookup in one for another path.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| StoreError::Http(format!("cannot build the HTTP client: {e}")))?;
        let backend: Box<dyn Backend> = match &target {
            Target::File(dir) => Box::new(file::FileCache { dir: dir.clone() }),
            Target::Http(base) => Box::new(http::HttpCache {
                base: base.clone(),
                has_info: tokio::sync::OnceCell::new(),
            }),
            Target::Cachix { name, api } => Box::new(cachix::CachixBackend {
                name: name.clone(),
                api: api.clone(),
                info: tokio::sync::OnceCell::new(),
            }),
        };
        Ok(Pusher {
            target,
            backend,
            nix,
            key,
            token,
            http_token: None,
            http,
            root_ca: None,
            in_flight: std::sync::Mutex::new(std::collections::HashMap::new()),
            opts: Options::default(),
            stats: Arc::new(Stats::default()),
        })
    }

    /// Trusts the PEM CA `pem` too (a cache behind a private CA, as a coordinator's farm
    /// cache with its own certificate is).
    pub fn with_root_ca(mut self, pem: &[u8]) -> Result<Pusher, StoreError> {
        let ca = reqwest::Certificate::from_pem(pem)
            .map_err(|e| StoreError::Http(format!("the CA certificate is not usable: {e}")))?;
        self.http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(300))
            // A redirect is never followed: a write redirected (303 to a login page, say)
            // would end in a 200 that wrote nothing, and a lookup in one for another path.
            .redirect(reqwest::redirect::Policy::none())
            .add_root_certificate(ca.clone())
            .build()
            .map_err(|e| StoreError::Http(format!("cannot build the HTTP client: {e}")))?;
        self.root_ca = Some(ca);
        Ok(self)
    }

    /// Sends `token` as a bearer token with every request to a plain HTTP cache.
    pub fn with_http_token(mut self, token: Option<String>) -> Pusher {
        self.http_token = token;
        self
    }

    /// A request to a plain HTTP cache, with its token when it has one.
    pub(crate) fn http_auth(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.http_token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
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
        Ok(self
            .backend
            .preferred_compression(self)
            .await?
            .unwrap_or(Compression::Zstd))
    }

    pub(crate) fn bearer(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    /// This pusher's own public key (the one it signs with), if any.
    pub(crate) fn own_keys(&self) -> Vec<String> {
        self.key.iter().map(|k| k.public()).collect()
    }

    /// The URL Nix substitutes from, and the keys its signatures verify against.
    pub async fn substituter(&self) -> Result<(String, Vec<String>), StoreError> {
        self.backend.substituter(self).await
    }

    /// Which of `paths` the cache lacks, in the order given; said within the push floor
    /// ([`Options::push_floor`]), or an error: a cache that answers each question just
    /// before its timeout holds no build (nor the CLI's check) longer.
    pub async fn missing(&self, paths: &[String]) -> Result<Vec<String>, StoreError> {
        let floor = self.opts.push_floor;
        tokio::time::timeout(floor, self.backend.missing(self, paths))
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Http(format!(
                    "the cache did not say which of {} paths it has within {} s",
                    paths.len(),
                    floor.as_secs()
                )))
            })
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
        self.push_closure_until(paths, arbiter, &tokio_util::sync::CancellationToken::new())
            .await
    }

    /// [`Pusher::push_closure_with`], stopped when `stop` is cancelled ([`StoreError::Stopped`]):
    /// what it claimed is released at once, for another pusher to upload.
    pub async fn push_closure_until<A: Arbiter>(
        &self,
        paths: &[String],
        arbiter: &A,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Result<Vec<String>, StoreError> {
        if self.backend.needs_token() && self.token.is_none() {
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
        let missing = tokio::select! {
            m = self.missing(&closure) => m?,
            _ = stop.cancelled() => return Err(StoreError::Stopped),
        };
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
        let bytes: u64 = remaining.iter().map(|i| i.nar_size).sum();
        let deadline =
            self.opts.push_floor + Duration::from_secs(bytes / self.opts.push_floor_rate.max(1));
        let push = tokio::time::timeout(
            deadline,
            self.push_waves(&missing, remaining, theirs, by_path, arbiter),
        );
        let result = tokio::select! {
            r = push => r.unwrap_or_else(|_| {
                Err(StoreError::Http(format!(
                    "the push did not end within {} s (for {bytes} bytes of NAR): the cache is too slow or does not answer",
                    deadline.as_secs()
                )))
            }),
            _ = stop.cancelled() => Err(StoreError::Stopped),
        };
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
        // Another pusher's upload is usually done within tens of milliseconds: polled from
        // 20 ms, growing by half up to 0.5 s (doubling to 2 s made an eval's push wait up to
        // twice as long as the upload it waited for).
        let mut wait = Duration::from_millis(20);
        let mut waited = Duration::ZERO;
        // For the debug line at the end: where a push's time went.
        let t0 = std::time::Instant::now();
        let (mut waves, mut polls, mut waiting) = (0u32, 0u32, Duration::ZERO);
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
                let tw = std::time::Instant::now();
                tokio::time::sleep(wait).await;
                polls += 1;
                waited += wait;
                wait = (wait * 3 / 2).min(Duration::from_millis(500));
                let still = self.missing(&theirs).await?;
                in_cache.extend(theirs.iter().filter(|p| !still.contains(p)).cloned());
                theirs = still;
                waiting += tw.elapsed();
                if waited >= Duration::from_secs(3) && !theirs.is_empty() {
                    // Take over what the other pusher gave up (its claim lapsed or was
                    // released), or, past the patience, whatever it still holds: the cache
                    // keeps one copy, and a second upload beats waiting for ever.
                    waited = Duration::ZERO;
                    let granted = if waiting >= self.opts.claim_patience {
                        tracing::warn!(
                            paths = theirs.len(),
                            "another pusher's claims held this push for {} s without the paths appearing: uploading them here",
                            waiting.as_secs()
                        );
                        vec![true; theirs.len()]
                    } else {
                        arbiter.claim(&theirs).await
                    };
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
            waves += 1;
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
        tracing::debug!(
            uploaded = done.len(),
            waves,
            polls,
            waiting_ms = waiting.as_millis() as u64,
            ms = t0.elapsed().as_millis() as u64,
            "pushed"
        );
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
                    e @ (StoreError::Corrupt { .. }
                    | StoreError::NoKey(_)
                    | StoreError::NoToken
                    | StoreError::Refused(_)
                    | StoreError::Conflict(_)),
                ) => return Err(e),
                Err(e) if attempt < self.opts.path_retries => {
                    attempt += 1;
                    PUSH_WARNINGS.warn(&format!("push failed; starting the path again: {e}"));
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
        let stage_dir = self.backend.stage_dir()?;
        let staged = tokio::task::spawn_blocking(move || {
            stage(&path, compression, level, stage_dir.as_deref(), big)
        })
        .await
        .map_err(|e| StoreError::Http(format!("staging task failed: {e}")))??;
        // What is signed is what the store registered; a NAR hash the store states in no
        // form read here leaves nothing to compare, so nothing is published.
        if narinfo::nar_hash_bytes(&info.nar_hash).is_none_or(|want| want != staged.nar_hash) {
            return Err(StoreError::Corrupt {
                path: info.path.clone(),
                got: sha256_nix32(&staged.nar_hash),
                want: info.nar_hash.clone(),
            });
        }
        let mut refs = info.references.clone();
        refs.sort();
        let ni = NarInfo {
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
        self.backend.upload(self, staged, ni).await?;
        self.stats.paths_uploaded.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
