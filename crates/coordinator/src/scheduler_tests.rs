//! Unit tests of `scheduler.rs`.
use super::*;

fn x86() -> Class {
    Class {
        system: "x86_64-linux".into(),
        features: vec![],
        fetch: false,
    }
}
fn caps() -> Capabilities {
    Capabilities {
        systems: vec!["x86_64-linux".into()],
        features: vec![],
        ..Default::default()
    }
}

#[test]
fn dependencies_gate_readiness_and_shared_inputs_run_once() {
    // lib <- a, lib <- b
    let mut s = Scheduler::new();
    let lib = s.add_node(x86(), 1);
    let a = s.add_node(x86(), 1);
    let b = s.add_node(x86(), 1);
    s.add_edge(a, lib);
    s.add_edge(b, lib);
    s.start();
    assert_eq!(s.pop_for(&caps()), Some(lib));
    assert_eq!(s.pop_for(&caps()), None);
    let mut newly = s.complete(lib);
    newly.sort();
    assert_eq!(newly, vec![a, b]);
    assert!(s.pop_for(&caps()).is_some());
    assert!(s.pop_for(&caps()).is_some());
    assert_eq!(s.pop_for(&caps()), None);
}

#[test]
fn costs_an_agent_could_inflate_do_not_overflow_the_chains() {
    // A chain of builds each reported to have taken u64::MAX ms, and a cheap side branch.
    let mut s = Scheduler::new();
    let chain: Vec<NodeId> = (0..3).map(|_| s.add_node(x86(), u64::MAX)).collect();
    s.add_edge(chain[1], chain[0]);
    s.add_edge(chain[2], chain[1]);
    let cheap = s.add_node(x86(), 1);
    s.start();
    assert_eq!(s.cost(chain[0]), MAX_COST);
    // Still ranked: the long chain first.
    assert_eq!(s.pop_for(&caps()), Some(chain[0]));
    assert_eq!(s.pop_for(&caps()), Some(cheap));
    assert_eq!(s.total_cost(), 3 * MAX_COST + 1);
}

#[test]
fn critical_path_goes_first() {
    let mut s = Scheduler::new();
    let short = s.add_node(x86(), 1);
    let long0 = s.add_node(x86(), 1);
    let long1 = s.add_node(x86(), 5);
    s.add_edge(long1, long0);
    s.start();
    assert_eq!(s.priority(long0), 6);
    assert_eq!(s.pop_for(&caps()), Some(long0));
    assert_eq!(s.pop_for(&caps()), Some(short));
    assert_eq!(s.critical_path(), 6);
}

#[test]
fn locality_chooses_among_equally_urgent_nodes_only() {
    // Two chains a0 <- a1 and b0 <- b1 (equal priority), and an urgent c (cost 9).
    let mut s = Scheduler::new();
    let a0 = s.add_node(x86(), 1);
    let a1 = s.add_node(x86(), 1);
    let b0 = s.add_node(x86(), 1);
    let b1 = s.add_node(x86(), 1);
    let c = s.add_node(x86(), 9);
    s.add_edge(a1, a0);
    s.add_edge(b1, b0);
    s.start();
    // The urgent node goes first whatever the score says.
    assert_eq!(
        s.pop_for_preferring(&caps(), |n, _| u32::from(n == b0)),
        Some(c)
    );
    assert_eq!(
        s.pop_for_preferring(&caps(), |n, _| u32::from(n == b0)),
        Some(b0)
    );
    assert_eq!(s.pop_for(&caps()), Some(a0));
    s.complete(a0);
    s.complete(b0);
    // a1 and b1 are equally urgent: the one whose input is "here" is taken.
    // (scored by its inputs, as the engine does)
    let here = |_: NodeId, inputs: &[NodeId]| u32::from(inputs.contains(&b0));
    assert_eq!(s.pop_for_preferring(&caps(), here), Some(b1));
    assert_eq!(s.pop_for_preferring(&caps(), |_, _| 0), Some(a1));
    assert_eq!(s.pop_for_preferring(&caps(), |_, _| 0), None);
}

#[test]
fn failure_propagates_to_all_dependents() {
    let mut s = Scheduler::new();
    let a = s.add_node(x86(), 1);
    let b = s.add_node(x86(), 1);
    let c = s.add_node(x86(), 1);
    let other = s.add_node(x86(), 1);
    s.add_edge(b, a);
    s.add_edge(c, b);
    s.start();
    let got = s.pop_for(&caps()).unwrap();
    assert!(got == a || got == other);
    let a_id = if got == a {
        a
    } else {
        s.pop_for(&caps()).unwrap()
    };
    let mut failed = s.fail(a_id);
    failed.sort();
    assert_eq!(failed, vec![b, c]);
    assert_eq!(s.failed_root(c), Some(a));
    assert_eq!(s.state(c), NodeState::DependencyFailed);
}

#[test]
fn routing_by_system_and_features() {
    let mut s = Scheduler::new();
    let kvm = s.add_node(
        Class {
            system: "x86_64-linux".into(),
            features: vec!["kvm".into()],
            fetch: false,
        },
        1,
    );
    let arm = s.add_node(
        Class {
            system: "aarch64-linux".into(),
            features: vec![],
            fetch: false,
        },
        1,
    );
    s.start();
    assert_eq!(s.pop_for(&caps()), None);
    let with_kvm = Capabilities {
        systems: vec!["x86_64-linux".into()],
        features: vec!["kvm".into()],
        ..Default::default()
    };
    assert_eq!(s.pop_for(&with_kvm), Some(kvm));
    assert_eq!(s.ready_classes()[0].system, "aarch64-linux");
    let _ = arm;
}

#[test]
fn restore_skips_finished_work() {
    let mut s = Scheduler::new();
    let a = s.add_node(x86(), 1);
    let b = s.add_node(x86(), 1);
    s.add_edge(b, a);
    s.restore(a, NodeState::Built, None);
    s.start();
    assert_eq!(s.pop_for(&caps()), Some(b));
    assert_eq!(s.unfinished(), 1);
    s.complete(b);
    assert_eq!(s.unfinished(), 0);
}

#[test]
fn requeue_and_idempotent_completion() {
    let mut s = Scheduler::new();
    let a = s.add_node(x86(), 1);
    s.start();
    assert_eq!(s.pop_for(&caps()), Some(a));
    s.requeue(a);
    assert_eq!(s.pop_for(&caps()), Some(a));
    s.complete(a);
    assert!(s.complete(a).is_empty());
    assert!(s.fail(a).is_empty());
    assert_eq!(s.state(a), NodeState::Built);
    assert_eq!(s.running(), 0);
}

#[test]
fn a_later_chunk_joins_a_running_graph() {
    // First chunk: lib (builds) and bad (fails). Later chunk: app <- lib, broken <- bad,
    // top <- app (with the longest chain, so it goes first among its peers).
    let mut s = Scheduler::new();
    let lib = s.add_node(x86(), 1);
    let bad = s.add_node(x86(), 1);
    s.start();
    assert_eq!(s.pop_for(&caps()), Some(lib));
    assert_eq!(s.pop_for(&caps()), Some(bad));
    s.complete(lib);
    assert!(s.fail(bad).is_empty());
    let from = s.len() as NodeId;
    let app = s.add_node(x86(), 1);
    let broken = s.add_node(x86(), 1);
    let top = s.add_node(x86(), 1);
    let lone = s.add_node(x86(), 1);
    s.add_edge(app, lib);
    s.add_edge(broken, bad);
    s.add_edge(top, app);
    let failed = s.extend(from);
    assert_eq!(failed, vec![(broken, bad)]);
    assert_eq!(s.state(broken), NodeState::DependencyFailed);
    assert_eq!(s.priority(app), 2, "app's chain includes top");
    // app (its input already built) goes before the lone node of lower priority.
    assert_eq!(s.pop_for(&caps()), Some(app));
    assert_eq!(s.pop_for(&caps()), Some(lone));
    assert_eq!(s.pop_for(&caps()), None, "top waits for app");
    assert_eq!(s.complete(app), vec![top]);
    assert_eq!(s.pop_for(&caps()), Some(top));
    s.complete(top);
    s.complete(lone);
    assert_eq!(s.unfinished(), 0);
}

#[test]
fn a_later_chunk_raises_the_priority_of_what_it_needs() {
    // First chunk: two independent nodes. A later chunk hangs a long chain on `shared`: it
    // must now go before `lone`.
    let mut s = Scheduler::new();
    let lone = s.add_node(x86(), 1);
    let shared = s.add_node(x86(), 1);
    s.start();
    let from = s.len() as NodeId;
    let a = s.add_node(x86(), 1);
    let b = s.add_node(x86(), 1);
    s.add_edge(a, shared);
    s.add_edge(b, a);
    assert!(s.extend(from).is_empty());
    assert_eq!(s.priority(shared), 3);
    assert_eq!(s.pop_for(&caps()), Some(shared));
    assert_eq!(s.pop_for(&caps()), Some(lone));
    assert_eq!(
        s.pop_for(&caps()),
        None,
        "the stale entry of shared is skipped"
    );
}

#[test]
fn only_a_chain_far_shorter_than_the_longest_yields_the_cpu() {
    // src <- lib <- app (a chain of 30), a lone node of cost 2 and one of 3. A later chunk
    // hangs a chain of 300 more on the lone one of cost 2.
    let mut s = Scheduler::new();
    let src = s.add_node(x86(), 10);
    let lib = s.add_node(x86(), 10);
    let app = s.add_node(x86(), 10);
    let lone = s.add_node(x86(), 2);
    let near = s.add_node(x86(), 3);
    s.add_edge(lib, src);
    s.add_edge(app, lib);
    s.start();
    assert!(!s.may_yield_cpu(src), "the longest chain");
    assert!(s.may_yield_cpu(lone), "2 x 10 < 30");
    assert!(
        !s.may_yield_cpu(near),
        "3 x 10 = 30: at a tenth of the CPU it could hold the run up"
    );
    assert_eq!(s.pop_for(&caps()), Some(src));
    s.complete(src);
    // 20 left on the chain.
    assert!(!s.may_yield_cpu(lone), "2 x 10 = 20");
    let from = s.len() as NodeId;
    let a = s.add_node(x86(), 100);
    let b = s.add_node(x86(), 100);
    let c = s.add_node(x86(), 100);
    s.add_edge(a, lone);
    s.add_edge(b, a);
    s.add_edge(c, b);
    assert!(s.extend(from).is_empty());
    assert!(!s.may_yield_cpu(lone), "raised to 302");
    assert!(s.may_yield_cpu(lib), "20 x 10 < 302");
    assert!(s.may_yield_cpu(near), "3 x 10 < 302");
    for n in [lone, a, b] {
        assert_eq!(s.pop_for(&caps()), Some(n));
        s.complete(n);
    }
    // 100 left there, 20 on the chain.
    assert!(!s.may_yield_cpu(lib), "20 x 10 > 100");
    assert_eq!(s.pop_for(&caps()), Some(c));
    s.complete(c);
    assert!(!s.may_yield_cpu(near), "3 x 10 > 20");
}

#[test]
fn a_fetch_never_takes_a_build_slot_and_a_build_never_a_fetch_slot() {
    // A more urgent fetch (it gates a long chain) and a build, both ready.
    let fetch = Class {
        fetch: true,
        ..x86()
    };
    let mut s = Scheduler::new();
    let src = s.add_node(fetch, 10);
    let chain = s.add_node(x86(), 100);
    let pkg = s.add_node(x86(), 1);
    s.add_edge(chain, src);
    s.start();
    // Fetch slots full: the free build slot goes to the build, the fetch waits.
    let builds = Capabilities {
        builds_only: true,
        ..caps()
    };
    assert_eq!(s.pop_for(&builds), Some(pkg));
    assert_eq!(s.pop_for(&builds), None);
    // Build slots full: only the fetch.
    let fetches = Capabilities {
        fetches_only: true,
        ..caps()
    };
    assert_eq!(s.pop_for(&fetches), Some(src));
}
