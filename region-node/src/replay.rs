//! Replay protection for signed HTTP requests: each (SecretId, Nonce) is accepted once within
//! the timestamp window.
//!
//! The nonce travels with the request's first execution on a group leader and is checked in
//! that leader's cache before anything happens. The same signed request always names the same
//! queue (the signature covers every parameter), so a replay, to whichever node, reaches the
//! same group and the same leader and is refused; the check costs no extra hop. A new leader
//! starts with an empty cache: replays inside the window right after a leader change are not
//! detected.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// A verified request's nonce, to be recorded by the leader that executes the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NonceCheck {
    pub secret_id: String,
    pub nonce: String,
    pub now_s: i64,
    pub window_s: i64,
}

tokio::task_local! {
    /// The nonce of the HTTP request this task serves, until its first group execution takes it.
    static PENDING: RefCell<Option<NonceCheck>>;
}

/// Runs `f` (one HTTP request's action) with `check` pending for its first group execution.
pub async fn with_pending<F: std::future::Future>(check: NonceCheck, f: F) -> F::Output {
    PENDING.scope(RefCell::new(Some(check)), f).await
}

/// Takes the pending nonce of the current request, if any (the first caller gets it).
pub fn take_pending() -> Option<NonceCheck> {
    PENDING.try_with(|p| p.borrow_mut().take()).ok().flatten()
}

/// Nonces seen within their window. Keys are 128-bit keyed hashes of (SecretId, Nonce), so an
/// entry is small whatever the client sends and nobody outside can aim for collisions.
pub struct NonceCache {
    hashers: (RandomState, RandomState),
    seen: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    /// Key → expiry (seconds).
    expiry: HashMap<u128, i64>,
    /// Keys in the order they were inserted, with the expiry they were given: expiries grow
    /// with insertion (up to clock differences between nodes), so the expired ones are at the
    /// front and each insert retires them in amortized O(1). A full scan here, once past a
    /// size, cost every request O(entries) and cut CMQ HTTP throughput fivefold after a
    /// minute of load.
    order: VecDeque<(i64, u128)>,
}

impl Default for NonceCache {
    fn default() -> Self {
        Self {
            hashers: (RandomState::new(), RandomState::new()),
            seen: Mutex::default(),
        }
    }
}

impl NonceCache {
    fn key(&self, secret_id: &str, nonce: &str) -> u128 {
        let hi = self.hashers.0.hash_one((secret_id, nonce));
        let lo = self.hashers.1.hash_one((secret_id, nonce));
        (u128::from(hi) << 64) | u128::from(lo)
    }

    /// Records the nonce; false if it was already used and has not expired.
    pub fn insert(&self, secret_id: &str, nonce: &str, now_s: i64, window_s: i64) -> bool {
        let key = self.key(secret_id, nonce);
        let mut seen = self.seen.lock().expect("nonce lock");
        while let Some(&(exp, old)) = seen.order.front() {
            if exp > now_s {
                break;
            }
            seen.order.pop_front();
            // Only if not re-inserted (later expiry) or removed since.
            if seen.expiry.get(&old) == Some(&exp) {
                seen.expiry.remove(&old);
            }
        }
        match seen.expiry.get(&key) {
            Some(&exp) if exp > now_s => false,
            _ => {
                // A request is valid while its Timestamp is within ±window of now, so its nonce
                // must be remembered for twice the window.
                let exp = now_s + 2 * window_s;
                seen.expiry.insert(key, exp);
                seen.order.push_back((exp, key));
                true
            }
        }
    }

    /// Forgets a nonce whose request was not executed after all (safe to retry).
    pub fn remove(&self, secret_id: &str, nonce: &str) {
        let key = self.key(secret_id, nonce);
        self.seen.lock().expect("nonce lock").expiry.remove(&key);
    }

    /// How many nonces are remembered.
    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.seen.lock().expect("nonce lock").expiry.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_per_window() {
        let c = NonceCache::default();
        assert!(c.insert("AKID1", "7", 1000, 300));
        assert!(!c.insert("AKID1", "7", 1100, 300));
        assert!(c.insert("AKID2", "7", 1100, 300), "per SecretId");
        assert!(
            c.insert("AKID1", "7", 1601, 300),
            "expired after twice the window"
        );
    }

    #[test]
    fn expired_nonces_are_forgotten_as_time_passes() {
        let c = NonceCache::default();
        for i in 0..1000 {
            assert!(c.insert("AKID1", &i.to_string(), 1000 + i / 100, 5));
        }
        // At 1010 every nonce inserted before 1001 has expired (1000 + 2*5).
        assert!(c.insert("AKID1", "new", 1010, 5));
        assert_eq!(c.remembered(), 901, "the 100 from second 1000 are gone");
        assert!(
            !c.insert("AKID1", "999", 1010, 5),
            "still inside its window"
        );
        c.remove("AKID1", "999");
        assert!(
            c.insert("AKID1", "999", 1010, 5),
            "removed, so accepted again"
        );
        // A re-inserted key is not dropped by its older queue entry.
        assert!(
            c.insert("AKID1", "0", 1010, 5),
            "expired, so accepted again"
        );
        assert!(c.insert("AKID1", "x", 1019, 5));
        assert!(
            !c.insert("AKID1", "0", 1019, 5),
            "re-inserted at 1010, expires at 1020"
        );
        assert!(c.insert("AKID1", "0", 1020, 5));
    }
}
