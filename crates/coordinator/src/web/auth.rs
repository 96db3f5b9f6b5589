//! Access to the web UI: with a client token configured, every page and API call needs it,
//! as `Authorization: Bearer TOKEN` (scripts) or the cookie the login form sets (browsers:
//! HttpOnly, SameSite=Strict, derived from the token, never the token itself). Wrong tokens
//! are counted per client address (`limit.rs`).

use super::{Shared, html};
use crate::engine::constant_time_eq;
use crate::limit;
use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

const COOKIE: &str = "nixfarm_session";
/// Longest token the login form takes, bytes.
const MAX_TOKEN: usize = 4096;

/// Lets a request through when no token is configured, or it carries the token.
pub async fn require(State(web): State<Shared>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let open = path == "/login"
        || path.starts_with("/static/")
        || (web.cfg.public_badges && path.starts_with("/badge/"));
    if open {
        return next.run(req).await;
    }
    let peer = client(&web, &req);
    let json = path.starts_with("/api/") || path.starts_with("/badge/") || path.ends_with(".patch");
    if let Some(wait) = peer.and_then(|ip| web.limiter.blocked(ip, Instant::now())) {
        return too_many(&web, wait, json, "/runs");
    }
    let wrong = match authorized(&web, req.headers()) {
        Auth::Yes => return next.run(req).await,
        Auth::Wrong => {
            if let Some(ip) = peer {
                web.limiter.failed(ip, Instant::now());
            }
            true
        }
        Auth::None => false,
    };
    if json {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            axum::Json(serde_json::json!({
                "error": if wrong {
                    "the client token sent was refused: Authorization: Bearer TOKEN, with the coordinator's client token"
                } else {
                    "this coordinator needs its client token: Authorization: Bearer TOKEN"
                }
            })),
        )
            .into_response();
    }
    let next_path = req
        .uri()
        .path_and_query()
        .map_or("/runs", |p| p.as_str())
        .to_string();
    let mut r = Redirect::to(&format!("/login?next={}", html::seg(&next_path))).into_response();
    if wrong {
        // A cookie of an earlier token: dropped, so that reloads do not count against the
        // address as guesses.
        if let Ok(v) = format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0").parse() {
            r.headers_mut().insert(header::SET_COOKIE, v);
        }
    }
    r
}

/// What a request's credentials come to.
enum Auth {
    /// The token (or its cookie), or no token is configured.
    Yes,
    /// A token or session cookie that is not this coordinator's: counted against the peer.
    Wrong,
    /// None given.
    None,
}

fn authorized(web: &Shared, headers: &HeaderMap) -> Auth {
    let Some((token, session)) = web.secret() else {
        return Auth::Yes;
    };
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        && let Some(t) = v.strip_prefix("Bearer ")
    {
        return if constant_time_eq(t.trim().as_bytes(), token.as_bytes()) {
            Auth::Yes
        } else {
            Auth::Wrong
        };
    }
    let mut cookies = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .filter(|(k, _)| *k == COOKIE)
        .peekable();
    if cookies.peek().is_none() {
        return Auth::None;
    }
    if cookies.any(|(_, v)| constant_time_eq(v.as_bytes(), session.as_bytes())) {
        Auth::Yes
    } else {
        Auth::Wrong
    }
}

/// The client's address, when the server tells it (it does for every connection it
/// accepts): the peer's, or behind a trusted proxy the client's it names.
fn client<B>(web: &Shared, req: &axum::http::Request<B>) -> Option<IpAddr> {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| super::forwarded::client_ip(c.0.ip(), req.headers(), &web.cfg.trusted_proxies))
}

/// 429: this address sent too many wrong tokens; it may try again after `wait`.
fn too_many(web: &Shared, wait: Duration, json: bool, next: &str) -> Response {
    let why = limit::refusal(wait);
    let retry = [(header::RETRY_AFTER, wait.as_secs().max(1).to_string())];
    if json {
        (
            StatusCode::TOO_MANY_REQUESTS,
            retry,
            axum::Json(serde_json::json!({ "error": why })),
        )
            .into_response()
    } else {
        (
            StatusCode::TOO_MANY_REQUESTS,
            retry,
            Html(login_page(web, next, Some(&why))),
        )
            .into_response()
    }
}

#[derive(Deserialize)]
pub struct NextQuery {
    next: Option<String>,
}

/// Where to go after logging in: a path of this site only (no `//host`, no scheme).
fn safe_next(next: Option<&str>) -> String {
    match next {
        // Only a path of this site: browsers drop tabs and newlines from a URL, so "/\t/x"
        // would become "//x", another host; such characters never belong in a path.
        Some(n)
            if n.starts_with('/')
                && !n.starts_with("//")
                && !n.contains('\\')
                && !n.chars().any(|c| c.is_control() || c.is_whitespace()) =>
        {
            n.to_string()
        }
        _ => "/runs".to_string(),
    }
}

pub async fn login_form(State(web): State<Shared>, Query(q): Query<NextQuery>) -> Html<String> {
    Html(login_page(&web, &safe_next(q.next.as_deref()), None))
}

/// The login form, with `error` said above it.
fn login_page(web: &Shared, next: &str, error: Option<&str>) -> String {
    let mut body = String::from("<h1>Log in</h1>");
    if web.secret().is_none() {
        body.push_str("<p>This coordinator needs no token.</p>");
    }
    if let Some(e) = error {
        body.push_str(&format!(
            "<p class=\"error\" role=\"alert\">{}</p>",
            html::esc(e)
        ));
    }
    body.push_str(&format!(
        "<form method=\"post\" action=\"/login\" class=\"login\">\
         <input type=\"hidden\" name=\"next\" value=\"{}\">\
         <label for=\"token\">Client token</label>\
         <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"current-password\" required>\
         <button type=\"submit\">Log in</button></form>\
         <p class=\"hint\">The token of the coordinator's <code>[auth] client_token_file</code>, as the CLI uses it.</p>",
        html::esc(next)
    ));
    html::layout("log in", &body)
}

#[derive(Deserialize)]
pub struct LoginForm {
    token: String,
    next: Option<String>,
}

pub async fn login(
    State(web): State<Shared>,
    peer: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    axum::Form(f): axum::Form<LoginForm>,
) -> Response {
    let next = safe_next(f.next.as_deref());
    let ip =
        peer.map(|c| super::forwarded::client_ip(c.0.0.ip(), &headers, &web.cfg.trusted_proxies));
    if let Some(wait) = ip.and_then(|ip| web.limiter.blocked(ip, Instant::now())) {
        return too_many(&web, wait, false, &next);
    }
    let secret = web.secret();
    let ok = match &secret {
        Some((t, _)) => {
            f.token.len() <= MAX_TOKEN && constant_time_eq(f.token.trim().as_bytes(), t.as_bytes())
        }
        None => true,
    };
    if !ok {
        if let Some(ip) = ip {
            web.limiter.failed(ip, Instant::now());
        }
        return (
            StatusCode::UNAUTHORIZED,
            Html(login_page(
                &web,
                &next,
                Some("That token is not this coordinator's."),
            )),
        )
            .into_response();
    }
    let cookie = match secret.as_ref().map(|(_, s)| s) {
        Some(s) => format!("{COOKIE}={s}; Path=/; HttpOnly; SameSite=Strict; Max-Age=2592000"),
        None => String::new(),
    };
    let mut r = Redirect::to(&next).into_response();
    if !cookie.is_empty()
        && let Ok(v) = cookie.parse()
    {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::safe_next;

    #[test]
    fn login_only_sends_people_within_the_site() {
        assert_eq!(safe_next(Some("/runs/r1")), "/runs/r1");
        for bad in [
            "//evil.example",
            "https://evil.example",
            "\\\\evil",
            "/\\evil",
            "/\t/evil.example",
            "/\n/evil.example",
            "/ /evil.example",
            "runs",
        ] {
            assert_eq!(safe_next(Some(bad)), "/runs", "{bad}");
        }
        assert_eq!(safe_next(None), "/runs");
    }
}
