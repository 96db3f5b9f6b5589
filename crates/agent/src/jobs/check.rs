//! Check builds (cross-checked builds): another agent built a derivation; build it again
//! here and compare. Its outputs are fetched from the cache it pushed them to (which is what
//! users download) and compared by `--check`; or, held in its own store, only their NAR
//! hashes came with the job, and the derivation is built here from scratch. Nothing is
//! pushed, unless the outputs were held back from the run's cache for this check: then it
//! publishes its own copy there once it agrees.

use super::*;
use nixfarm_nix::derivation::Derivation;
use nixfarm_nix::hash::{Algo, Hash};

/// Where the outputs to check are.
pub(super) enum Checked<'a> {
    /// In a cache another agent pushed them to.
    Cache(Held<'a>),
    /// In this store, which the agents share: its copy is the one checked.
    ThisStore,
    /// In the building agent's own store: these are the outputs and NAR hashes it reported.
    Reported(&'a [super::assigned::Expected]),
}

/// The cache another agent pushed the outputs to, and how Nix reads it.
pub(super) struct Held<'a> {
    pub cache: &'a nixfarm_store::Pusher,
    pub url: &'a str,
    pub keys: &'a [String],
    pub netrc: Option<&'a std::path::Path>,
    pub ca: Option<&'a std::path::Path>,
}

/// The run's own cache, which gets held outputs only once they are checked.
pub(super) struct Publish<'a> {
    pub cache: &'a nixfarm_store::Pusher,
    pub claims: Claims<'a>,
}

/// The NAR hashes (SHA-256) of `paths` in this store, in order.
pub(super) async fn nar_hashes(shared: &Shared, paths: &[String]) -> Result<Vec<Vec<u8>>, String> {
    let infos = shared
        .nix
        .path_infos(paths)
        .await
        .map_err(|e| e.to_string())?;
    paths
        .iter()
        .map(|p| {
            infos
                .iter()
                .find(|i| i.path == *p)
                .and_then(|i| Hash::parse(&i.nar_hash, Some(Algo::Sha256)))
                .filter(|h| h.algo == Algo::Sha256)
                .map(|h| h.digest)
                .ok_or_else(|| format!("this store has no NAR hash of {p}"))
        })
        .collect()
}

/// A SHA-256 digest in SRI form, as NAR hashes travel.
pub(super) fn sri(digest: Vec<u8>) -> String {
    Hash {
        algo: Algo::Sha256,
        digest,
    }
    .to_sri()
}

/// Checks `d`, whose outputs another agent built (where they are: `from`), then publishes
/// them if asked to.
pub(super) async fn check(
    shared: &Arc<Shared>,
    d: Option<Derivation>,
    opts: &BuildOptions,
    from: Checked<'_>,
    publish: Option<Publish<'_>>,
    cancel: CancellationToken,
    log: super::disk::Logged<'_, impl FnMut(&[u8]) + Send>,
) -> pb::BuildResult {
    let super::disk::Logged {
        sink: mut on_log,
        disk,
    } = log;
    let infra = |message: String| pb::BuildResult {
        status: pb::BuildStatus::InfraFailed as i32,
        message,
        ..Default::default()
    };
    let Some(d) = d else {
        return infra("the derivation cannot be read here, so it cannot be checked".into());
    };
    let outputs: Vec<String> = d
        .outputs
        .iter()
        .map(|(_, p)| p.clone())
        .filter(|p| p.starts_with('/'))
        .collect();
    if outputs.is_empty() || outputs.len() != d.outputs.len() {
        return infra(format!(
            "{} has outputs whose paths are not known before it is built; they cannot be checked",
            d.path
        ));
    }
    if let Checked::Cache(h) = &from {
        // The cache's copy, its signature checked, unless this store holds the path already.
        if let Err(e) = shared
            .nix
            .copy_from(h.url, &outputs, h.keys, h.netrc, h.ca)
            .await
        {
            return infra(format!(
                "cannot fetch the outputs of {} from the cache to check them: {e}",
                d.path
            ));
        }
        // One held already (built or fetched here before) must be the cache's copy too:
        // `--check` compares with what this store holds.
        let local = match nar_hashes(shared, &outputs).await {
            Ok(l) => l,
            Err(e) => return infra(format!("cannot read the outputs of {}: {e}", d.path)),
        };
        // Signed, as what users substitute is: an unsigned narinfo read beside the copy Nix
        // checked could say anything.
        let cached = h.cache.signed_nar_hashes(&outputs, h.keys).await;
        for ((out, here), cached) in outputs.iter().zip(local).zip(cached) {
            let cached = match cached {
                Ok(h) => h,
                Err(e) => return infra(format!("cannot read the cache's record of {out}: {e}")),
            };
            if here != cached {
                return pb::BuildResult {
                    status: pb::BuildStatus::NotReproducible as i32,
                    message: format!(
                        "the cache's copy of {out} is not the one this store holds (built or fetched here before)"
                    ),
                    ..Default::default()
                };
            }
        }
    }
    // What the first build reported, when only that came: every output's NAR hash.
    let expected = match &from {
        Checked::Reported(reported) => match expected_hashes(&outputs, reported) {
            Ok(e) => Some(e),
            Err(e) => return infra(format!("cannot check {}: {e}", d.path)),
        },
        _ => None,
    };
    let check = BuildOptions {
        check: true,
        gc_root: None,
        ..opts.clone()
    };
    let cancel_push = cancel.clone();
    let run = if expected.is_some() {
        // From scratch; but outputs this store holds already (or that the run's cache had)
        // are built once more, `--check`, so that what is compared was built here now.
        let first = shared
            .nix
            .realise(&d.path, opts, cancel.clone(), &mut on_log)
            .await;
        if first.result.is_ok() && !first.built && !first.cancelled {
            let mut again = shared.nix.realise(&d.path, &check, cancel, on_log).await;
            again.duration += first.duration;
            again
        } else {
            first
        }
    } else {
        shared.nix.realise(&d.path, &check, cancel, on_log).await
    };
    let mut r = super::build::result_of(&run);
    if run.cancelled {
        return r;
    }
    match run.result {
        Ok(_) => {
            r.status = pb::BuildStatus::Built as i32;
            r.checked = true;
            let mut reported = super::outputs_wire(d.outputs);
            if let Some(expected) = &expected {
                let here = match nar_hashes(shared, &outputs).await {
                    Ok(h) => h,
                    Err(e) => return infra(format!("cannot read the outputs of {}: {e}", d.path)),
                };
                if let Some(why) = differs(&outputs, &here, expected) {
                    r.status = pb::BuildStatus::NotReproducible as i32;
                    r.message = why;
                    return r;
                }
                // In the order of `outputs`, which are all of the derivation's.
                for (o, digest) in reported.iter_mut().zip(here) {
                    o.nar_hash = sri(digest);
                }
            }
            let published = match publish {
                Some(p) => {
                    let push = p
                        .cache
                        .push_closure_until(&outputs, &p.claims, &cancel_push);
                    match push.await {
                        Err(nixfarm_store::StoreError::Stopped) => {
                            return super::build::cancelled(r);
                        }
                        Err(e) => Err(e.to_string()),
                        Ok(_) => same_in_cache(shared, p.cache, &outputs).await,
                    }
                }
                None => Ok(()),
            };
            if let Err(e) = published {
                r.status = pb::BuildStatus::NotCached as i32;
                r.message = format!("the push to the run's cache failed: {e}");
            }
            r.outputs = reported;
        }
        Err(f) => (r.status, r.message) = super::build::failed(shared, f, disk),
    }
    r
}

/// Whether the cache now holds `outputs` as this store does (by NAR hash): a push uploads
/// only what the cache lacks, so a path someone else uploaded first stays as they made it,
/// and dependents on other hosts would substitute that.
pub(super) async fn same_in_cache(
    shared: &Shared,
    cache: &nixfarm_store::Pusher,
    outputs: &[String],
) -> Result<(), String> {
    let here = nar_hashes(shared, outputs).await?;
    // Read again after a pause if need be (a CDN may answer from before the push for a
    // moment); what still cannot be read is not published for anyone who substitutes.
    let there = cache.nar_hashes_settled(outputs).await;
    for ((path, here), there) in outputs.iter().zip(here).zip(there) {
        match there {
            Ok(there) if there == here => {}
            Ok(there) => {
                return Err(format!(
                    "the cache already held {path} with other contents (NAR hash {}, checked here {}): something else was uploaded under its path",
                    sri(there),
                    sri(here)
                ));
            }
            Err(e) => {
                return Err(format!(
                    "cannot read back {path} from the run's cache after pushing it: {e}"
                ));
            }
        }
    }
    Ok(())
}

/// Each output's NAR hash as the first build reported it, in the order of `outputs`.
fn expected_hashes(
    outputs: &[String],
    reported: &[super::assigned::Expected],
) -> Result<Vec<Vec<u8>>, String> {
    outputs
        .iter()
        .map(|out| {
            reported
                .iter()
                .find(|o| o.path.as_str() == out)
                .map(|o| o.nar_hash.clone())
                .ok_or_else(|| format!("the job does not say what the first build of {out} got"))
        })
        .collect()
}

/// Why this store's `outputs` (NAR hashes `here`) are not what the first build reported
/// (None: the same).
fn differs(outputs: &[String], here: &[Vec<u8>], expected: &[Vec<u8>]) -> Option<String> {
    outputs
        .iter()
        .zip(here.iter().zip(expected))
        .find(|(_, (a, b))| a != b)
        .map(|(out, (here, first))| {
            format!(
                "{out}: NAR hash {} here, {} on the first build",
                sri(here.clone()),
                sri(first.clone())
            )
        })
}
