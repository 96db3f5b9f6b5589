//! The CLI-facing service: uploads, runs, events, reports, listings, limits.

use super::*;

/// The CLI-facing service.
#[derive(Clone)]
pub struct RunSvc {
    pub engine: Engine,
    pub uploads: Arc<Uploads>,
    pub limits: pb::ServerLimits,
    /// The client token (None: none configured): a watch ends when it is replaced.
    pub clients: Option<Arc<crate::credentials::Credentials>>,
}

#[tonic::async_trait]
impl pb::run_service_server::RunService for RunSvc {
    type WatchRunStream = BoxStream<pb::RunEvent>;

    async fn upload_source(
        &self,
        req: Request<Streaming<pb::SourceChunk>>,
    ) -> Result<Response<pb::UploadSourceResponse>, Status> {
        let client = req.remote_addr().map(|a| a.ip());
        let slot = self.uploads.admit(client)?;
        let (digest, size) = self.uploads.receive(&slot, req.into_inner()).await?;
        Ok(Response::new(pb::UploadSourceResponse { digest, size }))
    }

    async fn get_limits(
        &self,
        _req: Request<pb::GetLimitsRequest>,
    ) -> Result<Response<pb::ServerLimits>, Status> {
        Ok(Response::new(self.limits))
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
        let run_id = checked_run_id(run_id)?;
        // Subscribe before reading the backlog so no event falls between the two.
        let mut live = self.engine.subscribe();
        let backlog = self.engine.events_after(&run_id, after_seq)?;
        let engine = self.engine.clone();
        let admission = self
            .clients
            .as_ref()
            .map(|c| c.admission())
            .unwrap_or_default();
        let (tx, rx) = mpsc::channel::<Result<pb::RunEvent, Status>>(256);
        tokio::spawn(async move {
            let mut last = after_seq;
            let terminal = nixfarm_core::RunEvent::is_terminal_kind;
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
            // The token it was admitted under is looked at this often, and with each event.
            let mut look = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                let next = tokio::select! {
                    r = live.recv() => Some(r),
                    _ = look.tick() => None,
                    // The client went: nothing more to follow.
                    _ = tx.closed() => return,
                };
                if !admission.holds() {
                    let _ = tx
                        .send(Err(Status::unauthenticated(
                            crate::credentials::TOKEN_REPLACED,
                        )))
                        .await;
                    return;
                }
                let Some(next) = next else {
                    continue;
                };
                match next {
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
        let req = req.into_inner();
        let id = checked_run_id(req.run_id)?;
        let r = if req.alone {
            self.engine.report_alone_with_fixes(&id)?
        } else {
            self.engine.report_with_fixes(&id)?
        };
        Ok(Response::new(pb::Report::from(&r)))
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
                state: r.state.to_string(),
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
                protocol_violations: a.violations,
                holds_outputs: a.holds_outputs,
                without_farm_cache: a.without_farm_cache,
                admitted_by: a.admitted_by,
                run_caches: a.run_caches,
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
        let cancelled = self
            .engine
            .cancel(&checked_run_id(req.into_inner().run_id)?)?;
        Ok(Response::new(pb::CancelRunResponse { cancelled }))
    }
}
