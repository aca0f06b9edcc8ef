//! The simulated network: turmoil TCP between hosts, one length-prefixed bincode request and
//! reply per connection. Nodes reach each other through [`SimTransport`] (the node's real
//! `Transport` seam) and clients reach nodes with [`call`]; both pass through turmoil's links,
//! so its partitions, holds and latencies apply, and the transport adds seeded message loss.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::{self, BoxStream};
use futures::{FutureExt, StreamExt};

use meridian_api::limits::QueueAttributesPatch;
use meridian_api::raftpb::GroupMessage;
use meridian_region_node::node::RegionNode;
use meridian_region_node::ops::QueueOps;
use meridian_region_node::raft::NodeId;
use meridian_region_node::transport::{AbortOnDrop, RpcKind, Transport};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use turmoil::net::{TcpListener, TcpStream};

use super::rng::chance_per_mille;

pub const PORT: u16 = 9000;
pub const TENANT: &str = "sim";

pub fn host_name(id: NodeId) -> String {
    format!("node{id}")
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    Rpc {
        kind: u8,
        group: u32,
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
    Client(ClientOp),
    /// Turns the connection into a stream of appends to `group`: one raw request frame after
    /// another, and from the server one raw reply frame per request, in order.
    AppendStream {
        group: u32,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    /// The encoded reply, or a gRPC-like status code and message.
    Rpc(Result<serde_bytes::ByteBuf, (i32, String)>),
    Client(ClientReply),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ClientOp {
    CreateQueue { queue: String, visibility_s: u32 },
    Send { queue: String, body: Vec<u8> },
    Receive { queue: String, max: u32 },
    Delete { queue: String, handles: Vec<String> },
    View { queue: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SimMessage {
    pub msg_id: String,
    pub body: Vec<u8>,
    pub handle: String,
    pub next_visible_s: i64,
    pub dequeue_count: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ClientReply {
    Created,
    Sent(String),
    Received(Vec<SimMessage>),
    /// Per handle: `None` deleted, `Some(code)` not.
    Deleted(Vec<Option<u32>>),
    View {
        active: u64,
        inactive: u64,
        delayed: u64,
    },
    Failed {
        code: u32,
        message: String,
    },
}

fn kind_code(k: RpcKind) -> u8 {
    match k {
        RpcKind::Append => 0,
        RpcKind::Vote => 1,
        RpcKind::Snapshot => 2,
        RpcKind::Forward => 3,
    }
}

fn kind_of(c: u8) -> Option<RpcKind> {
    Some(match c {
        0 => RpcKind::Append,
        1 => RpcKind::Vote,
        2 => RpcKind::Snapshot,
        3 => RpcKind::Forward,
        _ => return None,
    })
}

async fn write_frame(s: &mut (impl AsyncWrite + Unpin), bytes: &[u8]) -> std::io::Result<()> {
    s.write_all(&(bytes.len() as u32).to_be_bytes()).await?;
    s.write_all(bytes).await?;
    s.flush().await
}

async fn read_frame(s: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await?;
    let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn exchange(s: &mut TcpStream, req: &Request) -> Result<Reply, String> {
    let bytes = bincode::serialize(req).map_err(|e| e.to_string())?;
    write_frame(s, &bytes).await.map_err(|e| e.to_string())?;
    let reply = read_frame(s).await.map_err(|e| e.to_string())?;
    bincode::deserialize(&reply).map_err(|e| e.to_string())
}

/// Idle connections of one simulated host, by target host, reused like a real client's
/// keep-alive pool (one connection per call would wrap turmoil's ephemeral ports in long runs).
#[derive(Default)]
pub struct Pool {
    idle: Mutex<BTreeMap<String, Vec<TcpStream>>>,
}

impl Pool {
    /// Sends one request to `host` and waits up to `timeout` for its reply.
    pub async fn call(
        &self,
        host: &str,
        req: &Request,
        timeout: Duration,
    ) -> Result<Reply, String> {
        let pooled = self.idle.lock().unwrap().get_mut(host).and_then(Vec::pop);
        let attempt = async {
            let mut s = match pooled {
                Some(s) => s,
                None => TcpStream::connect((host, PORT))
                    .await
                    .map_err(|e| format!("connect {host}: {e}"))?,
            };
            let reply = exchange(&mut s, req).await?;
            Ok::<_, String>((s, reply))
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok((s, reply))) => {
                self.idle
                    .lock()
                    .unwrap()
                    .entry(host.to_string())
                    .or_default()
                    .push(s);
                Ok(reply)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!("{host}: no reply within {timeout:?}")),
        }
    }
}

/// Seeded loss of node-to-node messages, in ‰ of requests and of replies.
#[derive(Default)]
pub struct NetFaults {
    pub drop_per_mille: AtomicU32,
}

/// The node's transport seam in the simulation.
pub struct SimTransport {
    pub faults: Arc<NetFaults>,
    pub pool: Pool,
}

#[tonic::async_trait]
impl Transport for SimTransport {
    async fn call(
        &self,
        target: NodeId,
        _addr: &str,
        kind: RpcKind,
        msg: GroupMessage,
        timeout: Duration,
    ) -> Result<Vec<u8>, tonic::Status> {
        // Every failure looks like a black hole (a timeout), never like a refused connection:
        // openraft backs off after "unreachable" in an unbiased `tokio::select!`, whose branch
        // choice tokio draws from an RNG that cannot be seeded without `tokio_unstable`.
        let lost =
            |what: &str| tonic::Status::deadline_exceeded(format!("{what} to node {target}"));
        let timeout = timeout.min(Duration::from_secs(12));
        let per_mille = self.faults.drop_per_mille.load(Ordering::Relaxed);
        if chance_per_mille(per_mille) {
            tokio::time::sleep(timeout).await;
            return Err(lost("request lost"));
        }
        let started = tokio::time::Instant::now();
        let req = Request::Rpc {
            kind: kind_code(kind),
            group: msg.group,
            payload: msg.payload,
        };
        let reply = self.pool.call(&host_name(target), &req, timeout).await;
        let reply_lost = chance_per_mille(per_mille);
        match reply {
            Ok(Reply::Rpc(Ok(payload))) if !reply_lost => Ok(payload.into_vec()),
            Ok(Reply::Rpc(Ok(_))) => {
                tokio::time::sleep_until(started + timeout).await;
                Err(lost("reply lost"))
            }
            Ok(Reply::Rpc(Err((code, message)))) => Err(tonic::Status::new(code.into(), message)),
            Ok(Reply::Client(_)) => Err(tonic::Status::internal("client reply to an rpc")),
            Err(e) => {
                tokio::time::sleep_until(started + timeout).await;
                Err(lost(&e))
            }
        }
    }

    fn append_stream<'a>(
        &'a self,
        target: NodeId,
        _addr: &'a str,
        group: u32,
        requests: BoxStream<'static, Vec<u8>>,
    ) -> BoxStream<'a, Result<Vec<u8>, tonic::Status>> {
        self.open_stream(target, group, requests)
    }
}

impl SimTransport {
    /// One connection per stream: a task writes the requests as they come, the replies are read
    /// as they arrive. A lost message (seeded) breaks the stream, as on a real connection, and
    /// like every failure here it looks like silence, never like a refusal.
    fn open_stream(
        &self,
        target: NodeId,
        group: u32,
        mut requests: BoxStream<'static, Vec<u8>>,
    ) -> BoxStream<'static, Result<Vec<u8>, tonic::Status>> {
        let faults = self.faults.clone();
        let open = async move {
            let mut s = TcpStream::connect((host_name(target).as_str(), PORT))
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let hello =
                bincode::serialize(&Request::AppendStream { group }).map_err(|e| e.to_string())?;
            write_frame(&mut s, &hello)
                .await
                .map_err(|e| format!("open stream: {e}"))?;
            let (rd, mut wr) = s.into_split();
            let writer_faults = faults.clone();
            let writer = AbortOnDrop(tokio::spawn(async move {
                while let Some(payload) = requests.next().await {
                    let per_mille = writer_faults.drop_per_mille.load(Ordering::Relaxed);
                    if chance_per_mille(per_mille) || write_frame(&mut wr, &payload).await.is_err()
                    {
                        return;
                    }
                }
            }));
            Ok::<_, String>((rd, writer, faults))
        };
        stream::unfold(Some(open.boxed()), move |state| async move {
            let opened = state?.await;
            let broken = |e: String| async move {
                tokio::time::sleep(STREAM_SILENCE).await;
                Some((
                    Err(tonic::Status::deadline_exceeded(format!(
                        "append stream to node {target}: {e}"
                    ))),
                    None,
                ))
            };
            let (mut rd, writer, faults) = match opened {
                Ok(o) => o,
                Err(e) => return broken(e).await,
            };
            match read_frame(&mut rd).await {
                Ok(reply) => {
                    let per_mille = faults.drop_per_mille.load(Ordering::Relaxed);
                    if chance_per_mille(per_mille) {
                        return broken("reply lost".into()).await;
                    }
                    let next = async move { Ok::<_, String>((rd, writer, faults)) }.boxed();
                    Some((Ok(reply), Some(next)))
                }
                // The server ends a stream whose requests ended: the session is over.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => None,
                Err(e) => broken(e.to_string()).await,
            }
        })
        .boxed()
    }
}

/// How long a broken append stream stays silent before it reports the break.
const STREAM_SILENCE: Duration = Duration::from_millis(500);

/// Serves node-to-node RPCs and client operations on this host until the host crashes.
pub async fn serve(node: Arc<RegionNode>) -> turmoil::Result {
    let listener = TcpListener::bind(("0.0.0.0", PORT)).await?;
    loop {
        let (mut s, _) = listener.accept().await?;
        let node = node.clone();
        tokio::spawn(async move {
            // Requests one after another until the peer goes away or stays silent (a peer
            // behind a partition never sends its close).
            while let Ok(Ok(frame)) = tokio::time::timeout(IDLE, read_frame(&mut s)).await {
                if let Ok(Request::AppendStream { group }) = bincode::deserialize(&frame) {
                    serve_append_stream(&node, group, s).await;
                    return;
                }
                let reply = answer(&node, &frame).await;
                let Ok(bytes) = bincode::serialize(&reply) else {
                    return;
                };
                if write_frame(&mut s, &bytes).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// Feeds the request frames of an append stream to the node and writes its replies back, until
/// either side ends (a request stream idle for [`IDLE`] is ended too).
async fn serve_append_stream(node: &Arc<RegionNode>, group: u32, s: TcpStream) {
    let (rd, mut wr) = s.into_split();
    let requests = stream::unfold(rd, |mut rd| async move {
        match tokio::time::timeout(IDLE, read_frame(&mut rd)).await {
            Ok(Ok(frame)) => Some((frame, rd)),
            _ => None,
        }
    });
    let Ok(mut replies) = node.serve_append_stream(group, requests) else {
        return;
    };
    while let Some(reply) = replies.next().await {
        if write_frame(&mut wr, &reply).await.is_err() {
            return;
        }
    }
}

/// How long a server connection may stay idle before it is closed.
const IDLE: Duration = Duration::from_secs(20);

async fn answer(node: &Arc<RegionNode>, frame: &[u8]) -> Reply {
    match bincode::deserialize::<Request>(frame) {
        Ok(Request::Rpc {
            kind,
            group,
            payload,
        }) => match kind_of(kind) {
            Some(kind) => Reply::Rpc(
                node.serve_rpc(kind, GroupMessage { group, payload })
                    .await
                    .map(serde_bytes::ByteBuf::from)
                    .map_err(|s| (s.code() as i32, s.message().to_string())),
            ),
            None => Reply::Rpc(Err((3, format!("unknown rpc kind {kind}")))),
        },
        Ok(Request::Client(op)) => Reply::Client(client_op(node, op).await),
        Ok(Request::AppendStream { .. }) => {
            Reply::Rpc(Err((3, "an append stream opens a connection".into())))
        }
        Err(e) => Reply::Rpc(Err((3, format!("undecodable request: {e}")))),
    }
}

async fn client_op(node: &Arc<RegionNode>, op: ClientOp) -> ClientReply {
    let ops = QueueOps::new(node.clone());
    let failed = |e: meridian_api::CmqError| ClientReply::Failed {
        code: e.code as u32,
        message: e.message.clone(),
    };
    match op {
        ClientOp::CreateQueue {
            queue,
            visibility_s,
        } => {
            let patch = QueueAttributesPatch {
                visibility_timeout: Some(visibility_s),
                ..Default::default()
            };
            match ops.create(TENANT, &queue, &patch).await {
                Ok(_) => ClientReply::Created,
                Err(e) => failed(e),
            }
        }
        ClientOp::Send { queue, body } => match ops.send(TENANT, &queue, vec![body], 0).await {
            Ok(mut ids) => ClientReply::Sent(ids.remove(0)),
            Err(e) => failed(e),
        },
        ClientOp::Receive { queue, max } => match ops.receive(TENANT, &queue, max, Some(0)).await {
            Ok(msgs) => ClientReply::Received(
                msgs.into_iter()
                    .map(|m| SimMessage {
                        msg_id: m.msg_id,
                        body: m.body,
                        handle: m.receipt_handle,
                        next_visible_s: m.next_visible_time,
                        dequeue_count: m.dequeue_count,
                    })
                    .collect(),
            ),
            Err(e) => failed(e),
        },
        ClientOp::Delete { queue, handles } => {
            match ops.delete_messages(TENANT, &queue, &handles).await {
                Ok(outcomes) => ClientReply::Deleted(
                    outcomes
                        .into_iter()
                        .map(|o| o.map(|e| e.code as u32))
                        .collect(),
                ),
                Err(e) => failed(e),
            }
        }
        ClientOp::View { queue } => match ops.get(TENANT, &queue).await {
            Ok(v) => ClientReply::View {
                active: v.active,
                inactive: v.inactive,
                delayed: v.delayed,
            },
            Err(e) => failed(e),
        },
    }
}
