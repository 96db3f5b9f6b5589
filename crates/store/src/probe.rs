//! Whether a cache answers at all: asked before a run is submitted to it.

use crate::{Pusher, Target};
use std::time::Duration;

impl Pusher {
    /// Whether the cache answers at all, within `wait`: any HTTP answer counts (a cache may
    /// want a token to read, or have no `nix-cache-info`); a name that does not resolve, a
    /// refused connection, a failed TLS handshake or silence does not, and says so. A
    /// `file://` cache is on the agents' hosts: not looked at.
    pub async fn reachable(&self, wait: Duration) -> Result<(), String> {
        let url = match &self.target {
            Target::File(_) => return Ok(()),
            Target::Http(base) => format!("{}/nix-cache-info", base.trim_end_matches('/')),
            Target::Cachix { name, api } => format!("{api}cache/{name}"),
        };
        match tokio::time::timeout(wait, self.http.get(&url).send()).await {
            // Cachix's API knows its caches: one it does not is mistyped.
            Ok(Ok(r))
                if matches!(self.target, Target::Cachix { .. })
                    && r.status() == reqwest::StatusCode::NOT_FOUND =>
            {
                Err("Cachix has no cache of that name".into())
            }
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                let mut why = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(cause) = src {
                    let said = cause.to_string();
                    if !why.contains(&said) {
                        why = format!("{why}: {said}");
                    }
                    src = cause.source();
                }
                Err(why)
            }
            Err(_) => Err(format!("{url} did not answer within {wait:?}")),
        }
    }
}
