//! The agent-facing service: one stream per agent, snapshot downloads, upload claims.

use super::*;
use crate::credentials::{BoundName, Credential};
use crate::engine::UploadClaim;

/// Where agents find the farm cache, as registration tells them.
#[derive(Debug, Clone)]
pub struct FarmCacheAdvert {
    /// Empty: the host the agent dialled.
    pub host: String,
    pub port: u16,
    pub public_key: String,
    /// Served over TLS (the coordinator's certificate).
    pub tls: bool,
    /// Issues each agent its token for the farm cache (None: it takes none).
    pub tokens: Option<std::sync::Arc<crate::farm_tokens::FarmTokens>>,
}

/// How long an agent has to register once its stream is open.
const REGISTER_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

/// The agent-facing service.
#[derive(Clone)]
pub struct AgentSvc {
    pub engine: Engine,
    pub heartbeat_ms: u32,
    pub limits: pb::ServerLimits,
    pub farm_cache: Option<FarmCacheAdvert>,
}

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentSvc {
    type ConnectAgentStream = BoxStream<pb::CoordinatorMessage>;
    type FetchSourceStream = BoxStream<pb::SourceChunk>;

    async fn connect_agent(
        &self,
        req: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::ConnectAgentStream>, Status> {
        let bound = req.extensions().get::<BoundName>().cloned();
        let credential = req.extensions().get::<Credential>().cloned();
        let admitted_at = req
            .extensions()
            .get::<crate::credentials::AdmittedAt>()
            .copied();
        let req_digest = req
            .extensions()
            .get::<crate::credentials::TokenDigest>()
            .cloned();
        let shows_token = req
            .extensions()
            .get::<crate::credentials::ShowsToken>()
            .is_some();
        let mut inbound = req.into_inner();
        // Bounded: a stream held open unregistered would otherwise outlast, say, the
        // revocation of the certificate it was opened with.
        let first = tokio::time::timeout(REGISTER_WITHIN, inbound.message())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "an agent must register within {} s of opening its stream",
                    REGISTER_WITHIN.as_secs()
                ))
            })??
            .ok_or_else(|| {
                Status::invalid_argument("the stream ended before the agent registered")
            })?;
        let mut reg: Registration = match first.msg {
            Some(pb::agent_message::Msg::Register(r)) => r.try_into()?,
            _ => {
                return Err(Status::invalid_argument(
                    "an agent's first message must be Register",
                ));
            }
        };
        own_name(bound.as_ref(), &reg.name)?;
        // Never absent (the token check sets it); a join token if it were.
        reg.credential = credential.unwrap_or(Credential::JoinToken);
        reg.admitted_at = admitted_at.map_or(0, |a| a.0);
        reg.token_digest = req_digest.map(|d| d.0).unwrap_or_default();
        // Taken back since the stream opened: no token is issued to it (the engine checks
        // again, under its lock, against whatever is read meanwhile).
        if let Some(why) = self
            .engine
            .refusal(&reg.credential, reg.admitted_at)
            .or_else(|| self.engine.name_refusal(&reg))
        {
            return Err(Status::permission_denied(why));
        }
        let name = reg.name.clone();
        // What it can show the farm cache: a token it was admitted by (or showed beside
        // its certificate), or one issued to it now. One with nothing to show (it predates
        // issued tokens and was admitted by a certificate) is not told of the farm cache,
        // and is handed nothing that waits there.
        let shows_token = shows_token
            || matches!(
                reg.credential,
                Credential::JoinToken | Credential::NamedToken(_)
            );
        let farm_cache_token = self
            .farm_cache
            .as_ref()
            .and_then(|f| f.tokens.as_ref())
            .filter(|_| reg.takes_farm_cache_token)
            .and_then(|t| t.issue_to(&reg.name, &reg.credential))
            .unwrap_or_default();
        let farm_cache = self
            .farm_cache
            .as_ref()
            .filter(|f| f.tokens.is_none() || shows_token || !farm_cache_token.is_empty());
        reg.has_farm_cache = farm_cache.is_some();
        if self.farm_cache.is_some() && farm_cache.is_none() {
            tracing::warn!(
                agent = name,
                "not told of the farm cache: admitted by a certificate, it predates the tokens the coordinator issues for it; upgrade it"
            );
        }
        let (tx, rx) = mpsc::unbounded_channel::<ToAgent>();
        let (conn, session_key) = self.engine.connect_agent(reg, tx)?;
        // Its issued token counts while it is connected (and for a lease after).
        let tokens = self.farm_cache.as_ref().and_then(|f| f.tokens.clone());
        if let Some(t) = &tokens {
            t.connected(&name, conn);
            // Struck between its issue above and this stream's start: the agent would hold
            // a token refused until its next reconnect. It registers again at once.
            if !farm_cache_token.is_empty()
                && t.issue(&name).as_deref() != Some(farm_cache_token.as_str())
            {
                self.engine.reconnect(std::slice::from_ref(&name));
            }
        }
        let engine = self.engine.clone();
        let agent = name.clone();
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(m)) => match FromAgent::try_from(m) {
                        Ok(msg) => {
                            if let Err(e) = engine.agent_message(&agent, conn, msg) {
                                tracing::error!(agent, "agent message failed: {e}");
                            }
                        }
                        Err(e) => tracing::warn!(agent, "{e}"),
                    },
                    Ok(None) => break,
                    Err(e) => {
                        tracing::info!(agent, "agent stream error: {e}");
                        break;
                    }
                }
            }
            engine.disconnect_agent(&agent, conn);
            if let Some(t) = tokens {
                t.disconnected(&agent, conn);
            }
        });
        let registered = pb::CoordinatorMessage {
            msg: Some(pb::coordinator_message::Msg::Registered(pb::Registered {
                agent_id: name,
                heartbeat_interval_ms: self.heartbeat_ms,
                session_key,
                limits: Some(self.limits),
                active_runs: self.engine.active_runs(),
                farm_cache_host: farm_cache.map(|f| f.host.clone()).unwrap_or_default(),
                farm_cache_port: farm_cache.map_or(0, |f| f.port as u32),
                farm_cache_tls: farm_cache.is_some_and(|f| f.tls),
                farm_cache_public_key: farm_cache.map(|f| f.public_key.clone()).unwrap_or_default(),
                farm_cache_token,
            })),
        };
        let out = tokio_stream::once(Ok(registered)).chain(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
                .map(pb::CoordinatorMessage::try_from),
        );
        Ok(Response::new(Box::pin(out)))
    }

    async fn claim_uploads(
        &self,
        req: Request<pb::ClaimUploadsRequest>,
    ) -> Result<Response<pb::ClaimUploadsResponse>, Status> {
        let bound = req.extensions().get::<BoundName>().cloned();
        let r = req.into_inner();
        own_name(bound.as_ref(), &r.agent)?;
        if r.agent.is_empty() || r.agent.len() > lim::MAX_AGENT_NAME || r.paths.len() > 100_000 {
            return Err(
                WireError("a claim names its agent and at most 100000 paths".into()).into(),
            );
        }
        check_len("the cache URL", &r.cache, lim::MAX_CACHE_URL).map_err(WireError::from)?;
        if let Some(p) = r.paths.iter().find(|p| StorePath::parse(p).is_err()) {
            return Err(WireError(format!("'{}' is not a store path", clip(p, 80))).into());
        }
        check_len("the attempt", &r.attempt, lim::MAX_RUN_ID).map_err(WireError::from)?;
        // Releasing drops only the agent's own claims: no attempt needed (it may be over).
        if r.release {
            self.engine
                .release_uploads(&r.agent, &r.session_key, &r.cache, &r.paths)?;
            return Ok(Response::new(pb::ClaimUploadsResponse { granted: vec![] }));
        }
        let granted = self.engine.claim_uploads(&UploadClaim {
            agent: &r.agent,
            session: &r.session_key,
            attempt: &r.attempt,
            cache: &r.cache,
            paths: &r.paths,
        })?;
        Ok(Response::new(pb::ClaimUploadsResponse { granted }))
    }

    async fn fetch_source(
        &self,
        req: Request<pb::FetchSourceRequest>,
    ) -> Result<Response<Self::FetchSourceStream>, Status> {
        let digest = req.into_inner().digest;
        if !is_digest(&digest) {
            return Err(Status::invalid_argument("not a snapshot digest"));
        }
        let path = self.engine.sources_dir().join(format!("{digest}.tar"));
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|_| Status::not_found(format!("no snapshot {digest}")))?;
        // Streamed from disk, a few chunks ahead of the agent: memory stays bounded.
        let (tx, rx) = mpsc::channel::<Result<pb::SourceChunk, Status>>(4);
        tokio::spawn(async move {
            loop {
                let mut buf = vec![0u8; 1 << 20];
                let mut filled = 0;
                while filled < buf.len() {
                    match file.read(&mut buf[filled..]).await {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(e) => {
                            let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                            return;
                        }
                    }
                }
                if filled == 0 {
                    return;
                }
                buf.truncate(filled);
                if tx.send(Ok(pb::SourceChunk { data: buf })).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// An agent whose token is bound to a name acts under that name only.
fn own_name(bound: Option<&BoundName>, name: &str) -> Result<(), Status> {
    match bound {
        Some(BoundName(own)) if own != name => Err(Status::permission_denied(format!(
            "this agent's token is agent '{own}''s: it cannot act as '{}'",
            clip(name, 80)
        ))),
        _ => Ok(()),
    }
}
