//! Readiness badges for a repository's README: `/badge/RUN.svg`, or `/badge/LABEL.svg` for
//! the latest run of a label ("ready 47/50", coloured by the percentage).

use super::{Shared, WebError, blocking, html};
use crate::model::RunListing;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

pub async fn badge(State(web): State<Shared>, Path(name): Path<String>) -> Response {
    let Some(key) = name.strip_suffix(".svg") else {
        return WebError::bad_request("a badge is /badge/RUN_OR_LABEL.svg", true).into_response();
    };
    if key.is_empty() || key.len() > nixfarm_core::limits::MAX_LABEL {
        return WebError::bad_request("no such run or label", true).into_response();
    }
    let key = key.to_string();
    let runs = match listing(&web).await {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let Some(run) = pick(&runs, &key) else {
        return WebError {
            status: axum::http::StatusCode::NOT_FOUND,
            message: format!("no run or label {key:?}"),
            json: true,
        }
        .into_response();
    };
    let svg = render(run.ready, run.total, run.state.is_terminal());
    (
        [
            (header::CONTENT_TYPE, "image/svg+xml"),
            // Badges are fetched through caching proxies (GitHub's camo): always ask again.
            (header::CACHE_CONTROL, "no-cache, max-age=0"),
        ],
        svg,
    )
        .into_response()
}

/// The run a badge shows: a run id, else the latest run of that label of every package (a
/// run of chosen attributes, a hash-fixing stage of one package say, is no repository's
/// readiness).
fn pick<'a>(runs: &'a [RunListing], key: &str) -> Option<&'a RunListing> {
    runs.iter().find(|r| r.id == key).or_else(|| {
        runs.iter()
            .filter(|r| r.label == key && !r.partial)
            .max_by_key(|r| (r.created_ms, r.id.clone()))
    })
}

/// How long a run listing serves badges: a listing computes every running run's report,
/// and badges may be public (`public_badges`), so a flood of requests costs one listing a
/// second, not one each.
const LISTING_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// The run listing badges are drawn from, and when it was made.
pub type Listing = Arc<tokio::sync::Mutex<Option<(std::time::Instant, Arc<Vec<RunListing>>)>>>;

/// The runs, listed at most [`LISTING_FOR`] ago; requests that come while one is being
/// made wait for it.
async fn listing(web: &Shared) -> Result<Arc<Vec<RunListing>>, WebError> {
    let mut held = web.badge_runs.lock().await;
    if let Some((at, runs)) = held.as_ref()
        && at.elapsed() < LISTING_FOR
    {
        return Ok(runs.clone());
    }
    let e = web.engine.clone();
    let runs = Arc::new(blocking(move || e.list_runs()).await?);
    *held = Some((std::time::Instant::now(), runs.clone()));
    Ok(runs)
}

/// The badge: grey label "ready", the count on a colour from red to green.
pub fn render(ready: u64, total: u64, ended: bool) -> String {
    let pct = super::api::percent(ready, total);
    let colour = if !ended {
        "#9f9f9f"
    } else if total > 0 && ready == total {
        "#4c1"
    } else if pct >= 80.0 {
        "#a4a61d"
    } else if pct >= 50.0 {
        "#dfb317"
    } else {
        "#e05d44"
    };
    let value = if ended {
        format!("{ready}/{total}")
    } else {
        format!("{ready}/{total} running")
    };
    let label = "ready";
    // Verdana 11px is about 7 px per character; shields-style padding of 5 px a side.
    let lw = 10 + 7 * label.len();
    let vw = 10 + 7 * value.chars().count();
    let w = lw + vw;
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"20\" role=\"img\" aria-label=\"{label}: {v}\">\
<title>{label}: {v}</title>\
<rect width=\"{lw}\" height=\"20\" fill=\"#555\"/>\
<rect x=\"{lw}\" width=\"{vw}\" height=\"20\" fill=\"{colour}\"/>\
<g fill=\"#fff\" text-anchor=\"middle\" font-family=\"Verdana,DejaVu Sans,sans-serif\" font-size=\"11\">\
<text x=\"{lx}\" y=\"14\">{label}</text><text x=\"{vx}\" y=\"14\">{v}</text></g></svg>",
        v = html::esc(&value),
        lx = lw / 2,
        vx = lw + vw / 2,
    )
}

#[cfg(test)]
mod tests {
    use super::render;
    use std::sync::Arc;

    /// Badge requests within a second share one run listing (a listing computes every
    /// running run's report, and badges may be public); a second later a new listing is
    /// made, and shows what changed.
    #[tokio::test]
    async fn badges_share_one_run_listing_a_second() {
        let dir = tempfile::tempdir().unwrap();
        let engine = crate::engine::Engine::open(
            crate::db::Db::open_in_memory().unwrap(),
            dir.path().join("sources"),
            Arc::new(crate::clock::ManualClock::new(1_000_000)),
            Default::default(),
        )
        .unwrap();
        let web: super::Shared = Arc::new(super::super::Web::new(
            engine.clone(),
            None,
            Default::default(),
            Default::default(),
        ));
        let listed = |w: super::Shared| async move {
            super::listing(&w)
                .await
                .unwrap_or_else(|e| panic!("{}", e.message))
        };
        let first = listed(web.clone()).await;
        assert!(first.is_empty());
        engine
            .submit(crate::engine::queries_tests::flake_run())
            .unwrap();
        let again = listed(web.clone()).await;
        assert!(
            Arc::ptr_eq(&first, &again),
            "listed again within the second"
        );
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        let later = listed(web.clone()).await;
        assert_eq!(later.len(), 1);
    }

    /// A label's badge is its latest run of every package: not a later hash-fixing stage
    /// (one package, 1/1 ready) of the same checkout. A stage's own id still shows it.
    #[test]
    fn a_label_shows_its_latest_whole_run() {
        let run = |id: &str, created_ms: i64, ready: u64, total: u64, partial: bool| {
            crate::model::RunListing {
                id: id.into(),
                state: nixfarm_core::RunState::Finished,
                label: "/src/repo".into(),
                total,
                ready,
                by_status: Default::default(),
                created_ms,
                finished_ms: created_ms + 1,
                partial,
            }
        };
        let runs = [
            run("r1", 1, 3, 19, false),
            run("r2", 2, 9, 19, false),
            run("r3", 3, 1, 1, true),
        ];
        assert_eq!(super::pick(&runs, "/src/repo").unwrap().id, "r2");
        assert_eq!(super::pick(&runs, "r3").unwrap().id, "r3");
        assert!(super::pick(&runs, "/other").is_none());
    }

    #[test]
    fn colour_follows_the_percentage() {
        assert!(render(50, 50, true).contains("#4c1"));
        assert!(render(47, 50, true).contains("#a4a61d"));
        assert!(render(9, 19, true).contains("#e05d44"));
        assert!(render(3, 19, false).contains("3/19 running"));
        assert!(render(47, 50, true).contains(">47/50</text>"));
    }
}
