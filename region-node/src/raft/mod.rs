//! openraft wiring: type configuration, the state machine adapter and the gRPC network.

pub mod network;
pub mod proposer;
pub mod runtime;
pub mod state_machine;
pub mod watch;

use crate::command::{CommandBatch, OpResult};

pub type NodeId = u64;

openraft::declare_raft_types!(
    /// Meridian's Raft types: commands in, results out.
    ///
    /// `LeaderId` is standard Raft's: one leader per term. openraft's default ("advanced" leader
    /// ids ordered by (term, node id)) lets a voter grant a second candidate of the same term;
    /// the simulation saw two leaders of one term 10 ms apart. Safe by openraft's design, but not
    /// the election-safety invariant we check and reason with.
    pub TypeConfig:
        D = CommandBatch,
        R = Vec<OpResult>,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        LeaderId = openraft::impls::leader_id_std::LeaderId<u64, NodeId>,
        AsyncRuntime = runtime::MeridianRuntime,
);

pub use state_machine::SnapshotData;

pub type Raft = openraft::Raft<TypeConfig, state_machine::StateMachineStore>;
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
pub type Membership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;
pub type Snapshot = openraft::type_config::alias::SnapshotOf<TypeConfig, SnapshotData>;
