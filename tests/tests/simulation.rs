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

/// The fixed CI seeds (about 2 s each), split over two tests so they run in parallel.
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

#[test]
fn a_seed_replays_exactly() {
    let mut cfg = SimConfig::new(4242);
    cfg.chaos = Duration::from_secs(15);
    let a = run(&cfg);
    let b = run(&cfg);
    assert!(a.ok(), "{a}");
    assert_eq!(
        a.trace_hash, b.trace_hash,
        "same seed, different histories:\n{a}\n{b}"
    );
    assert_eq!(
        (a.sends_acked, a.deliveries, a.deletes_acked, a.simulated_ms),
        (b.sends_acked, b.deliveries, b.deletes_acked, b.simulated_ms)
    );
    let mut other = cfg.clone();
    other.seed = 4243;
    assert_ne!(
        a.trace_hash,
        run(&other).trace_hash,
        "the seed changes nothing"
    );
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
