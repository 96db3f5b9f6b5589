//! Starting the coordinator: open the database, resume runs, serve gRPC, check leases.

use crate::clock::{Clock, SystemClock};
use crate::config::{Config, read_secret};
use crate::credentials::Credentials;
use crate::db::Db;
use crate::engine::{Engine, EngineOptions};
use crate::farm_cache::FarmCache;
use crate::interceptor::{Role, token_check};
use crate::service::{AgentSvc, FarmCacheAdvert, RunSvc};
use crate::upload::{UploadLimits, Uploads};
use anyhow::Context;
use axum::response::IntoResponse;
use nixfarm_core::snapshot;
use nixfarm_proto::v1 as pb;
use nixfarm_proto::v1::agent_service_server::AgentServiceServer;
use nixfarm_proto::v1::run_service_server::RunServiceServer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;

/// A running coordinator.
pub struct Running {
    pub addr: SocketAddr,
    /// Where `/metrics` is served, when enabled.
    pub metrics_addr: Option<SocketAddr>,
    /// Where the web UI is served, when enabled.
    pub http_addr: Option<SocketAddr>,
    /// Where the farm cache is served, when enabled.
    pub farm_cache_addr: Option<SocketAddr>,
    pub engine: Engine,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    /// Its state directory, held until it is dropped.
    _state_lock: crate::state_lock::StateLock,
}

impl Running {
    /// Stops serving and waits for the server to end.
    pub async fn stop(mut self) {
        self.stop_serving().await;
    }

    /// Stops taking calls (what is under way gets 5 s), keeping the state and its lock: the
    /// engine still answers its owner.
    pub async fn stop_serving(&mut self) {
        // Once: a finished task is not awaited again.
        let Some(tx) = self.shutdown.take() else {
            return;
        };
        let _ = tx.send(());
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
        self.task.abort();
    }

    /// Waits until the server ends (an error, or forever). One whose state store failed in
    /// the middle of a step ends with that error: started again, it goes on from its
    /// database.
    pub async fn wait(self) -> anyhow::Result<()> {
        let engine = self.engine.clone();
        tokio::select! {
            r = self.task => r?.context("gRPC server failed"),
            why = engine.halted() => Err(anyhow::anyhow!("{why}; start the coordinator again once that is mended: it goes on from its database")),
        }
    }
}

/// The agents' named tokens from `[auth] agent_tokens_file`, at start.
fn read_named(path: &std::path::Path) -> anyhow::Result<Vec<(String, String)>> {
    let text = crate::watched::read_at_most(path, crate::reloads::NAMED_FILE_MAX)
        .map_err(anyhow::Error::msg)?;
    Credentials::parse_named(&text).map_err(anyhow::Error::msg)
}

/// Starts the farm cache when the config asks for it: on its own port, beside the gRPC
/// address unless told otherwise. Beyond loopback it needs a way to admit agents only (it
/// signs what it is sent): their token, or client certificates, after which the token it
/// issues each one is what admits it.
async fn start_farm_cache(
    config: &Config,
    grpc: SocketAddr,
    agent_token: Option<Arc<Credentials>>,
    engine: &Engine,
    clock: Arc<dyn Clock>,
    revoked_agents: &[String],
) -> anyhow::Result<Option<(Arc<FarmCache>, SocketAddr)>> {
    let fc = &config.farm_cache;
    if !fc.enabled {
        return Ok(None);
    }
    let listen = fc
        .listen
        .clone()
        .unwrap_or_else(|| SocketAddr::new(grpc.ip(), 0).to_string());
    let listener = TcpListener::bind(&listen)
        .await
        .with_context(|| format!("cannot listen on {listen} for the farm cache"))?;
    let addr = listener.local_addr()?;
    // Agents admitted by a token show it; every agent, a certificate-admitted one too, is
    // issued one of the farm cache's own at registration (Nix cannot show a certificate).
    // (Client certificates count only over TLS, which start-up checks later.)
    let admitted = agent_token.is_some()
        || (config.tls.client_ca_file.is_some() && config.tls.cert_file.is_some());
    let admission = crate::farm_tokens::FarmAdmission {
        tokens: agent_token,
        issued: admitted.then(|| {
            let tokens = crate::farm_tokens::FarmTokens::open(
                config.state_dir.join("farm-tokens"),
                clock,
                (config.scheduler.lease_secs * 1000) as i64,
            );
            // Revoked while the coordinator was down: void before anything is served.
            for name in revoked_agents {
                tokens.withdraw(name);
            }
            Arc::new(tokens)
        }),
    };
    if admission.is_open() && !addr.ip().is_loopback() {
        tracing::warn!(
            "the farm cache is off: beyond loopback it needs agents to be admitted by a token ([auth] agent_token_file) or a client certificate ([tls] client_ca_file); runs need --cache to move outputs between hosts"
        );
        return Ok(None);
    }
    let e = engine.clone();
    let cache = FarmCache::open(
        config.state_dir.join("farm-cache"),
        admission,
        fc.max_nar_bytes,
        fc.max_bytes,
        Arc::new(move || e.protected_store_hashes()),
    )?;
    let withdrawn = cache.clone();
    engine.attach_farm_cache(Arc::new(move |paths: &[String]| {
        withdrawn.withdraw(paths);
    }));
    let app = cache.router();
    // Behind TLS whenever the gRPC services are (the same certificate).
    match (&config.tls.cert_file, &config.tls.key_file) {
        (Some(cert), Some(key)) => {
            let tls = crate::tls_listener::TlsListener::new(listener, cert, key)
                .map_err(|e| anyhow::anyhow!("[tls] cert_file, key_file: {e}"))?;
            tokio::spawn(async move {
                crate::http_serve::serve(tls, app).await;
            });
        }
        _ => {
            tokio::spawn(async move {
                crate::http_serve::serve(nodelay(listener), app).await;
            });
        }
    }
    tracing::info!(%addr, "farm cache listening");
    Ok(Some((cache, addr)))
}

/// Largest message the CLI may send, bytes (uploads come in 1 MiB chunks).
pub const CLIENT_MAX_MESSAGE_BYTES: usize = 4 << 20;

fn client_certs_configured(config: &Config) -> bool {
    config.tls.client_ca_file.is_some()
}

/// The limits the CLI and agents are told, so they agree with this coordinator.
fn server_limits(config: &Config, client_max_msg: usize) -> pb::ServerLimits {
    use nixfarm_core::limits as lim;
    pb::ServerLimits {
        snapshot_max_bytes: config.limits.snapshot_max_bytes,
        snapshot_max_files: config.limits.snapshot_max_files as u64,
        max_message_bytes: client_max_msg as u64,
        max_label_bytes: lim::MAX_LABEL as u32,
        max_attr_path_bytes: lim::MAX_ATTR_PATH as u32,
        max_attr_bytes: lim::MAX_ATTR as u32,
        max_selected_attrs: lim::MAX_SELECTED_ATTRS as u32,
        allow_local_flake_refs: config.allow_local_flake_refs,
    }
}

/// Says so at start-up when the coordinator is reachable beyond this machine without TLS
/// or without authentication.
fn warn_if_exposed(addr: SocketAddr, tls: bool, agent_auth: bool, client_auth: bool) {
    if addr.ip().is_loopback() {
        return;
    }
    let mut missing = Vec::new();
    if !tls {
        missing.push("TLS (tokens and sources travel in clear)");
    }
    if !agent_auth {
        missing
            .push("an agent token (anyone who reaches it can join as an agent and report results)");
    }
    if !client_auth {
        missing.push("a client token (anyone who reaches it can submit and cancel runs)");
    }
    if !missing.is_empty() {
        let text = format!(
            "listening on {addr}, beyond loopback, without {}; see deploy/coordinator.toml ([tls], [auth])",
            missing.join(", without ")
        );
        tracing::warn!("{text}");
    }
}

/// Opens the state directory and starts serving on `listener`.
pub async fn start_with_listener(
    config: &Config,
    listener: TcpListener,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<Running> {
    config.validate()?;
    std::fs::create_dir_all(&config.state_dir).with_context(|| {
        format!(
            "cannot create state directory {}",
            config.state_dir.display()
        )
    })?;
    // Before the database is opened: a second coordinator on it must not touch it.
    let state_lock = crate::state_lock::StateLock::take(&config.state_dir)?;
    let db_path = config.state_dir.join("coordinator.sqlite");
    let db = Db::open(&db_path).with_context(|| {
        format!(
            "cannot open database {} (left untouched; if it is damaged, restore a backup or move it aside to start with an empty state)",
            db_path.display()
        )
    })?;
    let s = &config.scheduler;
    let opts = EngineOptions {
        eval_chunk_size: s.eval_chunk_size,
        list_eval_max: s.list_eval_max,
        eval_memory_mib: s.eval_memory_mib,
        max_infra_retries: s.max_infra_retries,
        max_runs_in_flight: s.max_runs_in_flight,
        lease_ms: (s.lease_secs * 1000) as i64,
        allow_local_flake_refs: config.allow_local_flake_refs,
        run_caches: config.run_caches.clone(),
        run_cache_keys: config.run_cache_keys.clone(),
        locality: s.locality,
        cross_check_eval: s.cross_check_evaluation,
        cross_check_builds: s.cross_check_builds,
        cross_check_wait_ms: (s.cross_check_wait_secs * 1000) as i64,
        agents_share_store: config.agents_share_store,
        // Not configurable: 10,000 agents, each remembered 7 days after it went.
        ..EngineOptions::default()
    };
    let engine = Engine::open(db, config.state_dir.join("sources"), clock.clone(), opts)
        .context("cannot resume runs")?;
    // The join token, read again when its file changes (looked at first): replaced, the
    // agents admitted by the old one are cut off.
    let join_file = config
        .auth
        .agent_token_file
        .clone()
        .map(crate::watched::Watched::new);
    let agent_token = config
        .auth
        .agent_token_file
        .as_deref()
        .map(|p| read_secret(p).context("[auth] agent_token_file"))
        .transpose()?;
    // The agents' named tokens, read again when their file changes (looked at before it
    // is read, so no change is missed): a name whose token went or changed is cut off
    // like a revoked certificate.
    let named_file = config
        .auth
        .agent_tokens_file
        .clone()
        .map(crate::watched::Watched::new);
    let named = match config.auth.agent_tokens_file.as_deref() {
        Some(p) => read_named(p).with_context(|| format!("agent tokens file {}", p.display()))?,
        None => Vec::new(),
    };
    let agent_token = Credentials::new(agent_token, named).map(Arc::new);
    // Watched from before it is read: an edit in between is not missed.
    let client_file = config
        .auth
        .client_token_file
        .clone()
        .map(crate::watched::Watched::new);
    let client_token = config
        .auth
        .client_token_file
        .as_deref()
        .map(|p| read_secret(p).context("[auth] client_token_file"))
        .transpose()?;
    let client_creds = Credentials::new(client_token.clone(), vec![]).map(Arc::new);
    // The web UI checks the same token, read again with it.
    let web_clients = client_creds.clone();
    let max_msg = config.limits.max_message_bytes;
    // What the CLI sends is small (uploads come in 1 MiB chunks): a client cannot make the
    // coordinator buffer more than this per message.
    let client_max_msg = max_msg.min(CLIENT_MAX_MESSAGE_BYTES);
    let l = &config.limits;
    let snapshot_limits = snapshot::Limits {
        max_bytes: l.snapshot_max_bytes,
        max_entries: l.snapshot_max_files,
    };
    let limits = server_limits(config, client_max_msg);
    let addr = listener.local_addr()?;
    // Revoked client certificates: refused from the start (their agents' farm cache tokens
    // withdrawn before the farm cache serves); the file is looked at every second.
    let revoked = Arc::new(
        crate::revoked::Revoked::open(config.tls.revoked_certs_file.clone())
            .map_err(anyhow::Error::msg)?,
    );
    engine.use_gate(crate::credentials::Gate {
        revoked: Some(revoked.clone()),
        agents: agent_token.clone(),
    });
    let mut revoked_agents = match &config.tls.revoked_certs_file {
        Some(file) => {
            tracing::info!(file = %file.display(), "revoked client certificates read");
            engine.cut_off_certificates()
        }
        None => Vec::new(),
    };
    // Agents whose token left its file, or was replaced, while the coordinator was down.
    if let Some(tokens) = &agent_token {
        revoked_agents.extend(engine.cut_off_named(tokens));
    }
    let farm_cache = start_farm_cache(
        config,
        addr,
        agent_token.clone(),
        &engine,
        clock.clone(),
        &revoked_agents,
    )
    .await?;
    let agent_svc = AgentServiceServer::new(AgentSvc {
        engine: engine.clone(),
        heartbeat_ms: (s.heartbeat_secs * 1000) as u32,
        limits,
        farm_cache: farm_cache.as_ref().map(|(c, a)| FarmCacheAdvert {
            // The host agents dialled (which the certificate names) unless the cache listens
            // on an address of its own.
            host: if a.ip().is_unspecified() || a.ip() == addr.ip() {
                String::new()
            } else {
                a.ip().to_string()
            },
            port: a.port(),
            public_key: c.public_key(),
            tls: config.tls.cert_file.is_some(),
            tokens: c.issued_tokens(),
        }),
    })
    .max_decoding_message_size(max_msg)
    .max_encoding_message_size(max_msg);
    let uploads = Uploads::new(
        engine.sources_dir(),
        UploadLimits {
            snapshot: snapshot_limits,
            max_concurrent: l.max_concurrent_uploads,
            per_client: l.max_uploads_per_client,
            idle: Duration::from_secs(l.upload_idle_secs),
        },
        engine.snapshots_lock(),
    );
    let run_svc = RunServiceServer::new(RunSvc {
        engine: engine.clone(),
        uploads,
        limits,
        clients: client_creds.clone(),
    })
    .max_decoding_message_size(client_max_msg)
    .max_encoding_message_size(max_msg);
    warn_if_exposed(
        addr,
        config.tls.cert_file.is_some(),
        agent_token.is_some() || client_certs_configured(config),
        client_token.is_some(),
    );
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    // Without TCP_NODELAY (tonic sets it only on listeners it binds itself), a reply written
    // in two parts waits for the peer's delayed ACK: ~40 ms on every request.
    let incoming = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        |conn| {
            conn.inspect(|s| {
                if let Err(e) = s.set_nodelay(true) {
                    tracing::debug!("cannot set TCP_NODELAY: {e}");
                }
            })
        },
    );
    let reloads = crate::reloads::Reloads {
        engine: engine.clone(),
        revoked: revoked.clone(),
        tokens: agent_token.clone(),
        named_file,
        join_file,
        issued: farm_cache.as_ref().and_then(|(c, _)| c.issued_tokens()),
        issued_file: farm_cache
            .as_ref()
            .and_then(|(c, _)| c.issued_tokens())
            .and_then(|t| {
                t.file()
                    .map(|f| crate::watched::Watched::new(f.to_path_buf()))
            }),
        clients: client_creds.clone(),
        client_file,
        issued_gone: Default::default(),
    };
    let lease_engine = engine.clone();
    tokio::spawn(async move {
        let mut t = tokio::time::interval(Duration::from_secs(1));
        let mut ticks: u64 = 0;
        loop {
            t.tick().await;
            lease_engine.check_leases();
            reloads.look();
            // Every minute: agents gone long enough are forgotten, their tokens with them.
            if ticks.is_multiple_of(60) {
                reloads.forgotten(lease_engine.forget_idle_agents());
            }
            // Every ten minutes: the uploaded snapshots no run needs any more.
            if ticks.is_multiple_of(600) {
                sweep_snapshots(&lease_engine).await;
            }
            ticks += 1;
        }
    });
    let mut builder = tonic::transport::Server::builder();
    let tls = &config.tls;
    let client_certs = tls.client_ca_file.is_some();
    match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => {
            let read = |p: &std::path::Path| {
                std::fs::read(p).with_context(|| format!("[tls]: cannot read {}", p.display()))
            };
            let mut t = tonic::transport::ServerTlsConfig::new().identity(
                tonic::transport::Identity::from_pem(read(cert)?, read(key)?),
            );
            if let Some(ca) = &tls.client_ca_file {
                // Optional at the TLS layer: the CLI connects with a token, agents with either.
                t = t
                    .client_ca_root(tonic::transport::Certificate::from_pem(read(ca)?))
                    .client_auth_optional(true);
            }
            builder = builder
                .tls_config(t)
                .context("the TLS certificate or key is not usable")?;
        }
        (None, None) if !client_certs => {}
        _ => anyhow::bail!(
            "[tls] needs both cert_file and key_file (and they enable client_ca_file)"
        ),
    }
    // Wrong tokens per address, over gRPC and the web UI alike.
    let guesses = Arc::new(crate::limit::Limiter::default());
    let task = tokio::spawn(
        builder
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .add_service(InterceptedService::new(
                agent_svc,
                token_check(
                    agent_token,
                    Role::Agent,
                    client_certs,
                    revoked.clone(),
                    guesses.clone(),
                ),
            ))
            .add_service(InterceptedService::new(
                run_svc,
                token_check(
                    client_creds,
                    Role::Client,
                    false,
                    revoked.clone(),
                    guesses.clone(),
                ),
            ))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = rx.await;
            }),
    );
    let metrics_addr = match &config.metrics_listen {
        Some(l) => {
            let listener = TcpListener::bind(l)
                .await
                .with_context(|| format!("cannot listen on {l} for metrics"))?;
            let a = listener.local_addr()?;
            let e = engine.clone();
            let farm = farm_cache.as_ref().map(|(c, _)| c.clone());
            let app = axum::Router::new().route(
                "/metrics",
                axum::routing::get(move || {
                    let e = e.clone();
                    let farm = farm.clone();
                    async move {
                        match e.metrics_text() {
                            Ok(mut t) => {
                                if let Some(f) = &farm {
                                    t.push_str(&f.metrics_text());
                                }
                                ([("content-type", "text/plain; version=0.0.4")], t).into_response()
                            }
                            Err(err) => (
                                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                                err.to_string(),
                            )
                                .into_response(),
                        }
                    }
                }),
            );
            tokio::spawn(async move {
                crate::http_serve::serve(nodelay(listener), app).await;
            });
            Some(a)
        }
        None => None,
    };
    let http_addr = match &config.http.listen {
        Some(l) => {
            let listener = TcpListener::bind(l)
                .await
                .with_context(|| format!("cannot listen on {l} for the web UI"))?;
            let a = listener.local_addr()?;
            if client_token.is_none() && !a.ip().is_loopback() {
                tracing::warn!(
                    "the web UI on {a} needs no token ([auth] client_token_file): anyone who reaches it can read every run"
                );
            }
            let app = crate::web::router(crate::web::Web::new(
                engine.clone(),
                web_clients,
                config.http.clone(),
                guesses.clone(),
            ));
            tokio::spawn(async move {
                crate::http_serve::serve(nodelay(listener), app).await;
            });
            Some(a)
        }
        None => None,
    };
    tracing::info!(%addr, state_dir = %config.state_dir.display(), "coordinator listening");
    Ok(Running {
        addr,
        metrics_addr,
        http_addr,
        farm_cache_addr: farm_cache.map(|(_, a)| a),
        engine,
        shutdown: Some(tx),
        task,
        _state_lock: state_lock,
    })
}

/// Removes the uploaded snapshots no run needs (see [`crate::upload::sweep_snapshots`]).
async fn sweep_snapshots(engine: &Engine) {
    let engine = engine.clone();
    match tokio::task::spawn_blocking(move || engine.sweep_snapshots()).await {
        Ok(Ok(n @ 1..)) => tracing::info!(removed = n, "removed uploaded snapshots no run needs"),
        Ok(Ok(0)) => {}
        Ok(Err(e)) => tracing::warn!("cannot tell which snapshots runs need: {e}"),
        Err(e) => tracing::warn!("the sweep of uploaded snapshots failed: {e}"),
    }
}

/// Binds `config.listen` and starts serving.
pub async fn start(config: &Config) -> anyhow::Result<Running> {
    let listener = TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    start_with_listener(config, listener, Arc::new(SystemClock::new())).await
}

/// An HTTP listener whose connections send small writes at once (TCP_NODELAY): a response
/// written in parts (headers, then a streamed body) does not wait ~40 ms for the client's
/// delayed ACK, on every narinfo and NAR the farm cache serves.
fn nodelay(
    l: TcpListener,
) -> impl axum::serve::Listener<Io = tokio::net::TcpStream, Addr = std::net::SocketAddr> {
    use axum::serve::ListenerExt;
    l.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY: {e}");
        }
    })
}
