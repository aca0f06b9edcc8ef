//! Fault injection through the node's seams (storage, transport, clock), for the fault tests.
//!
//! Active only when the node's config sets `[faults] enabled = true`: then the seams are wrapped
//! and the `FaultService` gRPC API sets the faults at run time. Never enable it in production.

use std::collections::{HashSet, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use futures::stream::{self, BoxStream};
use futures::StreamExt;
use meridian_api::raftpb::GroupMessage;
use rand::Rng;

use crate::clock::Clock;
use crate::raft::NodeId;
use crate::storage::{LogJob, LogOp, StorageEngine, StorageMetrics};
use crate::transport::{RpcKind, Transport};

/// The faults in force on this node.
#[derive(Default)]
pub struct Faults {
    /// Nodes this node cannot reach (set on both sides for a symmetric partition).
    pub blocked: Mutex<HashSet<NodeId>>,
    /// Added to every message to another node, milliseconds.
    pub delay_ms: AtomicU64,
    /// Messages lost, per thousand (the request or its reply, at random).
    pub drop_per_mille: AtomicU32,
    /// Added to this node's wall clock, milliseconds.
    pub clock_offset_ms: AtomicI64,
    /// Disk full: writes wait, unacknowledged, until it is cleared.
    pub disk_full: AtomicBool,
    disk_freed: Condvar,
    disk_lock: Mutex<()>,
}

impl Faults {
    pub fn set_disk_full(&self, full: bool) {
        let _g = self.disk_lock.lock().expect("disk lock");
        self.disk_full.store(full, Ordering::SeqCst);
        if !full {
            self.disk_freed.notify_all();
        }
    }

    /// Blocks while the disk is "full".
    fn wait_for_space(&self) {
        let mut g = self.disk_lock.lock().expect("disk lock");
        let mut warned = false;
        while self.disk_full.load(Ordering::SeqCst) {
            if !warned {
                tracing::error!("disk full (injected): writes wait; nothing is acknowledged");
                warned = true;
            }
            g = self.disk_freed.wait(g).expect("disk lock");
        }
    }
}

pub struct FaultyClock {
    pub inner: Arc<dyn Clock>,
    pub faults: Arc<Faults>,
}

impl Clock for FaultyClock {
    fn now_ms(&self) -> i64 {
        self.inner.now_ms() + self.faults.clock_offset_ms.load(Ordering::Relaxed)
    }
}

/// Storage whose writes stall while the disk is "full": like a real full disk under a writer
/// that retries, appends are never reported durable (so never acknowledged) until space
/// returns, and then complete in order.
pub struct FaultyStorage {
    inner: Arc<dyn StorageEngine>,
    faults: Arc<Faults>,
    parked: Arc<Parked>,
}

/// Log jobs held back while the disk is full, in submission order.
#[derive(Default)]
struct Parked {
    jobs: Mutex<VecDeque<LogJob>>,
    arrived: Condvar,
}

impl FaultyStorage {
    pub fn new(inner: Arc<dyn StorageEngine>, faults: Arc<Faults>) -> Arc<Self> {
        let s = Arc::new(Self {
            inner,
            faults,
            parked: Arc::default(),
        });
        let (inner, faults, parked) = (s.inner.clone(), s.faults.clone(), s.parked.clone());
        std::thread::Builder::new()
            .name("disk-full-release".into())
            .spawn(move || loop {
                {
                    let mut jobs = parked.jobs.lock().expect("parked lock");
                    while jobs.is_empty() {
                        jobs = parked.arrived.wait(jobs).expect("parked lock");
                    }
                }
                faults.wait_for_space();
                // Under the lock, so a job submitted meanwhile cannot overtake these.
                let mut jobs = parked.jobs.lock().expect("parked lock");
                for j in jobs.drain(..) {
                    inner.submit(j);
                }
            })
            .expect("spawn the disk-full release thread");
        s
    }
}

impl StorageEngine for FaultyStorage {
    fn get(&self, cf: &'static str, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        self.inner.get(cf, key)
    }

    fn scan(
        &self,
        cf: &'static str,
        from: &[u8],
        to: &[u8],
    ) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.inner.scan(cf, from, to)
    }

    fn last_in(
        &self,
        cf: &'static str,
        from: &[u8],
        to: &[u8],
    ) -> io::Result<Option<(Vec<u8>, Vec<u8>)>> {
        self.inner.last_in(cf, from, to)
    }

    fn write(&self, ops: Vec<LogOp>, sync: bool) -> io::Result<()> {
        if self.faults.disk_full.load(Ordering::SeqCst) {
            // Synchronous writes (votes, snapshots) are called from async tasks: let the runtime
            // move its other work (the FaultService that frees the disk, among others) away
            // from this thread while it waits.
            crate::storage::run_blocking(|| self.faults.wait_for_space());
        }
        self.inner.write(ops, sync)
    }

    fn submit(&self, job: LogJob) {
        let mut jobs = self.parked.jobs.lock().expect("parked lock");
        // Behind parked jobs too, so the log keeps its order.
        if self.faults.disk_full.load(Ordering::SeqCst) || !jobs.is_empty() {
            jobs.push_back(job);
            self.parked.arrived.notify_one();
        } else {
            self.inner.submit(job);
        }
    }

    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }

    fn disk_low(&self) -> bool {
        self.faults.disk_full.load(Ordering::SeqCst) || self.inner.disk_low()
    }

    fn metrics(&self) -> &StorageMetrics {
        self.inner.metrics()
    }

    fn checkpoint(&self, name: &str) -> io::Result<()> {
        self.inner.checkpoint(name)
    }

    fn scan_checkpoint(
        &self,
        name: &str,
        cf: &'static str,
        from: &[u8],
        to: &[u8],
    ) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.inner.scan_checkpoint(name, cf, from, to)
    }

    fn remove_checkpoint(&self, name: &str) -> io::Result<()> {
        self.inner.remove_checkpoint(name)
    }

    fn checkpoints(&self) -> io::Result<Vec<String>> {
        self.inner.checkpoints()
    }
}

pub struct FaultyTransport {
    pub inner: Arc<dyn Transport>,
    pub faults: Arc<Faults>,
}

fn lost(why: &str) -> tonic::Status {
    tonic::Status::unavailable(format!("{why} (injected fault)"))
}

impl Faults {
    /// Whether a message to `target` is lost now: partitioned, or lost by chance.
    fn loses(&self, target: NodeId) -> bool {
        if self.blocked.lock().expect("blocked lock").contains(&target) {
            return true;
        }
        let drop = self.drop_per_mille.load(Ordering::Relaxed);
        drop > 0 && rand::thread_rng().gen_range(0..1000) < drop
    }
}

/// How long a broken append stream stays silent before it reports the break.
const STREAM_SILENCE: Duration = Duration::from_millis(500);

#[tonic::async_trait]
impl Transport for FaultyTransport {
    async fn call(
        &self,
        target: NodeId,
        addr: &str,
        kind: RpcKind,
        msg: GroupMessage,
        timeout: Duration,
    ) -> Result<Vec<u8>, tonic::Status> {
        let delay = self.faults.delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        // A partitioned or lost request looks like silence: the caller waits, then gives up.
        let silence = timeout.min(Duration::from_millis(500));
        if self
            .faults
            .blocked
            .lock()
            .expect("blocked lock")
            .contains(&target)
        {
            tokio::time::sleep(silence).await;
            return Err(lost("partitioned: no answer"));
        }
        let drop = self.faults.drop_per_mille.load(Ordering::Relaxed);
        let (lose_request, lose_reply) = {
            let mut rng = rand::thread_rng();
            (rng.gen_range(0..1000) < drop, rng.gen_range(0..1000) < drop)
        };
        if lose_request {
            tokio::time::sleep(silence).await;
            return Err(lost("request lost"));
        }
        let reply = self.inner.call(target, addr, kind, msg, timeout).await;
        if lose_reply {
            return Err(lost("reply lost"));
        }
        reply
    }

    async fn connect(&self, target: NodeId, addr: &str) -> Result<(), tonic::Status> {
        if self.faults.loses(target) {
            tokio::time::sleep(STREAM_SILENCE).await;
            return Err(lost("partitioned: no connection"));
        }
        self.inner.connect(target, addr).await
    }

    /// Faults act on a stream as on a TCP connection: latency delays every message but keeps
    /// them pipelined; a partition or a lost message breaks the stream (which openraft then
    /// opens again), as nothing is lost from the middle of a live connection.
    fn append_stream<'a>(
        &'a self,
        target: NodeId,
        addr: &'a str,
        group: u32,
        requests: BoxStream<'static, Vec<u8>>,
    ) -> BoxStream<'a, Result<Vec<u8>, tonic::Status>> {
        let cut = Arc::new(AtomicBool::new(false));
        let (faults, cutting) = (self.faults.clone(), cut.clone());
        let delayed = requests
            .map(move |r| {
                let delay = faults.delay_ms.load(Ordering::Relaxed);
                async move {
                    if delay > 0 {
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                    }
                    r
                }
            })
            .buffered(1024);
        let faults = self.faults.clone();
        let requests = delayed
            .take_while(move |_| {
                let lost = faults.loses(target);
                if lost {
                    cutting.store(true, Ordering::SeqCst);
                }
                std::future::ready(!lost)
            })
            .boxed();
        let replies = self.inner.append_stream(target, addr, group, requests);
        let faults = self.faults.clone();
        stream::unfold(Some(replies), move |replies| {
            let (faults, cut) = (faults.clone(), cut.clone());
            async move {
                let mut replies = replies?;
                let item = replies.next().await;
                let broken = match &item {
                    Some(_) => faults.loses(target),
                    None => cut.load(Ordering::SeqCst),
                };
                if broken {
                    tokio::time::sleep(STREAM_SILENCE).await;
                    return Some((Err(lost("append stream broken")), None));
                }
                item.map(|i| (i, Some(replies)))
            }
        })
        .boxed()
    }
}
