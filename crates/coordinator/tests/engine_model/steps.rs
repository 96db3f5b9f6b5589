//! The steps a generated case takes: answers, disconnects, reconnects, lease expiries,
//! cancellations, new runs and coordinator restarts.

use super::*;

impl World {
    pub(super) fn apply(&mut self, step: Step) -> Checked {
        let n_agents = self.agents.len();
        match step {
            Step::Answer {
                agent,
                pick,
                outcome,
            } => {
                let k = agent % n_agents;
                let Some(conn) = self.agents[k].link.as_ref().map(|l| l.conn) else {
                    return Ok(());
                };
                if self.agents[k].held.is_empty() {
                    return Ok(());
                }
                let i = pick % self.agents[k].held.len();
                let a = self.agents[k].held.remove(i);
                let msg = self.answer(&a, outcome);
                self.log(format!(
                    "{} answers {} with {}",
                    self.agents[k].name,
                    self.describe(&a),
                    outcome_text(&msg)
                ));
                if let Some(kind) = failing_kind(outcome) {
                    self.note_failure(&a, kind);
                }
                self.agents[k].last_seen = self.now();
                self.send(k, conn, msg.clone())?;
                self.agents[k].answered.push((a, msg));
                self.drain();
            }
            Step::Duplicate { agent, pick } => {
                let k = agent % n_agents;
                let Some(conn) = self.agents[k].link.as_ref().map(|l| l.conn) else {
                    return Ok(());
                };
                if self.agents[k].answered.is_empty() {
                    return Ok(());
                }
                let i = pick % self.agents[k].answered.len();
                let (a, msg) = self.agents[k].answered[i].clone();
                let line = format!(
                    "{} sends again its answer to {} ({})",
                    self.agents[k].name,
                    self.describe(&a),
                    outcome_text(&msg)
                );
                self.log(line.clone());
                self.agents[k].last_seen = self.now();
                self.must_ignore(&line, |w| w.send(k, conn, msg))?;
            }
            Step::Foreign {
                from,
                pick,
                outcome,
            } => {
                let k = from % n_agents;
                let Some(conn) = self.agents[k].link.as_ref().map(|l| l.conn) else {
                    return Ok(());
                };
                let others: Vec<(usize, Assignment)> = (0..n_agents)
                    .filter(|&o| o != k)
                    .flat_map(|o| self.agents[o].held.iter().map(move |a| (o, a.clone())))
                    .collect();
                if others.is_empty() {
                    return Ok(());
                }
                let (o, a) = others[pick % others.len()].clone();
                let msg = self.answer(&a, outcome);
                let line = format!(
                    "{} answers {}'s {} with {}",
                    self.agents[k].name,
                    self.agents[o].name,
                    self.describe(&a),
                    outcome_text(&msg)
                );
                self.log(line.clone());
                self.agents[k].last_seen = self.now();
                self.must_ignore(&line, |w| w.send(k, conn, msg))?;
            }
            Step::Late {
                agent,
                pick,
                outcome,
            } => {
                let k = agent % n_agents;
                let Some(conn) = self.agents[k].link.as_ref().map(|l| l.conn) else {
                    return Ok(());
                };
                if self.agents[k].lost.is_empty() {
                    return Ok(());
                }
                let i = pick % self.agents[k].lost.len();
                let a = self.agents[k].lost[i].clone();
                let msg = self.answer(&a, outcome);
                let line = format!(
                    "{} answers late its lost {} with {}",
                    self.agents[k].name,
                    self.describe(&a),
                    outcome_text(&msg)
                );
                self.log(line.clone());
                self.agents[k].last_seen = self.now();
                self.must_ignore(&line, |w| w.send(k, conn, msg))?;
            }
            Step::OldStream {
                agent,
                pick,
                outcome,
            } => {
                let k = agent % n_agents;
                if self.agents[k].old_conns.is_empty() || self.agents[k].held.is_empty() {
                    return Ok(());
                }
                let conn = self.agents[k].old_conns[pick % self.agents[k].old_conns.len()];
                let a = self.agents[k].held[pick % self.agents[k].held.len()].clone();
                let msg = self.answer(&a, outcome);
                let line = format!(
                    "{} answers {} with {} on its replaced stream {conn}",
                    self.agents[k].name,
                    self.describe(&a),
                    outcome_text(&msg)
                );
                self.log(line.clone());
                self.must_ignore(&line, |w| w.send(k, conn, msg))?;
            }
            Step::Heartbeat { agent } => {
                let k = agent % n_agents;
                if self.agents[k].link.is_none() {
                    return Ok(());
                }
                self.log(format!("{} sends a heartbeat", self.agents[k].name));
                self.heartbeat(k)?;
                self.drain();
            }
            Step::Disconnect { agent } => {
                let k = agent % n_agents;
                let Some(link) = self.agents[k].link.take() else {
                    return Ok(());
                };
                self.log(format!("{} disconnects", self.agents[k].name));
                self.engine()
                    .disconnect_agent(&self.agents[k].name, link.conn);
                drop(link);
            }
            Step::Reconnect {
                agent,
                claims,
                with_key,
            } => {
                let k = agent % n_agents;
                self.reconnect(k, claims, with_key)?;
            }
            Step::Tick => {
                self.log(format!("{} ms pass; leases are checked", LEASE_MS / 2));
                self.clock.advance(LEASE_MS / 2);
                self.engine().check_leases();
                self.expire_model();
                self.drain();
            }
            Step::Expire { spare } => {
                // Agents in `spare` stay alive (a heartbeat half-way); the others fall silent
                // for longer than a lease.
                self.clock.advance(LEASE_MS / 2 + 1);
                let alive: Vec<usize> = (0..n_agents)
                    .filter(|&k| spare & (1 << k) != 0 && self.agents[k].link.is_some())
                    .collect();
                let names: Vec<String> =
                    alive.iter().map(|&k| self.agents[k].name.clone()).collect();
                self.log(format!(
                    "{} ms pass, heartbeats from [{}] half-way; leases are checked",
                    LEASE_MS + 1,
                    names.join(" ")
                ));
                for k in alive {
                    self.heartbeat(k)?;
                }
                self.clock.advance(LEASE_MS / 2);
                self.engine().check_leases();
                self.expire_model();
                self.drain();
            }
            Step::Restart => self.restart()?,
            Step::Cancel { run } => {
                if self.runs.is_empty() {
                    return Ok(());
                }
                let id = self.runs[run % self.runs.len()].id.clone();
                self.log(format!("run {} is cancelled", self.run_no(&id)));
                self.engine()
                    .cancel(&id)
                    .map_err(|e| violation(0, format!("cancel: {e}")))?;
                self.drain();
            }
            Step::Submit => {
                if self.runs.len() >= MAX_RUNS {
                    return Ok(());
                }
                self.submit()?;
            }
        }
        Ok(())
    }

    pub(super) fn heartbeat(&mut self, k: usize) -> Checked {
        let Some(conn) = self.agents[k].link.as_ref().map(|l| l.conn) else {
            return Ok(());
        };
        let running = self.agents[k]
            .held
            .iter()
            .map(|a| a.attempt.clone())
            .collect();
        self.agents[k].last_seen = self.now();
        self.send(
            k,
            conn,
            FromAgent::Heartbeat {
                running,
                draining: false,
                paused: String::new(),
            },
        )
    }

    pub(super) fn submit(&mut self) -> Checked {
        let id = self
            .engine()
            .submit(run_spec())
            .map_err(|e| violation(0, format!("submit: {e}")))?;
        self.runs.push(RunH {
            id: id.clone(),
            statuses: BTreeMap::new(),
            failure_evidence: BTreeMap::new(),
        });
        self.log(format!("run {} is submitted ({id})", self.run_no(&id)));
        self.drain();
        Ok(())
    }

    pub(super) fn reconnect(&mut self, k: usize, claims: u8, with_key: bool) -> Checked {
        let candidates: Vec<Assignment> = self.agents[k]
            .held
            .iter()
            .chain(self.agents[k].lost.iter())
            .cloned()
            .collect();
        let claimed: Vec<Assignment> = candidates
            .iter()
            .enumerate()
            .filter(|(i, _)| *i < 8 && claims & (1 << i) != 0)
            .map(|(_, a)| a.clone())
            .collect();
        let claimed_ids: HashSet<String> = claimed.iter().map(|a| a.attempt.clone()).collect();
        let names: Vec<String> = claimed.iter().map(|a| self.describe(a)).collect();
        let mut key = String::new();
        let old = self.agents[k].link.take();
        let how = match &old {
            Some(l) if with_key => {
                key = l.session.clone();
                "with its session key, its old stream still open"
            }
            Some(_) => "after its stream closed",
            None => "while disconnected",
        };
        let old_conn = old.as_ref().map(|l| l.conn);
        // Without the key, the old stream is closed first (or the name is refused).
        let old = if with_key {
            old
        } else {
            drop(old);
            None
        };
        let line = if self.agents[k].known {
            format!(
                "{} reconnects {how} claiming [{}]",
                self.agents[k].name,
                names.join(", ")
            )
        } else {
            format!("{} connects", self.agents[k].name)
        };
        self.log(line);
        let (tx, rx) = mpsc::unbounded_channel();
        let reg = registration(
            &self.agents[k].name,
            self.agents[k].max_jobs,
            claimed.iter().map(|a| a.attempt.clone()).collect(),
            &key,
        );
        let (conn, session) = self
            .engine()
            .connect_agent(reg, tx)
            .map_err(|e| violation(0, format!("connect_agent: {e}")))?;
        let now = self.now();
        let ag = &mut self.agents[k];
        drop(old);
        ag.old_conns.extend(old_conn);
        ag.link = Some(Link { conn, session, rx });
        ag.known = true;
        ag.last_seen = now;
        // Held attempts it did not claim are taken away; lost ones stay lost.
        let (keep, gone): (Vec<Assignment>, Vec<Assignment>) = std::mem::take(&mut ag.held)
            .into_iter()
            .partition(|a| claimed_ids.contains(&a.attempt));
        ag.held = keep;
        ag.lost.extend(gone.iter().cloned());
        for a in &gone {
            self.note_failure(a, BuildOutcome::InfraFailed);
        }
        self.drain();
        Ok(())
    }

    pub(super) fn restart(&mut self) -> Checked {
        self.log("the coordinator restarts".into());
        let before = self.observe_all()?;
        let terminal: HashSet<String> = before
            .iter()
            .filter(|(_, st, _)| st.is_terminal())
            .map(|(id, _, _)| id.clone())
            .collect();
        self.engine = None;
        for ag in &mut self.agents {
            ag.link = None;
            ag.old_conns.clear();
        }
        self.open_engine();
        let now = self.now();
        for k in 0..self.agents.len() {
            let ag = &mut self.agents[k];
            if !ag.known {
                continue;
            }
            ag.last_seen = now;
            // Attempts of finished runs are not resumed.
            let (keep, gone): (Vec<Assignment>, Vec<Assignment>) = std::mem::take(&mut ag.held)
                .into_iter()
                .partition(|a| !terminal.contains(&a.run));
            ag.held = keep;
            ag.lost.extend(gone);
        }
        let after = self.observe_all()?;
        for ((id, st0, s0), (_, st1, s1)) in before.iter().zip(&after) {
            if st0 != st1 || s0 != s1 {
                return Err(violation(
                    3,
                    format!(
                        "run {} changed across the restart: {} {:?} -> {} {:?}",
                        self.run_no(id),
                        st0,
                        s0,
                        st1,
                        s1
                    ),
                ));
            }
        }
        Ok(())
    }
}
