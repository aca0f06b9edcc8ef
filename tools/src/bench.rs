//! `meridian bench`: the workloads of ../shared/peerbench (same names, defaults and concurrency
//! model) against a Meridian region, with the disk's fsync rate measured beside the results.
//!
//! * publishers: `inflight` tasks, each a closed loop "send, await the durable ack, repeat";
//! * W2 consumers: `w2_consumers` tasks, each batch-receiving up to `w2_batch` and deleting every
//!   message individually;
//! * timing: `warmup_s` run but not counted, then `duration_s` measured; an operation counts if
//!   it completes inside the measured window.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use meridian_api::pb::cluster_service_client::ClusterServiceClient;
use meridian_api::pb::queue_service_client::QueueServiceClient;
use meridian_api::pb::*;
use meridian_api::CmqError;
use tokio::time::Instant;
use tonic::transport::Channel;

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Protocol {
    Grpc,
    Http,
}

#[derive(Args, Clone)]
pub struct BenchArgs {
    /// Workloads, comma separated: W1 (durable send), W2 (send-receive-delete), W3 (many queues).
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
    /// W3: number of queues.
    #[arg(long, default_value_t = 64)]
    w3_queues: usize,
    /// W3: sends in flight, spread round-robin over the queues.
    #[arg(long, default_value_t = 64)]
    w3_inflight: usize,
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

/// Measures 4 KiB write + fdatasync for 2 s in `dir`: (fsyncs per second, p50 ms).
pub fn fsync_rate(dir: &Path) -> anyhow::Result<(f64, f64)> {
    use std::os::unix::fs::FileExt;
    std::fs::create_dir_all(dir)?;
    let path = dir.join("fsync-probe");
    let f = std::fs::OpenOptions::new()
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
        f.write_at(&block, 0)?;
        f.sync_data()?;
        h.record(t.elapsed().as_micros().max(1) as u64)?;
        n += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    drop(f);
    let _ = std::fs::remove_file(path);
    Ok((n as f64 / secs, h.value_at_quantile(0.5) as f64 / 1000.0))
}

fn body(size: usize, origin: Instant) -> Vec<u8> {
    let mut b = vec![b'x'; size.max(8)];
    let ns = origin.elapsed().as_nanos() as u64;
    b[..8].copy_from_slice(&ns.to_be_bytes());
    b
}

async fn connect(url: &str) -> anyhow::Result<Channel> {
    tonic::transport::Endpoint::from_shared(url.to_string())?
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connect {url}"))
}

/// The gRPC endpoint of the node leading `queue`'s group, so sends need no forwarding hop
/// (peerbench also talks to the stream/queue leader).
async fn leader_endpoint(seed: &str, queue: &str) -> anyhow::Result<String> {
    let ch = connect(seed).await?;
    let group = QueueServiceClient::new(ch.clone())
        .get_queue_attributes(QueueNameRequest {
            queue_name: queue.into(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", CmqError::from_status(&s)))?
        .into_inner()
        .group;
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
        .map(|m| format!("http://{}", m.addr))
        .unwrap_or_else(|| seed.to_string()))
}

async fn recreate(seed: &str, queue: &str) -> anyhow::Result<()> {
    let mut c = QueueServiceClient::new(connect(seed).await?);
    let _ = c
        .delete_queue(QueueNameRequest {
            queue_name: queue.into(),
        })
        .await;
    // A deleted name is reserved for 10 s; bench names carry a run suffix instead of waiting.
    c.create_queue(CreateQueueRequest {
        queue_name: queue.into(),
        attributes: Some(QueueAttributes {
            visibility_timeout: Some(30),
            ..Default::default()
        }),
    })
    .await
    .map_err(|s| anyhow::anyhow!("create {queue}: {}", CmqError::from_status(&s)))?;
    Ok(())
}

fn spawn_publishers(
    args: &BenchArgs,
    w: Window,
    clients: Vec<QueueServiceClient<Channel>>,
    queues: Vec<String>,
    inflight: usize,
    origin: Instant,
) -> Vec<tokio::task::JoinHandle<Stats>> {
    (0..inflight)
        .map(|i| {
            let mut c = clients[i % clients.len()].clone();
            let queue = queues[i % queues.len()].clone();
            let size = args.body_bytes;
            let batch = args.send_batch.clamp(1, 16);
            let op_timeout = Duration::from_secs(args.op_timeout_s);
            tokio::spawn(async move {
                let mut st = Stats::new();
                while !w.over() {
                    let t0 = Instant::now();
                    let r = if batch == 1 {
                        let req = SendMessageRequest {
                            queue_name: queue.clone(),
                            msg_body: body(size, origin),
                            delay_seconds: 0,
                        };
                        tokio::time::timeout(op_timeout, c.send_message(req))
                            .await
                            .map(|r| r.map(|_| ()))
                    } else {
                        let req = BatchSendMessageRequest {
                            queue_name: queue.clone(),
                            msg_body: (0..batch).map(|_| body(size, origin)).collect(),
                            delay_seconds: 0,
                        };
                        tokio::time::timeout(op_timeout, c.batch_send_message(req))
                            .await
                            .map(|r| r.map(|_| ()))
                    };
                    let t1 = Instant::now();
                    match r {
                        Ok(Ok(())) if w.counts(t1) => {
                            st.completed += batch as u64;
                            st.bytes += (batch * size) as u64;
                            let _ = st.latency.record((t1 - t0).as_micros().max(1) as u64);
                        }
                        Ok(Ok(())) => {}
                        Ok(Err(s)) => {
                            if w.counts(t1) {
                                st.error(CmqError::from_status(&s).code.as_u32());
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

fn spawn_consumers(
    args: &BenchArgs,
    w: Window,
    client: QueueServiceClient<Channel>,
    queue: String,
    origin: Instant,
) -> Vec<tokio::task::JoinHandle<Stats>> {
    (0..args.w2_consumers)
        .map(|_| {
            let mut c = client.clone();
            let queue = queue.clone();
            let (batch, wait) = (args.w2_batch.clamp(1, 16), args.w2_wait_s.min(30));
            tokio::spawn(async move {
                let mut st = Stats::new();
                while !w.over() {
                    let r = c
                        .batch_receive_message(BatchReceiveMessageRequest {
                            queue_name: queue.clone(),
                            num_of_msg: batch,
                            polling_wait_seconds: Some(wait),
                        })
                        .await;
                    let msgs = match r {
                        Ok(r) => r.into_inner().messages,
                        Err(s) => {
                            let code = CmqError::from_status(&s).code.as_u32();
                            if code != 7000 && w.counts(Instant::now()) {
                                st.error(code);
                            }
                            continue;
                        }
                    };
                    // Every message is deleted on its own (as peerbench acks each one), all of
                    // the batch's deletes at once, like the peers' fire-and-forget acks.
                    let deletes = msgs.into_iter().map(|m| {
                        let mut c = c.clone();
                        let queue = queue.clone();
                        async move {
                            let sent_ns = m
                                .msg_body
                                .get(..8)
                                .map(|b| u64::from_be_bytes(b.try_into().unwrap()));
                            let r = c
                                .delete_message(DeleteMessageRequest {
                                    queue_name: queue,
                                    receipt_handle: m.receipt_handle,
                                })
                                .await;
                            (r, sent_ns, m.msg_body.len())
                        }
                    });
                    for (r, sent_ns, len) in futures::future::join_all(deletes).await {
                        let now = Instant::now();
                        match r {
                            Ok(_) if w.counts(now) => {
                                st.completed += 1;
                                st.bytes += len as u64;
                                if let Some(ns) = sent_ns {
                                    let lat = (origin.elapsed().as_nanos() as u64)
                                        .saturating_sub(ns)
                                        / 1000;
                                    let _ = st.latency.record(lat.max(1));
                                }
                            }
                            Ok(_) => {}
                            Err(s) => {
                                if w.counts(now) {
                                    st.error(CmqError::from_status(&s).code.as_u32());
                                }
                            }
                        }
                    }
                }
                st
            })
        })
        .collect()
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

async fn run_workload(
    args: &BenchArgs,
    name: &str,
    seed: &str,
    run_id: u32,
) -> anyhow::Result<Outcome> {
    let origin = Instant::now();
    let inflight = |d: usize| args.inflight.unwrap_or(d);
    let queues: Vec<String> = match name {
        "W1" => vec![format!("bench-w1-{run_id}")],
        "W2" => vec![format!("bench-w2-{run_id}")],
        "W3" => (0..args.w3_queues)
            .map(|i| format!("bench-w3-{run_id}-{i}"))
            .collect(),
        other => bail!("unknown workload {other:?} (use W1, W2, W3)"),
    };
    for q in &queues {
        recreate(seed, q).await?;
    }
    // Publishers talk to the leader of each queue's group.
    let mut clients_by_queue = Vec::new();
    let mut channels: BTreeMap<String, Vec<Channel>> = BTreeMap::new();
    for q in &queues {
        let url = leader_endpoint(seed, q).await?;
        if !channels.contains_key(&url) {
            let mut chs = Vec::new();
            for _ in 0..args.pub_conns.max(1) {
                chs.push(connect(&url).await?);
            }
            channels.insert(url.clone(), chs);
        }
        clients_by_queue.push(url);
    }
    let w = {
        let start = Instant::now() + Duration::from_secs(args.warmup_s);
        Window {
            start,
            end: start + Duration::from_secs(args.duration_s),
        }
    };
    let bar = tokio::spawn(progress(w, name.to_string(), args.json));
    let outcome = match name {
        "W1" | "W3" => {
            let n = inflight(if name == "W1" {
                args.w1_inflight
            } else {
                args.w3_inflight
            });
            // Publisher i sends to queue i % queues, over that queue's leader's channels.
            let mut tasks = Vec::new();
            for i in 0..n {
                let qi = i % queues.len();
                let chs = &channels[&clients_by_queue[qi]];
                let c = QueueServiceClient::new(chs[i % chs.len()].clone());
                let mut one =
                    spawn_publishers(args, w, vec![c], vec![queues[qi].clone()], 1, origin);
                tasks.append(&mut one);
            }
            let st = collect(tasks).await;
            Outcome {
                workload: name.into(),
                completed: st.completed,
                bytes: st.bytes,
                latency: st.latency,
                errors: st.errors,
                window_s: args.duration_s as f64,
                published: None,
            }
        }
        _ => {
            let chs = &channels[&clients_by_queue[0]];
            let clients: Vec<_> = chs
                .iter()
                .map(|c| QueueServiceClient::new(c.clone()))
                .collect();
            let pubs = spawn_publishers(
                args,
                w,
                clients.clone(),
                queues.clone(),
                inflight(args.w2_inflight),
                origin,
            );
            let cons = spawn_consumers(args, w, clients[0].clone(), queues[0].clone(), origin);
            let p = collect(pubs).await;
            let mut c = collect(cons).await;
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
            }
        }
    };
    let _ = bar.await;
    for q in &queues {
        if let Ok(ch) = connect(seed).await {
            let _ = QueueServiceClient::new(ch)
                .delete_queue(QueueNameRequest {
                    queue_name: q.clone(),
                })
                .await;
        }
    }
    Ok(outcome)
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    (h.value_at_quantile(q) as f64 / 1000.0 * 1000.0).round() / 1000.0
}

fn report(o: &Outcome, args: &BenchArgs, fsync: (f64, f64)) {
    let rate = o.completed as f64 / o.window_s;
    let mib = o.bytes as f64 / o.window_s / (1024.0 * 1024.0);
    let errors: u64 = o.errors.values().sum();
    if args.json {
        let v = serde_json::json!({
            "target": "meridian",
            "protocol": format!("{:?}", args.protocol).to_lowercase(),
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
            "disk_fsync_per_s": fsync.0.round(),
            "disk_fsync_p50_ms": fsync.1,
        });
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
        if let Some(p) = o.published {
            println!(
                "    (W2: {:.1} sends/s; msgs/s and latency are received+deleted, send→delete)",
                p as f64 / o.window_s
            );
        }
    }
    let _ = std::io::stdout().flush();
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.protocol == Protocol::Http {
        bail!("--protocol http needs the CMQ HTTP API, which this build does not serve yet; use --protocol grpc");
    }
    let dir = match &args.data_dir {
        Some(d) => d.clone(),
        None => tempfile::Builder::new()
            .prefix("meridian-bench-")
            .tempdir()?
            .keep(),
    };
    let fsync = fsync_rate(&dir)?;
    if !args.json {
        println!(
            "disk: {:.0} fsync/s (4 KiB write + fdatasync, p50 {:.3} ms) in {}",
            fsync.0,
            fsync.1,
            dir.display()
        );
    }
    let mut local = None;
    let seed = match &args.endpoint {
        Some(e) => e.clone(),
        None => {
            let region = crate::dev::LocalRegion::launch(
                &dir.join("region"),
                crate::dev::free_base_port(),
                3,
                false,
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
            let seed = region.grpc[0].clone();
            local = Some(region);
            seed
        }
    };
    let run_id = rand::random::<u32>() % 1_000_000;
    let mut result = Ok(());
    for w in &args.workload {
        match run_workload(&args, &w.to_uppercase(), &seed, run_id).await {
            Ok(o) => report(&o, &args, fsync),
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
