//! The coordinator's state machine: runs move from evaluation to building to finished,
//! agents connect and take jobs, results come back once. Every change is written to the
//! database first; the in-memory state is a cache of it that [`Engine::open`] rebuilds.

use crate::clock::Clock;
use crate::db::{AttemptRow, Db, DbError, RunRow};
use crate::model::*;
use crate::scheduler::{Capabilities, Class, NodeId, NodeState, Scheduler};
use nixfarm_core::RunEvent as Ev;
use nixfarm_core::report::{HashMismatch, PackageReport, Report};
use nixfarm_core::{PackageStatus, RunState, rev_is_pinned};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{broadcast, mpsc};

/// Errors the engine reports to its callers (mapped to gRPC statuses in one place).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("too many runs in flight (limit {0}); wait for one to finish")]
    Busy(usize),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Denied(String),
    #[error("database error: {0}")]
    Db(#[from] DbError),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Tunables of the engine (the config file's `[scheduler]` part).
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Attributes per evaluation task.
    pub eval_chunk_size: usize,
    /// Memory cap per evaluation worker, MiB.
    pub eval_memory_mib: u64,
    /// Infrastructure failures tolerated per job before it is reported infra-failed.
    pub max_infra_retries: i64,
    /// Runs evaluating or building at once.
    pub max_runs_in_flight: usize,
    /// Milliseconds without any message after which an agent's jobs are requeued.
    pub lease_ms: i64,
    /// Accept flake references agents resolve on their own disk (`path:`, `git+file:`, …).
    pub allow_local_flake_refs: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            eval_chunk_size: 16,
            eval_memory_mib: 4096,
            max_infra_retries: 3,
            max_runs_in_flight: 64,
            lease_ms: 60_000,
            allow_local_flake_refs: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum EvalTask {
    List,
    Chunk(i64),
}

struct RunMem {
    id: String,
    spec: RunSpec,
    state: RunState,
    eval_queue: VecDeque<EvalTask>,
    eval_tasks_total: Option<usize>,
    eval_tasks_done: HashSet<i64>,
    sched: Option<Scheduler>,
    node_of: HashMap<String, NodeId>,
    drv_of: Vec<String>,
    /// The outputs each derivation has by the graph, by node: the only paths a build of it
    /// may report.
    outputs_of: Vec<Outputs>,
    /// Per-derivation build limits from the packages' meta (timeout, max-silent).
    limits: HashMap<String, (u64, u64)>,
    done_builds: u64,
    /// Attribute names of each evaluation task.
    chunk_attrs: HashMap<i64, Vec<String>>,
}

#[derive(Debug, Clone)]
enum JobRef {
    Eval(EvalTask),
    Build(NodeId),
}

#[derive(Debug, Clone)]
struct AttemptMem {
    run_id: String,
    job: JobRef,
    agent: String,
    target: String,
}

struct AgentMem {
    reg: Registration,
    caps: Capabilities,
    conn: u64,
    tx: Option<mpsc::UnboundedSender<ToAgent>>,
    running: HashSet<String>,
    last_seen_ms: i64,
    draining: bool,
    /// Why the agent takes no new jobs for now (its disk is full); empty: it takes them.
    paused: String,
    /// Secret of the current registration: a reconnect that presents it may replace a stream
    /// that still looks open; anyone else is refused the name.
    session: String,
    /// Messages refused as protocol violations (results for attempts it does not hold,
    /// outputs that are not the derivation's).
    violations: u64,
}

struct Inner {
    db: Db,
    runs: Vec<RunMem>,
    agents: BTreeMap<String, AgentMem>,
    attempts: HashMap<String, AttemptMem>,
    next_conn: u64,
}

/// The coordinator engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Mutex<Inner>>,
    events: broadcast::Sender<RunEvent>,
    clock: Arc<dyn Clock>,
    opts: EngineOptions,
    sources_dir: PathBuf,
}

/// An upload claim older than this lapses even while its holder looks alive (a stuck
/// upload must not hold up every other agent for ever), in milliseconds.
pub const UPLOAD_CLAIM_TTL_MS: i64 = 10 * 60 * 1000;

fn random_id(prefix: &str) -> String {
    format!("{prefix}{:016x}", fastrand::u64(..))
}

/// 128 bits from the kernel's random source, in hex: a secret, unlike [`random_id`].
fn secret_key() -> String {
    use std::io::Read as _;
    let mut b = [0u8; 16];
    match std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)) {
        Ok(()) => data_encoding::HEXLOWER.encode(&b),
        // No /dev/urandom: still unguessable enough to tell two agents apart, never empty.
        Err(_) => format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)),
    }
}

/// Compares secrets in time independent of where they differ.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A Prometheus label value: quotes, backslashes and newlines escaped.
fn prometheus_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Engine {
    /// Opens the engine over a database and resumes every unfinished run from it.
    pub fn open(
        db: Db,
        sources_dir: PathBuf,
        clock: Arc<dyn Clock>,
        opts: EngineOptions,
    ) -> Result<Engine, EngineError> {
        std::fs::create_dir_all(&sources_dir)?;
        let (events, _) = broadcast::channel(8192);
        let engine = Engine {
            inner: Arc::new(Mutex::new(Inner {
                db,
                runs: Vec::new(),
                agents: BTreeMap::new(),
                attempts: HashMap::new(),
                next_conn: 1,
            })),
            events,
            clock,
            opts,
            sources_dir,
        };
        engine.recover()?;
        Ok(engine)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock means a panic mid-update; the database is still the truth, so go on.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn sources_dir(&self) -> &std::path::Path {
        &self.sources_dir
    }

    pub fn subscribe(&self) -> broadcast::Receiver<RunEvent> {
        self.events.subscribe()
    }

    fn emit(&self, inner: &Inner, run_id: &str, event: nixfarm_core::RunEvent) {
        let (kind, json) = (event.kind(), event.to_json());
        match inner.db.append_event(run_id, kind, &json) {
            Ok(seq) => {
                let _ = self.events.send(RunEvent {
                    run_id: run_id.into(),
                    seq: seq as u64,
                    kind: kind.into(),
                    json,
                });
            }
            Err(e) => tracing::error!(run = run_id, "cannot store event: {e}"),
        }
    }

    // ----- recovery ---------------------------------------------------------------------

    fn recover(&self) -> Result<(), EngineError> {
        let mut g = self.lock();
        let inner = &mut *g;
        // Attempts that were running when the coordinator stopped: their agents will
        // reconnect and either claim them (reattach) or they are requeued below.
        let running = inner.db.running_attempts()?;
        for row in inner.db.runs()? {
            let state = row.state;
            if state.is_terminal() {
                continue;
            }
            let spec: RunSpec = match serde_json::from_str(&row.spec) {
                Ok(s) => s,
                Err(e) => {
                    inner.db.set_run_state(
                        &row.id,
                        RunState::Failed,
                        &format!("unreadable run spec: {e}"),
                        self.clock.now_ms(),
                    )?;
                    continue;
                }
            };
            let mut run = RunMem::new(row.id.clone(), spec, state);
            let tasks = inner.db.eval_tasks(&row.id)?;
            if row.eval_tasks_total < 0 {
                run.eval_queue.push_back(EvalTask::List);
            } else {
                run.eval_tasks_total = Some(row.eval_tasks_total as usize);
                for (task, attrs, done) in &tasks {
                    run.chunk_attrs
                        .insert(*task, serde_json::from_str(attrs).unwrap_or_default());
                    if *done {
                        run.eval_tasks_done.insert(*task);
                    } else {
                        run.eval_queue.push_back(EvalTask::Chunk(*task));
                    }
                }
            }
            if run.eval_complete() {
                Self::build_scheduler(&inner.db, &mut run)?;
            }
            inner.runs.push(run);
        }
        for a in running {
            let Some(run) = inner.runs.iter_mut().find(|r| r.id == a.run_id) else {
                inner.db.finish_attempt(
                    &a.id,
                    "lost",
                    "coordinator restarted; run finished",
                    self.clock.now_ms(),
                )?;
                continue;
            };
            let job = match a.kind.as_str() {
                "build" => match run.node_of.get(&a.target) {
                    Some(&n) => {
                        if let Some(s) = run.sched.as_mut() {
                            s.mark_running(n);
                        }
                        JobRef::Build(n)
                    }
                    None => continue,
                },
                "eval-list" => {
                    run.eval_queue.retain(|t| *t != EvalTask::List);
                    JobRef::Eval(EvalTask::List)
                }
                _ => {
                    let task = a.target.parse().unwrap_or(-1);
                    run.eval_queue.retain(|t| *t != EvalTask::Chunk(task));
                    JobRef::Eval(EvalTask::Chunk(task))
                }
            };
            // Held for the agent; requeued by the lease check if it does not come back.
            inner.attempts.insert(
                a.id.clone(),
                AttemptMem {
                    run_id: a.run_id.clone(),
                    job,
                    agent: a.agent.clone(),
                    target: a.target.clone(),
                },
            );
        }
        let now = self.clock.now_ms();
        for (name, info, _) in inner.db.agents()? {
            if let Ok(reg) = serde_json::from_str::<Registration>(&info) {
                let running: HashSet<String> = inner
                    .attempts
                    .iter()
                    .filter(|(_, a)| a.agent == name)
                    .map(|(id, _)| id.clone())
                    .collect();
                let caps = Capabilities {
                    systems: reg.systems.clone(),
                    features: reg.features.clone(),
                };
                // Disconnected until it dials in; its lease starts now.
                inner.agents.insert(
                    name,
                    AgentMem {
                        reg,
                        caps,
                        conn: 0,
                        tx: None,
                        running,
                        last_seen_ms: now,
                        draining: false,
                        paused: String::new(),
                        session: String::new(),
                        violations: 0,
                    },
                );
            }
        }
        drop(g);
        self.check_all_runs();
        Ok(())
    }

    fn build_scheduler(db: &Db, run: &mut RunMem) -> Result<(), EngineError> {
        let rows = db.drvs(&run.id)?;
        let mut sched = Scheduler::new();
        let mut nodes: Vec<DrvNode> = Vec::with_capacity(rows.len());
        for row in &rows {
            let node = row.node.clone();
            let mut features = node.features.clone();
            features.sort();
            features.dedup();
            let id = sched.add_node(
                Class {
                    system: node.system.clone(),
                    features,
                },
                1,
            );
            run.node_of.insert(row.drv_path.clone(), id);
            run.drv_of.push(row.drv_path.clone());
            run.outputs_of.push(node.outputs.clone());
            nodes.push(node);
        }
        for (i, node) in nodes.iter().enumerate() {
            for input in &node.input_drvs {
                if let Some(&j) = run.node_of.get(input) {
                    sched.add_edge(i as NodeId, j);
                }
            }
        }
        for (i, row) in rows.iter().enumerate() {
            let state = match row.state {
                DrvState::Built => NodeState::Built,
                DrvState::Failed => NodeState::Failed,
                DrvState::DependencyFailed => NodeState::DependencyFailed,
                DrvState::Cancelled => NodeState::Cancelled,
                DrvState::Waiting => continue,
            };
            let root = row
                .result
                .as_ref()
                .and_then(|r| run.node_of.get(&r.failed_root).copied());
            sched.restore(i as NodeId, state, root);
            if state == NodeState::Built {
                run.done_builds += 1;
            }
        }
        sched.start();
        for (attr, info) in db.packages(&run.id)? {
            let _ = attr;
            if let Ok(p) = serde_json::from_str::<PackageInfo>(&info)
                && !p.drv_path.is_empty()
                && (p.timeout_secs > 0 || p.max_silent_secs > 0)
            {
                run.limits
                    .insert(p.drv_path.clone(), (p.timeout_secs, p.max_silent_secs));
            }
        }
        run.sched = Some(sched);
        if run.state == RunState::Evaluating || run.state == RunState::Queued {
            run.state = RunState::Building;
            db.set_run_state(&run.id, RunState::Building, "", 0)?;
        }
        Ok(())
    }

    // ----- runs -------------------------------------------------------------------------

    /// Accepts a run; evaluation starts as soon as an agent is free.
    pub fn submit(&self, spec: RunSpec) -> Result<String, EngineError> {
        if spec.attr_path.trim().is_empty() {
            return Err(EngineError::Invalid("the attribute path is empty".into()));
        }
        match &spec.source {
            SourceSpec::Snapshot(d) => {
                if !self.sources_dir.join(format!("{d}.tar")).is_file() {
                    return Err(EngineError::Invalid(format!(
                        "no uploaded source with digest {d}; upload it first"
                    )));
                }
            }
            SourceSpec::FlakeRef(f) => {
                nixfarm_core::flakeref::validate_for_farm(f, self.opts.allow_local_flake_refs)
                    .map_err(|e| EngineError::Invalid(e.to_string()))?;
            }
        }
        let mut g = self.lock();
        let inner = &mut *g;
        let in_flight = inner.runs.iter().filter(|r| !r.state.is_terminal()).count();
        if in_flight >= self.opts.max_runs_in_flight {
            return Err(EngineError::Busy(self.opts.max_runs_in_flight));
        }
        let id = random_id("r");
        let spec_json =
            serde_json::to_string(&spec).map_err(|e| EngineError::Invalid(e.to_string()))?;
        inner.db.insert_run(&RunRow {
            id: id.clone(),
            state: RunState::Evaluating,
            label: spec.label.clone(),
            spec: spec_json,
            error: String::new(),
            created_ms: self.clock.now_ms(),
            finished_ms: 0,
            eval_tasks_total: -1,
        })?;
        let mut run = RunMem::new(id.clone(), spec.clone(), RunState::Evaluating);
        run.eval_queue.push_back(EvalTask::List);
        inner.runs.push(run);
        self.emit(
            inner,
            &id,
            Ev::RunStarted {
                label: spec.label.clone(),
                attr_path: spec.attr_path.clone(),
            },
        );
        self.dispatch(inner);
        Ok(id)
    }

    /// Cancels a run: nothing new starts, running builds are told to stop.
    pub fn cancel(&self, run_id: &str) -> Result<bool, EngineError> {
        let mut g = self.lock();
        let inner = &mut *g;
        let Some(idx) = inner.runs.iter().position(|r| r.id == run_id) else {
            return match inner.db.run(run_id)? {
                Some(_) => Ok(false),
                None => Err(EngineError::NotFound(format!("run {run_id}"))),
            };
        };
        if inner.runs[idx].state.is_terminal() {
            return Ok(false);
        }
        let now = self.clock.now_ms();
        let run = &mut inner.runs[idx];
        run.eval_queue.clear();
        run.state = RunState::Cancelled;
        if let Some(s) = run.sched.as_mut() {
            for n in s.cancel_pending() {
                inner.db.set_drv_state(
                    run_id,
                    &run.drv_of[n as usize],
                    DrvState::Cancelled,
                    None,
                )?;
            }
        }
        let running: Vec<(String, String)> = inner
            .attempts
            .iter()
            .filter(|(_, a)| a.run_id == run_id)
            .map(|(id, a)| (id.clone(), a.agent.clone()))
            .collect();
        for (attempt, agent) in running {
            if let Some(ag) = inner.agents.get(&agent)
                && let Some(tx) = &ag.tx
            {
                let _ = tx.send(ToAgent::Cancel {
                    attempt: attempt.clone(),
                });
            }
        }
        inner
            .db
            .set_run_state(run_id, RunState::Cancelled, "", now)?;
        Self::tell_run_ended(inner, run_id);
        let report = self.report_locked(inner, run_id)?;
        self.emit(
            inner,
            run_id,
            Ev::RunFinished {
                state: RunState::Cancelled,
                summary: report.summary,
            },
        );
        Ok(true)
    }

    fn check_all_runs(&self) {
        let mut g = self.lock();
        let inner = &mut *g;
        let ids: Vec<String> = inner.runs.iter().map(|r| r.id.clone()).collect();
        for id in ids {
            if let Err(e) = self.maybe_finish(inner, &id) {
                tracing::error!(run = id, "cannot finish run: {e}");
            }
        }
        self.dispatch(inner);
    }

    fn maybe_finish(&self, inner: &mut Inner, run_id: &str) -> Result<(), EngineError> {
        let Some(run) = inner.runs.iter_mut().find(|r| r.id == run_id) else {
            return Ok(());
        };
        if run.state.is_terminal() {
            return Ok(());
        }
        let finished = match &run.sched {
            Some(s) => s.unfinished() == 0,
            None => false,
        };
        if !finished {
            return Ok(());
        }
        run.state = RunState::Finished;
        inner
            .db
            .set_run_state(run_id, RunState::Finished, "", self.clock.now_ms())?;
        Self::tell_run_ended(inner, run_id);
        let report = self.report_locked(inner, run_id)?;
        self.emit(
            inner,
            run_id,
            Ev::RunFinished {
                state: RunState::Finished,
                summary: report.summary,
            },
        );
        Ok(())
    }

    fn fail_run(&self, inner: &mut Inner, run_id: &str, error: &str) -> Result<(), EngineError> {
        if let Some(run) = inner.runs.iter_mut().find(|r| r.id == run_id) {
            if run.state.is_terminal() {
                return Ok(());
            }
            run.state = RunState::Failed;
            run.eval_queue.clear();
        }
        inner
            .db
            .set_run_state(run_id, RunState::Failed, error, self.clock.now_ms())?;
        Self::tell_run_ended(inner, run_id);
        self.emit(
            inner,
            run_id,
            Ev::RunFailed {
                error: error.to_string(),
            },
        );
        Ok(())
    }

    /// Tells every connected agent that a run ended, so it releases what it kept for it.
    fn tell_run_ended(inner: &Inner, run_id: &str) {
        for a in inner.agents.values() {
            if let Some(tx) = &a.tx {
                let _ = tx.send(ToAgent::RunEnded {
                    run_id: run_id.to_string(),
                });
            }
        }
    }

    /// Runs not finished yet.
    pub fn active_runs(&self) -> Vec<String> {
        self.lock()
            .runs
            .iter()
            .filter(|r| !r.state.is_terminal())
            .map(|r| r.id.clone())
            .collect()
    }

    // ----- agents -----------------------------------------------------------------------

    /// Registers (or re-registers) an agent. Attempts it still runs are kept; any other
    /// attempt the coordinator thought it had is requeued. A name whose stream is still open
    /// is refused, unless the registration presents that stream's session key (the same
    /// agent reconnecting before the coordinator noticed the old stream die). Returns the
    /// connection number and the new session key.
    pub fn connect_agent(
        &self,
        reg: Registration,
        tx: mpsc::UnboundedSender<ToAgent>,
    ) -> Result<(u64, String), EngineError> {
        if reg.name.trim().is_empty() {
            return Err(EngineError::Invalid("agent name is empty".into()));
        }
        if reg.max_jobs == 0 {
            return Err(EngineError::Invalid("max_jobs must be at least 1".into()));
        }
        if reg.systems.is_empty() {
            return Err(EngineError::Invalid(
                "an agent must offer at least one system".into(),
            ));
        }
        let mut g = self.lock();
        let inner = &mut *g;
        let now = self.clock.now_ms();
        if let Some(old) = inner.agents.get(&reg.name)
            && old.tx.as_ref().is_some_and(|t| !t.is_closed())
            && !(old.session.len() == reg.session_key.len()
                && constant_time_eq(old.session.as_bytes(), reg.session_key.as_bytes()))
        {
            tracing::warn!(
                agent = reg.name,
                "refused a registration under the name of a connected agent"
            );
            return Err(EngineError::Conflict(format!(
                "an agent named '{}' is already connected; give this agent another name (--name), or stop the other one",
                reg.name
            )));
        }
        let conn = inner.next_conn;
        inner.next_conn += 1;
        let session = secret_key();
        let violations = inner.agents.get(&reg.name).map_or(0, |a| a.violations);
        let info = serde_json::to_string(&reg).map_err(|e| EngineError::Invalid(e.to_string()))?;
        inner.db.upsert_agent(&reg.name, &info, now)?;
        let claimed: HashSet<String> = reg.running_attempts.iter().cloned().collect();
        let previous: Vec<String> = inner
            .attempts
            .iter()
            .filter(|(_, a)| a.agent == reg.name)
            .map(|(id, _)| id.clone())
            .collect();
        if reg.running_attempts.is_empty() {
            // Nothing running there: no upload of its is in flight, so its claims lapse now.
            inner.db.release_all_upload_claims(&reg.name)?;
        }
        let mut running = HashSet::new();
        for id in previous {
            if claimed.contains(&id) {
                running.insert(id);
            } else {
                self.lose_attempt(inner, &id, "the agent reconnected without it")?;
            }
        }
        let caps = Capabilities {
            systems: reg.systems.clone(),
            features: reg.features.clone(),
        };
        tracing::info!(agent = reg.name, systems = ?reg.systems, max_jobs = reg.max_jobs, reattached = running.len(), "agent connected");
        inner.agents.insert(
            reg.name.clone(),
            AgentMem {
                reg,
                caps,
                conn,
                tx: Some(tx),
                running,
                last_seen_ms: now,
                draining: false,
                paused: String::new(),
                session: session.clone(),
                violations,
            },
        );
        self.dispatch(inner);
        Ok((conn, session))
    }

    /// Counts and logs a message an agent had no right to send; it changes nothing else.
    fn violation(&self, inner: &mut Inner, agent: &str, what: &str) {
        tracing::warn!(agent, "protocol violation, refused: {what}");
        if let Some(a) = inner.agents.get_mut(agent) {
            a.violations += 1;
        }
    }

    /// The agent's stream ended. Its jobs stay with it for the lease period, so a quick
    /// reconnect reattaches to them.
    pub fn disconnect_agent(&self, name: &str, conn: u64) {
        let mut g = self.lock();
        if let Some(a) = g.agents.get_mut(name)
            && a.conn == conn
        {
            a.tx = None;
            tracing::info!(agent = name, "agent disconnected");
        }
    }

    /// Requeues the jobs of agents silent for longer than the lease; call periodically.
    pub fn check_leases(&self) {
        let mut g = self.lock();
        let inner = &mut *g;
        let now = self.clock.now_ms();
        let expired: Vec<String> = inner
            .agents
            .iter()
            .filter(|(_, a)| !a.running.is_empty() && now - a.last_seen_ms > self.opts.lease_ms)
            .map(|(n, _)| n.clone())
            .collect();
        for name in expired {
            let ids: Vec<String> = inner
                .agents
                .get(&name)
                .map(|a| a.running.iter().cloned().collect())
                .unwrap_or_default();
            tracing::warn!(
                agent = name,
                jobs = ids.len(),
                "agent lease expired; requeueing its jobs"
            );
            for id in ids {
                if let Err(e) = self.lose_attempt(inner, &id, "the agent stopped responding") {
                    tracing::error!("cannot requeue {id}: {e}");
                }
            }
            if let Some(a) = inner.agents.get_mut(&name) {
                a.tx = None;
            }
        }
        self.dispatch(inner);
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
        // Only the agent itself (its registration's session key) claims or releases in its name.
        let own = inner.agents.get(agent).is_some_and(|a| {
            !a.session.is_empty()
                && a.session.len() == session.len()
                && constant_time_eq(a.session.as_bytes(), session.as_bytes())
        });
        if !own {
            return Err(EngineError::Denied(
                "upload claims are made by a registered agent, with its session key".into(),
            ));
        }
        if let Some(a) = inner.agents.get_mut(agent) {
            a.last_seen_ms = now;
        }
        if release {
            inner.db.release_upload_claims(agent, cache, paths)?;
            return Ok(Vec::new());
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
        Ok(inner.db.claim_uploads(cache, agent, paths, now, lapsed)?)
    }

    /// Puts an attempt's job back in the queue; its late result will be ignored.
    fn lose_attempt(&self, inner: &mut Inner, attempt: &str, why: &str) -> Result<(), EngineError> {
        let Some(a) = inner.attempts.remove(attempt) else {
            return Ok(());
        };
        if let Some(ag) = inner.agents.get_mut(&a.agent) {
            ag.running.remove(attempt);
        }
        inner
            .db
            .finish_attempt(attempt, "lost", why, self.clock.now_ms())?;
        let Some(run) = inner.runs.iter_mut().find(|r| r.id == a.run_id) else {
            return Ok(());
        };
        if run.state.is_terminal() {
            return Ok(());
        }
        // Counted apart from failures, and capped: a job that keeps taking its agent down
        // (or whose agents keep being cut off) is given up, not requeued for ever.
        let lost = inner.db.lost_attempts(&a.run_id, &a.target)?;
        if lost > self.opts.max_infra_retries {
            let msg =
                format!("given up after {lost} attempts lost with their agents (last: {why})");
            return match a.job {
                JobRef::Eval(_) => self.fail_run(inner, &a.run_id, &format!("evaluation {msg}")),
                JobRef::Build(_) => {
                    let report = BuildReport {
                        kind: BuildOutcome::InfraFailed,
                        message: msg,
                        agent: a.agent.clone(),
                        ..Default::default()
                    };
                    self.on_build(inner, a, report, false)
                }
            };
        }
        let Some(run) = inner.runs.iter_mut().find(|r| r.id == a.run_id) else {
            return Ok(());
        };
        match a.job {
            JobRef::Eval(t) => run.eval_queue.push_front(t),
            JobRef::Build(n) => {
                if let Some(s) = run.sched.as_mut() {
                    s.requeue(n);
                }
            }
        }
        Ok(())
    }

    /// Handles one message from a registered agent's stream `conn`; a stream that another
    /// registration of the same agent replaced is no longer heard.
    pub fn agent_message(&self, name: &str, conn: u64, msg: FromAgent) -> Result<(), EngineError> {
        let mut g = self.lock();
        let inner = &mut *g;
        let now = self.clock.now_ms();
        match inner.agents.get_mut(name) {
            Some(a) if a.conn == conn => a.last_seen_ms = now,
            _ => {
                tracing::debug!(agent = name, "ignoring a message from a replaced stream");
                return Ok(());
            }
        }
        match msg {
            FromAgent::Heartbeat {
                draining, paused, ..
            } => {
                if let Some(a) = inner.agents.get_mut(name) {
                    if draining && !a.draining {
                        tracing::info!(agent = name, "agent draining: no new jobs for it");
                        a.draining = true;
                    }
                    if paused != a.paused {
                        if paused.is_empty() {
                            tracing::info!(agent = name, "agent takes jobs again");
                        } else {
                            tracing::warn!(agent = name, "agent paused: {paused}");
                        }
                        a.paused = paused;
                    }
                }
            }
            FromAgent::Log { .. } => {}
            FromAgent::EvalList { attempt, result } => {
                if let Some(a) = self.take_attempt(
                    inner,
                    name,
                    &attempt,
                    result.as_ref().err().map(|e| e.0.as_str()),
                )? {
                    self.on_eval_list(inner, a, result)?;
                }
            }
            FromAgent::EvalChunk { attempt, result } => {
                if let Some(a) = self.take_attempt(
                    inner,
                    name,
                    &attempt,
                    result.as_ref().err().map(|e| e.0.as_str()),
                )? {
                    self.on_eval_chunk(inner, a, result)?;
                }
            }
            FromAgent::Build {
                attempt,
                mut report,
            } => {
                report.agent = name.to_string();
                if let Some(a) =
                    self.take_attempt(inner, name, &attempt, Some(report.kind.as_str()))?
                {
                    self.check_outputs(inner, &a, &mut report);
                    self.on_build(inner, a, report, true)?;
                }
            }
        }
        self.dispatch(inner);
        Ok(())
    }

    /// Completes an attempt exactly once, and only for the agent that holds it: a duplicate
    /// or late result returns None, and so does a result for another agent's attempt (a
    /// protocol violation, counted against the sender).
    fn take_attempt(
        &self,
        inner: &mut Inner,
        agent: &str,
        attempt: &str,
        outcome: Option<&str>,
    ) -> Result<Option<AttemptMem>, EngineError> {
        match inner.attempts.get(attempt) {
            None => {
                tracing::debug!(agent, "ignoring a result for an attempt nobody holds");
                return Ok(None);
            }
            Some(a) if a.agent != agent => {
                let holder = a.agent.clone();
                self.violation(
                    inner,
                    agent,
                    &format!(
                        "result for attempt {} which agent {holder} holds",
                        nixfarm_core::limits::clip(attempt, 64)
                    ),
                );
                return Ok(None);
            }
            Some(_) => {}
        }
        let ok = inner.db.finish_attempt(
            attempt,
            "done",
            outcome.unwrap_or("ok"),
            self.clock.now_ms(),
        )?;
        let mem = inner.attempts.remove(attempt);
        if let Some(a) = inner.agents.get_mut(agent) {
            a.running.remove(attempt);
        }
        if !ok {
            tracing::debug!(attempt, "ignoring duplicate or late result");
            return Ok(None);
        }
        Ok(mem)
    }

    /// A successful build may report only the derivation's own outputs (the graph knows
    /// them); anything else is a protocol violation and the build counts as an
    /// infrastructure failure, retried on another agent.
    fn check_outputs(&self, inner: &mut Inner, a: &AttemptMem, report: &mut BuildReport) {
        if !report.kind.produced_outputs() {
            return;
        }
        let JobRef::Build(node) = a.job else { return };
        let Some(expected) = inner
            .runs
            .iter()
            .find(|r| r.id == a.run_id)
            .and_then(|r| r.outputs_of.get(node as usize))
        else {
            return;
        };
        let same_names = expected.len() == report.outputs.len()
            && expected.keys().all(|k| report.outputs.contains_key(k));
        let same_paths = expected
            .iter()
            .all(|(name, path)| path.is_empty() || report.outputs.get(name) == Some(path));
        if same_names && same_paths {
            return;
        }
        let drv = inner
            .runs
            .iter()
            .find(|r| r.id == a.run_id)
            .and_then(|r| r.drv_of.get(node as usize))
            .cloned()
            .unwrap_or_default();
        self.violation(
            inner,
            &a.agent,
            &format!("build of {drv} reported outputs that are not the derivation's own"),
        );
        *report = BuildReport {
            kind: BuildOutcome::InfraFailed,
            message: format!(
                "agent {} reported outputs that are not the derivation's own; result refused",
                a.agent
            ),
            agent: a.agent.clone(),
            ..Default::default()
        };
    }

    fn on_eval_list(
        &self,
        inner: &mut Inner,
        a: AttemptMem,
        result: Result<Vec<String>, AgentFailure>,
    ) -> Result<(), EngineError> {
        let run_id = a.run_id.clone();
        let mut attrs = match result {
            Ok(attrs) => attrs,
            Err((msg, true)) => return self.retry_eval(inner, &run_id, EvalTask::List, -1, &msg),
            Err((msg, false)) => {
                let attr_path = inner
                    .runs
                    .iter()
                    .find(|r| r.id == run_id)
                    .map(|r| r.spec.attr_path.clone())
                    .unwrap_or_default();
                return self.fail_run(
                    inner,
                    &run_id,
                    &format!("cannot list the attributes of '{attr_path}': {msg}"),
                );
            }
        };
        let Some(run) = inner.runs.iter_mut().find(|r| r.id == run_id) else {
            return Ok(());
        };
        if run.state.is_terminal() {
            return Ok(());
        }
        if !run.spec.attrs.is_empty() {
            let listed: HashSet<&String> = attrs.iter().collect();
            let missing: Vec<&str> = run
                .spec
                .attrs
                .iter()
                .filter(|a| !listed.contains(a))
                .map(String::as_str)
                .collect();
            if !missing.is_empty() {
                let msg = format!(
                    "no attribute {} in '{}'",
                    missing.join(", "),
                    run.spec.attr_path
                );
                return self.fail_run(inner, &run_id, &msg);
            }
            let wanted: HashSet<&String> = run.spec.attrs.iter().collect();
            attrs.retain(|a| wanted.contains(a));
        }
        let agents = inner
            .agents
            .values()
            .filter(|a| a.tx.is_some())
            .count()
            .max(1);
        // Enough tasks to spread over the agents, bounded so each process stays small.
        let size = attrs
            .len()
            .div_ceil(agents * 2)
            .clamp(1, self.opts.eval_chunk_size.max(1));
        let chunks: Vec<&[String]> = attrs.chunks(size).collect();
        let total = chunks.len();
        inner.db.tx(|tx| {
            for (i, c) in chunks.iter().enumerate() {
                tx.execute(
                    "INSERT OR IGNORE INTO eval_tasks(run_id, task, attrs) VALUES (?1, ?2, ?3)",
                    rusqlite::params![
                        run_id,
                        i as i64,
                        serde_json::to_string(c).unwrap_or_default()
                    ],
                )?;
            }
            tx.execute(
                "UPDATE runs SET eval_chunks_total = ?2 WHERE id = ?1",
                rusqlite::params![run_id, total as i64],
            )?;
            Ok(())
        })?;
        run.eval_tasks_total = Some(total);
        for (i, c) in chunks.iter().enumerate() {
            run.chunk_attrs.insert(i as i64, c.to_vec());
            run.eval_queue.push_back(EvalTask::Chunk(i as i64));
        }
        self.emit(
            inner,
            &run_id,
            Ev::EvalListed {
                attrs: attrs.len() as u64,
                tasks: total as u64,
            },
        );
        if total == 0 {
            self.start_building(inner, &run_id)?;
        }
        Ok(())
    }

    fn retry_eval(
        &self,
        inner: &mut Inner,
        run_id: &str,
        task: EvalTask,
        task_no: i64,
        msg: &str,
    ) -> Result<(), EngineError> {
        let failures = if task_no >= 0 {
            inner.db.eval_task_infra_failure(run_id, task_no)?
        } else {
            // The listing has no task row: its failed attempts are the count.
            inner.db.failed_attempts(run_id, "eval-list")?
        };
        if failures > self.opts.max_infra_retries {
            return self.fail_run(
                inner,
                run_id,
                &format!("evaluation kept failing on agents: {msg}"),
            );
        }
        tracing::warn!(
            run = run_id,
            "evaluation infrastructure failure, retrying: {msg}"
        );
        if let Some(run) = inner.runs.iter_mut().find(|r| r.id == run_id) {
            run.eval_queue.push_back(task);
        }
        Ok(())
    }

    fn on_eval_chunk(
        &self,
        inner: &mut Inner,
        a: AttemptMem,
        result: Result<EvalChunkOutput, AgentFailure>,
    ) -> Result<(), EngineError> {
        let run_id = a.run_id.clone();
        let JobRef::Eval(EvalTask::Chunk(task)) = a.job else {
            return Ok(());
        };
        let (attrs, drvs) = match result {
            Ok(r) => r,
            Err((msg, _infra)) => {
                return self.retry_eval(inner, &run_id, EvalTask::Chunk(task), task, &msg);
            }
        };
        if inner
            .runs
            .iter()
            .find(|r| r.id == run_id)
            .is_none_or(|r| r.state.is_terminal())
        {
            return Ok(());
        }
        let failed = attrs
            .iter()
            .filter(|a| !a.info.eval_error.is_empty())
            .count();
        inner.db.tx(|tx| {
            for ea in &attrs {
                tx.execute(
                    "INSERT INTO packages(run_id, attr, info) VALUES (?1, ?2, ?3)
                     ON CONFLICT(run_id, attr) DO UPDATE SET info = excluded.info",
                    rusqlite::params![
                        run_id,
                        ea.attr,
                        serde_json::to_string(&ea.info).unwrap_or_default()
                    ],
                )?;
            }
            for (path, node) in &drvs {
                tx.execute(
                    "INSERT OR IGNORE INTO drvs(run_id, drv_path, node) VALUES (?1, ?2, ?3)",
                    rusqlite::params![
                        run_id,
                        path,
                        serde_json::to_string(node).unwrap_or_default()
                    ],
                )?;
            }
            tx.execute(
                "UPDATE eval_tasks SET done = 1 WHERE run_id = ?1 AND task = ?2",
                rusqlite::params![run_id, task],
            )?;
            Ok(())
        })?;
        let Some(run) = inner.runs.iter_mut().find(|r| r.id == run_id) else {
            return Ok(());
        };
        run.eval_tasks_done.insert(task);
        let (done, total) = (run.eval_tasks_done.len(), run.eval_tasks_total.unwrap_or(0));
        self.emit(
            inner,
            &run_id,
            Ev::EvalProgress {
                task,
                attrs: attrs.len() as u64,
                eval_failed: failed as u64,
                tasks_done: done as u64,
                tasks: total as u64,
            },
        );
        if done >= total {
            self.start_building(inner, &run_id)?;
        }
        Ok(())
    }

    fn start_building(&self, inner: &mut Inner, run_id: &str) -> Result<(), EngineError> {
        let Some(run) = inner.runs.iter_mut().find(|r| r.id == run_id) else {
            return Ok(());
        };
        // Warm mode: what the cache already has is done before anything is dispatched.
        for row in inner.db.drvs(run_id)? {
            if row.state == DrvState::Waiting && row.node.present {
                let rep = BuildReport {
                    kind: BuildOutcome::Built,
                    substituted: true,
                    message: "already in the cache".into(),
                    ..Default::default()
                };
                inner
                    .db
                    .set_drv_state(run_id, &row.drv_path, DrvState::Built, Some(&rep))?;
            }
        }
        Self::build_scheduler(&inner.db, run)?;
        let (drvs, packages) = (run.drv_of.len(), inner.db.packages(run_id)?.len());
        self.emit(
            inner,
            run_id,
            Ev::EvalDone {
                packages: packages as u64,
                drvs: drvs as u64,
            },
        );
        self.maybe_finish(inner, run_id)
    }

    /// Records a build's outcome; an infrastructure failure is retried while `retry` and
    /// the job's retry budget allow.
    fn on_build(
        &self,
        inner: &mut Inner,
        a: AttemptMem,
        mut report: BuildReport,
        retry: bool,
    ) -> Result<(), EngineError> {
        let run_id = a.run_id.clone();
        let JobRef::Build(node) = a.job else {
            return Ok(());
        };
        let Some(run) = inner.runs.iter_mut().find(|r| r.id == run_id) else {
            return Ok(());
        };
        let drv = run.drv_of[node as usize].clone();
        let Some(sched) = run.sched.as_mut() else {
            return Ok(());
        };
        // A result is applied once, to a build that is running: the scheduler and the
        // stored state can then never disagree (a late result for a derivation already
        // built or failed would otherwise rewrite its row under its dependents).
        if sched.state(node) != NodeState::Running {
            tracing::debug!(
                run = run_id,
                drv,
                "ignoring a result for a build not running"
            );
            return Ok(());
        }
        let mut dep_failed = Vec::new();
        let state = match report.kind {
            // Not cached still built: dependents on this agent can go on.
            BuildOutcome::Built | BuildOutcome::NotCached => {
                sched.complete(node);
                run.done_builds += 1;
                DrvState::Built
            }
            BuildOutcome::InfraFailed => {
                let n = inner.db.drv_infra_failure(&run_id, &drv)?;
                if retry && n <= self.opts.max_infra_retries && !run.state.is_terminal() {
                    tracing::warn!(
                        run = run_id,
                        drv,
                        attempt = n,
                        "infrastructure failure, requeueing: {}",
                        report.message
                    );
                    sched.requeue(node);
                    self.emit(
                        inner,
                        &run_id,
                        Ev::JobRetry {
                            drv: drv.clone(),
                            message: report.message.clone(),
                            retry: n,
                        },
                    );
                    return Ok(());
                }
                dep_failed = sched.fail(node);
                DrvState::Failed
            }
            BuildOutcome::Cancelled if !run.state.is_terminal() => {
                // A cancel the run did not ask for (the agent was drained): try again elsewhere.
                sched.requeue(node);
                return Ok(());
            }
            BuildOutcome::Cancelled => {
                sched.cancel_running(node);
                DrvState::Cancelled
            }
            BuildOutcome::BuildFailed
            | BuildOutcome::HashMismatch
            | BuildOutcome::TimedOut
            | BuildOutcome::DependencyFailed => {
                dep_failed = sched.fail(node);
                DrvState::Failed
            }
        };
        let (done, total) = (sched.len() - sched.unfinished(), sched.len());
        let dep_names: Vec<String> = dep_failed
            .iter()
            .map(|&n| run.drv_of[n as usize].clone())
            .collect();
        let dep = BuildReport {
            kind: BuildOutcome::DependencyFailed,
            failed_root: drv.clone(),
            ..Default::default()
        };
        inner
            .db
            .finish_drv(&run_id, &drv, state, &report, &dep_names, &dep)?;
        report.log_tail.clear();
        self.emit(
            inner,
            &run_id,
            Ev::JobFinished {
                name: store_name(&drv).to_string(),
                drv,
                agent: a.agent.clone(),
                outcome: report.kind,
                message: report.message,
                duration_ms: report.duration_ms,
                substituted: report.substituted,
                dependency_failed: dep_names.len() as u64,
                done: done as u64,
                total: total as u64,
            },
        );
        self.maybe_finish(inner, &run_id)
    }

    // ----- dispatch ---------------------------------------------------------------------

    fn dispatch(&self, inner: &mut Inner) {
        let now = self.clock.now_ms();
        let names: Vec<String> = inner.agents.keys().cloned().collect();
        for name in names {
            while let Some(agent) = inner.agents.get(&name) {
                if agent.tx.is_none()
                    || agent.draining
                    || !agent.paused.is_empty()
                    || agent.running.len() >= agent.reg.max_jobs as usize
                {
                    break;
                }
                let caps = agent.caps.clone();
                let Some((run_id, job_ref, job, target)) =
                    Self::next_job(&mut inner.runs, &caps, &self.opts)
                else {
                    break;
                };
                let attempt = random_id("a");
                let kind = match &job {
                    Job::EvalList { .. } => "eval-list",
                    Job::EvalChunk { .. } => "eval-chunk",
                    Job::Build { .. } => "build",
                };
                let row = AttemptRow {
                    id: attempt.clone(),
                    run_id: run_id.clone(),
                    kind: kind.into(),
                    target: target.clone(),
                    agent: name.clone(),
                    state: "running".into(),
                };
                if let Err(e) = inner.db.insert_attempt(&row, now) {
                    tracing::error!("cannot record attempt: {e}");
                    Self::unpop(&mut inner.runs, &run_id, &job_ref);
                    return;
                }
                let sent = inner
                    .agents
                    .get(&name)
                    .and_then(|a| a.tx.as_ref())
                    .is_some_and(|tx| {
                        tx.send(ToAgent::Assign {
                            attempt: attempt.clone(),
                            run_id: run_id.clone(),
                            job,
                        })
                        .is_ok()
                    });
                inner.attempts.insert(
                    attempt.clone(),
                    AttemptMem {
                        run_id: run_id.clone(),
                        job: job_ref,
                        agent: name.clone(),
                        target: target.clone(),
                    },
                );
                if let Some(a) = inner.agents.get_mut(&name) {
                    a.running.insert(attempt.clone());
                }
                if !sent {
                    let _ = self.lose_attempt(inner, &attempt, "the agent's stream closed");
                    if let Some(a) = inner.agents.get_mut(&name) {
                        a.tx = None;
                    }
                    break;
                }
                if kind == "build" {
                    self.emit(
                        inner,
                        &run_id,
                        Ev::JobStarted {
                            name: store_name(&target).to_string(),
                            drv: target.clone(),
                            agent: name.clone(),
                        },
                    );
                }
            }
        }
    }

    fn next_job(
        runs: &mut [RunMem],
        caps: &Capabilities,
        opts: &EngineOptions,
    ) -> Option<(String, JobRef, Job, String)> {
        // Evaluation first (it unlocks builds), oldest run first.
        for run in runs.iter_mut().filter(|r| !r.state.is_terminal()) {
            if let Some(task) = run.eval_queue.pop_front() {
                let source = run.spec.source.clone();
                let attr_path = run.spec.attr_path.clone();
                return Some(match task {
                    EvalTask::List => (
                        run.id.clone(),
                        JobRef::Eval(task),
                        Job::EvalList {
                            source,
                            attr_path,
                            memory_mib: opts.eval_memory_mib,
                        },
                        "list".into(),
                    ),
                    EvalTask::Chunk(n) => {
                        let attrs = run.chunk_attrs.get(&n).cloned().unwrap_or_default();
                        (
                            run.id.clone(),
                            JobRef::Eval(task),
                            Job::EvalChunk {
                                source,
                                attr_path,
                                attrs,
                                cache: run.spec.cache.clone(),
                                memory_mib: opts.eval_memory_mib,
                                skip_cached: run.spec.skip_cached,
                            },
                            n.to_string(),
                        )
                    }
                });
            }
        }
        for run in runs.iter_mut().filter(|r| !r.state.is_terminal()) {
            let Some(sched) = run.sched.as_mut() else {
                continue;
            };
            if let Some(n) = sched.pop_for(caps) {
                let drv = run.drv_of[n as usize].clone();
                let (t, s) = run.limits.get(&drv).copied().unwrap_or((0, 0));
                let job = Job::Build {
                    drv_path: drv.clone(),
                    cache: run.spec.cache.clone(),
                    trusted_public_keys: run.spec.trusted_public_keys.clone(),
                    timeout_secs: if t > 0 { t } else { run.spec.timeout_secs },
                    max_silent_secs: if s > 0 { s } else { run.spec.max_silent_secs },
                };
                return Some((run.id.clone(), JobRef::Build(n), job, drv));
            }
        }
        None
    }

    fn unpop(runs: &mut [RunMem], run_id: &str, job: &JobRef) {
        if let Some(run) = runs.iter_mut().find(|r| r.id == run_id) {
            match job {
                JobRef::Eval(t) => run.eval_queue.push_front(*t),
                JobRef::Build(n) => {
                    if let Some(s) = run.sched.as_mut() {
                        s.requeue(*n);
                    }
                }
            }
        }
    }

    // ----- queries ----------------------------------------------------------------------

    /// Events of a run after `after`, from the database.
    pub fn events_after(&self, run_id: &str, after: u64) -> Result<Vec<RunEvent>, EngineError> {
        let g = self.lock();
        if g.db.run(run_id)?.is_none() {
            return Err(EngineError::NotFound(format!("run {run_id}")));
        }
        Ok(g.db
            .events_after(run_id, after as i64)?
            .into_iter()
            .map(|(seq, kind, json)| RunEvent {
                run_id: run_id.into(),
                seq: seq as u64,
                kind,
                json,
            })
            .collect())
    }

    pub fn run_state(&self, run_id: &str) -> Result<RunState, EngineError> {
        let g = self.lock();
        let row =
            g.db.run(run_id)?
                .ok_or_else(|| EngineError::NotFound(format!("run {run_id}")))?;
        Ok(row.state)
    }

    pub fn report(&self, run_id: &str) -> Result<Report, EngineError> {
        let g = self.lock();
        self.report_locked(&g, run_id)
    }

    fn report_locked(&self, inner: &Inner, run_id: &str) -> Result<Report, EngineError> {
        let row = inner
            .db
            .run(run_id)?
            .ok_or_else(|| EngineError::NotFound(format!("run {run_id}")))?;
        let run_state = row.state;
        let drv_rows = inner.db.drvs(run_id)?;
        let mut results: HashMap<&str, (DrvState, BuildReport)> = HashMap::new();
        let mut nodes: HashMap<&str, DrvNode> = HashMap::new();
        for r in &drv_rows {
            let rep = r.result.clone().unwrap_or_default();
            results.insert(r.drv_path.as_str(), (r.state, rep));
            nodes.insert(r.drv_path.as_str(), r.node.clone());
        }
        let packages = inner.db.packages(run_id)?;
        let top_of: HashMap<String, String> = packages
            .iter()
            .filter_map(|(attr, info)| {
                serde_json::from_str::<PackageInfo>(info)
                    .ok()
                    .map(|p| (p.drv_path, attr.clone()))
            })
            .collect();
        let mut out = Vec::new();
        for (attr, info) in &packages {
            let p: PackageInfo = serde_json::from_str(info).unwrap_or_default();
            let mut r = package_report(attr, &p, run_state, &results, &nodes, &top_of);
            if r.status == PackageStatus::Pending {
                r.reason = waiting_reason(inner, run_id, &p.drv_path);
            }
            out.push(r);
        }
        Ok(Report::new(row.id, row.state, row.label, row.error, out))
    }

    pub fn list_runs(&self) -> Result<Vec<RunListing>, EngineError> {
        let g = self.lock();
        let mut out = Vec::new();
        for r in g.db.runs()? {
            let rep = self.report_locked(&g, &r.id)?;
            out.push(RunListing {
                id: r.id,
                state: r.state,
                label: r.label,
                total: rep.summary.total as u64,
                ready: rep.summary.ready as u64,
                created_ms: r.created_ms,
            });
        }
        Ok(out)
    }

    pub fn list_agents(&self) -> Vec<AgentStatus> {
        let g = self.lock();
        g.agents
            .iter()
            .map(|(name, a)| AgentStatus {
                name: name.clone(),
                systems: a.reg.systems.clone(),
                features: a.reg.features.clone(),
                max_jobs: a.reg.max_jobs,
                nix_version: a.reg.nix_version.clone(),
                connected: a.tx.is_some(),
                building: a
                    .running
                    .iter()
                    .filter_map(|id| g.attempts.get(id))
                    .map(|at| at.target.clone())
                    .collect(),
                last_seen_ms: a.last_seen_ms,
                paused: a.paused.clone(),
                draining: a.draining,
                violations: a.violations,
            })
            .collect()
    }

    /// Every job of the unfinished runs that is not running, grouped by why it waits:
    /// (reason, number of jobs, one of them), most jobs first.
    pub fn waiting_jobs(&self) -> Vec<(String, u64, String)> {
        let g = self.lock();
        let mut groups: BTreeMap<String, (u64, String)> = BTreeMap::new();
        // One look at the agents per class of job, not per job: runs can hold 100k jobs.
        let mut by_class: HashMap<&Class, String> = HashMap::new();
        for run in g.runs.iter().filter(|r| !r.state.is_terminal()) {
            let Some(sched) = &run.sched else {
                if !run.eval_queue.is_empty() {
                    let e = groups
                        .entry("evaluation: waiting for an agent".into())
                        .or_insert((0, run.id.clone()));
                    e.0 += run.eval_queue.len() as u64;
                }
                continue;
            };
            for id in 0..sched.len() as NodeId {
                let reason = match sched.state(id) {
                    NodeState::Ready => by_class
                        .entry(sched.class(id))
                        .or_insert_with(|| queued_reason(&g, sched.class(id)))
                        .clone(),
                    NodeState::Waiting => "waiting on dependencies".into(),
                    _ => continue,
                };
                let e = groups
                    .entry(reason)
                    .or_insert_with(|| (0, store_name(&run.drv_of[id as usize]).to_string()));
                e.0 += 1;
            }
        }
        let mut out: Vec<(String, u64, String)> =
            groups.into_iter().map(|(r, (n, ex))| (r, n, ex)).collect();
        out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        out
    }

    /// The Prometheus text exposition of the farm's state: agents, jobs by state, builds by
    /// outcome with durations, retries and attempts lost to vanished agents.
    pub fn metrics_text(&self) -> Result<String, EngineError> {
        use std::fmt::Write as _;
        let g = self.lock();
        let mut out = String::new();
        let connected = g.agents.values().filter(|a| a.tx.is_some()).count();
        let slots: u64 = g
            .agents
            .values()
            .filter(|a| a.tx.is_some())
            .map(|a| a.reg.max_jobs as u64)
            .sum();
        let _ = writeln!(
            out,
            "# HELP nixfarm_agents_connected Agents with a live stream.\n# TYPE nixfarm_agents_connected gauge\nnixfarm_agents_connected {connected}"
        );
        let _ = writeln!(
            out,
            "# HELP nixfarm_agent_slots Job slots of connected agents.\n# TYPE nixfarm_agent_slots gauge\nnixfarm_agent_slots {slots}"
        );
        let mut by_state: BTreeMap<&str, u64> = BTreeMap::new();
        for run in &g.runs {
            if let Some(s) = &run.sched {
                for id in 0..s.len() as NodeId {
                    let k = match s.state(id) {
                        NodeState::Waiting => "waiting-on-dependencies",
                        NodeState::Ready => "queued",
                        NodeState::Running => "running",
                        _ => continue,
                    };
                    *by_state.entry(k).or_default() += 1;
                }
            }
        }
        let _ = writeln!(
            out,
            "# HELP nixfarm_jobs Build jobs of unfinished runs by state.\n# TYPE nixfarm_jobs gauge"
        );
        for k in ["waiting-on-dependencies", "queued", "running"] {
            let _ = writeln!(
                out,
                "nixfarm_jobs{{state=\"{k}\"}} {}",
                by_state.get(k).copied().unwrap_or(0)
            );
        }
        let conn = g.db.conn();
        let mut runs = conn.prepare("SELECT state, count(*) FROM runs GROUP BY state")?;
        let _ = writeln!(
            out,
            "# HELP nixfarm_runs Runs by state.\n# TYPE nixfarm_runs gauge"
        );
        let rows = runs.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        for r in rows {
            let (state, n) = r?;
            let _ = writeln!(out, "nixfarm_runs{{state=\"{state}\"}} {n}");
        }
        let mut builds = conn
            .prepare(
                "SELECT outcome, count(*), coalesce(sum(finished_ms - started_ms), 0) FROM attempts WHERE kind = 'build' AND state = 'done' GROUP BY outcome",
            )
            ?;
        let rows = builds.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        let _ = writeln!(
            out,
            "# HELP nixfarm_builds_total Finished build jobs by outcome.\n# TYPE nixfarm_builds_total counter"
        );
        let mut durations = String::new();
        for r in rows {
            let (outcome, n, ms) = r?;
            let _ = writeln!(out, "nixfarm_builds_total{{outcome=\"{outcome}\"}} {n}");
            let _ = writeln!(
                durations,
                "nixfarm_build_duration_seconds_sum{{outcome=\"{outcome}\"}} {:.3}\nnixfarm_build_duration_seconds_count{{outcome=\"{outcome}\"}} {n}",
                ms as f64 / 1000.0
            );
        }
        let _ = writeln!(
            out,
            "# HELP nixfarm_build_duration_seconds Time from dispatch to result.\n# TYPE nixfarm_build_duration_seconds summary\n{}",
            durations.trim_end()
        );
        let scalar =
            |sql: &str| -> Result<i64, EngineError> { Ok(conn.query_row(sql, [], |r| r.get(0))?) };
        let retries = scalar("SELECT coalesce(sum(infra_failures), 0) FROM drvs")?;
        let lost = scalar("SELECT count(*) FROM attempts WHERE state = 'lost'")?;
        let _ = writeln!(
            out,
            "# HELP nixfarm_retries_total Jobs requeued after an infrastructure failure.\n# TYPE nixfarm_retries_total counter\nnixfarm_retries_total {retries}"
        );
        let _ = writeln!(
            out,
            "# HELP nixfarm_agent_protocol_violations_total Messages refused from an agent: results for attempts it does not hold, outputs that are not the derivation's.\n# TYPE nixfarm_agent_protocol_violations_total counter"
        );
        for (name, a) in &g.agents {
            let _ = writeln!(
                out,
                "nixfarm_agent_protocol_violations_total{{agent=\"{}\"}} {}",
                prometheus_label(name),
                a.violations
            );
        }
        let _ = writeln!(
            out,
            "# HELP nixfarm_attempts_lost_total Attempts given up because their agent vanished or the coordinator restarted (counted apart from build failures).\n# TYPE nixfarm_attempts_lost_total counter\nnixfarm_attempts_lost_total {lost}"
        );
        Ok(out)
    }

    /// How many build attempts a run made for a derivation.
    pub fn build_attempts(&self, run_id: &str, drv: &str) -> Result<i64, EngineError> {
        Ok(self.lock().db.build_attempts(run_id, drv)?)
    }
}

impl RunMem {
    fn new(id: String, spec: RunSpec, state: RunState) -> Self {
        RunMem {
            id,
            spec,
            state,
            eval_queue: VecDeque::new(),
            eval_tasks_total: None,
            eval_tasks_done: HashSet::new(),
            sched: None,
            node_of: HashMap::new(),
            drv_of: Vec::new(),
            outputs_of: Vec::new(),
            limits: HashMap::new(),
            done_builds: 0,
            chunk_attrs: HashMap::new(),
        }
    }

    fn eval_complete(&self) -> bool {
        self.eval_tasks_total
            .is_some_and(|t| self.eval_tasks_done.len() >= t)
    }
}

/// Derives one package's status and reason from its evaluation and its closure's builds.
fn package_report(
    attr: &str,
    p: &PackageInfo,
    run_state: RunState,
    results: &HashMap<&str, (DrvState, BuildReport)>,
    nodes: &HashMap<&str, DrvNode>,
    top_of: &HashMap<String, String>,
) -> PackageReport {
    let mut r = PackageReport {
        attr: attr.to_string(),
        status: PackageStatus::Pending,
        reason: String::new(),
        pname: p.pname.clone(),
        version: p.version.clone(),
        drv_path: p.drv_path.clone(),
        outputs: p.outputs.clone(),
        pinned: p.rev.is_empty() || rev_is_pinned(&p.rev),
        rev: p.rev.clone(),
        position: p.position.clone(),
        duration_ms: 0,
        agent: String::new(),
        failed_dependency: String::new(),
        hash_mismatches: vec![],
        hash_fixes: vec![],
        log_tail: String::new(),
    };
    let set = |r: &mut PackageReport, st: PackageStatus, reason: String| {
        r.status = st;
        r.reason = reason;
    };
    if !p.eval_error.is_empty() {
        set(&mut r, PackageStatus::EvalFailed, p.eval_error.clone());
        return r;
    }
    let Some((state, rep)) = results.get(p.drv_path.as_str()) else {
        let st = if run_state == RunState::Cancelled {
            PackageStatus::Cancelled
        } else {
            PackageStatus::Pending
        };
        set(&mut r, st, String::new());
        return r;
    };
    r.duration_ms = rep.duration_ms;
    r.agent = rep.agent.clone();
    if !rep.outputs.is_empty() {
        r.outputs = rep.outputs.clone();
    }
    // Every hash mismatch in the closure: a package can need several hashes at once.
    let closure = closure_of(&p.drv_path, nodes);
    let mismatches = closure_mismatches(&closure, results, nodes);
    r.hash_mismatches = mismatches.clone();
    match *state {
        DrvState::Built => {
            let fake: Vec<&str> = closure
                .iter()
                .filter(|d| nodes.get(d.as_str()).is_some_and(has_fake_hash))
                .map(|d| store_name(d))
                .collect();
            if !fake.is_empty() {
                // Nix only accepts a fake hash when the output is already valid: what the
                // package built against is unverified.
                set(
                    &mut r,
                    PackageStatus::NeedsHash,
                    format!(
                        "fixed-output derivation {} succeeded with a fake hash (its output was already in a store or cache); set its real hash",
                        fake.join(", ")
                    ),
                );
            } else if rep.kind == BuildOutcome::NotCached {
                set(&mut r, PackageStatus::NotCached, rep.message.clone());
            } else if r.pinned {
                set(
                    &mut r,
                    PackageStatus::Ready,
                    if rep.substituted {
                        "already in the cache".into()
                    } else {
                        String::new()
                    },
                );
            } else {
                set(
                    &mut r,
                    PackageStatus::Unpinned,
                    format!(
                        "source rev '{}' is a branch or tag name, not a commit",
                        p.rev
                    ),
                );
            }
        }
        DrvState::Failed => {
            r.log_tail = rep.log_tail.clone();
            match rep.kind {
                BuildOutcome::HashMismatch => set(
                    &mut r,
                    PackageStatus::NeedsHash,
                    format!(
                        "hash mismatch in {}: specified {}, got {}",
                        store_name(&p.drv_path),
                        rep.specified,
                        rep.got
                    ),
                ),
                BuildOutcome::TimedOut => set(&mut r, PackageStatus::TimedOut, rep.message.clone()),
                BuildOutcome::InfraFailed => {
                    set(&mut r, PackageStatus::InfraFailed, rep.message.clone())
                }
                BuildOutcome::BuildFailed
                | BuildOutcome::Built
                | BuildOutcome::NotCached
                | BuildOutcome::Cancelled
                | BuildOutcome::DependencyFailed => {
                    set(&mut r, PackageStatus::BuildFailed, rep.message.clone())
                }
            }
        }
        DrvState::DependencyFailed => {
            let root = rep.failed_root.as_str();
            let root_rep = results
                .get(root)
                .map(|(_, b)| b.clone())
                .unwrap_or_default();
            r.log_tail = root_rep.log_tail.clone();
            if !mismatches.is_empty() {
                let list: Vec<String> = mismatches
                    .iter()
                    .map(|m| {
                        format!(
                            "{}: specified {}, got {}",
                            store_name(&m.fod_drv),
                            m.specified,
                            m.got
                        )
                    })
                    .collect();
                set(
                    &mut r,
                    PackageStatus::NeedsHash,
                    format!("hash mismatch in {}", list.join("; ")),
                );
            } else {
                let name = top_of
                    .get(root)
                    .cloned()
                    .unwrap_or_else(|| store_name(root).to_string());
                r.failed_dependency = name.clone();
                // The dependency's own cause, not just its kind: "infra-failed" alone says
                // nothing a user can act on.
                let cause = root_rep.message.lines().next().unwrap_or_default();
                let reason = if cause.is_empty() {
                    format!("dependency {name} failed: {}", root_rep.kind)
                } else {
                    format!(
                        "dependency {name} failed: {}: {}",
                        root_rep.kind,
                        nixfarm_core::limits::clip(cause, 300)
                    )
                };
                set(&mut r, PackageStatus::DependencyFailed, reason);
            }
        }
        DrvState::Cancelled => set(
            &mut r,
            PackageStatus::Cancelled,
            "the run was cancelled".into(),
        ),
        DrvState::Waiting => {
            let st = if run_state == RunState::Cancelled {
                PackageStatus::Cancelled
            } else {
                PackageStatus::Pending
            };
            set(&mut r, st, String::new());
        }
    }
    r
}

/// Every derivation in a package's build closure, the package's own first.
fn closure_of(top: &str, nodes: &HashMap<&str, DrvNode>) -> Vec<String> {
    let mut seen = HashSet::new();
    let mut stack = vec![top.to_string()];
    let mut out = Vec::new();
    while let Some(d) = stack.pop() {
        if !seen.insert(d.clone()) {
            continue;
        }
        if let Some(n) = nodes.get(d.as_str()) {
            stack.extend(n.input_drvs.iter().cloned());
        }
        out.push(d);
    }
    out
}

/// A fixed output whose stated hash is all zeros (`lib.fakeHash`, `lib.fakeSha256`, `""`).
fn has_fake_hash(n: &DrvNode) -> bool {
    n.fixed_output
        && nixfarm_nix::hash::Hash::parse(&n.output_hash, None)
            .is_some_and(|h| h.digest.iter().all(|&b| b == 0))
}

fn closure_mismatches(
    closure: &[String],
    results: &HashMap<&str, (DrvState, BuildReport)>,
    nodes: &HashMap<&str, DrvNode>,
) -> Vec<HashMismatch> {
    let mut out: Vec<HashMismatch> = closure
        .iter()
        .filter_map(|d| {
            let (_, rep) = results.get(d.as_str())?;
            (rep.kind == BuildOutcome::HashMismatch).then(|| HashMismatch {
                fod_drv: d.clone(),
                specified: rep.specified.clone(),
                got: rep.got.clone(),
                hints: nodes
                    .get(d.as_str())
                    .map(|n| n.hints.clone())
                    .unwrap_or_default(),
            })
        })
        .collect();
    out.sort_by(|a, b| a.fod_drv.cmp(&b.fod_drv));
    out
}

/// Why a package of an unfinished run is not done yet: evaluating, building where, queued
/// (and whether any connected agent can take it), or waiting on dependencies.
/// Why a derivation that is ready to build is not running yet.
fn queued_reason(inner: &Inner, class: &Class) -> String {
    let describe = || {
        if class.features.is_empty() {
            class.system.clone()
        } else {
            format!("{} with {}", class.system, class.features.join(", "))
        }
    };
    let (capable, paused): (Vec<&AgentMem>, Vec<&AgentMem>) = inner
        .agents
        .values()
        .filter(|a| a.tx.is_some() && !a.draining && a.caps.can_build(class))
        .partition(|a| a.paused.is_empty());
    if capable.is_empty() && !paused.is_empty() {
        format!(
            "queued: all {} agent(s) that build {} are paused ({}: {})",
            paused.len(),
            describe(),
            paused[0].reg.name,
            paused[0].paused
        )
    } else if capable.is_empty() {
        format!("no connected agent builds {}", describe())
    } else if capable
        .iter()
        .all(|a| a.running.len() >= a.reg.max_jobs as usize)
    {
        format!(
            "queued: all {} agent(s) that build {} are busy",
            capable.len(),
            describe()
        )
    } else {
        "queued".into()
    }
}

fn waiting_reason(inner: &Inner, run_id: &str, drv: &str) -> String {
    let Some(run) = inner.runs.iter().find(|r| r.id == run_id) else {
        return String::new();
    };
    let (Some(sched), Some(&top)) = (&run.sched, run.node_of.get(drv)) else {
        return "evaluating".into();
    };
    let queued = |id: NodeId| queued_reason(inner, sched.class(id));
    match sched.state(top) {
        NodeState::Running => {
            let agent = inner
                .attempts
                .values()
                .find(|a| a.run_id == run_id && a.target == drv)
                .map(|a| a.agent.clone())
                .unwrap_or_default();
            format!("building on {agent}")
        }
        NodeState::Ready => queued(top),
        NodeState::Waiting => {
            // The unbuilt derivations below it, and what holds the first ready one.
            let mut seen = HashSet::new();
            let mut stack = vec![top];
            let mut unbuilt = 0usize;
            let mut blocked: Option<String> = None;
            while let Some(n) = stack.pop() {
                if !seen.insert(n) {
                    continue;
                }
                for &i in sched.inputs(n) {
                    match sched.state(i) {
                        NodeState::Built => {}
                        NodeState::Ready => {
                            unbuilt += 1;
                            let why = queued(i);
                            if blocked.is_none() && why != "queued" {
                                blocked =
                                    Some(format!("{}: {why}", store_name(&run.drv_of[i as usize])));
                            }
                            stack.push(i);
                        }
                        _ => {
                            unbuilt += 1;
                            stack.push(i);
                        }
                    }
                }
            }
            match blocked {
                Some(b) => format!("waiting on {unbuilt} dependencies ({b})"),
                None => format!("waiting on {unbuilt} dependencies"),
            }
        }
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_hashes_are_recognised_in_every_spelling() {
        let node = |h: &str| DrvNode {
            fixed_output: true,
            output_hash: h.into(),
            ..Default::default()
        };
        assert!(has_fake_hash(&node(&format!("sha256:{}", "0".repeat(52)))));
        assert!(has_fake_hash(&node(
            "sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
        )));
        assert!(!has_fake_hash(&node(
            "sha256-61WeR6/hoYwd5GsHVR2+sgD/QcMTsCKiZHJ7o8yKEbQ="
        )));
        let mut not_fixed = node("sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=");
        not_fixed.fixed_output = false;
        assert!(!has_fake_hash(&not_fixed));
    }

    #[test]
    fn an_upload_is_claimed_by_one_agent_until_released_or_its_holder_is_gone() {
        let (engine, clock, _dir) = test_engine(EngineOptions::default());
        let connect = |name: &str| connect_agent(&engine, name);
        let a = connect("a");
        let b = connect("b");
        let (conn_a, conn_b) = (a.conn, b.conn);
        let paths = vec!["/nix/store/p1".to_string(), "/nix/store/p2".to_string()];
        let c = "file:///cache";
        assert_eq!(
            engine
                .claim_uploads("a", &a.session, c, &paths, false)
                .unwrap(),
            [true, true]
        );
        // Held by a: b waits; a asking again keeps its claim.
        assert_eq!(
            engine
                .claim_uploads("b", &b.session, c, &paths, false)
                .unwrap(),
            [false, false]
        );
        assert_eq!(
            engine
                .claim_uploads("a", &a.session, c, &paths, false)
                .unwrap(),
            [true, true]
        );
        // Another cache is another claim.
        assert_eq!(
            engine
                .claim_uploads("b", &b.session, "file:///other", &paths[..1], false)
                .unwrap(),
            [true]
        );
        // a uploaded p1: b may claim it (and will find it in the cache).
        engine
            .claim_uploads("a", &a.session, c, &paths[..1], true)
            .unwrap();
        assert_eq!(
            engine
                .claim_uploads("b", &b.session, c, &paths, false)
                .unwrap(),
            [true, false]
        );
        // The streams drop: a's claim holds through the lease, then lapses.
        engine.disconnect_agent("b", conn_b);
        engine.disconnect_agent("a", conn_a);
        clock.advance(4_000);
        assert_eq!(
            engine
                .claim_uploads("b", &b.session, c, &paths[1..], false)
                .unwrap(),
            [false]
        );
        clock.advance(2_000);
        assert_eq!(
            engine
                .claim_uploads("b", &b.session, c, &paths[1..], false)
                .unwrap(),
            [true]
        );
        // A holder that registers again with nothing running has no upload in flight.
        let a2 = connect("a");
        assert_eq!(
            engine
                .claim_uploads("a", &a2.session, c, &paths[1..], false)
                .unwrap(),
            [false]
        );
        // The old registration's key (or none) claims nothing in a's name any more.
        assert!(
            engine
                .claim_uploads("a", &a.session, c, &paths[1..], false)
                .is_err()
        );
        assert!(
            engine
                .claim_uploads("a", "", c, &paths[1..], false)
                .is_err()
        );
        let _b2 = connect("b");
        assert_eq!(
            engine
                .claim_uploads("a", &a2.session, c, &paths[1..], false)
                .unwrap(),
            [true]
        );
    }

    /// An engine over an in-memory database with a manual clock and a 5 s lease.
    fn test_engine(
        opts: EngineOptions,
    ) -> (Engine, Arc<crate::clock::ManualClock>, tempfile::TempDir) {
        let clock = Arc::new(crate::clock::ManualClock::new(1_000_000));
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(
            Db::open_in_memory().unwrap(),
            dir.path().join("sources"),
            clock.clone(),
            EngineOptions {
                lease_ms: 5_000,
                ..opts
            },
        )
        .unwrap();
        (engine, clock, dir)
    }

    /// A registered test agent: its connection, session key and what it is sent.
    struct TestAgent {
        conn: u64,
        session: String,
        rx: mpsc::UnboundedReceiver<ToAgent>,
    }

    fn registration(name: &str, session_key: &str) -> Registration {
        Registration {
            name: name.into(),
            systems: vec!["x86_64-linux".into()],
            features: vec![],
            max_jobs: 1,
            nix_version: "2.8.0".into(),
            running_attempts: vec![],
            session_key: session_key.into(),
        }
    }

    /// Registers a one-job x86_64-linux agent (any earlier stream of that name closed).
    fn connect_agent(engine: &Engine, name: &str) -> TestAgent {
        let (tx, rx) = mpsc::unbounded_channel();
        let (conn, session) = engine.connect_agent(registration(name, ""), tx).unwrap();
        TestAgent { conn, session, rx }
    }

    /// A run of a flake's packages.x86_64-linux, no cache.
    fn flake_run() -> RunSpec {
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
        }
    }

    /// The next assignment sent to an agent: (attempt, job).
    fn assigned(rx: &mut mpsc::UnboundedReceiver<ToAgent>) -> (String, Job) {
        loop {
            match rx.try_recv().expect("an assignment") {
                ToAgent::Assign { attempt, job, .. } => return (attempt, job),
                _ => continue,
            }
        }
    }

    #[test]
    fn a_build_whose_agents_keep_vanishing_is_given_up_after_the_retry_budget() {
        let (engine, clock, _dir) = test_engine(EngineOptions {
            max_infra_retries: 2,
            ..Default::default()
        });
        let connect = || connect_agent(&engine, "a");
        let mut a = connect();
        let run = engine.submit(flake_run()).unwrap();
        let (list, _) = assigned(&mut a.rx);
        engine
            .agent_message(
                "a",
                a.conn,
                FromAgent::EvalList {
                    attempt: list,
                    result: Ok(vec!["crash".into()]),
                },
            )
            .unwrap();
        let (chunk, _) = assigned(&mut a.rx);
        let drv = "/nix/store/00000000000000000000000000000000-crash.drv".to_string();
        let node = DrvNode {
            system: "x86_64-linux".into(),
            outputs: [(
                "out".to_string(),
                "/nix/store/11111111111111111111111111111111-crash".to_string(),
            )]
            .into(),
            ..Default::default()
        };
        let attr = EvaluatedAttr {
            attr: "crash".into(),
            info: PackageInfo {
                drv_path: drv.clone(),
                system: "x86_64-linux".into(),
                ..Default::default()
            },
        };
        engine
            .agent_message(
                "a",
                a.conn,
                FromAgent::EvalChunk {
                    attempt: chunk,
                    result: Ok((vec![attr], [(drv.clone(), node)].into())),
                },
            )
            .unwrap();
        // Each time the build starts, the agent falls silent and its lease runs out.
        let mut builds = 0;
        loop {
            let (_, job) = assigned(&mut a.rx);
            assert!(matches!(job, Job::Build { ref drv_path, .. } if *drv_path == drv));
            builds += 1;
            clock.advance(6_000);
            engine.check_leases();
            if engine.run_state(&run).unwrap().is_terminal() {
                break;
            }
            assert!(builds < 10, "requeued for ever");
            drop(a);
            a = connect();
        }
        // The first attempt and two retries, then it is given up: reported, not failed.
        assert_eq!(builds, 3);
        let report = engine.report(&run).unwrap();
        let p = &report.packages[0];
        assert_eq!(p.status, PackageStatus::InfraFailed);
        assert!(
            p.reason
                .contains("given up after 3 attempts lost with their agents"),
            "{}",
            p.reason
        );
        assert!(
            p.reason.contains("the agent stopped responding"),
            "{}",
            p.reason
        );
    }

    #[test]
    fn runs_in_flight_are_limited_and_a_finished_one_frees_its_place() {
        let (engine, _clock, _dir) = test_engine(EngineOptions {
            max_runs_in_flight: 1,
            ..Default::default()
        });
        let spec = flake_run();
        let first = engine.submit(spec.clone()).unwrap();
        let err = engine.submit(spec.clone()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "too many runs in flight (limit 1); wait for one to finish"
        );
        assert!(engine.cancel(&first).unwrap());
        engine.submit(spec).unwrap();
    }

    #[test]
    fn a_listing_that_keeps_failing_on_the_machine_fails_the_run_after_the_retry_budget() {
        let (engine, _clock, _dir) = test_engine(EngineOptions {
            max_infra_retries: 2,
            ..Default::default()
        });
        let TestAgent { conn, mut rx, .. } = connect_agent(&engine, "a");
        let run = engine.submit(flake_run()).unwrap();
        let mut tries = 0;
        while !engine.run_state(&run).unwrap().is_terminal() {
            assert!(tries < 10, "retried for ever");
            let (attempt, job) = assigned(&mut rx);
            assert!(matches!(job, Job::EvalList { .. }));
            tries += 1;
            let result = Err(("writing to file: No space left on device".into(), true));
            engine
                .agent_message("a", conn, FromAgent::EvalList { attempt, result })
                .unwrap();
        }
        assert_eq!(tries, 3, "the first try and two retries");
        let report = engine.report(&run).unwrap();
        assert_eq!(report.state, RunState::Failed);
        assert!(
            report.error.contains("No space left on device"),
            "{}",
            report.error
        );
    }

    /// Evaluates a one-package run on `a` and returns (run, drv, its output).
    fn one_package_run(engine: &Engine, a: &mut TestAgent) -> (String, String, String) {
        let run = engine.submit(flake_run()).unwrap();
        let (list, _) = assigned(&mut a.rx);
        let result = Ok(vec!["pkg".into()]);
        engine
            .agent_message(
                "a",
                a.conn,
                FromAgent::EvalList {
                    attempt: list,
                    result,
                },
            )
            .unwrap();
        let (chunk, _) = assigned(&mut a.rx);
        let drv = "/nix/store/00000000000000000000000000000000-pkg.drv".to_string();
        let out = "/nix/store/11111111111111111111111111111111-pkg".to_string();
        let node = DrvNode {
            system: "x86_64-linux".into(),
            outputs: [("out".to_string(), out.clone())].into(),
            ..Default::default()
        };
        let attr = EvaluatedAttr {
            attr: "pkg".into(),
            info: PackageInfo {
                drv_path: drv.clone(),
                outputs: [("out".to_string(), out.clone())].into(),
                system: "x86_64-linux".into(),
                ..Default::default()
            },
        };
        let result = Ok((vec![attr], [(drv.clone(), node)].into()));
        engine
            .agent_message(
                "a",
                a.conn,
                FromAgent::EvalChunk {
                    attempt: chunk,
                    result,
                },
            )
            .unwrap();
        (run, drv, out)
    }

    fn built(out: &str) -> BuildReport {
        BuildReport {
            kind: BuildOutcome::Built,
            outputs: [("out".to_string(), out.to_string())].into(),
            ..Default::default()
        }
    }

    fn violations(engine: &Engine, name: &str) -> u64 {
        engine
            .list_agents()
            .into_iter()
            .find(|a| a.name == name)
            .map_or(0, |a| a.violations)
    }

    #[test]
    fn a_result_counts_only_from_the_agent_that_holds_the_attempt() {
        let (engine, _clock, _dir) = test_engine(EngineOptions::default());
        let mut a = connect_agent(&engine, "a");
        let (run, _drv, out) = one_package_run(&engine, &mut a);
        let (attempt, _) = assigned(&mut a.rx);
        let b = connect_agent(&engine, "b");
        // b claims a's build succeeded, with a path nobody built.
        let forged = "/nix/store/22222222222222222222222222222222-evil".to_string();
        engine
            .agent_message(
                "b",
                b.conn,
                FromAgent::Build {
                    attempt: attempt.clone(),
                    report: built(&forged),
                },
            )
            .unwrap();
        assert_eq!(violations(&engine, "b"), 1);
        assert!(!engine.run_state(&run).unwrap().is_terminal());
        // a's own result still counts, once.
        for _ in 0..2 {
            engine
                .agent_message(
                    "a",
                    a.conn,
                    FromAgent::Build {
                        attempt: attempt.clone(),
                        report: built(&out),
                    },
                )
                .unwrap();
        }
        let report = engine.report(&run).unwrap();
        assert_eq!(report.packages[0].status, PackageStatus::Ready);
        assert_eq!(report.packages[0].agent, "a");
        assert_eq!(violations(&engine, "a"), 0);
    }

    #[test]
    fn a_build_reporting_outputs_that_are_not_the_derivations_is_refused_and_retried() {
        let (engine, _clock, _dir) = test_engine(EngineOptions::default());
        let mut a = connect_agent(&engine, "a");
        let (run, drv, out) = one_package_run(&engine, &mut a);
        let (attempt, _) = assigned(&mut a.rx);
        let forged = "/nix/store/22222222222222222222222222222222-pkg".to_string();
        let report = built(&forged);
        engine
            .agent_message("a", a.conn, FromAgent::Build { attempt, report })
            .unwrap();
        assert_eq!(violations(&engine, "a"), 1);
        // Requeued as an infrastructure failure, not ready with the forged path.
        let (again, job) = assigned(&mut a.rx);
        assert!(matches!(job, Job::Build { ref drv_path, .. } if *drv_path == drv));
        let report = built(&out);
        engine
            .agent_message(
                "a",
                a.conn,
                FromAgent::Build {
                    attempt: again,
                    report,
                },
            )
            .unwrap();
        let report = engine.report(&run).unwrap();
        assert_eq!(report.packages[0].status, PackageStatus::Ready);
        assert_eq!(report.packages[0].outputs.get("out"), Some(&out));
    }

    #[test]
    fn a_live_agents_name_is_refused_to_others_and_kept_for_its_own_reconnect() {
        let (engine, _clock, _dir) = test_engine(EngineOptions::default());
        let first = connect_agent(&engine, "x");
        let (tx, _rx) = mpsc::unbounded_channel();
        let err = engine
            .connect_agent(registration("x", ""), tx.clone())
            .unwrap_err();
        assert!(matches!(err, EngineError::Conflict(_)), "{err}");
        assert!(err.to_string().contains("already connected"), "{err}");
        let err = engine
            .connect_agent(registration("x", "guess"), tx.clone())
            .unwrap_err();
        assert!(matches!(err, EngineError::Conflict(_)), "{err}");
        // The same agent, proving itself, takes its name over; its old stream is not heard.
        let (conn, _) = engine
            .connect_agent(registration("x", &first.session), tx)
            .unwrap();
        assert_ne!(conn, first.conn);
        // Once the stream is gone, the name is free again.
        drop(_rx);
        let (tx2, _rx2) = mpsc::unbounded_channel();
        engine.connect_agent(registration("x", ""), tx2).unwrap();
    }
}
