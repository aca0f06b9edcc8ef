//! A node's storage, shared by every Raft group (key prefix per group): the Raft logs in
//! segment files of our own, the state rows and snapshot records in two RocksDB instances, and
//! a group-commit writer so that all groups' appends share one sync.

mod engine;
mod log_store;
mod segments;

pub use engine::{
    free_bytes, is_state_cf, Durability, Engine, LogJob, LogOp, StorageEngine, StorageMetrics,
    CF_LOG, CF_META, CF_SNAPSHOT, CF_STATE_GROUPS, CF_STATE_MESSAGES, STATE_DB_CFS,
};
pub use log_store::LogStore;

/// Key of a per-group record: the group id big-endian, then the suffix.
pub fn group_key(group: u32, suffix: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + suffix.len());
    k.extend_from_slice(&group.to_be_bytes());
    k.extend_from_slice(suffix);
    k
}

/// Runs blocking disk work from async code without stalling the other tasks of a
/// multi-threaded runtime (`block_in_place`); inline on a single-threaded one, as a
/// deterministic simulation has, where a thread pool would make timing, and so the run,
/// depend on the OS.
pub fn run_blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}
