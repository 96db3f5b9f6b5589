//! The nixfarm agent: dials the coordinator over one gRPC stream, advertises what it can
//! build, and runs evaluation and build jobs with real Nix as child processes.
//!
//! The agent never stops a build because the coordinator went away: results are kept and
//! delivered again after every reconnect (the coordinator ignores duplicates by attempt id).

pub mod config;
mod farm;
mod jobs;
pub mod roots;
mod tls_hint;
use tls_hint::tls_hint;

pub use config::AgentConfig;

use anyhow::Context;
use nixfarm_nix::Nix;
use nixfarm_proto::v1 as pb;
use nixfarm_proto::v1::agent_service_client::AgentServiceClient;
use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub(crate) use farm::FarmCacheUse;

/// How long a delivered result is kept to be sent again after a reconnect.
const REDELIVER_FOR: Duration = Duration::from_secs(600);

/// After a job ran out of disk space, how long the agent takes no new jobs (the failed
/// build's files are gone at once, so free space alone would call it healthy again).
pub(crate) const DISK_FULL_PAUSE: Duration = Duration::from_secs(60);

/// Where Nix keeps store paths (builds fill this file system).
const STORE_DIR: &str = "/nix/store";

/// Shared state of one agent process.
pub(crate) struct Shared {
    pub cfg: AgentConfig,
    pub nix: Nix,
    pub running: Mutex<HashMap<String, CancellationToken>>,
    /// Serialises snapshot downloads so two jobs do not unpack the same source at once.
    pub source_lock: tokio::sync::Mutex<()>,
    pub token: Option<String>,
    /// One pusher per cache URL, created on first use.
    pub pushers: tokio::sync::Mutex<HashMap<String, Arc<nixfarm_store::Pusher>>>,
    /// Cache credentials: they stay on this host and are never sent or logged.
    pub creds: config::CacheCredentials,
    /// Set when a job ran out of disk space: no new jobs until then.
    pub disk_full_until: Mutex<Option<Instant>>,
    /// The secret of the current registration (proves reconnects and upload claims).
    pub session: Mutex<String>,
    /// The coordinator's snapshot limits, as it last told them.
    pub snapshot_limits: Mutex<nixfarm_core::snapshot::Limits>,
    /// Runs whose sources are unpacked here, least recently used first.
    pub run_sources: Mutex<VecDeque<String>>,
    /// Jobs going on here, by run: a run's unpacked source is not swept while it has one.
    pub runs_in_use: Mutex<HashMap<String, usize>>,
    /// GC roots of what each run still needs.
    pub roots: roots::Roots,
    /// The coordinator's farm cache, as its last registration said.
    pub farm_cache: Mutex<Option<FarmCacheUse>>,
    /// Output paths being built here.
    pub output_locks: jobs::output_locks::OutputLocks,
    /// Set once the store has been opened ([`Shared::store_opened`]).
    pub store_open: tokio::sync::OnceCell<()>,
    /// Flakes (with their overrides) whose inputs were checked here lately.
    pub checked_flakes: Mutex<VecDeque<String>>,
}

/// Longest a job waits for the store to be opened ([`Shared::store_opened`]).
const STORE_OPEN_WAIT: Duration = Duration::from_secs(60);

impl Shared {
    /// Waits until the store has been opened once: a fresh store gets its database before a
    /// job's Nix processes start together (Nix 2.8 racing to create it says the schema "is
    /// corrupt"). The agent opens it while it connects; a job that comes first waits.
    pub(crate) async fn store_opened(&self) {
        self.store_open
            .get_or_init(|| async {
                // A store that does not answer in a minute is left to the jobs' own Nix
                // processes to report; no job waits on it for ever.
                let opened = tokio::time::timeout(STORE_OPEN_WAIT, self.nix.open_store()).await;
                match opened {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!("{e}"),
                    Err(_) => tracing::warn!(
                        "the store did not open within {} s; jobs go on without waiting",
                        STORE_OPEN_WAIT.as_secs()
                    ),
                }
            })
            .await;
    }
}

/// The host part of a coordinator URL (`http://farm:7420` → `farm`, `[::1]` kept whole).
fn url_host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    if authority.starts_with('[') {
        return authority
            .split_once(']')
            .map_or(authority, |(h, _)| &authority[..h.len() + 1]);
    }
    authority.split(':').next().unwrap_or(authority)
}

/// Why this agent takes no new jobs now; empty when it takes them.
fn pause_reason(shared: &Shared) -> String {
    if let Ok(until) = shared.disk_full_until.lock()
        && let Some(t) = *until
        && t > Instant::now()
    {
        // No countdown: the reason is compared and logged when it changes.
        return format!(
            "a job ran out of disk space in {STORE_DIR}; no new jobs for {} s after it",
            DISK_FULL_PAUSE.as_secs()
        );
    }
    let min = shared.cfg.min_free_mib;
    match nixfarm_nix::room::free_mib(Path::new(STORE_DIR)) {
        Some(free) if min > 0 && free < min => {
            format!("only {free} MiB free in {STORE_DIR} (min_free_mib = {min})")
        }
        _ => String::new(),
    }
}

/// An agent, ready to run.
pub struct Agent {
    shared: Arc<Shared>,
}

impl Agent {
    pub fn new(cfg: AgentConfig) -> anyhow::Result<Agent> {
        cfg.validate()?;
        let token = cfg.token()?;
        nixfarm_proto::client::guard_clear_text(
            &cfg.coordinator,
            token.is_some(),
            cfg.allow_plain_http,
            "join token",
            "--allow-plain-http, NIXFARM_ALLOW_PLAIN_HTTP=1 or `allow_plain_http = true` in the agent config",
        )?;
        let cfg_creds = cfg.cache_credentials()?;
        std::fs::create_dir_all(&cfg.work_dir)
            .with_context(|| format!("cannot create work dir {}", cfg.work_dir.display()))?;
        // Sources of an earlier process: every run unpacks its own again.
        let sources = cfg.work_dir.join("sources");
        nixfarm_core::snapshot::remove_tree(&sources)
            .with_context(|| format!("cannot clear {}", sources.display()))?;
        let roots = roots::Roots::new(
            cfg.gc_roots_dir
                .clone()
                .unwrap_or_else(|| roots::Roots::default_dir(&cfg.name)),
        );
        let mut nix = Nix::default();
        nix.nix = cfg.nix_bin.join("nix");
        nix.nix_store = cfg.nix_bin.join("nix-store");
        nix.eval_deadline = Duration::from_secs(cfg.eval_timeout_secs);
        // It refuses indirect references (`flake:nixpkgs`) unless local ones are allowed.
        nix.no_flake_registry = !cfg.allow_local_flake_refs;
        let isolation = cfg.isolation()?;
        // The builds fetch from the farm cache with its netrc.
        let readable = [cfg.farm_cache_dir()];
        let mut nix = nix
            .with_declining_hook(&cfg.work_dir)
            .with_build_isolation(isolation.as_ref(), &readable)
            .with_daemon(&cfg.work_dir);
        if isolation.is_some() {
            let cache = cfg.work_dir.join("eval-cache");
            std::fs::create_dir_all(&cache)
                .with_context(|| format!("cannot create {}", cache.display()))?;
            nix.eval_cache_home = Some(cache);
        }
        nix.isolation = isolation;
        Ok(Agent {
            shared: Arc::new(Shared {
                cfg,
                nix,
                running: Mutex::new(HashMap::new()),
                source_lock: tokio::sync::Mutex::new(()),
                token,
                pushers: tokio::sync::Mutex::new(HashMap::new()),
                creds: cfg_creds,
                disk_full_until: Mutex::new(None),
                session: Mutex::new(String::new()),
                snapshot_limits: Mutex::new(nixfarm_core::snapshot::Limits::default()),
                run_sources: Mutex::new(VecDeque::new()),
                runs_in_use: Mutex::new(HashMap::new()),
                roots,
                farm_cache: Mutex::new(None),
                output_locks: Default::default(),
                store_open: tokio::sync::OnceCell::new(),
                checked_flakes: Mutex::new(VecDeque::new()),
            }),
        })
    }

    /// Runs until `shutdown` is cancelled: then it takes no new jobs, lets running ones
    /// finish (up to the drain deadline), delivers their results and returns.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let r = self.serve(shutdown).await;
        // Evaluations cancelled by the drain get their grace (SIGTERM, then SIGKILL after
        // 5 s) even when the caller's runtime ends as soon as this returns.
        nixfarm_nix::let_stopping_children_finish(Duration::from_secs(6)).await;
        r
    }

    async fn serve(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let shared = self.shared;
        // The store is opened while the agent asks Nix's version and connects; jobs wait for
        // it (`Shared::store_opened`).
        let opening = {
            let shared = shared.clone();
            tokio::spawn(async move { shared.store_opened().await })
        };
        let nix_version = shared.nix.version().await.unwrap_or_default();
        if nix_version.is_empty() {
            opening.abort();
            anyhow::bail!(
                "cannot run '{}': is Nix installed?",
                shared.nix.nix.display()
            );
        }
        let (results_tx, mut results_rx) = mpsc::unbounded_channel::<pb::AgentMessage>();
        let (log_tx, mut log_rx) = mpsc::channel::<pb::AgentMessage>(256);
        let mut recent: VecDeque<(Instant, pb::AgentMessage)> = VecDeque::new();
        let mut backoff = Duration::from_millis(200);
        let mut draining = false;
        let mut drain_deadline: Option<tokio::time::Instant> = None;
        loop {
            if draining && running_count(&shared) == 0 && results_rx.is_empty() {
                return Ok(());
            }
            let endpoint = nixfarm_proto::client::endpoint(
                &shared.cfg.coordinator,
                &nixfarm_proto::client::TlsFiles {
                    ca_file: shared.cfg.tls_ca_file.as_deref(),
                    cert_file: shared.cfg.tls_cert_file.as_deref(),
                    key_file: shared.cfg.tls_key_file.as_deref(),
                },
            )?
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true);
            let channel = match endpoint.connect().await {
                Ok(c) => c,
                Err(e) => {
                    let why = nixfarm_logs::error_chain(&e);
                    tracing::warn!(
                        "cannot reach coordinator {}: {why}{}; retrying in {:?}",
                        shared.cfg.coordinator,
                        tls_hint(&why),
                        backoff
                    );
                    if wait_or_shutdown(&shutdown, jitter(backoff)).await
                        && running_count(&shared) == 0
                    {
                        return Ok(());
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(15));
                    continue;
                }
            };
            let (out_tx, out_rx) = mpsc::channel::<pb::AgentMessage>(1024);
            // Results that finished while disconnected join the redelivery list, and their
            // attempts count as held: the coordinator keeps them instead of giving them up.
            while let Ok(r) = results_rx.try_recv() {
                recent.push_back((Instant::now(), r));
            }
            let mut running: Vec<String> = shared
                .running
                .lock()
                .map(|r| r.keys().cloned().collect())
                .unwrap_or_default();
            running.extend(recent.iter().filter_map(|(_, m)| jobs::result_attempt(m)));
            running.sort();
            running.dedup();
            let register = pb::AgentMessage {
                msg: Some(pb::agent_message::Msg::Register(pb::Register {
                    name: shared.cfg.name.clone(),
                    systems: shared.cfg.systems.clone(),
                    features: shared.cfg.features.clone(),
                    max_jobs: if draining { 1 } else { shared.cfg.max_jobs },
                    nix_version: nix_version.clone(),
                    running_attempts: running,
                    session_key: shared.session.lock().map(|s| s.clone()).unwrap_or_default(),
                    holds_outputs: true,
                    holds_in_builder_store: true,
                    takes_farm_cache_token: true,
                    run_caches: shared.cfg.run_caches.clone(),
                })),
            };
            let _ = out_tx.send(register).await;
            let mut client = AgentServiceClient::new(channel.clone())
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20);
            let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(out_rx));
            add_token(&mut req, &shared.token);
            let mut inbound = match client.connect_agent(req).await {
                Ok(r) => r.into_inner(),
                Err(status) => {
                    // Refusals that no retry changes (a wrong token, a revoked certificate,
                    // a bad registration): said, and the agent stops.
                    if status.code() == tonic::Code::Unauthenticated
                        || status.code() == tonic::Code::PermissionDenied
                        || status.code() == tonic::Code::InvalidArgument
                    {
                        anyhow::bail!("the coordinator refused this agent: {}", status.message());
                    }
                    if status.code() == tonic::Code::AlreadyExists {
                        // Another agent has the name, or the coordinator has not yet seen our
                        // own old stream end: try again later, loudly.
                        tracing::error!("the coordinator refused this agent: {}", status.message());
                        backoff = Duration::from_secs(15);
                    }
                    let why = nixfarm_logs::error_chain(&status);
                    match tls_hint(&why) {
                        "" => tracing::warn!("coordinator refused the stream: {why}; retrying"),
                        hint => {
                            tracing::error!("coordinator refused the stream: {why}{hint}; retrying")
                        }
                    }
                    if wait_or_shutdown(&shutdown, jitter(backoff)).await
                        && running_count(&shared) == 0
                    {
                        return Ok(());
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(15));
                    continue;
                }
            };
            // Results from before a reconnect go out again; duplicates are ignored upstream.
            recent.retain(|(t, _)| t.elapsed() < REDELIVER_FOR);
            for (_, m) in &recent {
                let _ = out_tx.send(m.clone()).await;
            }
            let mut heartbeat = tokio::time::interval(Duration::from_secs(5));
            let mut paused = String::new();
            let connected_at = Instant::now();
            let reason: String = loop {
                tokio::select! {
                    m = inbound.message() => match m {
                        Ok(Some(msg)) => {
                            if let Some(pb::coordinator_message::Msg::Registered(r)) = &msg.msg {
                                tracing::info!(agent = r.agent_id, "registered with coordinator");
                                if let Ok(mut s) = shared.session.lock() {
                                    s.clone_from(&r.session_key);
                                }
                                let farm = farm::farm_cache_use(&shared, r);
                                // A new token (a restarted coordinator issued it): pushes
                                // to the farm cache show it from now on.
                                let changed = match shared.farm_cache.lock() {
                                    Ok(mut f) => {
                                        let old = f.as_ref().map(|f| (f.url.clone(), f.token.clone()));
                                        let new = farm.as_ref().map(|f| (f.url.clone(), f.token.clone()));
                                        *f = farm;
                                        (old != new).then_some(old).flatten()
                                    }
                                    Err(_) => None,
                                };
                                if let Some((url, _)) = changed {
                                    shared.pushers.lock().await.remove(&url);
                                }
                                // Runs that ended while this agent was away: drop their roots.
                                let active: std::collections::HashSet<String> =
                                    r.active_runs.iter().cloned().collect();
                                shared.roots.release_all_but(&active);
                                if let Some(l) = r.limits
                                    && let Ok(mut mine) = shared.snapshot_limits.lock()
                                {
                                    *mine = nixfarm_core::snapshot::Limits::from_coordinator(
                                        l.snapshot_max_bytes,
                                        l.snapshot_max_files,
                                    );
                                }
                                backoff = Duration::from_millis(200);
                                if r.heartbeat_interval_ms > 0 {
                                    heartbeat = tokio::time::interval(Duration::from_millis(r.heartbeat_interval_ms as u64));
                                }
                                continue;
                            }
                            let refuse = draining || !pause_reason(&shared).is_empty();
                            handle(&shared, &channel, msg, refuse, &results_tx, &log_tx);
                        }
                        Ok(None) => break "the coordinator closed the stream".to_string(),
                        Err(e) => break format!("stream error: {e}"),
                    },
                    Some(r) = results_rx.recv() => {
                        // A job that made this agent pause (its disk filled up): say so before
                        // its result, so the retry is not sent straight back here.
                        let now_paused = pause_reason(&shared);
                        if now_paused != paused {
                            paused = now_paused;
                            let _ = out_tx.send(heartbeat_msg(&shared, draining, &paused)).await;
                        }
                        recent.push_back((Instant::now(), r.clone()));
                        if out_tx.send(r).await.is_err() {
                            break "the stream closed".to_string();
                        }
                        if draining && running_count(&shared) == 0 && results_rx.is_empty() {
                            // Give the stream a moment to flush the last result.
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            return Ok(());
                        }
                    }
                    Some(l) = log_rx.recv() => {
                        let _ = out_tx.try_send(l);
                    }
                    _ = heartbeat.tick() => {
                        // Draining, and what ran ended without a last message (a follow-up
                        // cancelled): done.
                        if draining && running_count(&shared) == 0 && results_rx.is_empty() {
                            return Ok(());
                        }
                        paused = pause_reason(&shared);
                        if out_tx.send(heartbeat_msg(&shared, draining, &paused)).await.is_err() {
                            break "the stream closed".to_string();
                        }
                    }
                    _ = shutdown.cancelled(), if !draining => {
                        draining = true;
                        // Tell the coordinator at once, so nothing new is sent our way.
                        let _ = out_tx.try_send(heartbeat_msg(&shared, true, &paused));
                        drain_deadline = Some(tokio::time::Instant::now() + shared.cfg.drain_timeout());
                        tracing::info!(running = running_count(&shared), "draining: no new jobs; waiting for running ones");
                        if running_count(&shared) == 0 {
                            return Ok(());
                        }
                    }
                    _ = sleep_until_opt(drain_deadline) => {
                        tracing::warn!("drain deadline passed; handing running jobs back");
                        if let Ok(r) = shared.running.lock() {
                            for t in r.values() { t.cancel(); }
                        }
                        drain_deadline = None;
                    }
                }
            };
            if connected_at.elapsed() > Duration::from_secs(10) {
                backoff = Duration::from_millis(200);
            }
            tracing::warn!(
                "lost the coordinator ({reason}); builds continue; reconnecting in about {:?}",
                backoff
            );
            let _ = wait_or_shutdown(&shutdown, jitter(backoff)).await;
            backoff = (backoff * 2).min(Duration::from_secs(15));
        }
    }
}

fn heartbeat_msg(shared: &Shared, draining: bool, paused: &str) -> pb::AgentMessage {
    let running: Vec<String> = shared
        .running
        .lock()
        .map(|r| r.keys().cloned().collect())
        .unwrap_or_default();
    pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Heartbeat(pb::Heartbeat {
            running_attempts: running,
            draining,
            paused: paused.to_string(),
        })),
    }
}

async fn sleep_until_opt(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

fn running_count(shared: &Shared) -> usize {
    shared.running.lock().map(|r| r.len()).unwrap_or(0)
}

/// Waits `d`; returns true when shutdown was requested meanwhile.
async fn wait_or_shutdown(shutdown: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => shutdown.is_cancelled(),
        _ = shutdown.cancelled() => true,
    }
}

/// Full jitter, so a restarted coordinator is not hit by every agent at once.
fn jitter(d: Duration) -> Duration {
    let ms = d.as_millis() as u64;
    Duration::from_millis(ms / 2 + fastrand::u64(0..=ms / 2 + 1))
}

pub(crate) fn add_token<T>(req: &mut tonic::Request<T>, token: &Option<String>) {
    if let Some(t) = token
        && let Ok(v) = format!("Bearer {t}").parse()
    {
        req.metadata_mut().insert("authorization", v);
    }
}

fn handle(
    shared: &Arc<Shared>,
    channel: &Channel,
    msg: pb::CoordinatorMessage,
    draining: bool,
    results: &mpsc::UnboundedSender<pb::AgentMessage>,
    logs: &mpsc::Sender<pb::AgentMessage>,
) {
    use pb::coordinator_message::Msg;
    match msg.msg {
        Some(Msg::Assign(a)) => {
            let attempt = a.attempt_id.clone();
            if draining {
                // Hand it straight back: the coordinator requeues cancelled work.
                let _ = results.send(jobs::cancelled_result(&a, "the agent is draining"));
                return;
            }
            let token = CancellationToken::new();
            {
                let Ok(mut r) = shared.running.lock() else {
                    return;
                };
                if r.contains_key(&attempt) {
                    return; // a duplicate assignment: already running
                }
                r.insert(attempt.clone(), token.clone());
            }
            let shared = shared.clone();
            let channel = channel.clone();
            let results = results.clone();
            let logs = logs.clone();
            // A build stops on a cancel itself (and says how far it got); an evaluation is
            // dropped, its Nix process killed with it.
            let is_build = matches!(a.job, Some(pb::assignment::Job::Build(_)));
            let on_cancel = (!is_build).then(|| jobs::cancelled_result(&a, "cancelled"));
            tokio::spawn(async move {
                let job = jobs::run(&shared, channel, a, token.clone(), logs);
                let (result, follow_up) = match on_cancel {
                    None => job.await,
                    Some(cancelled) => tokio::select! {
                        r = job => r,
                        _ = token.cancelled() => (cancelled, None),
                    },
                };
                // The attempt stops counting as running as its last message goes, under one
                // lock: a draining agent exits once nothing runs and no message waits.
                let done = |shared: &Shared, last: Option<pb::AgentMessage>| {
                    if let Ok(mut r) = shared.running.lock() {
                        r.remove(&attempt);
                        if let Some(m) = last {
                            let _ = results.send(m);
                        }
                    }
                };
                let Some(f) = follow_up else {
                    done(&shared, Some(result));
                    return;
                };
                let _ = results.send(result);
                // The follow-up (a listing's repository checks) is still this attempt's
                // work: it counts as running, and a cancel or a drain stops it too.
                let last = tokio::select! {
                    m = f => Some(m),
                    _ = token.cancelled() => None,
                };
                done(&shared, last);
            });
        }
        Some(Msg::Cancel(c)) => {
            if let Ok(r) = shared.running.lock()
                && let Some(t) = r.get(&c.attempt_id)
            {
                t.cancel();
            }
        }
        Some(Msg::RunEnded(e)) => {
            // Unlinking waits on the disk (ext4 may discard synchronously): off the workers.
            let shared = shared.clone();
            tokio::task::spawn_blocking(move || {
                shared.roots.release(&e.run_id);
                jobs::drop_run_sources(&shared, &e.run_id);
            });
        }
        Some(Msg::Drain(_)) | Some(Msg::Registered(_)) | None => {}
    }
}
