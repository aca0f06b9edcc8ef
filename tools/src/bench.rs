//! `meridian bench`: the workloads of ../shared/peerbench (same names, defaults and concurrency
//! model) against a Meridian region, with the disk's fsync rate measured beside the results.
//! With its own local region it also reports what each message cost the nodes in CPU time and
//! disk writes, and the client's CPU time ([`crate::usage`]).
//!
//! * publishers: `inflight` tasks, each a closed loop "send, await the durable ack, repeat";
//! * W2 consumers: `w2_consumers` tasks, each batch-receiving up to `w2_batch` and deleting every
//!   message individually;
//! * timing: `warmup_s` run but not counted, then `duration_s` measured; an operation counts if
//!   it completes inside the measured window.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use meridian_api::pb::cluster_service_client::ClusterServiceClient;
use meridian_api::pb::queue_service_client::QueueServiceClient;
use meridian_api::pb::topic_service_client::TopicServiceClient;
use meridian_api::pb::*;
use meridian_api::stream_client::MessageStreamClient;
use meridian_api::CmqError;
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::cmq_client::{CmqHttp, CmqReply};
use crate::usage::{self, Usage};

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Protocol {
    /// One unary gRPC call per operation.
    Grpc,
    /// Sends and deletes pipelined on `MessageStream` (one stream per connection); receives
    /// and batch calls stay unary.
    GrpcStream,
    /// The CMQ HTTP API with signed requests.
    Http,
}

impl Protocol {
    fn label(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::GrpcStream => "grpc-stream",
            Protocol::Http => "http",
        }
    }
}

#[derive(Args, Clone)]
pub struct BenchArgs {
    /// Workloads, comma separated: W1 (durable send), W2 (send-receive-delete), W3 (many queues),
    /// T1 (publish to a topic fanning out to `--t1-subscriptions` queues; not in peerbench).
    #[arg(long, value_delimiter = ',', default_value = "W1,W2,W3")]
    workload: Vec<String>,
    /// Client protocol.
    #[arg(long, value_enum, default_value_t = Protocol::Grpc)]
    protocol: Protocol,
    /// A node of a running region; without it, bench starts its own local 3-node region.
    #[arg(long, env = "MERIDIAN_ENDPOINT")]
    endpoint: Option<String>,
    /// CMQ SecretId (HTTP protocol).
    #[arg(long)]
    secret_id: Option<String>,
    /// CMQ SecretKey (HTTP protocol).
    #[arg(long)]
    secret_key: Option<String>,
    /// Seconds run before measuring.
    #[arg(long, default_value_t = 3)]
    warmup_s: u64,
    /// Seconds measured.
    #[arg(long, default_value_t = 20)]
    duration_s: u64,
    /// Message body size in bytes (>= 8; the first 8 carry the send time).
    #[arg(long, default_value_t = 1024)]
    body_bytes: usize,
    /// Override every workload's in-flight count.
    #[arg(long)]
    inflight: Option<usize>,
    /// W1: sends in flight.
    #[arg(long, default_value_t = 64)]
    w1_inflight: usize,
    /// W2: sends in flight.
    #[arg(long, default_value_t = 32)]
    w2_inflight: usize,
    /// W2: consumer tasks.
    #[arg(long, default_value_t = 4)]
    w2_consumers: usize,
    /// W2: most messages one receive returns (1-16).
    #[arg(long, default_value_t = 16)]
    w2_batch: u32,
    /// W2: long-poll wait of one receive, seconds.
    #[arg(long, default_value_t = 1)]
    w2_wait_s: u32,
    /// W2: consumers wait for a batch's deletes to be acknowledged before receiving again
    /// (by default the next receive overlaps them, as peerbench's consumers do not wait for
    /// their acks).
    #[arg(long)]
    w2_serial: bool,
    /// W3: number of queues.
    #[arg(long, default_value_t = 64)]
    w3_queues: usize,
    /// W3: sends in flight, spread round-robin over the queues.
    #[arg(long, default_value_t = 64)]
    w3_inflight: usize,
    /// T1: queue subscriptions of the topic (every publish goes to all of them).
    #[arg(long, default_value_t = 10)]
    t1_subscriptions: usize,
    /// T1: publishes in flight.
    #[arg(long, default_value_t = 64)]
    t1_inflight: usize,
    /// Messages per send call: 1 uses SendMessage, more uses BatchSendMessage (≤16).
    #[arg(long, default_value_t = 1)]
    send_batch: usize,
    /// Connections shared round-robin by the publishers.
    #[arg(long, default_value_t = 1)]
    pub_conns: usize,
    /// Timeout of any single operation, seconds.
    #[arg(long, default_value_t = 10)]
    op_timeout_s: u64,
    /// Where to measure the fsync rate (and keep the local region's data); default: a temp dir.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Print one JSON object per workload instead of text.
    #[arg(long)]
    json: bool,
    /// Worker threads of this client's runtime (0: one per CPU core); 2, as peerbench's
    /// `--client-threads`, so both drive their targets alike.
    #[arg(long, default_value_t = 2, value_parser = crate::dev::threads_arg())]
    pub client_threads: usize,
    /// Worker threads of each node of the local region bench starts (0: one per CPU core);
    /// default: a third of the cores, at least one, as `meridian dev`. Ignored with
    /// `--endpoint`.
    #[arg(long, value_parser = crate::dev::threads_arg())]
    node_threads: Option<usize>,
}

/// What one workload measured.
#[derive(Debug)]
struct Outcome {
    workload: String,
    completed: u64,
    bytes: u64,
    latency: Histogram<u64>,
    errors: BTreeMap<u32, u64>,
    window_s: f64,
    /// W2: messages sent during the window (the consumer side is `completed`).
    published: Option<u64>,
    /// What the local region's node processes used during the window (none against an
    /// endpoint: its processes are not ours to read).
    region: Option<Usage>,
    /// What this bench process used during the window.
    client: Option<Usage>,
}

/// What `region`'s processes and this one used during `w`.
async fn usage_over(w: Window, region: Vec<u32>) -> (Option<Usage>, Option<Usage>) {
    let me = [std::process::id()];
    let read_region = || {
        if region.is_empty() {
            None
        } else {
            usage::of(&region)
        }
    };
    tokio::time::sleep_until(w.start).await;
    let (region0, client0) = (read_region(), usage::of(&me));
    tokio::time::sleep_until(w.end).await;
    (
        region0.and_then(|r0| Some(read_region()?.since(&r0))),
        client0.and_then(|c0| Some(usage::of(&me)?.since(&c0))),
    )
}

#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    end: Instant,
}

impl Window {
    fn counts(&self, t: Instant) -> bool {
        t >= self.start && t <= self.end
    }
    fn over(&self) -> bool {
        Instant::now() > self.end
    }
}

/// Per-task statistics, merged at the end (no shared lock on the hot path).
struct Stats {
    completed: u64,
    bytes: u64,
    latency: Histogram<u64>,
    errors: BTreeMap<u32, u64>,
}

impl Stats {
    fn new() -> Self {
        Self {
            completed: 0,
            bytes: 0,
            latency: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
            errors: BTreeMap::new(),
        }
    }
    fn merge(&mut self, o: Stats) {
        self.completed += o.completed;
        self.bytes += o.bytes;
        self.latency.add(o.latency).expect("same bounds");
        for (k, v) in o.errors {
            *self.errors.entry(k).or_default() += v;
        }
    }
    fn error(&mut self, code: u32) {
        *self.errors.entry(code).or_default() += 1;
    }
}

/// What one disk probe measured.
#[derive(Debug, Clone, Copy)]
pub struct FsyncProbe {
    pub per_s: f64,
    pub p50_ms: f64,
}

/// How a probe writes its 4 KiB blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeWrite {
    /// Over the same block, with fdatasync: no file size or block allocation to journal, the
    /// best case a disk offers.
    Overwrite,
    /// Appended to a growing file, with fsync: what a log that does not recycle its files
    /// (a RocksDB WAL here) pays, and what `../shared/peerbench` measures beside the peers.
    Append,
}

/// Measures 4 KiB writes, each made durable before the next, for 2 s in `dir`.
pub fn fsync_rate(dir: &Path, how: ProbeWrite) -> anyhow::Result<FsyncProbe> {
    use std::io::Write as _;
    use std::os::unix::fs::FileExt;
    std::fs::create_dir_all(dir)?;
    let path = dir.join("fsync-probe");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)?;
    let block = vec![0x5au8; 4096];
    let mut h = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3)?;
    let start = std::time::Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(2) {
        let t = std::time::Instant::now();
        match how {
            ProbeWrite::Overwrite => {
                f.write_at(&block, 0)?;
                f.sync_data()?;
            }
            ProbeWrite::Append => {
                f.write_all(&block)?;
                f.sync_all()?;
            }
        }
        h.record(t.elapsed().as_micros().max(1) as u64)?;
        n += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    drop(f);
    let _ = std::fs::remove_file(path);
    Ok(FsyncProbe {
        per_s: n as f64 / secs,
        p50_ms: h.value_at_quantile(0.5) as f64 / 1000.0,
    })
}

/// The data directory's disk, both ways.
#[derive(Debug, Clone, Copy)]
struct Disk {
    overwrite: FsyncProbe,
    append: FsyncProbe,
}

/// A body of `size` bytes (≥ 16) whose first 16 carry the send time as hex, so W2 can measure
/// send→delete latency over either protocol (HTTP bodies must be text).
fn body(size: usize, origin: Instant) -> Vec<u8> {
    let mut b = vec![b'x'; size.max(16)];
    let ns = origin.elapsed().as_nanos() as u64;
    b[..16].copy_from_slice(format!("{ns:016x}").as_bytes());
    b
}

fn sent_ns(body: &[u8]) -> Option<u64> {
    std::str::from_utf8(body.get(..16)?)
        .ok()
        .and_then(|h| u64::from_str_radix(h, 16).ok())
}

async fn connect(url: &str) -> anyhow::Result<Channel> {
    tonic::transport::Endpoint::from_shared(url.to_string())?
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connect {url}"))
}

/// Where and how the bench talks to the region.
#[derive(Clone)]
enum Target {
    /// A gRPC endpoint of any node; publishers go to each queue's group leader. With
    /// `stream`, sends and deletes use `MessageStream`.
    Grpc { seed: String, stream: bool },
    /// A CMQ HTTP endpoint with a key pair; the node forwards to leaders itself. With `nodes`
    /// (the local region), each queue's traffic goes to its group leader's node instead, as
    /// over gRPC: whether the endpoint led the queue's group or forwarded every request to
    /// the node that did made runs differ by half.
    Http {
        endpoint: String,
        secret_id: String,
        secret_key: String,
        nodes: Option<NodeEndpoints>,
    },
}

/// Every node's gRPC and CMQ HTTP endpoints, in the same order.
#[derive(Clone)]
struct NodeEndpoints {
    grpc: Vec<String>,
    http: Vec<String>,
    /// Connections that went to the given endpoint because the leader could not be told.
    missed: Arc<AtomicU64>,
}

impl NodeEndpoints {
    /// The CMQ HTTP endpoint of the node leading `queue`'s group, if it can be told.
    async fn http_of_leader(&self, queue: &str) -> Option<String> {
        let found = async {
            let leader = queue_leader(self.grpc.first()?, queue).await.ok()??;
            let i = self.grpc.iter().position(|g| *g == leader)?;
            self.http.get(i).cloned()
        }
        .await;
        if found.is_none() {
            self.missed.fetch_add(1, Ordering::Relaxed);
        }
        found
    }
}

/// One client connection of either protocol. Errors are CMQ codes (0: transport failure).
enum Conn {
    Grpc(QueueServiceClient<Channel>),
    /// Unary calls on the client, sends and deletes (of one body) on the stream.
    GrpcStream(QueueServiceClient<Channel>, MessageStreamClient),
    Http(CmqHttp),
}

/// What a publisher sends to: a queue over either protocol, or (T1) a topic.
enum Sender {
    Queue(Conn),
    GrpcTopic(TopicServiceClient<Channel>),
    HttpTopic(CmqHttp),
}

impl Sender {
    async fn send(&mut self, dest: &str, bodies: Vec<Vec<u8>>) -> Result<(), u32> {
        match self {
            Sender::Queue(c) => c.send(dest, bodies).await,
            Sender::GrpcTopic(c) => {
                let req = BatchPublishMessageRequest {
                    topic_name: dest.into(),
                    msg_body: bodies,
                    msg_tag: vec![],
                    routing_key: String::new(),
                };
                c.batch_publish_message(req)
                    .await
                    .map(|_| ())
                    .map_err(grpc_code)
            }
            Sender::HttpTopic(c) => {
                let form = BodyForm::new(bodies);
                let mut params = vec![("topicName", dest), ("Action", "BatchPublishMessage")];
                params.extend(form.pairs());
                http_code(c.call(&params).await).map(|_| ())
            }
        }
    }
}

/// Message bodies as the CMQ form's `msgBody.1..n` parameters.
struct BodyForm {
    names: Vec<String>,
    texts: Vec<String>,
}

impl BodyForm {
    fn new(bodies: Vec<Vec<u8>>) -> Self {
        let texts: Vec<String> = bodies
            .into_iter()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .collect();
        let names = (1..=texts.len()).map(|i| format!("msgBody.{i}")).collect();
        Self { names, texts }
    }

    fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.names
            .iter()
            .map(String::as_str)
            .zip(self.texts.iter().map(String::as_str))
    }
}

fn grpc_code(s: tonic::Status) -> u32 {
    CmqError::from_status(&s).code.as_u32()
}

fn http_code(r: anyhow::Result<CmqReply>) -> Result<CmqReply, u32> {
    match r {
        Ok(r) if r.code == 0 => Ok(r),
        Ok(r) => Err(r.code),
        Err(_) => Err(0),
    }
}

impl Conn {
    /// Another handle on the same gRPC connection (and stream); HTTP/1.1 connections are not
    /// shared.
    fn share(&self) -> Option<Conn> {
        match self {
            Conn::Grpc(c) => Some(Conn::Grpc(c.clone())),
            Conn::GrpcStream(c, s) => Some(Conn::GrpcStream(c.clone(), s.clone())),
            Conn::Http(_) => None,
        }
    }

    async fn grpc(url: &str, stream: bool) -> anyhow::Result<Conn> {
        let ch = connect(url).await?;
        let unary = QueueServiceClient::new(ch.clone());
        Ok(if stream {
            let s = MessageStreamClient::open(ch)
                .await
                .with_context(|| format!("open a message stream to {url}"))?;
            Conn::GrpcStream(unary, s)
        } else {
            Conn::Grpc(unary)
        })
    }

    async fn send(&mut self, queue: &str, bodies: Vec<Vec<u8>>) -> Result<(), u32> {
        match self {
            Conn::GrpcStream(_, s) if bodies.len() == 1 => {
                let msg_body = bodies.into_iter().next().expect("one body");
                let req = SendMessageRequest {
                    queue_name: queue.into(),
                    msg_body,
                    delay_seconds: 0,
                };
                s.send(req).await.map(|_| ()).map_err(|e| e.code.as_u32())
            }
            Conn::Grpc(c) | Conn::GrpcStream(c, _) if bodies.len() == 1 => {
                let msg_body = bodies.into_iter().next().expect("one body");
                let req = SendMessageRequest {
                    queue_name: queue.into(),
                    msg_body,
                    delay_seconds: 0,
                };
                c.send_message(req).await.map(|_| ()).map_err(grpc_code)
            }
            Conn::Grpc(c) | Conn::GrpcStream(c, _) => {
                let req = BatchSendMessageRequest {
                    queue_name: queue.into(),
                    msg_body: bodies,
                    delay_seconds: 0,
                };
                c.batch_send_message(req)
                    .await
                    .map(|_| ())
                    .map_err(grpc_code)
            }
            Conn::Http(c) => {
                let form = BodyForm::new(bodies);
                let mut params = vec![("queueName", queue)];
                if form.texts.len() == 1 {
                    params.push(("Action", "SendMessage"));
                    params.push(("msgBody", form.texts[0].as_str()));
                } else {
                    params.push(("Action", "BatchSendMessage"));
                    params.extend(form.pairs());
                }
                http_code(c.call(&params).await).map(|_| ())
            }
        }
    }

    /// Up to `n` messages as (receipt handle, body); no message is Ok(empty).
    async fn receive(
        &mut self,
        queue: &str,
        n: u32,
        wait: u32,
    ) -> Result<Vec<(String, Vec<u8>)>, u32> {
        let r = match self {
            Conn::Grpc(c) | Conn::GrpcStream(c, _) => c
                .batch_receive_message(BatchReceiveMessageRequest {
                    queue_name: queue.into(),
                    num_of_msg: n,
                    polling_wait_seconds: Some(wait),
                })
                .await
                .map(|r| {
                    r.into_inner()
                        .messages
                        .into_iter()
                        .map(|m| (m.receipt_handle, m.msg_body))
                        .collect()
                })
                .map_err(grpc_code),
            Conn::Http(c) => {
                let (n, wait) = (n.to_string(), wait.to_string());
                let params = [
                    ("Action", "BatchReceiveMessage"),
                    ("queueName", queue),
                    ("numOfMsg", n.as_str()),
                    ("pollingWaitSeconds", wait.as_str()),
                ];
                http_code(c.call(&params).await).map(|r| {
                    r.body["msgInfoList"]
                        .as_array()
                        .map(|l| {
                            l.iter()
                                .map(|m| {
                                    (
                                        m["receiptHandle"].as_str().unwrap_or("").to_string(),
                                        m["msgBody"].as_str().unwrap_or("").as_bytes().to_vec(),
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default()
                })
            }
        };
        match r {
            Err(7000) => Ok(Vec::new()),
            other => other,
        }
    }

    async fn delete(&mut self, queue: &str, handle: String) -> Result<(), u32> {
        match self {
            Conn::GrpcStream(_, s) => s
                .delete(DeleteMessageRequest {
                    queue_name: queue.into(),
                    receipt_handle: handle,
                })
                .await
                .map_err(|e| e.code.as_u32()),
            Conn::Grpc(c) => c
                .delete_message(DeleteMessageRequest {
                    queue_name: queue.into(),
                    receipt_handle: handle,
                })
                .await
                .map(|_| ())
                .map_err(grpc_code),
            Conn::Http(c) => {
                let params = [
                    ("Action", "DeleteMessage"),
                    ("queueName", queue),
                    ("receiptHandle", handle.as_str()),
                ];
                http_code(c.call(&params).await).map(|_| ())
            }
        }
    }

    async fn create_queue(&mut self, queue: &str) -> Result<(), u32> {
        match self {
            Conn::Grpc(c) | Conn::GrpcStream(c, _) => c
                .create_queue(CreateQueueRequest {
                    queue_name: queue.into(),
                    attributes: Some(QueueAttributes {
                        visibility_timeout: Some(30),
                        ..Default::default()
                    }),
                })
                .await
                .map(|_| ())
                .map_err(grpc_code),
            Conn::Http(c) => {
                let params = [
                    ("Action", "CreateQueue"),
                    ("queueName", queue),
                    ("visibilityTimeout", "30"),
                ];
                http_code(c.call(&params).await).map(|_| ())
            }
        }
    }

    async fn delete_queue(&mut self, queue: &str) -> Result<(), u32> {
        match self {
            Conn::Grpc(c) | Conn::GrpcStream(c, _) => c
                .delete_queue(QueueNameRequest {
                    queue_name: queue.into(),
                })
                .await
                .map(|_| ())
                .map_err(grpc_code),
            Conn::Http(c) => http_code(
                c.call(&[("Action", "DeleteQueue"), ("queueName", queue)])
                    .await,
            )
            .map(|_| ()),
        }
    }
}

impl Target {
    /// A connection for traffic on `queue`: to its group's leader (no forwarding hop, as
    /// peerbench talks to stream/queue leaders), except over HTTP to a region whose nodes'
    /// HTTP endpoints are not known: then to the given node.
    async fn conn_for(&self, queue: &str) -> anyhow::Result<Conn> {
        match self {
            Target::Grpc { seed, stream } => {
                let url = leader_endpoint(seed, queue)
                    .await
                    .unwrap_or_else(|_| seed.clone());
                Conn::grpc(&url, *stream).await
            }
            Target::Http {
                endpoint,
                secret_id,
                secret_key,
                nodes,
            } => {
                let url = match nodes {
                    Some(n) => n.http_of_leader(queue).await,
                    None => None,
                };
                let url = url.as_deref().unwrap_or(endpoint);
                Ok(Conn::Http(CmqHttp::new(url, secret_id, secret_key)?))
            }
        }
    }

    /// Starts counting connections that missed their leader afresh (once per workload).
    fn reset_misses(&self) {
        if let Target::Http { nodes: Some(n), .. } = self {
            n.missed.store(0, Ordering::Relaxed);
        }
    }

    /// Whether traffic goes to each queue's group leader (as looked up when connecting):
    /// always over gRPC, over HTTP when the nodes are known and every lookup found a leader
    /// (`false`: some connections went to the given endpoint instead); `None` when it all goes
    /// to the given endpoint, leader or not.
    fn to_leader(&self) -> Option<bool> {
        match self {
            Target::Grpc { .. } => Some(true),
            Target::Http { nodes, .. } => nodes
                .as_ref()
                .map(|n| n.missed.load(Ordering::Relaxed) == 0),
        }
    }

    async fn admin(&self) -> anyhow::Result<Conn> {
        match self {
            Target::Grpc { seed, .. } => Conn::grpc(seed, false).await,
            Target::Http {
                endpoint,
                secret_id,
                secret_key,
                ..
            } => Ok(Conn::Http(CmqHttp::new(endpoint, secret_id, secret_key)?)),
        }
    }
}

/// T1's topic: created with one queue subscription per queue.
async fn create_topic(target: &Target, topic: &str, queues: &[String]) -> anyhow::Result<()> {
    match target {
        Target::Grpc { seed, .. } => {
            let mut c = TopicServiceClient::new(connect(seed).await?);
            let e = |s: tonic::Status| anyhow::anyhow!("{}", CmqError::from_status(&s));
            c.create_topic(CreateTopicRequest {
                topic_name: topic.into(),
                filter_type: None,
                max_msg_size: Some(1 << 20),
            })
            .await
            .map_err(e)?;
            for (i, q) in queues.iter().enumerate() {
                c.subscribe(SubscribeRequest {
                    topic_name: topic.into(),
                    subscription_name: format!("s{i}"),
                    protocol: "queue".into(),
                    endpoint: q.clone(),
                    notify_strategy: None,
                    notify_content_format: None,
                    filter_tag: vec![],
                    binding_key: vec![],
                })
                .await
                .map_err(e)?;
            }
        }
        Target::Http {
            endpoint,
            secret_id,
            secret_key,
            ..
        } => {
            let mut c = CmqHttp::new(endpoint, secret_id, secret_key)?;
            let check = |r: anyhow::Result<CmqReply>| match http_code(r) {
                Ok(_) => Ok(()),
                Err(code) => Err(anyhow::anyhow!("CMQ error {code}")),
            };
            check(
                c.call(&[
                    ("Action", "CreateTopic"),
                    ("topicName", topic),
                    ("maxMsgSize", "1048576"),
                ])
                .await,
            )?;
            for (i, q) in queues.iter().enumerate() {
                let name = format!("s{i}");
                check(
                    c.call(&[
                        ("Action", "Subscribe"),
                        ("topicName", topic),
                        ("subscriptionName", &name),
                        ("protocol", "queue"),
                        ("endpoint", q),
                        ("notifyContentFormat", "SIMPLIFIED"),
                    ])
                    .await,
                )?;
            }
        }
    }
    Ok(())
}

async fn delete_topic(target: &Target, topic: &str, subscriptions: usize) {
    match target {
        Target::Grpc { seed, .. } => {
            let Ok(ch) = connect(seed).await else { return };
            let mut c = TopicServiceClient::new(ch);
            for i in 0..subscriptions {
                let _ = c
                    .unsubscribe(SubscriptionNameRequest {
                        topic_name: topic.into(),
                        subscription_name: format!("s{i}"),
                    })
                    .await;
            }
            let _ = c
                .delete_topic(TopicNameRequest {
                    topic_name: topic.into(),
                })
                .await;
        }
        Target::Http {
            endpoint,
            secret_id,
            secret_key,
            ..
        } => {
            let Ok(mut c) = CmqHttp::new(endpoint, secret_id, secret_key) else {
                return;
            };
            for i in 0..subscriptions {
                let name = format!("s{i}");
                let _ = c
                    .call(&[
                        ("Action", "Unsubscribe"),
                        ("topicName", topic),
                        ("subscriptionName", &name),
                    ])
                    .await;
            }
            let _ = c
                .call(&[("Action", "DeleteTopic"), ("topicName", topic)])
                .await;
        }
    }
}

/// `n` publisher connections to `topic`: over gRPC straight to its group's leader.
async fn topic_publisher_conns(
    target: &Target,
    args: &BenchArgs,
    topic: &str,
    n: usize,
) -> anyhow::Result<Vec<(Sender, String)>> {
    let mut out = Vec::with_capacity(n);
    match target {
        Target::Grpc { seed, .. } => {
            let ch = connect(seed).await?;
            let group = TopicServiceClient::new(ch.clone())
                .get_topic_attributes(TopicNameRequest {
                    topic_name: topic.into(),
                })
                .await
                .map_err(|s| anyhow::anyhow!("{}", CmqError::from_status(&s)))?
                .into_inner()
                .group;
            let url = leader_of_group(ch, seed, group).await?;
            let mut chs = Vec::new();
            for _ in 0..args.pub_conns.max(1) {
                chs.push(connect(&url).await?);
            }
            for i in 0..n {
                out.push((
                    Sender::GrpcTopic(TopicServiceClient::new(chs[i % chs.len()].clone())),
                    topic.to_string(),
                ));
            }
        }
        Target::Http {
            endpoint,
            secret_id,
            secret_key,
            ..
        } => {
            for _ in 0..n {
                out.push((
                    Sender::HttpTopic(CmqHttp::new(endpoint, secret_id, secret_key)?),
                    topic.to_string(),
                ));
            }
        }
    }
    Ok(out)
}

/// The gRPC endpoint of the node leading `queue`'s group (the seed when unknown).
async fn leader_endpoint(seed: &str, queue: &str) -> anyhow::Result<String> {
    Ok(queue_leader(seed, queue)
        .await?
        .unwrap_or_else(|| seed.to_string()))
}

/// The gRPC endpoint of the node leading `queue`'s group, if its group has a leader now.
async fn queue_leader(seed: &str, queue: &str) -> anyhow::Result<Option<String>> {
    let ch = connect(seed).await?;
    let group = QueueServiceClient::new(ch.clone())
        .get_queue_attributes(QueueNameRequest {
            queue_name: queue.into(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", CmqError::from_status(&s)))?
        .into_inner()
        .group;
    known_leader(ch, group).await
}

/// The gRPC endpoint of `group`'s leader (the seed when unknown).
async fn leader_of_group(ch: Channel, seed: &str, group: u32) -> anyhow::Result<String> {
    Ok(known_leader(ch, group)
        .await?
        .unwrap_or_else(|| seed.to_string()))
}

/// The gRPC endpoint of `group`'s leader, if it has one now.
async fn known_leader(ch: Channel, group: u32) -> anyhow::Result<Option<String>> {
    let status = ClusterServiceClient::new(ch)
        .cluster_status(Empty {})
        .await?
        .into_inner();
    let leader = status
        .groups
        .iter()
        .find(|g| g.group == group)
        .map(|g| g.leader)
        .unwrap_or(0);
    Ok(status
        .members
        .iter()
        .find(|m| m.node_id == leader)
        .map(|m| format!("http://{}", m.addr)))
}

fn spawn_publishers(
    args: &BenchArgs,
    w: Window,
    conns: Vec<(Sender, String)>,
    origin: Instant,
) -> Vec<tokio::task::JoinHandle<Stats>> {
    conns
        .into_iter()
        .map(|(mut c, queue)| {
            let size = args.body_bytes;
            let batch = args.send_batch.clamp(1, 16);
            let op_timeout = Duration::from_secs(args.op_timeout_s);
            tokio::spawn(async move {
                let mut st = Stats::new();
                while !w.over() {
                    let bodies = (0..batch).map(|_| body(size, origin)).collect();
                    let t0 = Instant::now();
                    let r = tokio::time::timeout(op_timeout, c.send(&queue, bodies)).await;
                    let t1 = Instant::now();
                    match r {
                        Ok(Ok(())) if w.counts(t1) => {
                            st.completed += batch as u64;
                            st.bytes += (batch * size.max(16)) as u64;
                            let _ = st.latency.record((t1 - t0).as_micros().max(1) as u64);
                        }
                        Ok(Ok(())) => {}
                        Ok(Err(code)) => {
                            if w.counts(t1) {
                                st.error(code);
                            }
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        Err(_) => st.error(0),
                    }
                }
                st
            })
        })
        .collect()
}

/// W2 consumers: each with a receive connection and one delete connection per batch slot, so
/// a batch's deletes go out at once. Unless `--w2-serial`, a consumer receives its next batch
/// while the previous batch's deletes are in flight: peerbench's consumers do not wait for
/// their acks either (NATS `ack()` is a publish, AMQP `basic.ack` is unconfirmed). A message
/// still counts only once its delete is acknowledged, i.e. on a majority's disk.
fn spawn_consumers(
    args: &BenchArgs,
    w: Window,
    consumers: Vec<(Conn, Vec<Conn>)>,
    queue: String,
    origin: Instant,
) -> Vec<tokio::task::JoinHandle<Stats>> {
    let serial = args.w2_serial;
    consumers
        .into_iter()
        .map(|(mut c, mut deleters)| {
            let queue = queue.clone();
            let (batch, wait) = (args.w2_batch.clamp(1, 16), args.w2_wait_s.min(30));
            tokio::spawn(async move {
                let mut st = Stats::new();
                // Received, not yet deleted: deleted while the next batch is received.
                let mut pending = Vec::new();
                while !w.over() {
                    let deletes = delete_all(&mut deleters, &queue, std::mem::take(&mut pending));
                    let received = if serial {
                        let done = deletes.await;
                        record_deletes(&mut st, w, origin, done);
                        c.receive(&queue, batch, wait).await
                    } else {
                        let (received, done) =
                            futures::join!(c.receive(&queue, batch, wait), deletes);
                        record_deletes(&mut st, w, origin, done);
                        received
                    };
                    match received {
                        Ok(m) => pending = m,
                        Err(code) => {
                            if w.counts(Instant::now()) {
                                st.error(code);
                            }
                        }
                    }
                }
                let done = delete_all(&mut deleters, &queue, pending).await;
                record_deletes(&mut st, w, origin, done);
                st
            })
        })
        .collect()
}

/// One delete's outcome, the message body and when the reply came.
type Deleted = (Result<(), u32>, Vec<u8>, Instant);

/// Deletes every message of a batch on its own, all at once.
async fn delete_all(
    deleters: &mut [Conn],
    queue: &str,
    msgs: Vec<(String, Vec<u8>)>,
) -> Vec<Deleted> {
    let deletes = msgs
        .into_iter()
        .zip(deleters.iter_mut())
        .map(|((handle, body), d)| async move {
            let r = d.delete(queue, handle).await;
            (r, body, Instant::now())
        });
    futures::future::join_all(deletes).await
}

/// Counts the deletes that completed inside the window; latency is send → delete ack.
fn record_deletes(st: &mut Stats, w: Window, origin: Instant, done: Vec<Deleted>) {
    for (r, body, at) in done {
        if !w.counts(at) {
            continue;
        }
        match r {
            Ok(()) => {
                st.completed += 1;
                st.bytes += body.len() as u64;
                if let Some(ns) = sent_ns(&body) {
                    let lat = ((at - origin).as_nanos() as u64).saturating_sub(ns) / 1000;
                    let _ = st.latency.record(lat.max(1));
                }
            }
            Err(code) => st.error(code),
        }
    }
}

async fn progress(w: Window, label: String, quiet: bool) {
    if quiet {
        return;
    }
    let total = (w.end - Instant::now()).as_millis() as u64;
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:40}] {msg}")
            .expect("template")
            .progress_chars("=> "),
    );
    bar.set_prefix(label);
    while !w.over() {
        let now = Instant::now();
        bar.set_position(total - (w.end.saturating_duration_since(now)).as_millis() as u64);
        bar.set_message(if now < w.start {
            "warm-up"
        } else {
            "measuring"
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bar.finish_and_clear();
}

async fn collect(tasks: Vec<tokio::task::JoinHandle<Stats>>) -> Stats {
    let mut all = Stats::new();
    for t in tasks {
        if let Ok(s) = t.await {
            all.merge(s);
        }
    }
    all
}

/// `n` publisher connections, publisher i on queue i % queues. gRPC publishers share
/// `pub_conns` HTTP/2 channels per leader; HTTP/1.1 publishers need a connection each.
async fn publisher_conns(
    target: &Target,
    args: &BenchArgs,
    queues: &[String],
    n: usize,
) -> anyhow::Result<Vec<(Sender, String)>> {
    let mut out = Vec::with_capacity(n);
    match target {
        Target::Grpc { seed, stream } => {
            // Per leader, `pub_conns` connections (each with one message stream if streaming).
            let mut conns: BTreeMap<String, Vec<Conn>> = BTreeMap::new();
            let mut url_of = Vec::with_capacity(queues.len());
            for q in queues {
                let url = leader_endpoint(seed, q).await?;
                if !conns.contains_key(&url) {
                    let mut cs = Vec::new();
                    for _ in 0..args.pub_conns.max(1) {
                        cs.push(Conn::grpc(&url, *stream).await?);
                    }
                    conns.insert(url.clone(), cs);
                }
                url_of.push(url);
            }
            for i in 0..n {
                let qi = i % queues.len();
                let cs = &conns[&url_of[qi]];
                let c = cs[i % cs.len()]
                    .share()
                    .expect("gRPC connections are shared");
                out.push((Sender::Queue(c), queues[qi].clone()));
            }
        }
        Target::Http { .. } => {
            for i in 0..n {
                let q = &queues[i % queues.len()];
                out.push((Sender::Queue(target.conn_for(q).await?), q.clone()));
            }
        }
    }
    Ok(out)
}

async fn run_workload(
    args: &BenchArgs,
    name: &str,
    target: &Target,
    run_id: u32,
    region_pids: &[u32],
) -> anyhow::Result<Outcome> {
    let origin = Instant::now();
    let inflight = |d: usize| args.inflight.unwrap_or(d);
    let queues: Vec<String> = match name {
        "W1" => vec![format!("bench-w1-{run_id}")],
        "W2" => vec![format!("bench-w2-{run_id}")],
        "W3" => (0..args.w3_queues)
            .map(|i| format!("bench-w3-{run_id}-{i}"))
            .collect(),
        "T1" => (0..args.t1_subscriptions.max(1))
            .map(|i| format!("bench-t1-{run_id}-{i}"))
            .collect(),
        other => bail!("unknown workload {other:?} (use W1, W2, W3, T1)"),
    };
    let mut admin = target.admin().await?;
    for q in &queues {
        admin
            .create_queue(q)
            .await
            .map_err(|code| anyhow::anyhow!("create queue {q}: CMQ error {code}"))?;
    }
    let n = inflight(match name {
        "W1" => args.w1_inflight,
        "W2" => args.w2_inflight,
        "T1" => args.t1_inflight,
        _ => args.w3_inflight,
    });
    let topic = format!("bench-t1-{run_id}");
    let pubs = if name == "T1" {
        create_topic(target, &topic, &queues).await?;
        topic_publisher_conns(target, args, &topic, n).await?
    } else {
        publisher_conns(target, args, &queues, n).await?
    };
    let mut consumers = Vec::new();
    if name == "W2" {
        for _ in 0..args.w2_consumers {
            let recv = target.conn_for(&queues[0]).await?;
            let mut deleters = Vec::new();
            for _ in 0..args.w2_batch.clamp(1, 16) {
                // A stream carries all of a batch's deletes at once: one connection will do.
                let d = match deleters.first() {
                    Some(d @ Conn::GrpcStream(..)) => d.share().expect("gRPC"),
                    _ => target.conn_for(&queues[0]).await?,
                };
                deleters.push(d);
            }
            consumers.push((recv, deleters));
        }
    }
    let w = {
        let start = Instant::now() + Duration::from_secs(args.warmup_s);
        Window {
            start,
            end: start + Duration::from_secs(args.duration_s),
        }
    };
    let bar = tokio::spawn(progress(w, name.to_string(), args.json));
    let used = tokio::spawn(usage_over(w, region_pids.to_vec()));
    let pub_tasks = spawn_publishers(args, w, pubs, origin);
    let con_tasks = spawn_consumers(args, w, consumers, queues[0].clone(), origin);
    let p = collect(pub_tasks).await;
    let (region, client) = used.await.unwrap_or_default();
    let outcome = if name == "W2" {
        let mut c = collect(con_tasks).await;
        for (k, v) in p.errors {
            *c.errors.entry(k).or_default() += v;
        }
        Outcome {
            workload: name.into(),
            completed: c.completed,
            bytes: c.bytes,
            latency: c.latency,
            errors: c.errors,
            window_s: args.duration_s as f64,
            published: Some(p.completed),
            region,
            client,
        }
    } else {
        Outcome {
            workload: name.into(),
            completed: p.completed,
            bytes: p.bytes,
            latency: p.latency,
            errors: p.errors,
            window_s: args.duration_s as f64,
            published: None,
            region,
            client,
        }
    };
    let _ = bar.await;
    if name == "T1" {
        delete_topic(target, &topic, queues.len()).await;
    }
    for q in &queues {
        let _ = admin.delete_queue(q).await;
    }
    Ok(outcome)
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    (h.value_at_quantile(q) as f64 / 1000.0 * 1000.0).round() / 1000.0
}

/// What the local region's nodes spent per message over the window.
struct RegionCost {
    cpu_us: f64,
    disk_kib: f64,
    /// CPU use in percent of one core.
    cpu_pct: f64,
}

/// What one message cost the region (when local) and this client; none if nothing completed.
fn cost(o: &Outcome) -> Option<(Option<RegionCost>, Option<f64>)> {
    let per_msg = (o.completed > 0).then_some(o.completed as f64)?;
    let region = o.region.map(|r| RegionCost {
        cpu_us: r.cpu.as_secs_f64() * 1e6 / per_msg,
        disk_kib: r.disk_write_bytes as f64 / 1024.0 / per_msg,
        cpu_pct: r.cpu.as_secs_f64() / o.window_s * 100.0,
    });
    let client_cpu_us = o.client.map(|c| c.cpu.as_secs_f64() * 1e6 / per_msg);
    Some((region, client_cpu_us))
}

/// `node_threads`: each local node's runtime threads; `None` against a given endpoint.
fn report(
    o: &Outcome,
    args: &BenchArgs,
    disk: Disk,
    to_leader: Option<bool>,
    node_threads: Option<usize>,
) {
    let rate = o.completed as f64 / o.window_s;
    let mib = o.bytes as f64 / o.window_s / (1024.0 * 1024.0);
    let errors: u64 = o.errors.values().sum();
    if args.json {
        let mut v = serde_json::json!({
            "target": "meridian",
            "protocol": args.protocol.label(),
            "workload": o.workload,
            "msgs_per_s": (rate * 10.0).round() / 10.0,
            "mib_per_s": (mib * 100.0).round() / 100.0,
            "p50_ms": ms(&o.latency, 0.5),
            "p90_ms": ms(&o.latency, 0.9),
            "p99_ms": ms(&o.latency, 0.99),
            "p999_ms": ms(&o.latency, 0.999),
            "completed": o.completed,
            "published": o.published,
            "errors": errors,
            "errors_by_code": o.errors.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>(),
            "window_s": o.window_s,
            "body_bytes": args.body_bytes,
            "disk_fsync_per_s": disk.overwrite.per_s.round(),
            "disk_fsync_p50_ms": disk.overwrite.p50_ms,
            "disk_append_fsync_per_s": disk.append.per_s.round(),
            "disk_append_fsync_p50_ms": disk.append.p50_ms,
            "to_leader": to_leader,
            "client_threads": args.client_threads,
            "node_threads": node_threads,
        });
        if let Some((region, client)) = cost(o) {
            let round = |x: f64, places: i32| (x * 10f64.powi(places)).round() / 10f64.powi(places);
            if let Some(r) = region {
                v["region_cpu_pct"] = round(r.cpu_pct, 1).into();
                v["region_cpu_us_per_msg"] = round(r.cpu_us, 1).into();
                v["region_disk_kib_per_msg"] = round(r.disk_kib, 2).into();
            }
            if let Some(c) = client {
                v["client_cpu_us_per_msg"] = round(c, 1).into();
            }
        }
        if o.workload == "T1" {
            v["subscriptions"] = args.t1_subscriptions.into();
            v["deliveries_per_s"] = ((rate * args.t1_subscriptions as f64).round()).into();
        }
        println!("{v}");
    } else {
        println!(
            "{:<3} {:>10.1} msgs/s {:>8.2} MiB/s  p50 {:>7.3} ms  p90 {:>7.3} ms  p99 {:>7.3} ms  p99.9 {:>7.3} ms  errors {}{}",
            o.workload,
            rate,
            mib,
            ms(&o.latency, 0.5),
            ms(&o.latency, 0.9),
            ms(&o.latency, 0.99),
            ms(&o.latency, 0.999),
            errors,
            if o.errors.is_empty() { String::new() } else { format!(" {:?}", o.errors) },
        );
        if let Some((region, Some(client))) = cost(o) {
            match region {
                Some(r) => println!(
                    "    per message: region {:.1} µs CPU and {:.2} KiB written ({:.0} % of one core), client {client:.1} µs CPU",
                    r.cpu_us, r.disk_kib, r.cpu_pct
                ),
                None => println!(
                    "    per message: client {client:.1} µs CPU (the region's processes are not local)"
                ),
            }
        }
        if let Some(p) = o.published {
            println!(
                "    (W2: {:.1} sends/s; msgs/s and latency are received+deleted, send→delete)",
                p as f64 / o.window_s
            );
        }
        if o.workload == "T1" {
            println!(
                "    (T1: msgs/s are publishes; each reached {} queues: {:.1} deliveries/s)",
                args.t1_subscriptions,
                rate * args.t1_subscriptions as f64
            );
        }
    }
    let _ = std::io::stdout().flush();
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.body_bytes < 16 {
        bail!("--body-bytes must be at least 16 (the send time travels in the body)");
    }
    let dir = match &args.data_dir {
        Some(d) => d.clone(),
        None => tempfile::Builder::new()
            .prefix("meridian-bench-")
            .tempdir()?
            .keep(),
    };
    // Each local node's runtime threads, resolved once; a given endpoint's are not known.
    let local_threads = crate::dev::node_threads(args.node_threads);
    let node_threads = args.endpoint.is_none().then_some(local_threads);
    let disk = Disk {
        overwrite: fsync_rate(&dir, ProbeWrite::Overwrite)?,
        append: fsync_rate(&dir, ProbeWrite::Append)?,
    };
    if !args.json {
        println!(
            "disk: {:.0} fsync/s (4 KiB overwrite + fdatasync, p50 {:.3} ms), {:.0} fsync/s \
             (4 KiB append + fsync as peerbench, p50 {:.3} ms) in {}",
            disk.overwrite.per_s,
            disk.overwrite.p50_ms,
            disk.append.per_s,
            disk.append.p50_ms,
            dir.display()
        );
    }
    let mut local = None;
    let mut region_pids = Vec::new();
    let target = match (&args.endpoint, args.protocol) {
        (Some(e), Protocol::Grpc | Protocol::GrpcStream) => Target::Grpc {
            seed: e.clone(),
            stream: args.protocol == Protocol::GrpcStream,
        },
        (Some(e), Protocol::Http) => match (&args.secret_id, &args.secret_key) {
            (Some(id), Some(key)) => Target::Http {
                endpoint: e.clone(),
                secret_id: id.clone(),
                secret_key: key.clone(),
                nodes: None,
            },
            _ => bail!("--protocol http with --endpoint needs --secret-id and --secret-key"),
        },
        (None, protocol) => {
            let mut region = crate::dev::LocalRegion::launch(
                &dir.join("region"),
                crate::dev::free_base_port(),
                3,
                false,
                local_threads,
                false,
            )?;
            region.wait_ready(Duration::from_secs(60)).await?;
            if !args.json {
                println!(
                    "local region: {} (data in {})",
                    region.grpc.join(" "),
                    region.dir.display()
                );
            }
            let target = match protocol {
                Protocol::Grpc | Protocol::GrpcStream => Target::Grpc {
                    seed: region.grpc[0].clone(),
                    stream: protocol == Protocol::GrpcStream,
                },
                Protocol::Http => {
                    let (secret_id, secret_key) = region.dev_credential().await?;
                    Target::Http {
                        endpoint: region.http[0].clone(),
                        secret_id,
                        secret_key,
                        nodes: Some(NodeEndpoints {
                            grpc: region.grpc.clone(),
                            http: region.http.clone(),
                            missed: Arc::default(),
                        }),
                    }
                }
            };
            region_pids = region.pids();
            local = Some(region);
            target
        }
    };
    if !args.json {
        match target.to_leader() {
            Some(true) => println!("requests go to the node leading each queue's group"),
            _ => println!(
                "requests go to the given endpoint, which forwards those of groups it does not lead"
            ),
        }
    }
    let run_id = rand::random::<u32>() % 1_000_000;
    let mut result = Ok(());
    for w in &args.workload {
        target.reset_misses();
        match run_workload(&args, &w.to_uppercase(), &target, run_id, &region_pids).await {
            Ok(o) => {
                // T1 publishes over HTTP go to the given endpoint (topics are not looked up).
                let http_t1 = matches!(target, Target::Http { .. }) && o.workload == "T1";
                let to_leader = if http_t1 { None } else { target.to_leader() };
                report(&o, &args, disk, to_leader, node_threads)
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    if let Some(mut region) = local {
        region.stop(false).await;
        if args.data_dir.is_none() {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    result
}
