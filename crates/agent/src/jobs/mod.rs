//! Running one assigned job: fetch the source, evaluate or build with Nix, report.

use crate::{Shared, add_token};
use nixfarm_core::snapshot;
use nixfarm_nix::entry::Entry;
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

mod assigned;
mod build;
mod check;
mod claims;
mod disk;
mod eval;
mod flake_ref;
mod isolate;
pub(crate) mod output_locks;
mod prewarm;
mod route;
mod smoke;
mod source;
mod substitution;
mod warm;

use build::build;
use claims::Claims;
use eval::eval_chunk;
pub(crate) use source::drop_run_sources;
use source::prepare_source;
use substitution::{Substitution, substitution};

fn msg(m: pb::agent_message::Msg) -> pb::AgentMessage {
    pb::AgentMessage { msg: Some(m) }
}

/// The result message for an assignment handed back unrun.
pub(crate) fn cancelled_result(a: &pb::Assignment, why: &str) -> pb::AgentMessage {
    use pb::assignment::Job;
    match &a.job {
        Some(Job::Build(_)) => msg(pb::agent_message::Msg::Build(pb::BuildResult {
            attempt_id: a.attempt_id.clone(),
            status: pb::BuildStatus::Cancelled as i32,
            message: why.into(),
            ..Default::default()
        })),
        Some(Job::EvalList(_)) => msg(pb::agent_message::Msg::EvalList(pb::EvalListResult {
            attempt_id: a.attempt_id.clone(),
            error: why.into(),
            infra: true,
            ..Default::default()
        })),
        _ => msg(pb::agent_message::Msg::EvalChunk(pb::EvalChunkResult {
            attempt_id: a.attempt_id.clone(),
            error: why.into(),
            infra: true,
            ..Default::default()
        })),
    }
}

/// The attempt a result message answers.
pub(crate) fn result_attempt(m: &pb::AgentMessage) -> Option<String> {
    use pb::agent_message::Msg;
    match m.msg.as_ref()? {
        Msg::EvalList(r) => Some(r.attempt_id.clone()),
        Msg::RepoChecks(r) => Some(r.attempt_id.clone()),
        Msg::EvalChunk(r) => Some(r.attempt_id.clone()),
        Msg::Build(r) => Some(r.attempt_id.clone()),
        _ => None,
    }
    .filter(|a| !a.is_empty())
}

/// A message that follows a job's result, for the same attempt (sent after it, in order).
pub(crate) type FollowUp =
    std::pin::Pin<Box<dyn std::future::Future<Output = pb::AgentMessage> + Send>>;

pub(crate) async fn run(
    shared: &Arc<Shared>,
    channel: Channel,
    a: pb::Assignment,
    cancel: CancellationToken,
    logs: mpsc::Sender<pb::AgentMessage>,
) -> (pb::AgentMessage, Option<FollowUp>) {
    // The run's unpacked source stays while the job (its follow-up included) goes on:
    // an evaluation reads it for as long as it runs.
    let in_use = source::RunInUse::new(shared, &a.run_id);
    let (m, follow_up) = run_job(shared, channel, a, cancel, logs).await;
    let follow_up = follow_up.map(|f| {
        Box::pin(async move {
            let _in_use = in_use;
            f.await
        }) as FollowUp
    });
    (m, follow_up)
}

async fn run_job(
    shared: &Arc<Shared>,
    channel: Channel,
    a: pb::Assignment,
    cancel: CancellationToken,
    logs: mpsc::Sender<pb::AgentMessage>,
) -> (pb::AgentMessage, Option<FollowUp>) {
    use pb::assignment::Job;
    let attempt = a.attempt_id.clone();
    let run_id = a.run_id.clone();
    shared.store_opened().await;
    // An evaluation substitutes from the run's cache too (imports from derivations).
    let refused = match &a.job {
        Some(Job::EvalList(j)) => cache_allowed(shared, &j.cache).err(),
        Some(Job::EvalChunk(j)) => cache_allowed(shared, &j.cache).err(),
        _ => None,
    };
    if let Some(error) = refused {
        let m = match a.job {
            Some(Job::EvalList(_)) => pb::agent_message::Msg::EvalList(pb::EvalListResult {
                attempt_id: attempt,
                error,
                infra: true,
                ..Default::default()
            }),
            _ => {
                let mut r = eval::chunk_failure(shared, NixError::Infra(error));
                r.attempt_id = attempt;
                pb::agent_message::Msg::EvalChunk(r)
            }
        };
        return (msg(m), None);
    }
    match a.job {
        Some(Job::EvalList(j)) => {
            let limits = (j.build_timeout_secs, j.build_max_silent_secs);
            prewarm::prewarm_builds(shared, (&j.cache, &j.trusted_public_keys), limits, None);
            let up_to = j.evaluate_up_to as usize;
            let result = async {
                let flake =
                    prepare_source(shared, channel.clone(), &run_id, j.source.clone()).await?;
                let entry =
                    source::entry_for(&flake, j.entry.clone(), shared.cfg.allow_local_flake_refs)?;
                source::check_flake_inputs(shared, &entry).await?;
                let listed =
                    eval::list_with_checks(shared, &entry, &j.attr_path, up_to, j.eval_memory_mib)
                        .await?;
                Ok::<_, NixError>((flake, entry, listed))
            }
            .await;
            let mut unnamable = None;
            let (attrs, evaluated, error, infra, follow_up) = match result {
                Ok((flake, entry, ((mut a, mut caught), mut rest))) => {
                    // Names the coordinator refuses would sink the whole listing: left out,
                    // and said among the repository's checks.
                    if let Some(check) =
                        eval::leave_out_unnamable(&j.attr_path, &mut a, &mut caught)
                    {
                        match &mut rest {
                            Some((_, repository)) => repository.push(check),
                            None => unnamable = Some(check),
                        }
                    }
                    // A small repository evaluated by its listing: made into what a task
                    // would have sent, before the listing goes.
                    let evaluated = match caught {
                        Some(c) => {
                            eval::listing_evaluation(
                                shared, channel, &attempt, &run_id, &flake, &j, c,
                            )
                            .await
                        }
                        None => None,
                    };
                    if let Some(e) = &evaluated {
                        prewarm::prewarm_builds(
                            shared,
                            (&j.cache, &j.trusted_public_keys),
                            limits,
                            Some(&e.attrs),
                        );
                    }
                    // The packages go to be evaluated now; the flake's other outputs are
                    // checked meanwhile and follow, for the same attempt.
                    let follow_up = rest.map(|(system, mut repository)| {
                        let (shared, attempt, mem) =
                            (shared.clone(), attempt.clone(), j.eval_memory_mib);
                        Box::pin(async move {
                            repository
                                .extend(eval::other_outputs(&shared, &entry, &system, mem).await);
                            msg(pb::agent_message::Msg::RepoChecks(pb::RepoChecksResult {
                                attempt_id: attempt,
                                repository,
                            }))
                        }) as FollowUp
                    });
                    (a, evaluated, String::new(), false, follow_up)
                }
                Err(e) => (vec![], None, e.to_string(), e.is_infra(), None),
            };
            pause_if_disk_full(shared, &error);
            let follows = follow_up.is_some();
            (
                msg(pb::agent_message::Msg::EvalList(pb::EvalListResult {
                    attempt_id: attempt,
                    attrs,
                    error,
                    infra,
                    repository: unnamable.into_iter().collect(),
                    repository_follows: follows,
                    evaluated,
                })),
                follow_up,
            )
        }
        Some(Job::EvalChunk(j)) => {
            let (cache, keys, limits) = (
                j.cache.clone(),
                j.trusted_public_keys.clone(),
                (j.build_timeout_secs, j.build_max_silent_secs),
            );
            prewarm::prewarm_builds(shared, (&cache, &keys), limits, None);
            let mut r = eval_chunk(shared, channel, &attempt, &run_id, j).await;
            prewarm::prewarm_builds(shared, (&cache, &keys), limits, Some(&r.attrs));
            r.attempt_id = attempt;
            (msg(pb::agent_message::Msg::EvalChunk(r)), None)
        }
        Some(Job::Build(j)) => {
            // Checked once, here: past this point the job's fields are typed.
            let mut r = match assigned::BuildJob::try_from(j) {
                Ok(j) => build(shared, channel, &run_id, j, cancel, logs, attempt.clone()).await,
                Err(e) => pb::BuildResult {
                    status: pb::BuildStatus::InfraFailed as i32,
                    message: e.to_string(),
                    ..Default::default()
                },
            };
            r.attempt_id = attempt;
            (msg(pb::agent_message::Msg::Build(r)), None)
        }
        None => (
            msg(pb::agent_message::Msg::Build(pb::BuildResult {
                attempt_id: attempt,
                status: pb::BuildStatus::InfraFailed as i32,
                message: "empty assignment".into(),
                ..Default::default()
            })),
            None,
        ),
    }
}

/// A job ran out of disk space: it is retried elsewhere, and this agent takes nothing new
/// for a while (the failed job's files are gone at once, so free space alone would look fine).
fn pause_for_full_disk(shared: &Shared) {
    if let Ok(mut until) = shared.disk_full_until.lock() {
        *until = Some(std::time::Instant::now() + crate::DISK_FULL_PAUSE);
    }
}

/// [`pause_for_full_disk`] when a failed evaluation's error says the disk is full and this
/// host's free space agrees (an expression can `abort` with the words).
fn pause_if_disk_full(shared: &Shared, error: &str) {
    if nixfarm_nix::messages::is_disk_full(error) {
        match disk::confirmed(shared, None) {
            Ok(()) => pause_for_full_disk(shared),
            Err(free) => tracing::warn!(
                free_mib = free,
                "an evaluation said the disk is full, but this host has room: not pausing"
            ),
        }
    }
}

/// The coordinator's farm cache, when it has one.
/// (name, path) outputs as they travel (no NAR hash: only held outputs carry one).
fn outputs_wire(outputs: impl IntoIterator<Item = (String, String)>) -> Vec<pb::DrvOutput> {
    outputs
        .into_iter()
        .map(|(name, path)| pb::DrvOutput {
            name,
            path,
            ..Default::default()
        })
        .collect()
}

fn farm_cache(shared: &Shared) -> Option<crate::FarmCacheUse> {
    shared.farm_cache.lock().ok().and_then(|f| f.clone())
}

/// The cache a job moves derivations and outputs through: the run's own, else the
/// coordinator's farm cache (empty: none; the agents share one store).
fn transport_cache(shared: &Shared, run_cache: &str) -> String {
    if !run_cache.is_empty() {
        return run_cache.to_string();
    }
    farm_cache(shared).map(|f| f.url).unwrap_or_default()
}

/// Whether this agent substitutes from a run's cache: any, unless its operator listed them
/// (`run_caches`; a coordinator that knows the list sends no other).
pub(crate) fn cache_allowed(shared: &Shared, run_cache: &str) -> Result<(), String> {
    // It becomes a Nix option (a substituter, `nix copy --to`): a URL nixfarm can use, or nothing.
    if !run_cache.is_empty() {
        nixfarm_core::cache_url::CacheTarget::parse(run_cache).map_err(|e| e.to_string())?;
    }
    let listed = &shared.cfg.run_caches;
    if nixfarm_core::cache_url::cache_listed(listed, run_cache) {
        return Ok(());
    }
    Err(format!(
        "agent {} substitutes only from the run caches its operator listed (run_caches), and '{}' is none of them",
        shared.cfg.name,
        nixfarm_core::limits::clip(run_cache, 200)
    ))
}

/// Whether this agent's Cachix token may go to the API a run's cache URL names: Cachix's own,
/// or one its operator allowed. The URL comes from whoever submitted the run.
fn token_may_go_to(allowed: &[String], url: &str) -> Result<(), NixError> {
    use nixfarm_core::cache_url::{CACHIX_API, CacheTarget};
    let Ok(CacheTarget::Cachix { api, .. }) = CacheTarget::parse(url) else {
        return Ok(());
    };
    let root = |u: &str| u.trim_end_matches('/').to_string();
    if root(&api) == root(CACHIX_API) || allowed.iter().any(|a| root(a) == root(&api)) {
        return Ok(());
    }
    Err(NixError::Infra(format!(
        "the run's Cachix API {} is not one this agent sends its CACHIX_AUTH_TOKEN to (Cachix's own, or one set with --cachix-api-url or cachix_api_urls): nothing is pushed",
        nixfarm_core::limits::clip(&api, 200)
    )))
}

/// The pusher for a run's cache URL.
async fn pusher(shared: &Arc<Shared>, url: &str) -> Result<Arc<nixfarm_store::Pusher>, NixError> {
    let mut map = shared.pushers.lock().await;
    if let Some(p) = map.get(url) {
        return Ok(p.clone());
    }
    let p = match farm_cache(shared).filter(|f| f.url == url) {
        // The farm cache checks and signs what it is sent; it takes the agent's own token,
        // or the one issued to it.
        Some(f) => {
            let mut p = nixfarm_store::Pusher::for_url(url, shared.nix.clone(), None, None)
                .map_err(|e| NixError::Infra(e.to_string()))?
                .with_http_token(f.token.clone());
            if let Some(ca) = &shared.cfg.tls_ca_file {
                let pem = std::fs::read(ca)
                    .map_err(|e| NixError::Infra(format!("cannot read {}: {e}", ca.display())))?;
                p = p
                    .with_root_ca(&pem)
                    .map_err(|e| NixError::Infra(e.to_string()))?;
            }
            p.opts.server_signs = true;
            p
        }
        None => {
            if shared.creds.cachix_token.is_some() {
                token_may_go_to(&shared.cfg.cachix_api_urls, url)?;
            }
            nixfarm_store::Pusher::for_url(
                url,
                shared.nix.clone(),
                shared.creds.key.clone(),
                shared.creds.cachix_token.clone(),
            )
            .map_err(|e| NixError::Infra(e.to_string()))?
        }
    };
    let p = Arc::new(p);
    map.insert(url.to_string(), p.clone());
    Ok(p)
}

#[cfg(test)]
mod token_tests {
    use super::token_may_go_to;

    #[test]
    fn the_cachix_token_goes_only_to_cachix_or_an_api_the_operator_allowed() {
        let allowed = vec!["http://127.0.0.1:9000/api/v1".to_string()];
        for ok in [
            "cachix://c",
            "cachix://c?api=https://app.cachix.org/api/v1",
            "cachix://c?api=http://127.0.0.1:9000/api/v1/",
            "https://cache.example/x",
        ] {
            assert!(token_may_go_to(&allowed, ok).is_ok(), "{ok}");
        }
        for bad in [
            "cachix://c?api=http://evil.example/",
            "cachix://c?api=https://app.cachix.org.evil.example/api/v1/",
            "cachix://c?api=http://127.0.0.1:9001/api/v1/",
        ] {
            let e = token_may_go_to(&allowed, bad).unwrap_err().to_string();
            assert!(
                e.contains("not one this agent sends its CACHIX_AUTH_TOKEN to"),
                "{e}"
            );
        }
        assert!(token_may_go_to(&[], "cachix://c?api=http://127.0.0.1:9000/api/v1").is_err());
    }
}

#[cfg(test)]
mod edge_tests {
    use super::*;

    /// An agent working in `d`, whose operator listed `run_caches`, and a channel to a
    /// coordinator that is never dialled (the refusals come first).
    fn agent_in(d: &std::path::Path, run_caches: &[&str]) -> (crate::Agent, Channel) {
        let agent = crate::Agent::new(crate::AgentConfig {
            work_dir: d.join("work"),
            gc_roots_dir: Some(d.join("roots")),
            run_caches: run_caches.iter().map(|c| c.to_string()).collect(),
            ..Default::default()
        })
        .unwrap();
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        (agent, channel)
    }

    #[tokio::test]
    async fn a_job_of_a_run_whose_cache_the_operator_did_not_list_is_refused() {
        // (the operator's list, the run's cache, what the refusal says)
        let cases = [
            (
                &["cachix://team"][..],
                "https://other.example.org",
                "run_caches",
            ),
            // Any cache, but one Nix would read as two options is none.
            (
                &[][..],
                "https://c.example.org extra",
                "unsupported cache URL",
            ),
        ];
        for (listed, other, said) in cases {
            let d = tempfile::tempdir().unwrap();
            let (agent, channel) = agent_in(d.path(), listed);
            let (logs, _rx) = mpsc::channel(8);
            let assignment = |job| pb::Assignment {
                attempt_id: "t1".into(),
                run_id: "r1".into(),
                job: Some(job),
            };
            let other = other.to_string();
            let build = pb::assignment::Job::Build(pb::BuildJob {
                drv_path: format!("/nix/store/{}-x.drv", "0".repeat(32)),
                cache: other.clone(),
                ..Default::default()
            });
            let check = pb::assignment::Job::Build(pb::BuildJob {
                drv_path: format!("/nix/store/{}-x.drv", "0".repeat(32)),
                cache: other.clone(),
                check: true,
                ..Default::default()
            });
            let list = pb::assignment::Job::EvalList(pb::EvalListJob {
                cache: other.clone(),
                ..Default::default()
            });
            let chunk = pb::assignment::Job::EvalChunk(pb::EvalChunkJob {
                cache: other,
                ..Default::default()
            });
            for job in [build, check, list, chunk] {
                let (m, _) = run(
                    &agent.shared,
                    channel.clone(),
                    assignment(job),
                    CancellationToken::new(),
                    logs.clone(),
                )
                .await;
                let (error, infra) = match m.msg {
                    Some(pb::agent_message::Msg::Build(r)) => {
                        (r.message, r.status == pb::BuildStatus::InfraFailed as i32)
                    }
                    Some(pb::agent_message::Msg::EvalList(r)) => (r.error, r.infra),
                    Some(pb::agent_message::Msg::EvalChunk(r)) => (r.error, r.infra),
                    other => panic!("{other:?}"),
                };
                assert!(infra && error.contains(said), "{error}");
            }
        }
    }

    #[tokio::test]
    async fn a_build_of_what_is_not_a_derivation_path_is_refused_before_nix_sees_it() {
        let d = tempfile::tempdir().unwrap();
        let (agent, channel) = agent_in(d.path(), &[]);
        let (logs, _rx) = mpsc::channel(8);
        for bad in [
            "--option",
            "/etc/passwd",
            "/nix/store/abc-x.drv",
            "/nix/store/00000000000000000000000000000000-not-a-drv",
        ] {
            let a = pb::Assignment {
                attempt_id: "t1".into(),
                run_id: "r1".into(),
                job: Some(pb::assignment::Job::Build(pb::BuildJob {
                    drv_path: bad.into(),
                    ..Default::default()
                })),
            };
            let (m, _) = run(
                &agent.shared,
                channel.clone(),
                a,
                CancellationToken::new(),
                logs.clone(),
            )
            .await;
            match m.msg {
                Some(pb::agent_message::Msg::Build(r)) => {
                    assert_eq!(r.status, pb::BuildStatus::InfraFailed as i32, "{bad}");
                    assert!(
                        r.message.contains("as a derivation to build"),
                        "{bad}: {}",
                        r.message
                    );
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
