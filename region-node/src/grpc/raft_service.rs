//! Receives Raft RPCs and forwarded client requests from the other nodes of the region.

use std::sync::Arc;

use meridian_api::raftpb::raft_transport_server::RaftTransport;
use meridian_api::raftpb::GroupMessage;
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use tonic::{Request, Response, Status};

use crate::node::RegionNode;
use crate::raft::network::{decode, encode};
use crate::raft::{Raft, TypeConfig};

pub struct RaftTransportService {
    pub node: Arc<RegionNode>,
}

impl RaftTransportService {
    fn raft(&self, group: u32) -> Result<&Raft, Status> {
        self.node
            .groups()
            .get(group as usize)
            .map(|g| &g.raft)
            .ok_or_else(|| Status::not_found(format!("no raft group {group} on this node")))
    }
}

fn reply(group: u32, payload: Vec<u8>) -> Result<Response<GroupMessage>, Status> {
    Ok(Response::new(GroupMessage { group, payload }))
}

#[tonic::async_trait]
impl RaftTransport for RaftTransportService {
    async fn append_entries(
        &self,
        req: Request<GroupMessage>,
    ) -> Result<Response<GroupMessage>, Status> {
        let m = req.into_inner();
        let rpc: AppendEntriesRequest<TypeConfig> =
            decode(&m.payload).map_err(Status::invalid_argument)?;
        let res = self.raft(m.group)?.append_entries(rpc).await;
        reply(m.group, encode(&res))
    }

    async fn vote(&self, req: Request<GroupMessage>) -> Result<Response<GroupMessage>, Status> {
        let m = req.into_inner();
        let rpc: VoteRequest<u64> = decode(&m.payload).map_err(Status::invalid_argument)?;
        let res = self.raft(m.group)?.vote(rpc).await;
        reply(m.group, encode(&res))
    }

    async fn install_snapshot(
        &self,
        req: Request<GroupMessage>,
    ) -> Result<Response<GroupMessage>, Status> {
        let m = req.into_inner();
        let rpc: InstallSnapshotRequest<TypeConfig> =
            decode(&m.payload).map_err(Status::invalid_argument)?;
        let res = self.raft(m.group)?.install_snapshot(rpc).await;
        reply(m.group, encode(&res))
    }

    async fn forward(&self, req: Request<GroupMessage>) -> Result<Response<GroupMessage>, Status> {
        let m = req.into_inner();
        let payload = self.node.handle_forward(m.group, &m.payload).await;
        reply(m.group, payload)
    }
}
