//! openraft's network for one group over the node's [`Transport`] (requests carry their group
//! id), with openraft messages encoded as bincode payloads.
//!
//! Appends are pipelined: openraft streams AppendEntries requests into [`stream_append`], which
//! sends each at once on one ordered [`Transport::append_stream`] and yields the follower's
//! replies as they come, so many appends (and their fsyncs on the follower) are in flight.
//!
//! [`stream_append`]: RaftNetworkV2::stream_append

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::{self, BoxStream};
use futures::{FutureExt, Stream, StreamExt};
use meridian_api::raftpb::GroupMessage;
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult, VoteRequest,
    VoteResponse,
};
use openraft::{BasicNode, OptionalSend, RaftNetworkV2};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::{NodeId, Snapshot, SnapshotData, SnapshotMeta, TypeConfig, Vote};
use crate::transport::{RpcKind, Transport};

/// Largest encoded AppendEntries sent: a larger request is split into consecutive ones, so one
/// message stays quick to transfer and fsync however big client messages are.
const MAX_RPC_BYTES: usize = 4 << 20;

/// How long the oldest unanswered append of a stream may wait for its reply before the stream
/// is given up (openraft then backs off and opens a new one). Idle streams never time out.
const MIN_STREAM_REPLY_WAIT: Duration = Duration::from_secs(1);

pub struct NetworkFactory {
    pub group: u32,
    pub transport: Arc<dyn Transport>,
    pub stats: Arc<ReplicationStats>,
}

/// How one group's leader streams appends to its followers (summed over followers): the
/// pipeline's depth is what 0.9's one-append-at-a-time replication could not have.
#[derive(Debug, Default)]
pub struct ReplicationStats {
    /// Append streams opened (one per follower and replication session).
    pub streams_opened: AtomicU64,
    /// Appends sent on streams.
    pub appends_streamed: AtomicU64,
    /// Appends sent and not yet answered, now.
    pub in_flight: AtomicU64,
    /// The most appends ever unanswered at once on one stream.
    pub in_flight_max: AtomicU64,
}

pub struct GroupConnection {
    group: u32,
    target: NodeId,
    addr: String,
    transport: Arc<dyn Transport>,
    stats: Arc<ReplicationStats>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = GroupConnection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        GroupConnection {
            group: self.group,
            target,
            addr: node.addr.clone(),
            transport: self.transport.clone(),
            stats: self.stats.clone(),
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

/// A whole snapshot in one message: the leader's vote, the meta, and the rows.
#[derive(Serialize, Deserialize)]
pub struct SnapshotTransfer {
    pub vote: Vote,
    pub meta: SnapshotMeta,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// A follower's answer as it travels: openraft's reply, or why its Raft could not answer
/// (stopped, fatal error), as text.
pub type Remote<T> = Result<T, String>;

fn status_error(target: NodeId, s: &tonic::Status) -> RPCError<TypeConfig> {
    let e = TransportError(format!("node {target}: {}: {}", s.code(), s.message()));
    if s.code() == tonic::Code::Unavailable {
        RPCError::Unreachable(Unreachable::new(&e))
    } else {
        RPCError::Network(NetworkError::new(&e))
    }
}

fn remote_error(target: NodeId, e: String) -> RPCError<TypeConfig> {
    RPCError::Unreachable(Unreachable::new(&TransportError(format!(
        "node {target} cannot answer: {e}"
    ))))
}

fn decode_error(e: String) -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::new(&TransportError(e)))
}

/// `req` as requests of at most [`MAX_RPC_BYTES`] encoded, each continuing the last; one entry
/// larger than that still goes alone.
fn split(req: AppendEntriesRequest<TypeConfig>) -> Vec<Vec<u8>> {
    let bytes = encode(&req);
    if bytes.len() <= MAX_RPC_BYTES || req.entries.len() <= 1 {
        return vec![bytes];
    }
    let AppendEntriesRequest {
        vote,
        prev_log_id,
        leader_commit,
        mut entries,
    } = req;
    let tail = entries.split_off(entries.len() / 2);
    let head_last = entries.last().map(|e| e.log_id);
    let mut out = split(AppendEntriesRequest {
        vote,
        prev_log_id,
        leader_commit,
        entries,
    });
    out.extend(split(AppendEntriesRequest {
        vote,
        prev_log_id: head_last,
        leader_commit,
        entries: tail,
    }));
    out
}

/// A stream's unanswered requests (their send times, oldest first), counted in the group's
/// [`ReplicationStats`].
struct Outstanding {
    sent: Mutex<VecDeque<Instant>>,
    stats: Arc<ReplicationStats>,
}

impl Outstanding {
    fn new(stats: Arc<ReplicationStats>) -> Arc<Self> {
        stats.streams_opened.fetch_add(1, Ordering::Relaxed);
        Arc::new(Self {
            sent: Mutex::default(),
            stats,
        })
    }

    fn push(&self) {
        let mut sent = self.sent.lock().expect("outstanding lock");
        sent.push_back(Instant::now());
        self.stats.appends_streamed.fetch_add(1, Ordering::Relaxed);
        self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        self.stats
            .in_flight_max
            .fetch_max(sent.len() as u64, Ordering::Relaxed);
    }

    fn oldest(&self) -> Option<Instant> {
        self.sent.lock().expect("outstanding lock").front().copied()
    }

    fn answered(&self) {
        if self
            .sent
            .lock()
            .expect("outstanding lock")
            .pop_front()
            .is_some()
        {
            self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        let left = self.sent.get_mut().map_or(0, |s| s.len()) as u64;
        self.stats.in_flight.fetch_sub(left, Ordering::Relaxed);
    }
}

/// `replies`, failing once the oldest unanswered request has waited longer than `wait`.
fn with_reply_deadline<'a>(
    replies: BoxStream<'a, Result<Vec<u8>, tonic::Status>>,
    outstanding: Arc<Outstanding>,
    wait: Duration,
) -> impl Stream<Item = Result<Vec<u8>, tonic::Status>> + Send + 'a {
    stream::unfold(Some(replies), move |replies| {
        let outstanding = outstanding.clone();
        async move {
            let mut replies = replies?;
            let reply = loop {
                // Nothing unanswered: an idle stream waits as long as openraft has nothing to
                // send, looking again now and then, as a request may go out meanwhile.
                let oldest = outstanding.oldest();
                let until = oldest.map_or_else(|| Instant::now() + wait / 4, |sent| sent + wait);
                match tokio::time::timeout_at(until, replies.next()).await {
                    Ok(r) => break r,
                    Err(_) if oldest.is_none() => continue,
                    Err(_) => {
                        let e = tonic::Status::deadline_exceeded(format!(
                            "no reply to an append within {wait:?}"
                        ));
                        return Some((Err(e), None));
                    }
                }
            };
            let reply = reply?;
            outstanding.answered();
            let failed = reply.is_err();
            Some((reply, (!failed).then_some(replies)))
        }
    })
}

impl GroupConnection {
    async fn call<Req, Resp>(
        &mut self,
        kind: RpcKind,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<TypeConfig>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
    {
        self.call_encoded(kind, encode(req), timeout).await
    }

    async fn call_encoded<Resp: DeserializeOwned>(
        &mut self,
        kind: RpcKind,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Resp, RPCError<TypeConfig>> {
        let msg = GroupMessage {
            group: self.group,
            payload,
        };
        let reply = self
            .transport
            .call(self.target, &self.addr, kind, msg, timeout)
            .await
            .map_err(|s| status_error(self.target, &s))?;
        let result: Remote<Resp> = decode(&reply).map_err(decode_error)?;
        result.map_err(|e| remote_error(self.target, e))
    }
}

impl RaftNetworkV2<TypeConfig> for GroupConnection {
    type SnapshotData = SnapshotData;

    /// One append (openraft's probes and heartbeats), split like a streamed one if too big.
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let parts = split(rpc);
        let n = parts.len();
        for (i, part) in parts.into_iter().enumerate() {
            let reply: AppendEntriesResponse<TypeConfig> = self
                .call_encoded(RpcKind::Append, part, option.hard_ttl())
                .await?;
            // The next part continues this one: only a full success lets it go. Anything else
            // (partial success, conflict, higher vote) answers the whole request.
            if i + 1 == n || !matches!(reply, AppendEntriesResponse::Success) {
                return Ok(reply);
            }
        }
        unreachable!("split yields at least one part")
    }

    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> openraft::base::BoxFuture<
        's,
        Result<
            BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>,
            RPCError<TypeConfig>,
        >,
    >
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + OptionalSend + Unpin + 'static,
    {
        let wait = (option.hard_ttl() * 8).max(MIN_STREAM_REPLY_WAIT);
        let this = &*self;
        async move {
            let target = this.target;
            // An unreachable follower fails here, where openraft backs off before retrying.
            this.transport
                .connect(target, &this.addr)
                .await
                .map_err(|s| status_error(target, &s))?;
            let outstanding = Outstanding::new(this.stats.clone());
            let sent = outstanding.clone();
            let requests = input
                .flat_map(|req| stream::iter(split(req)))
                .map(move |bytes| {
                    sent.push();
                    bytes
                })
                .boxed();
            let replies = this
                .transport
                .append_stream(target, &this.addr, this.group, requests);
            let results = with_reply_deadline(replies, outstanding, wait).map(move |r| {
                let bytes = r.map_err(|s| status_error(target, &s))?;
                let result: Remote<StreamAppendResult<TypeConfig>> =
                    decode(&bytes).map_err(decode_error)?;
                result.map_err(|e| remote_error(target, e))
            });
            Ok(results.boxed())
        }
        .boxed()
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(RpcKind::Vote, &rpc, option.hard_ttl()).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        // Read from its checkpoint only now, to be sent; if a newer snapshot replaced it
        // meanwhile, openraft tries again with that one.
        let data = crate::storage::run_blocking(|| snapshot.snapshot.into_encoded())
            .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
        let transfer = SnapshotTransfer {
            vote,
            meta: snapshot.meta,
            data,
        };
        let send = self.call(RpcKind::Snapshot, &transfer, option.hard_ttl());
        tokio::select! {
            // Biased: no unseeded random branch choice in a simulation.
            biased;
            closed = cancel => Err(StreamingError::Closed(closed)),
            r = send => r.map_err(|e| match e {
                RPCError::Unreachable(u) => StreamingError::Unreachable(u),
                RPCError::Network(n) => StreamingError::Network(n),
                RPCError::Timeout(t) => StreamingError::Timeout(t),
                RPCError::RemoteError(r) => match r.source {},
            }),
        }
    }
}
