//! A Jepsen-style queue checker with nemeses, against real node processes on loopback.
//!
//! Clients send uniquely numbered, self-checking bodies, receive in batches and delete what they
//! receive, recording every operation and its outcome (acknowledged, failed, or unknown). A
//! nemesis injects one kind of fault on a schedule meanwhile. Then everything is healed, every
//! queue is drained, and the history is checked:
//!
//! * **lost**: a send was acknowledged, its body was never delivered;
//! * **unexpected**: a body was delivered that no client sent (or under two message ids);
//! * **redelivered after delete**: a message was delivered by a receive that started after a
//!   delete of it had been acknowledged;
//! * **corrupt**: a delivered body fails its own checksum, came from the wrong queue, or came
//!   under a message id other than the one its send was acknowledged with;
//! * **divergent**: replicas of a group at the same applied index whose state digests differ.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meridian_api::pb::cluster_service_client::ClusterServiceClient;
use meridian_api::pb::queue_service_client::QueueServiceClient;
use meridian_api::pb::*;
use meridian_region_node::command::QueueKey;
use meridian_region_node::config::{FaultsConfig, RaftConfig};
use meridian_region_node::placement::group_of;
use rand::Rng;
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::set_faults;
use crate::Region;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nemesis {
    /// SIGKILL a random node, restart it.
    KillOne,
    /// SIGKILL the leader of a queue's group, restart it.
    KillLeader,
    /// SIGKILL every node at once, restart them all.
    KillAll,
    /// SIGSTOP the leader for longer than the election timeout, then SIGCONT.
    PauseLeader,
    /// Cut a random node off from the other two, then heal.
    PartitionMinority,
    /// Cut the leader off from the other two, then heal.
    IsolateLeader,
    /// Partition and heal a random node every second.
    Flapping,
    /// Move the leader's clock forward or back by 10 s, then restore it.
    ClockJump,
    /// Writes on the leader wait (a full disk), then space returns.
    DiskFull,
    /// Every node loses 5% of its messages and replies and delays each by 5 ms.
    LossyNetwork,
}

impl Nemesis {
    pub const ALL: [Nemesis; 10] = [
        Nemesis::KillOne,
        Nemesis::KillLeader,
        Nemesis::KillAll,
        Nemesis::PauseLeader,
        Nemesis::PartitionMinority,
        Nemesis::IsolateLeader,
        Nemesis::Flapping,
        Nemesis::ClockJump,
        Nemesis::DiskFull,
        Nemesis::LossyNetwork,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Nemesis::KillOne => "kill-one",
            Nemesis::KillLeader => "kill-leader",
            Nemesis::KillAll => "kill-all",
            Nemesis::PauseLeader => "pause-leader",
            Nemesis::PartitionMinority => "partition-minority",
            Nemesis::IsolateLeader => "isolate-leader",
            Nemesis::Flapping => "flapping-partition",
            Nemesis::ClockJump => "clock-jump",
            Nemesis::DiskFull => "disk-full",
            Nemesis::LossyNetwork => "lossy-network",
        }
    }

    pub fn parse(s: &str) -> Option<Nemesis> {
        Self::ALL.into_iter().find(|n| n.name() == s)
    }
}

pub struct ChaosConfig {
    pub nemesis: Nemesis,
    /// How long clients run while the nemesis acts.
    pub duration: Duration,
    pub clients: usize,
    pub queues: usize,
}

impl ChaosConfig {
    /// `MERIDIAN_CHAOS_SECS` (default `default_secs`) of `nemesis` with 4 clients on 2 queues.
    pub fn from_env(nemesis: Nemesis, default_secs: u64) -> Self {
        let secs = std::env::var("MERIDIAN_CHAOS_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default_secs);
        Self {
            nemesis,
            duration: Duration::from_secs(secs),
            clients: 4,
            queues: 2,
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct Report {
    pub nemesis: String,
    pub seconds: u64,
    pub sends_acked: u64,
    pub sends_unknown: u64,
    pub deliveries: u64,
    pub deletes_acked: u64,
    pub lost: Vec<String>,
    pub unexpected: Vec<String>,
    pub redelivered_after_delete: Vec<String>,
    pub corrupt: Vec<String>,
    pub divergent: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.lost.is_empty()
            && self.unexpected.is_empty()
            && self.redelivered_after_delete.is_empty()
            && self.corrupt.is_empty()
            && self.divergent.is_empty()
    }

    pub const HEADER: &'static str = "| nemesis | s | sends acked | sends unknown | deliveries | deletes acked | lost | unexpected | dup after delete | corrupt | divergent |\n|---|---|---|---|---|---|---|---|---|---|---|";
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            self.nemesis,
            self.seconds,
            self.sends_acked,
            self.sends_unknown,
            self.deliveries,
            self.deletes_acked,
            self.lost.len(),
            self.unexpected.len(),
            self.redelivered_after_delete.len(),
            self.corrupt.len(),
            self.divergent.len()
        )
    }
}

#[derive(Debug, Clone)]
enum SendOutcome {
    Acked(String),
    Unknown,
}

struct Delivery {
    queue: String,
    msg_id: String,
    body: String,
    /// When the receive that returned it was issued.
    started: Instant,
}

#[derive(Default)]
struct History {
    sends: HashMap<String, SendOutcome>,
    deliveries: Vec<Delivery>,
    /// msg id → when its first successful delete was acknowledged.
    deleted: HashMap<String, Instant>,
}

fn checksum(s: &str) -> String {
    format!("{:016x}", crate::fnv1a(s.bytes()))
}

fn body_for(queue: &str, client: usize, n: u64) -> String {
    let head = format!("{queue}|{client}|{n}");
    let sum = checksum(&head);
    format!("{head}|{sum}")
}

/// Whether `body` is intact and belongs to `queue`.
fn body_ok(queue: &str, body: &str) -> bool {
    match body.rsplit_once('|') {
        Some((head, sum)) => checksum(head) == sum && head.split('|').next() == Some(queue),
        None => false,
    }
}

async fn client_loop(
    client: usize,
    queue: String,
    channels: Vec<Channel>,
    history: Arc<Mutex<History>>,
    until: Instant,
) {
    let mut n = 0u64;
    while Instant::now() < until {
        let pick = || rand::thread_rng().gen_range(0..channels.len());
        let mut c = QueueServiceClient::new(channels[pick()].clone());
        n += 1;
        let body = body_for(&queue, client, n);
        let outcome = match c
            .send_message(SendMessageRequest {
                queue_name: queue.clone(),
                msg_body: body.clone().into_bytes(),
                delay_seconds: 0,
            })
            .await
        {
            Ok(r) => SendOutcome::Acked(r.into_inner().msg_id),
            // Whatever the error, the message may have been committed: never assume it was not.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                SendOutcome::Unknown
            }
        };
        history.lock().unwrap().sends.insert(body, outcome);
        if !n.is_multiple_of(2) {
            continue;
        }
        let mut c = QueueServiceClient::new(channels[pick()].clone());
        let started = Instant::now();
        let Ok(r) = c
            .batch_receive_message(BatchReceiveMessageRequest {
                queue_name: queue.clone(),
                num_of_msg: 8,
                polling_wait_seconds: Some(0),
            })
            .await
        else {
            continue;
        };
        let msgs = r.into_inner().messages;
        record_and_delete(&queue, msgs, started, &mut c, &history).await;
    }
}

async fn record_and_delete(
    queue: &str,
    msgs: Vec<ReceivedMessage>,
    started: Instant,
    c: &mut QueueServiceClient<Channel>,
    history: &Mutex<History>,
) {
    if msgs.is_empty() {
        return;
    }
    let handles: Vec<String> = msgs.iter().map(|m| m.receipt_handle.clone()).collect();
    let ids: Vec<String> = msgs.iter().map(|m| m.msg_id.clone()).collect();
    {
        let mut h = history.lock().unwrap();
        for m in msgs {
            h.deliveries.push(Delivery {
                queue: queue.to_string(),
                msg_id: m.msg_id,
                body: String::from_utf8_lossy(&m.msg_body).into_owned(),
                started,
            });
        }
    }
    if let Ok(r) = c
        .batch_delete_message(BatchDeleteMessageRequest {
            queue_name: queue.to_string(),
            receipt_handle: handles.clone(),
        })
        .await
    {
        let acked = Instant::now();
        let r = r.into_inner();
        let failed: Vec<&str> = r.errors.iter().map(|e| e.receipt_handle.as_str()).collect();
        let mut h = history.lock().unwrap();
        for (id, handle) in ids.into_iter().zip(&handles) {
            if r.code == 0 || !failed.contains(&handle.as_str()) {
                h.deleted.entry(id).or_insert(acked);
            }
        }
    }
}

/// Cuts `victim` off from every other node (both directions), or heals everything: with
/// nftables in the victim's namespace when the region runs in namespaces, else through the
/// nodes' transport seam. Clients still reach every node either way.
async fn partition(region: &Region, victim: Option<u64>) {
    let ids: Vec<u64> = region.nodes.iter().map(|n| n.id).collect();
    if let Some(lab) = &region.netns {
        for &id in &ids {
            lab.heal(id).expect("heal partition");
        }
        if let Some(v) = victim {
            let peers: Vec<u64> = ids.iter().copied().filter(|&o| o != v).collect();
            lab.cut(v, &peers).expect("partition");
        }
        return;
    }
    for &id in &ids {
        let blocked_peers = match victim {
            Some(v) if v == id => ids.iter().copied().filter(|&o| o != v).collect(),
            Some(v) => vec![v],
            None => vec![],
        };
        set_faults(
            region,
            id,
            FaultSpec {
                blocked_peers,
                ..Default::default()
            },
        )
        .await;
    }
}

async fn heal_all(region: &mut Region) {
    let ids: Vec<u64> = region.nodes.iter().map(|n| n.id).collect();
    for &id in &ids {
        if region.nodes.iter().any(|n| n.id == id && n.child.is_none()) {
            region.spawn(id);
        }
        region.signal(id, libc::SIGCONT);
    }
    for &id in &ids {
        set_faults(region, id, FaultSpec::default()).await;
    }
}

async fn nemesis_loop(region: &mut Region, nemesis: Nemesis, group: u32, until: Instant) {
    let sleep = |ms: u64| tokio::time::sleep(Duration::from_millis(ms));
    let random_node = || rand::thread_rng().gen_range(1..=3u64);
    if nemesis == Nemesis::LossyNetwork {
        for id in 1..=3 {
            let spec = FaultSpec {
                delay_ms: 5,
                drop_per_mille: 50,
                ..Default::default()
            };
            set_faults(region, id, spec).await;
        }
    }
    let mut flip = false;
    while Instant::now() < until {
        sleep(1500).await;
        match nemesis {
            Nemesis::KillOne | Nemesis::KillLeader => {
                let victim = if nemesis == Nemesis::KillOne {
                    random_node()
                } else {
                    region.leader_of(group).await
                };
                region.kill(victim);
                sleep(3000).await;
                region.spawn(victim);
                sleep(2000).await;
            }
            Nemesis::KillAll => {
                for id in 1..=3 {
                    region.kill(id);
                }
                sleep(500).await;
                for id in 1..=3 {
                    region.spawn(id);
                }
                sleep(4000).await;
            }
            Nemesis::PauseLeader => {
                let victim = region.leader_of(group).await;
                region.signal(victim, libc::SIGSTOP);
                sleep(4000).await;
                region.signal(victim, libc::SIGCONT);
                sleep(2000).await;
            }
            Nemesis::PartitionMinority | Nemesis::IsolateLeader => {
                let victim = if nemesis == Nemesis::PartitionMinority {
                    random_node()
                } else {
                    region.leader_of(group).await
                };
                partition(region, Some(victim)).await;
                sleep(4000).await;
                partition(region, None).await;
                sleep(2000).await;
            }
            Nemesis::Flapping => {
                for _ in 0..4 {
                    partition(region, Some(random_node())).await;
                    sleep(1000).await;
                    partition(region, None).await;
                    sleep(1000).await;
                }
            }
            Nemesis::ClockJump => {
                let victim = region.leader_of(group).await;
                flip = !flip;
                let spec = FaultSpec {
                    clock_offset_ms: if flip { 10_000 } else { -10_000 },
                    ..Default::default()
                };
                set_faults(region, victim, spec).await;
                sleep(4000).await;
                set_faults(region, victim, FaultSpec::default()).await;
                sleep(2000).await;
            }
            Nemesis::DiskFull => {
                let victim = region.leader_of(group).await;
                let spec = FaultSpec {
                    disk_full: true,
                    ..Default::default()
                };
                set_faults(region, victim, spec).await;
                sleep(4000).await;
                set_faults(region, victim, FaultSpec::default()).await;
                sleep(2000).await;
            }
            Nemesis::LossyNetwork => {}
        }
    }
}

/// Receives and deletes until every queue reports no message left (bounded).
async fn drain(region: &Region, queues: &[String], history: &Arc<Mutex<History>>) {
    let deadline = Instant::now() + Duration::from_secs(120);
    for q in queues {
        loop {
            assert!(Instant::now() < deadline, "drain of {q} did not finish");
            let id = region.live_ids()[rand::thread_rng().gen_range(0..3)];
            let Some(ch) = region.channel(id).await else {
                continue;
            };
            let mut c = QueueServiceClient::new(ch);
            let started = Instant::now();
            match c
                .batch_receive_message(BatchReceiveMessageRequest {
                    queue_name: q.clone(),
                    num_of_msg: 16,
                    polling_wait_seconds: Some(1),
                })
                .await
            {
                Ok(r) => {
                    let msgs = r.into_inner().messages;
                    record_and_delete(q, msgs, started, &mut c, history).await;
                }
                Err(s) if crate::cmq_code(&s) == 7000 => {
                    let a = c
                        .get_queue_attributes(QueueNameRequest {
                            queue_name: q.clone(),
                        })
                        .await;
                    if let Ok(a) = a {
                        let a = a.into_inner();
                        if a.active_msg_num + a.inactive_msg_num + a.delay_msg_num == 0 {
                            break;
                        }
                    }
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
}

/// Compares state digests of replicas at the same applied index, per group (bounded wait for
/// the replicas to line up).
pub async fn divergence(region: &Region) -> Vec<String> {
    let mut last = String::new();
    for _ in 0..100 {
        let mut by_group: BTreeMap<u32, Vec<(u64, u64, String)>> = BTreeMap::new();
        for id in region.live_ids() {
            let Some(ch) = region.channel(id).await else {
                continue;
            };
            if let Ok(r) = ClusterServiceClient::new(ch).state_digests(Empty {}).await {
                for g in r.into_inner().groups {
                    by_group
                        .entry(g.group)
                        .or_default()
                        .push((id, g.applied_index, g.digest));
                }
            }
        }
        let aligned = by_group
            .values()
            .all(|v| v.len() == 3 && v.iter().all(|(_, i, _)| *i == v[0].1));
        if aligned {
            return by_group
                .iter()
                .filter(|(_, v)| v.iter().any(|(_, _, d)| *d != v[0].2))
                .map(|(g, v)| format!("group {g} at index {}: {v:?}", v[0].1))
                .collect();
        }
        last = format!("{by_group:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    vec![format!(
        "replicas never reached the same applied index: {last}"
    )]
}

fn check(history: &History, report: &mut Report) {
    // body → the message ids it was delivered under.
    let mut delivered: HashMap<&str, Vec<&str>> = HashMap::new();
    for d in &history.deliveries {
        if !body_ok(&d.queue, &d.body) {
            report
                .corrupt
                .push(format!("{} from {}: {:?}", d.msg_id, d.queue, d.body));
            continue;
        }
        match history.sends.get(&d.body) {
            None => report
                .unexpected
                .push(format!("{} never sent: {:?}", d.msg_id, d.body)),
            Some(SendOutcome::Acked(id)) if id != &d.msg_id => report.corrupt.push(format!(
                "{:?} acknowledged as {id} but delivered as {}",
                d.body, d.msg_id
            )),
            _ => {}
        }
        let ids = delivered.entry(d.body.as_str()).or_default();
        if !ids.contains(&d.msg_id.as_str()) {
            ids.push(&d.msg_id);
        }
        if let Some(&at) = history.deleted.get(&d.msg_id) {
            if d.started > at {
                report
                    .redelivered_after_delete
                    .push(format!("{} ({:?})", d.msg_id, d.body));
            }
        }
    }
    for (body, ids) in &delivered {
        if ids.len() > 1 {
            report
                .unexpected
                .push(format!("{body:?} delivered under several ids {ids:?}"));
        }
    }
    for (body, outcome) in &history.sends {
        match outcome {
            SendOutcome::Acked(id) => {
                report.sends_acked += 1;
                if !delivered.contains_key(body.as_str()) {
                    report.lost.push(format!("{id} ({body:?})"));
                }
            }
            SendOutcome::Unknown => report.sends_unknown += 1,
        }
    }
    report.deliveries = history.deliveries.len() as u64;
    report.deletes_acked = history.deleted.len() as u64;
}

/// Runs one nemesis against a fresh 3-node region and returns the checker's report.
pub async fn run(cfg: ChaosConfig) -> Report {
    let raft = RaftConfig {
        // Small enough that snapshots and log purges happen during a run.
        snapshot_after_entries: 500,
        logs_kept_after_snapshot: 100,
        ..Default::default()
    };
    // Partitions cut the real network when this machine allows it (root: namespaces and
    // nftables); otherwise they go through the nodes' transport seam.
    let partitions = matches!(
        cfg.nemesis,
        Nemesis::PartitionMinority | Nemesis::IsolateLeader | Nemesis::Flapping
    );
    let lab = if partitions && crate::netns::available() {
        Some(crate::netns::Lab::create(3).expect("network namespaces"))
    } else {
        None
    };
    let via = if lab.is_some() { " (netns)" } else { "" };
    let mut region = Region::start_in(
        3,
        2,
        |c| {
            c.raft = raft.clone();
            c.faults = FaultsConfig { enabled: true };
        },
        lab,
        &std::env::temp_dir(),
    )
    .await;
    let queues: Vec<String> = (0..cfg.queues).map(|i| format!("chaos-{i}")).collect();
    let mut admin = region.client(1).await;
    for q in &queues {
        admin
            .create_queue(CreateQueueRequest {
                queue_name: q.clone(),
                attributes: Some(QueueAttributes {
                    visibility_timeout: Some(2),
                    ..Default::default()
                }),
            })
            .await
            .expect("create chaos queue");
    }
    let group = group_of(&QueueKey::new("0", &queues[0]), 2);
    let channels = region.lazy_channels(Duration::from_secs(8));
    let history = Arc::new(Mutex::new(History::default()));
    let until = Instant::now() + cfg.duration;
    let clients: Vec<_> = (0..cfg.clients)
        .map(|c| {
            tokio::spawn(client_loop(
                c,
                queues[c % queues.len()].clone(),
                channels.clone(),
                history.clone(),
                until,
            ))
        })
        .collect();
    nemesis_loop(&mut region, cfg.nemesis, group, until).await;
    for c in clients {
        c.await.expect("client task");
    }
    heal_all(&mut region).await;
    region.wait_ready(Duration::from_secs(60)).await;
    drain(&region, &queues, &history).await;
    let mut report = Report {
        nemesis: format!("{}{via}", cfg.nemesis.name()),
        seconds: cfg.duration.as_secs(),
        ..Default::default()
    };
    check(&history.lock().unwrap(), &mut report);
    report.divergent = divergence(&region).await;
    if !report.ok() {
        // Nodes are stopped and namespaces removed as usual; the logs stay.
        region.keep_logs();
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_check_themselves() {
        let b = body_for("q", 1, 7);
        assert!(body_ok("q", &b));
        assert!(!body_ok("other", &b));
        assert!(!body_ok("q", &b.replace('7', "8")));
        assert!(!body_ok("q", "garbage"));
    }

    #[test]
    fn the_checker_finds_each_kind_of_violation() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(1);
        let mut h = History::default();
        let (a, b, c) = (
            body_for("q", 0, 1),
            body_for("q", 0, 2),
            body_for("q", 0, 3),
        );
        h.sends.insert(a.clone(), SendOutcome::Acked("1-1".into()));
        h.sends.insert(b.clone(), SendOutcome::Acked("1-2".into()));
        h.sends.insert(c.clone(), SendOutcome::Unknown);
        let d = |id: &str, body: &str, started| Delivery {
            queue: "q".into(),
            msg_id: id.into(),
            body: body.into(),
            started,
        };
        // a: delivered, deleted, delivered again afterwards. b: never delivered (lost).
        h.deliveries.push(d("1-1", &a, t0));
        h.deleted.insert("1-1".into(), t0);
        h.deliveries.push(d("1-1", &a, later));
        // Never sent; corrupted; an unknown send delivered under the wrong id is fine.
        h.deliveries.push(d("1-9", &body_for("q", 5, 5), t0));
        h.deliveries.push(d("1-8", "q|0|3|0000000000000000", t0));
        h.deliveries.push(d("1-3", &c, t0));
        let mut r = Report::default();
        check(&h, &mut r);
        assert_eq!(r.lost.len(), 1, "{r:?}");
        assert_eq!(r.redelivered_after_delete.len(), 1, "{r:?}");
        assert_eq!(r.unexpected.len(), 1, "{r:?}");
        assert_eq!(r.corrupt.len(), 1, "{r:?}");
        assert_eq!((r.sends_acked, r.sends_unknown), (2, 1));
    }
}
