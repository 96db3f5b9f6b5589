//! Upload claims: agents whose closures overlap upload each path once.

use super::*;

/// Upload claims one agent may hold at once (paths, over all caches).
pub const MAX_UPLOAD_CLAIMS: usize = 200_000;

/// An agent asking to upload `paths` to `cache` itself, for the attempt it holds.
#[derive(Debug, Clone, Copy)]
pub struct UploadClaim<'a> {
    pub agent: &'a str,
    /// Its registration's session key: only the agent itself claims in its name.
    pub session: &'a str,
    pub attempt: &'a str,
    pub cache: &'a str,
    pub paths: &'a [String],
}

impl Engine {
    /// Claims the upload of the claim's paths for its agent: true for each path the agent
    /// should upload itself, false where another agent is uploading it (the caller waits for
    /// the cache to have it). So agents whose closures overlap upload each path once. A claim
    /// lapses when its holder is gone for longer than the lease, when the holder registers
    /// again with nothing running, or after [`UPLOAD_CLAIM_TTL_MS`].
    ///
    /// A claim makes other agents wait for the path, so it is granted only for what the
    /// agent's attempt may upload, checked under the same lock as the grant: the agent holds
    /// the attempt; the cache is the one its run pushes to (or the farm cache, which is no
    /// run's); and no path is an output of an active run's derivation that the attempt's own
    /// build does not depend on (an evaluation depends on none, and uploads derivations).
    pub fn claim_uploads(&self, c: &UploadClaim<'_>) -> Result<Vec<bool>, EngineError> {
        let mut g = self.lock();
        let inner = &mut *g;
        if !session_holds(inner, c.agent, c.session) {
            return Err(not_own());
        }
        may_claim(inner, c)?;
        self.grant(inner, c.agent, c.cache, c.paths)
    }

    /// Drops `agent`'s claims on `paths` in `cache` (uploaded, or given up). No attempt is
    /// needed: it may be over.
    pub fn release_uploads(
        &self,
        agent: &str,
        session: &str,
        cache: &str,
        paths: &[String],
    ) -> Result<(), EngineError> {
        let mut g = self.lock();
        if !session_holds(&g, agent, session) {
            return Err(not_own());
        }
        Ok(g.db.release_upload_claims(agent, cache, paths)?)
    }

    /// [`Engine::claim_uploads`] without the attempt and its paths checked: the claiming
    /// itself, for tests of it.
    #[cfg(test)]
    pub(super) fn claim_unchecked(
        &self,
        agent: &str,
        session: &str,
        cache: &str,
        paths: &[String],
    ) -> Result<Vec<bool>, EngineError> {
        let mut g = self.lock();
        if !session_holds(&g, agent, session) {
            return Err(not_own());
        }
        self.grant(&mut g, agent, cache, paths)
    }

    fn grant(
        &self,
        inner: &mut Inner,
        agent: &str,
        cache: &str,
        paths: &[String],
    ) -> Result<Vec<bool>, EngineError> {
        if cache.is_empty() {
            return Err(EngineError::Invalid("an upload claim needs a cache".into()));
        }
        let now = self.clock.now_ms();
        if let Some(a) = inner.agents.get_mut(agent) {
            a.last_seen_ms = now;
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

/// Whether the claim's attempt may make it (see [`Engine::claim_uploads`]); its session
/// is checked before, so nothing is said about attempts to anyone else.
fn may_claim(inner: &Inner, c: &UploadClaim<'_>) -> Result<(), EngineError> {
    let denied = |why: String| {
        Err(EngineError::Denied(format!(
            "upload claims on {}: {why}",
            nixfarm_core::limits::clip(c.cache, 120)
        )))
    };
    let Some(a) = inner.attempts.get(c.attempt).filter(|a| a.agent == c.agent) else {
        return denied("the claim names no attempt the agent holds".into());
    };
    let Some(run) = inner.runs.iter().find(|r| r.id == a.run_id) else {
        return denied("the attempt's run is gone".into());
    };
    // Else the farm cache (any run's outputs may move through it), which is no run's.
    if run.spec.cache != c.cache
        && inner
            .runs
            .iter()
            .any(|r| !r.state.is_terminal() && r.spec.cache == c.cache)
    {
        return denied("that is another run's cache".into());
    }
    if let Some(p) = foreign_output(inner, run, a, c.paths) {
        return denied(format!(
            "{} is the output of a derivation the attempt's build does not depend on",
            nixfarm_core::limits::clip(p, 120)
        ));
    }
    Ok(())
}

/// The first of `paths` that an active run's graph holds as a derivation's (input-addressed)
/// output, where the attempt (of `run`) does not build that derivation or one depending on
/// it.
fn foreign_output<'p>(
    inner: &Inner,
    run: &RunMem,
    a: &AttemptMem,
    paths: &'p [String],
) -> Option<&'p str> {
    let own = match a.job {
        JobRef::Build(n) | JobRef::Check(n) => Some(n),
        JobRef::Eval(_) => None,
    };
    // What the attempt's derivation depends on, itself included: found once, when needed.
    let mut needed: Option<HashSet<NodeId>> = None;
    let active: Vec<&RunMem> = inner
        .runs
        .iter()
        .filter(|r| !r.state.is_terminal() && !r.node_of_output.is_empty())
        .collect();
    paths.iter().map(String::as_str).find(|p| {
        if let (Some(own), Some(sched), Some(&n)) = (own, &run.sched, run.node_of_output.get(*p)) {
            let needed = needed.get_or_insert_with(|| closure_of(sched, own));
            if needed.contains(&n) {
                return false;
            }
        }
        active.iter().any(|r| r.node_of_output.contains_key(*p))
    })
}

/// `node` and every node it depends on.
fn closure_of(sched: &Scheduler, node: NodeId) -> HashSet<NodeId> {
    let mut seen = HashSet::from([node]);
    let mut stack = vec![node];
    while let Some(n) = stack.pop() {
        for &i in sched.inputs(n) {
            if seen.insert(i) {
                stack.push(i);
            }
        }
    }
    seen
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
