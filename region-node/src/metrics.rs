//! The node's metrics in the Prometheus text format, served at `GET /metrics` on the HTTP
//! listener: storage durability watermarks, per-group Raft progress, and per-subscription push
//! delivery (reported by the node that leads the topic's group, whose copy is authoritative).

use std::fmt::Write;
use std::sync::atomic::Ordering;

use meridian_api::topics::Protocol;
use openraft::async_runtime::WatchReceiver;
use openraft::ServerState;

use crate::node::RegionNode;
use crate::raft::network::ReplicationStats;
use crate::topic::SubscriptionView;

/// Label values escaped as the text format requires.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// One metric family: its HELP and TYPE lines, then one sample per `(labels, value)`.
fn family(out: &mut String, name: &str, kind: &str, help: &str, rows: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, v) in rows {
        let _ = writeln!(out, "{name}{{{labels}}} {v}");
    }
}

pub fn render(node: &RegionNode) -> String {
    let mut out = String::new();
    let m = node.engine.metrics();
    let node_label = format!("node=\"{}\"", node.id);
    let one = |v: f64| vec![(node_label.clone(), v)];
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
    family(
        &mut out,
        "meridian_wal_syncs_total",
        "counter",
        "Syncs by the log writer: of the Raft log segment, once per round that needs one (and of the state database's WAL for an installed snapshot).",
        &one(load(&m.wal_syncs)),
    );
    family(
        &mut out,
        "meridian_disk_low",
        "gauge",
        "1 while the data disk is below its free-space reserve (log writes wait, writes are refused).",
        &one(load(&m.disk_low)),
    );
    family(
        &mut out,
        "meridian_disk_low_episodes_total",
        "counter",
        "Times log writing was held back for lack of free space.",
        &one(load(&m.disk_low_episodes)),
    );
    family(
        &mut out,
        "meridian_log_jobs_synced_total",
        "counter",
        "Raft log appends, truncations and purges completed by those batches.",
        &one(load(&m.synced_appends)),
    );
    family(
        &mut out,
        "meridian_wal_sync_seconds_total",
        "counter",
        "Time spent syncing the log (and, rarely, the state database's WAL).",
        &one(load(&m.sync_micros) / 1e6),
    );
    family(
        &mut out,
        "meridian_wal_sync_errors_total",
        "counter",
        "Failed log writes or fsyncs.",
        &one(load(&m.sync_errors)),
    );

    // Each group's Raft metrics, read once: (labels, term, last log, snapshot, applied, leader).
    let groups: Vec<_> = (0..=node.data_groups())
        .filter_map(|g| node.group_ref(g))
        .map(|g| {
            let rm = g.raft.metrics().borrow_watched().clone();
            (
                g,
                format!("{node_label},group=\"{}\"", g.id),
                [
                    rm.current_term,
                    rm.last_log_index.unwrap_or(0),
                    rm.snapshot.map_or(0, |l| l.index),
                    rm.last_applied.map_or(0, |l| l.index),
                    u64::from(rm.state == ServerState::Leader),
                ],
            )
        })
        .collect();
    for (i, (name, help)) in [
        ("meridian_raft_term", "Current Raft term."),
        (
            "meridian_raft_last_log_index",
            "Last log index appended (durable once the WAL syncs counted above cover it).",
        ),
        (
            "meridian_raft_snapshot_index",
            "Last log index covered by the latest snapshot.",
        ),
        (
            "meridian_raft_applied_index",
            "Index applied to the state machine.",
        ),
        ("meridian_raft_is_leader", "1 if this node leads the group."),
    ]
    .into_iter()
    .enumerate()
    {
        let rows: Vec<_> = groups
            .iter()
            .map(|(_, l, v)| (l.clone(), v[i] as f64))
            .collect();
        family(&mut out, name, "gauge", help, &rows);
    }

    let load_group = |f: &dyn Fn(&ReplicationStats) -> &std::sync::atomic::AtomicU64| {
        groups
            .iter()
            .map(|(g, l, _)| (l.clone(), load(f(&g.replication))))
            .collect::<Vec<_>>()
    };
    family(
        &mut out,
        "meridian_raft_append_streams_total",
        "counter",
        "Pipelined append streams this node opened to followers of the group.",
        &load_group(&|r| &r.streams_opened),
    );
    family(
        &mut out,
        "meridian_raft_appends_streamed_total",
        "counter",
        "AppendEntries requests sent on those streams.",
        &load_group(&|r| &r.appends_streamed),
    );
    family(
        &mut out,
        "meridian_raft_appends_in_flight",
        "gauge",
        "Streamed appends not yet answered by their follower (all followers).",
        &load_group(&|r| &r.in_flight),
    );
    family(
        &mut out,
        "meridian_state_bodies_evicted_total",
        "counter",
        "Message bodies dropped from memory since start, their state rows being written (a receive reads them back).",
        &groups
            .iter()
            .map(|(g, l, _)| (l.clone(), g.sm.shared.bodies_evicted() as f64))
            .collect::<Vec<_>>(),
    );
    family(
        &mut out,
        "meridian_raft_append_pipeline_depth_max",
        "gauge",
        "Most appends ever unanswered at once on one stream (1 would mean no pipelining).",
        &load_group(&|r| &r.in_flight_max),
    );

    // Subscriptions of the topics in groups this node leads.
    let now = node.clock.now_ms();
    let mut subs: Vec<(String, SubscriptionView)> = Vec::new();
    for (g, _, v) in &groups {
        if v[4] == 0 {
            continue;
        }
        let state = g.shared.state.read().expect("state lock");
        for (key, t) in &state.topics {
            for s in t.subscriptions.values() {
                let labels = format!(
                    "tenant=\"{}\",topic=\"{}\",subscription=\"{}\"",
                    esc(&key.tenant),
                    esc(&t.name),
                    esc(&s.spec.name)
                );
                subs.push((labels, SubscriptionView::new(t, s)));
            }
        }
    }
    let rows = |http_only: bool, f: &dyn Fn(&SubscriptionView) -> f64| -> Vec<(String, f64)> {
        subs.iter()
            .filter(|(_, v)| !http_only || v.spec.protocol == Protocol::Http)
            .map(|(l, v)| (l.clone(), f(v)))
            .collect()
    };
    family(
        &mut out,
        "meridian_subscription_routed_total",
        "counter",
        "Messages routed to the subscription.",
        &rows(false, &|v| v.stats.routed as f64),
    );
    family(
        &mut out,
        "meridian_subscription_delivered_total",
        "counter",
        "HTTP pushes answered with a 2xx.",
        &rows(true, &|v| v.stats.delivered as f64),
    );
    family(
        &mut out,
        "meridian_subscription_retried_total",
        "counter",
        "Failed HTTP pushes scheduled for a retry.",
        &rows(true, &|v| v.stats.retried as f64),
    );
    family(
        &mut out,
        "meridian_subscription_dropped_total",
        "counter",
        "HTTP pushes given up (retries or retention exhausted).",
        &rows(true, &|v| v.stats.dropped as f64),
    );
    family(
        &mut out,
        "meridian_subscription_pending",
        "gauge",
        "HTTP pushes outstanding.",
        &rows(true, &|v| v.msg_count as f64),
    );
    family(
        &mut out,
        "meridian_subscription_lag_seconds",
        "gauge",
        "Age of the oldest outstanding HTTP push.",
        &rows(true, &|v| match v.oldest_pending_ms {
            0 => 0.0,
            p => (now - p).max(0) as f64 / 1000.0,
        }),
    );
    out
}
