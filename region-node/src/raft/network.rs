//! Raft transport over gRPC: one lazily connected HTTP/2 channel per peer, shared by every group
//! (requests carry their group id), with openraft messages encoded as bincode payloads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meridian_api::raftpb::raft_transport_client::RaftTransportClient;
use meridian_api::raftpb::GroupMessage;
use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use super::{NodeId, TypeConfig};

/// Largest encoded AppendEntries sent: larger ones are split (openraft resends fewer entries).
/// openraft 0.9 cancels every AppendEntries after `heartbeat_interval` and resends the same
/// range, so one message must stay quick to transfer and fsync however big client messages are.
const MAX_RPC_BYTES: usize = 4 << 20;

/// Channels to the other nodes of the region, by node id.
#[derive(Default)]
pub struct Peers {
    channels: Mutex<HashMap<NodeId, (String, Channel)>>,
}

impl Peers {
    /// The channel to `node` at `addr`, created on first use and reused afterwards.
    pub fn channel(&self, node: NodeId, addr: &str) -> Result<Channel, tonic::transport::Error> {
        let mut map = self.channels.lock().expect("peers lock");
        if let Some((a, ch)) = map.get(&node) {
            if a == addr {
                return Ok(ch.clone());
            }
        }
        let ch = Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_while_idle(true)
            .connect_lazy();
        map.insert(node, (addr.to_string(), ch.clone()));
        Ok(ch)
    }
}

pub struct NetworkFactory {
    pub group: u32,
    pub peers: Arc<Peers>,
}

pub struct GroupConnection {
    group: u32,
    target: NodeId,
    client: Option<RaftTransportClient<Channel>>,
    connect_error: Option<String>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = GroupConnection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        let (client, connect_error) = match self.peers.channel(target, &node.addr) {
            Ok(ch) => (
                Some(
                    RaftTransportClient::new(ch)
                        .max_decoding_message_size(64 << 20)
                        .max_encoding_message_size(64 << 20),
                ),
                None,
            ),
            Err(e) => (
                None,
                Some(format!("bad address {:?} of node {target}: {e}", node.addr)),
            ),
        };
        GroupConnection {
            group: self.group,
            target,
            client,
            connect_error,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportError(String);

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    bincode::serialize(v).expect("raft messages are serialisable")
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    bincode::deserialize(bytes).map_err(|e| format!("undecodable payload: {e}"))
}

impl GroupConnection {
    /// `entries`: the entry count of an AppendEntries request (to split an oversized one).
    async fn call<Req, Resp, E>(
        &mut self,
        kind: RpcKind,
        req: &Req,
        entries: Option<usize>,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let Some(client) = self.client.as_mut() else {
            let why = self.connect_error.clone().unwrap_or_default();
            return Err(RPCError::Unreachable(Unreachable::new(&TransportError(
                why,
            ))));
        };
        let payload = encode(req);
        if payload.len() > MAX_RPC_BYTES {
            if let Some(entries) = entries {
                // openraft retries with fewer entries per message.
                let hint = (entries as u64 / 2).max(1);
                return Err(RPCError::PayloadTooLarge(
                    PayloadTooLarge::new_entries_hint(hint),
                ));
            }
        }
        let mut request = tonic::Request::new(GroupMessage {
            group: self.group,
            payload,
        });
        request.set_timeout(option.hard_ttl());
        let reply = match kind {
            RpcKind::Append => client.append_entries(request).await,
            RpcKind::Vote => client.vote(request).await,
            RpcKind::Snapshot => client.install_snapshot(request).await,
        };
        let reply = reply.map_err(|s| {
            let e = TransportError(format!("{}: {}", s.code(), s.message()));
            if s.code() == tonic::Code::Unavailable {
                RPCError::Unreachable(Unreachable::new(&e))
            } else {
                RPCError::Network(NetworkError::new(&e))
            }
        })?;
        let result: Result<Resp, E> = decode(&reply.into_inner().payload)
            .map_err(|e| RPCError::Network(NetworkError::new(&TransportError(e))))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

#[derive(Clone, Copy)]
enum RpcKind {
    Append,
    Vote,
    Snapshot,
}

impl RaftNetwork<TypeConfig> for GroupConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let n = rpc.entries.len();
        self.call(RpcKind::Append, &rpc, Some(n), &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(RpcKind::Snapshot, &rpc, None, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(RpcKind::Vote, &rpc, None, &option).await
    }
}
