//! The coordinator's own binary cache (the farm cache): agents push every output and `.drv`
//! to it and substitute from it, so hosts that share nothing but the coordinator build each
//! other's derivations. A narinfo is accepted only when its NAR is there and hashes to what
//! it says; the coordinator then signs it with the farm's key, so what it serves is exactly
//! what was checked. Agents authenticate with their join token (Bearer, or Basic with the
//! token as password, which is what Nix sends from a netrc file).

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use nixfarm_store::narinfo::{Key, NarInfo, store_hash};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::AsyncWriteExt;
use tokio_stream::StreamExt;

/// What the farm cache says of itself (priority below a user's published cache).
const CACHE_INFO: &str = "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n";

/// Largest narinfo accepted, bytes.
const MAX_NARINFO: usize = 64 * 1024;

/// Store hashes (the 32 characters of a store path) that active runs still need: never
/// evicted.
pub type Protected = Arc<dyn Fn() -> HashSet<String> + Send + Sync>;

/// Paths written or read this recently are never evicted (runs still evaluating have not
/// told the coordinator their paths yet).
const RECENT: std::time::Duration = std::time::Duration::from_secs(600);

/// The farm cache of one coordinator.
pub struct FarmCache {
    dir: PathBuf,
    key: Key,
    admission: crate::farm_tokens::FarmAdmission,
    /// Largest NAR accepted, bytes.
    max_nar_bytes: u64,
    /// NAR bytes kept at most; the least recently used paths go first.
    max_bytes: u64,
    /// NAR bytes held now.
    total: AtomicU64,
    protected: Protected,
    evicting: std::sync::Mutex<()>,
    hits: AtomicU64,
    misses: AtomicU64,
    refused: AtomicU64,
    /// NAR bytes served to and received from agents: what travelled between hosts.
    served: AtomicU64,
    stored: AtomicU64,
    /// Wrong tokens per address: the farm cache holds back guessers as gRPC and the web UI
    /// do (its own count).
    guesses: crate::limit::Limiter,
}

/// Why the farm cache cannot start.
#[derive(Debug, thiserror::Error)]
pub enum FarmCacheError {
    #[error("cannot prepare the farm cache in {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("the farm cache's signing key {path} is unusable: {source}")]
    Key {
        path: String,
        source: nixfarm_store::narinfo::KeyError,
    },
}

fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> FarmCacheError + '_ {
    move |source| FarmCacheError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl FarmCache {
    /// Opens (creating) the cache in `dir`, its key in `dir/../farm-cache.key` (made on first
    /// start, mode 0600). `admission`: the credentials it takes from agents (none: no check).
    pub fn open(
        dir: PathBuf,
        admission: crate::farm_tokens::FarmAdmission,
        max_nar_bytes: u64,
        max_bytes: u64,
        protected: Protected,
    ) -> Result<Arc<FarmCache>, FarmCacheError> {
        std::fs::create_dir_all(dir.join("nar")).map_err(io(&dir))?;
        std::fs::write(dir.join("nix-cache-info"), CACHE_INFO).map_err(io(&dir))?;
        let key_path = dir.with_file_name("farm-cache.key");
        let key = if key_path.exists() {
            Key::from_file(&key_path).map_err(|source| FarmCacheError::Key {
                path: key_path.display().to_string(),
                source,
            })?
        } else {
            let key = Key::generate("nixfarm-farm-1").map_err(|source| FarmCacheError::Key {
                path: key_path.display().to_string(),
                source,
            })?;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&key_path)
                .map_err(io(&key_path))?;
            std::io::Write::write_all(&mut f, key.secret_text().as_bytes())
                .map_err(io(&key_path))?;
            key
        };
        let total = nar_bytes(&dir);
        Ok(Arc::new(FarmCache {
            dir,
            key,
            admission,
            max_nar_bytes,
            max_bytes,
            total: AtomicU64::new(total),
            protected,
            evicting: std::sync::Mutex::new(()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            served: AtomicU64::new(0),
            stored: AtomicU64::new(0),
            guesses: Default::default(),
        }))
    }

    /// `name:base64`: what agents trust the farm cache's signatures with.
    pub fn public_key(&self) -> String {
        self.key.public()
    }

    /// The HTTP routes of the cache.
    pub fn router(self: &Arc<Self>) -> axum::Router {
        use axum::routing::get;
        axum::Router::new()
            .route(
                nixfarm_store::FARM_CACHE_BULK_MISSING,
                axum::routing::post(missing::post_missing),
            )
            .route("/{file}", get(get_top).put(put_narinfo))
            .route("/nar/{file}", get(get_nar).put(put_nar))
            .layer(axum::middleware::from_fn_with_state(self.clone(), admit))
            .with_state(self.clone())
    }

    /// Prometheus lines: size on disk and the narinfo hit rate.
    pub fn metrics_text(&self) -> String {
        let size = self.total.load(Ordering::Relaxed);
        format!(
            "# HELP nixfarm_farm_cache_bytes NAR bytes in the coordinator's farm cache.\n# TYPE nixfarm_farm_cache_bytes gauge\nnixfarm_farm_cache_bytes {size}\n\
             # HELP nixfarm_farm_cache_requests_total narinfo requests to the farm cache by result.\n# TYPE nixfarm_farm_cache_requests_total counter\n\
             nixfarm_farm_cache_requests_total{{result=\"hit\"}} {}\nnixfarm_farm_cache_requests_total{{result=\"miss\"}} {}\n\
             # HELP nixfarm_farm_cache_refused_total Uploads refused (bad token, bad name, hash mismatch, too large).\n# TYPE nixfarm_farm_cache_refused_total counter\nnixfarm_farm_cache_refused_total {}\n\
             # HELP nixfarm_farm_cache_nar_bytes_total NAR bytes moved through the farm cache, by direction.\n# TYPE nixfarm_farm_cache_nar_bytes_total counter\n\
             nixfarm_farm_cache_nar_bytes_total{{direction=\"in\"}} {}\nnixfarm_farm_cache_nar_bytes_total{{direction=\"out\"}} {}\n",
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
            self.stored.load(Ordering::Relaxed),
            self.served.load(Ordering::Relaxed),
        )
    }

    /// What issues agents their tokens at registration (None: it takes none).
    pub fn issued_tokens(&self) -> Option<Arc<crate::farm_tokens::FarmTokens>> {
        self.admission.issued.clone()
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        if self.admission.is_open() {
            return true;
        }
        let Some(v) = headers.get("authorization").and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let given = if let Some(b) = v.strip_prefix("Bearer ") {
            b.to_string()
        } else if let Some(b) = v.strip_prefix("Basic ") {
            data_encoding::BASE64
                .decode(b.trim().as_bytes())
                .ok()
                .and_then(|d| String::from_utf8(d).ok())
                .and_then(|s| s.split_once(':').map(|(_, p)| p.to_string()))
                .unwrap_or_default()
        } else {
            return false;
        };
        self.admission.admits(&given)
    }

    fn refuse(&self, status: StatusCode, why: &str) -> Response {
        self.refused.fetch_add(1, Ordering::Relaxed);
        let mut r = (status, why.to_string()).into_response();
        if status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                "www-authenticate",
                axum::http::HeaderValue::from_static("Basic realm=\"nixfarm\""),
            );
        }
        r
    }
}

type St = State<Arc<FarmCache>>;

/// The one gate of every route: each request needs an agent token (unless admission is
/// open); an address that sent
/// [`crate::limit::MAX_FAILURES`] wrong ones within a window is held back, right token
/// included (429), so tokens cannot be guessed here at the network's speed.
async fn admit(
    State(c): St,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if c.admission.is_open() {
        return next.run(req).await;
    }
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|i| i.0.ip());
    let now = std::time::Instant::now();
    if let Some(wait) = peer.and_then(|ip| c.guesses.blocked(ip, now)) {
        let mut r = c.refuse(StatusCode::TOO_MANY_REQUESTS, &crate::limit::refusal(wait));
        if let Ok(v) = axum::http::HeaderValue::from_str(&wait.as_secs().max(1).to_string()) {
            r.headers_mut().insert(axum::http::header::RETRY_AFTER, v);
        }
        return r;
    }
    if !c.authorized(req.headers()) {
        // A wrong token counts; none at all (a client without its netrc) is no guess, and
        // must not hold back the agents that share its address.
        if let Some(ip) = peer
            && req
                .headers()
                .contains_key(axum::http::header::AUTHORIZATION)
        {
            c.guesses.failed(ip, now);
        }
        return c.refuse(
            StatusCode::UNAUTHORIZED,
            "the farm cache needs an agent token",
        );
    }
    next.run(req).await
}

/// Bytes of the NARs in `dir/nar`.
fn nar_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir.join("nar"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// `<32 base-32 chars>.narinfo`
fn is_narinfo_name(f: &str) -> bool {
    f.strip_suffix(".narinfo").is_some_and(|h| {
        h.len() == 32
            && h.bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
    })
}

/// `<base-32 hash>.nar[.zst|.xz|.bz2]`
fn is_nar_name(f: &str) -> bool {
    let stem = [".nar.zst", ".nar.xz", ".nar.bz2", ".nar"]
        .iter()
        .find_map(|s| f.strip_suffix(s));
    stem.is_some_and(|h| {
        !h.is_empty()
            && h.len() <= 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
    })
}

async fn serve_file(path: PathBuf, content_type: &'static str) -> Option<Response> {
    let f = tokio::fs::File::open(&path).await.ok()?;
    let len = f.metadata().await.ok()?.len();
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(f));
    Some(
        (
            [
                ("content-type", content_type.to_string()),
                ("content-length", len.to_string()),
            ],
            body,
        )
            .into_response(),
    )
}

async fn get_top(State(c): St, Path(file): Path<String>) -> Response {
    if file == "nix-cache-info" {
        return ([("content-type", "text/x-nix-cache-info")], CACHE_INFO).into_response();
    }
    if !is_narinfo_name(&file) {
        return StatusCode::NOT_FOUND.into_response();
    }
    let path = c.dir.join(&file);
    match serve_file(path.clone(), "text/x-nix-narinfo").await {
        Some(r) => {
            c.hits.fetch_add(1, Ordering::Relaxed);
            // Used now: the last to be evicted.
            if let Ok(f) = std::fs::File::options().write(true).open(&path) {
                let _ = f.set_modified(std::time::SystemTime::now());
            }
            r
        }
        None => {
            c.misses.fetch_add(1, Ordering::Relaxed);
            StatusCode::NOT_FOUND.into_response()
        }
    }
}

async fn get_nar(State(c): St, Path(file): Path<String>) -> Response {
    if !is_nar_name(&file) {
        return StatusCode::NOT_FOUND.into_response();
    }
    let path = c.dir.join("nar").join(&file);
    match serve_file(path.clone(), "application/x-nix-nar").await {
        Some(r) => {
            if let Ok(m) = std::fs::metadata(&path) {
                c.served.fetch_add(m.len(), Ordering::Relaxed);
            }
            r
        }
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// A NAR upload: streamed to a temporary file within the size limit, then renamed in.
async fn put_nar(State(c): St, Path(file): Path<String>, body: Body) -> Response {
    if !is_nar_name(&file) {
        return c.refuse(StatusCode::BAD_REQUEST, "not a NAR file name");
    }
    let dest = c.dir.join("nar").join(&file);
    if dest.exists() {
        // Named by its content's hash: the same name is the same bytes, never replaced.
        // Used again now: eviction leaves it alone while its narinfo is on the way.
        touch(&dest);
        return StatusCode::OK.into_response();
    }
    let tmp = c
        .dir
        .join("nar")
        .join(format!(".upload-{:016x}", fastrand::u64(..)));
    let result: Result<(), (StatusCode, String)> = async {
        let mut out = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let mut stream = body.into_data_stream();
        let mut size = 0u64;
        let mut hash = Sha256::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
            size += chunk.len() as u64;
            hash.update(&chunk);
            if size > c.max_nar_bytes {
                return Err((
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("a NAR is at most {} bytes here", c.max_nar_bytes),
                ));
            }
            out.write_all(&chunk)
                .await
                .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        }
        // A NAR is named by the hash of its bytes: taken under no other name, so what a
        // narinfo later points at is what was meant (and nobody can take an honest
        // upload's name first with other bytes).
        let named = nixfarm_nix::hash::nix32_encode(&hash.finalize());
        if file.split('.').next() != Some(named.as_str()) {
            return Err((
                StatusCode::BAD_REQUEST,
                "the NAR's name is not the hash of its content".to_string(),
            ));
        }
        out.sync_all()
            .await
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        tokio::fs::rename(&tmp, &dest)
            .await
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        c.total.fetch_add(size, Ordering::Relaxed);
        c.stored.fetch_add(size, Ordering::Relaxed);
        Ok(())
    }
    .await;
    match result {
        Ok(()) => StatusCode::OK.into_response(),
        Err((status, why)) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            c.refuse(status, &why)
        }
    }
}

/// A narinfo upload: accepted only when its NAR is there with the size and hash it states;
/// then signed with the farm's key (whatever signatures it came with are dropped).
async fn put_narinfo(State(c): St, Path(file): Path<String>, body: axum::body::Bytes) -> Response {
    if !is_narinfo_name(&file) {
        return c.refuse(StatusCode::BAD_REQUEST, "not a narinfo file name");
    }
    if body.len() > MAX_NARINFO {
        return c.refuse(StatusCode::PAYLOAD_TOO_LARGE, "the narinfo is too large");
    }
    let Ok(text) = std::str::from_utf8(&body) else {
        return c.refuse(StatusCode::BAD_REQUEST, "the narinfo is not UTF-8");
    };
    let mut ni = match NarInfo::parse(text) {
        Ok(n) => n,
        Err(e) => return c.refuse(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    if format!("{}.narinfo", store_hash(&ni.store_path)) != file {
        return c.refuse(
            StatusCode::BAD_REQUEST,
            "the narinfo names another store path",
        );
    }
    let Some(nar) = ni.url.strip_prefix("nar/").filter(|n| is_nar_name(n)) else {
        return c.refuse(
            StatusCode::BAD_REQUEST,
            "the narinfo's URL is not nar/<file>",
        );
    };
    // A NAR is named by the hash of its bytes, so a name pins its content.
    if nar.split('.').next() != Some(nixfarm_nix::hash::nix32_encode(&ni.file_hash).as_str()) {
        return c.refuse(
            StatusCode::BAD_REQUEST,
            "the NAR's name is not the hash of its content",
        );
    }
    let nar_path = c.dir.join("nar").join(nar);
    let checked = tokio::task::spawn_blocking(move || -> std::io::Result<(u64, Vec<u8>)> {
        let mut f = std::fs::File::open(&nar_path)?;
        let mut h = Sha256::new();
        let n = std::io::copy(&mut f, &mut h)?;
        Ok((n, h.finalize().to_vec()))
    })
    .await;
    match checked {
        Ok(Ok((size, hash))) if size == ni.file_size && hash == ni.file_hash => {}
        Ok(Ok(_)) => {
            return c.refuse(
                StatusCode::BAD_REQUEST,
                "the NAR does not have the size and hash the narinfo states",
            );
        }
        _ => return c.refuse(StatusCode::BAD_REQUEST, "upload the NAR before its narinfo"),
    }
    {
        let (info, file) = (ni.clone(), c.dir.join("nar").join(nar));
        let checked = tokio::task::spawn_blocking(move || {
            nar_matches(&info, &file)?;
            if info.store_path.ends_with(".drv") {
                drv_matches_path(&info, &file)?;
            }
            Ok::<(), String>(())
        });
        match checked.await {
            Ok(Ok(())) => {}
            Ok(Err(why)) => return c.refuse(StatusCode::BAD_REQUEST, &why),
            Err(_) => {
                return c.refuse(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "checking the upload failed",
                );
            }
        }
    }
    touch(&c.dir.join("nar").join(nar));
    let dest = c.dir.join(&file);
    // A published path is never replaced (a later build of it by another agent, or
    // anyone's, would change what dependents and checks already took): the same again is a
    // no-op, anything else a conflict. Withdrawal and eviction free the name.
    if let Ok(old) = tokio::fs::read_to_string(&dest).await
        && NarInfo::parse(&old).is_ok()
    {
        return c.published_already(&old, &ni);
    }
    ni.sigs.clear();
    ni.sign(&c.key);
    let tmp = c.dir.join(format!(".{file}.{:016x}", fastrand::u64(..)));
    let text = ni.render();
    let published = tokio::task::spawn_blocking(move || publish(&tmp, &dest, &text)).await;
    match published {
        Ok(Ok(None)) => {
            let c2 = c.clone();
            tokio::task::spawn_blocking(move || c2.evict());
            StatusCode::OK.into_response()
        }
        Ok(Ok(Some(old))) => c.published_already(&old, &ni),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

#[path = "farm_cache_publish.rs"]
mod publish;
use publish::{publish, touch};

#[path = "farm_cache_drv.rs"]
mod drv;
use drv::{drv_matches_path, nar_matches};

#[path = "farm_cache_missing.rs"]
mod missing;

#[path = "farm_cache_evict.rs"]
mod evict;

#[cfg(test)]
#[path = "farm_cache_tests.rs"]
mod tests;
