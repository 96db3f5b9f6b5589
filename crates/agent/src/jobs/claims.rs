//! Upload claims held at the coordinator, so agents whose closures overlap upload each path once.

use super::*;

/// Upload claims held at the coordinator: agents whose closures overlap (two evaluating
/// chunks that share derivations and sources) upload each path once.
pub(super) struct Claims<'a> {
    shared: &'a Shared,
    channel: Channel,
    cache: &'a str,
    /// The attempt pushing: the coordinator grants claims only on its run's cache.
    attempt: &'a str,
}

impl<'a> Claims<'a> {
    pub(super) fn new(
        shared: &'a Shared,
        channel: Channel,
        cache: &'a str,
        attempt: &'a str,
    ) -> Self {
        Claims {
            shared,
            channel,
            cache,
            attempt,
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
                attempt: self.attempt.to_string(),
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
