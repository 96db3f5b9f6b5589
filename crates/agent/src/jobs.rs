//! Running one assigned job: fetch the source, evaluate or build with Nix, report.

use crate::{Shared, add_token};
use nixfarm_core::snapshot;
use nixfarm_nix::messages::Failure;
use nixfarm_nix::{AttrInfo, BuildOptions, NixError};
use nixfarm_proto::v1 as pb;
use nixfarm_proto::v1::agent_service_client::AgentServiceClient;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

fn msg(m: pb::agent_message::Msg) -> pb::AgentMessage {
    pb::AgentMessage { msg: Some(m) }
}

/// The result message for an assignment handed back unrun.
pub(crate) fn cancelled_result(a: &pb::Assignment) -> pb::AgentMessage {
    use pb::assignment::Job;
    match &a.job {
        Some(Job::Build(_)) => msg(pb::agent_message::Msg::Build(pb::BuildResult {
            attempt_id: a.attempt_id.clone(),
            status: pb::BuildStatus::Cancelled as i32,
            message: "the agent is draining".into(),
            ..Default::default()
        })),
        Some(Job::EvalList(_)) => msg(pb::agent_message::Msg::EvalList(pb::EvalListResult {
            attempt_id: a.attempt_id.clone(),
            error: "the agent is draining".into(),
            infra: true,
            ..Default::default()
        })),
        _ => msg(pb::agent_message::Msg::EvalChunk(pb::EvalChunkResult {
            attempt_id: a.attempt_id.clone(),
            error: "the agent is draining".into(),
            infra: true,
            ..Default::default()
        })),
    }
}

pub(crate) async fn run(
    shared: &Arc<Shared>,
    channel: Channel,
    a: pb::Assignment,
    cancel: CancellationToken,
    logs: mpsc::Sender<pb::AgentMessage>,
) -> pb::AgentMessage {
    use pb::assignment::Job;
    let attempt = a.attempt_id.clone();
    let run_id = a.run_id.clone();
    match a.job {
        Some(Job::EvalList(j)) => {
            let result = async {
                let flake = prepare_source(shared, channel, &run_id, j.source).await?;
                shared
                    .nix
                    .list_attrs(&flake, &j.attr_path, j.eval_memory_mib)
                    .await
            }
            .await;
            let (attrs, error, infra) = match result {
                Ok(a) => (a, String::new(), false),
                Err(e) => (vec![], e.to_string(), e.is_infra()),
            };
            pause_if_disk_full(shared, &error);
            msg(pb::agent_message::Msg::EvalList(pb::EvalListResult {
                attempt_id: attempt,
                attrs,
                error,
                infra,
            }))
        }
        Some(Job::EvalChunk(j)) => {
            let mut r = eval_chunk(shared, channel, &run_id, j).await;
            r.attempt_id = attempt;
            msg(pb::agent_message::Msg::EvalChunk(r))
        }
        Some(Job::Build(j)) => {
            let mut r = build(shared, channel, &run_id, j, cancel, logs, attempt.clone()).await;
            r.attempt_id = attempt;
            msg(pb::agent_message::Msg::Build(r))
        }
        None => msg(pb::agent_message::Msg::Build(pb::BuildResult {
            attempt_id: attempt,
            status: pb::BuildStatus::InfraFailed as i32,
            message: "empty assignment".into(),
            ..Default::default()
        })),
    }
}

/// Makes the run's flake available locally and returns a flake reference to it.
async fn prepare_source(
    shared: &Arc<Shared>,
    channel: Channel,
    run_id: &str,
    source: Option<pb::Source>,
) -> Result<String, NixError> {
    match source.and_then(|s| s.kind) {
        Some(pb::source::Kind::FlakeRef(f)) => {
            // Checked here too: a reference that reads this host's disk is refused whatever
            // the coordinator let through.
            nixfarm_core::flakeref::validate_for_farm(&f, shared.cfg.allow_local_flake_refs)
                .map_err(|e| NixError::Failed {
                    message: e.to_string(),
                    log: String::new(),
                })?;
            Ok(f)
        }
        Some(pb::source::Kind::Snapshot(digest)) => {
            let dir = fetch_snapshot(shared, channel, run_id, &digest).await?;
            Ok(format!("path:{}", dir.display()))
        }
        None => Err(NixError::Infra("the job names no source".into())),
    }
}

/// Runs whose unpacked sources are kept at once (least recently used go first).
const KEPT_RUN_SOURCES: usize = 8;

/// Fetches a snapshot and unpacks it into a directory of the run's own: streamed to a file
/// while hashed, held to the coordinator's limits, checked whole, then written without
/// following any link and left read-only. Nothing one run sends can touch another's tree.
async fn fetch_snapshot(
    shared: &Arc<Shared>,
    channel: Channel,
    run_id: &str,
    digest: &str,
) -> Result<PathBuf, NixError> {
    if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(NixError::Infra("bad snapshot digest".into()));
    }
    if !nixfarm_core::limits::is_run_id(run_id) {
        return Err(NixError::Infra("bad run id".into()));
    }
    let sources = shared.cfg.work_dir.join("sources");
    let dir = sources.join(format!("{run_id}-{digest}"));
    let _guard = shared.source_lock.lock().await;
    touch_run_source(shared, &sources, &dir);
    if dir.is_dir() {
        return Ok(dir);
    }
    let infra = |e: String| NixError::Infra(format!("cannot fetch source {digest}: {e}"));
    std::fs::create_dir_all(&sources).map_err(|e| infra(e.to_string()))?;
    let limits = shared
        .snapshot_limits
        .lock()
        .map(|l| *l)
        .unwrap_or_default();
    let tar = sources.join(format!(".tmp-{run_id}-{digest}.tar"));
    let result = async {
        download(shared, channel, digest, &tar, limits).await?;
        let tmp = sources.join(format!(".tmp-{run_id}-{digest}"));
        let _ = snapshot::remove_tree(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| infra(e.to_string()))?;
        let (t, d) = (tar.clone(), tmp.clone());
        tokio::task::spawn_blocking(move || snapshot::unpack_file(&t, &d, limits))
            .await
            .map_err(|e| infra(e.to_string()))?
            .map_err(|e| infra(e.to_string()))?;
        std::fs::rename(&tmp, &dir).map_err(|e| infra(e.to_string()))?;
        Ok(dir.clone())
    }
    .await;
    let _ = std::fs::remove_file(&tar);
    result
}

/// Streams a snapshot from the coordinator into `to`, checking its size on the way and its
/// digest at the end.
async fn download(
    shared: &Arc<Shared>,
    channel: Channel,
    digest: &str,
    to: &std::path::Path,
    limits: snapshot::Limits,
) -> Result<(), NixError> {
    use sha2::Digest as _;
    use tokio::io::AsyncWriteExt;
    let infra = |e: String| NixError::Infra(format!("cannot fetch source {digest}: {e}"));
    let mut client = AgentServiceClient::new(channel).max_decoding_message_size(64 << 20);
    let mut req = tonic::Request::new(pb::FetchSourceRequest {
        digest: digest.to_string(),
    });
    add_token(&mut req, &shared.token);
    let mut stream = client
        .fetch_source(req)
        .await
        .map_err(|e| infra(e.to_string()))?
        .into_inner();
    let file = tokio::fs::File::create(to)
        .await
        .map_err(|e| infra(e.to_string()))?;
    let mut out = tokio::io::BufWriter::new(file);
    let mut hasher = sha2::Sha256::new();
    let (mut size, cap) = (0u64, snapshot::max_tar_bytes(limits));
    loop {
        let chunk = tokio::time::timeout(Duration::from_secs(60), stream.message())
            .await
            .map_err(|_| infra("the coordinator sent nothing for 60 s".into()))?
            .map_err(|e| infra(e.to_string()))?;
        let Some(chunk) = chunk else { break };
        size += chunk.data.len() as u64;
        if size > cap {
            return Err(infra(format!(
                "larger than the limit of {} bytes",
                limits.max_bytes
            )));
        }
        hasher.update(&chunk.data);
        out.write_all(&chunk.data)
            .await
            .map_err(|e| infra(e.to_string()))?;
    }
    out.flush().await.map_err(|e| infra(e.to_string()))?;
    if data_encoding::HEXLOWER.encode(&hasher.finalize()) != digest {
        return Err(infra("digest mismatch".into()));
    }
    Ok(())
}

/// Removes the unpacked sources of a run that ended.
pub(crate) fn drop_run_sources(shared: &Shared, run_id: &str) {
    if !nixfarm_core::limits::is_run_id(run_id) {
        return;
    }
    let sources = shared.cfg.work_dir.join("sources");
    let prefix = format!("{run_id}-");
    if let Ok(mut lru) = shared.run_sources.lock() {
        lru.retain(|n| !n.starts_with(&prefix));
    }
    if let Ok(entries) = std::fs::read_dir(&sources) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = snapshot::remove_tree(&e.path());
            }
        }
    }
}

/// Marks the run's source as used now, and removes the least recently used ones beyond
/// [`KEPT_RUN_SOURCES`] (a run that needs one again fetches it again).
fn touch_run_source(shared: &Shared, sources: &std::path::Path, dir: &std::path::Path) {
    let Some(name) = dir.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return;
    };
    let Ok(mut lru) = shared.run_sources.lock() else {
        return;
    };
    lru.retain(|n| *n != name);
    lru.push_back(name);
    let keep = KEPT_RUN_SOURCES.max(2 * shared.cfg.max_jobs as usize);
    while lru.len() > keep {
        if let Some(old) = lru.pop_front()
            && let Err(e) = snapshot::remove_tree(&sources.join(&old))
        {
            tracing::warn!("cannot remove the old source {old}: {e}");
        }
    }
}

fn outputs_to_wire(o: &BTreeMap<String, String>) -> Vec<pb::DrvOutput> {
    o.iter()
        .map(|(n, p)| pb::DrvOutput {
            name: n.clone(),
            path: p.clone(),
        })
        .collect()
}

/// Evaluates attributes in groups; a group that fails is split in two until each failing
/// attribute stands alone, so one attribute that throws never hides the others.
async fn eval_isolated(
    shared: &Arc<Shared>,
    flake: &str,
    attr_path: &str,
    attrs: Vec<String>,
    mem: u64,
) -> Result<BTreeMap<String, Result<AttrInfo, String>>, NixError> {
    let sem = Arc::new(tokio::sync::Semaphore::new(shared.cfg.eval_workers.max(1)));
    let mut out = BTreeMap::new();
    let mut pending = vec![attrs];
    while !pending.is_empty() {
        let mut set = tokio::task::JoinSet::new();
        for group in pending.drain(..) {
            let (shared, flake, attr_path, sem) = (
                shared.clone(),
                flake.to_string(),
                attr_path.to_string(),
                sem.clone(),
            );
            set.spawn(async move {
                let _permit = sem.acquire_owned().await;
                let r = shared.nix.eval_attrs(&flake, &attr_path, &group, mem).await;
                (group, r)
            });
        }
        while let Some(joined) = set.join_next().await {
            let (group, r) =
                joined.map_err(|e| NixError::Infra(format!("evaluation task failed: {e}")))?;
            match r {
                Ok(map) => {
                    for (k, v) in map {
                        out.insert(k, Ok(v));
                    }
                }
                // An attribute that throws, or that runs past the memory cap, is the
                // attribute's own failure: isolated, while the others go on.
                Err(NixError::Failed { message, .. } | NixError::OutOfMemory(message))
                    if group.len() == 1 =>
                {
                    out.insert(group[0].clone(), Err(message));
                }
                Err(NixError::Failed { .. } | NixError::OutOfMemory(_)) => {
                    let mid = group.len() / 2;
                    pending.push(group[..mid].to_vec());
                    pending.push(group[mid..].to_vec());
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(out)
}

/// A job ran out of disk space: it is retried elsewhere, and this agent takes nothing new
/// for a while (the failed job's files are gone at once, so free space alone would look fine).
fn pause_for_full_disk(shared: &Shared) {
    if let Ok(mut until) = shared.disk_full_until.lock() {
        *until = Some(std::time::Instant::now() + crate::DISK_FULL_PAUSE);
    }
}

/// [`pause_for_full_disk`] when a failed evaluation's error says the disk is full.
fn pause_if_disk_full(shared: &Shared, error: &str) {
    if nixfarm_nix::messages::is_disk_full(error) {
        pause_for_full_disk(shared);
    }
}

/// Upload claims held at the coordinator: agents whose closures overlap (two evaluating
/// chunks that share derivations and sources) upload each path once.
struct Claims<'a> {
    shared: &'a Shared,
    channel: Channel,
    cache: &'a str,
}

impl<'a> Claims<'a> {
    fn new(shared: &'a Shared, channel: Channel, cache: &'a str) -> Self {
        Claims {
            shared,
            channel,
            cache,
        }
    }

    async fn call(&self, paths: &[String], release: bool) -> Result<Vec<bool>, String> {
        let mut client = AgentServiceClient::new(self.channel.clone());
        let mut granted = Vec::with_capacity(paths.len());
        for chunk in paths.chunks(10_000) {
            let mut req = tonic::Request::new(pb::ClaimUploadsRequest {
                agent: self.shared.cfg.name.clone(),
                cache: self.cache.to_string(),
                paths: chunk.to_vec(),
                release,
                session_key: self
                    .shared
                    .session
                    .lock()
                    .map(|s| s.clone())
                    .unwrap_or_default(),
            });
            req.set_timeout(Duration::from_secs(10));
            add_token(&mut req, &self.shared.token);
            let r = tokio::time::timeout(Duration::from_secs(15), client.claim_uploads(req))
                .await
                .map_err(|_| "timed out".to_string())?
                .map_err(|s| s.message().to_string())?;
            granted.extend(r.into_inner().granted);
        }
        Ok(granted)
    }
}

impl nixfarm_store::Arbiter for Claims<'_> {
    async fn claim(&self, paths: &[String]) -> Vec<bool> {
        match self.call(paths, false).await {
            Ok(g) if g.len() == paths.len() => g,
            Ok(_) | Err(_) => {
                // A coordinator out of reach must not stop the push: upload it all here.
                tracing::warn!(
                    "cannot claim uploads at the coordinator; uploading without a claim"
                );
                vec![true; paths.len()]
            }
        }
    }
    async fn release(&self, paths: &[String]) {
        if !paths.is_empty()
            && let Err(e) = self.call(paths, true).await
        {
            tracing::debug!("cannot release upload claims: {e}");
        }
    }
}

/// The pusher for a run's cache URL.
async fn pusher(shared: &Arc<Shared>, url: &str) -> Result<Arc<nixfarm_store::Pusher>, NixError> {
    let mut map = shared.pushers.lock().await;
    if let Some(p) = map.get(url) {
        return Ok(p.clone());
    }
    let p = Arc::new(
        nixfarm_store::Pusher::for_url(
            url,
            shared.nix.clone(),
            shared.creds.key.clone(),
            shared.creds.cachix_token.clone(),
        )
        .map_err(|e| NixError::Infra(e.to_string()))?,
    );
    map.insert(url.to_string(), p.clone());
    Ok(p)
}

/// Evaluates a chunk and roots its derivations for the run. The host's garbage collector may
/// strike between Nix writing a `.drv` and the root being made: then the chunk is evaluated
/// once more (the roots already exist, so what it writes stays).
async fn eval_rooted(
    shared: &Arc<Shared>,
    run_id: &str,
    flake: &str,
    j: &pb::EvalChunkJob,
) -> Result<BTreeMap<String, Result<AttrInfo, String>>, NixError> {
    let mut tries = 0;
    loop {
        tries += 1;
        let evaluated = eval_isolated(
            shared,
            flake,
            &j.attr_path,
            j.attrs.clone(),
            j.eval_memory_mib,
        )
        .await?;
        let tops: Vec<String> = evaluated
            .values()
            .filter_map(|r| r.as_ref().ok().map(|i| i.drv_path.clone()))
            .collect();
        if let Err(e) = shared.roots.add(run_id, &tops) {
            // Without roots the run still works, unless the host collects garbage meanwhile.
            tracing::warn!(
                "cannot add GC roots in {}: {e}",
                shared.roots.dir().display()
            );
        }
        let gone = shared.nix.invalid_paths(&tops).await?;
        if gone.is_empty() {
            return Ok(evaluated);
        }
        if tries >= 3 {
            return Err(NixError::Infra(format!(
                "{} derivation(s) were garbage-collected as soon as they were evaluated (e.g. {})",
                gone.len(),
                gone[0]
            )));
        }
        tracing::info!(
            run = run_id,
            gone = gone.len(),
            "derivations collected before they were rooted; evaluating again"
        );
    }
}

async fn eval_chunk(
    shared: &Arc<Shared>,
    channel: Channel,
    run_id: &str,
    j: pb::EvalChunkJob,
) -> pb::EvalChunkResult {
    let fail = |e: NixError| {
        let error = e.to_string();
        pause_if_disk_full(shared, &error);
        pb::EvalChunkResult {
            error,
            infra: e.is_infra(),
            ..Default::default()
        }
    };
    let flake = match prepare_source(shared, channel.clone(), run_id, j.source.clone()).await {
        Ok(f) => f,
        Err(e) => return fail(e),
    };
    let evaluated = match eval_rooted(shared, run_id, &flake, &j).await {
        Ok(m) => m,
        Err(e) => return fail(e),
    };
    let mut attrs = Vec::new();
    let mut tops = Vec::new();
    for name in &j.attrs {
        match evaluated.get(name) {
            Some(Ok(info)) => {
                tops.push(info.drv_path.clone());
                attrs.push(pb::EvaluatedAttr {
                    attr: name.clone(),
                    drv_path: info.drv_path.clone(),
                    outputs: outputs_to_wire(&info.outputs),
                    pname: info.pname.clone(),
                    version: info.version.clone(),
                    position: info.position.clone(),
                    rev: info.rev.clone(),
                    system: info.system.clone(),
                    error: String::new(),
                    timeout_secs: info.timeout,
                    max_silent_secs: info.max_silent,
                });
            }
            Some(Err(e)) => attrs.push(pb::EvaluatedAttr {
                attr: name.clone(),
                error: e.clone(),
                ..Default::default()
            }),
            None => attrs.push(pb::EvaluatedAttr {
                attr: name.clone(),
                error: "attribute vanished during evaluation".into(),
                ..Default::default()
            }),
        }
    }
    let drvs = match shared.nix.show_derivations(&tops).await {
        Ok(d) => d,
        Err(e) => return fail(NixError::Infra(format!("cannot read derivations: {e}"))),
    };
    // Warm mode: derivations whose outputs the cache (or, without one, this store) has.
    let mut present = std::collections::HashSet::new();
    if j.skip_cached {
        let outs: Vec<String> = drvs
            .iter()
            .flat_map(|d| d.outputs.iter().map(|(_, p)| p.clone()))
            .filter(|p| !p.is_empty())
            .collect();
        let missing: std::collections::HashSet<String> = if j.cache.is_empty() {
            match shared.nix.invalid_paths(&outs).await {
                Ok(m) => m.into_iter().collect(),
                Err(e) => return fail(e),
            }
        } else {
            match pusher(shared, &j.cache).await {
                Ok(p) => match p.missing(&outs).await {
                    Ok(m) => m.into_iter().collect(),
                    Err(e) => return fail(NixError::Infra(format!("cannot query the cache: {e}"))),
                },
                Err(e) => return fail(e),
            }
        };
        for d in &drvs {
            if !d.outputs.is_empty()
                && d.outputs
                    .iter()
                    .all(|(_, p)| !p.is_empty() && !missing.contains(p))
            {
                present.insert(d.path.clone());
            }
        }
    }
    if !j.cache.is_empty() {
        // Builders on other hosts fetch the derivations (and their sources) from the cache.
        let claims = Claims::new(shared, channel, &j.cache);
        let pushed = match pusher(shared, &j.cache).await {
            Ok(p) => p
                .push_closure_with(&tops, &claims)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = pushed {
            return fail(NixError::Infra(format!(
                "cannot push the derivations to {}: {e}",
                j.cache.split('?').next().unwrap_or_default()
            )));
        }
    }
    let drvs = drvs
        .into_iter()
        .map(|d| pb::DrvNode {
            present: present.contains(&d.path),
            drv_path: d.path,
            system: d.system,
            features: d.features,
            outputs: d
                .outputs
                .into_iter()
                .map(|(name, path)| pb::DrvOutput { name, path })
                .collect(),
            input_drvs: d.input_drvs,
            fixed_output: d.fixed_output,
            output_hash: d.output_hash,
            hints: d.hints,
        })
        .collect();
    pb::EvalChunkResult {
        attempt_id: String::new(),
        attrs,
        drvs,
        error: String::new(),
        infra: false,
    }
}

async fn build(
    shared: &Arc<Shared>,
    channel: Channel,
    run_id: &str,
    j: pb::BuildJob,
    cancel: CancellationToken,
    logs: mpsc::Sender<pb::AgentMessage>,
    attempt: String,
) -> pb::BuildResult {
    // What Nix substitutes from: the cache's read URL (Cachix: its `uri`) and its keys.
    let mut trusted = j.trusted_public_keys.clone();
    let mut substituter = String::new();
    let push = if j.cache.is_empty() {
        None
    } else {
        match pusher(shared, &j.cache).await {
            Ok(p) => {
                match p.substituter().await {
                    Ok((url, keys)) => {
                        substituter = url;
                        trusted.extend(keys);
                    }
                    Err(e) => {
                        return pb::BuildResult {
                            status: pb::BuildStatus::InfraFailed as i32,
                            message: format!("cannot reach the cache: {e}"),
                            ..Default::default()
                        };
                    }
                }
                Some(p)
            }
            Err(e) => {
                return pb::BuildResult {
                    status: pb::BuildStatus::InfraFailed as i32,
                    message: e.to_string(),
                    ..Default::default()
                };
            }
        }
    };
    trusted.sort();
    trusted.dedup();
    let opts = BuildOptions {
        substituter,
        trusted_public_keys: trusted,
        timeout: (j.timeout_secs > 0).then(|| Duration::from_secs(j.timeout_secs)),
        max_silent: (j.max_silent_secs > 0).then(|| Duration::from_secs(j.max_silent_secs)),
    };
    // A derivation this store does not hold (evaluated on another host, or collected): fetch
    // it, with its inputs, from the run's cache; without one, say what is missing.
    if !shared
        .nix
        .paths_valid(std::slice::from_ref(&j.drv_path))
        .await
    {
        let fetched = if opts.substituter.is_empty() {
            Err(NixError::Infra(
                "the run has no cache to fetch it from".into(),
            ))
        } else {
            shared
                .nix
                .copy_from(
                    &opts.substituter,
                    std::slice::from_ref(&j.drv_path),
                    &opts.trusted_public_keys,
                )
                .await
        };
        if let Err(e) = fetched {
            return pb::BuildResult {
                status: pb::BuildStatus::InfraFailed as i32,
                message: format!(
                    "derivation {} is not in agent {}'s store and cannot be fetched: {e}; agents on separate hosts need a cache they share (--cache)",
                    j.drv_path, shared.cfg.name
                ),
                ..Default::default()
            };
        }
    }
    let _ = shared.roots.add(run_id, std::slice::from_ref(&j.drv_path));
    let limit = shared.cfg.log_limit_bytes;
    let mut sent = 0usize;
    let run = shared
        .nix
        .realise(&j.drv_path, &opts, cancel, |chunk| {
            // Live log, capped per job; the tail always travels with the result.
            if sent < limit {
                let n = chunk.len().min(limit - sent);
                sent += n;
                let _ = logs.try_send(msg(pb::agent_message::Msg::Log(pb::LogChunk {
                    attempt_id: attempt.clone(),
                    data: chunk[..n].to_vec(),
                })));
            }
        })
        .await;
    let mut r = pb::BuildResult {
        duration_ms: run.duration.as_millis() as u64,
        log_tail: run.log_tail.clone(),
        substituted: run.substituted,
        ..Default::default()
    };
    if run.cancelled {
        r.status = pb::BuildStatus::Cancelled as i32;
        r.message = "cancelled".into();
        return r;
    }
    match run.result {
        Ok(paths) => {
            r.status = pb::BuildStatus::Built as i32;
            // Dependents may build here later: the outputs stay until the run ends.
            if let Err(e) = shared.roots.add(run_id, &paths) {
                tracing::warn!("cannot root the outputs of {}: {e}", j.drv_path);
            }
            // Pushed even when nothing was built: the output may predate the run (the push asks
            // the cache first and uploads only what it lacks).
            if let Some(p) = &push
                && let Err(e) = p
                    .push_closure_with(&paths, &Claims::new(shared, channel, &j.cache))
                    .await
            {
                // Built: the outputs exist; only publishing failed, after retries.
                r.status = pb::BuildStatus::NotCached as i32;
                r.message = format!("built, but the push to the cache failed: {e}");
            }
            r.outputs = match shared
                .nix
                .show_derivations(std::slice::from_ref(&j.drv_path))
                .await
            {
                Ok(ds) => ds
                    .into_iter()
                    .find(|d| d.path == j.drv_path)
                    .map(|d| {
                        d.outputs
                            .into_iter()
                            .map(|(name, path)| pb::DrvOutput { name, path })
                            .collect()
                    })
                    .unwrap_or_default(),
                Err(_) => paths
                    .iter()
                    .map(|p| pb::DrvOutput {
                        name: "out".into(),
                        path: p.clone(),
                    })
                    .collect(),
            };
        }
        Err(Failure::HashMismatch(m)) => {
            r.status = pb::BuildStatus::HashMismatch as i32;
            r.message = format!("hash mismatch: specified {}, got {}", m.specified, m.got);
            r.specified_hash = m.specified;
            r.got_hash = m.got;
        }
        Err(Failure::TimedOut(m)) => {
            r.status = pb::BuildStatus::TimedOut as i32;
            r.message = m;
        }
        Err(Failure::BuildFailed(m)) => {
            r.status = pb::BuildStatus::Failed as i32;
            r.message = m;
        }
        Err(Failure::DiskFull(m)) => {
            pause_for_full_disk(shared);
            r.status = pb::BuildStatus::InfraFailed as i32;
            r.message = format!("agent {} ran out of disk space: {m}", shared.cfg.name);
        }
        Err(Failure::Infra(m)) => {
            r.status = pb::BuildStatus::InfraFailed as i32;
            r.message = m;
        }
    }
    r
}
