//! Upload claims: agents whose closures overlap upload each path once.

use super::*;

/// Upload claims one agent may hold at once (paths, over all caches).
pub const MAX_UPLOAD_CLAIMS: usize = 200_000;

impl Engine {
    /// Whether `agent` may claim uploads to `cache` for `attempt`: it holds that attempt,
    /// and the cache is one the attempt's run pushes to (its own, or the farm cache, which
    /// is no run's). So an agent cannot hold back the uploads of a run it has no part in (a
    /// claim makes others wait for the path).
    pub fn may_claim(
        &self,
        agent: &str,
        session: &str,
        attempt: &str,
        cache: &str,
    ) -> Result<(), EngineError> {
        let g = self.lock();
        // Its session first: nothing is said about attempts to anyone else.
        if !session_holds(&g, agent, session) {
            return Err(not_own());
        }
        let denied = |why: &str| {
            Err(EngineError::Denied(format!(
                "upload claims on {}: {why}",
                nixfarm_core::limits::clip(cache, 120)
            )))
        };
        let Some(a) = g.attempts.get(attempt).filter(|a| a.agent == agent) else {
            return denied("the claim names no attempt the agent holds");
        };
        let Some(run) = g.runs.iter().find(|r| r.id == a.run_id) else {
            return denied("the attempt's run is gone");
        };
        if run.spec.cache == cache {
            return Ok(());
        }
        // Else the farm cache (any run's outputs may move through it), which is no run's.
        let someones = g
            .runs
            .iter()
            .any(|r| !r.state.is_terminal() && r.spec.cache == cache);
        if someones {
            return denied("that is another run's cache");
        }
        Ok(())
    }

    /// Claims the upload of `paths` to `cache` for `agent`: true for each path the agent
    /// should upload itself, false where another agent is uploading it (the caller waits for
    /// the cache to have it). So agents whose closures overlap upload each path once. A claim
    /// lapses when its holder is gone for longer than the lease, when the holder registers
    /// again with nothing running, or after [`UPLOAD_CLAIM_TTL_MS`]. With `release`, drops
    /// the agent's claims on `paths` instead (uploaded, or given up) and returns nothing.
    pub fn claim_uploads(
        &self,
        agent: &str,
        session: &str,
        cache: &str,
        paths: &[String],
        release: bool,
    ) -> Result<Vec<bool>, EngineError> {
        if cache.is_empty() {
            return Err(EngineError::Invalid("an upload claim needs a cache".into()));
        }
        let mut g = self.lock();
        let inner = &mut *g;
        let now = self.clock.now_ms();
        if !session_holds(inner, agent, session) {
            return Err(not_own());
        }
        if let Some(a) = inner.agents.get_mut(agent) {
            a.last_seen_ms = now;
        }
        if release {
            inner.db.release_upload_claims(agent, cache, paths)?;
            return Ok(Vec::new());
        }
        // Bounded per agent: each claim is a row, and an agent could ask for any number.
        let held = inner
            .db
            .prune_upload_claims(agent, now - UPLOAD_CLAIM_TTL_MS)?;
        if held + paths.len() > MAX_UPLOAD_CLAIMS {
            return Err(EngineError::Invalid(format!(
                "the agent holds {held} upload claims; at most {MAX_UPLOAD_CLAIMS} at once"
            )));
        }
        let lease = self.opts.lease_ms;
        let agents = &inner.agents;
        let lapsed = |holder: &str, at: i64| {
            now - at > UPLOAD_CLAIM_TTL_MS
                || match agents.get(holder) {
                    Some(h) => h.tx.is_none() && now - h.last_seen_ms.max(at) > lease,
                    None => now - at > lease,
                }
        };
        Ok(inner.db.claim_uploads(cache, agent, paths, now, &lapsed)?)
    }
}

/// Only the agent itself (its registration's session key) claims or releases in its name.
fn session_holds(inner: &Inner, agent: &str, session: &str) -> bool {
    inner.agents.get(agent).is_some_and(|a| {
        !a.session.is_empty()
            && a.session.len() == session.len()
            && constant_time_eq(a.session.as_bytes(), session.as_bytes())
    })
}

fn not_own() -> EngineError {
    EngineError::Denied("upload claims are made by a registered agent, with its session key".into())
}
