//! Model-based test of the coordinator's [`Engine`]: a random derivation graph, packages and
//! agents, then a random sequence of agent answers (good, failing, duplicated, forged by
//! another agent, late, on a replaced stream), disconnects, reconnects, lease expiries,
//! cancellations, new runs and coordinator restarts (the engine reopened from its SQLite
//! file). After every step the reports are checked:
//!
//! 1. every package has exactly one status and the summary counts match them;
//! 2. a package is `dependency-failed` only when a derivation in its closure failed, and its
//!    reason names a failing outcome (never "dependency X failed: built");
//! 3. a terminal package status never changes, and a restart changes no status;
//! 4. a duplicate result, a result from an agent that does not hold the attempt, a late
//!    result for a lost attempt and a message on a replaced stream change nothing;
//! 5. a finished (terminal) run has no pending package.
//!
//! The harness also keeps its own model of which attempts each agent holds and checks it
//! against `list_agents` (invariant 0 when they disagree). Finally every run is driven to its
//! end (everything answered successfully) and must end. A failure prints the generated farm
//! and the numbered list of steps that ran. Fixed sequences that once broke an invariant are
//! replayed as plain tests at the end of the file.

use nixfarm_coordinator::clock::ManualClock;
use nixfarm_coordinator::db::Db;
use nixfarm_coordinator::model::{
    BuildReport, DrvNode, EvalChunkOutput, EvaluatedAttr, FromAgent, Job, PackageInfo,
    Registration, RunSpec, SourceSpec, ToAgent, store_name,
};
use nixfarm_coordinator::{Engine, EngineOptions};
use nixfarm_core::report::Report;
use nixfarm_core::{PackageStatus, RunState};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::sync::Arc;
use tokio::sync::mpsc;

const LEASE_MS: i64 = 5_000;
const SYSTEM: &str = "x86_64-linux";
/// Infrastructure failures (and lost attempts) tolerated per job: small, so give-ups happen.
const MAX_INFRA_RETRIES: i64 = 1;
const MAX_RUNS: usize = 3;

// ----- what is generated --------------------------------------------------------------------

/// The generated farm: a derivation DAG, packages on top of it, agents.
#[derive(Clone)]
struct Farm {
    /// Inputs of each derivation (indices of earlier derivations).
    inputs: Vec<BTreeSet<usize>>,
    /// Per package: its top derivation and whether its evaluation fails.
    packages: Vec<(usize, bool)>,
    /// Per agent: its max_jobs.
    agents: Vec<u32>,
}

impl fmt::Debug for Farm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Farm {{ drvs: [")?;
        for (i, ins) in self.inputs.iter().enumerate() {
            let ins: Vec<String> = ins.iter().map(|j| format!("d{j}")).collect();
            write!(
                f,
                "{}d{i} <- [{}]",
                if i > 0 { ", " } else { "" },
                ins.join(" ")
            )?;
        }
        write!(f, "], packages: [")?;
        for (j, (top, fails)) in self.packages.iter().enumerate() {
            let e = if *fails { " (eval fails)" } else { "" };
            write!(f, "{}p{j} = d{top}{e}", if j > 0 { ", " } else { "" })?;
        }
        write!(f, "], agents: [")?;
        for (k, jobs) in self.agents.iter().enumerate() {
            write!(f, "{}a{k} (max_jobs {jobs})", if k > 0 { ", " } else { "" })?;
        }
        write!(f, "] }}")
    }
}

fn farm() -> impl Strategy<Value = Farm> {
    (1usize..=12).prop_flat_map(|n| {
        (
            prop::collection::vec(prop::collection::btree_set(0..n, 0..=3), n),
            prop::collection::vec((0..n, prop::bool::weighted(0.1)), 1..=4),
            prop::collection::vec(1u32..=2, 1..=3),
        )
            .prop_map(|(raw, packages, agents)| Farm {
                // Only edges to earlier derivations: a DAG by construction.
                inputs: raw
                    .into_iter()
                    .enumerate()
                    .map(|(i, s)| {
                        if i == 0 {
                            BTreeSet::new()
                        } else {
                            s.into_iter().map(|j| j % i).collect()
                        }
                    })
                    .collect(),
                packages,
                agents,
            })
    })
}

/// How an agent answers an assignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Builds: `built` with the derivation's own outputs; evaluations: the right answer.
    Built,
    /// Builds: `build-failed`; a listing: a (non-infrastructure) evaluation error.
    BuildFailed,
    HashMismatch,
    TimedOut,
    /// Builds: `infra-failed`; evaluations: an infrastructure failure.
    InfraFailed,
    /// Builds: `cancelled`; evaluations: an infrastructure failure.
    Cancelled,
    /// Builds: `built` with outputs that are not the derivation's.
    ForeignOutputs,
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        8 => Just(Outcome::Built),
        1 => Just(Outcome::BuildFailed),
        1 => Just(Outcome::HashMismatch),
        1 => Just(Outcome::TimedOut),
        2 => Just(Outcome::InfraFailed),
        1 => Just(Outcome::Cancelled),
        1 => Just(Outcome::ForeignOutputs),
    ]
}

/// One step. Agent, run and attempt numbers are taken modulo what exists when the step runs;
/// a step that does not apply then is skipped.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Agent answers one of the attempts it holds.
    Answer {
        agent: usize,
        pick: usize,
        outcome: Outcome,
    },
    /// Agent sends again a result it already sent.
    Duplicate {
        agent: usize,
        pick: usize,
    },
    /// Agent `from` sends a result for an attempt another agent holds.
    Foreign {
        from: usize,
        pick: usize,
        outcome: Outcome,
    },
    /// Agent answers an attempt the coordinator took away from it (lost).
    Late {
        agent: usize,
        pick: usize,
        outcome: Outcome,
    },
    /// Agent answers one of its attempts on a stream a reconnect replaced.
    OldStream {
        agent: usize,
        pick: usize,
        outcome: Outcome,
    },
    Heartbeat {
        agent: usize,
    },
    Disconnect {
        agent: usize,
    },
    /// Agent registers again, claiming the attempts in `claims` (bits over held then lost
    /// attempts), presenting its session key or first closing its stream.
    Reconnect {
        agent: usize,
        claims: u8,
        with_key: bool,
    },
    /// Half a lease passes; leases are checked.
    Tick,
    /// More than a lease passes, in which only the agents in `spare` (bits) send a
    /// heartbeat; leases are checked.
    Expire {
        spare: u8,
    },
    /// The coordinator restarts: the engine is dropped and reopened from its database.
    Restart,
    Cancel {
        run: usize,
    },
    Submit,
}

fn step() -> impl Strategy<Value = Step> {
    let agent = || 0usize..3;
    let pick = || 0usize..16;
    prop_oneof![
        20 => (agent(), pick(), outcome())
            .prop_map(|(agent, pick, outcome)| Step::Answer { agent, pick, outcome }),
        2 => (agent(), pick()).prop_map(|(agent, pick)| Step::Duplicate { agent, pick }),
        2 => (agent(), pick(), outcome())
            .prop_map(|(from, pick, outcome)| Step::Foreign { from, pick, outcome }),
        1 => (agent(), pick(), outcome())
            .prop_map(|(agent, pick, outcome)| Step::Late { agent, pick, outcome }),
        1 => (agent(), pick(), outcome())
            .prop_map(|(agent, pick, outcome)| Step::OldStream { agent, pick, outcome }),
        1 => agent().prop_map(|agent| Step::Heartbeat { agent }),
        2 => agent().prop_map(|agent| Step::Disconnect { agent }),
        3 => (agent(), prop_oneof![2 => Just(u8::MAX), 1 => any::<u8>()], any::<bool>())
            .prop_map(|(agent, claims, with_key)| Step::Reconnect { agent, claims, with_key }),
        1 => Just(Step::Tick),
        2 => any::<u8>().prop_map(|spare| Step::Expire { spare }),
        2 => Just(Step::Restart),
        1 => (0usize..MAX_RUNS).prop_map(|run| Step::Cancel { run }),
        1 => Just(Step::Submit),
    ]
}

// ----- names and paths ----------------------------------------------------------------------

/// 32 characters of [0-9a-z], fixed by `tag` and `i`.
fn hash32(tag: u64, i: usize) -> String {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ tag.wrapping_mul(0xD6E8_FEB8);
    (0..32)
        .map(|_| {
            x ^= x >> 29;
            x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x ^= x >> 32;
            ALPHABET[(x % 36) as usize] as char
        })
        .collect()
}

fn drv_path(i: usize) -> String {
    format!("/nix/store/{}-d{i}.drv", hash32(1, i))
}

fn out_path(i: usize) -> String {
    format!("/nix/store/{}-d{i}", hash32(2, i))
}

/// The index of a generated derivation from its path.
fn drv_index(path: &str) -> Option<usize> {
    store_name(path).strip_prefix('d')?.parse().ok()
}

fn package_index(attr: &str) -> Option<usize> {
    attr.strip_prefix('p')?.parse().ok()
}

fn run_spec() -> RunSpec {
    RunSpec {
        source: SourceSpec::FlakeRef("github:owner/repo".into()),
        attr_path: "packages.x86_64-linux".into(),
        label: String::new(),
        cache: String::new(),
        trusted_public_keys: vec![],
        timeout_secs: 0,
        max_silent_secs: 0,
        attrs: vec![],
        skip_cached: false,
        skip_listing: false,
        smoke: false,
        entry: Default::default(),
    }
}

fn registration(name: &str, max_jobs: u32, running: Vec<String>, key: &str) -> Registration {
    Registration {
        name: name.into(),
        systems: vec![SYSTEM.into()],
        features: vec![],
        max_jobs,
        nix_version: "2.24.0".into(),
        running_attempts: running,
        session_key: key.into(),
    }
}

/// The outcome a build answered with `outcome` is recorded with, when it is a failure.
fn failing_kind(outcome: Outcome) -> Option<&'static str> {
    match outcome {
        Outcome::Built | Outcome::Cancelled => None,
        Outcome::BuildFailed => Some("build-failed"),
        Outcome::HashMismatch => Some("hash-mismatch"),
        Outcome::TimedOut => Some("timed-out"),
        // Outputs that are not the derivation's count as an infrastructure failure.
        Outcome::InfraFailed | Outcome::ForeignOutputs => Some("infra-failed"),
    }
}

/// Whether an outcome string is a failure a dependency can fail with.
fn is_failing_kind(kind: &str) -> bool {
    matches!(
        kind,
        "build-failed" | "hash-mismatch" | "timed-out" | "infra-failed"
    )
}

// ----- the harness --------------------------------------------------------------------------

/// A job the coordinator assigned to an agent.
#[derive(Clone)]
struct Assignment {
    attempt: String,
    run: String,
    job: Job,
}

struct Link {
    conn: u64,
    session: String,
    rx: mpsc::UnboundedReceiver<ToAgent>,
}

struct AgentH {
    name: String,
    max_jobs: u32,
    link: Option<Link>,
    /// Connections of this agent replaced by a later registration (this engine's lifetime).
    old_conns: Vec<u64>,
    /// Assigned, not answered, and (by the model) still held by the coordinator for it.
    held: Vec<Assignment>,
    /// Assigned, not answered, taken away by the coordinator (lease, reconnect, restart).
    lost: Vec<Assignment>,
    /// Results sent (first time) for attempts it held.
    answered: Vec<(Assignment, FromAgent)>,
    /// Attempts the coordinator asked it to cancel.
    cancel_asked: HashSet<String>,
    /// When the coordinator last heard of it, by the model.
    last_seen: i64,
    /// Whether the coordinator's database knows it (it reappears, disconnected, on restart).
    known: bool,
}

struct RunH {
    id: String,
    /// Package statuses at the last check.
    statuses: BTreeMap<String, String>,
    /// Per derivation (index), the failing outcomes its builds were reported with, a lost
    /// attempt counting as `infra-failed`: the only failures a dependent may blame on it.
    failure_evidence: BTreeMap<usize, BTreeSet<&'static str>>,
}

/// Which invariant a violation breaks (0: the engine misbehaved otherwise).
struct Violation {
    invariant: u8,
    msg: String,
}

fn violation(invariant: u8, msg: impl Into<String>) -> Violation {
    Violation {
        invariant,
        msg: msg.into(),
    }
}

/// What must not change when a message is ignored.
#[derive(Debug, PartialEq)]
struct Snapshot {
    runs: Vec<(String, Report)>,
    /// (name, connected, building sorted)
    agents: Vec<(String, bool, Vec<String>)>,
}

struct World {
    farm: Farm,
    dir: tempfile::TempDir,
    clock: Arc<ManualClock>,
    engine: Option<Engine>,
    agents: Vec<AgentH>,
    runs: Vec<RunH>,
    trace: Vec<String>,
}

type Checked<T = ()> = Result<T, Violation>;

/// A run's id, state and package statuses.
type RunStatuses = (String, RunState, BTreeMap<String, String>);

impl World {
    fn new(farm: &Farm) -> World {
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

    fn open_engine(&mut self) {
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

    fn engine(&self) -> &Engine {
        self.engine.as_ref().expect("engine open")
    }

    fn now(&self) -> i64 {
        use nixfarm_coordinator::clock::Clock as _;
        self.clock.now_ms()
    }

    fn run_no(&self, id: &str) -> String {
        match self.runs.iter().position(|r| r.id == id) {
            Some(i) => format!("r{i}"),
            None => id.to_string(),
        }
    }

    fn describe(&self, a: &Assignment) -> String {
        let what = match &a.job {
            Job::EvalList { .. } => "eval-list".to_string(),
            Job::EvalChunk { attrs, .. } => format!("eval-chunk [{}]", attrs.join(" ")),
            Job::Build { drv_path, .. } => format!("build {}", store_name(drv_path)),
        };
        format!("{what} of {} (attempt {})", self.run_no(&a.run), &a.attempt)
    }

    fn log(&mut self, line: String) {
        self.trace.push(line);
    }

    /// Receives what the coordinator sent each connected agent.
    fn drain(&mut self) -> usize {
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
    fn answer(&self, a: &Assignment, outcome: Outcome) -> FromAgent {
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
                            format!("/nix/store/{}-evil", hash32(3, i)),
                        )]
                        .into();
                    }
                    Outcome::HashMismatch => {
                        report.specified =
                            "sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into();
                        report.got = "sha256-61WeR6/hoYwd5GsHVR2+sgD/QcMTsCKiZHJ7o8yKEbQ=".into();
                    }
                    _ => {}
                }
                FromAgent::Build { attempt, report }
            }
        }
    }

    /// The evaluation of some attributes: their infos and the graph below them.
    fn eval_chunk(&self, attrs: &[String]) -> EvalChunkOutput {
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
                    drv_path: drv_path(top),
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
    fn closure(&self, top: usize) -> BTreeSet<usize> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![top];
        while let Some(d) = stack.pop() {
            if seen.insert(d) {
                stack.extend(self.farm.inputs[d].iter().copied());
            }
        }
        seen
    }

    fn run_mut(&mut self, id: &str) -> Option<&mut RunH> {
        self.runs.iter_mut().find(|r| r.id == id)
    }

    /// Records that a build of `a`'s derivation may have failed with `kind` (or was lost).
    fn note_failure(&mut self, a: &Assignment, kind: &'static str) {
        if let Job::Build { drv_path: d, .. } = &a.job
            && let Some(i) = drv_index(d)
            && let Some(r) = self.run_mut(&a.run.clone())
        {
            r.failure_evidence.entry(i).or_default().insert(kind);
        }
    }

    fn send(&self, k: usize, conn: u64, msg: FromAgent) -> Checked {
        self.engine()
            .agent_message(&self.agents[k].name, conn, msg)
            .map_err(|e| violation(0, format!("agent_message refused: {e}")))
    }

    fn snapshot(&self) -> Checked<Snapshot> {
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
    fn must_ignore(&mut self, what: &str, f: impl FnOnce(&mut World) -> Checked) -> Checked {
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
    fn expire_model(&mut self) {
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
                    self.note_failure(a, "infra-failed");
                }
                self.agents[k].lost.extend(held);
                self.agents[k].link = None;
            }
        }
    }

    // ----- steps ----------------------------------------------------------------------------

    fn apply(&mut self, step: Step) -> Checked {
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

    fn heartbeat(&mut self, k: usize) -> Checked {
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

    fn submit(&mut self) -> Checked {
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

    fn reconnect(&mut self, k: usize, claims: u8, with_key: bool) -> Checked {
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
            self.note_failure(a, "infra-failed");
        }
        self.drain();
        Ok(())
    }

    fn restart(&mut self) -> Checked {
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

    /// Every run's state and package statuses.
    fn observe_all(&self) -> Checked<Vec<RunStatuses>> {
        let mut out = vec![];
        for r in &self.runs {
            let (st, rep) = self.observe(&r.id)?;
            out.push((
                r.id.clone(),
                st,
                rep.packages
                    .iter()
                    .map(|p| (p.attr.clone(), p.status.to_string()))
                    .collect(),
            ));
        }
        Ok(out)
    }

    fn observe(&self, id: &str) -> Checked<(RunState, Report)> {
        let e = self.engine();
        let st = e
            .run_state(id)
            .map_err(|err| violation(0, format!("run_state: {err}")))?;
        let rep = e
            .report(id)
            .map_err(|err| violation(0, format!("report: {err}")))?;
        Ok((st, rep))
    }

    // ----- invariants -----------------------------------------------------------------------

    fn check(&mut self) -> Checked {
        let attrs_all: BTreeSet<String> = (0..self.farm.packages.len())
            .map(|j| format!("p{j}"))
            .collect();
        for ri in 0..self.runs.len() {
            let id = self.runs[ri].id.clone();
            let rn = format!("r{ri}");
            let (state, rep) = self.observe(&id)?;
            // 1. one status per package; the summary counts them.
            let mut seen = BTreeSet::new();
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            for p in &rep.packages {
                if !seen.insert(p.attr.clone()) {
                    return Err(violation(
                        1,
                        format!("{rn}: package {} listed twice", p.attr),
                    ));
                }
                if !attrs_all.contains(&p.attr) {
                    return Err(violation(1, format!("{rn}: unknown package {}", p.attr)));
                }
                let s = p.status.to_string();
                if s.parse::<PackageStatus>().is_err() {
                    return Err(violation(
                        1,
                        format!("{rn}: {} has no valid status: {s:?}", p.attr),
                    ));
                }
                *counts.entry(s).or_default() += 1;
            }
            let summary: BTreeMap<String, usize> = rep
                .summary
                .by_status
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect();
            let ready = counts.get("ready").copied().unwrap_or(0);
            if summary != counts
                || rep.summary.total != rep.packages.len()
                || rep.summary.ready != ready
            {
                return Err(violation(
                    1,
                    format!(
                        "{rn}: summary {:?} (total {}, ready {}) does not count the statuses {counts:?} of {} packages",
                        summary,
                        rep.summary.total,
                        rep.summary.ready,
                        rep.packages.len()
                    ),
                ));
            }
            if matches!(state, RunState::Building | RunState::Finished) && seen != attrs_all {
                return Err(violation(
                    1,
                    format!("{rn} is {state} but reports packages {seen:?}, not {attrs_all:?}"),
                ));
            }
            // 2. dependency failures come from failed dependencies.
            for p in &rep.packages {
                if p.status.to_string() != PackageStatus::DependencyFailed.as_str() {
                    continue;
                }
                let j = package_index(&p.attr).unwrap_or(0);
                let top = self.farm.packages[j].0;
                let mut below = self.closure(top);
                below.remove(&top);
                // "dependency X failed: KIND" or "dependency X failed: KIND: message".
                let kind = p
                    .reason
                    .split_once(" failed: ")
                    .and_then(|(_, k)| k.split(':').next())
                    .map(str::trim)
                    .unwrap_or("");
                if !is_failing_kind(kind) {
                    return Err(violation(
                        2,
                        format!(
                            "{rn}: {} is dependency-failed with reason {:?}: the dependency did not fail",
                            p.attr, p.reason
                        ),
                    ));
                }
                // A package's own derivation is named by the package ("p3"); any other by
                // the package it belongs to ("p3's d5").
                let root = match p.failed_dependency.split_once("'s ") {
                    Some((_, drv)) => drv_index(drv),
                    None => package_index(&p.failed_dependency)
                        .filter(|_| p.failed_dependency.starts_with('p'))
                        .map(|q| self.farm.packages[q].0)
                        .or_else(|| drv_index(&p.failed_dependency)),
                };
                // The dependency it blames is below it and did fail that way.
                let evidence = &self.runs[ri].failure_evidence;
                let blamed = root
                    .filter(|d| below.contains(d))
                    .is_some_and(|d| evidence.get(&d).is_some_and(|kinds| kinds.contains(kind)));
                if !blamed {
                    return Err(violation(
                        2,
                        format!(
                            "{rn}: {} is dependency-failed ({:?}, failed_dependency {:?}) but no derivation below d{top} failed that way (failures seen: {:?})",
                            p.attr, p.reason, p.failed_dependency, evidence
                        ),
                    ));
                }
            }
            // 3. terminal statuses stay.
            let now: BTreeMap<String, String> = rep
                .packages
                .iter()
                .map(|p| (p.attr.clone(), p.status.to_string()))
                .collect();
            for (attr, before) in &self.runs[ri].statuses {
                let after = now.get(attr).cloned().unwrap_or_else(|| "<gone>".into());
                if before != PackageStatus::Pending.as_str() && *before != after {
                    let reason = rep
                        .packages
                        .iter()
                        .find(|p| p.attr == *attr)
                        .map(|p| p.reason.clone())
                        .unwrap_or_default();
                    return Err(violation(
                        3,
                        format!(
                            "{rn} ({state}): {attr} went from terminal status {before} to {after} ({reason:?})"
                        ),
                    ));
                }
            }
            self.runs[ri].statuses = now;
            // 5. a finished run has nothing pending.
            if state.is_terminal()
                && let Some(p) = rep
                    .packages
                    .iter()
                    .find(|p| p.status.to_string() == PackageStatus::Pending.as_str())
            {
                return Err(violation(
                    5,
                    format!(
                        "{rn} is {state} (error {:?}) but {} is pending ({:?})",
                        rep.error, p.attr, p.reason
                    ),
                ));
            }
        }
        self.check_model()
    }

    /// The model and the engine agree on who is connected and how many jobs each runs (a
    /// disagreement is an engine bug or a harness bug; either way it is reported).
    fn check_model(&self) -> Checked {
        let listed = self.engine().list_agents();
        for ag in &self.agents {
            let Some(st) = listed.iter().find(|a| a.name == ag.name) else {
                if ag.known {
                    return Err(violation(
                        0,
                        format!("agent {} is not listed any more", ag.name),
                    ));
                }
                continue;
            };
            if st.connected != ag.link.is_some() || st.building.len() != ag.held.len() {
                let held: Vec<String> = ag.held.iter().map(|a| self.describe(a)).collect();
                return Err(violation(
                    0,
                    format!(
                        "model and engine disagree on agent {}: engine says connected {}, building {:?}; model says connected {}, holding {:?}",
                        ag.name,
                        st.connected,
                        st.building,
                        ag.link.is_some(),
                        held
                    ),
                ));
            }
        }
        Ok(())
    }

    // ----- the end ----------------------------------------------------------------------------

    /// Reconnects every agent and answers everything successfully until every run ends.
    fn finish(&mut self) -> Checked {
        self.log("--- every run is driven to its end ---".into());
        for k in 0..self.agents.len() {
            if self.agents[k].link.is_none() {
                let all = (1u16 << self.agents[k].held.len().min(8)) - 1;
                self.reconnect(k, all as u8, false)?;
                self.check()?;
            }
        }
        for _round in 0..500 {
            self.drain();
            let mut open = vec![];
            for r in &self.runs {
                if !self.observe(&r.id)?.0.is_terminal() {
                    open.push(r.id.clone());
                }
            }
            if open.is_empty() {
                return Ok(());
            }
            let Some(k) = (0..self.agents.len()).find(|&k| !self.agents[k].held.is_empty()) else {
                let mut why = vec![];
                for id in &open {
                    let (st, rep) = self.observe(id)?;
                    let pend: Vec<String> = rep
                        .packages
                        .iter()
                        .filter(|p| p.status.to_string() == "pending")
                        .map(|p| format!("{}: {}", p.attr, p.reason))
                        .collect();
                    why.push(format!("{} {st} [{}]", self.run_no(id), pend.join("; ")));
                }
                return Err(violation(
                    5,
                    format!(
                        "runs never finish: nothing is assigned to any agent while {}",
                        why.join(", ")
                    ),
                ));
            };
            let a = self.agents[k].held.remove(0);
            // An agent told to cancel (or whose run was cancelled) reports the build cancelled.
            let cancelled = self.observe(&a.run)?.0 == RunState::Cancelled;
            let outcome = if cancelled || self.agents[k].cancel_asked.contains(&a.attempt) {
                Outcome::Cancelled
            } else {
                Outcome::Built
            };
            let msg = self.answer(&a, outcome);
            self.log(format!(
                "{} answers {} with {}",
                self.agents[k].name,
                self.describe(&a),
                outcome_text(&msg)
            ));
            let conn = self.agents[k].link.as_ref().map(|l| l.conn).unwrap_or(0);
            self.agents[k].last_seen = self.now();
            self.send(k, conn, msg.clone())?;
            self.agents[k].answered.push((a, msg));
            self.drain();
            self.check()?;
        }
        Err(violation(5, "runs still unfinished after 500 answers"))
    }
}

fn outcome_text(msg: &FromAgent) -> String {
    match msg {
        FromAgent::EvalList {
            result: Ok((a, _)), ..
        } => format!("the list {a:?}"),
        FromAgent::EvalChunk {
            result: Ok((a, g)), ..
        } => format!("{} attributes and {} derivations", a.len(), g.len()),
        FromAgent::EvalList { result: Err(e), .. }
        | FromAgent::EvalChunk { result: Err(e), .. } => {
            format!(
                "an evaluation error ({})",
                if e.1 { "infrastructure" } else { "the flake's" }
            )
        }
        FromAgent::Build { report, .. } => {
            let own = report.outputs.values().all(|p| !p.ends_with("-evil"));
            format!(
                "{}{}",
                report.kind,
                if own { "" } else { " with foreign outputs" }
            )
        }
        FromAgent::Heartbeat { .. } => "a heartbeat".into(),
        FromAgent::Log { .. } => "a log".into(),
        FromAgent::RepoChecks { checks, .. } => format!("{} repository checks", checks.len()),
    }
}

fn diff_snapshots(a: &Snapshot, b: &Snapshot, w: &World) -> String {
    let mut out = vec![];
    for ((id, ra), (_, rb)) in a.runs.iter().zip(&b.runs) {
        if ra.state != rb.state {
            out.push(format!(
                "  {} state {} -> {}",
                w.run_no(id),
                ra.state,
                rb.state
            ));
        }
        for (pa, pb) in ra.packages.iter().zip(&rb.packages) {
            if pa != pb {
                out.push(format!(
                    "  {} {}: {} {:?} -> {} {:?}",
                    w.run_no(id),
                    pa.attr,
                    pa.status,
                    pa.reason,
                    pb.status,
                    pb.reason
                ));
            }
        }
        if ra.packages.len() != rb.packages.len() {
            out.push(format!(
                "  {} packages {} -> {}",
                w.run_no(id),
                ra.packages.len(),
                rb.packages.len()
            ));
        }
    }
    if a.agents != b.agents {
        out.push(format!("  agents {:?} -> {:?}", a.agents, b.agents));
    }
    out.join("\n")
}

/// Runs one generated case; Err carries the violated invariant and the steps that led to it.
fn run_case(farm: &Farm, steps: &[Step]) -> Result<(), String> {
    let mut w = World::new(farm);
    let result = (|| -> Checked {
        for k in 0..w.agents.len() {
            w.reconnect(k, 0, false)?;
        }
        w.submit()?;
        w.check()?;
        for &step in steps {
            w.apply(step)?;
            w.check()?;
        }
        w.finish()?;
        w.check()
    })();
    result.map_err(|v| {
        let steps: Vec<String> = w
            .trace
            .iter()
            .enumerate()
            .map(|(i, s)| format!("{i:>3}. {s}"))
            .collect();
        format!(
            "invariant {} violated: {}\n{farm:?}\nsteps:\n{}",
            v.invariant,
            v.msg,
            steps.join("\n")
        )
    })
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(64),
        // Shrinking a failure stays within CI's patience too.
        max_shrink_iters: 2048,
        max_shrink_time: 20_000,
        // No regression files next to the sources.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn engine_keeps_its_invariants(
        farm in farm(),
        steps in prop::collection::vec(step(), 1..=60),
    ) {
        if let Err(msg) = run_case(&farm, &steps) {
            return Err(TestCaseError::fail(msg));
        }
    }
}

// ----- replays ------------------------------------------------------------------------------
// Fixed sequences that broke an invariant, replayed exactly: the property finds each only by
// chance, these find it every time.

fn replay(farm: Farm, steps: &[Step]) {
    if let Err(msg) = run_case(&farm, steps) {
        panic!("{msg}");
    }
}

/// a0 answers the first attempt it holds.
fn answer(outcome: Outcome) -> Step {
    Step::Answer {
        agent: 0,
        pick: 0,
        outcome,
    }
}

/// Invariant 5.
#[test]
fn a_run_that_fails_in_evaluation_leaves_no_package_pending() {
    // Two packages, one agent: two evaluation chunks. The first evaluates; the second fails
    // on the machine until the retry budget is spent, which fails the run.
    let farm = Farm {
        inputs: vec![BTreeSet::new()],
        packages: vec![(0, false), (0, false)],
        agents: vec![1],
    };
    replay(
        farm,
        &[
            answer(Outcome::Built),
            answer(Outcome::Built),
            answer(Outcome::InfraFailed),
            answer(Outcome::InfraFailed),
        ],
    );
}

/// Invariant 3.
#[test]
fn a_build_that_ends_after_its_run_was_cancelled_leaves_the_package_cancelled() {
    let farm = Farm {
        inputs: vec![BTreeSet::new()],
        packages: vec![(0, false)],
        agents: vec![1],
    };
    replay(
        farm,
        &[
            answer(Outcome::Built),
            answer(Outcome::Built),
            Step::Cancel { run: 0 },
            answer(Outcome::Built),
        ],
    );
}

/// Invariant 3.
#[test]
fn a_dependency_failed_package_stays_so_when_another_input_fails_later() {
    // d2 needs d0 and d1, built at once by a two-job agent: one fails, then the other's
    // fixed output turns out to have the wrong hash.
    let farm = Farm {
        inputs: vec![BTreeSet::new(), BTreeSet::new(), [0, 1].into()],
        packages: vec![(2, false)],
        agents: vec![2],
    };
    replay(
        farm,
        &[
            answer(Outcome::Built),
            answer(Outcome::Built),
            answer(Outcome::BuildFailed),
            answer(Outcome::HashMismatch),
        ],
    );
}
