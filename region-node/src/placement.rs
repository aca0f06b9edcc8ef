//! Which Raft group owns a queue. Group 0 is the metadata group; data groups are 1..=N.
//!
//! Placement is a stable hash of the tenant and the lower-cased name, so every node (and every
//! region with the same group count) agrees without a lookup. The hash is FNV-1a, written out here
//! because std's hasher may change between Rust releases and placement must never move.

use crate::command::QueueKey;

pub const META_GROUP: u32 = 0;

pub fn group_of(key: &QueueKey, data_groups: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.tenant.bytes().chain([0u8]).chain(key.name.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    1 + (h % u64::from(data_groups.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_is_stable_and_case_insensitive() {
        let a = group_of(&QueueKey::new("t", "Orders"), 4);
        assert_eq!(a, group_of(&QueueKey::new("t", "orders"), 4));
        assert!((1..=4).contains(&a));
        // Pinned value: changing the hash would move existing queues.
        assert_eq!(group_of(&QueueKey::new("", "orders"), 1000), 199);
    }
}
