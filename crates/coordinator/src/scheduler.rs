//! The derivation scheduler: a pure, in-memory list scheduler over one run's derivation graph.
//!
//! A derivation becomes ready when all its inputs are built; ready derivations wait in one
//! priority heap per routing class (system plus required features) and are handed out by
//! critical path (the longest chain of work that still depends on them). No I/O happens
//! here, so the benchmark and the coordinator drive the same code.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

/// The largest cost a node is given: 30 days in ms. A chain of even 10 million such nodes
/// stays far below `u64::MAX`, so priorities never overflow.
pub const MAX_COST: u64 = 30 * 24 * 3600 * 1000;

/// How much shorter than the longest remaining chain a build's chain must be for it to
/// run niced ([`Scheduler::may_yield_cpu`]).
const YIELD_FACTOR: u64 = 10;

pub use crate::scheduler_class::{Capabilities, Class};

/// Index of a node in a [`Scheduler`].
pub type NodeId = u32;

/// Where a node is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    /// Inputs not built yet.
    Waiting,
    Ready,
    Running,
    Built,
    Failed,
    /// An input failed; `failed_root` says which.
    DependencyFailed,
    Cancelled,
}

impl NodeState {
    pub fn is_done(self) -> bool {
        matches!(
            self,
            Self::Built | Self::Failed | Self::DependencyFailed | Self::Cancelled
        )
    }
}

#[derive(Debug, Clone)]
struct Node {
    class: u32,
    cost: u64,
    priority: u64,
    deps_left: u32,
    inputs: Vec<NodeId>,
    dependents: Vec<NodeId>,
    state: NodeState,
    failed_root: Option<NodeId>,
}

/// The scheduler for one graph.
#[derive(Debug, Default)]
pub struct Scheduler {
    nodes: Vec<Node>,
    classes: Vec<Class>,
    class_ids: HashMap<Class, u32>,
    ready: Vec<BinaryHeap<(u64, Reverse<NodeId>)>>,
    /// Every node by the priority it was given, highest first: the top unfinished one is
    /// the length of the longest remaining chain. Entries of finished nodes, and stale ones
    /// of raised priorities, are dropped as they come to the top.
    by_priority: BinaryHeap<(u64, NodeId)>,
    unfinished: usize,
    running: usize,
    /// Nodes in the Ready state (the heaps may also hold stale entries).
    ready_count: usize,
}

impl Scheduler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a node; `cost` is its expected build time in any unit (1 when unknown), at most
    /// [`MAX_COST`]: chains of costs add up, and a cost comes from what an agent reported.
    pub fn add_node(&mut self, class: Class, cost: u64) -> NodeId {
        let next = self.classes.len() as u32;
        let cid = *self.class_ids.entry(class.clone()).or_insert_with(|| {
            self.classes.push(class);
            self.ready.push(BinaryHeap::new());
            next
        });
        let id = self.nodes.len() as NodeId;
        self.nodes.push(Node {
            class: cid,
            cost: cost.clamp(1, MAX_COST),
            priority: 0,
            deps_left: 0,
            inputs: Vec::new(),
            dependents: Vec::new(),
            state: NodeState::Waiting,
            failed_root: None,
        });
        self.unfinished += 1;
        id
    }

    /// `node` needs `input` built first.
    pub fn add_edge(&mut self, node: NodeId, input: NodeId) {
        self.nodes[node as usize].inputs.push(input);
        self.nodes[input as usize].dependents.push(node);
    }

    /// Computes priorities and the initial ready set. Call once, after every node and edge
    /// is added, and after [`Self::restore`] for nodes already finished.
    pub fn start(&mut self) {
        for n in &mut self.nodes {
            n.inputs.sort_unstable();
            n.inputs.dedup();
            n.dependents.sort_unstable();
            n.dependents.dedup();
        }
        // Bottom level: own cost plus the most expensive chain of dependents, computed in
        // reverse topological order (Kahn's algorithm over dependents).
        let n = self.nodes.len();
        let mut pending: Vec<u32> = self
            .nodes
            .iter()
            .map(|x| x.dependents.len() as u32)
            .collect();
        let mut stack: Vec<NodeId> = (0..n as NodeId)
            .filter(|&i| pending[i as usize] == 0)
            .collect();
        while let Some(i) = stack.pop() {
            let node = &self.nodes[i as usize];
            let best = node
                .dependents
                .iter()
                .map(|&d| self.nodes[d as usize].priority)
                .max()
                .unwrap_or(0);
            let pri = best + node.cost;
            self.nodes[i as usize].priority = pri;
            let inputs = std::mem::take(&mut self.nodes[i as usize].inputs);
            for &inp in &inputs {
                pending[inp as usize] -= 1;
                if pending[inp as usize] == 0 {
                    stack.push(inp);
                }
            }
            self.nodes[i as usize].inputs = inputs;
        }
        self.by_priority = (0..n as NodeId)
            .map(|i| (self.nodes[i as usize].priority, i))
            .collect();
        for i in 0..n {
            let left = self.nodes[i]
                .inputs
                .iter()
                .filter(|&&inp| self.nodes[inp as usize].state != NodeState::Built)
                .count() as u32;
            self.nodes[i].deps_left = left;
        }
        // Failed inputs propagate, then everything whose inputs are built becomes ready.
        for i in 0..n as NodeId {
            if matches!(
                self.nodes[i as usize].state,
                NodeState::Failed | NodeState::DependencyFailed
            ) {
                let root = self.nodes[i as usize].failed_root.unwrap_or(i);
                self.fail_dependents(i, root);
            }
        }
        for i in 0..n as NodeId {
            let node = &self.nodes[i as usize];
            if node.state == NodeState::Waiting && node.deps_left == 0 {
                self.make_ready(i);
            }
        }
    }

    /// Takes in the nodes from `from` on (added, with their edges, after [`Self::start`]): a
    /// later evaluation chunk's derivations, so builds start before evaluation ends. A chunk
    /// brings whole closures, so no node added earlier gains an input; the new nodes get
    /// their priorities and become ready, or fail at once when an input already failed.
    /// Returns the nodes failed so, each with the failure's root.
    pub fn extend(&mut self, from: NodeId) -> Vec<(NodeId, NodeId)> {
        let n = self.nodes.len();
        let first = from as usize;
        for node in &mut self.nodes {
            node.dependents.sort_unstable();
            node.dependents.dedup();
        }
        for node in &mut self.nodes[first..] {
            node.inputs.sort_unstable();
            node.inputs.dedup();
        }
        // Priorities of the new nodes: every dependent of a new node is new.
        let mut pending: Vec<u32> = (first..n)
            .map(|i| self.nodes[i].dependents.len() as u32)
            .collect();
        let mut stack: Vec<usize> = (first..n).filter(|&i| pending[i - first] == 0).collect();
        let mut order = Vec::with_capacity(n - first);
        while let Some(i) = stack.pop() {
            let best = self.nodes[i]
                .dependents
                .iter()
                .map(|&d| self.nodes[d as usize].priority)
                .max()
                .unwrap_or(0);
            self.nodes[i].priority = best + self.nodes[i].cost;
            self.by_priority.push((self.nodes[i].priority, i as NodeId));
            order.push(i);
            for k in 0..self.nodes[i].inputs.len() {
                let inp = self.nodes[i].inputs[k] as usize;
                if inp >= first {
                    pending[inp - first] -= 1;
                    if pending[inp - first] == 0 {
                        stack.push(inp);
                    }
                }
            }
        }
        // Earlier nodes the new ones depend on now lie on longer chains: raise their
        // priorities (and their inputs'), a ready one with a fresh heap entry (the stale one
        // is skipped when popped).
        let mut raise: Vec<usize> = (first..n).collect();
        while let Some(i) = raise.pop() {
            let pri = self.nodes[i].priority;
            for k in 0..self.nodes[i].inputs.len() {
                let inp = self.nodes[i].inputs[k] as usize;
                let want = pri + self.nodes[inp].cost;
                if inp < first && want > self.nodes[inp].priority {
                    self.nodes[inp].priority = want;
                    self.by_priority.push((want, inp as NodeId));
                    if self.nodes[inp].state == NodeState::Ready {
                        let class = self.nodes[inp].class as usize;
                        self.ready[class].push((want, Reverse(inp as NodeId)));
                    }
                    raise.push(inp);
                }
            }
        }
        // Inputs before dependents: a failure reaches every new node that needs it.
        let mut failed = Vec::new();
        for &i in order.iter().rev() {
            if self.nodes[i].state != NodeState::Waiting {
                continue;
            }
            let broken = self.nodes[i].inputs.iter().find_map(|&inp| {
                let x = &self.nodes[inp as usize];
                matches!(x.state, NodeState::Failed | NodeState::DependencyFailed)
                    .then(|| x.failed_root.unwrap_or(inp))
            });
            if let Some(root) = broken {
                let node = &mut self.nodes[i];
                node.state = NodeState::DependencyFailed;
                node.failed_root = Some(root);
                self.unfinished -= 1;
                failed.push((i as NodeId, root));
                continue;
            }
            let left = self.nodes[i]
                .inputs
                .iter()
                .filter(|&&inp| self.nodes[inp as usize].state != NodeState::Built)
                .count() as u32;
            self.nodes[i].deps_left = left;
            if left == 0 {
                self.make_ready(i as NodeId);
            }
        }
        failed
    }

    /// Marks a node as already finished (restored from the database) before [`Self::start`].
    pub fn restore(&mut self, id: NodeId, state: NodeState, failed_root: Option<NodeId>) {
        let node = &mut self.nodes[id as usize];
        if node.state.is_done() {
            return;
        }
        node.state = state;
        node.failed_root = failed_root;
        if state.is_done() {
            self.unfinished -= 1;
        }
    }

    fn make_ready(&mut self, id: NodeId) {
        let node = &mut self.nodes[id as usize];
        node.state = NodeState::Ready;
        self.ready_count += 1;
        self.ready[node.class as usize].push((node.priority, Reverse(id)));
    }

    /// Whether a node of a class `pred` accepts may be ready (cheap: a queue of such a class
    /// is not empty; it may hold only stale entries).
    pub fn may_have_ready(&self, pred: impl Fn(&Class) -> bool) -> bool {
        self.classes
            .iter()
            .zip(&self.ready)
            .any(|(c, heap)| pred(c) && !heap.is_empty())
    }

    /// The highest-priority ready node that an agent with `caps` can build, now running.
    pub fn pop_for(&mut self, caps: &Capabilities) -> Option<NodeId> {
        let mut best: Option<(u64, NodeId, usize)> = None;
        for (cid, class) in self.classes.iter().enumerate() {
            if !caps.can_build(class) {
                continue;
            }
            let heap = &mut self.ready[cid];
            // Drop stale entries (nodes cancelled while queued).
            while let Some(&(_, Reverse(id))) = heap.peek() {
                if self.nodes[id as usize].state == NodeState::Ready {
                    break;
                }
                heap.pop();
            }
            if let Some(&(pri, Reverse(id))) = heap.peek()
                && best.is_none_or(|(bp, bid, _)| (pri, Reverse(id)) > (bp, Reverse(bid)))
            {
                best = Some((pri, id, cid));
            }
        }
        let (_, id, cid) = best?;
        self.ready[cid].pop();
        self.ready_count -= 1;
        self.nodes[id as usize].state = NodeState::Running;
        self.running += 1;
        Some(id)
    }

    /// Like [`Self::pop_for`], but among the ready nodes of the highest priority it takes
    /// the one `score` rates highest (a tie: the lowest id). A node of lower priority never
    /// goes first, so the critical-path order, and the makespan it bounds, stay as they are:
    /// only which of equally urgent nodes this agent takes changes (locality: the node whose
    /// inputs it already holds). At most `LOOK` equal nodes are weighed.
    pub fn pop_for_preferring(
        &mut self,
        caps: &Capabilities,
        score: impl Fn(NodeId, &[NodeId]) -> u32,
    ) -> Option<NodeId> {
        const LOOK: usize = 16;
        let mut top: Option<u64> = None;
        for (cid, class) in self.classes.iter().enumerate() {
            if !caps.can_build(class) {
                continue;
            }
            let heap = &mut self.ready[cid];
            while let Some(&(_, Reverse(id))) = heap.peek() {
                if self.nodes[id as usize].state == NodeState::Ready {
                    break;
                }
                heap.pop();
            }
            if let Some(&(pri, _)) = heap.peek() {
                top = Some(top.map_or(pri, |t| t.max(pri)));
            }
        }
        let top = top?;
        // Take out the equally urgent candidates, choose, and put the others back.
        let mut taken: Vec<(usize, (u64, Reverse<NodeId>))> = Vec::new();
        for (cid, class) in self.classes.iter().enumerate() {
            if !caps.can_build(class) {
                continue;
            }
            let heap = &mut self.ready[cid];
            while taken.len() < LOOK {
                match heap.peek() {
                    Some(&(pri, Reverse(id))) if pri == top => {
                        heap.pop();
                        if self.nodes[id as usize].state == NodeState::Ready {
                            taken.push((cid, (pri, Reverse(id))));
                        }
                    }
                    _ => break,
                }
            }
        }
        let nodes = &self.nodes;
        let best = taken
            .iter()
            .enumerate()
            .max_by_key(|(_, (_, (_, Reverse(id))))| {
                (score(*id, &nodes[*id as usize].inputs), Reverse(*id))
            })
            .map(|(i, _)| i)?;
        let (_, (_, Reverse(id))) = taken.swap_remove(best);
        for (cid, entry) in taken {
            self.ready[cid].push(entry);
        }
        self.ready_count -= 1;
        self.nodes[id as usize].state = NodeState::Running;
        self.running += 1;
        Some(id)
    }

    /// Takes a specific ready node (used when restoring a running attempt).
    pub fn mark_running(&mut self, id: NodeId) {
        let node = &mut self.nodes[id as usize];
        if matches!(node.state, NodeState::Ready | NodeState::Waiting) {
            if node.state == NodeState::Ready {
                self.ready_count -= 1;
            }
            node.state = NodeState::Running;
            self.running += 1;
        }
    }

    /// A running node goes back to the queue (infrastructure failure, lost agent).
    pub fn requeue(&mut self, id: NodeId) {
        if self.nodes[id as usize].state == NodeState::Running {
            self.running -= 1;
            self.make_ready(id);
        }
    }

    /// A node built: returns the nodes that became ready.
    pub fn complete(&mut self, id: NodeId) -> Vec<NodeId> {
        if self.nodes[id as usize].state.is_done() {
            return Vec::new();
        }
        if self.nodes[id as usize].state == NodeState::Running {
            self.running -= 1;
        }
        self.nodes[id as usize].state = NodeState::Built;
        self.unfinished -= 1;
        let mut newly = Vec::new();
        let dependents = self.nodes[id as usize].dependents.clone();
        for d in dependents {
            let dn = &mut self.nodes[d as usize];
            if dn.state == NodeState::Waiting {
                dn.deps_left = dn.deps_left.saturating_sub(1);
                if dn.deps_left == 0 {
                    self.make_ready(d);
                    newly.push(d);
                }
            }
        }
        newly
    }

    /// A node failed deterministically: returns every node that can now never build.
    pub fn fail(&mut self, id: NodeId) -> Vec<NodeId> {
        if self.nodes[id as usize].state.is_done() {
            return Vec::new();
        }
        if self.nodes[id as usize].state == NodeState::Running {
            self.running -= 1;
        }
        self.nodes[id as usize].state = NodeState::Failed;
        self.unfinished -= 1;
        self.fail_dependents(id, id)
    }

    fn fail_dependents(&mut self, id: NodeId, root: NodeId) -> Vec<NodeId> {
        let mut out = Vec::new();
        let mut stack = self.nodes[id as usize].dependents.clone();
        while let Some(d) = stack.pop() {
            let dn = &mut self.nodes[d as usize];
            if dn.state.is_done() || dn.state == NodeState::Running {
                continue;
            }
            dn.state = NodeState::DependencyFailed;
            dn.failed_root = Some(root);
            self.unfinished -= 1;
            out.push(d);
            stack.extend(self.nodes[d as usize].dependents.iter().copied());
        }
        out
    }

    /// Cancels every node not finished and not running; returns them.
    pub fn cancel_pending(&mut self) -> Vec<NodeId> {
        let mut out = Vec::new();
        for (i, n) in self.nodes.iter_mut().enumerate() {
            if matches!(n.state, NodeState::Waiting | NodeState::Ready) {
                if n.state == NodeState::Ready {
                    self.ready_count -= 1;
                }
                n.state = NodeState::Cancelled;
                self.unfinished -= 1;
                out.push(i as NodeId);
            }
        }
        out
    }

    /// Marks a running node cancelled.
    pub fn cancel_running(&mut self, id: NodeId) {
        let n = &mut self.nodes[id as usize];
        if n.state == NodeState::Running {
            n.state = NodeState::Cancelled;
            self.running -= 1;
            self.unfinished -= 1;
        }
    }

    pub fn state(&self, id: NodeId) -> NodeState {
        self.nodes[id as usize].state
    }
    pub fn failed_root(&self, id: NodeId) -> Option<NodeId> {
        self.nodes[id as usize].failed_root
    }
    /// Whether `id` may build at a lower CPU priority without holding up the run: its chain
    /// is under a tenth of the longest remaining one, so even with a tenth of the CPU (nice
    /// 10 against 0 gets about that under full load) it ends before that chain does. A
    /// chain nearly as long is not slowed: it would become the one the run waits on.
    pub fn may_yield_cpu(&mut self, id: NodeId) -> bool {
        self.nodes[id as usize]
            .priority
            .saturating_mul(YIELD_FACTOR)
            < self.top_priority()
    }

    /// The longest remaining chain (a node's priority is the longest chain from it to the
    /// end; 0: none left). Amortised O(log n): finished nodes leave the heap once.
    fn top_priority(&mut self) -> u64 {
        while let Some(&(p, top)) = self.by_priority.peek() {
            let n = &self.nodes[top as usize];
            if n.state.is_done() || n.priority != p {
                self.by_priority.pop();
                continue;
            }
            return p;
        }
        0
    }

    pub fn priority(&self, id: NodeId) -> u64 {
        self.nodes[id as usize].priority
    }
    pub fn cost(&self, id: NodeId) -> u64 {
        self.nodes[id as usize].cost
    }
    pub fn inputs(&self, id: NodeId) -> &[NodeId] {
        &self.nodes[id as usize].inputs
    }
    pub fn class(&self, id: NodeId) -> &Class {
        &self.classes[self.nodes[id as usize].class as usize]
    }
    pub fn len(&self) -> usize {
        self.nodes.len()
    }
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
    /// Nodes not built, failed or cancelled yet.
    pub fn unfinished(&self) -> usize {
        self.unfinished
    }
    pub fn running(&self) -> usize {
        self.running
    }
    /// Whether some ready node is waiting for an agent.
    pub fn has_ready(&self) -> bool {
        self.ready_count > 0
    }
    /// Routing classes that have ready nodes (for "why does this wait" reasons).
    pub fn ready_classes(&self) -> Vec<&Class> {
        let mut v: Vec<&Class> = Vec::new();
        for n in &self.nodes {
            if n.state == NodeState::Ready {
                let c = &self.classes[n.class as usize];
                if !v.contains(&c) {
                    v.push(c);
                }
            }
        }
        v
    }
    /// Longest chain of costs in the graph (the critical path).
    pub fn critical_path(&self) -> u64 {
        self.nodes.iter().map(|n| n.priority).max().unwrap_or(0)
    }
    pub fn total_cost(&self) -> u64 {
        self.nodes.iter().map(|n| n.cost).sum()
    }
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
