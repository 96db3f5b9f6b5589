//! The gRPC services: wire messages become domain types here (and only here), and engine
//! errors become `tonic::Status` in one place.

use crate::engine::{Engine, EngineError};
use crate::model::*;
use nixfarm_core::report::Report;
use nixfarm_core::snapshot;
use nixfarm_proto::v1 as pb;
use std::collections::BTreeMap;
use std::pin::Pin;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl From<EngineError> for Status {
    fn from(e: EngineError) -> Status {
        match &e {
            EngineError::Invalid(_) => Status::invalid_argument(e.to_string()),
            EngineError::NotFound(_) => Status::not_found(e.to_string()),
            EngineError::Busy(_) => Status::resource_exhausted(e.to_string()),
            EngineError::Db(_) | EngineError::Io(_) => {
                tracing::error!("internal error: {e}");
                Status::internal(e.to_string())
            }
        }
    }
}

/// A wire message that does not convert into a domain value.
#[derive(Debug, thiserror::Error)]
#[error("malformed message: {0}")]
pub struct WireError(String);

impl From<WireError> for Status {
    fn from(e: WireError) -> Status {
        Status::invalid_argument(e.to_string())
    }
}

fn source_from_wire(s: Option<pb::Source>) -> Result<SourceSpec, WireError> {
    match s.and_then(|s| s.kind) {
        Some(pb::source::Kind::Snapshot(d)) => {
            if d.len() != 64 || !d.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(WireError(format!(
                    "snapshot digest '{d}' is not a hex SHA-256"
                )));
            }
            Ok(SourceSpec::Snapshot(d))
        }
        Some(pb::source::Kind::FlakeRef(f)) => Ok(SourceSpec::FlakeRef(f)),
        None => Err(WireError(
            "a run needs a source (snapshot or flake reference)".into(),
        )),
    }
}

pub fn source_to_wire(s: &SourceSpec) -> pb::Source {
    pb::Source {
        kind: Some(match s {
            SourceSpec::Snapshot(d) => pb::source::Kind::Snapshot(d.clone()),
            SourceSpec::FlakeRef(f) => pb::source::Kind::FlakeRef(f.clone()),
        }),
    }
}

impl TryFrom<pb::SubmitRunRequest> for RunSpec {
    type Error = WireError;
    fn try_from(r: pb::SubmitRunRequest) -> Result<Self, WireError> {
        Ok(RunSpec {
            source: source_from_wire(r.source)?,
            attr_path: if r.attr_path.is_empty() {
                "packages.x86_64-linux".into()
            } else {
                r.attr_path
            },
            label: r.label,
            cache: r.cache,
            trusted_public_keys: r.trusted_public_keys,
            timeout_secs: r.timeout_secs,
            max_silent_secs: r.max_silent_secs,
            attrs: {
                for a in &r.attrs {
                    if a.is_empty() || a.contains(['"', '\n', '$']) {
                        return Err(WireError(format!("'{a}' is not an attribute name")));
                    }
                }
                r.attrs
            },
            skip_cached: r.skip_cached,
        })
    }
}

impl TryFrom<pb::Register> for Registration {
    type Error = WireError;
    fn try_from(r: pb::Register) -> Result<Self, WireError> {
        if r.name.is_empty() || r.name.len() > 255 {
            return Err(WireError("agent name must be 1 to 255 bytes".into()));
        }
        Ok(Registration {
            name: r.name,
            systems: r.systems,
            features: r.features,
            max_jobs: r.max_jobs,
            nix_version: r.nix_version,
            running_attempts: r.running_attempts,
        })
    }
}

fn outputs_from_wire(o: Vec<pb::DrvOutput>) -> Outputs {
    o.into_iter().map(|o| (o.name, o.path)).collect()
}

fn outputs_to_wire(o: &Outputs) -> Vec<pb::DrvOutput> {
    o.iter()
        .map(|(name, path)| pb::DrvOutput {
            name: name.clone(),
            path: path.clone(),
        })
        .collect()
}

fn err_or<T>(error: String, infra: bool, ok: T) -> Result<T, (String, bool)> {
    if error.is_empty() {
        Ok(ok)
    } else {
        Err((error, infra))
    }
}

impl TryFrom<pb::AgentMessage> for FromAgent {
    type Error = WireError;
    fn try_from(m: pb::AgentMessage) -> Result<Self, WireError> {
        use pb::agent_message::Msg;
        Ok(match m.msg {
            Some(Msg::Heartbeat(h)) => FromAgent::Heartbeat {
                running: h.running_attempts,
                draining: h.draining,
                paused: h.paused.chars().take(500).collect(),
            },
            Some(Msg::Log(l)) => FromAgent::Log {
                attempt: l.attempt_id,
                data: l.data,
            },
            Some(Msg::EvalList(r)) => FromAgent::EvalList {
                attempt: r.attempt_id,
                result: err_or(r.error, r.infra, r.attrs),
            },
            Some(Msg::EvalChunk(r)) => {
                let attrs = r
                    .attrs
                    .into_iter()
                    .map(|a| EvaluatedAttr {
                        attr: a.attr,
                        info: PackageInfo {
                            eval_error: a.error,
                            drv_path: a.drv_path,
                            outputs: outputs_from_wire(a.outputs),
                            pname: a.pname,
                            version: a.version,
                            position: a.position,
                            rev: a.rev,
                            system: a.system,
                            timeout_secs: a.timeout_secs,
                            max_silent_secs: a.max_silent_secs,
                        },
                    })
                    .collect();
                let mut drvs = BTreeMap::new();
                for d in r.drvs {
                    if !d.drv_path.starts_with('/') || !d.drv_path.ends_with(".drv") {
                        return Err(WireError(format!(
                            "'{}' is not a derivation path",
                            d.drv_path
                        )));
                    }
                    drvs.insert(
                        d.drv_path,
                        DrvNode {
                            system: d.system,
                            features: d.features,
                            outputs: outputs_from_wire(d.outputs),
                            input_drvs: d.input_drvs,
                            fixed_output: d.fixed_output,
                            output_hash: d.output_hash,
                            hints: d.hints,
                            present: d.present,
                        },
                    );
                }
                FromAgent::EvalChunk {
                    attempt: r.attempt_id,
                    result: err_or(r.error, r.infra, (attrs, drvs)),
                }
            }
            Some(Msg::Build(b)) => {
                let kind = match pb::BuildStatus::try_from(b.status)
                    .unwrap_or(pb::BuildStatus::Unspecified)
                {
                    pb::BuildStatus::Built => "built",
                    pb::BuildStatus::Failed => "build-failed",
                    pb::BuildStatus::HashMismatch => "hash-mismatch",
                    pb::BuildStatus::TimedOut => "timed-out",
                    pb::BuildStatus::InfraFailed => "infra-failed",
                    pb::BuildStatus::Cancelled => "cancelled",
                    pb::BuildStatus::NotCached => "not-cached",
                    pb::BuildStatus::Unspecified => {
                        return Err(WireError("build result without a status".into()));
                    }
                };
                FromAgent::Build {
                    attempt: b.attempt_id,
                    report: BuildReport {
                        kind: kind.into(),
                        message: b.message,
                        specified: b.specified_hash,
                        got: b.got_hash,
                        outputs: outputs_from_wire(b.outputs),
                        duration_ms: b.duration_ms,
                        log_tail: b.log_tail,
                        substituted: b.substituted,
                        agent: String::new(),
                        failed_root: String::new(),
                    },
                }
            }
            Some(Msg::Register(_)) => {
                return Err(WireError("an agent registers only once per stream".into()));
            }
            None => return Err(WireError("empty agent message".into())),
        })
    }
}

impl From<ToAgent> for pb::CoordinatorMessage {
    fn from(m: ToAgent) -> Self {
        use pb::coordinator_message::Msg;
        let msg = match m {
            ToAgent::Cancel { attempt } => Msg::Cancel(pb::Cancel {
                attempt_id: attempt,
            }),
            ToAgent::Drain => Msg::Drain(pb::Drain {}),
            ToAgent::Assign {
                attempt,
                run_id,
                job,
            } => {
                use pb::assignment::Job as J;
                let job = match job {
                    Job::EvalList { source, attr_path } => J::EvalList(pb::EvalListJob {
                        source: Some(source_to_wire(&source)),
                        attr_path,
                        cache: String::new(),
                    }),
                    Job::EvalChunk {
                        source,
                        attr_path,
                        attrs,
                        cache,
                        memory_mib,
                        skip_cached,
                    } => J::EvalChunk(pb::EvalChunkJob {
                        source: Some(source_to_wire(&source)),
                        attr_path,
                        attrs,
                        cache,
                        eval_memory_mib: memory_mib,
                        skip_cached,
                    }),
                    Job::Build {
                        drv_path,
                        cache,
                        trusted_public_keys,
                        timeout_secs,
                        max_silent_secs,
                    } => J::Build(pb::BuildJob {
                        drv_path,
                        cache,
                        trusted_public_keys,
                        timeout_secs,
                        max_silent_secs,
                    }),
                };
                Msg::Assign(pb::Assignment {
                    attempt_id: attempt,
                    run_id,
                    job: Some(job),
                })
            }
        };
        pb::CoordinatorMessage { msg: Some(msg) }
    }
}

pub fn report_to_wire(r: &Report) -> pb::Report {
    pb::Report {
        run_id: r.run_id.clone(),
        state: r.state.clone(),
        label: r.label.clone(),
        error: r.error.clone(),
        created_ms: 0,
        finished_ms: 0,
        packages: r
            .packages
            .iter()
            .map(|p| pb::PackageReport {
                attr: p.attr.clone(),
                status: p.status.clone(),
                reason: p.reason.clone(),
                drv_path: p.drv_path.clone(),
                outputs: outputs_to_wire(&p.outputs),
                pinned: p.pinned,
                rev: p.rev.clone(),
                duration_ms: p.duration_ms,
                agent: p.agent.clone(),
                log_tail: p.log_tail.clone(),
                pname: p.pname.clone(),
                version: p.version.clone(),
                position: p.position.clone(),
                failed_dependency: p.failed_dependency.clone(),
                hash_mismatches: p
                    .hash_mismatches
                    .iter()
                    .map(|m| pb::HashMismatch {
                        fod_drv: m.fod_drv.clone(),
                        specified: m.specified.clone(),
                        got: m.got.clone(),
                        hints: m.hints.clone(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// The agent-facing service.
#[derive(Clone)]
pub struct AgentSvc {
    pub engine: Engine,
    pub heartbeat_ms: u32,
}

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentSvc {
    type ConnectAgentStream = BoxStream<pb::CoordinatorMessage>;
    type FetchSourceStream = BoxStream<pb::SourceChunk>;

    async fn connect_agent(
        &self,
        req: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::ConnectAgentStream>, Status> {
        let mut inbound = req.into_inner();
        let first = inbound.message().await?.ok_or_else(|| {
            Status::invalid_argument("the stream ended before the agent registered")
        })?;
        let reg: Registration = match first.msg {
            Some(pb::agent_message::Msg::Register(r)) => r.try_into()?,
            _ => {
                return Err(Status::invalid_argument(
                    "an agent's first message must be Register",
                ));
            }
        };
        let name = reg.name.clone();
        let (tx, rx) = mpsc::unbounded_channel::<ToAgent>();
        let conn = self.engine.connect_agent(reg, tx)?;
        let engine = self.engine.clone();
        let agent = name.clone();
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(m)) => match FromAgent::try_from(m) {
                        Ok(msg) => {
                            if let Err(e) = engine.agent_message(&agent, msg) {
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
        });
        let registered = pb::CoordinatorMessage {
            msg: Some(pb::coordinator_message::Msg::Registered(pb::Registered {
                agent_id: name,
                heartbeat_interval_ms: self.heartbeat_ms,
            })),
        };
        let out = tokio_stream::once(Ok(registered)).chain(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
                .map(|m| Ok(pb::CoordinatorMessage::from(m))),
        );
        Ok(Response::new(Box::pin(out)))
    }

    async fn claim_uploads(
        &self,
        req: Request<pb::ClaimUploadsRequest>,
    ) -> Result<Response<pb::ClaimUploadsResponse>, Status> {
        let r = req.into_inner();
        if r.agent.is_empty() || r.paths.len() > 100_000 {
            return Err(
                WireError("a claim names its agent and at most 100000 paths".into()).into(),
            );
        }
        if let Some(p) = r
            .paths
            .iter()
            .find(|p| !p.starts_with('/') || p.contains('\n'))
        {
            return Err(WireError(format!("'{p}' is not a store path")).into());
        }
        let granted = self
            .engine
            .claim_uploads(&r.agent, &r.cache, &r.paths, r.release)?;
        Ok(Response::new(pb::ClaimUploadsResponse { granted }))
    }

    async fn fetch_source(
        &self,
        req: Request<pb::FetchSourceRequest>,
    ) -> Result<Response<Self::FetchSourceStream>, Status> {
        let digest = req.into_inner().digest;
        if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Status::invalid_argument("not a snapshot digest"));
        }
        let path = self.engine.sources_dir().join(format!("{digest}.tar"));
        let bytes = tokio::fs::read(&path)
            .await
            .map_err(|_| Status::not_found(format!("no snapshot {digest}")))?;
        let chunks: Vec<Result<pb::SourceChunk, Status>> = bytes
            .chunks(1 << 20)
            .map(|c| Ok(pb::SourceChunk { data: c.to_vec() }))
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }
}

/// The CLI-facing service.
#[derive(Clone)]
pub struct RunSvc {
    pub engine: Engine,
    pub snapshot_limits: snapshot::Limits,
}

#[tonic::async_trait]
impl pb::run_service_server::RunService for RunSvc {
    type WatchRunStream = BoxStream<pb::RunEvent>;

    async fn upload_source(
        &self,
        req: Request<Streaming<pb::SourceChunk>>,
    ) -> Result<Response<pb::UploadSourceResponse>, Status> {
        let mut inbound = req.into_inner();
        let dir = self.engine.sources_dir().to_path_buf();
        let tmp = dir.join(format!(".upload-{:016x}", fastrand::u64(..)));
        let mut file = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| Status::internal(format!("cannot store upload: {e}")))?;
        let mut bytes = Vec::new();
        let limit =
            self.snapshot_limits.max_bytes + (self.snapshot_limits.max_entries as u64 + 2) * 1024;
        let result: Result<(), Status> = async {
            while let Some(chunk) = inbound.message().await? {
                bytes.extend_from_slice(&chunk.data);
                if bytes.len() as u64 > limit {
                    return Err(Status::resource_exhausted(format!(
                        "snapshot is larger than the limit of {} bytes",
                        self.snapshot_limits.max_bytes
                    )));
                }
            }
            snapshot::verify(&bytes, self.snapshot_limits)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            file.write_all(&bytes)
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
            file.sync_all()
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
            Ok(())
        }
        .await;
        if let Err(e) = result {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        let digest = snapshot::digest(&bytes);
        tokio::fs::rename(&tmp, dir.join(format!("{digest}.tar")))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::UploadSourceResponse {
            digest,
            size: bytes.len() as u64,
        }))
    }

    async fn submit_run(
        &self,
        req: Request<pb::SubmitRunRequest>,
    ) -> Result<Response<pb::SubmitRunResponse>, Status> {
        let spec: RunSpec = req.into_inner().try_into()?;
        let run_id = self.engine.submit(spec)?;
        Ok(Response::new(pb::SubmitRunResponse { run_id }))
    }

    async fn watch_run(
        &self,
        req: Request<pb::WatchRunRequest>,
    ) -> Result<Response<Self::WatchRunStream>, Status> {
        let pb::WatchRunRequest { run_id, after_seq } = req.into_inner();
        // Subscribe before reading the backlog so no event falls between the two.
        let mut live = self.engine.subscribe();
        let backlog = self.engine.events_after(&run_id, after_seq)?;
        let engine = self.engine.clone();
        let (tx, rx) = mpsc::channel::<Result<pb::RunEvent, Status>>(256);
        tokio::spawn(async move {
            let mut last = after_seq;
            let terminal = |k: &str| k == "run-finished" || k == "run-failed";
            let send = |e: RunEvent| pb::RunEvent {
                seq: e.seq,
                run_id: e.run_id,
                kind: e.kind,
                json: e.json,
            };
            for e in backlog {
                last = e.seq;
                let end = terminal(&e.kind);
                if tx.send(Ok(send(e))).await.is_err() || end {
                    return;
                }
            }
            if engine
                .run_state(&run_id)
                .map(|s| s.is_terminal())
                .unwrap_or(true)
            {
                // Finished before we looked, and its last event was already in the backlog
                // or is about to be written: read once more.
                for e in engine.events_after(&run_id, last).unwrap_or_default() {
                    let end = terminal(&e.kind);
                    if tx.send(Ok(send(e))).await.is_err() || end {
                        return;
                    }
                }
                return;
            }
            loop {
                match live.recv().await {
                    Ok(e) if e.run_id == run_id && e.seq > last => {
                        // Fill any gap from the database (events are written before sent).
                        if e.seq > last + 1 {
                            for g in engine.events_after(&run_id, last).unwrap_or_default() {
                                if g.seq >= e.seq {
                                    break;
                                }
                                if tx.send(Ok(send(g))).await.is_err() {
                                    return;
                                }
                            }
                        }
                        last = e.seq;
                        let end = terminal(&e.kind);
                        if tx.send(Ok(send(e))).await.is_err() || end {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        for g in engine.events_after(&run_id, last).unwrap_or_default() {
                            last = g.seq;
                            let end = terminal(&g.kind);
                            if tx.send(Ok(send(g))).await.is_err() || end {
                                return;
                            }
                        }
                    }
                    Err(_) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn get_report(
        &self,
        req: Request<pb::GetReportRequest>,
    ) -> Result<Response<pb::Report>, Status> {
        let r = self.engine.report(&req.into_inner().run_id)?;
        Ok(Response::new(report_to_wire(&r)))
    }

    async fn list_runs(
        &self,
        _req: Request<pb::ListRunsRequest>,
    ) -> Result<Response<pb::ListRunsResponse>, Status> {
        let runs = self
            .engine
            .list_runs()?
            .into_iter()
            .map(|r| pb::RunSummary {
                run_id: r.id,
                state: r.state,
                label: r.label,
                total: r.total,
                ready: r.ready,
                created_ms: r.created_ms as u64,
            })
            .collect();
        Ok(Response::new(pb::ListRunsResponse { runs }))
    }

    async fn list_agents(
        &self,
        _req: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let agents = self
            .engine
            .list_agents()
            .into_iter()
            .map(|a| pb::AgentInfo {
                agent_id: a.name.clone(),
                name: a.name,
                systems: a.systems,
                features: a.features,
                max_jobs: a.max_jobs,
                nix_version: a.nix_version,
                connected: a.connected,
                building: a.building,
                last_seen_ms: a.last_seen_ms as u64,
                paused: a.paused,
                draining: a.draining,
            })
            .collect();
        let waiting = self
            .engine
            .waiting_jobs()
            .into_iter()
            .map(|(reason, jobs, example)| pb::WaitingJobs {
                reason,
                jobs,
                example,
            })
            .collect();
        Ok(Response::new(pb::ListAgentsResponse { agents, waiting }))
    }

    async fn cancel_run(
        &self,
        req: Request<pb::CancelRunRequest>,
    ) -> Result<Response<pb::CancelRunResponse>, Status> {
        let cancelled = self.engine.cancel(&req.into_inner().run_id)?;
        Ok(Response::new(pb::CancelRunResponse { cancelled }))
    }
}
