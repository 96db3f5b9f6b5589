//! What a derivation needs of the agent that builds it (its class) and what an agent offers
//! (its capabilities): the scheduler matches the one to the other.

/// What a node needs of the agent that builds it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Class {
    pub system: String,
    /// Sorted, deduplicated.
    pub features: Vec<String>,
    /// A fixed-output derivation: a fetch, mostly waiting on the network.
    pub fetch: bool,
}

/// What an agent offers.
#[derive(Debug, Clone, Default)]
pub struct Capabilities {
    pub systems: Vec<String>,
    pub features: Vec<String>,
    /// Only fetches (its build slots are full, its fetch slots are not).
    pub fetches_only: bool,
    /// Only builds (its fetch slots are full, its build slots are not): a fetch never takes
    /// a build slot, where it would hold back a build that becomes ready meanwhile.
    pub builds_only: bool,
}

impl Capabilities {
    pub fn can_build(&self, class: &Class) -> bool {
        // `builtin` derivations (builtin:fetchurl and the like) run on any Nix.
        (class.system == "builtin" || self.systems.contains(&class.system))
            && class.features.iter().all(|f| self.features.contains(f))
            && (class.fetch || !self.fetches_only)
            && (!class.fetch || !self.builds_only)
    }
}
