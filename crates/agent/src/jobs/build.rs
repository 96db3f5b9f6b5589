//! Build jobs: fetch a missing derivation, realise it with Nix, root and push its outputs, report the outcome.

use super::*;

pub(super) async fn build(
    shared: &Arc<Shared>,
    channel: Channel,
    run_id: &str,
    j: super::assigned::BuildJob,
    cancel: CancellationToken,
    logs: mpsc::Sender<pb::AgentMessage>,
    attempt: String,
) -> pb::BuildResult {
    if let Err(e) = super::cache_allowed(shared, j.cache_url()) {
        return infra_failed(e);
    }
    let sub = match super::substitution(shared, j.cache_url(), &j.trusted_public_keys).await {
        Ok(s) => s,
        Err(e) => return infra_failed(e),
    };
    let opts = BuildOptions {
        gc_root: shared.roots.output_root(run_id, &j.drv),
        check: false,
        background: j.background,
        ..sub.nix_options(shared, (j.timeout, j.max_silent))
    };
    let super::Substitution {
        cache, farm, push, ..
    } = sub;
    // Held outputs (cross-checked builds of a run with a cache of its own) wait for their
    // check in the farm cache, in the store the agents share, or here in this agent's own
    // store (only their NAR hashes travel); the check publishes them. Told to hold them in
    // a farm cache it does not have, an agent builds nothing rather than push them to the
    // run's cache.
    use super::route::{Place, RunCache};
    let run_cache = match (&push, &farm) {
        (None, _) => RunCache::None,
        (Some(_), Some(_)) => RunCache::Farm,
        (Some(_), None) => RunCache::Own,
    };
    let staging_cache = farm_cache(shared).filter(|f| f.url != cache);
    let route = match super::route::route(j.hold, run_cache, staging_cache.is_some()) {
        Ok(r) => r,
        Err(e) => {
            return infra_failed(format!(
                "the outputs of {} are to wait for their check in the farm cache: {e}",
                j.drv
            ));
        }
    };
    let staging = match staging_cache {
        Some(f) if route.check_from == Place::FarmCache => match pusher(shared, &f.url).await {
            Ok(p) => Some((p, f)),
            Err(e) => {
                return infra_failed(format!("cannot reach the farm cache: {e}"));
            }
        },
        _ => None,
    };
    tracing::debug!(drv = %j.drv, background = j.background, "build");
    // A derivation this store does not hold (evaluated on another host, or collected): fetch
    // it, with its inputs, from the run's cache (through the build's own daemon when builds
    // go through one); without one, say what is missing. A stat, not a Nix process: this
    // runs before every build.
    let started = std::time::Instant::now();
    let drv_path = j.drv.to_string();
    let fetched_here = !std::path::Path::new(j.drv.as_str()).exists();
    if fetched_here {
        if opts.substituter.is_empty() {
            return infra_failed(format!(
                "derivation {} is not in agent {}'s store, and the run has no cache to fetch it from: agents on separate hosts need a cache they share (--cache)",
                j.drv, shared.cfg.name
            ));
        }
        if opts.trusted_public_keys.is_empty() {
            return infra_failed(format!(
                "derivation {} is not in agent {}'s store, and the run's cache has no key to check what it serves, so nothing is fetched from it: give the run --trusted-public-key, or the agents a signing key",
                j.drv, shared.cfg.name
            ));
        }
        let fetched = match shared.nix.substitute_daemon(&drv_path, &opts).await {
            Some(r) => r,
            None => shared
                .nix
                .copy_from(
                    &opts.substituter,
                    std::slice::from_ref(&drv_path),
                    &opts.trusted_public_keys,
                    opts.netrc.as_deref(),
                    opts.ssl_cert_file.as_deref(),
                )
                .await
                .map_err(|e| e.to_string()),
        };
        if let Err(e) = fetched {
            // Nix may still substitute it itself while realising; if not, its error says so.
            tracing::warn!("cannot fetch {} from the run's cache: {e}", j.drv);
        }
    }
    // A derivation is what its path says, or it is not built: one fetched from a cache is
    // only as good as whoever signed it (any agent holding the cache's key). One that
    // cannot be read is refused only when it came from the cache just now. What it
    // declares is read once here: its outputs to lock now, and to report after.
    use nixfarm_nix::text_path::{DrvCheck, check_derivation};
    let path = drv_path.clone();
    let checked = tokio::task::spawn_blocking(move || check_derivation(&path))
        .await
        .unwrap_or(DrvCheck::Unreadable);
    let this = match checked {
        DrvCheck::Matches(drv) => Some(drv.to_derivation(&drv_path)),
        DrvCheck::Differs => {
            return forged_derivation(shared, &drv_path, "its content does not give its path")
                .await;
        }
        DrvCheck::Unreadable if fetched_here && std::path::Path::new(&drv_path).exists() => {
            return forged_derivation(shared, &drv_path, "it cannot be read as a derivation").await;
        }
        // A format only Nix reads (or not here yet: Nix may still fetch it while realising).
        DrvCheck::Unreadable => shared.nix.derivation(&drv_path).await.ok(),
    };
    let _ = shared.roots.add(run_id, std::slice::from_ref(&drv_path));
    // Another build here of the same output path (a shared or copied fixed-output hash):
    // wait for it rather than let Nix poll its lock every five seconds.
    let _outputs = shared
        .output_locks
        .hold(
            this.iter()
                .flat_map(|d| d.outputs.iter().map(|(_, p)| p.clone()))
                .filter(|p| p.starts_with('/'))
                .collect(),
        )
        .await;
    let prepared = started.elapsed();
    let limit = shared.cfg.log_limit_bytes;
    let mut sent = 0usize;
    let disk = super::disk::DiskWatch::default();
    let on_log = |chunk: &[u8]| {
        disk.observe(chunk);
        // Live log, capped per job; the tail always travels with the result.
        if sent < limit {
            let n = chunk.len().min(limit - sent);
            sent += n;
            let _ = logs.try_send(msg(pb::agent_message::Msg::Log(pb::LogChunk {
                attempt_id: attempt.clone(),
                data: chunk[..n].to_vec(),
            })));
        }
    };
    if j.check {
        use super::check::{Checked, Held, Publish};
        let from = match (route.check_from, &staging, &push) {
            (Place::FarmCache, Some((p, f)), _) => Checked::Cache(Held {
                cache: p,
                url: &f.url,
                keys: std::slice::from_ref(&f.public_key),
                netrc: f.netrc.as_deref(),
                ca: f.ca.as_deref(),
            }),
            (Place::RunCache, _, Some(p)) => Checked::Cache(Held {
                cache: p,
                url: &opts.substituter,
                keys: &opts.trusted_public_keys,
                netrc: opts.netrc.as_deref(),
                ca: opts.ssl_cert_file.as_deref(),
            }),
            // Only its NAR hashes came from the builder's own store.
            (Place::BuilderStore, _, _) => Checked::Reported(&j.expect),
            // The copy in this store, which the agents share, is the one checked.
            _ => Checked::ThisStore,
        };
        let publish = push.as_deref().filter(|_| route.publish).map(|p| Publish {
            cache: p,
            claims: Claims::new(shared, channel, &cache, &attempt),
        });
        let log = super::disk::Logged {
            sink: on_log,
            disk: &disk,
        };
        return super::check::check(shared, this, &opts, from, publish, cancel, log).await;
    }
    let run = shared
        .nix
        .realise(&drv_path, &opts, cancel.clone(), on_log)
        .await;
    let mut r = result_of(&run);
    if run.cancelled {
        return r;
    }
    match run.result {
        Ok(paths) => {
            r.status = pb::BuildStatus::Built as i32;
            // Dependents may build here later: the outputs stay until the run ends.
            if let Err(e) = shared.roots.add(run_id, &paths) {
                tracing::warn!("cannot root the outputs of {}: {e}", j.drv);
            }
            if let Some(d) = &this
                && !run.built
                && let Some((m, from)) = copied_hash(shared, d, &opts, &cancel).await
            {
                r.status = pb::BuildStatus::HashMismatch as i32;
                let whence = match &from {
                    Some(from) => format!("was produced by {from}"),
                    None => "was already there, from no recorded derivation".to_string(),
                };
                r.message = format!(
                    "hash mismatch: specified {}, got {} (the output with that hash {whence})",
                    m.specified, m.got
                );
                r.specified_hash = m.specified;
                r.got_hash = m.got;
                r.copied_from = from.unwrap_or_default();
                return r;
            }
            if let Some(smoke) = &j.smoke {
                let program = smoke.main_program.as_deref().unwrap_or("");
                let covers = shared
                    .nix
                    .isolation
                    .as_ref()
                    .map(|own| nixfarm_nix::isolation::Masks::of(own));
                let (outcome, output) = super::smoke::smoke(&paths, program, covers.as_ref()).await;
                r.smoke = match outcome {
                    nixfarm_core::Smoke::Passed => pb::SmokeOutcome::SmokePassed,
                    nixfarm_core::Smoke::Failed => pb::SmokeOutcome::SmokeFailed,
                    nixfarm_core::Smoke::Skipped => pb::SmokeOutcome::SmokeSkipped,
                    nixfarm_core::Smoke::NotRun => pb::SmokeOutcome::SmokeNotRun,
                } as i32;
                r.smoke_output = output;
            }
            // Pushed even when nothing was built: the output may predate the run (the push asks
            // the cache first and uploads only what it lacks).
            let pushing = std::time::Instant::now();
            let (to, to_url) = match (route.build_to, &staging) {
                (Place::FarmCache, Some((p, f))) => (Some(p), f.url.as_str()),
                (Place::RunCache, _) => (push.as_ref(), cache.as_str()),
                _ => (None, ""),
            };
            let pushed = match to {
                Some(p) => {
                    let claims = Claims::new(shared, channel, to_url, &attempt);
                    match p.push_closure_until(&paths, &claims, &cancel).await {
                        Err(nixfarm_store::StoreError::Stopped) => return cancelled(r),
                        Err(e) => Err(format!("the push to the cache failed: {e}")),
                        // A push uploads only what the cache lacks: what someone else put
                        // under an output's path first stays, and is what users and other
                        // hosts would get. Read back, it must be what was built here.
                        Ok(_) => super::check::same_in_cache(shared, p, &paths).await,
                    }
                }
                None => Ok(()),
            };
            if let Err(e) = pushed {
                // Built: the outputs exist; only publishing failed, after retries.
                r.status = pb::BuildStatus::NotCached as i32;
                r.message = format!("built, but {e}");
            }
            // Where a build's time beyond its builder went, for `RUST_LOG=debug`.
            tracing::debug!(
                drv = %j.drv,
                fetched = fetched_here,
                prepare_ms = prepared.as_millis() as u64,
                realise_ms = run.duration.as_millis() as u64,
                push_ms = pushing.elapsed().as_millis() as u64,
                "build phases"
            );
            r.outputs = match this {
                Some(d) => super::outputs_wire(d.outputs),
                None => super::outputs_wire(paths.iter().map(|p| ("out".to_string(), p.clone()))),
            };
            // Held in this store: what travels is each output's NAR hash, which the check
            // (a build from scratch elsewhere) must reproduce.
            if route.build_to == Place::BuilderStore {
                let paths: Vec<String> = r.outputs.iter().map(|o| o.path.clone()).collect();
                let hashes = if paths.iter().all(|p| p.starts_with('/')) {
                    super::check::nar_hashes(shared, &paths).await
                } else {
                    // Floating (content-addressed) outputs: no other host can build the
                    // same paths to compare.
                    Err("some outputs' paths are known only once built".to_string())
                };
                match hashes {
                    Ok(hashes) => {
                        for (o, digest) in r.outputs.iter_mut().zip(hashes) {
                            o.nar_hash = super::check::sri(digest);
                        }
                    }
                    Err(e) => {
                        r.status = pb::BuildStatus::InfraFailed as i32;
                        r.message = format!(
                            "built, but the NAR hashes its check compares cannot be read: {e}"
                        );
                    }
                }
            }
        }
        Err(Failure::HashMismatch(m)) => {
            r.status = pb::BuildStatus::HashMismatch as i32;
            r.message = format!("hash mismatch: specified {}, got {}", m.specified, m.got);
            r.specified_hash = m.specified;
            r.got_hash = m.got;
        }
        Err(f) => (r.status, r.message) = failed(shared, f, &disk),
    }
    r
}

/// `r` as a job cancelled after it was built: nothing published.
pub(super) fn cancelled(mut r: pb::BuildResult) -> pb::BuildResult {
    r.status = pb::BuildStatus::Cancelled as i32;
    r.message = "cancelled while its outputs were pushed".into();
    r
}

/// What a realisation says before its outcome: its time, its log's tail, whether it
/// substituted; for one that was cancelled, all there is to say.
pub(super) fn result_of(run: &nixfarm_nix::BuildRun) -> pb::BuildResult {
    let mut r = pb::BuildResult {
        duration_ms: run.duration.as_millis() as u64,
        log_tail: run.log_tail.clone(),
        substituted: run.substituted,
        already_valid: run.already_valid,
        ..Default::default()
    };
    if run.cancelled {
        r.status = pb::BuildStatus::Cancelled as i32;
        r.message = "cancelled".into();
    }
    r
}

/// A build's failure as the coordinator is told it: (status, message). A full disk also
/// pauses this agent, when its free space (`disk`: while the log said so, or now) agrees.
pub(super) fn failed(shared: &Shared, f: Failure, disk: &super::disk::DiskWatch) -> (i32, String) {
    let (status, message) = match f {
        Failure::HashMismatch(m) => (
            pb::BuildStatus::HashMismatch,
            format!("hash mismatch: specified {}, got {}", m.specified, m.got),
        ),
        Failure::TimedOut(m) => (pb::BuildStatus::TimedOut, m),
        Failure::BuildFailed(m) => (pb::BuildStatus::Failed, m),
        Failure::NotDeterministic(m) => (pb::BuildStatus::NotReproducible, m),
        Failure::DiskFull(m) => match disk.confirms(shared) {
            Ok(()) => {
                pause_for_full_disk(shared);
                (
                    pb::BuildStatus::InfraFailed,
                    format!("agent {} ran out of disk space: {m}", shared.cfg.name),
                )
            }
            // Retried, as a full disk elsewhere (a file system of the builder's own) may be
            // the machine's; but this agent goes on taking work.
            Err(free) => (
                pb::BuildStatus::InfraFailed,
                format!(
                    "the build said \"{m}\", but agent {} had {free} MiB free in the store and its temporary directory: not taken as its disk being full",
                    shared.cfg.name
                ),
            ),
        },
        Failure::Infra(m) => (pb::BuildStatus::InfraFailed, m),
    };
    (status as i32, message)
}

/// The result for a derivation that is not what its path says: not built, and taken out of
/// this store (best effort) so that a later attempt fetches it again.
async fn forged_derivation(shared: &Arc<Shared>, drv: &str, why: &str) -> pb::BuildResult {
    tracing::warn!(drv, "refusing to build a derivation: {why}");
    if let Err(e) = shared.nix.delete_paths(&[drv.to_string()]).await {
        tracing::warn!(drv, "cannot remove it from the store: {e}");
    }
    infra_failed(format!(
        "derivation {drv} is not what its store path says ({why}): forged or corrupt where it was fetched from; not built"
    ))
}

/// Whether `producer` is the same fetch as `drv` with another hash stated (the package's
/// previous hash-fixing stage, whose mismatch Nix registered under the right path): then
/// nothing was copied. False when either derivation cannot be read here.
pub(super) fn same_fetch(drv: &str, producer: &str) -> bool {
    matches!(
        (nixfarm_nix::aterm::read(drv), nixfarm_nix::aterm::read(producer)),
        (Ok(mine), Ok(theirs)) if mine.same_fetch(&theirs)
    )
}

/// A fixed-output derivation whose output another derivation produced was never fetched
/// here (Nix did not build it in this realise): Nix found the path valid (built or
/// substituted for the other one) and trusted the hash. A hash copied from another package
/// looks exactly like that, so its fetcher is run (`--check`): `Some((mismatch,
/// producer))` when its own content differs. An output with no producer recorded (added by
/// `nix-store --add-fixed` or a prefetch, or substituted from a cache that records none),
/// or whose producer cannot be read, is checked too: nothing vouches for it.
async fn copied_hash(
    shared: &Arc<Shared>,
    d: &nixfarm_nix::derivation::Derivation,
    opts: &BuildOptions,
    cancel: &CancellationToken,
) -> Option<(nixfarm_nix::messages::HashMismatch, Option<String>)> {
    if !d.fixed_output {
        return None;
    }
    let out = d.outputs.first().map(|(_, p)| p.as_str())?;
    let producer = match shared.nix.deriver(out).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(
                out,
                "cannot tell which derivation produced it; checking it: {e}"
            );
            None
        }
    };
    if let Some(p) = &producer
        && (*p == d.path || same_fetch(&d.path, p))
    {
        return None;
    }
    let from = producer.as_deref().unwrap_or("no recorded derivation");
    let check = BuildOptions {
        check: true,
        gc_root: None,
        ..opts.clone()
    };
    let run = shared
        .nix
        .realise(&d.path, &check, cancel.clone(), |_| {})
        .await;
    match run.result {
        Err(Failure::HashMismatch(m)) => Some((m, producer)),
        Ok(_) => None,
        Err(e) => {
            // Unverifiable now (the fetch failed): the build stands, and says so in the log.
            tracing::warn!(
                drv = %d.path,
                "cannot check a fixed output that {from} produced: {e:?}"
            );
            None
        }
    }
}

/// A build that did not run for a reason of the agent's or the run's, said in `message`.
fn infra_failed(message: String) -> pb::BuildResult {
    pb::BuildResult {
        status: pb::BuildStatus::InfraFailed as i32,
        message,
        ..Default::default()
    }
}
