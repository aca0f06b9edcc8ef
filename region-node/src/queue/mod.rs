//! The CMQ queue model of one Raft group: pure, deterministic, no I/O and no clock.

mod group;
mod model;

pub use group::{Credential, GroupState, OutboxEntry};
pub use model::{Message, Queue, QueueCounters};

#[cfg(test)]
mod tests;
