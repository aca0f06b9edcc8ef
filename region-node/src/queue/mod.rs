//! The CMQ queue model of one Raft group: pure, deterministic, no I/O and no clock.

mod group;
mod model;
mod rows;

pub use group::{BodySource, Credential, GroupState, OutboxEntry};
pub use model::{Message, Queue, QueueChanges, QueueCounters};
pub use rows::{body_key, group_rows, is_body_key, RowError, RowOp, Table, TAG_APPLIED};

#[cfg(test)]
mod tests;
