//! The node's metrics in the Prometheus text format, served at `GET /metrics` on the HTTP
//! listener: storage durability watermarks, per-group Raft progress, and per-subscription push
//! delivery (reported by the node that leads the topic's group, whose copy is authoritative).

use std::fmt::Write;
use std::sync::atomic::Ordering;

use openraft::ServerState;

use crate::node::RegionNode;
use meridian_api::topics::Protocol;

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Label values escaped as the text format requires.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub fn render(node: &RegionNode) -> String {
    let mut out = String::new();
    let m = node.engine.metrics();
    let id = node.id;
    for (name, kind, help, v) in [
        (
            "meridian_wal_syncs_total",
            "counter",
            "Log write batches made durable with one WAL fsync.",
            m.wal_syncs.load(Ordering::Relaxed),
        ),
        (
            "meridian_log_jobs_synced_total",
            "counter",
            "Raft log appends, truncations and purges completed by those batches.",
            m.synced_appends.load(Ordering::Relaxed),
        ),
        (
            "meridian_wal_sync_seconds_total",
            "counter",
            "Time spent in WAL fsync.",
            0,
        ),
        (
            "meridian_wal_sync_errors_total",
            "counter",
            "Failed log writes or fsyncs.",
            m.sync_errors.load(Ordering::Relaxed),
        ),
    ] {
        header(&mut out, name, kind, help);
        if name == "meridian_wal_sync_seconds_total" {
            let secs = m.sync_micros.load(Ordering::Relaxed) as f64 / 1e6;
            let _ = writeln!(out, "{name}{{node=\"{id}\"}} {secs}");
        } else {
            let _ = writeln!(out, "{name}{{node=\"{id}\"}} {v}");
        }
    }

    let groups: Vec<_> = (0..=node.data_groups())
        .filter_map(|g| node.group_ref(g))
        .collect();
    let raft_gauges: [(&str, &str); 5] = [
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
    ];
    for (name, help) in raft_gauges {
        header(&mut out, name, "gauge", help);
        for g in &groups {
            let rm = g.raft.metrics().borrow().clone();
            let v = match name {
                "meridian_raft_term" => rm.current_term,
                "meridian_raft_last_log_index" => rm.last_log_index.unwrap_or(0),
                "meridian_raft_snapshot_index" => rm.snapshot.map_or(0, |l| l.index),
                "meridian_raft_applied_index" => rm.last_applied.map_or(0, |l| l.index),
                _ => u64::from(rm.state == ServerState::Leader),
            };
            let _ = writeln!(out, "{name}{{node=\"{id}\",group=\"{}\"}} {v}", g.id);
        }
    }

    let subs: [(&str, &str, &str); 6] = [
        (
            "meridian_subscription_routed_total",
            "counter",
            "Messages routed to the subscription.",
        ),
        (
            "meridian_subscription_delivered_total",
            "counter",
            "HTTP pushes answered with a 2xx.",
        ),
        (
            "meridian_subscription_retried_total",
            "counter",
            "Failed HTTP pushes scheduled for a retry.",
        ),
        (
            "meridian_subscription_dropped_total",
            "counter",
            "HTTP pushes given up (retries or retention exhausted).",
        ),
        (
            "meridian_subscription_pending",
            "gauge",
            "HTTP pushes outstanding.",
        ),
        (
            "meridian_subscription_lag_seconds",
            "gauge",
            "Age of the oldest outstanding HTTP push.",
        ),
    ];
    let now = node.clock.now_ms();
    for (name, kind, help) in subs {
        header(&mut out, name, kind, help);
        for g in &groups {
            if g.raft.metrics().borrow().state != ServerState::Leader {
                continue;
            }
            let state = g.shared.state.read().expect("state lock");
            for (key, t) in &state.topics {
                for s in t.subscriptions.values() {
                    let oldest = s
                        .pending
                        .keys()
                        .next()
                        .and_then(|seq| t.messages.get(seq))
                        .map(|m| m.publish_ms);
                    let v = match name {
                        "meridian_subscription_routed_total" => s.stats.routed as f64,
                        "meridian_subscription_delivered_total" => s.stats.delivered as f64,
                        "meridian_subscription_retried_total" => s.stats.retried as f64,
                        "meridian_subscription_dropped_total" => s.stats.dropped as f64,
                        "meridian_subscription_pending" => s.pending.len() as f64,
                        _ => oldest.map_or(0.0, |p| (now - p).max(0) as f64 / 1000.0),
                    };
                    if s.spec.protocol == Protocol::Queue
                        && name != "meridian_subscription_routed_total"
                    {
                        continue;
                    }
                    let _ = writeln!(
                        out,
                        "{name}{{tenant=\"{}\",topic=\"{}\",subscription=\"{}\"}} {v}",
                        esc(&key.tenant),
                        esc(&t.name),
                        esc(&s.spec.name)
                    );
                }
            }
        }
    }
    out
}
