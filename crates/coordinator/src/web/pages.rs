//! The pages: runs, a run (summary, status bar, every package filterable by status and
//! name, the patch), a package (reason, log tail, hash mismatches and fixes) and agents.
//! Rendered on the server; the script only makes them live.

use super::api::percent;
use super::html::{duration, esc, esc_into, layout, seg, utc};
use super::{Shared, WebError, blocking, run_id};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use nixfarm_core::PackageStatus;
use nixfarm_core::report::Report;
use serde::Deserialize;
use std::fmt::Write as _;

/// Each status and the word the page uses for its colour class.
fn status_class(s: PackageStatus) -> &'static str {
    match s {
        PackageStatus::Ready => "ok",
        PackageStatus::Pending => "pending",
        PackageStatus::Unpinned | PackageStatus::NeedsHash | PackageStatus::NotCached => "warn",
        _ => "bad",
    }
}

fn status_bar(out: &mut String, r: &Report) {
    out.push_str("<div class=\"bar\" role=\"img\" aria-label=\"packages by status\" id=\"bar\">");
    let total = r.summary.total.max(1) as f64;
    for (status, n) in &r.summary.by_status {
        let class = status_class(*status);
        let _ = write!(
            out,
            "<span class=\"{class}\" style=\"width:{:.3}%\" title=\"{} {}\"></span>",
            *n as f64 * 100.0 / total,
            n,
            status
        );
    }
    out.push_str("</div>");
}

pub async fn runs(State(web): State<Shared>) -> Result<Html<String>, WebError> {
    let e = web.engine.clone();
    let runs = blocking(move || e.list_runs())
        .await
        .map_err(WebError::page)?;
    let mut b = String::from("<h1>Runs</h1>");
    if runs.is_empty() {
        b.push_str("<p>No runs yet. Submit one with <code>nixfarm submit DIR</code>.</p>");
    }
    b.push_str("<div class=\"scroll\"><table id=\"runs\"><caption class=\"sr\">Every run, newest first</caption><thead><tr>\
        <th scope=\"col\">run</th><th scope=\"col\">state</th><th scope=\"col\">ready</th>\
        <th scope=\"col\">by status</th><th scope=\"col\">source</th><th scope=\"col\">started</th>\
        <th scope=\"col\">took</th></tr></thead><tbody>");
    let mut runs = runs;
    runs.sort_by(|a, b| (b.created_ms, &b.id).cmp(&(a.created_ms, &a.id)));
    for r in &runs {
        let counts: Vec<String> = r
            .by_status
            .iter()
            .map(|(k, v)| format!("{v} {k}"))
            .collect();
        let took = if r.finished_ms > 0 {
            duration(r.finished_ms - r.created_ms)
        } else {
            String::new()
        };
        let _ = write!(
            b,
            "<tr><td><a href=\"/runs/{id}\">{id}</a></td><td class=\"state-{state}\">{state}</td>\
             <td>{ready}/{total} ({pct:.1}%)</td><td>{counts}</td><td>{label}</td><td>{when}</td><td>{took}</td></tr>",
            id = esc(&r.id),
            state = r.state,
            ready = r.ready,
            total = r.total,
            pct = percent(r.ready, r.total),
            counts = counts.join(", "),
            label = esc(&r.label),
            when = utc(r.created_ms),
        );
    }
    b.push_str("</tbody></table></div>");
    Ok(Html(layout("runs", &b)))
}

#[derive(Deserialize, Default)]
pub struct Filter {
    status: Option<String>,
    q: Option<String>,
}

pub async fn run(
    State(web): State<Shared>,
    Path(id): Path<String>,
    Query(f): Query<Filter>,
) -> Result<Html<String>, WebError> {
    let id = run_id(&id, false)?.to_string();
    let e = web.engine.clone();
    let r = blocking(move || e.report_with_fixes(&id))
        .await
        .map_err(WebError::page)?;
    Ok(Html(render_run(&web, &r, &f)))
}

/// The run page; `f` filters rows on the server (the script filters on the page as well).
pub fn render_run(web: &Shared, r: &Report, f: &Filter) -> String {
    let id = esc(&r.run_id);
    let mut b = String::with_capacity(4096 + r.packages.len() * 256);
    let _ = write!(
        b,
        "<div id=\"run\" data-run=\"{id}\" data-state=\"{state}\"><h1>Run {id}</h1>\
         <p class=\"label\">{label}</p>\
         <p class=\"summary\"><strong id=\"percent\">{pct:.1}%</strong> ready: \
         <span id=\"ready\">{ready}</span>/<span id=\"total\">{total}</span> · \
         state <span id=\"state\" class=\"state-{state}\">{state}</span> · \
         <span id=\"live\" aria-live=\"polite\"></span></p>",
        label = esc(&r.label),
        pct = r.summary.percent,
        ready = r.summary.ready,
        total = r.summary.total,
        state = r.state,
    );
    if !r.error.is_empty() {
        let _ = write!(b, "<p class=\"error\" role=\"alert\">{}</p>", esc(&r.error));
    }
    status_bar(&mut b, r);
    b.push_str("<ul class=\"counts\" id=\"counts\">");
    for (k, v) in &r.summary.by_status {
        let _ = write!(b, "<li><a href=\"?status={k}\">{v} {k}</a></li>");
    }
    b.push_str("</ul>");
    // Hidden until there is something to download (the script shows it when a live run ends).
    let fixes = r.all_fixes().len();
    let _ = write!(
        b,
        "<p id=\"patch\"{}><a class=\"button\" href=\"/runs/{id}/fix.patch\" download>Download fix.patch</a> \
         fills in <span id=\"fixes\">{fixes}</span> hash(es): <code>git apply nixfarm-{id}-fix.patch</code></p>",
        if fixes == 0 { " hidden" } else { "" }
    );
    if web.cfg.allow_cancel && !r.state.is_terminal() {
        let _ = write!(
            b,
            "<form method=\"post\" action=\"/runs/{id}/cancel\" class=\"cancel\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
             <button type=\"submit\">Cancel this run</button></form>",
            web.csrf(&r.run_id)
        );
    }
    let want_status = f.status.as_deref().unwrap_or("");
    let q = f.q.as_deref().unwrap_or("").to_lowercase();
    b.push_str("<form method=\"get\" class=\"filter\" id=\"filter\" role=\"search\">\
        <label for=\"status\">Status</label><select id=\"status\" name=\"status\"><option value=\"\">all</option>");
    for s in PackageStatus::ALL {
        let name = s.to_string();
        let _ = write!(
            b,
            "<option value=\"{name}\"{}>{name}</option>",
            if name == want_status { " selected" } else { "" }
        );
    }
    let _ = write!(
        b,
        "</select><label for=\"q\">Name</label><input id=\"q\" name=\"q\" type=\"search\" value=\"{}\" placeholder=\"package name\">\
         <button type=\"submit\">Filter</button></form>",
        esc(&q)
    );
    b.push_str("<div class=\"scroll\"><table id=\"packages\"><caption class=\"sr\">Every package of the run</caption><thead><tr>\
        <th scope=\"col\">package</th><th scope=\"col\">status</th><th scope=\"col\">reason</th>\
        <th scope=\"col\">agent</th><th scope=\"col\">time</th></tr></thead><tbody>");
    for p in &r.packages {
        let status = p.status.to_string();
        let hidden = (!want_status.is_empty() && status != want_status)
            || (!q.is_empty() && !p.attr.to_lowercase().contains(&q));
        b.push_str("<tr data-attr=\"");
        esc_into(&mut b, &p.attr);
        let _ = write!(
            b,
            "\" data-status=\"{status}\"{}><th scope=\"row\"><a href=\"/runs/{id}/packages/{}\">",
            if hidden { " hidden" } else { "" },
            seg(&p.attr)
        );
        esc_into(&mut b, &p.attr);
        let _ = write!(
            b,
            "</a></th><td class=\"st {}\">{status}</td><td class=\"reason\">",
            status_class(p.status)
        );
        esc_into(&mut b, &p.reason);
        b.push_str("</td><td class=\"agent\">");
        esc_into(&mut b, &p.agent);
        let _ = write!(
            b,
            "</td><td class=\"time\">{}</td></tr>",
            duration(p.duration_ms as i64)
        );
    }
    b.push_str("</tbody></table></div>");
    if !r.repository.is_empty() {
        b.push_str("<h2>Repository</h2><ul class=\"repository\" id=\"repository\">");
        for c in &r.repository {
            let _ = write!(
                b,
                "<li class=\"{}\"><code>{}</code>: {}</li>",
                if c.ok { "ok" } else { "bad" },
                esc(&c.name),
                if c.ok {
                    "ok".to_string()
                } else {
                    esc(&c.message)
                }
            );
        }
        b.push_str("</ul>");
    }
    b.push_str("</div>");
    layout(&format!("run {}", r.run_id), &b)
}

pub async fn package(
    State(web): State<Shared>,
    Path((id, attr)): Path<(String, String)>,
) -> Result<Html<String>, WebError> {
    let id = run_id(&id, false)?.to_string();
    let e = web.engine.clone();
    let r = blocking(move || e.report_with_fixes(&id))
        .await
        .map_err(WebError::page)?;
    let Some(p) = r.packages.iter().find(|p| p.attr == attr) else {
        return Err(WebError {
            status: StatusCode::NOT_FOUND,
            message: format!("run {} has no package {attr:?}", r.run_id),
            json: false,
        });
    };
    let rid = esc(&r.run_id);
    let mut b = String::new();
    let _ = write!(
        b,
        "<p><a href=\"/runs/{rid}\">← run {rid}</a></p><h1>{}</h1>\
         <dl class=\"facts\"><dt>status</dt><dd class=\"st {}\" id=\"pkg-status\">{}</dd>\
         <dt>reason</dt><dd>{}</dd><dt>agent</dt><dd>{}</dd><dt>time</dt><dd>{}</dd>\
         <dt>version</dt><dd>{}</dd><dt>defined at</dt><dd><code>{}</code></dd>\
         <dt>source revision</dt><dd><code>{}</code> ({})</dd>\
         <dt>derivation</dt><dd><code>{}</code></dd><dt>smoke test</dt><dd>{}</dd>",
        esc(&p.attr),
        status_class(p.status),
        p.status,
        esc(&p.reason),
        esc(&p.agent),
        duration(p.duration_ms as i64),
        esc(&p.version),
        esc(&p.position),
        esc(&p.rev),
        if p.pinned { "pinned" } else { "not pinned" },
        esc(p.drv_path.as_ref().map_or("", |d| d.as_str())),
        p.smoke,
    );
    for (name, path) in &p.outputs {
        let _ = write!(
            b,
            "<dt>output {}</dt><dd><code>{}</code></dd>",
            esc(name),
            esc(path.as_str())
        );
    }
    b.push_str("</dl>");
    if !p.hash_mismatches.is_empty() {
        b.push_str("<h2>Hash mismatches</h2><div class=\"scroll\"><table><thead><tr><th scope=\"col\">fixed-output derivation</th><th scope=\"col\">specified</th><th scope=\"col\">got</th></tr></thead><tbody>");
        for m in &p.hash_mismatches {
            let _ = write!(
                b,
                "<tr><td><code>{}</code></td><td><code>{}</code></td><td><code>{}</code></td></tr>",
                esc(&m.fod_drv),
                esc(&m.specified),
                esc(&m.got)
            );
        }
        b.push_str("</tbody></table></div>");
    }
    if !p.hash_fixes.is_empty() {
        b.push_str("<h2>Fixes</h2><ul class=\"fixes\">");
        for f in &p.hash_fixes {
            let _ = write!(
                b,
                "<li><code>{}:{}</code> <code>{}</code>: <code>{}</code> → <code>{}</code></li>",
                esc(&f.file),
                f.line,
                esc(&f.attribute),
                esc(&f.was()),
                esc(&f.new)
            );
        }
        let _ = write!(
            b,
            "</ul><p><a href=\"/runs/{rid}/fix.patch\" download>Download the run's fix.patch</a></p>"
        );
    }
    b.push_str("<h2>Log tail</h2>");
    if p.log_tail.is_empty() {
        b.push_str("<p>No log kept for this package.</p>");
    } else {
        let _ = write!(
            b,
            "<pre class=\"log\" id=\"log\">{}</pre>",
            esc(&p.log_tail)
        );
    }
    Ok(Html(layout(&p.attr, &b)))
}

pub async fn agents(State(web): State<Shared>) -> Html<String> {
    let agents = web.engine.list_agents();
    let waiting = web.engine.waiting_jobs();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let mut b = String::from(
        "<h1>Agents</h1><div class=\"scroll\"><table id=\"agents\"><caption class=\"sr\">Agents of the farm</caption><thead><tr>\
         <th scope=\"col\">agent</th><th scope=\"col\">connected</th><th scope=\"col\">taking jobs</th>\
         <th scope=\"col\">building</th><th scope=\"col\">jobs</th><th scope=\"col\">last heard from</th>\
         <th scope=\"col\">systems</th><th scope=\"col\">nix</th></tr></thead><tbody>",
    );
    for a in &agents {
        let taking = if !a.connected {
            "—".to_string()
        } else if a.draining {
            "no: draining".to_string()
        } else if !a.paused.is_empty() {
            format!("no: {}", esc(&a.paused))
        } else {
            "yes".to_string()
        };
        let building: Vec<String> = a
            .building
            .iter()
            .map(|d| esc(crate::model::store_name(d)))
            .collect();
        let _ = write!(
            b,
            "<tr data-agent=\"{name}\"><th scope=\"row\">{name}</th><td>{conn}</td><td>{taking}</td><td>{building}</td>\
             <td>{n}/{max}</td><td>{seen}s ago</td><td>{systems}</td><td>{nix}</td></tr>",
            name = esc(&a.name),
            conn = if a.connected { "yes" } else { "no" },
            building = building.join(", "),
            n = a.building.len(),
            max = a.max_jobs,
            seen = (now - a.last_seen_ms).max(0) / 1000,
            systems = esc(&a.systems.join(" ")),
            nix = esc(&a.nix_version),
        );
    }
    b.push_str("</tbody></table></div>");
    if !waiting.is_empty() {
        b.push_str("<h2>Waiting jobs</h2><ul>");
        for (reason, jobs, example) in &waiting {
            let _ = write!(
                b,
                "<li>{jobs}: {} (e.g. <code>{}</code>)</li>",
                esc(reason),
                esc(example)
            );
        }
        b.push_str("</ul>");
    }
    Html(layout("agents", &b))
}

#[derive(Deserialize)]
pub struct CompareQuery {
    runs: String,
}

/// Most runs side by side on one page.
const MAX_COMPARED: usize = 16;

/// Several runs side by side (a `--matrix`, or any runs of one repository): every package
/// by run, the rows whose status differs marked.
pub async fn compare(
    State(web): State<Shared>,
    Query(q): Query<CompareQuery>,
) -> Result<Html<String>, WebError> {
    let ids: Vec<String> = q
        .runs
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    if ids.is_empty() || ids.len() > MAX_COMPARED {
        return Err(WebError::bad_request(
            format!("compare 1 to {MAX_COMPARED} runs: /compare?runs=RUN1,RUN2"),
            false,
        ));
    }
    for id in &ids {
        run_id(id, false)?;
    }
    let e = web.engine.clone();
    let reports = blocking(move || {
        ids.iter()
            .map(|id| e.report(id))
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(WebError::page)?;
    let attrs: std::collections::BTreeSet<&str> = reports
        .iter()
        .flat_map(|r| r.packages.iter().map(|p| p.attr.as_str()))
        .collect();
    let mut b = String::from(
        "<h1>Runs side by side</h1><div class=\"scroll\"><table id=\"compare\"><thead><tr><th scope=\"col\">package</th>",
    );
    for r in &reports {
        let _ = write!(
            b,
            "<th scope=\"col\"><a href=\"/runs/{id}\">{id}</a><br><small>{} · {:.1}%</small></th>",
            esc(&r.label),
            r.summary.percent,
            id = esc(&r.run_id)
        );
    }
    b.push_str("<th scope=\"col\">differs</th></tr></thead><tbody>");
    for attr in attrs {
        let statuses: Vec<Option<PackageStatus>> = reports
            .iter()
            .map(|r| r.packages.iter().find(|p| p.attr == attr).map(|p| p.status))
            .collect();
        let differs = statuses.iter().any(|s| *s != statuses[0]);
        let _ = write!(
            b,
            "<tr data-attr=\"{a}\"{}><th scope=\"row\">{a}</th>",
            if differs { " class=\"differs\"" } else { "" },
            a = esc(attr)
        );
        for s in &statuses {
            match s {
                Some(s) => {
                    let _ = write!(b, "<td class=\"st {}\">{s}</td>", status_class(*s));
                }
                None => b.push_str("<td>-</td>"),
            }
        }
        let _ = write!(b, "<td>{}</td></tr>", if differs { "yes" } else { "" });
    }
    b.push_str("</tbody></table></div>");
    Ok(Html(layout("compare", &b)))
}

#[derive(Deserialize)]
pub struct CancelForm {
    csrf: String,
}

/// Cancels a run from its page: only when the coordinator allows it, with the form's CSRF
/// token, and from this site (a browser's Origin, when it sends one, must be this host).
pub async fn cancel(
    State(web): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    axum::Form(form): axum::Form<CancelForm>,
) -> Response {
    let id = match run_id(&id, false) {
        Ok(id) => id.to_string(),
        Err(e) => return e.into_response(),
    };
    if !web.cfg.allow_cancel {
        return forbidden("this coordinator's web UI is read-only ([http] allow_cancel)");
    }
    let same_origin = match (
        headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()),
        headers.get(header::HOST).and_then(|v| v.to_str().ok()),
    ) {
        (None, _) => true,
        (Some(o), Some(h)) => o == format!("http://{h}") || o == format!("https://{h}"),
        (Some(_), None) => false,
    };
    let csrf_ok = crate::engine::constant_time_eq(form.csrf.as_bytes(), web.csrf(&id).as_bytes());
    if !same_origin || !csrf_ok {
        return forbidden("the form is stale or from another site; reload the run's page");
    }
    let e = web.engine.clone();
    let run = id.clone();
    match blocking(move || e.cancel(&run)).await {
        Ok(_) => Redirect::to(&format!("/runs/{id}")).into_response(),
        Err(e) => WebError::page(e).into_response(),
    }
}

fn forbidden(why: &str) -> Response {
    WebError {
        status: StatusCode::FORBIDDEN,
        message: why.to_string(),
        json: false,
    }
    .into_response()
}
