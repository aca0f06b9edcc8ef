//! Meridian's wire contracts: the gRPC definitions, CMQ error codes, and the validation rules and
//! limits of the CMQ queue model that every front end shares.

pub mod cmq_http;
pub mod error;
pub mod limits;
pub mod stream_client;
pub mod topics;

pub use error::{CmqCode, CmqError, CmqResult};

/// The client API (`proto/meridian.proto`).
pub mod pb {
    tonic::include_proto!("meridian.v1");
}

/// The node-to-node transport inside a region (`proto/raft.proto`).
pub mod raftpb {
    tonic::include_proto!("meridian.raft");
}
