//! Replay protection for signed HTTP requests: each (SecretId, Nonce) is accepted once within
//! the timestamp window. The cache lives on the leader of the metadata group, which every node
//! asks, so a request replayed to another node of the region is refused too. A new metadata
//! leader starts with an empty cache: replays inside the window right after a leader change
//! are not detected.

use std::collections::HashMap;
use std::sync::Mutex;

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
