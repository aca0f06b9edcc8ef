//! The simulation's own seeded randomness (client choices, message loss, fsync latency,
//! nemesis schedule). Every host runs on the test's thread, so one thread-local stream, drawn
//! in simulation order, is deterministic for a seed.

use std::cell::RefCell;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

thread_local! {
    static RNG: RefCell<StdRng> = RefCell::new(StdRng::seed_from_u64(0));
}

pub fn seed(seed: u64) {
    // A different stream from openraft's (seeded with `seed` too), so neither shifts the other.
    RNG.with(|r| *r.borrow_mut() = StdRng::seed_from_u64(seed ^ 0x5eed_5eed_5eed_5eed));
}

pub fn below(n: u64) -> u64 {
    RNG.with(|r| r.borrow_mut().gen_range(0..n.max(1)))
}

pub fn chance_per_mille(p: u32) -> bool {
    p > 0 && below(1000) < u64::from(p)
}
