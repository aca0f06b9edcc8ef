//! Every nemesis, briefly, with the queue checker: nothing acknowledged may be lost, nothing
//! invented, nothing redelivered after its delete, nothing corrupted, no replica divergent.
//! `MERIDIAN_CHAOS_SECS` sets the run length (default 12 s; `scripts/chaos.sh` runs long ones).

use meridian_tests::chaos::{run, ChaosConfig, Nemesis, Report};

async fn nemesis(n: Nemesis) {
    let report = run(ChaosConfig::from_env(n, 12)).await;
    eprintln!("{}\n{report}", Report::HEADER);
    assert!(report.ok(), "{report:#?}");
    assert!(
        report.sends_acked > 0,
        "no send was acknowledged: {report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_one() {
    nemesis(Nemesis::KillOne).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_leader() {
    nemesis(Nemesis::KillLeader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_all() {
    nemesis(Nemesis::KillAll).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_leader() {
    nemesis(Nemesis::PauseLeader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_minority() {
    nemesis(Nemesis::PartitionMinority).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolate_leader() {
    nemesis(Nemesis::IsolateLeader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_partition() {
    nemesis(Nemesis::Flapping).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_jump() {
    nemesis(Nemesis::ClockJump).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full() {
    nemesis(Nemesis::DiskFull).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy_network() {
    nemesis(Nemesis::LossyNetwork).await;
}

/// A flipped byte in the middle of a follower's Raft log segment: the node refuses to start
/// (checksums) instead of silently forgetting acknowledged entries and its vote; once its data
/// is wiped it resyncs from the others, and nothing acknowledged is lost or diverges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_log_segment_stops_the_node_which_then_resyncs() {
    corrupted_file_stops_the_node_which_then_resyncs(Damaged::LogSegment).await;
}

/// The same for a table (SST) file of the state database (`db/state`), which holds the
/// queues' rows, written by the flush of a clean shutdown: the start-up checksum scan finds
/// the damage before any of it is read as state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_state_table_stops_the_node_which_then_resyncs() {
    corrupted_file_stops_the_node_which_then_resyncs(Damaged::StateTable).await;
}

#[derive(Clone, Copy, PartialEq)]
enum Damaged {
    LogSegment,
    StateTable,
}

async fn corrupted_file_stops_the_node_which_then_resyncs(damaged: Damaged) {
    use meridian_api::pb::*;
    use meridian_region_node::command::QueueKey;
    use meridian_region_node::placement::group_of;
    use std::collections::BTreeSet;
    use std::time::Duration;

    let mut region = meridian_tests::Region::start(3, 2).await;
    let mut c = region.client(1).await;
    c.create_queue(CreateQueueRequest {
        queue_name: "ledger".into(),
        attributes: None,
    })
    .await
    .unwrap();
    let mut acked = BTreeSet::new();
    let send = |n: usize| format!("entry-{n}-{}", "x".repeat(200));
    for n in 0..200 {
        let body = send(n);
        c.send_message(SendMessageRequest {
            queue_name: "ledger".into(),
            msg_body: body.clone().into_bytes(),
            delay_seconds: 0,
        })
        .await
        .unwrap();
        acked.insert(body);
    }
    let group = group_of(&QueueKey::new("0", "ledger"), 2);
    let leader = region.leader_of(group).await;
    let victim = (1..=3).find(|&id| id != leader).unwrap();
    if damaged != Damaged::LogSegment {
        // A clean stop flushes memtables into table files. It must not wait on the append
        // streams the leaders hold open to it.
        region.stop(victim, Duration::from_secs(30));
    } else {
        region.kill(victim);
    }
    let node_dir = region.nodes[victim as usize - 1]
        .config_path
        .parent()
        .unwrap()
        .to_path_buf();
    let (db, ext) = match damaged {
        Damaged::LogSegment => (node_dir.join("data/db/raftlog"), "log"),
        Damaged::StateTable => (node_dir.join("data/db/state"), "sst"),
    };
    // Segments are preallocated: what was written ends at their last byte that is not zero.
    let written = |bytes: &[u8]| bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    let file = std::fs::read_dir(&db)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .max_by_key(|p| written(&std::fs::read(p).unwrap()))
        .unwrap_or_else(|| panic!("no .{ext} file in {}", db.display()));
    let mut bytes = std::fs::read(&file).unwrap();
    let len = written(&bytes);
    assert!(len > 1000, "{} too small to corrupt: {len}", file.display());
    let mid = len / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&file, bytes).unwrap();

    region.spawn(victim);
    let mut exit = None;
    for _ in 0..200 {
        let child = region.nodes[victim as usize - 1].child.as_mut().unwrap();
        if let Some(status) = child.try_wait().unwrap() {
            exit = Some(status);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let exit = exit.expect("the node with a corrupted file kept running");
    assert!(!exit.success());
    region.nodes[victim as usize - 1].child = None;
    let log = std::fs::read_to_string(node_dir.join("node.log")).unwrap();
    let reported = match damaged {
        Damaged::LogSegment => "is damaged",
        Damaged::StateTable => "Corruption",
    };
    assert!(log.contains(reported), "no damage reported:\n{log}");

    // The other two kept serving meanwhile.
    let mut c = region.client(leader).await;
    for n in 200..250 {
        let body = send(n);
        c.send_message(SendMessageRequest {
            queue_name: "ledger".into(),
            msg_body: body.clone().into_bytes(),
            delay_seconds: 0,
        })
        .await
        .unwrap();
        acked.insert(body);
    }

    // Operator's remedy: wipe the node's data; it resyncs from its peers.
    std::fs::remove_dir_all(node_dir.join("data")).unwrap();
    region.spawn(victim);
    region.wait_ready(Duration::from_secs(60)).await;

    let (delivered, _) = region.drain("ledger", 0).await;
    let bodies: Vec<String> = delivered
        .into_values()
        .flat_map(|(n, body)| std::iter::repeat_n(body, n))
        .collect();
    let got: BTreeSet<String> = bodies.iter().cloned().collect();
    let dups = bodies.len() - got.len();
    assert_eq!(dups, 0);
    assert_eq!(got, acked, "acknowledged messages lost or invented");
    let divergent = meridian_tests::chaos::divergence(&region).await;
    assert!(divergent.is_empty(), "{divergent:?}");
}
