//! Access to the web UI: with a client token configured, every page and API call needs it,
//! as `Authorization: Bearer TOKEN` (scripts) or the cookie the login form sets (browsers:
//! HttpOnly, SameSite=Strict, derived from the token, never the token itself).

use super::{Shared, html};
use crate::engine::constant_time_eq;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;

const COOKIE: &str = "nixfarm_session";
/// Longest token the login form takes, bytes.
const MAX_TOKEN: usize = 4096;

/// Lets a request through when no token is configured, or it carries the token.
pub async fn require(State(web): State<Shared>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let open = path == "/login"
        || path.starts_with("/static/")
        || (web.cfg.public_badges && path.starts_with("/badge/"));
    if open || authorized(&web, req.headers()) {
        return next.run(req).await;
    }
    if path.starts_with("/api/") || path.starts_with("/badge/") || path.ends_with(".patch") {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            axum::Json(serde_json::json!({
                "error": "this coordinator needs its client token: Authorization: Bearer TOKEN"
            })),
        )
            .into_response();
    }
    let next_path = req
        .uri()
        .path_and_query()
        .map_or("/runs", |p| p.as_str())
        .to_string();
    Redirect::to(&format!("/login?next={}", html::seg(&next_path))).into_response()
}

fn authorized(web: &Shared, headers: &HeaderMap) -> bool {
    let (Some(token), Some(session)) = (&web.token, &web.session) else {
        return true;
    };
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        && let Some(t) = v.strip_prefix("Bearer ")
    {
        return constant_time_eq(t.trim().as_bytes(), token.as_bytes());
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .any(|(k, v)| k == COOKIE && constant_time_eq(v.as_bytes(), session.as_bytes()))
}

#[derive(Deserialize)]
pub struct NextQuery {
    next: Option<String>,
}

/// Where to go after logging in: a path of this site only (no `//host`, no scheme).
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && !n.contains('\\') => n.to_string(),
        _ => "/runs".to_string(),
    }
}

pub async fn login_form(State(web): State<Shared>, Query(q): Query<NextQuery>) -> Html<String> {
    Html(login_page(&web, &safe_next(q.next.as_deref()), false))
}

fn login_page(web: &Shared, next: &str, failed: bool) -> String {
    let mut body = String::from("<h1>Log in</h1>");
    if web.token.is_none() {
        body.push_str("<p>This coordinator needs no token.</p>");
    }
    if failed {
        body.push_str(
            "<p class=\"error\" role=\"alert\">That token is not this coordinator's.</p>",
        );
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

pub async fn login(State(web): State<Shared>, axum::Form(f): axum::Form<LoginForm>) -> Response {
    let next = safe_next(f.next.as_deref());
    let ok = match (&web.token, &web.session) {
        (Some(t), Some(_)) => {
            f.token.len() <= MAX_TOKEN && constant_time_eq(f.token.trim().as_bytes(), t.as_bytes())
        }
        _ => true,
    };
    if !ok {
        return (
            StatusCode::UNAUTHORIZED,
            Html(login_page(&web, &next, true)),
        )
            .into_response();
    }
    let cookie = match &web.session {
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
            "runs",
        ] {
            assert_eq!(safe_next(Some(bad)), "/runs", "{bad}");
        }
        assert_eq!(safe_next(None), "/runs");
    }
}
