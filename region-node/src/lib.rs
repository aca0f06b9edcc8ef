//! The Meridian region node: RocksDB storage with group commit, openraft groups, the CMQ queue
//! state machine and the gRPC front ends.

// The large error types are openraft's `StorageError` and tonic's `Status`, fixed by the traits
// we implement; boxing them at every call site would only add noise.
#![allow(clippy::result_large_err)]

pub mod clock;
pub mod command;
pub mod config;
pub mod error;
pub mod faults;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod node;
pub mod ops;
pub mod placement;
pub mod push;
pub mod queue;
pub mod raft;
pub mod receipt;
pub mod replay;
pub mod server;
pub mod storage;
pub mod topic;
pub mod topic_ops;
pub mod transport;

pub use config::NodeConfig;
pub use error::NodeError;
