//! The coordinator's web UI: server-rendered pages of runs, packages and agents that update
//! live from a run's events, the same data as JSON under `/api`, readiness badges, and
//! access with the client token (a bearer header, or the login form's cookie).

mod api;
mod auth;
mod badge;
mod forwarded;
mod html;
mod live;
mod pages;

use crate::config::HttpConfig;
use crate::engine::{Engine, EngineError};
use axum::Router;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use sha2::Digest as _;
use std::sync::Arc;

/// What the web handlers share.
pub struct Web {
    engine: Engine,
    /// The client token, when one is configured: as the gRPC services check it, read again
    /// when its file changes.
    client: Option<Arc<crate::credentials::Credentials>>,
    /// Key of the CSRF tokens in forms (random per process).
    csrf_key: String,
    cfg: HttpConfig,
    /// Live streams open at once (each follows a run and computes its rows).
    streams: Arc<tokio::sync::Semaphore>,
    /// Wrong tokens per client address (shared with the gRPC services).
    limiter: Arc<crate::limit::Limiter>,
    /// The run listing badges were last drawn from, and when (see `badge.rs`).
    badge_runs: badge::Listing,
}

/// Most live streams (pages and event followers) open at once.
const MAX_STREAMS: usize = 64;

impl Web {
    pub fn new(
        engine: Engine,
        client: Option<Arc<crate::credentials::Credentials>>,
        cfg: HttpConfig,
        limiter: Arc<crate::limit::Limiter>,
    ) -> Web {
        let csrf_key = hex_sha256(&["nixfarm-csrf", &random_key()]);
        Web {
            engine,
            client,
            csrf_key,
            cfg,
            streams: Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS)),
            limiter,
            badge_runs: Default::default(),
        }
    }

    /// What a stream admitted now holds on to: it ends when the client token is replaced.
    fn admission(&self) -> crate::credentials::Admission {
        self.client
            .as_ref()
            .map(|c| c.admission())
            .unwrap_or_default()
    }

    /// The client token now and the cookie value that stands for it (derived from it, never
    /// the token itself); None when no token is configured.
    fn secret(&self) -> Option<(String, String)> {
        self.client
            .as_ref()?
            .with_shared(|t| t.map(|t| (t.to_string(), hex_sha256(&["nixfarm-web-session", t]))))
    }

    /// The CSRF token of a form acting on `run`.
    fn csrf(&self, run: &str) -> String {
        hex_sha256(&[&self.csrf_key, run])
    }
}

type Shared = Arc<Web>;

/// 256 bits from the kernel, hex (from the userspace generator only if the kernel cannot
/// give them).
fn random_key() -> String {
    use std::io::Read as _;
    let mut b = [0u8; 32];
    match std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)) {
        Ok(()) => data_encoding::HEXLOWER.encode(&b),
        Err(_) => format!(
            "{:016x}{:016x}{:016x}",
            fastrand::u64(..),
            fastrand::u64(..),
            fastrand::u64(..)
        ),
    }
}

fn hex_sha256(parts: &[&str]) -> String {
    let mut h = sha2::Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    data_encoding::HEXLOWER.encode(&h.finalize())
}

/// The router of the web UI, API and badges.
pub fn router(web: Web) -> Router {
    let shared: Shared = Arc::new(web);
    Router::new()
        .route("/", get(|| async { Redirect::to("/runs") }))
        .route("/runs", get(pages::runs))
        .route("/runs/{id}", get(pages::run))
        .route("/runs/{id}/packages/{attr}", get(pages::package))
        .route("/runs/{id}/fix.patch", get(api::patch))
        .route("/runs/{id}/cancel", post(pages::cancel))
        .route("/agents", get(pages::agents))
        .route("/compare", get(pages::compare))
        .route("/api/runs", get(api::runs))
        .route("/api/runs/{id}", get(api::report))
        .route("/api/runs/{id}/events", get(live::events))
        .route("/api/runs/{id}/live", get(live::live))
        .route("/api/agents", get(api::agents))
        .route("/badge/{name}", get(badge::badge))
        .route("/login", get(auth::login_form).post(auth::login))
        .route("/static/app.js", get(html::script))
        .route("/static/style.css", get(html::style))
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            auth::require,
        ))
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(shared)
}

/// What a browser may do with these pages, whatever text from a run they show: scripts,
/// styles and connections from this site only (the bars' widths are style attributes),
/// no plugins, no framing, no sniffing a type other than the one sent.
async fn security_headers(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use axum::http::{HeaderValue, header};
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; style-src 'self' 'unsafe-inline'; object-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// An engine error as an HTTP answer: JSON for the API, a page otherwise.
pub(crate) struct WebError {
    status: StatusCode,
    message: String,
    json: bool,
}

impl WebError {
    fn page(e: EngineError) -> WebError {
        WebError {
            json: false,
            ..WebError::from(e)
        }
    }

    fn bad_request(message: impl Into<String>, json: bool) -> WebError {
        WebError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            json,
        }
    }
}

impl From<EngineError> for WebError {
    fn from(e: EngineError) -> WebError {
        let status = match &e {
            EngineError::NotFound(_) => StatusCode::NOT_FOUND,
            EngineError::Invalid(_) => StatusCode::BAD_REQUEST,
            EngineError::Denied(_) => StatusCode::FORBIDDEN,
            EngineError::Conflict(_) => StatusCode::CONFLICT,
            EngineError::Busy(_) | EngineError::Full(_) | EngineError::Halted(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            EngineError::State(_) | EngineError::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        WebError {
            status,
            message: e.to_string(),
            json: true,
        }
    }
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        if self.json {
            (
                self.status,
                axum::Json(serde_json::json!({ "error": self.message })),
            )
                .into_response()
        } else {
            let body = html::layout(
                "error",
                &format!(
                    "<h1>{}</h1><p>{}</p>",
                    self.status,
                    html::esc(&self.message)
                ),
            );
            (self.status, axum::response::Html(body)).into_response()
        }
    }
}

/// A run id from a URL, checked before it is looked up or echoed.
fn run_id(id: &str, json: bool) -> Result<&str, WebError> {
    if nixfarm_core::limits::is_run_id(id) {
        Ok(id)
    } else {
        Err(WebError::bad_request("not a run id", json))
    }
}

/// Runs engine work that reads the database off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, EngineError> + Send + 'static,
) -> Result<T, EngineError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| EngineError::Io(std::io::Error::other(e.to_string())))?
}
