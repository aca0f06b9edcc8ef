//! The node-to-node transport seam: Raft RPCs and forwarded client requests to another node.
//! [`GrpcTransport`] is the product (one lazily connected HTTP/2 channel per peer, shared by
//! every group); fault tests wrap it (`faults::FaultyTransport`) to partition, delay or drop.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use futures::stream::{self, BoxStream};
use futures::{FutureExt, StreamExt, TryStreamExt};
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

    /// Connects to node `target` if not connected, failing at once if it cannot: an append
    /// stream opened to a dead node would otherwise fail only inside the stream, where openraft
    /// does not back off, and retry in a hot loop.
    async fn connect(&self, target: NodeId, addr: &str) -> Result<(), tonic::Status> {
        let _ = (target, addr);
        Ok(())
    }

    /// Opens a stream of appends to `group` on node `target`: `requests` go out in order, each
    /// without waiting for the reply to the last, and the replies come back in the same order.
    /// An error ends the stream.
    fn append_stream<'a>(
        &'a self,
        target: NodeId,
        addr: &'a str,
        group: u32,
        requests: BoxStream<'static, Vec<u8>>,
    ) -> BoxStream<'a, Result<Vec<u8>, tonic::Status>>;
}

/// Opens the HTTP/2 stream of [`GrpcTransport::append_stream`]. tonic takes the requests from a
/// channel (its streaming body cannot be proven `Send` over a boxed stream), fed by a task that
/// stops with the stream.
fn open_append_stream(
    channel: Channel,
    mut requests: BoxStream<'static, GroupMessage>,
) -> BoxStream<'static, Result<GroupMessage, tonic::Status>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let feeder = AbortOnDrop(tokio::spawn(async move {
        while let Some(m) = requests.next().await {
            if tx.send(m).await.is_err() {
                return;
            }
        }
    }));
    let open = async move {
        let mut client = RaftTransportClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let outbound = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok::<_, tonic::Status>(client.append_stream(outbound).await?.into_inner())
    };
    open.into_stream()
        .try_flatten()
        .map(move |r| {
            let _feeding = &feeder;
            r
        })
        .boxed()
}

/// Aborts a task when dropped: a task that feeds a stream stops with the stream.
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
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

    async fn connect(&self, target: NodeId, addr: &str) -> Result<(), tonic::Status> {
        let channel = self.channel(target, addr)?;
        tonic::client::Grpc::new(channel)
            .ready()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("node {target} at {addr}: {e}")))
    }

    /// One HTTP/2 stream for the session: the requests are written as openraft produces them
    /// and the replies read as the follower answers, so many appends are in flight at once.
    fn append_stream<'a>(
        &'a self,
        target: NodeId,
        addr: &'a str,
        group: u32,
        requests: BoxStream<'static, Vec<u8>>,
    ) -> BoxStream<'a, Result<Vec<u8>, tonic::Status>> {
        let channel = match self.channel(target, addr) {
            Ok(ch) => ch,
            Err(e) => return stream::once(std::future::ready(Err(e))).boxed(),
        };
        let outbound = requests
            .map(move |payload| GroupMessage { group, payload })
            .boxed();
        open_append_stream(channel, outbound)
            .map_ok(|m| m.payload)
            .boxed()
    }
}
