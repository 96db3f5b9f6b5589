//! Live updates over Server-Sent Events. `/api/runs/ID/live` sends the rows of a run's page
//! that changed (all of them first, and again after any reconnection, so a page resumes
//! after a coordinator restart); `/api/runs/ID/events` is the run's event log as
//! `nixfarm watch` reads it, resumable with `Last-Event-ID`.

use super::{Shared, WebError, blocking, run_id};
use crate::engine::{Engine, EngineError};
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use nixfarm_core::report::{PackageReport, Report};
use serde_json::json;
use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::StreamExt as _;

/// Events of one run are gathered this long before the page is sent what changed.
const COALESCE: Duration = Duration::from_millis(25);
/// Without events the rows are looked at again this often (pending reasons change with the
/// agents, not only with the run's events).
const REFRESH: Duration = Duration::from_secs(5);

/// A place for one more live stream, if there is one (they are bounded: each follows a run).
fn stream_slot(web: &Shared) -> Option<tokio::sync::OwnedSemaphorePermit> {
    web.streams.clone().try_acquire_owned().ok()
}

fn too_many() -> Response {
    (
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        [(axum::http::header::RETRY_AFTER, "5")],
        axum::Json(json!({ "error": "too many live pages open; try again shortly" })),
    )
        .into_response()
}

/// The last event of a stream whose client token was replaced.
fn token_replaced() -> Event {
    Event::default()
        .event("token-replaced")
        .data(json!({ "error": crate::credentials::TOKEN_REPLACED }).to_string())
}

fn sse(rx: mpsc::Receiver<Event>) -> Response {
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<Event, Infallible>);
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// One row as the page shows it.
pub fn row(p: &PackageReport) -> serde_json::Value {
    json!({
        "attr": p.attr,
        "status": p.status,
        "reason": p.reason,
        "agent": p.agent,
        "time": super::html::duration(p.duration_ms as i64),
    })
}

pub fn summary(r: &Report) -> serde_json::Value {
    json!({
        "state": r.state,
        "error": r.error,
        "total": r.summary.total,
        "ready": r.summary.ready,
        "percent": r.summary.percent,
        "by_status": r.summary.by_status,
    })
}

pub async fn live(State(web): State<Shared>, Path(id): Path<String>) -> Response {
    let id = match run_id(&id, true) {
        Ok(id) => id.to_string(),
        Err(e) => return e.into_response(),
    };
    if let Err(e) = web.engine.run_state(&id) {
        return WebError::from(e).into_response();
    }
    let Some(slot) = stream_slot(&web) else {
        return too_many();
    };
    let (tx, rx) = mpsc::channel(8);
    let engine = web.engine.clone();
    let admission = web.admission();
    tokio::spawn(async move {
        let _slot = slot;
        let mut sub = engine.subscribe();
        let mut shown: HashMap<String, serde_json::Value> = HashMap::new();
        loop {
            // Its client token replaced: the page is told, and reloads (to the login form).
            if !admission.holds() {
                let _ = tx.send(token_replaced()).await;
                return;
            }
            let e = engine.clone();
            let run = id.clone();
            let started = std::time::Instant::now();
            let Ok(report) = blocking(move || e.report(&run)).await else {
                return;
            };
            // A report takes a while (400 ms for 10,000 packages in a debug build); it is read
            // beside the engine, not holding it, but an open page still waits as long before
            // the next, so it takes at most half a core from the run it shows.
            let settle = started.elapsed().max(COALESCE);
            let changed: Vec<serde_json::Value> = report
                .packages
                .iter()
                .filter_map(|p| {
                    let r = row(p);
                    (shown.get(&p.attr) != Some(&r)).then(|| {
                        shown.insert(p.attr.clone(), r.clone());
                        r
                    })
                })
                .collect();
            let data = json!({ "summary": summary(&report), "rows": changed });
            if tx
                .send(Event::default().event("rows").data(data.to_string()))
                .await
                .is_err()
            {
                return;
            }
            if report.state.is_terminal() {
                let _ = tx.send(Event::default().event("end").data("{}")).await;
                return;
            }
            if !wait_for_run(&mut sub, &id, &tx, settle).await {
                return;
            }
        }
    });
    sse(rx)
}

/// Waits for an event of `run` (or the refresh interval), then lets a burst of them settle
/// for `settle`. False when the page went away or the engine stopped.
async fn wait_for_run(
    sub: &mut broadcast::Receiver<crate::model::RunEvent>,
    run: &str,
    tx: &mpsc::Sender<Event>,
    settle: Duration,
) -> bool {
    let deadline = tokio::time::sleep(REFRESH);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            r = sub.recv() => match r {
                Ok(e) if e.run_id == run => break,
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(_)) => break,
                Err(broadcast::error::RecvError::Closed) => return false,
            },
            _ = &mut deadline => break,
            _ = tx.closed() => return false,
        }
    }
    tokio::time::sleep(settle).await;
    while sub.try_recv().is_ok() {}
    true
}

pub async fn events(
    State(web): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let id = match run_id(&id, true) {
        Ok(id) => id.to_string(),
        Err(e) => return e.into_response(),
    };
    let mut after: u64 = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let engine: Engine = web.engine.clone();
    if let Err(e) = engine.run_state(&id) {
        return WebError::from(e).into_response();
    }
    let Some(slot) = stream_slot(&web) else {
        return too_many();
    };
    let (tx, rx) = mpsc::channel(64);
    let admission = web.admission();
    tokio::spawn(async move {
        let _slot = slot;
        let mut sub = engine.subscribe();
        loop {
            if !admission.holds() {
                let _ = tx.send(token_replaced()).await;
                return;
            }
            let e = engine.clone();
            let run = id.clone();
            let batch = match blocking(move || e.events_after(&run, after)).await {
                Ok(b) => b,
                Err(EngineError::NotFound(_)) | Err(_) => return,
            };
            for ev in batch {
                after = ev.seq;
                let end = nixfarm_core::RunEvent::is_terminal_kind(&ev.kind);
                let msg = Event::default()
                    .id(ev.seq.to_string())
                    .event(ev.kind.clone())
                    .data(ev.json.clone());
                if tx.send(msg).await.is_err() || end {
                    return;
                }
            }
            let deadline = tokio::time::sleep(Duration::from_secs(2));
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    r = sub.recv() => match r {
                        Ok(e) if e.run_id == id => break,
                        Ok(_) => continue,
                        Err(broadcast::error::RecvError::Lagged(_)) => break,
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    _ = &mut deadline => break,
                    _ = tx.closed() => return,
                }
            }
        }
    });
    sse(rx)
}
