//! The farm cache's bulk query: which of a list of store hashes it lacks, in one request.

use super::{St, is_narinfo_name};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use std::sync::atomic::Ordering;

/// Most hashes one bulk query may ask about.
const MAX_BULK: usize = 4096;

/// Which of the hashes asked about the cache lacks ([`nixfarm_store::FARM_CACHE_BULK_MISSING`]).
pub(super) async fn post_missing(
    State(c): St,
    axum::Json(hashes): axum::Json<Vec<String>>,
) -> Response {
    if hashes.len() > MAX_BULK {
        return c.refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("at most {MAX_BULK} hashes per query"),
        );
    }
    if hashes
        .iter()
        .any(|h| !is_narinfo_name(&format!("{h}.narinfo")))
    {
        return c.refuse(StatusCode::BAD_REQUEST, "not a store hash");
    }
    // Thousands of file opens: off the async workers.
    let cache = c.clone();
    let missing = tokio::task::spawn_blocking(move || {
        let mut missing = Vec::new();
        for h in hashes {
            let path = cache.dir.join(format!("{h}.narinfo"));
            // As a narinfo request does: a hit is a use (the last to be evicted).
            match std::fs::File::options().write(true).open(&path) {
                Ok(f) => {
                    cache.hits.fetch_add(1, Ordering::Relaxed);
                    let _ = f.set_modified(std::time::SystemTime::now());
                }
                Err(_) => {
                    cache.misses.fetch_add(1, Ordering::Relaxed);
                    missing.push(h);
                }
            }
        }
        missing
    })
    .await;
    match missing {
        Ok(m) => axum::Json(m).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}
