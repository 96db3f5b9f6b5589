//! Scheduler benchmark: a synthetic 100,000-derivation graph shaped like nixpkgs (a long
//! bootstrap chain, core libraries everything fans in to, a long tail of packages, a few
//! heavy roots), scheduled onto 1,000 simulated agents in a discrete-event simulation.
//!
//! Prints scheduling decisions per second (target ≥ 50,000/s) and the makespan against the
//! lower bound max(critical path, total work / agents, per-class work / eligible agents)
//! (target within 5%). Run: `cargo bench -p nixfarm-coordinator --bench scheduler`.

use nixfarm_coordinator::scheduler::{Capabilities, Class, NodeId, Scheduler};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

const NODES: usize = 100_000;
const AGENTS: usize = 1_000;

/// A small deterministic PRNG (xorshift), so every run builds the same graph.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// Build time: most derivations take seconds, a few take very long.
    fn cost(&mut self) -> u64 {
        match self.below(1000) {
            0..=899 => 1 + self.below(20),
            900..=989 => 20 + self.below(200),
            _ => 200 + self.below(2000),
        }
    }
}

fn class(system: &str, features: &[&str]) -> Class {
    Class {
        system: system.into(),
        features: features.iter().map(|s| s.to_string()).collect(),
        fetch: false,
    }
}

fn build_graph(rng: &mut Rng) -> Scheduler {
    let mut s = Scheduler::new();
    let plain = class("x86_64-linux", &[]);
    let big = class("x86_64-linux", &["big-parallel"]);
    let kvm = class("x86_64-linux", &["kvm"]);
    // Bootstrap: a chain of 60 stages (stdenv), each depending on the one before.
    let chain = 60;
    for i in 0..chain {
        let id = s.add_node(plain.clone(), 5 + rng.below(30));
        if i > 0 {
            s.add_edge(id, id - 1);
        }
    }
    let stdenv = (chain - 1) as NodeId;
    // Core libraries: depend on stdenv and on a few earlier core libraries.
    let core = 3_000;
    for i in 0..core {
        let id = s.add_node(plain.clone(), rng.cost());
        s.add_edge(id, stdenv);
        // Ten tiers (glibc, then openssl, then curl, …): a library depends on lower tiers.
        let tier = i / (core / 10);
        for _ in 0..rng.below(4) {
            if tier > 0 {
                s.add_edge(
                    id,
                    chain as NodeId + rng.below((tier * (core / 10)) as u64) as NodeId,
                );
            }
        }
    }
    // The long tail: packages depending on popular libraries (low indices are more popular)
    // and sometimes on other packages, making long dependency chains.
    let first_pkg = chain + core;
    let heavy_roots = 8;
    for i in first_pkg..NODES - heavy_roots {
        let r = rng.below(100);
        let c = if r < 3 {
            &big
        } else if r < 4 {
            &kvm
        } else {
            &plain
        };
        let id = s.add_node(c.clone(), rng.cost());
        s.add_edge(id, stdenv);
        for _ in 0..1 + rng.below(6) {
            let x = rng.below(core as u64);
            let lib = (x * x / core as u64) as NodeId; // skewed to popular libraries
            s.add_edge(id, chain as NodeId + lib);
        }
        // Packages come in five layers; a package may depend on one from an earlier layer.
        let layer_len = (NODES - heavy_roots - first_pkg) / 5;
        let layer = (i - first_pkg) / layer_len;
        if layer > 0 && rng.below(3) == 0 {
            let dep = first_pkg as u64 + rng.below((layer * layer_len) as u64);
            s.add_edge(id, dep as NodeId);
        }
    }
    // Heavy roots (think chromium, a NixOS test suite): many inputs, long builds.
    for _ in 0..heavy_roots {
        let id = s.add_node(big.clone(), 1_000 + rng.below(1_000));
        for _ in 0..200 {
            s.add_edge(
                id,
                (first_pkg as u64 + rng.below((NODES - heavy_roots - first_pkg) as u64)) as NodeId,
            );
        }
    }
    s
}

fn main() {
    // 1,000 agents (the target); 100 agents, where total work rather than the critical path
    // binds, so the scheduler's packing is measured too.
    for agents in [AGENTS, 100] {
        simulate(agents);
    }
}

fn simulate(agents_n: usize) {
    let mut rng = Rng(0x9e3779b97f4a7c15);
    let t0 = Instant::now();
    let mut s = build_graph(&mut rng);
    s.start();
    let build_time = t0.elapsed();
    // Agents: all x86_64-linux; 10% offer big-parallel, 5% kvm.
    let profiles = [
        Capabilities {
            systems: vec!["x86_64-linux".into()],
            features: vec![],
            ..Default::default()
        },
        Capabilities {
            systems: vec!["x86_64-linux".into()],
            features: vec!["big-parallel".into()],
            ..Default::default()
        },
        Capabilities {
            systems: vec!["x86_64-linux".into()],
            features: vec!["kvm".into()],
            ..Default::default()
        },
    ];
    let agent_profile: Vec<usize> = (0..agents_n)
        .map(|i| {
            if i % 10 == 0 {
                1
            } else if i % 20 == 5 {
                2
            } else {
                0
            }
        })
        .collect();
    let eligible = |c: &Class| {
        agent_profile
            .iter()
            .filter(|&&p| profiles[p].can_build(c))
            .count() as u64
    };

    // Lower bound.
    let critical = s.critical_path();
    let total = s.total_cost();
    let mut per_class: std::collections::HashMap<Class, u64> = Default::default();
    for i in 0..s.len() as NodeId {
        *per_class.entry(s.class(i).clone()).or_default() += s.cost(i);
    }
    let class_bound = per_class
        .iter()
        .map(|(c, w)| w.div_ceil(eligible(c)))
        .max()
        .unwrap_or(0);
    let bound = critical
        .max(total.div_ceil(agents_n as u64))
        .max(class_bound);

    // Discrete-event simulation.
    let mut idle: Vec<Vec<usize>> = vec![Vec::new(); profiles.len()];
    for (a, &p) in agent_profile.iter().enumerate() {
        idle[p].push(a);
    }
    let mut events: BinaryHeap<Reverse<(u64, NodeId, usize)>> = BinaryHeap::new();
    let mut now = 0u64;
    let mut decisions = 0u64;
    let mut sched_time = std::time::Duration::ZERO;
    loop {
        let t = Instant::now();
        if s.has_ready() {
            for (p, caps) in profiles.iter().enumerate() {
                while let Some(&agent) = idle[p].last() {
                    match s.pop_for(caps) {
                        Some(n) => {
                            idle[p].pop();
                            decisions += 1;
                            events.push(Reverse((now + s.cost(n), n, agent)));
                        }
                        None => break,
                    }
                }
            }
        }
        sched_time += t.elapsed();
        let Some(Reverse((at, n, agent))) = events.pop() else {
            break;
        };
        now = at;
        let t = Instant::now();
        s.complete(n);
        sched_time += t.elapsed();
        idle[agent_profile[agent]].push(agent);
    }
    assert_eq!(s.unfinished(), 0, "every derivation was scheduled");
    let per_sec = decisions as f64 / sched_time.as_secs_f64();
    let ratio = now as f64 / bound as f64;
    println!(
        "scheduler benchmark: {NODES} derivations, {agents_n} agents (graph built in {:.0} ms)",
        build_time.as_secs_f64() * 1000.0
    );
    println!("  decisions:            {decisions}");
    println!(
        "  scheduler time:       {:.1} ms",
        sched_time.as_secs_f64() * 1000.0
    );
    println!(
        "  decisions per second: {per_sec:.0} (target >= 50000): {}",
        if per_sec >= 50_000.0 { "ok" } else { "MISSED" }
    );
    println!("  critical path:        {critical}");
    println!(
        "  total work / agents:  {}",
        total.div_ceil(agents_n as u64)
    );
    println!("  per-class bound:      {class_bound}");
    println!("  makespan:             {now}");
    println!(
        "  makespan / bound:     {ratio:.4} (target <= 1.05): {}",
        if ratio <= 1.05 { "ok" } else { "MISSED" }
    );
}
