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
