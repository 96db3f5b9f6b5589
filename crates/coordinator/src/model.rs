//! The coordinator's domain types: run specifications, what agents report, what the
//! coordinator assigns. The gRPC layer converts wire messages into these at the edge.

pub use nixfarm_core::{BuildOutcome, Sri};
pub use nixfarm_nix::{OutputPath, StorePath};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub use crate::model_agent::{BuildLimits, FromAgent, Job, ToAgent};
pub use crate::model_eval::{EvalOpinion, OwedChecks};

/// What an attempt does (stored per attempt).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttemptKind {
    /// List the attribute names of the run's attribute path.
    EvalList,
    /// Evaluate one chunk of attributes.
    EvalChunk,
    /// Build one derivation.
    Build,
    /// Build again a derivation another agent built, to compare its outputs.
    Check,
}

/// Where an attempt stands (stored per attempt).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttemptState {
    Running,
    /// Its result came back (the outcome is stored beside it).
    Done,
    /// Its agent vanished, or the coordinator restarted after its run ended.
    Lost,
}

/// Stored spellings of the small enums, one table each: `as_str` and `parse` cannot drift.
macro_rules! spelled {
    ($t:ty { $($v:ident = $s:literal),* $(,)? }) => {
        impl $t {
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$v => $s),* }
            }
            pub fn parse(s: &str) -> Option<Self> {
                match s { $($s => Some(Self::$v),)* _ => None }
            }
        }
    };
}

spelled!(AttemptKind {
    EvalList = "eval-list",
    EvalChunk = "eval-chunk",
    Build = "build",
    Check = "check",
});
spelled!(AttemptState { Running = "running", Done = "done", Lost = "lost" });

/// Where a derivation of a run stands (stored per derivation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DrvState {
    /// Not finished: waiting on inputs, queued or building.
    Waiting,
    /// Its outputs exist (built, substituted, or already in the cache).
    Built,
    /// Its own build failed (the stored result says how).
    Failed,
    /// A dependency failed (the stored result names it).
    DependencyFailed,
    Cancelled,
}

spelled!(DrvState {
    Waiting = "waiting",
    Built = "built",
    Failed = "failed",
    DependencyFailed = "dependency-failed",
    Cancelled = "cancelled",
});

/// Where a run's flake comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceSpec {
    /// An uploaded snapshot, by hex SHA-256.
    Snapshot(String),
    /// A flake reference agents fetch themselves.
    FlakeRef(String),
}

/// What a user submitted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSpec {
    pub source: SourceSpec,
    pub attr_path: String,
    pub label: String,
    /// Binary cache URL the agents share (empty: the agents share one store).
    #[serde(default)]
    pub cache: String,
    #[serde(default)]
    pub trusted_public_keys: Vec<String>,
    /// Default build timeout, seconds (0: none).
    #[serde(default)]
    pub timeout_secs: u64,
    /// Default max-silent time, seconds (0: none).
    #[serde(default)]
    pub max_silent_secs: u64,
    /// Only these attributes (empty: all of the attribute path).
    #[serde(default)]
    pub attrs: Vec<String>,
    /// Do not build what the cache already has.
    #[serde(default)]
    pub skip_cached: bool,
    /// `attrs` are known to exist: evaluated without listing the attribute path first.
    #[serde(default)]
    pub skip_listing: bool,
    /// Run each built package's main program (smoke tests).
    #[serde(default)]
    pub smoke: bool,
    /// Have every build checked by a second agent (the coordinator may do it for every run).
    #[serde(default)]
    pub cross_check_builds: bool,
    /// A Nix file of the snapshot to evaluate instead of its flake.
    #[serde(default)]
    pub entry: EntrySpec,
    /// The run this one is a hash-fixing stage of (the session's first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage_of: Option<String>,
}

/// A Nix file evaluated instead of the flake (`--file default.nix`), and its arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct EntrySpec {
    /// Relative to the snapshot's root; empty: the flake.
    #[serde(default)]
    pub file: String,
    /// (name, value, literal): `--argstr` when literal, else `--arg` (a Nix expression).
    #[serde(default)]
    pub args: Vec<(String, String, bool)>,
    /// For a flake: (input, flake reference) overridden, as `--override-input`.
    #[serde(default)]
    pub overrides: Vec<(String, String)>,
    /// For a flake in a subdirectory of its snapshot: that directory (empty: the root).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub flake_dir: String,
}

/// What an agent offers when it registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub name: String,
    pub systems: Vec<String>,
    pub features: Vec<String>,
    pub max_jobs: u32,
    pub nix_version: String,
    pub running_attempts: Vec<String>,
    /// The session key of the agent's previous registration (empty: none). A secret: never
    /// stored or logged.
    #[serde(skip)]
    pub session_key: String,
    /// What admitted it (set by the coordinator from the connection, never from the wire):
    /// cross-checks count two agents only when their credentials differ.
    #[serde(default)]
    pub credential: crate::credentials::Credential,
    /// When its token was checked (the tokens' generation then; 0 for other credentials):
    /// a token taken back since refuses the registration.
    #[serde(skip)]
    pub admitted_at: u64,
    /// SHA-256 (hex) of the token that admitted it (empty: none, or kept by an older
    /// coordinator): kept, so that a restart tells a token replaced meanwhile.
    #[serde(default)]
    pub token_digest: String,
    /// It keeps held outputs out of a run's cache (agents before `hold` do not).
    #[serde(default)]
    pub holds_outputs: bool,
    /// It also holds them in its own store, reporting their NAR hashes, and checks such
    /// outputs by building them again ([`Hold::BuilderStore`]).
    #[serde(default)]
    pub holds_in_builder_store: bool,
    /// It shows the farm cache the token issued at registration (agents before that show
    /// only a token of their own).
    #[serde(default)]
    pub takes_farm_cache_token: bool,
    /// It was told of the farm cache and can get in there (set by the coordinator when it
    /// registers, never from the wire): an agent that cannot is handed nothing that waits
    /// in it.
    #[serde(default)]
    pub has_farm_cache: bool,
    /// The run caches it substitutes from (its operator's list; empty: any): it takes part
    /// only in runs with one of them, or with none of their own.
    #[serde(default)]
    pub run_caches: Vec<String>,
}

impl Registration {
    /// Whether it may build or check outputs held `hold`.
    pub fn can_hold(&self, hold: Hold) -> bool {
        match hold {
            Hold::No => true,
            Hold::FarmCache => self.holds_outputs && self.has_farm_cache,
            Hold::SharedStore => self.holds_outputs,
            Hold::BuilderStore => self.holds_outputs && self.holds_in_builder_store,
        }
    }
}

/// Where a cross-checked build's outputs wait for their check when its run has a cache of
/// its own (nothing unchecked goes there). Stored as its number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[repr(i64)]
pub enum Hold {
    /// Not held: pushed to the run's cache at once (no cross-check, no cache of the run's
    /// own, or a fixed output).
    #[default]
    No = 0,
    /// In the coordinator's farm cache, which only agents read.
    FarmCache = 1,
    /// In the store the agents share (`nixfarm local`).
    SharedStore = 2,
    /// In the building agent's own store, when the agents share nothing else (no farm
    /// cache): only its NAR hashes travel; the check builds the derivation again from
    /// scratch, and publishes its copy if the hashes are the same.
    BuilderStore = 3,
}

impl Hold {
    pub fn held(self) -> bool {
        self != Hold::No
    }
}

impl TryFrom<i64> for Hold {
    type Error = i64;
    fn try_from(n: i64) -> Result<Self, i64> {
        match n {
            0 => Ok(Hold::No),
            1 => Ok(Hold::FarmCache),
            2 => Ok(Hold::SharedStore),
            3 => Ok(Hold::BuilderStore),
            n => Err(n),
        }
    }
}

/// A derivation's outputs: each output's name and where it goes.
pub type Outputs = BTreeMap<String, OutputPath>;

/// A derivation in a run's graph.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DrvNode {
    pub system: String,
    #[serde(default)]
    pub features: Vec<String>,
    pub outputs: Outputs,
    #[serde(default)]
    pub input_drvs: Vec<StorePath>,
    #[serde(default)]
    pub fixed_output: bool,
    #[serde(default)]
    pub output_hash: String,
    /// Fixed-output derivations: what identifies the fetch (name, rev, url…).
    #[serde(default)]
    pub hints: Vec<String>,
    /// Outputs already available (warm mode): not built.
    #[serde(default)]
    pub present: bool,
}

/// What evaluation found for one attribute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PackageInfo {
    #[serde(default)]
    pub eval_error: String,
    /// None: it did not evaluate to a derivation.
    #[serde(default, with = "nixfarm_nix::store_path::or_empty")]
    pub drv_path: Option<StorePath>,
    #[serde(default)]
    pub outputs: Outputs,
    #[serde(default)]
    pub pname: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub position: String,
    #[serde(default)]
    pub rev: String,
    #[serde(default)]
    pub system: String,
    #[serde(default)]
    pub timeout_secs: u64,
    #[serde(default)]
    pub max_silent_secs: u64,
    /// meta.mainProgram (empty: none).
    #[serde(default)]
    pub main_program: String,
}

/// One attribute's evaluation as an agent reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvaluatedAttr {
    pub attr: String,
    pub info: PackageInfo,
}

/// The result of one build attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct BuildReport {
    pub kind: BuildOutcome,
    #[serde(default)]
    pub message: String,
    /// A hash mismatch's hashes (with one only; checked at the wire).
    #[serde(default, with = "nixfarm_core::stored_or_empty")]
    pub specified: Option<Sri>,
    #[serde(default, with = "nixfarm_core::stored_or_empty")]
    pub got: Option<Sri>,
    #[serde(default)]
    pub outputs: Outputs,
    #[serde(default)]
    pub duration_ms: u64,
    #[serde(default)]
    pub log_tail: String,
    #[serde(default)]
    pub substituted: bool,
    /// Every output was valid already: nothing ran, so the duration is no build time.
    #[serde(default)]
    pub already_valid: bool,
    #[serde(default)]
    pub agent: String,
    /// For dependency failures: the derivation that failed.
    #[serde(default, with = "nixfarm_core::stored_or_empty")]
    pub failed_root: Option<StorePath>,
    /// For a copied hash: the derivation that really produced the output with that hash.
    #[serde(default, with = "nixfarm_core::stored_or_empty")]
    pub copied_from: Option<StorePath>,
    /// With smoke tests: what running the package's main program showed, and its output.
    #[serde(default)]
    pub smoke: nixfarm_core::Smoke,
    #[serde(default)]
    pub smoke_output: String,
    /// A check build that really built the derivation again and compared its outputs.
    #[serde(default)]
    pub checked: bool,
    /// Outputs held in the builder's store ([`Hold::BuilderStore`]): each output's NAR
    /// hash, by output name, which the check must reproduce.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub nar_hashes: BTreeMap<String, NarHash>,
}

/// The SHA-256 of an output's NAR serialisation: what two builds of it compare. Stored and
/// shown in SRI form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NarHash(pub [u8; 32]);

impl TryFrom<String> for NarHash {
    type Error = String;
    /// SRI or `sha256:` (base-16, Nix's base-32 or base-64); nothing but SHA-256.
    fn try_from(s: String) -> Result<Self, String> {
        use nixfarm_nix::hash::{Algo, Hash};
        Hash::parse(&s, None)
            .filter(|h| h.algo == Algo::Sha256)
            .and_then(|h| <[u8; 32]>::try_from(h.digest).ok())
            .map(NarHash)
            .ok_or_else(|| "not a SHA-256 NAR hash".to_string())
    }
}

impl From<NarHash> for String {
    fn from(h: NarHash) -> String {
        h.to_string()
    }
}

impl std::fmt::Display for NarHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let h = nixfarm_nix::hash::Hash {
            algo: nixfarm_nix::hash::Algo::Sha256,
            digest: self.0.to_vec(),
        };
        f.write_str(&h.to_sri())
    }
}

/// Cross-checked builds: a derivation one agent built, whose result counts once another
/// agent has built it again and got the same outputs.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingCheck {
    pub drv: StorePath,
    /// The agent whose build is to be checked (never the one that checks it).
    pub built_by: String,
    /// What admitted that agent when it built: a checker must hold another credential.
    pub credential: crate::credentials::Credential,
    /// Its result, applied when the check agrees.
    pub report: BuildReport,
    /// When the check was queued (ms, the engine's clock): it waits a bounded time for an
    /// agent that can take it.
    pub queued_ms: i64,
    /// Where the build's outputs wait for the check (its job said so).
    pub hold: Hold,
}

/// A job's failure as an agent reports it: the message, and whether the agent or Nix broke
/// (true) rather than the input being wrong (false).
pub type AgentFailure = (String, bool);

/// What an evaluation task produces: the attributes and the derivation graph below them.
pub type EvalChunkOutput = (Vec<EvaluatedAttr>, BTreeMap<StorePath, DrvNode>);

/// A run event as stored and streamed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunEvent {
    pub run_id: String,
    pub seq: u64,
    pub kind: String,
    pub json: String,
}

/// What `nixfarm agents` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentStatus {
    pub name: String,
    pub systems: Vec<String>,
    pub features: Vec<String>,
    pub max_jobs: u32,
    pub nix_version: String,
    pub connected: bool,
    pub building: Vec<String>,
    pub last_seen_ms: i64,
    pub paused: String,
    pub draining: bool,
    /// Messages refused from it as protocol violations.
    pub violations: u64,
    /// It keeps held outputs out of a run's cache the way this coordinator holds them now
    /// (agents that predate that way do not).
    pub holds_outputs: bool,
    /// The coordinator has a farm cache and this agent was not told of it.
    pub without_farm_cache: bool,
    /// What admitted it (for a certificate, the fingerprint that revokes it).
    pub admitted_by: String,
    /// The run caches its operator listed (empty: any).
    pub run_caches: Vec<String>,
}

/// A line of `nixfarm runs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunListing {
    pub id: String,
    pub state: nixfarm_core::RunState,
    pub label: String,
    pub total: u64,
    pub ready: u64,
    /// Packages per status (kebab-case status name → count).
    pub by_status: std::collections::BTreeMap<nixfarm_core::PackageStatus, u64>,
    pub created_ms: i64,
    /// When it ended (0: still going).
    pub finished_ms: i64,
    /// A run of chosen attributes only (a hash-fixing stage, `--attr`): it says nothing of
    /// the rest of its repository.
    pub partial: bool,
}

/// The name part of a store path (`/nix/store/<hash>-<name>` → `<name>`).
pub fn store_name(path: &str) -> &str {
    let base = path.rsplit('/').next().unwrap_or(path);
    let base = base.strip_suffix(".drv").unwrap_or(base);
    match base.split_once('-') {
        Some((h, n)) if h.len() == 32 => n,
        _ => base,
    }
}

/// A test's store path (it must be one).
#[cfg(test)]
pub(crate) fn sp(s: &str) -> StorePath {
    StorePath::parse(s).expect("a test's store path")
}

/// A test's output path (empty: floating).
#[cfg(test)]
pub(crate) fn op(s: &str) -> OutputPath {
    OutputPath::parse(s).expect("a test's output path")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nar_hash_is_read_in_any_spelling_of_sha256_and_kept_as_sri() {
        let sri = "sha256-AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        let h = NarHash::try_from(sri.to_string()).unwrap();
        assert_eq!(h.0[31], 31);
        assert_eq!(h.to_string(), sri);
        // Nix 2.8's path-info and narinfo files: `sha256:` and base-32.
        let nix32 = nixfarm_nix::hash::Hash {
            algo: nixfarm_nix::hash::Algo::Sha256,
            digest: h.0.to_vec(),
        }
        .to_nix32_prefixed();
        assert_eq!(NarHash::try_from(nix32), Ok(h));
        // Through the database's JSON and back.
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(json, format!("\"{sri}\""));
        assert_eq!(serde_json::from_str::<NarHash>(&json).unwrap(), h);
        for bad in [
            "",
            "sha1-AAECAwQFBgcICQoLDA0ODxAREhM=",
            "sha256-AAEC",
            "md5:00",
        ] {
            assert!(NarHash::try_from(bad.to_string()).is_err(), "{bad}");
            assert!(serde_json::from_str::<NarHash>(&format!("\"{bad}\"")).is_err());
        }
    }
}
