//! Acknowledged messages survive SIGKILL of the queue group's leader mid-stream and of the whole
//! region, on real processes over loopback.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meridian_api::pb::queue_service_client::QueueServiceClient;
use meridian_api::pb::{
    BatchSendMessageRequest, CreateQueueRequest, QueueNameRequest, SendMessageRequest,
};
use meridian_tests::Region;
use tonic::transport::Channel;

/// What the clients observed: acknowledged sends by message id, and bodies whose send failed
/// without an answer (they may or may not have been committed).
#[derive(Default)]
struct History {
    acked: BTreeMap<String, String>,
    indeterminate: BTreeSet<String>,
}

async fn create_queue(c: &mut QueueServiceClient<Channel>, name: &str) {
    c.create_queue(CreateQueueRequest {
        queue_name: name.into(),
        attributes: None,
    })
    .await
    .unwrap();
}

/// Sends `body` to `queue`; the message id once acknowledged.
async fn send(
    c: &mut QueueServiceClient<Channel>,
    queue: &str,
    body: &str,
) -> Result<String, tonic::Status> {
    let r = c
        .send_message(SendMessageRequest {
            queue_name: queue.into(),
            msg_body: body.as_bytes().to_vec(),
            delay_seconds: 0,
        })
        .await?;
    Ok(r.into_inner().msg_id)
}

async fn queue_group(region: &Region, name: &str) -> u32 {
    let mut c = region.client(region.live_ids()[0]).await;
    c.get_queue_attributes(QueueNameRequest {
        queue_name: name.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .group
}

/// The value of metric `name` for `group` on node `node`, and everything the node's
/// `/metrics` served.
fn group_metric(region: &Region, node: u64, group: u32, name: &str) -> (f64, String) {
    let scraped = meridian_tests::RawHttp::connect(&region.http_addr(node))
        .request("GET", "/metrics", b"")
        .1;
    let sample = format!("{name}{{node=\"{node}\",group=\"{group}\"}}");
    let value = scraped
        .lines()
        .find(|l| l.starts_with(&sample))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no {name} for group {group}:\n{scraped}"));
    (value, scraped)
}

fn check(
    history: &History,
    delivered: &BTreeMap<String, (usize, String)>,
    deleted: &BTreeMap<String, usize>,
) {
    let mut lost = Vec::new();
    for (id, body) in &history.acked {
        match delivered.get(id) {
            None => lost.push(id.clone()),
            Some((n, b)) => {
                assert_eq!(b, body, "message {id} body corrupted");
                assert_eq!(*n, 1, "message {id} delivered {n} times");
                assert_eq!(
                    deleted.get(id),
                    Some(&1),
                    "message {id} not deleted exactly once"
                );
            }
        }
    }
    assert!(
        lost.is_empty(),
        "{} acknowledged messages lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    for (id, (_, body)) in delivered {
        if !history.acked.contains_key(id) {
            assert!(
                history.indeterminate.contains(body),
                "invented message {id} with body {body:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_sigkill_mid_stream_loses_nothing() {
    const CLIENTS: usize = 5;
    const PER_CLIENT: usize = 1000;
    let mut region = Region::start(3, 2).await;
    let mut c = region.client(1).await;
    create_queue(&mut c, "orders").await;
    let group = queue_group(&region, "orders").await;

    let history = Arc::new(Mutex::new(History::default()));
    let acked = Arc::new(AtomicUsize::new(0));
    let clients = region.lazy_clients();
    let mut senders = Vec::new();
    for client_no in 0..CLIENTS {
        let clients = clients.clone();
        let history = history.clone();
        let acked = acked.clone();
        senders.push(tokio::spawn(async move {
            let mut target = client_no;
            for i in 0..PER_CLIENT {
                let body = format!("client{client_no}-msg{i}");
                let mut attempts = 0;
                loop {
                    attempts += 1;
                    assert!(attempts < 600, "send of {body} never succeeded");
                    let mut c = clients[target % clients.len()].clone();
                    match send(&mut c, "orders", &body).await {
                        Ok(id) => {
                            history.lock().unwrap().acked.insert(id, body.clone());
                            acked.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        Err(_) => {
                            history.lock().unwrap().indeterminate.insert(body.clone());
                            target += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }
        }));
    }

    let total = CLIENTS * PER_CLIENT;
    while acked.load(Ordering::Relaxed) < total / 4 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let leader = region.leader_of(group).await;
    eprintln!(
        "SIGKILL leader node {leader} of group {group} after {} acks",
        acked.load(Ordering::Relaxed)
    );
    region.kill(leader);
    let at_kill = acked.load(Ordering::Relaxed);
    // The remaining two keep serving.
    while acked.load(Ordering::Relaxed) < (at_kill + total / 4).min(total) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "restarting node {leader} at {} acks",
        acked.load(Ordering::Relaxed)
    );
    region.spawn(leader);
    for s in senders {
        s.await.unwrap();
    }
    region.wait_ready(Duration::from_secs(60)).await;

    let history = Arc::try_unwrap(history).ok().unwrap().into_inner().unwrap();
    assert_eq!(history.acked.len(), total);
    let (delivered, deleted) = region.drain("orders", total).await;
    eprintln!(
        "acked {} indeterminate {} delivered {}",
        history.acked.len(),
        history.indeterminate.len(),
        delivered.len()
    );
    check(&history, &delivered, &deleted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whole_region_sigkill_loses_nothing() {
    let mut region = Region::start(3, 2).await;
    let mut c = region.client(2).await;
    create_queue(&mut c, "payments").await;
    let mut history = History::default();
    for batch in 0..40 {
        let bodies: Vec<String> = (0..16).map(|i| format!("pay-{batch}-{i}")).collect();
        let r = c
            .batch_send_message(BatchSendMessageRequest {
                queue_name: "payments".into(),
                msg_body: bodies.iter().map(|b| b.clone().into_bytes()).collect(),
                delay_seconds: 0,
            })
            .await
            .unwrap()
            .into_inner();
        for (id, b) in r.msg_id.into_iter().zip(bodies) {
            history.acked.insert(id, b);
        }
    }
    for id in [1, 2, 3] {
        region.kill(id);
    }
    for id in [1, 2, 3] {
        region.spawn(id);
    }
    region.wait_ready(Duration::from_secs(60)).await;
    let (delivered, deleted) = region.drain("payments", history.acked.len()).await;
    check(&history, &delivered, &deleted);
}

/// A follower that missed more than a snapshot's worth of log (purged on the others) catches up
/// by snapshot installation, and then serves everything acknowledged without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lagging_follower_catches_up_from_snapshot() {
    let raft = meridian_region_node::config::RaftConfig {
        snapshot_after_entries: 50,
        snapshot_after_log_mib: 0,
        logs_kept_after_snapshot: 0,
        ..Default::default()
    };
    lagging_follower_catches_up(raft, |i| format!("audit-{i}")).await;
}

/// The same when snapshots come only from the size of the log (1 MiB here), never from its
/// count of entries: 300 entries of 16 KiB are snapshotted and purged about four times.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lagging_follower_catches_up_from_a_snapshot_made_by_log_size() {
    let raft = meridian_region_node::config::RaftConfig {
        snapshot_after_entries: 1_000_000,
        snapshot_after_log_mib: 1,
        logs_kept_after_snapshot: 0,
        ..Default::default()
    };
    lagging_follower_catches_up(raft, |i| format!("audit-{i}-{}", "x".repeat(16 << 10))).await;
}

async fn lagging_follower_catches_up(
    raft: meridian_region_node::config::RaftConfig,
    body_of: fn(usize) -> String,
) {
    let mut region = Region::start_with(3, 1, raft).await;
    let mut c = region.client(1).await;
    create_queue(&mut c, "audit").await;
    let leader = region.leader_of(1).await;
    let lagging = [1, 2, 3].into_iter().find(|&id| id != leader).unwrap();
    region.kill(lagging);
    let survivor = [1, 2, 3]
        .into_iter()
        .find(|&id| id != leader && id != lagging)
        .unwrap();
    let mut c = region.client(leader).await;
    let mut history = History::default();
    for i in 0..300 {
        let body = body_of(i);
        let id = send(&mut c, "audit", &body).await.unwrap();
        history.acked.insert(id, body);
    }
    region.spawn(lagging);
    // Wait (bounded) until the restarted node has applied what the leader has.
    let target = region.status(leader).await.unwrap().groups[1].applied_index;
    let mut caught_up = false;
    for _ in 0..300 {
        if let Some(s) = region.status(lagging).await {
            if s.groups[1].applied_index >= target {
                caught_up = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        caught_up,
        "node {lagging} did not catch up to applied index {target}"
    );
    let s = region.status(lagging).await.unwrap();
    assert!(
        s.groups[1].snapshots_installed >= 1,
        "caught up without a snapshot: {:?}",
        s.groups[1]
    );
    // Without the other follower, the group now depends on the restarted node's copy.
    region.kill(survivor);
    region.wait_ready(Duration::from_secs(60)).await;
    let (delivered, deleted) = region.drain("audit", history.acked.len()).await;
    check(&history, &delivered, &deleted);
}

/// The leader streams appends to each follower without waiting for the last reply: with every
/// message to the followers 150 ms late, concurrent sends keep several appends in flight on one
/// stream at once (openraft 0.9 sent one at a time), and nothing acknowledged goes missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn appends_to_followers_are_pipelined() {
    let raft = meridian_region_node::config::RaftConfig {
        // Room for more than one batch of commands in flight in the proposer.
        max_inflight_batches: 8,
        ..Default::default()
    };
    let mut region = Region::start_full(3, 1, raft, true).await;
    let mut c = region.client(1).await;
    create_queue(&mut c, "ledger").await;
    let group = queue_group(&region, "ledger").await;
    let leader = region.leader_of(group).await;
    meridian_tests::set_faults(
        &region,
        leader,
        meridian_api::pb::FaultSpec {
            delay_ms: 150,
            ..Default::default()
        },
    )
    .await;
    let history = Arc::new(Mutex::new(History::default()));
    let mut tasks = Vec::new();
    for w in 0..12 {
        let mut c = region.client(leader).await;
        let history = history.clone();
        tasks.push(tokio::spawn(async move {
            // Staggered starts: writers that all start at once can all land in the first
            // batch and then wait for it together, leaving nothing to send while it is in
            // flight (a clean-clone run saw exactly that).
            tokio::time::sleep(std::time::Duration::from_millis(10 * w)).await;
            for i in 0..10 {
                let body = format!("entry-{w}-{i}");
                let id = send(&mut c, "ledger", &body).await.unwrap();
                history.lock().unwrap().acked.insert(id, body);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (depth, _) = group_metric(
        &region,
        leader,
        group,
        "meridian_raft_append_pipeline_depth_max",
    );
    assert!(
        depth >= 2.0,
        "at most {depth} append(s) in flight at once: not pipelined"
    );
    meridian_tests::set_faults(&region, leader, Default::default()).await;
    let history = Arc::try_unwrap(history).ok().unwrap().into_inner().unwrap();
    assert_eq!(history.acked.len(), 120);
    let (delivered, deleted) = region.drain("ledger", 120).await;
    check(&history, &delivered, &deleted);
    region.kill(leader);
}

/// With no body cache (`cached_bodies_mib = 0`), every body whose state row is written leaves
/// memory: a backlog of about 6 MiB is then consumed from the rows, by a new leader after the
/// old one is SIGKILLed, and every acknowledged body comes back intact, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backlog_beyond_the_body_cache_is_read_back_from_the_rows() {
    let mut region = Region::start_configured(3, 1, |c| c.storage.cached_bodies_mib = 0).await;
    let mut c = region.client(1).await;
    create_queue(&mut c, "ledger").await;
    let group = queue_group(&region, "ledger").await;
    let leader = region.leader_of(group).await;
    let mut c = region.client(leader).await;
    let mut history = History::default();
    // State rows are written after every MiB of bodies: this backlog spans several writes.
    for b in 0..96 {
        let bodies: Vec<String> = (0..16)
            .map(|i| format!("{b}-{i}-{}", "x".repeat(4096)))
            .collect();
        let ids = c
            .batch_send_message(BatchSendMessageRequest {
                queue_name: "ledger".into(),
                msg_body: bodies.iter().map(|b| b.clone().into_bytes()).collect(),
                delay_seconds: 0,
            })
            .await
            .unwrap()
            .into_inner()
            .msg_id;
        assert_eq!(ids.len(), bodies.len());
        history.acked.extend(ids.into_iter().zip(bodies));
    }
    let (evicted, scraped) = group_metric(
        &region,
        leader,
        group,
        "meridian_state_bodies_evicted_total",
    );
    assert!(evicted > 0.0, "no body left memory:\n{scraped}");

    region.kill(leader);
    let new_leader = region.leader_of(group).await;
    assert_ne!(new_leader, leader);
    let (delivered, deleted) = region.drain("ledger", history.acked.len()).await;
    check(&history, &delivered, &deleted);
}
