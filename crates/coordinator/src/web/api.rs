//! The JSON API: runs, a run's report (exactly the CLI's `--format json`), agents, and a
//! run's patch.

use super::{Shared, WebError, blocking, run_id};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

pub async fn runs(State(web): State<Shared>) -> Result<Json<Value>, WebError> {
    let e = web.engine.clone();
    let runs = blocking(move || e.list_runs()).await?;
    Ok(Json(Value::Array(
        runs.iter()
            .map(|r| {
                json!({
                    "run_id": r.id,
                    "state": r.state,
                    "label": r.label,
                    "total": r.total,
                    "ready": r.ready,
                    "percent": percent(r.ready, r.total),
                    "by_status": r.by_status,
                    "created_ms": r.created_ms,
                    "finished_ms": r.finished_ms,
                })
            })
            .collect(),
    )))
}

/// Ready as a percentage rounded to one decimal, as reports give it.
pub fn percent(ready: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        (ready as f64 * 1000.0 / total as f64).round() / 10.0
    }
}

pub async fn report(State(web): State<Shared>, Path(id): Path<String>) -> Response {
    let id = match run_id(&id, true) {
        Ok(id) => id.to_string(),
        Err(e) => return e.into_response(),
    };
    let e = web.engine.clone();
    match blocking(move || e.report_with_fixes(&id)).await {
        Ok(r) => (
            [(header::CONTENT_TYPE, "application/json")],
            r.to_json() + "\n",
        )
            .into_response(),
        Err(e) => WebError::from(e).into_response(),
    }
}

pub async fn agents(State(web): State<Shared>) -> Json<Value> {
    let agents = web.engine.list_agents();
    let waiting = web.engine.waiting_jobs();
    Json(json!({
        "agents": agents
            .iter()
            .map(|a| json!({
                "name": a.name,
                "connected": a.connected,
                "paused": a.paused,
                "draining": a.draining,
                "building": a.building,
                "last_seen_ms": a.last_seen_ms,
                "max_jobs": a.max_jobs,
                "systems": a.systems,
                "features": a.features,
                "nix_version": a.nix_version,
                "protocol_violations": a.violations,
                "holds_outputs": a.holds_outputs,
                "without_farm_cache": a.without_farm_cache,
                                "admitted_by": a.admitted_by,
                "run_caches": a.run_caches,
            }))
            .collect::<Vec<_>>(),
        "waiting": waiting
            .iter()
            .map(|(reason, jobs, example)| json!({"reason": reason, "jobs": jobs, "example": example}))
            .collect::<Vec<_>>(),
    }))
}

/// The run's patch (`git apply` / `patch -p1`), as a download.
pub async fn patch(State(web): State<Shared>, Path(id): Path<String>) -> Response {
    let id = match run_id(&id, false) {
        Ok(id) => id.to_string(),
        Err(e) => return e.into_response(),
    };
    let e = web.engine.clone();
    let name = format!("attachment; filename=\"nixfarm-{id}-fix.patch\"");
    match blocking(move || e.fix_patch(&id)).await {
        Ok(p) => (
            [
                (
                    header::CONTENT_TYPE,
                    "text/x-diff; charset=utf-8".to_string(),
                ),
                (header::CONTENT_DISPOSITION, name),
            ],
            p,
        )
            .into_response(),
        Err(e) => WebError::page(e).into_response(),
    }
}
