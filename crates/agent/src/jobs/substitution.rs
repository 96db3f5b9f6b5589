//! How a run's builds substitute: the cache they move through, and the Nix settings a build
//! and the daemons started ahead of it share.

use super::*;

/// How a run's builds substitute: the cache they move derivations and outputs through
/// ([`transport_cache`]), the farm cache when it is that one, its pusher (None: no cache),
/// and what Nix is told: the substituter's URL and the keys it checks it with.
pub(crate) struct Substitution {
    pub cache: String,
    pub farm: Option<crate::FarmCacheUse>,
    pub push: Option<Arc<nixfarm_store::Pusher>>,
    pub substituter: String,
    pub trusted_public_keys: Vec<String>,
}

impl Substitution {
    /// What Nix is told for a build with `limits` (timeout, max silent time): the daemons
    /// started ahead of builds are started with the same, or no build takes them.
    pub(crate) fn nix_options(
        &self,
        shared: &Shared,
        (timeout, max_silent): (Option<Duration>, Option<Duration>),
    ) -> BuildOptions {
        let farm = self.farm.as_ref();
        BuildOptions {
            substituter: self.substituter.clone(),
            trusted_public_keys: self.trusted_public_keys.clone(),
            timeout,
            max_silent,
            netrc: farm.and_then(|f| f.netrc.clone()),
            ssl_cert_file: farm.and_then(|f| f.ca.clone()),
            system_features: shared.cfg.features.clone(),
            ..Default::default()
        }
    }
}

/// The [`Substitution`] of a run with `run_cache` whose submitter trusts `run_keys`: worked
/// out the same way for a build and for the daemons started ahead of it, which it takes only
/// if their settings are the same. Err: the cache cannot be reached, said for the build.
pub(crate) async fn substitution(
    shared: &Arc<Shared>,
    run_cache: &str,
    run_keys: &[String],
) -> Result<Substitution, String> {
    // What Nix substitutes from: the cache's read URL (Cachix: its `uri`) and its keys.
    let cache = transport_cache(shared, run_cache);
    let farm = farm_cache(shared).filter(|f| f.url == cache);
    let mut trusted = run_keys.to_vec();
    trusted.extend(farm.as_ref().map(|f| f.public_key.clone()));
    let mut substituter = String::new();
    let push = if cache.is_empty() {
        None
    } else {
        let p = pusher(shared, &cache).await.map_err(|e| e.to_string())?;
        let (url, keys) = p
            .substituter()
            .await
            .map_err(|e| format!("cannot reach the cache: {e}"))?;
        substituter = url;
        trusted.extend(keys);
        Some(p)
    };
    trusted.sort();
    trusted.dedup();
    Ok(Substitution {
        cache,
        farm,
        push,
        substituter,
        trusted_public_keys: trusted,
    })
}
