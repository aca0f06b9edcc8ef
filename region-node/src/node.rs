//! A region node: its Raft groups, and the execution of client requests on the leader of the
//! group that owns them (locally, or forwarded to the leader's node).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use meridian_api::limits::QueueAttributes;
use meridian_api::raftpb::GroupMessage;
use meridian_api::{CmqError, CmqResult};
use openraft::async_runtime::WatchReceiver;
use openraft::error::RaftError;
use openraft::raft::{AppendEntriesRequest, VoteRequest};
use openraft::{BasicNode, ServerState};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::clock::{Clock, SystemClock};
use crate::command::{Command, Op, OpResult, QueueKey, TransferItem};
use crate::config::NodeConfig;
use crate::error::NodeError;
use crate::faults::{Faults, FaultyClock, FaultyStorage, FaultyTransport};
use crate::placement::{group_of, META_GROUP};
use crate::raft::network::{
    decode, encode, NetworkFactory, Remote, ReplicationStats, SnapshotTransfer,
};
use crate::raft::proposer::{ProposeError, Proposer};
use crate::raft::state_machine::{SharedState, StateMachineStore};
use crate::raft::{NodeId, Raft, TypeConfig};
use crate::receipt::ReceiptSigner;
use crate::replay::NonceCheck;
use crate::storage::{Engine, LogStore, StorageEngine};
use crate::topic::{SubscriptionView, TopicView};
use crate::transport::{GrpcTransport, RpcKind, Transport};

/// How often a group leader proposes housekeeping (expiry, dead-lettering by time).
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(2);
/// Bounds of one outbox transfer to one group.
const OUTBOX_BATCH_ITEMS: usize = 1024;
const OUTBOX_BATCH_BYTES: usize = 1 << 20;

/// How long a request waits for its group to have a reachable leader.
const LEADER_WAIT: Duration = Duration::from_secs(10);

pub struct Group {
    pub id: u32,
    pub raft: Raft,
    pub proposer: Proposer,
    pub shared: Arc<SharedState>,
    /// The group's state machine (openraft holds another handle on it).
    pub sm: StateMachineStore,
    /// How this node, leading the group, streams appends to the others.
    pub replication: Arc<ReplicationStats>,
    /// Log bytes this node appended since it last asked for a snapshot by size.
    pub log_bytes: Arc<AtomicU64>,
}

/// A request executed by the leader of one group.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum GroupRequest {
    Write(Op),
    /// Receive with long poll: retried on the leader as messages arrive, until `wait_ms`
    /// (`None`: the queue's pollingWaitSeconds).
    Receive {
        key: QueueKey,
        max: u32,
        wait_ms: Option<u64>,
    },
    GetQueue {
        key: QueueKey,
    },
    ListQueues {
        tenant: String,
        search: String,
    },
    DeadLetterSources {
        dlq: QueueKey,
    },
    GetTopic {
        key: QueueKey,
    },
    ListTopics {
        tenant: String,
        search: String,
    },
    GetSubscription {
        key: QueueKey,
        name: String,
    },
    ListSubscriptions {
        key: QueueKey,
        search: String,
    },
    ListCredentials,
    /// A credential by SecretId, read on the metadata leader (linearizable).
    GetCredential {
        secret_id: String,
    },
    /// `request`, executed only if the leader has not seen its signed request's nonce
    /// (replay protection, see `replay`).
    Guarded {
        nonce: NonceCheck,
        request: Box<GroupRequest>,
    },
}

/// Whether a failed forward certainly never reached the leader (its connection could not be
/// made), so even a write can be retried elsewhere.
fn never_sent(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::Unavailable
        && (s.message().contains("tcp connect error") || s.message().contains("Connection refused"))
}

impl GroupRequest {
    /// The request itself, without the replay guard around it.
    fn inner(&self) -> &GroupRequest {
        match self {
            GroupRequest::Guarded { request, .. } => request,
            other => other,
        }
    }

    /// Requests with no effect on the leader, safe to retry elsewhere.
    fn is_read_only(&self) -> bool {
        matches!(
            self,
            GroupRequest::GetQueue { .. }
                | GroupRequest::ListQueues { .. }
                | GroupRequest::DeadLetterSources { .. }
                | GroupRequest::GetTopic { .. }
                | GroupRequest::ListTopics { .. }
                | GroupRequest::GetSubscription { .. }
                | GroupRequest::ListSubscriptions { .. }
                | GroupRequest::ListCredentials
                | GroupRequest::GetCredential { .. }
        )
    }

    /// The longest this request may legitimately take on the leader.
    fn max_wait(&self) -> Duration {
        match self.inner() {
            GroupRequest::Receive { wait_ms, .. } => Duration::from_millis(
                wait_ms.unwrap_or(u64::from(meridian_api::limits::MAX_POLLING_WAIT_SECONDS) * 1000),
            ),
            _ => Duration::ZERO,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum GroupReply {
    Op(OpResult),
    Queue(QueueView),
    /// `(name, queue_id)` pairs.
    Queues(Vec<(String, String)>),
    /// Credentials without their secret keys: `(secret_id, app_id, created_ms, revoked)`.
    Credentials(Vec<(String, u64, i64, bool)>),
    Credential(Option<crate::queue::Credential>),
    Topic(TopicView),
    Subscription(SubscriptionView),
    Subscriptions(Vec<SubscriptionView>),
}

/// A queue's attributes and counters as GetQueueAttributes reports them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueueView {
    pub queue_id: String,
    pub name: String,
    pub group: u32,
    pub attrs: QueueAttributes,
    pub created_ms: i64,
    pub modified_ms: i64,
    pub active: u64,
    pub inactive: u64,
    pub delayed: u64,
    pub rewindable: u64,
    pub min_msg_ms: i64,
}

/// `(name, id)` of the entries of `tenant` whose lower-cased name contains `search`.
fn named<T>(
    map: &BTreeMap<QueueKey, T>,
    tenant: &str,
    search: &str,
    name_and_id: impl Fn(&T) -> (String, String),
) -> Vec<(String, String)> {
    let search = search.to_ascii_lowercase();
    map.iter()
        .filter(|(k, _)| k.tenant == tenant && k.name.contains(&search))
        .map(|(_, v)| name_and_id(v))
        .collect()
}

/// Why a leader did not execute a request.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum ForwardError {
    /// This node is not (or no longer) the leader, and nothing was proposed: safe to retry.
    NotLeader,
    Cmq(CmqError),
}

/// The node's I/O boundaries: where its bytes are stored, how it reaches its peers, what time
/// it stamps on commands.
pub struct Seams {
    pub engine: Arc<dyn StorageEngine>,
    pub transport: Arc<dyn Transport>,
    pub clock: Arc<dyn Clock>,
}

pub struct RegionNode {
    pub id: NodeId,
    pub config: NodeConfig,
    pub engine: Arc<dyn StorageEngine>,
    groups: Vec<Group>,
    pub transport: Arc<dyn Transport>,
    /// Injected faults; `Some` only when the config enables fault injection (tests).
    pub faults: Option<Arc<Faults>>,
    /// The TLS client of HTTP push (web PKI roots plus `[topics] push_ca_file`), built once.
    pub push_tls: tokio_rustls::TlsConnector,
    pub receipts: ReceiptSigner,
    pub clock: Arc<dyn Clock>,
    /// Nonces of signed HTTP requests, used while this node leads the metadata group.
    pub nonces: crate::replay::NonceCache,
    /// Set when the node begins to stop: ends the append streams other nodes hold open to it,
    /// which would otherwise keep the gRPC server's graceful shutdown waiting forever.
    stopping: tokio::sync::watch::Sender<bool>,
}

impl RegionNode {
    /// Opens storage and starts every group's Raft; does not serve the network yet.
    pub async fn start(config: NodeConfig) -> Result<Arc<Self>, NodeError> {
        config.validate()?;
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            NodeError::Storage(format!("create {}: {e}", config.data_dir.display()))
        })?;
        let mut seams = Seams {
            engine: Arc::new(Engine::open(&config.data_dir.join("db"), &config.storage)?),
            transport: Arc::new(GrpcTransport::default()),
            clock: Arc::new(SystemClock),
        };
        let faults = config.faults.enabled.then(|| Arc::new(Faults::default()));
        if let Some(f) = &faults {
            tracing::warn!("fault injection is enabled: this node is for testing only");
            seams.engine = FaultyStorage::new(seams.engine, f.clone());
            seams.transport = Arc::new(FaultyTransport {
                inner: seams.transport,
                faults: f.clone(),
            });
            seams.clock = Arc::new(FaultyClock {
                inner: seams.clock,
                faults: f.clone(),
            });
        }
        Self::start_with(config, seams, faults).await
    }

    /// Starts every group's Raft on the given storage, transport and clock (a deterministic
    /// simulation passes its own); does not serve the network yet.
    pub async fn start_with(
        config: NodeConfig,
        seams: Seams,
        faults: Option<Arc<Faults>>,
    ) -> Result<Arc<Self>, NodeError> {
        config.validate()?;
        let push_tls = crate::push::tls_connector(&config.topics)
            .map_err(|e| NodeError::Config(format!("[topics] push_ca_file: {e}")))?;
        let Seams {
            engine,
            transport,
            clock,
        } = seams;
        let r = &config.raft;
        let raft_config = Arc::new(
            openraft::Config {
                cluster_name: "meridian".into(),
                heartbeat_interval: r.heartbeat_ms,
                election_timeout_min: r.election_timeout_min_ms,
                election_timeout_max: r.election_timeout_max_ms,
                max_payload_entries: r.max_payload_entries,
                max_in_snapshot_log_to_keep: r.logs_kept_after_snapshot,
                snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(r.snapshot_after_entries),
                // A follower whose disk lost its log (replaced, wiped) may rejoin and be
                // refilled by the leader, instead of openraft refusing the reverted log.
                allow_log_reversion: Some(true),
                // openraft 0.10 lets a restarted leader resume its old term by default. A leader
                // sends entries before its own copy is durable, so after a crash it could propose
                // a second, different entry under a log id a follower already holds (the
                // simulation found exactly that, seed 5). Standard Raft: it stands for election.
                enable_leader_restore: Some(false),
                ..Default::default()
            }
            .validate()
            .map_err(|e| NodeError::Config(format!("raft: {e}")))?,
        );
        let mut groups = Vec::new();
        for id in 0..=config.data_groups {
            let log = LogStore::new(id, engine.clone());
            let log_bytes = log.appended_bytes();
            // The node's groups share the body cache evenly.
            let cached_bodies =
                (config.storage.cached_bodies_mib << 20) / (u64::from(config.data_groups) + 1);
            let sm = StateMachineStore::open(id, config.data_groups, engine.clone(), cached_bodies)
                .map_err(|e| NodeError::Storage(e.to_string()))?;
            let shared = sm.shared.clone();
            let sm_handle = sm.clone();
            let replication = Arc::new(ReplicationStats::default());
            let net = NetworkFactory {
                group: id,
                transport: transport.clone(),
                stats: replication.clone(),
            };
            let raft = Raft::new(config.node_id, raft_config.clone(), net, log, sm)
                .await
                .map_err(|e| NodeError::Raft(e.to_string()))?;
            let proposer =
                Proposer::start(raft.clone(), r.max_batch_commands, r.max_inflight_batches);
            groups.push(Group {
                id,
                raft,
                proposer,
                shared,
                sm: sm_handle,
                replication,
                log_bytes,
            });
        }
        let secret = hex::decode(&config.cluster_secret).expect("validated");
        Ok(Arc::new(Self {
            id: config.node_id,
            receipts: ReceiptSigner::new(&secret),
            config,
            engine,
            groups,
            transport,
            clock,
            faults,
            push_tls,
            nonces: Default::default(),
            stopping: tokio::sync::watch::Sender::new(false),
        }))
    }

    /// Initialises every group on a fresh bootstrap node; a no-op once initialised.
    pub async fn bootstrap_if_configured(&self) -> Result<(), NodeError> {
        if !self.config.bootstrap {
            return Ok(());
        }
        let members: BTreeMap<NodeId, BasicNode> = self
            .config
            .members
            .iter()
            .map(|m| {
                (
                    m.id,
                    BasicNode {
                        addr: m.addr.clone(),
                    },
                )
            })
            .collect();
        for g in &self.groups {
            if g.raft
                .is_initialized()
                .await
                .map_err(|e| NodeError::Raft(e.to_string()))?
            {
                continue;
            }
            if let Err(e) = g.raft.initialize(members.clone()).await {
                tracing::warn!(group = g.id, "initialise: {e}");
            }
        }
        Ok(())
    }

    pub fn groups(&self) -> &[Group] {
        &self.groups
    }

    pub fn data_groups(&self) -> u32 {
        self.config.data_groups
    }

    pub fn group_of(&self, key: &QueueKey) -> u32 {
        group_of(key, self.config.data_groups)
    }

    fn group(&self, id: u32) -> CmqResult<&Group> {
        self.groups
            .get(id as usize)
            .ok_or_else(|| CmqError::internal(format!("no group {id} in this region")))
    }

    pub fn group_ref(&self, id: u32) -> Option<&Group> {
        self.groups.get(id as usize)
    }

    fn member_addr(&self, id: NodeId) -> Option<&str> {
        self.config
            .members
            .iter()
            .find(|m| m.id == id)
            .map(|m| m.addr.as_str())
    }

    /// The member this node would like to lead `group`, so leaders spread over nodes.
    pub fn preferred_leader(&self, group: u32) -> NodeId {
        let mut ids: Vec<NodeId> = self.config.members.iter().map(|m| m.id).collect();
        ids.sort_unstable();
        ids[group as usize % ids.len()]
    }

    /// Runs `req` on the leader of `group`, wherever it is.
    pub async fn execute(&self, group: u32, req: GroupRequest) -> CmqResult<GroupReply> {
        // The first execution of a signed HTTP request carries its nonce to the leader.
        let req = match crate::replay::take_pending() {
            Some(nonce) => GroupRequest::Guarded {
                nonce,
                request: Box::new(req),
            },
            None => req,
        };
        // With its log writes held back, this node's Raft groups stall (openraft waits for
        // appends to be durable), so it may not even know a leader: refuse at once, clearly.
        if !req.inner().is_read_only() && self.engine.disk_low() {
            return Err(self.disk_low_error());
        }
        let deadline = Instant::now() + LEADER_WAIT + req.max_wait();
        let g = self.group(group)?;
        loop {
            let leader = g.raft.metrics().borrow_watched().current_leader;
            let outcome = match leader {
                Some(l) if l == self.id => self.execute_local(g, &req).await,
                Some(l) => self.forward(l, group, &req).await,
                None => Err(ForwardError::NotLeader),
            };
            match outcome {
                Ok(r) => return Ok(r),
                Err(ForwardError::Cmq(e)) => return Err(e),
                Err(ForwardError::NotLeader) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(ForwardError::NotLeader) => {
                    return Err(CmqError::internal(format!(
                        "group {group} has no reachable leader; try again"
                    )))
                }
            }
        }
    }

    async fn forward(
        &self,
        leader: NodeId,
        group: u32,
        req: &GroupRequest,
    ) -> Result<GroupReply, ForwardError> {
        let Some(addr) = self.member_addr(leader) else {
            return Err(ForwardError::NotLeader);
        };
        let msg = GroupMessage {
            group,
            payload: encode(req),
        };
        let timeout = Duration::from_secs(10) + req.max_wait();
        match self
            .transport
            .call(leader, addr, RpcKind::Forward, msg, timeout)
            .await
        {
            Ok(reply) => decode::<Result<GroupReply, ForwardError>>(&reply)
                .map_err(|e| ForwardError::Cmq(CmqError::internal(e)))?,
            // A write, a receive or a nonce check may or may not have taken effect: only the
            // client can decide to retry.
            Err(s) if !req.is_read_only() && !never_sent(&s) => {
                Err(ForwardError::Cmq(CmqError::internal(format!(
                    "leader node {leader} did not answer ({}); the outcome is unknown",
                    s.message()
                ))))
            }
            Err(_) => Err(ForwardError::NotLeader),
        }
    }

    /// Answers one node-to-node RPC (what the transport's server side calls): a Raft message
    /// for one of this node's groups, or a forwarded client request. The reply is encoded.
    pub async fn serve_rpc(
        &self,
        kind: RpcKind,
        msg: GroupMessage,
    ) -> Result<Vec<u8>, tonic::Status> {
        let raft = || {
            self.groups
                .get(msg.group as usize)
                .map(|g| &g.raft)
                .ok_or_else(|| {
                    tonic::Status::not_found(format!("no raft group {} on this node", msg.group))
                })
        };
        let bad = tonic::Status::invalid_argument;
        fn remote<T, E: std::fmt::Display>(r: Result<T, E>) -> Remote<T> {
            r.map_err(|e| e.to_string())
        }
        Ok(match kind {
            RpcKind::Append => {
                let rpc: AppendEntriesRequest<TypeConfig> = decode(&msg.payload).map_err(bad)?;
                encode(&remote(raft()?.append_entries(rpc).await))
            }
            RpcKind::Vote => {
                let rpc: VoteRequest<TypeConfig> = decode(&msg.payload).map_err(bad)?;
                encode(&remote(raft()?.vote(rpc).await))
            }
            RpcKind::Snapshot => {
                let t: SnapshotTransfer = decode(&msg.payload).map_err(bad)?;
                let snapshot = crate::raft::Snapshot {
                    meta: t.meta,
                    snapshot: crate::raft::SnapshotData::Encoded(t.data),
                };
                encode(&remote(
                    raft()?.install_full_snapshot(t.vote, snapshot).await,
                ))
            }
            RpcKind::Forward => self.handle_forward(msg.group, &msg.payload).await,
        })
    }

    /// Answers a stream of appends for `group` (the transport's server side of
    /// [`Transport::append_stream`](crate::transport::Transport::append_stream)): openraft
    /// takes each request as it arrives, without waiting for the last one's fsync, and the
    /// encoded replies come out in request order. An undecodable request ends the stream.
    pub fn serve_append_stream(
        &self,
        group: u32,
        requests: impl Stream<Item = Vec<u8>> + Send + 'static,
    ) -> Result<futures::stream::BoxStream<'static, Vec<u8>>, tonic::Status> {
        let g = self.groups.get(group as usize).ok_or_else(|| {
            tonic::Status::not_found(format!("no raft group {group} on this node"))
        })?;
        let decoded = requests
            .map(|bytes| decode::<AppendEntriesRequest<TypeConfig>>(&bytes))
            .take_while(move |r| {
                if let Err(e) = r {
                    tracing::warn!(group, "append stream: {e}");
                }
                std::future::ready(r.is_ok())
            })
            .filter_map(|r| std::future::ready(r.ok()));
        let stopped = self.stopped();
        Ok(g.raft
            .stream_append(decoded)
            .map(|r| encode(&r.map_err(|fatal| fatal.to_string())))
            .take_until(stopped)
            .boxed())
    }

    /// Resolves once the node begins to stop.
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut stopping = self.stopping.subscribe();
        async move {
            let _ = stopping.wait_for(|s| *s).await;
        }
    }

    /// Ends the append streams served to other nodes (their leaders open new ones elsewhere or
    /// later); called when the node begins to stop.
    pub fn stop_serving_streams(&self) {
        self.stopping.send_replace(true);
    }

    /// Executes a request forwarded by another node; the reply is an encoded result.
    pub async fn handle_forward(&self, group: u32, payload: &[u8]) -> Vec<u8> {
        let result: Result<GroupReply, ForwardError> = match decode::<GroupRequest>(payload) {
            Ok(req) => match self.group(group) {
                Ok(g) => self.execute_local(g, &req).await,
                Err(e) => Err(ForwardError::Cmq(e)),
            },
            Err(e) => Err(ForwardError::Cmq(CmqError::internal(e))),
        };
        encode(&result)
    }

    async fn execute_local(
        &self,
        g: &Group,
        req: &GroupRequest,
    ) -> Result<GroupReply, ForwardError> {
        let GroupRequest::Guarded { nonce: n, request } = req else {
            return self.execute_unguarded(g, req).await;
        };
        // Only the leader's cache counts: a stale leader must not accept a nonce the current
        // one has seen.
        if g.raft.metrics().borrow_watched().state != ServerState::Leader {
            return Err(ForwardError::NotLeader);
        }
        if !self
            .nonces
            .insert(&n.secret_id, &n.nonce, n.now_s, n.window_s)
        {
            return Err(ForwardError::Cmq(CmqError::new(
                meridian_api::CmqCode::AuthFailed,
                10030,
                "Nonce already used (replayed request)",
            )));
        }
        let result = self.execute_unguarded(g, request).await;
        if matches!(result, Err(ForwardError::NotLeader)) {
            // Nothing happened and the request will be retried on the new leader: the nonce
            // was not used.
            self.nonces.remove(&n.secret_id, &n.nonce);
        }
        result
    }

    async fn execute_unguarded(
        &self,
        g: &Group,
        req: &GroupRequest,
    ) -> Result<GroupReply, ForwardError> {
        match req {
            GroupRequest::Write(op) => self.propose(g, op.clone()).await.map(GroupReply::Op),
            GroupRequest::Receive { key, max, wait_ms } => {
                let wait_ms = match wait_ms {
                    Some(w) => *w,
                    None => {
                        let state = g.shared.state.read().expect("state lock");
                        let q = state.queue(key).map_err(ForwardError::Cmq)?;
                        u64::from(q.attrs.polling_wait_seconds) * 1000
                    }
                };
                self.receive_local(g, key, *max, wait_ms)
                    .await
                    .map(GroupReply::Op)
            }
            read => {
                self.linearize(g).await?;
                let state = g.shared.state.read().expect("state lock");
                let now = self.clock.now_ms();
                Ok(match read {
                    GroupRequest::GetQueue { key } => {
                        let q = state.queue(key).map_err(ForwardError::Cmq)?;
                        let c = q.counters(now);
                        GroupReply::Queue(QueueView {
                            queue_id: q.queue_id.clone(),
                            name: q.name.clone(),
                            group: g.id,
                            attrs: q.attrs.clone(),
                            created_ms: q.created_ms,
                            modified_ms: q.modified_ms,
                            active: c.active,
                            inactive: c.inactive,
                            delayed: c.delayed,
                            rewindable: c.rewindable,
                            min_msg_ms: c.min_msg_ms,
                        })
                    }
                    GroupRequest::ListQueues { tenant, search } => {
                        GroupReply::Queues(named(&state.queues, tenant, search, |q| {
                            (q.name.clone(), q.queue_id.clone())
                        }))
                    }
                    GroupRequest::DeadLetterSources { dlq } => GroupReply::Queues(
                        state
                            .dead_letter_sources(dlq)
                            .map(|q| (q.name.clone(), q.queue_id.clone()))
                            .collect(),
                    ),
                    GroupRequest::GetTopic { key } => {
                        let mut v: TopicView = state.topic(key).map_err(ForwardError::Cmq)?.into();
                        v.group = g.id;
                        GroupReply::Topic(v)
                    }
                    GroupRequest::ListTopics { tenant, search } => {
                        GroupReply::Queues(named(&state.topics, tenant, search, |t| {
                            (t.name.clone(), t.topic_id.clone())
                        }))
                    }
                    GroupRequest::GetSubscription { key, name } => {
                        let (t, s) = state.subscription(key, name).map_err(ForwardError::Cmq)?;
                        GroupReply::Subscription(SubscriptionView::new(t, s))
                    }
                    GroupRequest::ListSubscriptions { key, search } => {
                        let t = state.topic(key).map_err(ForwardError::Cmq)?;
                        let search = search.to_ascii_lowercase();
                        GroupReply::Subscriptions(
                            t.subscriptions
                                .iter()
                                .filter(|(n, _)| n.contains(&search))
                                .map(|(_, s)| SubscriptionView::new(t, s))
                                .collect(),
                        )
                    }
                    GroupRequest::GetCredential { secret_id } => {
                        GroupReply::Credential(state.credentials.get(secret_id).cloned())
                    }
                    GroupRequest::ListCredentials => GroupReply::Credentials(
                        state
                            .credentials
                            .iter()
                            .map(|(id, c)| (id.clone(), c.app_id, c.created_ms, c.revoked))
                            .collect(),
                    ),
                    GroupRequest::Write(_)
                    | GroupRequest::Receive { .. }
                    | GroupRequest::Guarded { .. } => unreachable!(),
                })
            }
        }
    }

    async fn linearize(&self, g: &Group) -> Result<(), ForwardError> {
        g.raft
            .ensure_linearizable(openraft::ReadPolicy::ReadIndex)
            .await
            .map(|_| ())
            .map_err(|e| match e {
                RaftError::APIError(_) => ForwardError::NotLeader,
                RaftError::Fatal(f) => ForwardError::Cmq(CmqError::internal(f.to_string())),
            })
    }

    /// The clear refusal of a write while this node's disk is below its free-space reserve.
    fn disk_low_error(&self) -> CmqError {
        CmqError::internal(format!(
            "node {}: free space on its data disk is below [storage] min_free_mib = {} MiB; \
             writes are refused until space returns",
            self.id, self.config.storage.min_free_mib
        ))
    }

    /// Proposes `op` stamped with this leader's clock and waits until it is applied.
    async fn propose(&self, g: &Group, op: Op) -> Result<OpResult, ForwardError> {
        if self.engine.disk_low() {
            return Err(ForwardError::Cmq(self.disk_low_error()));
        }
        let cmd = Command {
            now_ms: self.clock.now_ms(),
            op,
        };
        match g.proposer.propose(cmd).await {
            Ok(OpResult::Failed(e)) => Err(ForwardError::Cmq(e)),
            Ok(ok) => Ok(ok),
            Err(ProposeError::NotLeader) => Err(ForwardError::NotLeader),
            Err(ProposeError::Unknown(e)) => Err(ForwardError::Cmq(CmqError::internal(format!(
                "group {}: {e}; the outcome is unknown",
                g.id
            )))),
        }
    }

    async fn receive_local(
        &self,
        g: &Group,
        key: &QueueKey,
        max: u32,
        wait_ms: u64,
    ) -> Result<OpResult, ForwardError> {
        let deadline = Instant::now() + Duration::from_millis(wait_ms);
        let notify = g.shared.notifier.watch(key);
        loop {
            // Registered before proposing, so a send applied in between still wakes us.
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let mut res = self
                .propose(
                    g,
                    Op::Receive {
                        key: key.clone(),
                        max,
                    },
                )
                .await?;
            let OpResult::Received {
                messages,
                next_visible_ms,
            } = &mut res
            else {
                return Ok(res);
            };
            g.sm.read_bodies(key, messages)
                .map_err(|e| ForwardError::Cmq(CmqError::internal(e.to_string())))?;
            let now = Instant::now();
            if !messages.is_empty() || now >= deadline {
                return Ok(res);
            }
            let mut wake_at = deadline;
            if let Some(t) = next_visible_ms {
                let in_ms = (*t - self.clock.now_ms()).max(0) as u64;
                wake_at = wake_at.min(now + Duration::from_millis(in_ms));
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(wake_at) => {}
            }
            if g.raft.metrics().borrow_watched().state != ServerState::Leader {
                return Err(ForwardError::NotLeader);
            }
        }
    }

    /// Background duties of a group leader: housekeeping ticks, cross-group moves (dead
    /// letters, topic fan-out), HTTP push delivery and spreading leadership over the members.
    pub fn spawn_background(self: &Arc<Self>) {
        for g in 0..self.groups.len() as u32 {
            let node = self.clone();
            tokio::spawn(async move { node.leader_duties(g).await });
            if g != META_GROUP {
                tokio::spawn(crate::push::run(self.clone(), g));
            }
        }
    }

    /// Whether `group` should snapshot by log size: the node's groups (which share one log
    /// memtable) appended `snapshot_after_log_mib` since their last such snapshots, and this
    /// group the most of it. Every member, leader or not, snapshots its own log; so the log
    /// not yet purged stays about that size whichever groups are busy.
    fn largest_log_due(&self, group: u32) -> bool {
        let limit = self.config.raft.snapshot_after_log_mib << 20;
        let bytes = |g: &Group| g.log_bytes.load(Ordering::Relaxed);
        let (total, most) = self
            .groups
            .iter()
            .map(bytes)
            .fold((0, 0), |(t, m), b| (t + b, m.max(b)));
        limit > 0 && total >= limit && bytes(&self.groups[group as usize]) >= most
    }

    async fn leader_duties(self: Arc<Self>, group: u32) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut balanced = false;
        let mut last_housekeeping = Instant::now();
        loop {
            tick.tick().await;
            let g = &self.groups[group as usize];
            let (leader, state) = {
                let m = g.raft.metrics();
                let m = m.borrow_watched();
                (m.current_leader, m.state)
            };
            if !balanced {
                if let Some(l) = leader {
                    balanced = true;
                    if l != self.id && self.preferred_leader(group) == self.id {
                        tracing::info!(
                            group,
                            "taking over leadership from node {l} to spread leaders"
                        );
                        let _ = g.raft.trigger().elect(false).await;
                    }
                }
            }
            if self.largest_log_due(group) {
                g.log_bytes.store(0, Ordering::Relaxed);
                if let Err(e) = g.raft.trigger().snapshot().await {
                    tracing::debug!(group, "snapshot by log size: {e}");
                }
            }
            if state != ServerState::Leader || group == META_GROUP {
                continue;
            }
            if last_housekeeping.elapsed() >= HOUSEKEEPING_INTERVAL {
                last_housekeeping = Instant::now();
                let busy = {
                    let s = g.shared.state.read().expect("state lock");
                    !s.queues.is_empty() || s.topics.values().any(|t| !t.messages.is_empty())
                };
                if busy {
                    if let Err(e) = self.propose(g, Op::Tick).await {
                        tracing::debug!(group, "tick: {e:?}");
                    }
                }
            }
            self.drain_outbox(g).await;
        }
    }

    /// Moves outbox entries to their groups: one `Transfers` command per target group (in id
    /// order, so the target's idempotence watermark holds), then one acknowledgement here.
    async fn drain_outbox(&self, g: &Group) {
        let mut batches: BTreeMap<u32, (Vec<TransferItem>, usize)> = BTreeMap::new();
        {
            let s = g.shared.state.read().expect("state lock");
            if s.outbox.is_empty() {
                return;
            }
            for (&id, e) in &s.outbox {
                let (items, bytes) = batches.entry(e.target_group).or_default();
                if items.len() >= OUTBOX_BATCH_ITEMS || *bytes >= OUTBOX_BATCH_BYTES {
                    // Later entries for this target wait for the next round, in order.
                    continue;
                }
                *bytes += e.body.len();
                items.push(TransferItem {
                    id,
                    key: e.key.clone(),
                    body: e.body.clone(),
                });
            }
        }
        let sends = batches.into_iter().map(|(target, (items, _))| async move {
            let ids: Vec<u64> = items.iter().map(|i| i.id).collect();
            let op = Op::Transfers {
                source_group: g.id,
                items,
            };
            match self.execute(target, GroupRequest::Write(op)).await {
                Ok(_) => ids,
                Err(err) => {
                    tracing::warn!(group = g.id, target, "outbox transfer: {err}");
                    Vec::new()
                }
            }
        });
        let ids: Vec<u64> = futures::future::join_all(sends)
            .await
            .into_iter()
            .flatten()
            .collect();
        if !ids.is_empty() {
            let _ = self.propose(g, Op::AckTransfers { ids }).await;
        }
    }

    /// A credential from this node's copy of the metadata group (may lag the leader by the
    /// replication delay; revocation takes effect within it).
    pub fn credential(&self, secret_id: &str) -> Option<crate::queue::Credential> {
        let state = self.groups[META_GROUP as usize]
            .shared
            .state
            .read()
            .expect("state lock");
        state.credentials.get(secret_id).cloned()
    }

    pub async fn shutdown(&self) {
        for g in &self.groups {
            let _ = g.raft.shutdown().await;
            tracing::info!(group = g.id, "raft stopped");
            // Nothing applies any more: the rows it has not written yet go into the flush
            // below, so the next start re-applies less of the log.
            if let Err(e) = g.sm.persist_pending_rows().await {
                tracing::warn!(group = g.id, "writing state rows at shutdown: {e}");
            }
        }
        if let Err(e) = self.engine.flush() {
            tracing::warn!("flush at shutdown: {e}");
        }
    }
}
