//! The Meridian region node: RocksDB storage with group commit, openraft groups, the CMQ queue
//! state machine and the gRPC front ends.

pub mod clock;
pub mod command;
pub mod config;
pub mod error;
pub mod grpc;
pub mod node;
pub mod placement;
pub mod queue;
pub mod raft;
pub mod receipt;
pub mod server;
pub mod storage;

pub use config::NodeConfig;
pub use error::NodeError;
