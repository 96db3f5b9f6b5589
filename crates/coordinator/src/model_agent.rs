//! What agents and the coordinator say to each other once an agent is registered, as domain
//! types: its reports, the jobs it is handed.

use nixfarm_nix::StorePath;

use crate::model::{
    AgentFailure, BuildReport, EntrySpec, EvalChunkOutput, Hold, NarHash, SourceSpec,
};

/// Messages an agent sends after registering.
#[derive(Debug, Clone, PartialEq)]
pub enum FromAgent {
    Heartbeat {
        running: Vec<String>,
        /// Set once the agent drains; it stays set until the agent registers again.
        draining: bool,
        /// Why the agent takes no new jobs for now (its disk is full); empty: it takes them.
        paused: String,
    },
    Log {
        attempt: String,
        data: Vec<u8>,
    },
    EvalList {
        attempt: String,
        /// The attributes, and the flake's other outputs checked.
        result: Result<(Vec<String>, Vec<nixfarm_core::report::RepoCheck>), (String, bool)>,
        /// The other outputs are still being checked: a [`FromAgent::RepoChecks`] for the same
        /// attempt follows, and the run does not end before it comes (or the agent is lost).
        follows: bool,
        /// Some of the attributes, evaluated by the listing itself (a small repository).
        evaluated: Option<EvalChunkOutput>,
    },
    /// The flake's other outputs, checked, after an `EvalList` that said they follow.
    RepoChecks {
        attempt: String,
        checks: Vec<nixfarm_core::report::RepoCheck>,
    },
    EvalChunk {
        attempt: String,
        result: Result<EvalChunkOutput, AgentFailure>,
    },
    Build {
        attempt: String,
        report: BuildReport,
    },
}

/// The limits a run's builds get where their package sets none (seconds, 0: none), told to
/// the agents that evaluate it: they start daemons with them ahead of the builds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BuildLimits {
    pub timeout_secs: u64,
    pub max_silent_secs: u64,
}

/// Work the coordinator hands to an agent.
#[derive(Debug, Clone, PartialEq)]
pub enum Job {
    EvalList {
        source: SourceSpec,
        entry: Box<EntrySpec>,
        attr_path: String,
        /// Memory cap of the listing process, MiB (0: none).
        memory_mib: u64,
        /// At most this many attributes are evaluated by the listing itself (0: none).
        evaluate_up_to: u32,
        /// For what the listing evaluates: as for [`Job::EvalChunk`].
        cache: String,
        skip_cached: bool,
        /// The run's limits for builds: see [`BuildLimits`].
        build_limits: BuildLimits,
        /// The keys the run's builds trust: the daemons started ahead of them get them too.
        trusted_public_keys: Vec<String>,
    },
    EvalChunk {
        source: SourceSpec,
        entry: Box<EntrySpec>,
        attr_path: String,
        attrs: Vec<String>,
        /// Every one of `attrs` threw when the listing evaluated it: this task only learns
        /// their messages, so the agent runs it behind the run's builds.
        listed_as_throwing: bool,
        cache: String,
        memory_mib: u64,
        skip_cached: bool,
        build_limits: BuildLimits,
        trusted_public_keys: Vec<String>,
    },
    Build {
        drv_path: StorePath,
        cache: String,
        trusted_public_keys: Vec<String>,
        timeout_secs: u64,
        max_silent_secs: u64,
        /// Smoke-test the result: the main program's name (empty: the only one in bin/).
        smoke: Option<String>,
        /// Its chain is far shorter than the run's longest remaining one: built at a lower
        /// CPU priority.
        background: bool,
        /// Cross-checked builds: build again what another agent built and pushed, and
        /// compare (nothing is pushed, unless `hold`).
        check: bool,
        /// Cross-checked builds of a run with a cache of its own: nothing unchecked goes to
        /// `cache`. A build's outputs wait where this says; its check fetches them from
        /// there and publishes its own copy.
        hold: Hold,
        /// A check of outputs held in the builder's store: (output name, path, NAR hash)
        /// as that build reported them.
        expect: Vec<(String, StorePath, NarHash)>,
    },
}

/// Messages the coordinator sends an agent.
#[derive(Debug, Clone, PartialEq)]
pub enum ToAgent {
    Assign {
        attempt: String,
        run_id: String,
        job: Job,
    },
    Cancel {
        attempt: String,
    },
    Drain,
    /// The run ended: the agent may drop its GC roots and sources.
    RunEnded {
        run_id: String,
    },
    /// The agent is shut out (what admitted it was taken back): its stream ends with this
    /// refusal.
    CutOff {
        why: String,
    },
}
