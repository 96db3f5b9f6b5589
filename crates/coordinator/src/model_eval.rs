//! What evaluation leaves waiting on a second opinion or a follow-up: the first answer to a
//! cross-checked task, and the repository checks a listing agent still owes.

use std::collections::BTreeMap;

/// With cross-checked evaluation, the first of an evaluation task's two answers: which agent
/// gave it and what it said, to be compared with the second agent's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvalOpinion {
    /// The evaluation task (-1: the attribute listing).
    pub task: i64,
    pub agent: String,
    /// What admitted that agent when it answered: the second answer must come from another
    /// credential.
    pub credential: crate::credentials::Credential,
    /// SHA-256 (hex) of what it lists (for a task: of nothing).
    pub digest: String,
    /// SHA-256 (hex) of what it evaluated, over everything honest agents must agree on;
    /// None: a listing that evaluated nothing itself.
    pub evaluated: Option<String>,
    /// The derivations it said a cache already holds (warm mode): taken only where the
    /// other agent said so too.
    pub present: Vec<crate::model::StorePath>,
    /// Each attribute and the derivation it evaluated to (or why not), for the message
    /// when the answers differ.
    pub summary: BTreeMap<String, String>,
    /// How often the task was asked again because two answers differed only where one of
    /// them failed to evaluate (bounded; kept, so a restart does not start it afresh).
    pub one_sided: u32,
    /// Where it said each attribute is defined (`file:line` in the repository): left out
    /// of the digests, and kept only where the second answer says the same.
    pub positions: BTreeMap<String, String>,
}

/// Repository checks a listing agent owes a run (the flake's other outputs, checked after
/// it sent the listing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwedChecks {
    /// The listing attempt they follow.
    pub attempt: String,
    pub agent: String,
    /// When the run stops waiting for them, ms.
    pub until_ms: i64,
}
