//! Check builds (cross-checked builds): another agent built a derivation and pushed its
//! outputs; build it again here and compare with the cache's copy, which is what users
//! download. Nothing is pushed, unless the outputs were held back from the run's cache for
//! this check: then it publishes its own copy there once it agrees.

use super::*;
use nixfarm_nix::derivation::Derivation;

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

/// Checks `d`, whose outputs another agent pushed to `held` (None: agents share this store,
/// and its copy is the one checked), then publishes them if asked to.
pub(super) async fn check(
    shared: &Arc<Shared>,
    d: Option<Derivation>,
    opts: &BuildOptions,
    held: Option<Held<'_>>,
    publish: Option<Publish<'_>>,
    cancel: CancellationToken,
    on_log: impl FnMut(&[u8]) + Send,
) -> pb::BuildResult {
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
    if let Some(h) = held {
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
        let local = match shared.nix.path_infos(&outputs).await {
            Ok(l) => l,
            Err(e) => return infra(format!("cannot read the outputs of {}: {e}", d.path)),
        };
        for (out, cached) in outputs.iter().zip(h.cache.nar_hashes(&outputs).await) {
            let cached = match cached {
                Ok(h) => h,
                Err(e) => return infra(format!("cannot read the cache's record of {out}: {e}")),
            };
            let here = local
                .iter()
                .find(|i| i.path == *out)
                .and_then(|i| {
                    nixfarm_nix::hash::Hash::parse(
                        &i.nar_hash,
                        Some(nixfarm_nix::hash::Algo::Sha256),
                    )
                })
                .map(|h| h.digest);
            let Some(here) = here else {
                return infra(format!("cannot read this store's copy of {out}"));
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
    let check = BuildOptions {
        check: true,
        gc_root: None,
        ..opts.clone()
    };
    let run = shared.nix.realise(&d.path, &check, cancel, on_log).await;
    let mut r = super::build::result_of(&run);
    if run.cancelled {
        return r;
    }
    match run.result {
        Ok(_) => {
            r.status = pb::BuildStatus::Built as i32;
            r.checked = true;
            if let Some(p) = publish
                && let Err(e) = p.cache.push_closure_with(&outputs, &p.claims).await
            {
                r.status = pb::BuildStatus::NotCached as i32;
                r.message = format!("the push to the run's cache failed: {e}");
            }
            r.outputs = d
                .outputs
                .into_iter()
                .map(|(name, path)| pb::DrvOutput { name, path })
                .collect();
        }
        Err(f) => (r.status, r.message) = super::build::failed(shared, f),
    }
    r
}
