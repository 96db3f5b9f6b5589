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
    BuildReport, DrvNode, EvalChunkOutput, EvaluatedAttr, FromAgent, Job, OutputPath, PackageInfo,
    Registration, RunSpec, SourceSpec, StorePath, ToAgent, store_name,
};
use nixfarm_coordinator::{Engine, EngineOptions};
use nixfarm_core::report::Report;
use nixfarm_core::{BuildOutcome, PackageStatus, RunState};
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

/// 32 characters of Nix's base-32, fixed by `tag` and `i`.
fn hash32(tag: u64, i: usize) -> String {
    const ALPHABET: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    let mut x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ tag.wrapping_mul(0xD6E8_FEB8);
    (0..32)
        .map(|_| {
            x ^= x >> 29;
            x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x ^= x >> 32;
            ALPHABET[(x % 32) as usize] as char
        })
        .collect()
}

fn drv_path(i: usize) -> StorePath {
    StorePath::parse(&format!("/nix/store/{}-d{i}.drv", hash32(1, i))).unwrap()
}

fn out_path(i: usize) -> OutputPath {
    OutputPath::parse(&format!("/nix/store/{}-d{i}", hash32(2, i))).unwrap()
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
        cross_check_builds: false,
        entry: Default::default(),
        stage_of: None,
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
        credential: Default::default(),
        admitted_at: 0,
        token_digest: String::new(),
        holds_outputs: true,
        holds_in_builder_store: true,
        takes_farm_cache_token: true,
        has_farm_cache: true,
        run_caches: vec![],
    }
}

/// The outcome a build answered with `outcome` is recorded with, when it is a failure.
fn failing_kind(outcome: Outcome) -> Option<BuildOutcome> {
    match outcome {
        Outcome::Built => None,
        // The model's agents never drain or pause: a build they cancel while its run goes
        // on counts as an infrastructure failure (`unasked_cancel`).
        Outcome::Cancelled => Some(BuildOutcome::InfraFailed),
        Outcome::BuildFailed => Some(BuildOutcome::BuildFailed),
        // No generated derivation is fixed-output: a mismatch reported for one fits no
        // declared hash, and counts as a failed build.
        Outcome::HashMismatch => Some(BuildOutcome::BuildFailed),
        Outcome::TimedOut => Some(BuildOutcome::TimedOut),
        // Outputs that are not the derivation's count as an infrastructure failure.
        Outcome::InfraFailed | Outcome::ForeignOutputs => Some(BuildOutcome::InfraFailed),
    }
}

/// Whether an outcome is a failure a dependency can fail with.
fn is_failing_kind(kind: BuildOutcome) -> bool {
    matches!(
        kind,
        BuildOutcome::BuildFailed
            | BuildOutcome::HashMismatch
            | BuildOutcome::TimedOut
            | BuildOutcome::InfraFailed
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
    failure_evidence: BTreeMap<usize, HashSet<BuildOutcome>>,
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

#[path = "engine_model/checks.rs"]
mod checks;
#[path = "engine_model/steps.rs"]
mod steps;
#[path = "engine_model/world.rs"]
mod world;
use checks::{diff_snapshots, outcome_text};

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

/// Invariant 2.
#[test]
fn a_build_an_agent_keeps_cancelling_unasked_fails_its_dependents() {
    // d1 needs d0; a second run of the same repository is submitted meanwhile. The agent
    // answers d0 with "cancelled" (neither draining nor paused) until the retries are
    // spent: an infrastructure failure, which p0 is dependency-failed on.
    let farm = Farm {
        inputs: vec![BTreeSet::new(), [0].into()],
        packages: vec![(1, false)],
        agents: vec![1],
    };
    replay(
        farm,
        &[
            Step::Submit,
            answer(Outcome::Built),
            answer(Outcome::Built),
            Step::Answer {
                agent: 0,
                pick: 2,
                outcome: Outcome::Built,
            },
            answer(Outcome::Cancelled),
            Step::Answer {
                agent: 0,
                pick: 1,
                outcome: Outcome::Cancelled,
            },
        ],
    );
}
