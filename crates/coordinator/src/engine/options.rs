//! The engine's tunables, and their defaults.

/// Tunables of the engine (the config file's `[scheduler]` part).
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Attributes per evaluation task.
    pub eval_chunk_size: usize,
    /// A listing of at most this many attributes evaluates them itself (0: never).
    pub list_eval_max: u32,
    /// Memory cap per evaluation worker, MiB.
    pub eval_memory_mib: u64,
    /// Infrastructure failures tolerated per job before it is reported infra-failed.
    pub max_infra_retries: i64,
    /// Runs evaluating or building at once.
    pub max_runs_in_flight: usize,
    /// Milliseconds without any message after which an agent's jobs are requeued.
    pub lease_ms: i64,
    /// Agents remembered at most (connected or not): a new name past it is refused unless
    /// a disconnected, idle one can be forgotten to make room. Default 10,000.
    pub max_agents: usize,
    /// How long a disconnected agent with nothing running is remembered, ms. Default 7 days.
    pub agent_retention_ms: i64,
    /// Accept flake references agents resolve on their own disk (`path:`, `git+file:`, …).
    pub allow_local_flake_refs: bool,
    /// The caches runs may name; empty: any (config `run_caches`).
    pub run_caches: Vec<String>,
    /// The public keys runs may name; empty: any (config `run_cache_keys`).
    pub run_cache_keys: Vec<String>,
    /// Of equally urgent derivations, give an agent the one whose inputs it built.
    pub locality: bool,
    /// Every evaluation task is answered by two different agents and taken only when both
    /// agree (engine/opinions.rs).
    pub cross_check_eval: bool,
    /// Every input-addressed derivation built is built again by a different agent, which
    /// compares its outputs with the cache's (engine/checks.rs).
    pub cross_check_builds: bool,
    /// Longest wait for a second agent's answer or check, ms.
    pub cross_check_wait_ms: i64,
    /// The agents share one store (`nixfarm local`): cross-checked builds can keep
    /// unchecked outputs out of a run's own cache without the farm cache (see [`Hold`]).
    pub agents_share_store: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            eval_chunk_size: 16,
            list_eval_max: 32,
            eval_memory_mib: 4096,
            max_infra_retries: 3,
            max_runs_in_flight: 64,
            lease_ms: 60_000,
            max_agents: 10_000,
            agent_retention_ms: 7 * 24 * 3600 * 1000,
            allow_local_flake_refs: false,
            run_caches: Vec::new(),
            run_cache_keys: Vec::new(),
            locality: true,
            cross_check_eval: false,
            cross_check_builds: false,
            agents_share_store: false,
            cross_check_wait_ms: 600_000,
        }
    }
}
