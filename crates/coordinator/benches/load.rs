//! Load test: one coordinator (real gRPC on loopback, SQLite on disk) and 200 simulated
//! agents, each on its own bidirectional stream, answering every job at once; a run of
//! 10,000 packages whose derivations form a DAG. Prints the wall time from submit to the
//! end of the run, jobs per second, and peak memory (coordinator and agents share this
//! process, so the figure bounds the coordinator's).
//!
//! The web UI is measured on the same run: a live page (its Server-Sent Events stream) is
//! open from the submit on, and the time from an agent sending a package's result to the
//! page receiving that package's new row is the event latency (target < 500 ms); the run's
//! page of 10,000 packages is then rendered (target < 1 s).
//!
//! cargo bench -p nixfarm-coordinator --bench load [-- AGENTS PACKAGES]

use nixfarm_coordinator::Config;
use nixfarm_coordinator::clock::SystemClock;
use nixfarm_proto::v1 as pb;
use pb::agent_message::Msg;
use pb::coordinator_message::Msg as CMsg;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

fn drv(i: usize) -> String {
    format!("/nix/store/{i:0>32}-p{i}.drv")
}

fn out(i: usize) -> String {
    format!("/nix/store/{i:0>31}c-p{i}")
}

/// Inputs of package i: a nixpkgs-like fan-in to low-numbered, heavily shared packages.
fn deps(i: usize) -> Vec<usize> {
    let mut d = Vec::new();
    if i > 0 {
        d.push(i / 2);
    }
    if i > 2 {
        d.push(i / 3);
    }
    if i % 50 == 49 {
        d.push(i - 1);
    }
    d.sort();
    d.dedup();
    d
}

/// When each package's build result was sent, by package index.
type Sent = Arc<Mutex<HashMap<usize, Instant>>>;

async fn agent(url: String, name: String, packages: usize, jobs: Arc<AtomicU64>, sent: Sent) {
    let Ok(mut client) = pb::agent_service_client::AgentServiceClient::connect(url).await else {
        eprintln!("{name}: cannot connect");
        return;
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::AgentMessage>(64);
    let _ = tx
        .send(pb::AgentMessage {
            msg: Some(Msg::Register(pb::Register {
                name: name.clone(),
                systems: vec!["x86_64-linux".into()],
                features: vec![],
                max_jobs: 4,
                nix_version: "nix (Nix) 2.8.0".into(),
                running_attempts: vec![],
                session_key: String::new(),
                holds_outputs: true,
                holds_in_builder_store: true,
                takes_farm_cache_token: true,
                run_caches: vec![],
            })),
        })
        .await;
    let Ok(resp) = client
        .connect_agent(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    else {
        eprintln!("{name}: stream refused");
        return;
    };
    let mut inbound = resp.into_inner();
    while let Ok(Some(m)) = inbound.message().await {
        let Some(CMsg::Assign(a)) = m.msg else {
            continue;
        };
        jobs.fetch_add(1, Ordering::Relaxed);
        let reply = match a.job {
            Some(pb::assignment::Job::EvalList(_)) => Msg::EvalList(pb::EvalListResult {
                attempt_id: a.attempt_id,
                attrs: (0..packages).map(|i| format!("p{i}")).collect(),
                ..Default::default()
            }),
            Some(pb::assignment::Job::EvalChunk(c)) => {
                let idx: Vec<usize> = c
                    .attrs
                    .iter()
                    .filter_map(|a| a.trim_start_matches('p').parse().ok())
                    .collect();
                Msg::EvalChunk(pb::EvalChunkResult {
                    attempt_id: a.attempt_id,
                    attrs: idx
                        .iter()
                        .map(|&i| pb::EvaluatedAttr {
                            attr: format!("p{i}"),
                            drv_path: drv(i),
                            outputs: vec![pb::DrvOutput {
                                name: "out".into(),
                                path: out(i),
                                ..Default::default()
                            }],
                            pname: format!("p{i}"),
                            version: "1".into(),
                            system: "x86_64-linux".into(),
                            ..Default::default()
                        })
                        .collect(),
                    drvs: idx
                        .iter()
                        .map(|&i| pb::DrvNode {
                            drv_path: drv(i),
                            system: "x86_64-linux".into(),
                            outputs: vec![pb::DrvOutput {
                                name: "out".into(),
                                path: out(i),
                                ..Default::default()
                            }],
                            input_drvs: deps(i).into_iter().map(drv).collect(),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                })
            }
            Some(pb::assignment::Job::Build(b)) => {
                let i: usize = b
                    .drv_path
                    .rsplit("-p")
                    .next()
                    .and_then(|s| s.trim_end_matches(".drv").parse().ok())
                    .unwrap_or(0);
                if let Ok(mut m) = sent.lock() {
                    m.entry(i).or_insert_with(Instant::now);
                }
                Msg::Build(pb::BuildResult {
                    attempt_id: a.attempt_id,
                    status: pb::BuildStatus::Built as i32,
                    outputs: vec![pb::DrvOutput {
                        name: "out".into(),
                        path: out(i),
                        ..Default::default()
                    }],
                    duration_ms: 1,
                    ..Default::default()
                })
            }
            None => continue,
        };
        if tx
            .send(pb::AgentMessage { msg: Some(reply) })
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Follows a run's live page stream (as the page's script does) and records when each
/// package was first shown ready.
async fn live_page(http: std::net::SocketAddr, run: String) -> HashMap<String, Instant> {
    let mut shown = HashMap::new();
    let Ok(mut s) = tokio::net::TcpStream::connect(http).await else {
        return shown;
    };
    // HTTP/1.0: the stream comes unchunked and ends with the connection.
    let req = format!("GET /api/runs/{run}/live HTTP/1.0\r\nHost: {http}\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return shown;
    }
    let mut r = tokio::io::BufReader::new(s);
    let mut line = String::new();
    while r.read_line(&mut line).await.unwrap_or(0) > 0 {
        let now = Instant::now();
        if let Some(data) = line.strip_prefix("data: ")
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(data)
        {
            for row in v["rows"].as_array().into_iter().flatten() {
                if row["status"] == nixfarm_core::PackageStatus::Ready.as_str()
                    && let Some(a) = row["attr"].as_str()
                {
                    shown.entry(a.to_string()).or_insert(now);
                }
            }
        }
        if line.starts_with("event: end") {
            break;
        }
        line.clear();
    }
    shown
}

/// GET `path`; (milliseconds to the last byte, body bytes).
async fn get_timed(http: std::net::SocketAddr, path: &str) -> (f64, usize) {
    let t = Instant::now();
    let Ok(mut s) = tokio::net::TcpStream::connect(http).await else {
        return (f64::NAN, 0);
    };
    let req = format!("GET {path} HTTP/1.0\r\nHost: {http}\r\n\r\n");
    let _ = s.write_all(req.as_bytes()).await;
    let mut body = Vec::new();
    let _ = s.read_to_end(&mut body).await;
    (t.elapsed().as_secs_f64() * 1000.0, body.len())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn peak_rss_mb() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let agents: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(200);
    let packages: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let dir = tempfile::tempdir()?;
    let mut config = Config {
        listen: "127.0.0.1:0".into(),
        state_dir: dir.path().to_path_buf(),
        ..Default::default()
    };
    config.scheduler.eval_chunk_size = 100;
    config.http.listen = Some("127.0.0.1:0".into());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let running = nixfarm_coordinator::server::start_with_listener(
        &config,
        listener,
        Arc::new(SystemClock::new()),
    )
    .await?;
    let url = format!("http://{}", running.addr);
    let http = running.http_addr.expect("the web UI listens");
    let jobs = Arc::new(AtomicU64::new(0));
    let sent: Sent = Arc::default();
    for i in 0..agents {
        tokio::spawn(agent(
            url.clone(),
            format!("sim-{i}"),
            packages,
            jobs.clone(),
            sent.clone(),
        ));
    }
    let mut client = pb::run_service_client::RunServiceClient::connect(url.clone()).await?;
    // Every agent registered before the clock starts.
    loop {
        let n = client
            .list_agents(pb::ListAgentsRequest {})
            .await?
            .into_inner()
            .agents
            .iter()
            .filter(|a| a.connected)
            .count();
        if n >= agents {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let start = Instant::now();
    let run = client
        .submit_run(pb::SubmitRunRequest {
            source: Some(pb::Source {
                kind: Some(pb::source::Kind::FlakeRef("github:bench/load".into())),
            }),
            attr_path: "packages.x86_64-linux".into(),
            label: "load".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .run_id;
    let page = tokio::spawn(live_page(http, run.clone()));
    let mut events = client
        .watch_run(pb::WatchRunRequest {
            run_id: run.clone(),
            after_seq: 0,
        })
        .await?
        .into_inner();
    let mut seen = 0u64;
    // When the watcher (as `nixfarm watch` does) heard of each package's build finishing.
    let mut heard: HashMap<usize, Instant> = HashMap::new();
    while let Some(e) = events.message().await? {
        seen += 1;
        if let Ok(nixfarm_core::RunEvent::JobFinished { name, .. }) =
            nixfarm_core::RunEvent::from_parts(&e.kind, &e.json)
            && let Ok(i) = name.trim_start_matches('p').parse::<usize>()
        {
            heard.entry(i).or_insert_with(Instant::now);
        }
        if nixfarm_core::RunEvent::is_terminal_kind(&e.kind) {
            break;
        }
    }
    let elapsed = start.elapsed();
    let shown = tokio::time::timeout(Duration::from_secs(60), page)
        .await
        .ok()
        .and_then(|r| r.ok())
        .unwrap_or_default();
    let mut latencies: Vec<f64> = {
        let sent = sent.lock().map(|m| m.clone()).unwrap_or_default();
        shown
            .iter()
            .filter_map(|(attr, at)| {
                let i: usize = attr.trim_start_matches('p').parse().ok()?;
                Some(at.saturating_duration_since(*sent.get(&i)?).as_secs_f64() * 1000.0)
            })
            .collect()
    };
    latencies.sort_by(f64::total_cmp);
    let mut event_lat: Vec<f64> = {
        let sent = sent.lock().map(|m| m.clone()).unwrap_or_default();
        heard
            .iter()
            .filter_map(|(i, at)| {
                Some(at.saturating_duration_since(*sent.get(i)?).as_secs_f64() * 1000.0)
            })
            .collect()
    };
    event_lat.sort_by(f64::total_cmp);
    let mut renders = Vec::new();
    let mut page_bytes = 0;
    for _ in 0..5 {
        let (ms, bytes) = get_timed(http, &format!("/runs/{run}")).await;
        renders.push(ms);
        page_bytes = bytes;
    }
    renders.sort_by(f64::total_cmp);
    let (api_ms, _) = get_timed(http, &format!("/api/runs/{run}")).await;
    // Wire types become the domain's at the edge: states compared as enums, not strings.
    let report = nixfarm_core::report::Report::try_from(
        client
            .get_report(pb::GetReportRequest {
                run_id: run,
                ..Default::default()
            })
            .await?
            .into_inner(),
    )
    .map_err(|e| anyhow::anyhow!("the coordinator's report: {e}"))?;
    let ready = report
        .packages
        .iter()
        .filter(|p| p.status() == nixfarm_core::PackageStatus::Ready)
        .count();
    let n = jobs.load(Ordering::Relaxed);
    println!("load test: {agents} agents (gRPC streams), {packages} packages, one coordinator");
    println!(
        "  run state {}: {ready}/{} ready",
        report.state,
        report.packages.len()
    );
    println!(
        "  {n} jobs (eval + build) in {:.2} s: {:.0} jobs/s; {seen} events streamed to the watcher",
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64()
    );
    println!(
        "  peak memory of the process (coordinator + simulated agents): {:.0} MB",
        peak_rss_mb()
    );
    println!(
        "  web: the run's page ({packages} packages, {:.1} MB) in {:.0} ms (median of 5; target < 1000 ms); its JSON report in {api_ms:.0} ms",
        page_bytes as f64 / 1e6,
        percentile(&renders, 0.5)
    );
    println!(
        "  web: result sent -> row shown ready on an open page, {} packages: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (target < 500 ms)",
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "  (for comparison, result sent -> its event at a gRPC watcher: p50 {:.0} ms, p99 {:.0} ms)",
        percentile(&event_lat, 0.5),
        percentile(&event_lat, 0.99)
    );
    running.stop().await;
    // Run in CI too (scripts/test): a lost or repeated result fails it, whatever the speed.
    if report.state != nixfarm_core::RunState::Finished
        || ready != packages
        || report.packages.len() != packages
    {
        anyhow::bail!(
            "the load run ended {} with {ready}/{} of {packages} packages ready",
            report.state,
            report.packages.len()
        );
    }
    Ok(())
}
