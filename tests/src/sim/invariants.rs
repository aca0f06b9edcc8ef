//! Safety invariants checked while the simulation runs, from outside every host.

use std::collections::BTreeMap;
use std::sync::Arc;

use meridian_region_node::node::RegionNode;
use meridian_region_node::raft::NodeId;
use meridian_region_node::storage::{group_key, CF_LOG};
use openraft::async_runtime::WatchReceiver;
use openraft::ServerState;

use super::memory_engine::MemoryEngine;

#[derive(Default)]
pub struct Invariants {
    /// (group, term) → the node that led it: **election safety**, at most one leader a term.
    leaders: BTreeMap<(u32, u64), NodeId>,
    /// (group, index) → (node that first applied it, digest of the entry): **state machine
    /// safety**, every node applies the same entry at an index, and a committed entry is never
    /// replaced (a new leader that lost it would write another entry there).
    committed: BTreeMap<(u32, u64), (NodeId, u64)>,
    /// (node, group) → highest index already compared.
    checked: BTreeMap<(NodeId, u32), u64>,
    pub violations: Vec<String>,
    /// Record every node's Raft state changes in `events` (`MERIDIAN_SIM_DEBUG`).
    debug: bool,
    last_seen: BTreeMap<(NodeId, u32), String>,
    /// Leader changes seen, as trace lines.
    pub events: Vec<String>,
}

impl Invariants {
    pub fn new() -> Self {
        Self {
            debug: std::env::var_os("MERIDIAN_SIM_DEBUG").is_some(),
            ..Self::default()
        }
    }

    pub fn check(
        &mut self,
        nodes: &BTreeMap<NodeId, Arc<RegionNode>>,
        engines: &BTreeMap<NodeId, Arc<MemoryEngine>>,
        now_ms: u64,
    ) {
        for (&id, node) in nodes {
            for g in node.groups() {
                let (state, term, applied, vote, last_log, leader) = {
                    let m = g.raft.metrics();
                    let m = m.borrow_watched();
                    (
                        m.state,
                        m.current_term,
                        m.last_applied.map_or(0, |l| l.index),
                        m.vote,
                        m.last_log_index,
                        m.current_leader,
                    )
                };
                // Only formatted for the debug trace or a violation.
                let detail = || format!("vote {vote} last log {last_log:?} leader {leader:?}");
                if self.debug {
                    let key = format!("{state:?} {}", detail());
                    if self.last_seen.get(&(id, g.id)) != Some(&key) {
                        self.events
                            .push(format!("{now_ms} node {id} group {}: {key}", g.id));
                        self.last_seen.insert((id, g.id), key);
                    }
                }
                if state == ServerState::Leader {
                    match self.leaders.get(&(g.id, term)) {
                        None => {
                            self.leaders.insert((g.id, term), id);
                            self.events.push(format!("{now_ms} group {} term {term} leader {id}", g.id));
                        }
                        Some(&other) if other != id => self.violations.push(format!(
                            "election safety: group {} term {term} has leaders {other} and {id} ({}) (at {now_ms} ms)",
                            g.id,
                            detail()
                        )),
                        Some(_) => {}
                    }
                }
                self.check_log(id, g.id, applied, &engines[&id], now_ms);
            }
        }
    }

    fn check_log(
        &mut self,
        node: NodeId,
        group: u32,
        applied: u64,
        engine: &MemoryEngine,
        now_ms: u64,
    ) {
        let from = self.checked.get(&(node, group)).copied().unwrap_or(0) + 1;
        if applied < from {
            return;
        }
        let lo = group_key(group, &from.to_be_bytes());
        let hi = group_key(group, &(applied + 1).to_be_bytes());
        for (key, value) in engine.visible_range(CF_LOG, &lo, &hi) {
            let index = u64::from_be_bytes(key[4..12].try_into().expect("log key"));
            let digest = crate::fnv1a(value);
            match self.committed.get(&(group, index)) {
                None => {
                    self.committed.insert((group, index), (node, digest));
                }
                Some(&(first, d)) if d != digest => self.violations.push(format!(
                    "state machine safety: group {group} index {index} applied by node {first} differs on node {node} (at {now_ms} ms)"
                )),
                Some(_) => {}
            }
        }
        self.checked.insert((node, group), applied);
    }

    /// A node that restarted re-applies from its snapshot: compare its log again from there.
    pub fn forget_node(&mut self, node: NodeId) {
        self.checked.retain(|(n, _), _| *n != node);
    }

    /// The highest committed index seen per group.
    pub fn committed_high(&self) -> BTreeMap<u32, u64> {
        let mut out = BTreeMap::new();
        for &(g, i) in self.committed.keys() {
            let e = out.entry(g).or_insert(0);
            *e = (*e).max(i);
        }
        out
    }
}
