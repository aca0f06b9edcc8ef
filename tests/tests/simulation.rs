//! Deterministic simulation of a region (see `meridian_tests::sim`): fixed seeds in CI, each
//! with every nemesis mixed in; the same seed twice gives the same history; and `replay` runs
//! any seed given in `MERIDIAN_SIM_SEED` (for reproducing a failure, or `scripts/sim.sh`);
//! `MERIDIAN_SIM_TRACE=1` prints its event trace, `MERIDIAN_SIM_DEBUG=1` adds every node's
//! Raft state changes to it.

use std::time::Duration;

use meridian_tests::sim::{run, SimConfig, SimNemesis};

fn check(cfg: &SimConfig) {
    let report = run(cfg);
    eprintln!("{report}");
    assert!(
        report.sends_acked > 0,
        "no send was ever acknowledged: {report}"
    );
    assert!(report.ok(), "{report}");
}

/// The fixed CI seeds (2-14 s each in a debug build, by machine), split over two tests so they
/// run in parallel.
#[test]
fn seeds_1_to_12_keep_every_invariant() {
    for seed in 1..=12 {
        check(&SimConfig::new(seed));
    }
}

#[test]
fn seeds_13_to_24_keep_every_invariant() {
    for seed in 13..=24 {
        check(&SimConfig::new(seed));
    }
}

#[test]
fn crash_all_nodes_repeatedly_loses_nothing() {
    let mut cfg = SimConfig::new(77);
    cfg.nemeses = vec![SimNemesis::CrashAll, SimNemesis::SlowDisk];
    check(&cfg);
}

/// The checker is not vacuous: a disk that acknowledges before it syncs (lazy fsync) loses
/// acknowledged data when every node crashes at once, and the simulation says so.
#[test]
fn acknowledging_before_fsync_is_caught() {
    let caught = (1..=5).find_map(|seed| {
        let mut cfg = SimConfig::new(seed);
        cfg.nemeses = vec![SimNemesis::CrashAll];
        cfg.broken_fsync = true;
        let report = run(&cfg);
        eprintln!("{report}");
        (!report.ok()).then_some(report)
    });
    assert!(
        caught.is_some(),
        "five runs with a lying disk found nothing"
    );
}

/// One simulation of `seed` in a process of its own (this test binary, running `replay`), and
/// the trace hash it reports. Why a process: tokio numbers tasks process-wide and places each
/// task in a shard of its runtime by that number, and a crashed host's tasks are dropped shard by
/// shard. Simulations on parallel test threads of one process thus perturb the order in which a
/// crash closes connections, and with it the rest of the run; alone in a process, a seed replays.
fn run_alone(seed: u64, secs: u64) -> (u64, String) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "replay", "--nocapture", "--test-threads=1"])
        .env("MERIDIAN_SIM_SEED", seed.to_string())
        .env("MERIDIAN_SIM_SECS", secs.to_string())
        .env_remove("MERIDIAN_SIM_NEMESES")
        .output()
        .expect("run the simulation in a process of its own");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "seed {seed} failed:\n{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with(&format!("seed {seed}:")))
        .unwrap_or_else(|| panic!("no report for seed {seed}:\n{stderr}"))
        .to_string();
    let hash = line
        .rsplit_once("trace ")
        .and_then(|(_, h)| u64::from_str_radix(h.trim(), 16).ok())
        .unwrap_or_else(|| panic!("no trace hash in {line:?}"));
    (hash, line)
}

#[test]
fn a_seed_replays_exactly() {
    let (a, line_a) = run_alone(4242, 15);
    let (b, line_b) = run_alone(4242, 15);
    assert_eq!(a, b, "same seed, different histories:\n{line_a}\n{line_b}");
    assert_eq!(line_a, line_b);
    let (other, _) = run_alone(4243, 15);
    assert_ne!(a, other, "the seed changes nothing");
}

/// `MERIDIAN_SIM_SEED=<n> [MERIDIAN_SIM_SECS=<simulated s>] [MERIDIAN_SIM_NEMESES=a,b]`: one
/// seed, for reproducing a failure or a long run of chosen nemeses (names as in `SimNemesis`).
#[test]
fn replay() {
    let Ok(seed) = std::env::var("MERIDIAN_SIM_SEED") else {
        return;
    };
    let mut cfg = SimConfig::new(seed.parse().expect("MERIDIAN_SIM_SEED is a number"));
    if let Some(s) = std::env::var("MERIDIAN_SIM_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        cfg.chaos = Duration::from_secs(s);
    }
    if let Ok(list) = std::env::var("MERIDIAN_SIM_NEMESES") {
        cfg.nemeses = list
            .split(',')
            .map(|n| SimNemesis::parse(n.trim()).unwrap_or_else(|| panic!("unknown nemesis {n:?}")))
            .collect();
    }
    let names: Vec<&str> = cfg.nemeses.iter().map(|n| n.name()).collect();
    if let Ok(filter) = std::env::var("MERIDIAN_SIM_LOG") {
        // Without wall-clock times, so two runs' logs can be diffed.
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .without_time()
            .with_ansi(false)
            .init();
    }
    let report = run(&cfg);
    eprintln!(
        "{report}\n{}\n{}",
        meridian_tests::sim::SimReport::HEADER,
        report.row(&names.join(","))
    );
    assert!(
        report.sends_acked > 0,
        "no send was ever acknowledged: {report}"
    );
    assert!(report.ok(), "{report}");
}
