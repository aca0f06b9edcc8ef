//! openraft wiring: type configuration, the state machine adapter and the gRPC network.

pub mod network;
pub mod proposer;
pub mod runtime;
pub mod state_machine;

use std::io::Cursor;

use crate::command::{CommandBatch, OpResult};

pub type NodeId = u64;

openraft::declare_raft_types!(
    /// Meridian's Raft types: commands in, results out, snapshots as byte buffers.
    pub TypeConfig:
        D = CommandBatch,
        R = Vec<OpResult>,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = runtime::MeridianRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
