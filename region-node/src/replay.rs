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
use std::collections::HashMap;
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

#[derive(Default)]
pub struct NonceCache {
    seen: Mutex<HashMap<(String, String), i64>>,
}

impl NonceCache {
    /// Records the nonce; false if it was already used and has not expired.
    pub fn insert(&self, secret_id: &str, nonce: &str, now_s: i64, window_s: i64) -> bool {
        let mut seen = self.seen.lock().expect("nonce lock");
        if seen.len() > 100_000 {
            seen.retain(|_, &mut exp| exp > now_s);
        }
        let key = (secret_id.to_string(), nonce.to_string());
        match seen.get(&key) {
            Some(&exp) if exp > now_s => false,
            _ => {
                // A request is valid while its Timestamp is within ±window of now, so its nonce
                // must be remembered for twice the window.
                seen.insert(key, now_s + 2 * window_s);
                true
            }
        }
    }

    /// Forgets a nonce whose request was not executed after all (safe to retry).
    pub fn remove(&self, secret_id: &str, nonce: &str) {
        let key = (secret_id.to_string(), nonce.to_string());
        self.seen.lock().expect("nonce lock").remove(&key);
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
}
