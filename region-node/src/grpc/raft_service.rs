//! Receives Raft RPCs and forwarded client requests from the other nodes of the region.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use meridian_api::raftpb::raft_transport_server::RaftTransport;
use meridian_api::raftpb::GroupMessage;
use tonic::{Request, Response, Status, Streaming};

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

type ReplyStream = Pin<Box<dyn Stream<Item = Result<GroupMessage, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl RaftTransport for RaftTransportService {
    type AppendStreamStream = ReplyStream;

    /// The group is the first message's; a transport error on the way in ends the requests.
    async fn append_stream(
        &self,
        req: Request<Streaming<GroupMessage>>,
    ) -> Result<Response<ReplyStream>, Status> {
        let mut inbound = req.into_inner();
        // A leader with nothing to replicate yet sends nothing: that wait must not hold up this
        // node's shutdown.
        let first = tokio::select! {
            m = inbound.message() => m?,
            () = self.node.stopped() => None,
        };
        let Some(first) = first else {
            return Ok(Response::new(Box::pin(futures::stream::empty())));
        };
        let group = first.group;
        let rest = inbound
            .take_while(|m| std::future::ready(m.is_ok()))
            .filter_map(move |m| {
                std::future::ready(m.ok().filter(|m| m.group == group).map(|m| m.payload))
            });
        let requests = futures::stream::once(std::future::ready(first.payload)).chain(rest);
        let replies = self.node.serve_append_stream(group, requests)?;
        Ok(Response::new(Box::pin(
            replies.map(move |payload| Ok(GroupMessage { group, payload })),
        )))
    }

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
