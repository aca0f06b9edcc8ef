//! gRPC front ends: the client API (queues, topics, credentials, cluster status) and the node-to-node transport.

mod cluster_api;
mod credential_api;
mod message_stream;
mod queue_api;
mod raft_service;
mod topic_api;

pub use cluster_api::{ClusterApi, FaultApi};
pub use credential_api::CredentialApi;
pub use queue_api::QueueApi;
pub use raft_service::RaftTransportService;
pub use topic_api::TopicApi;
