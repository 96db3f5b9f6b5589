//! The coordinator's state machine: runs move from evaluation to building to finished,
//! agents connect and take jobs, results come back once. Every change is written to the
//! database first; the in-memory state is a cache of it that [`Engine::open`] rebuilds.

use crate::clock::Clock;
use crate::db::{AttemptRow, RunRow};
use crate::model::*;
use crate::scheduler::{Capabilities, Class, NodeId, NodeState, Scheduler};
use crate::state::{StateError, StateStore};
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
    /// A bound on what the engine keeps is reached (agents remembered).
    #[error("{0}")]
    Full(String),
    #[error("database error: {0}")]
    State(#[from] StateError),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The state store failed in the middle of a step: the engine takes no more (see
    /// [`Engine::halted`]).
    #[error("the coordinator stopped: {0}")]
    Halted(String),
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
    /// When it was submitted (ms, the engine's clock).
    created_ms: i64,
    eval_queue: VecDeque<EvalTask>,
    eval_tasks_total: Option<usize>,
    eval_tasks_done: HashSet<i64>,
    /// The listing attempts whose repository checks are still to come, their agents, and
    /// when the run stops waiting for them (ms): one, or with evaluation cross-checked one
    /// per agent that listed.
    repo_owed: Vec<crate::model::OwedChecks>,
    sched: Option<Scheduler>,
    node_of: HashMap<StorePath, NodeId>,
    drv_of: Vec<StorePath>,
    /// The outputs each derivation has by the graph, by node: the only paths a build of it
    /// may report.
    outputs_of: Vec<Outputs>,
    /// The node each known input-addressed output path is an output of (no two share one):
    /// what upload claims are checked against (`claims`). Fixed outputs are left out: their
    /// paths are their content's, which another derivation, or a flake input, may have
    /// too. Emptied when the run ends.
    node_of_output: HashMap<StorePath, NodeId>,
    /// Fixed-output derivations' hashes as their derivations declare them: what a reported
    /// hash mismatch must name as specified.
    fixed_hash: HashMap<NodeId, String>,
    /// Which agent built each built derivation (its outputs are in that agent's store).
    built_on: HashMap<NodeId, String>,
    /// Per-derivation build limits from the packages' meta (timeout, max-silent).
    limits: HashMap<StorePath, (u64, u64)>,
    /// With smoke tests: each package's derivation and its main program (empty: the only
    /// executable in bin/).
    smoke: HashMap<StorePath, String>,
    done_builds: u64,
    /// Attribute names of each evaluation task.
    chunk_attrs: HashMap<i64, Vec<String>>,
    /// Tasks of attributes that threw when the listing evaluated them (see
    /// [`Job::EvalChunk`]'s `listed_as_throwing`). Not kept across a restart: such a task
    /// then runs as any other.
    throwing_chunks: HashSet<i64>,
    /// Evaluation tasks that kept failing with the machine's words, and the last message:
    /// settled once the run's other tasks are (`eval_parked`).
    parked_eval: BTreeMap<i64, String>,
    /// Parked tasks given their one more try once the others had settled.
    final_tried: HashSet<i64>,
    /// Cross-checked evaluation: the first answer to each task awaiting a second (task -1:
    /// the listing).
    opinions: HashMap<i64, EvalOpinion>,
    /// When each first answer came (ms, this process's clock): how long it has waited.
    opinion_since: HashMap<i64, i64>,
    /// Cross-checked builds: derivations built once and awaiting their check, by node
    /// (they stay running in the scheduler until it settles them).
    checks: HashMap<NodeId, PendingCheck>,
    /// Those of them no agent is checking now, oldest first.
    check_queue: VecDeque<NodeId>,
}

#[derive(Debug, Clone)]
enum JobRef {
    Eval(EvalTask),
    Build(NodeId),
    /// A second build of a derivation another agent built (cross-checked builds).
    Check(NodeId),
}

#[derive(Debug, Clone)]
struct AttemptMem {
    run_id: String,
    job: JobRef,
    agent: String,
    /// Holds one of the agent's fetch slots, not a build slot.
    fetch: bool,
    /// Where a build's outputs were told to wait for their check (None: not known, the
    /// attempt came back after a restart; the run's current setting is taken).
    hold: Option<Hold>,
}

impl AttemptMem {
    /// The kind of slot this attempt holds on its agent.
    fn slot(&self) -> slots::Slot {
        match self.job {
            JobRef::Eval(_) => slots::Slot::Eval,
            JobRef::Build(_) if self.fetch => slots::Slot::Fetch,
            JobRef::Build(_) | JobRef::Check(_) => slots::Slot::Build,
        }
    }
}

struct AgentMem {
    reg: Registration,
    caps: Capabilities,
    conn: u64,
    tx: Option<mpsc::UnboundedSender<ToAgent>>,
    running: slots::Running,
    /// Attempts it holds that its heartbeats left out, with when the first of them did.
    unseen: HashMap<String, i64>,
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
    db: Box<dyn StateStore>,
    runs: Vec<RunMem>,
    agents: BTreeMap<String, AgentMem>,
    /// Agents forgotten to make room for new ones, not yet handed to
    /// [`Engine::forget_idle_agents`]'s caller (whose farm cache tokens it withdraws).
    forgotten: Vec<String>,
    attempts: HashMap<String, AttemptMem>,
    next_conn: u64,
    /// Cost estimates: ms each derivation name took when last built.
    build_times: HashMap<String, u64>,
    /// Where agents can hand each other unchecked outputs, other than a run's own cache:
    /// the store they share, the farm cache once it has started, or nowhere.
    hold_way: Hold,
    /// Inside a batch ([`Engine::atomically`]): what it tells watchers and agents, told once
    /// it commits.
    batch: Option<Vec<batch::Deferred>>,
}

impl Inner {
    /// Whether `run_id` has ended (or is not held here): what comes for it changes nothing.
    fn run_is_over(&self, run_id: &str) -> bool {
        self.runs
            .iter()
            .find(|r| r.id == run_id)
            .is_none_or(|r| r.state.is_terminal())
    }
}

/// Longest a run waits for the repository checks an agent said would follow its listing, ms
/// (five small evaluations; an agent that never sends them must not hold the run forever).
const REPO_CHECKS_WAIT_MS: i64 = 600_000;

/// The cost of a derivation never built here, ms: a typical small build.
const UNKNOWN_BUILD_MS: u64 = 1_000;

/// A derivation's expected build time, ms: as long as it took when last built here; else,
/// for a package that declares a time limit (`meta.timeout`, seconds), a quarter of it (its
/// maintainers expect it to be long: it starts early on a coordinator that never built it);
/// else a typical small build.
fn cost_of(times: &HashMap<String, u64>, drv: &str, timeout_secs: u64) -> u64 {
    times
        .get(store_name(drv))
        .copied()
        .unwrap_or_else(|| (timeout_secs.min(24 * 3600) * 1000 / 4).max(UNKNOWN_BUILD_MS))
}

/// The coordinator engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Mutex<Inner>>,
    events: broadcast::Sender<RunEvent>,
    clock: Arc<dyn Clock>,
    opts: EngineOptions,
    sources_dir: PathBuf,
    /// Package counts of ended runs, which never change.
    ended_counts: Arc<Mutex<HashMap<String, RunCounts>>>,
    /// Snapshot trees the hash fixer searches.
    trees: Arc<crate::trees::TreeCache>,
    /// The store's read-only handle (None: it has none): reports are read through it, off
    /// the engine's lock, so a large run's report does not hold up dispatch.
    reader: Arc<Mutex<Option<Box<dyn StateStore>>>>,
    /// Told the outputs of a build whose check found different ones (the farm cache stops
    /// serving them).
    failed_check: Arc<std::sync::OnceLock<checks::OnFailedCheck>>,
    /// What is asked at registration: whether what admitted an agent was taken back.
    gate: Arc<std::sync::OnceLock<crate::credentials::Gate>>,
    /// Set when the state store failed in the middle of a step (batch.rs).
    halt: Arc<batch::Halt>,
    /// Between submits, uploads and the sweep of uploaded snapshots.
    snapshots: crate::upload::SnapshotsLock,
}

/// A run's package counts: (total, ready, per status).
type RunCounts = (u64, u64, BTreeMap<PackageStatus, u64>);

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

/// Whether agents `a` and `b` count as two for a cross-check: different names, and
/// different credentials (two names on one join token are one holder).
fn independent(agents: &BTreeMap<String, AgentMem>, a: &str, b: &str) -> bool {
    let credential = |n: &str| {
        agents
            .get(n)
            .map(|m| m.reg.credential.clone())
            .unwrap_or_default()
    };
    crate::credentials::Credential::independent((a, &credential(a)), (b, &credential(b)))
}

/// Whether `a` may take a check of outputs held as `hold`, where agents hand each other
/// unchecked outputs `way` now: see [`takes`].
fn may_take(a: &AgentMem, hold: Hold, way: Hold) -> bool {
    takes(&a.reg, hold, way)
}

/// Whether an agent registered as `reg` may build, or check, outputs held as `hold` while
/// agents hand each other unchecked outputs `way`: one that predates holding would neither
/// fetch them from there nor publish them, and outputs held in a farm cache that is gone
/// are nowhere. Outputs held in their builder's store need nothing shared, so they are
/// taken whatever the way is now (a build or check from before a restart that turned the
/// farm cache on).
fn takes(reg: &Registration, hold: Hold, way: Hold) -> bool {
    !hold.held() || (reg.can_hold(hold) && (hold == way || hold == Hold::BuilderStore))
}

/// Where a derivation of `class` holds its outputs in a run that holds them `run_hold`: a
/// fixed output is not checked (its hash vouches for it), so never held.
fn hold_of(class: &Class, run_hold: Hold) -> Hold {
    if class.fetch { Hold::No } else { run_hold }
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
        db: impl StateStore + 'static,
        sources_dir: PathBuf,
        clock: Arc<dyn Clock>,
        opts: EngineOptions,
    ) -> Result<Engine, EngineError> {
        std::fs::create_dir_all(&sources_dir)?;
        let (events, _) = broadcast::channel(8192);
        let mut db = db;
        let build_times = db.build_times()?;
        let reader = db.reader().unwrap_or_else(|e| {
            tracing::warn!("no separate reader of the state ({e}): reports hold the engine");
            None
        });
        let engine = Engine {
            inner: Arc::new(Mutex::new(Inner {
                build_times,
                // Until the farm cache starts (if it does): nothing between the agents but
                // the run's cache, so held outputs stay in their builder's store.
                hold_way: if opts.agents_share_store {
                    Hold::SharedStore
                } else {
                    Hold::BuilderStore
                },
                db: Box::new(db),
                runs: Vec::new(),
                agents: BTreeMap::new(),
                forgotten: Vec::new(),
                attempts: HashMap::new(),
                next_conn: 1,
                batch: None,
            })),
            events,
            clock,
            opts,
            sources_dir,
            ended_counts: Arc::new(Mutex::new(HashMap::new())),
            trees: Arc::default(),
            reader: Arc::new(Mutex::new(reader)),
            failed_check: Arc::default(),
            halt: Arc::default(),
            gate: Arc::default(),
            snapshots: Default::default(),
        };
        engine.recover()?;
        Ok(engine)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock means a panic mid-update; the database is still the truth, so go on.
        self.inner.lock().unwrap_or_else(|e| {
            self.inner.clear_poison();
            let mut g = e.into_inner();
            // A batch the panic left open lands, as a step that failed does: memory went on
            // with what it stored.
            if g.batch.is_some()
                && let Err(e) = self.end_batch(&mut g)
            {
                tracing::error!("cannot store what a step that panicked stored: {e}");
            }
            g
        })
    }

    pub fn sources_dir(&self) -> &std::path::Path {
        &self.sources_dir
    }

    pub fn subscribe(&self) -> broadcast::Receiver<RunEvent> {
        self.events.subscribe()
    }

    fn emit(&self, inner: &mut Inner, run_id: &str, event: nixfarm_core::RunEvent) {
        let (kind, json) = (event.kind(), event.to_json());
        match inner.db.append_event(run_id, kind, &json) {
            Ok(seq) => self.broadcast(inner, run_id, seq, kind, json),
            Err(e) => tracing::error!(run = run_id, "cannot store event: {e}"),
        }
    }

    /// Tells the watchers of an event stored as `seq`; inside a batch, once it commits.
    fn broadcast(&self, inner: &mut Inner, run_id: &str, seq: i64, kind: &str, json: String) {
        let event = RunEvent {
            run_id: run_id.into(),
            seq: seq as u64,
            kind: kind.into(),
            json,
        };
        match inner.batch.as_mut() {
            Some(held) => held.push(batch::Deferred::Event(event)),
            None => {
                let _ = self.events.send(event);
            }
        }
    }
}

impl RunMem {
    fn new(id: String, spec: RunSpec, state: RunState, created_ms: i64) -> Self {
        RunMem {
            id,
            spec,
            state,
            created_ms,
            eval_queue: VecDeque::new(),
            eval_tasks_total: None,
            eval_tasks_done: HashSet::new(),
            repo_owed: Vec::new(),
            sched: None,
            node_of: HashMap::new(),
            drv_of: Vec::new(),
            outputs_of: Vec::new(),
            node_of_output: HashMap::new(),
            fixed_hash: HashMap::new(),
            built_on: HashMap::new(),
            limits: HashMap::new(),
            smoke: HashMap::new(),
            done_builds: 0,
            chunk_attrs: HashMap::new(),
            throwing_chunks: HashSet::new(),
            parked_eval: BTreeMap::new(),
            final_tried: HashSet::new(),
            opinions: HashMap::new(),
            opinion_since: HashMap::new(),
            checks: HashMap::new(),
            check_queue: VecDeque::new(),
        }
    }

    /// Remembers what a package asks of its derivation's build: its limits and, with smoke
    /// tests, its main program.
    fn note_package(&mut self, p: &PackageInfo) {
        let Some(drv) = &p.drv_path else {
            return;
        };
        if p.timeout_secs > 0 || p.max_silent_secs > 0 {
            self.limits
                .insert(drv.clone(), (p.timeout_secs, p.max_silent_secs));
        }
        if self.spec.smoke && p.eval_error.is_empty() {
            self.smoke.insert(drv.clone(), p.main_program.clone());
        }
    }

    /// Adds a derivation to the run's graph (its edges come after).
    fn add_drv(
        &mut self,
        sched: &mut Scheduler,
        path: &StorePath,
        node: &DrvNode,
        times: &HashMap<String, u64>,
    ) -> NodeId {
        let mut features = node.features.clone();
        features.sort();
        features.dedup();
        let id = sched.add_node(
            Class {
                system: node.system.clone(),
                features,
                fetch: node.fixed_output,
            },
            cost_of(
                times,
                path,
                self.limits.get(path).map_or(0, |(timeout, _)| *timeout),
            ),
        );
        self.node_of.insert(path.clone(), id);
        self.drv_of.push(path.clone());
        self.outputs_of.push(node.outputs.clone());
        if !node.fixed_output {
            for o in node.outputs.values() {
                if let OutputPath::Known(p) = o {
                    self.node_of_output.insert(p.clone(), id);
                }
            }
        }
        if node.fixed_output {
            self.fixed_hash.insert(id, node.output_hash.clone());
        }
        id
    }

    /// The limits of the run's builds whose package sets none.
    fn build_limits(&self) -> crate::model::BuildLimits {
        crate::model::BuildLimits {
            timeout_secs: self.spec.timeout_secs,
            max_silent_secs: self.spec.max_silent_secs,
        }
    }

    /// The job that builds `drv` (or, `check`, builds it again to compare): the run's cache
    /// and limits, a package's own limits first; a check is not smoke-tested.
    fn build_job(&self, drv: &StorePath, background: bool, check: bool, hold: Hold) -> Job {
        let (t, s) = self.limits.get(drv).copied().unwrap_or((0, 0));
        Job::Build {
            drv_path: drv.clone(),
            cache: self.spec.cache.clone(),
            trusted_public_keys: self.spec.trusted_public_keys.clone(),
            timeout_secs: if t > 0 { t } else { self.spec.timeout_secs },
            max_silent_secs: if s > 0 { s } else { self.spec.max_silent_secs },
            smoke: self.smoke.get(drv).cloned().filter(|_| !check),
            background,
            check,
            hold,
            expect: Vec::new(),
        }
    }

    /// Where this run's cross-checked builds keep their outputs until checked: out of its
    /// own cache, if it has one and the agents another way between them (`way`). Fixed
    /// outputs aside: see [`hold_of`].
    fn hold(&self, opts: &EngineOptions, way: Hold) -> Hold {
        if (opts.cross_check_builds || self.spec.cross_check_builds) && !self.spec.cache.is_empty()
        {
            way
        } else {
            Hold::No
        }
    }

    /// An evaluation task back in the queue (its attempt lost or broken): if a first
    /// answer awaits its check, the wait for a second agent starts again.
    fn requeue_eval(&mut self, task: EvalTask, now: i64, front: bool) {
        if let Some(since) = self.opinion_since.get_mut(&opinions::task_no(task)) {
            *since = now;
        }
        if front {
            self.eval_queue.push_front(task);
        } else {
            self.eval_queue.push_back(task);
        }
    }

    fn eval_complete(&self) -> bool {
        self.eval_tasks_total
            .is_some_and(|t| self.eval_tasks_done.len() >= t)
            && self.repo_owed.is_empty()
    }
}

mod agents;
mod batch;
mod build;
mod checks;
mod claims;
mod copied;
pub use claims::UploadClaim;
mod cutoff;
mod dispatch;
mod eval;
mod eval_parked;
mod fixes;
mod leases;
mod options;
pub use options::EngineOptions;
mod metrics;
mod opinions;
mod queries;
mod readiness;
mod recovery;
mod runs;
mod sessions;
mod slots;
mod waiting;

#[cfg(test)]
mod answers_tests;
#[cfg(test)]
mod caches_tests;
#[cfg(test)]
mod checks_tests;
#[cfg(test)]
mod cutoff_tests;
#[cfg(test)]
mod dispatch_tests;
#[cfg(test)]
mod held_tests;
#[cfg(test)]
mod lifecycle_tests;
#[cfg(test)]
mod opinions_listing_tests;
#[cfg(test)]
mod opinions_tests;
#[cfg(test)]
mod parked_tests;
#[cfg(test)]
pub(crate) mod queries_tests;
#[cfg(test)]
mod recovery_tests;
#[cfg(test)]
mod tests;
