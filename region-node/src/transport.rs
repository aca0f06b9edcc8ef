//! The node-to-node transport seam: Raft RPCs and forwarded client requests to another node.
//! [`GrpcTransport`] is the product (one lazily connected HTTP/2 channel per peer, shared by
//! every group); fault tests wrap it (`faults::FaultyTransport`) to partition, delay or drop.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use meridian_api::raftpb::raft_transport_client::RaftTransportClient;
use meridian_api::raftpb::GroupMessage;
use tonic::transport::{Channel, Endpoint};

use crate::raft::NodeId;

/// Largest message either way (bounded separately for Raft appends, see `raft::network`).
const MAX_MESSAGE: usize = 64 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RpcKind {
    Append,
    Vote,
    Snapshot,
    /// A client request for the group's leader.
    Forward,
}

#[tonic::async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Sends `msg` to node `target` at `addr` and returns the reply's payload.
    async fn call(
        &self,
        target: NodeId,
        addr: &str,
        kind: RpcKind,
        msg: GroupMessage,
        timeout: Duration,
    ) -> Result<Vec<u8>, tonic::Status>;
}

/// Channels to the other nodes of the region, by node id.
#[derive(Default)]
pub struct GrpcTransport {
    channels: Mutex<HashMap<NodeId, (String, Channel)>>,
}

impl GrpcTransport {
    /// The channel to `node` at `addr`, created on first use and reused afterwards.
    fn channel(&self, node: NodeId, addr: &str) -> Result<Channel, tonic::Status> {
        let mut map = self.channels.lock().expect("peers lock");
        if let Some((a, ch)) = map.get(&node) {
            if a == addr {
                return Ok(ch.clone());
            }
        }
        let ch = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| {
                tonic::Status::invalid_argument(format!("bad address {addr:?} of node {node}: {e}"))
            })?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_while_idle(true)
            .connect_lazy();
        map.insert(node, (addr.to_string(), ch.clone()));
        Ok(ch)
    }
}

#[tonic::async_trait]
impl Transport for GrpcTransport {
    async fn call(
        &self,
        target: NodeId,
        addr: &str,
        kind: RpcKind,
        msg: GroupMessage,
        timeout: Duration,
    ) -> Result<Vec<u8>, tonic::Status> {
        let mut client = RaftTransportClient::new(self.channel(target, addr)?)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let mut request = tonic::Request::new(msg);
        request.set_timeout(timeout);
        let reply = match kind {
            RpcKind::Append => client.append_entries(request).await,
            RpcKind::Vote => client.vote(request).await,
            RpcKind::Snapshot => client.install_snapshot(request).await,
            RpcKind::Forward => client.forward(request).await,
        }?;
        Ok(reply.into_inner().payload)
    }
}
