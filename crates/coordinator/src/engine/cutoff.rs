//! Cutting agents off when what admitted them is taken back (a certificate revoked, a
//! named or join token replaced), and refusing their registrations meanwhile.

use super::*;

impl Engine {
    /// Has agents refused at registration, under the engine's lock, when what admitted
    /// them was taken back since (once; later calls change nothing).
    pub fn use_gate(&self, gate: crate::credentials::Gate) {
        let _ = self.gate.set(gate);
    }

    /// Why an agent admitted by `credential` (a named token checked at `admitted_at`) may
    /// not register now; None: it may.
    pub(crate) fn refusal(
        &self,
        credential: &crate::credentials::Credential,
        admitted_at: u64,
    ) -> Option<&'static str> {
        self.gate.get()?.refusal(credential, admitted_at)
    }

    /// Why an agent admitted by `credential` may not register as `name` (see
    /// [`crate::credentials::Gate::name_refusal`]); None: it may.
    pub(crate) fn name_refusal(&self, reg: &Registration) -> Option<&'static str> {
        self.gate
            .get()?
            .name_refusal(&reg.name, &reg.credential, &reg.token_digest)
    }

    /// Cuts off every agent admitted by a client certificate revoked now; see
    /// [`Engine::cut_off`].
    pub fn cut_off_certificates(&self) -> Vec<String> {
        use crate::credentials::{Credential, REVOKED};
        self.cut_off(
            |reg| {
                matches!(reg.credential, Credential::Certificate(_))
                    && self.refusal(&reg.credential, 0).is_some()
            },
            REVOKED,
        )
    }

    /// Cuts off every agent admitted by a named token that `tokens` no longer holds as it
    /// was when the agent was admitted (taken back, replaced, or gone from the file while
    /// the coordinator was down), and every agent admitted by a join token since replaced;
    /// see [`Engine::cut_off`]. An agent that came back with its new token is left alone.
    pub fn cut_off_named(&self, tokens: &crate::credentials::Credentials) -> Vec<String> {
        use crate::credentials::{Credential, JOIN_REPLACED, TAKEN_BACK};
        let mut names = self.cut_off(
            |reg| {
                matches!(&reg.credential, Credential::NamedToken(n)
                    if !tokens.still_holds(n, reg.admitted_at)
                        || !tokens.names(n)
                        || !tokens.digest_matches(Some(n), &reg.token_digest))
            },
            TAKEN_BACK,
        );
        names.extend(self.cut_off(
            |reg| {
                reg.credential == Credential::JoinToken
                    && (!tokens.join_still_holds(reg.admitted_at)
                        || !tokens.digest_matches(None, &reg.token_digest))
            },
            JOIN_REPLACED,
        ));
        // A name the file lists now, held by an agent without its token.
        names.extend(self.cut_off(
            |reg| tokens.takes_name(&reg.name, &reg.credential, &reg.token_digest),
            crate::credentials::NAME_RESERVED,
        ));
        names
    }

    /// Ends the streams of agents `names` without refusing them: each reconnects and
    /// registers again (and is issued a new farm cache token); their jobs stay theirs for
    /// the lease, as on any reconnect.
    pub fn reconnect(&self, names: &[String]) {
        let mut g = self.lock();
        for name in names {
            if let Some(a) = g.agents.get_mut(name)
                && a.tx.take().is_some()
            {
                tracing::info!(agent = %name, "stream ended: the agent is to register again");
            }
        }
    }

    /// Cuts off every agent whose registration `which` picks (what admitted it was taken
    /// back: `why`): its stream ends with that refusal and whatever it still sends is
    /// ignored, its jobs go back to the queue at once, its upload claims lapse, the
    /// repository checks it owes are given up, and it is not taken as a checker any more.
    /// Returns their names (their farm cache tokens are to be withdrawn too), connected or
    /// not.
    fn cut_off(&self, which: impl Fn(&Registration) -> bool, why: &str) -> Vec<String> {
        let mut g = self.lock();
        let inner = &mut *g;
        let names: Vec<String> = inner
            .agents
            .iter()
            .filter(|(_, a)| which(&a.reg))
            .map(|(n, _)| n.clone())
            .collect();
        // First what cannot fail, for every one of them: none stays connected because the
        // database failed on another.
        let mut jobs: Vec<(String, Vec<String>)> = Vec::new();
        for name in &names {
            let Some(a) = inner.agents.get_mut(name) else {
                continue;
            };
            let stream = a.tx.take();
            // No stream is this agent's any more: what the old one sends is ignored.
            a.conn = 0;
            a.draining = true;
            let running: Vec<String> = a.running.iter().cloned().collect();
            if stream.is_some() || !running.is_empty() {
                tracing::warn!(
                    agent = name,
                    jobs = running.len(),
                    "agent cut off ({why}); requeueing its jobs"
                );
            }
            if let Some(tx) = stream {
                let _ = tx.send(ToAgent::CutOff { why: why.into() });
            }
            jobs.push((name.clone(), running));
        }
        for (name, running) in jobs {
            let r = self.atomically(inner, |inner| {
                for id in running {
                    self.lose_attempt(inner, &id, &format!("its agent was cut off: {why}"))?;
                }
                inner.db.release_all_upload_claims(&name)?;
                self.give_up_owed_checks(
                    inner,
                    &name,
                    &format!(
                        "agent {name} was cut off before it reported the flake's other outputs: {why}"
                    ),
                )
            });
            if let Err(e) = r {
                tracing::error!(
                    agent = name,
                    "cannot store what cutting off the agent led to: {e}"
                );
            }
        }
        self.dispatch(inner);
        names
    }

    /// Gives up the repository checks owed for listing `attempt` of `run_id`: the run says
    /// `why` in their place and goes on.
    pub(super) fn settle_owed(
        &self,
        inner: &mut Inner,
        run_id: &str,
        attempt: &str,
        why: String,
    ) -> Result<(), EngineError> {
        if let Some(run) = inner.runs.iter_mut().find(|r| r.id == run_id) {
            run.repo_owed.retain(|o| o.attempt != attempt);
        }
        let lost = nixfarm_core::report::RepoCheck {
            name: "repository".into(),
            ok: false,
            message: why,
        };
        inner.db.record_repo_checks(run_id, &[lost], true)?;
        inner.db.repo_checks_settled(run_id, Some(attempt))?;
        self.maybe_finish(inner, run_id)
    }

    /// Gives up every repository check `agent` owes, saying `why`.
    fn give_up_owed_checks(
        &self,
        inner: &mut Inner,
        agent: &str,
        why: &str,
    ) -> Result<(), EngineError> {
        let owed: Vec<(String, String)> = inner
            .runs
            .iter()
            .flat_map(|r| {
                r.repo_owed
                    .iter()
                    .filter(|o| o.agent == agent)
                    .map(|o| (r.id.clone(), o.attempt.clone()))
            })
            .collect();
        for (run_id, attempt) in owed {
            self.settle_owed(inner, &run_id, &attempt, why.to_string())?;
        }
        Ok(())
    }
}
