//! Receives Raft RPCs and forwarded client requests from the other nodes of the region.

use std::sync::Arc;

use meridian_api::raftpb::raft_transport_server::RaftTransport;
use meridian_api::raftpb::GroupMessage;
use tonic::{Request, Response, Status};

use crate::node::RegionNode;
use crate::transport::RpcKind;

pub struct RaftTransportService {
    pub node: Arc<RegionNode>,
}

impl RaftTransportService {
    async fn serve(
        &self,
        kind: RpcKind,
        req: Request<GroupMessage>,
    ) -> Result<Response<GroupMessage>, Status> {
        let m = req.into_inner();
        let group = m.group;
        let payload = self.node.serve_rpc(kind, m).await?;
        Ok(Response::new(GroupMessage { group, payload }))
    }
}

#[tonic::async_trait]
impl RaftTransport for RaftTransportService {
    async fn append_entries(
        &self,
        req: Request<GroupMessage>,
    ) -> Result<Response<GroupMessage>, Status> {
        self.serve(RpcKind::Append, req).await
    }

    async fn vote(&self, req: Request<GroupMessage>) -> Result<Response<GroupMessage>, Status> {
        self.serve(RpcKind::Vote, req).await
    }

    async fn install_snapshot(
        &self,
        req: Request<GroupMessage>,
    ) -> Result<Response<GroupMessage>, Status> {
        self.serve(RpcKind::Snapshot, req).await
    }

    async fn forward(&self, req: Request<GroupMessage>) -> Result<Response<GroupMessage>, Status> {
        self.serve(RpcKind::Forward, req).await
    }
}
