//! A Cachix API test server that follows `shared/docs/cachix-api.md` strictly (bearer token,
//! bulk narinfo query, multipart upload with MD5 checks and ETags, `complete` creates the
//! narinfo) and keeps what it receives in the Nix binary cache layout, served at the cache's
//! `uri` so real Nix substitutes from it. Faults (502s, dropped connections) can be injected.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use md5::Md5;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub name: String,
    pub token: String,
    /// `NAME.cachix.org-1:base64`, published as the cache's signing key.
    pub public_key: String,
    /// Where the binary cache lives on disk.
    pub dir: PathBuf,
    /// Every Nth API or upload request answers 502 without doing anything (0: never).
    pub fail_every: u64,
    /// Every Nth API or upload request is carried out, then its connection is dropped
    /// before the answer (0: never).
    pub drop_every: u64,
    /// Store paths (not derivations) whose name starts with this are refused at `complete`
    /// with 403, every time, as a cache over its storage quota would (None: none).
    pub refuse_prefix: Option<String>,
    /// Whether the server answers `nix-cache-info` itself, as Cachix does (false: like a
    /// plain WebDAV server, only what was PUT there).
    pub serves_cache_info: bool,
}

#[derive(Default)]
struct Upload {
    upload_id: String,
    md5: HashMap<u32, String>,
    parts: BTreeMap<u32, (Vec<u8>, String)>,
    completed: bool,
}

/// What the server saw, for assertions.
#[derive(Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub faults: AtomicU64,
    pub multipart_started: AtomicU64,
    pub parts_put: AtomicU64,
    /// Completes refused through `refuse_prefix`, and aborts received.
    pub refused: AtomicU64,
    pub aborted: AtomicU64,
    /// Narinfos created, per store path basename: more than 1 means a path was uploaded twice.
    pub created: Mutex<HashMap<String, u32>>,
}

struct St {
    cfg: ServerConfig,
    addr: SocketAddr,
    uploads: Mutex<HashMap<String, Upload>>,
    counters: Arc<Counters>,
    next: AtomicU64,
}

type S = State<Arc<St>>;

fn err(code: StatusCode, msg: &str) -> Response {
    (code, json!({"error": msg}).to_string()).into_response()
}

fn authorized(st: &St, h: &HeaderMap) -> bool {
    h.get("authorization").and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {}", st.cfg.token))
}

/// The refusal, if the request may not touch cache `name`.
fn check(st: &St, h: &HeaderMap, name: &str) -> Option<Response> {
    if !authorized(st, h) {
        return Some(err(StatusCode::UNAUTHORIZED, "bearer token required"));
    }
    if name != st.cfg.name {
        return Some(err(StatusCode::NOT_FOUND, "no such cache"));
    }
    None
}

async fn faults(State(st): S, req: Request, next: Next) -> Response {
    if req.uri().path().starts_with("/serve/") {
        return next.run(req).await;
    }
    let n = st.counters.requests.fetch_add(1, Ordering::SeqCst) + 1;
    if st.cfg.fail_every > 0 && n.is_multiple_of(st.cfg.fail_every) {
        st.counters.faults.fetch_add(1, Ordering::SeqCst);
        return err(StatusCode::BAD_GATEWAY, "injected 502");
    }
    let resp = next.run(req).await;
    if st.cfg.drop_every > 0 && n.is_multiple_of(st.cfg.drop_every) {
        st.counters.faults.fetch_add(1, Ordering::SeqCst);
        // The work is done; the client never hears so. Panicking in the connection's task
        // closes it without an answer, as a reset would.
        panic!("injected connection drop (request {n})");
    }
    resp
}

async fn cache_info(State(st): S, Path(name): Path<String>, h: HeaderMap) -> Response {
    if let Some(r) = check(&st, &h, &name) {
        return r;
    }
    axum::Json(json!({
        "name": name,
        "uri": format!("http://{}/serve/{}", st.addr, name),
        "isPublic": true,
        "publicSigningKeys": [st.cfg.public_key],
        "githubUsername": "nixfarm",
        "permission": "Write",
        "preferredCompressionMethod": "ZSTD",
    }))
    .into_response()
}

fn has_narinfo(st: &St, hash: &str) -> bool {
    st.cfg.dir.join(format!("{hash}.narinfo")).exists()
}

async fn narinfo_bulk(
    State(st): S,
    Path(name): Path<String>,
    h: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(r) = check(&st, &h, &name) {
        return r;
    }
    let Ok(hashes) = serde_json::from_slice::<Vec<String>>(&body) else {
        return err(
            StatusCode::BAD_REQUEST,
            "expected a JSON array of store hashes",
        );
    };
    if hashes.len() > 32768 {
        return err(StatusCode::BAD_REQUEST, "at most 32768 hashes per request");
    }
    let missing: Vec<&String> = hashes.iter().filter(|x| !has_narinfo(&st, x)).collect();
    axum::Json(missing).into_response()
}

async fn narinfo_head(
    State(st): S,
    Path((name, file)): Path<(String, String)>,
    h: HeaderMap,
) -> Response {
    if let Some(r) = check(&st, &h, &name) {
        return r;
    }
    match file.strip_suffix(".narinfo") {
        Some(hash) if has_narinfo(&st, hash) => StatusCode::OK.into_response(),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

#[derive(Deserialize)]
struct Compression {
    compression: String,
}

async fn multipart_start(
    State(st): S,
    Path(name): Path<String>,
    Query(q): Query<Compression>,
    h: HeaderMap,
) -> Response {
    if let Some(r) = check(&st, &h, &name) {
        return r;
    }
    if q.compression != "zst" && q.compression != "xz" {
        return err(StatusCode::BAD_REQUEST, "compression must be zst or xz");
    }
    let n = st.next.fetch_add(1, Ordering::SeqCst);
    let nar_id = format!("00000000-0000-4000-8000-{n:012}");
    let upload_id = format!("upload-{n}");
    st.uploads.lock().unwrap().insert(
        nar_id.clone(),
        Upload {
            upload_id: upload_id.clone(),
            ..Default::default()
        },
    );
    st.counters.multipart_started.fetch_add(1, Ordering::SeqCst);
    axum::Json(json!({"narId": nar_id, "uploadId": upload_id})).into_response()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PartQuery {
    upload_id: String,
    part_number: u32,
}

async fn multipart_part(
    State(st): S,
    Path((name, nar_id)): Path<(String, String)>,
    Query(q): Query<PartQuery>,
    h: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(r) = check(&st, &h, &name) {
        return r;
    }
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return err(StatusCode::BAD_REQUEST, "expected {\"contentMD5\": …}");
    };
    let Some(md5) = v.get("contentMD5").and_then(Value::as_str) else {
        return err(StatusCode::BAD_REQUEST, "contentMD5 missing");
    };
    let mut ups = st.uploads.lock().unwrap();
    let Some(u) = ups.get_mut(&nar_id) else {
        return err(StatusCode::NOT_FOUND, "no such upload");
    };
    if u.upload_id != q.upload_id || q.part_number == 0 {
        return err(StatusCode::BAD_REQUEST, "wrong uploadId or partNumber");
    }
    u.md5.insert(q.part_number, md5.to_string());
    axum::Json(json!({
        "uploadUrl": format!("http://{}/upload/{}/{}", st.addr, nar_id, q.part_number)
    }))
    .into_response()
}

async fn part_put(
    State(st): S,
    Path((nar_id, part)): Path<(String, u32)>,
    h: HeaderMap,
    body: Bytes,
) -> Response {
    if h.contains_key("authorization") {
        return err(
            StatusCode::BAD_REQUEST,
            "presigned URLs take no Authorization header",
        );
    }
    let md5 = data_encoding::BASE64.encode(&Md5::digest(&body));
    if h.get("content-md5").and_then(|v| v.to_str().ok()) != Some(md5.as_str()) {
        return err(
            StatusCode::BAD_REQUEST,
            "Content-MD5 does not match the body",
        );
    }
    let mut ups = st.uploads.lock().unwrap();
    let Some(u) = ups.get_mut(&nar_id) else {
        return err(StatusCode::NOT_FOUND, "no such upload");
    };
    if u.md5.get(&part) != Some(&md5) {
        return err(StatusCode::FORBIDDEN, "the URL was signed for another MD5");
    }
    let etag = format!(
        "\"{}\"",
        data_encoding::HEXLOWER.encode(&Md5::digest(&body))
    );
    u.parts.insert(part, (body.to_vec(), etag.clone()));
    st.counters.parts_put.fetch_add(1, Ordering::SeqCst);
    (StatusCode::OK, [("etag", etag)]).into_response()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UploadQuery {
    upload_id: String,
}

async fn multipart_complete(
    State(st): S,
    Path((name, nar_id)): Path<(String, String)>,
    Query(q): Query<UploadQuery>,
    h: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(r) = check(&st, &h, &name) {
        return r;
    }
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return err(StatusCode::BAD_REQUEST, "expected JSON");
    };
    let mut ups = st.uploads.lock().unwrap();
    let Some(u) = ups.get_mut(&nar_id) else {
        return err(StatusCode::NOT_FOUND, "no such upload");
    };
    if u.upload_id != q.upload_id {
        return err(StatusCode::BAD_REQUEST, "wrong uploadId");
    }
    if u.completed {
        // A retried complete whose first answer was lost: already done.
        return StatusCode::OK.into_response();
    }
    let Some(parts) = v.get("parts").and_then(Value::as_array) else {
        return err(StatusCode::BAD_REQUEST, "parts missing");
    };
    let mut file = Vec::new();
    let mut last = 0;
    for p in parts {
        let (Some(n), Some(etag)) = (
            p.get("partNumber").and_then(Value::as_u64),
            p.get("eTag").and_then(Value::as_str),
        ) else {
            return err(
                StatusCode::BAD_REQUEST,
                "each part needs partNumber and eTag",
            );
        };
        if n as u32 <= last {
            return err(StatusCode::BAD_REQUEST, "parts must be sorted by number");
        }
        last = n as u32;
        match u.parts.get(&(n as u32)) {
            Some((bytes, tag)) if tag == etag => file.extend_from_slice(bytes),
            _ => return err(StatusCode::BAD_REQUEST, "unknown part or ETag changed"),
        }
    }
    let Some(ni) = v.get("narInfoCreate") else {
        return err(StatusCode::BAD_REQUEST, "narInfoCreate missing");
    };
    let field = |k: &str| ni.get(k).cloned().unwrap_or(Value::Null);
    for k in [
        "cStoreHash",
        "cStoreSuffix",
        "cNarHash",
        "cNarSize",
        "cFileHash",
        "cFileSize",
        "cReferences",
        "cDeriver",
        "cSig",
    ] {
        if ni.get(k).is_none() {
            return err(
                StatusCode::BAD_REQUEST,
                &format!("{k} missing (null must be sent as null)"),
            );
        }
    }
    let file_hash = data_encoding::HEXLOWER.encode(&Sha256::digest(&file));
    if field("cFileHash").as_str() != Some(file_hash.as_str())
        || field("cFileSize").as_u64() != Some(file.len() as u64)
    {
        return err(
            StatusCode::BAD_REQUEST,
            "cFileHash/cFileSize do not match the parts",
        );
    }
    let Ok(nar) = zstd::decode_all(file.as_slice()) else {
        return err(StatusCode::BAD_REQUEST, "the parts are not zstd");
    };
    let nar_hash = format!(
        "sha256:{}",
        nixfarm_nix::hash::nix32_encode(&Sha256::digest(&nar))
    );
    if field("cNarSize").as_u64() == Some(0)
        || field("cNarSize").as_u64() != Some(nar.len() as u64)
        || field("cNarHash").as_str() != Some(nar_hash.as_str())
    {
        return err(
            StatusCode::BAD_REQUEST,
            "cNarHash/cNarSize do not match the NAR",
        );
    }
    let hash = field("cStoreHash").as_str().unwrap_or_default().to_string();
    let suffix = field("cStoreSuffix")
        .as_str()
        .unwrap_or_default()
        .to_string();
    if let Some(prefix) = &st.cfg.refuse_prefix
        && suffix.starts_with(prefix.as_str())
        && !suffix.ends_with(".drv")
    {
        st.counters.refused.fetch_add(1, Ordering::SeqCst);
        return err(StatusCode::FORBIDDEN, "storage quota exceeded");
    }
    let file_nix32 = nixfarm_nix::hash::nix32_encode(&Sha256::digest(&file));
    let nar_rel = format!("nar/{file_nix32}.nar.zst");
    let mut refs: Vec<String> = field("cReferences")
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    refs.sort();
    let mut text = format!(
        "StorePath: /nix/store/{hash}-{suffix}\nURL: {nar_rel}\nCompression: zstd\nFileHash: sha256:{file_nix32}\nFileSize: {}\nNarHash: {nar_hash}\nNarSize: {}\nReferences: {}\n",
        file.len(),
        nar.len(),
        refs.join(" ")
    );
    if let Some(d) = field("cDeriver").as_str()
        && d != "unknown-deriver"
    {
        text.push_str(&format!("Deriver: {d}\n"));
    }
    if let Some(sig) = field("cSig").as_str() {
        text.push_str(&format!("Sig: {}.cachix.org-1:{sig}\n", st.cfg.name));
    }
    let dir = &st.cfg.dir;
    let _ = std::fs::create_dir_all(dir.join("nar"));
    if std::fs::write(dir.join(&nar_rel), &file).is_err()
        || std::fs::write(dir.join(format!("{hash}.narinfo")), text).is_err()
    {
        return err(StatusCode::INTERNAL_SERVER_ERROR, "cannot store");
    }
    u.completed = true;
    *st.counters
        .created
        .lock()
        .unwrap()
        .entry(format!("{hash}-{suffix}"))
        .or_default() += 1;
    StatusCode::OK.into_response()
}

async fn multipart_abort(
    State(st): S,
    Path((name, nar_id)): Path<(String, String)>,
    h: HeaderMap,
) -> Response {
    if let Some(r) = check(&st, &h, &name) {
        return r;
    }
    st.uploads.lock().unwrap().remove(&nar_id);
    st.counters.aborted.fetch_add(1, Ordering::SeqCst);
    StatusCode::OK.into_response()
}

async fn serve(State(st): S, Path((name, file)): Path<(String, String)>) -> Response {
    if name != st.cfg.name || file.contains("..") {
        return StatusCode::NOT_FOUND.into_response();
    }
    if file == "nix-cache-info" && st.cfg.serves_cache_info {
        return "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n".into_response();
    }
    match std::fs::read(st.cfg.dir.join(&file)) {
        Ok(b) => b.into_response(),
        Err(_) => StatusCode::NOT_FOUND.into_response(),
    }
}

/// The plain binary cache at the same URI also takes PUT, as an `http(s)://` cache target.
async fn serve_put(
    State(st): S,
    Path((name, file)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    if name != st.cfg.name || file.contains("..") || file.starts_with('/') {
        return StatusCode::NOT_FOUND.into_response();
    }
    let path = st.cfg.dir.join(&file);
    if let Some(parent) = path.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    match std::fs::write(&path, &body) {
        Ok(()) => StatusCode::OK.into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// A running server.
pub struct CachixServer {
    pub addr: SocketAddr,
    pub counters: Arc<Counters>,
    _thread: std::thread::JoinHandle<()>,
}

impl CachixServer {
    pub fn api_url(&self) -> String {
        format!("http://{}/api/v1", self.addr)
    }

    pub fn uri(&self, name: &str) -> String {
        format!("http://{}/serve/{name}", self.addr)
    }

    /// Starts the server on 127.0.0.1:0 on a thread of its own.
    pub fn start(cfg: ServerConfig) -> std::io::Result<CachixServer> {
        std::fs::create_dir_all(&cfg.dir)?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let st = Arc::new(St {
            cfg,
            addr,
            uploads: Mutex::new(HashMap::new()),
            counters: counters.clone(),
            next: AtomicU64::new(1),
        });
        let app = Router::new()
            .route("/api/v1/cache/{name}", get(cache_info))
            .route("/api/v1/cache/{name}/narinfo", post(narinfo_bulk))
            .route("/api/v1/cache/{name}/{file}", get(narinfo_head))
            .route("/api/v1/cache/{name}/multipart-nar", post(multipart_start))
            .route(
                "/api/v1/cache/{name}/multipart-nar/{nar_id}",
                post(multipart_part),
            )
            .route(
                "/api/v1/cache/{name}/multipart-nar/{nar_id}/complete",
                post(multipart_complete),
            )
            .route(
                "/api/v1/cache/{name}/multipart-nar/{nar_id}/abort",
                post(multipart_abort),
            )
            .route("/upload/{nar_id}/{part}", put(part_put))
            .route("/serve/{name}/{*file}", get(serve).put(serve_put))
            .layer(axum::middleware::from_fn_with_state(st.clone(), faults))
            .with_state(st);
        let thread = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(l) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                let _ = axum::serve(l, app).await;
            });
        });
        Ok(CachixServer {
            addr,
            counters,
            _thread: thread,
        })
    }
}
