//! The harness's world: the engine, each agent's link and what the harness expects it to
//! hold; the answers an agent gives to its assignments.

use super::*;

impl World {
    pub(super) fn new(farm: &Farm) -> World {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::new(1_000_000));
        let mut w = World {
            farm: farm.clone(),
            dir,
            clock,
            engine: None,
            agents: farm
                .agents
                .iter()
                .enumerate()
                .map(|(k, &max_jobs)| AgentH {
                    name: format!("a{k}"),
                    max_jobs,
                    link: None,
                    old_conns: vec![],
                    held: vec![],
                    lost: vec![],
                    answered: vec![],
                    cancel_asked: HashSet::new(),
                    last_seen: 0,
                    known: false,
                })
                .collect(),
            runs: vec![],
            trace: vec![],
        };
        w.open_engine();
        w
    }

    pub(super) fn open_engine(&mut self) {
        let db = Db::open(&self.dir.path().join("state.db")).expect("open database");
        let engine = Engine::open(
            db,
            self.dir.path().join("sources"),
            self.clock.clone(),
            EngineOptions {
                lease_ms: LEASE_MS,
                max_infra_retries: MAX_INFRA_RETRIES,
                ..Default::default()
            },
        )
        .expect("open engine");
        self.engine = Some(engine);
    }

    pub(super) fn engine(&self) -> &Engine {
        self.engine.as_ref().expect("engine open")
    }

    pub(super) fn now(&self) -> i64 {
        use nixfarm_coordinator::clock::Clock as _;
        self.clock.now_ms()
    }

    pub(super) fn run_no(&self, id: &str) -> String {
        match self.runs.iter().position(|r| r.id == id) {
            Some(i) => format!("r{i}"),
            None => id.to_string(),
        }
    }

    pub(super) fn describe(&self, a: &Assignment) -> String {
        let what = match &a.job {
            Job::EvalList { .. } => "eval-list".to_string(),
            Job::EvalChunk { attrs, .. } => format!("eval-chunk [{}]", attrs.join(" ")),
            Job::Build { drv_path, .. } => format!("build {}", store_name(drv_path)),
        };
        format!("{what} of {} (attempt {})", self.run_no(&a.run), &a.attempt)
    }

    pub(super) fn log(&mut self, line: String) {
        self.trace.push(line);
    }

    /// Receives what the coordinator sent each connected agent.
    pub(super) fn drain(&mut self) -> usize {
        let mut got = 0;
        let mut lines = vec![];
        for k in 0..self.agents.len() {
            let mut new = vec![];
            let ag = &mut self.agents[k];
            if let Some(link) = ag.link.as_mut() {
                while let Ok(msg) = link.rx.try_recv() {
                    got += 1;
                    match msg {
                        ToAgent::Assign {
                            attempt,
                            run_id,
                            job,
                        } => new.push(Assignment {
                            attempt,
                            run: run_id,
                            job,
                        }),
                        ToAgent::Cancel { attempt } => {
                            ag.cancel_asked.insert(attempt);
                        }
                        // Drain, run ended: nothing the model follows.
                        _ => {}
                    }
                }
            }
            for a in new {
                lines.push(format!(
                    "      {} <- {}",
                    self.agents[k].name,
                    self.describe(&a)
                ));
                self.agents[k].held.push(a);
            }
        }
        self.trace.extend(lines);
        got
    }

    /// What an agent sends for `a` with `outcome`.
    pub(super) fn answer(&self, a: &Assignment, outcome: Outcome) -> FromAgent {
        let attempt = a.attempt.clone();
        match &a.job {
            Job::EvalList { evaluate_up_to, .. } => FromAgent::EvalList {
                attempt,
                // A small repository is evaluated by its listing: here the first half of
                // the packages, when the outcome drawn says so (else tasks evaluate all).
                evaluated: match outcome {
                    Outcome::HashMismatch | Outcome::TimedOut
                        if self.farm.packages.len() <= *evaluate_up_to as usize =>
                    {
                        let half: Vec<String> = (0..self.farm.packages.len().div_ceil(2))
                            .map(|j| format!("p{j}"))
                            .collect();
                        Some(self.eval_chunk(&half))
                    }
                    _ => None,
                },
                result: match outcome {
                    Outcome::InfraFailed | Outcome::Cancelled | Outcome::ForeignOutputs => {
                        Err(("evaluator killed: out of memory".into(), true))
                    }
                    Outcome::BuildFailed => Err(("error: flake has no such output".into(), false)),
                    _ => Ok((
                        (0..self.farm.packages.len())
                            .map(|j| format!("p{j}"))
                            .collect(),
                        vec![],
                    )),
                },
                follows: false,
            },
            Job::EvalChunk { attrs, .. } => FromAgent::EvalChunk {
                attempt,
                result: match outcome {
                    Outcome::InfraFailed | Outcome::Cancelled => {
                        Err(("evaluator killed: out of memory".into(), true))
                    }
                    _ => Ok(self.eval_chunk(attrs)),
                },
            },
            Job::Build { drv_path: d, .. } => {
                let i = drv_index(d).expect("a generated derivation");
                let kind = match outcome {
                    Outcome::Built | Outcome::ForeignOutputs => "built",
                    Outcome::BuildFailed => "build-failed",
                    Outcome::HashMismatch => "hash-mismatch",
                    Outcome::TimedOut => "timed-out",
                    Outcome::InfraFailed => "infra-failed",
                    Outcome::Cancelled => "cancelled",
                };
                let mut report = BuildReport {
                    // Whatever type the engine spells outcomes with, it parses their names.
                    kind: kind.parse().expect("a known outcome"),
                    message: format!("{kind} (test)"),
                    duration_ms: 10,
                    ..Default::default()
                };
                match outcome {
                    Outcome::Built => {
                        report.outputs = [("out".to_string(), out_path(i))].into();
                    }
                    Outcome::ForeignOutputs => {
                        report.outputs = [(
                            "out".to_string(),
                            OutputPath::parse(&format!("/nix/store/{}-evil", hash32(3, i)))
                                .unwrap(),
                        )]
                        .into();
                    }
                    Outcome::HashMismatch => {
                        report.specified = nixfarm_core::Sri::parse(
                            "sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
                        )
                        .ok();
                        report.got = nixfarm_core::Sri::parse(
                            "sha256-61WeR6/hoYwd5GsHVR2+sgD/QcMTsCKiZHJ7o8yKEbQ=",
                        )
                        .ok();
                    }
                    _ => {}
                }
                FromAgent::Build { attempt, report }
            }
        }
    }

    /// The evaluation of some attributes: their infos and the graph below them.
    pub(super) fn eval_chunk(&self, attrs: &[String]) -> EvalChunkOutput {
        let mut evaluated = vec![];
        let mut graph = BTreeMap::new();
        for attr in attrs {
            let j = package_index(attr).expect("a generated attribute");
            let (top, fails) = self.farm.packages[j];
            if fails {
                evaluated.push(EvaluatedAttr {
                    attr: attr.clone(),
                    info: PackageInfo {
                        eval_error: "error: undefined variable 'oops'".into(),
                        ..Default::default()
                    },
                });
                continue;
            }
            evaluated.push(EvaluatedAttr {
                attr: attr.clone(),
                info: PackageInfo {
                    drv_path: Some(drv_path(top)),
                    outputs: [("out".to_string(), out_path(top))].into(),
                    pname: attr.clone(),
                    system: SYSTEM.into(),
                    ..Default::default()
                },
            });
            for d in self.closure(top) {
                graph.insert(
                    drv_path(d),
                    DrvNode {
                        system: SYSTEM.into(),
                        outputs: [("out".to_string(), out_path(d))].into(),
                        input_drvs: self.farm.inputs[d].iter().map(|&x| drv_path(x)).collect(),
                        ..Default::default()
                    },
                );
            }
        }
        (evaluated, graph)
    }

    /// A derivation and everything below it.
    pub(super) fn closure(&self, top: usize) -> BTreeSet<usize> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![top];
        while let Some(d) = stack.pop() {
            if seen.insert(d) {
                stack.extend(self.farm.inputs[d].iter().copied());
            }
        }
        seen
    }

    pub(super) fn run_mut(&mut self, id: &str) -> Option<&mut RunH> {
        self.runs.iter_mut().find(|r| r.id == id)
    }

    /// Records that a build of `a`'s derivation may have failed with `kind` (or was lost).
    pub(super) fn note_failure(&mut self, a: &Assignment, kind: BuildOutcome) {
        if let Job::Build { drv_path: d, .. } = &a.job
            && let Some(i) = drv_index(d)
            && let Some(r) = self.run_mut(&a.run.clone())
        {
            r.failure_evidence.entry(i).or_default().insert(kind);
        }
    }

    pub(super) fn send(&self, k: usize, conn: u64, msg: FromAgent) -> Checked {
        self.engine()
            .agent_message(&self.agents[k].name, conn, msg)
            .map_err(|e| violation(0, format!("agent_message refused: {e}")))
    }

    pub(super) fn snapshot(&self) -> Checked<Snapshot> {
        let e = self.engine();
        let mut runs = vec![];
        for r in &self.runs {
            let rep = e
                .report(&r.id)
                .map_err(|err| violation(0, format!("report({}): {err}", r.id)))?;
            runs.push((r.id.clone(), rep));
        }
        let agents = e
            .list_agents()
            .into_iter()
            .map(|a| {
                let mut b = a.building.clone();
                b.sort();
                (a.name, a.connected, b)
            })
            .collect();
        Ok(Snapshot { runs, agents })
    }

    /// Runs `f`, which sends a message the engine must ignore, and checks that nothing changed.
    pub(super) fn must_ignore(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut World) -> Checked,
    ) -> Checked {
        let before = self.snapshot()?;
        f(self)?;
        let got = self.drain();
        let after = self.snapshot()?;
        if got > 0 {
            return Err(violation(
                4,
                format!("{what}: the coordinator sent {got} new message(s) to agents"),
            ));
        }
        if before != after {
            return Err(violation(
                4,
                format!(
                    "{what} changed the coordinator's state:\n{}",
                    diff_snapshots(&before, &after, self)
                ),
            ));
        }
        Ok(())
    }

    /// The model's side of a lease check: agents silent for longer than a lease, with jobs,
    /// lose them all and are cut off.
    pub(super) fn expire_model(&mut self) {
        let now = self.now();
        for k in 0..self.agents.len() {
            let ag = &self.agents[k];
            if !ag.held.is_empty() && now - ag.last_seen > LEASE_MS {
                let held: Vec<Assignment> = self.agents[k].held.drain(..).collect();
                let names: Vec<String> = held.iter().map(|a| self.describe(a)).collect();
                self.log(format!(
                    "      {}'s lease expired: lost {}",
                    self.agents[k].name,
                    names.join(", ")
                ));
                for a in &held {
                    self.note_failure(a, BuildOutcome::InfraFailed);
                }
                self.agents[k].lost.extend(held);
                self.agents[k].link = None;
            }
        }
    }
}
