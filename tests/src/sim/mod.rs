//! Deterministic simulation of a region under turmoil: three real `RegionNode`s (openraft, the
//! queue state machine, the proposer, forwarding and receipt handles, as in production) on an
//! in-memory disk that a crash truncates to what was synced, talking over turmoil's simulated
//! TCP through the node's `Transport` seam, with clients that send, receive and delete.
//!
//! One seed fixes everything: the nemesis schedule (crashes of one node, the leader or all
//! nodes; isolations; one-way partitions; message loss; clock jumps; slow fsyncs), network
//! latencies, client choices, fsync times and openraft's election timeouts. Time is simulated
//! (1 ms ticks), so a run is a pure function of its seed and a failing seed replays exactly
//! (`MERIDIAN_SIM_SEED=<seed> cargo test -p meridian-tests --test simulation replay`).
//!
//! Invariants are checked every few simulated milliseconds (one leader per term and group; the
//! same entry applied at each index on every node, never replaced) and at the end, after a
//! quiet phase in which every fault is healed and the queue is drained: nothing acknowledged is
//! lost, nothing unexpected or corrupt is delivered, nothing is delivered again after its delete
//! was acknowledged, no message is visible again before its visibility timeout, the same
//! receive generation is never handed out twice, and every replica's state digest agrees.

pub mod invariants;
pub mod memory_engine;
pub mod net;
pub mod oracle;
pub mod rng;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, UNIX_EPOCH};

use meridian_api::CmqCode;
use meridian_region_node::clock::Clock;
use meridian_region_node::command::QueueKey;
use meridian_region_node::config::{MemberConfig, NodeConfig, RaftConfig, StorageConfig};
use meridian_region_node::node::{RegionNode, Seams};
use meridian_region_node::placement::group_of;
use meridian_region_node::raft::NodeId;
use openraft::async_runtime::WatchReceiver;
use openraft::ServerState;

use invariants::Invariants;
use memory_engine::{MemoryEngine, SharedMemoryEngine};
use net::{host_name, ClientOp, ClientReply, NetFaults, Pool, Reply, Request, SimTransport};
use oracle::{Delivery, History, SendOutcome};

/// Unix ms at simulated time zero.
pub const EPOCH_MS: i64 = 1_800_000_000_000;
const NODES: [NodeId; 3] = [1, 2, 3];
const DATA_GROUPS: u32 = 2;
const QUEUE: &str = "orders";
const VISIBILITY_S: u32 = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimNemesis {
    CrashOne,
    CrashLeader,
    CrashAll,
    IsolateNode,
    IsolateLeader,
    OneWayPartition,
    MessageLoss,
    ClockJump,
    SlowDisk,
}

impl SimNemesis {
    pub const ALL: [SimNemesis; 9] = [
        SimNemesis::CrashOne,
        SimNemesis::CrashLeader,
        SimNemesis::CrashAll,
        SimNemesis::IsolateNode,
        SimNemesis::IsolateLeader,
        SimNemesis::OneWayPartition,
        SimNemesis::MessageLoss,
        SimNemesis::ClockJump,
        SimNemesis::SlowDisk,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SimNemesis::CrashOne => "crash-one",
            SimNemesis::CrashLeader => "crash-leader",
            SimNemesis::CrashAll => "crash-all",
            SimNemesis::IsolateNode => "isolate-node",
            SimNemesis::IsolateLeader => "isolate-leader",
            SimNemesis::OneWayPartition => "one-way-partition",
            SimNemesis::MessageLoss => "message-loss",
            SimNemesis::ClockJump => "clock-jump",
            SimNemesis::SlowDisk => "slow-disk",
        }
    }

    pub fn parse(s: &str) -> Option<SimNemesis> {
        Self::ALL.into_iter().find(|n| n.name() == s)
    }
}

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    /// Simulated time with faults.
    pub chaos: Duration,
    /// Simulated time with every fault healed while clients still run.
    pub quiet: Duration,
    pub clients: usize,
    pub nemeses: Vec<SimNemesis>,
    /// Give every node a disk that acknowledges appends before syncing them: a deliberately
    /// broken build, to show the checker catches lost data.
    pub broken_fsync: bool,
}

impl SimConfig {
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            chaos: Duration::from_secs(30),
            quiet: Duration::from_secs(5),
            clients: 3,
            nemeses: SimNemesis::ALL.to_vec(),
            broken_fsync: false,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct SimReport {
    pub seed: u64,
    pub simulated_ms: u64,
    pub sends_acked: u64,
    pub sends_unknown: u64,
    pub deliveries: u64,
    pub deletes_acked: u64,
    pub nemesis_events: u64,
    pub leader_changes: u64,
    /// Snapshot checkpoints made (built or installed) by all nodes.
    pub checkpoints: u64,
    pub violations: Vec<String>,
    /// Hash of everything observable that happened, in order: equal for equal seeds.
    pub trace_hash: u64,
}

impl SimReport {
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }

    fn count(&self, prefix: &str) -> usize {
        self.violations
            .iter()
            .filter(|v| v.starts_with(prefix))
            .count()
    }

    pub const HEADER: &'static str = "| nemeses | seed | simulated s | sends acked | sends unknown | deliveries | deletes acked | lost | unexpected | dup after delete | corrupt | visibility | election safety | state machine safety | divergent | other |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|";

    /// One table row (see [`SimReport::HEADER`]).
    pub fn row(&self, nemeses: &str) -> String {
        let counted = [
            "lost:",
            "unexpected:",
            "redelivered after delete:",
            "corrupt:",
            "visibility:",
            "election safety:",
            "state machine safety:",
            "divergent",
        ];
        let c: Vec<usize> = counted.iter().map(|p| self.count(p)).collect();
        let other = self.violations.len() - c.iter().sum::<usize>();
        format!(
            "| {nemeses} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {other} |",
            self.seed,
            self.simulated_ms / 1000,
            self.sends_acked,
            self.sends_unknown,
            self.deliveries,
            self.deletes_acked,
            c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]
        )
    }
}

impl std::fmt::Display for SimReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed {}: {} simulated ms, sends acked {} unknown {}, deliveries {}, deletes acked {}, \
             nemesis actions {}, leaders {}, checkpoints {}, violations {}, trace {:016x}",
            self.seed,
            self.simulated_ms,
            self.sends_acked,
            self.sends_unknown,
            self.deliveries,
            self.deletes_acked,
            self.nemesis_events,
            self.leader_changes,
            self.checkpoints,
            self.violations.len(),
            self.trace_hash
        )?;
        for v in &self.violations {
            write!(f, "\n  {v}")?;
        }
        Ok(())
    }
}

/// Unix ms on a simulated host: simulated time plus the host's (nemesis-set) clock offset.
struct SimClock {
    offset_ms: Arc<AtomicI64>,
}

fn sim_ms() -> u64 {
    turmoil::sim_elapsed().unwrap_or_default().as_millis() as u64
}

impl Clock for SimClock {
    fn now_ms(&self) -> i64 {
        EPOCH_MS + sim_ms() as i64 + self.offset_ms.load(Ordering::Relaxed)
    }
}

/// What the hosts and the driver share (everything runs on one thread).
struct Shared {
    nodes: Mutex<BTreeMap<NodeId, Weak<RegionNode>>>,
    engines: BTreeMap<NodeId, Arc<MemoryEngine>>,
    clock_offsets: BTreeMap<NodeId, Arc<AtomicI64>>,
    net: Arc<NetFaults>,
    /// Extra fsync latency, ms (the slow-disk nemesis).
    slow_fsync_ms: Arc<AtomicU64>,
    history: Mutex<History>,
    /// Client events in order, hashed into the report.
    trace: Mutex<Vec<String>>,
    stop_clients: AtomicBool,
    clients_done: AtomicU32,
    drained: AtomicBool,
}

impl Shared {
    fn trace(&self, line: String) {
        self.trace.lock().unwrap().push(line);
    }
}

fn applied_index(node: &RegionNode, group: u32) -> u64 {
    node.groups()[group as usize].shared.applied_index()
}

fn node_config(id: NodeId) -> NodeConfig {
    NodeConfig {
        node_id: id,
        data_dir: format!("/sim/node{id}").into(),
        grpc_listen: "0.0.0.0:9000".parse().expect("address"),
        data_groups: DATA_GROUPS,
        cluster_secret: "5e".repeat(16),
        bootstrap: id == 1,
        // turmoil runs every node on one thread; the field only sizes a real node's runtime.
        worker_threads: 0,
        members: NODES
            .iter()
            .map(|&m| MemberConfig {
                id: m,
                addr: format!("{}:{}", host_name(m), net::PORT),
            })
            .collect(),
        raft: RaftConfig {
            heartbeat_ms: 100,
            election_timeout_min_ms: 500,
            election_timeout_max_ms: 1000,
            // Small, so snapshots, log purges and snapshot installs happen under faults too.
            snapshot_after_entries: 300,
            logs_kept_after_snapshot: 50,
            ..RaftConfig::default()
        },
        http: Default::default(),
        topics: Default::default(),
        // No body cache: every written body leaves memory, so receives, dead-letter moves and
        // snapshots read body rows under faults too.
        storage: StorageConfig {
            cached_bodies_mib: 0,
            ..Default::default()
        },
        faults: Default::default(),
    }
}

async fn boot(id: NodeId, shared: Arc<Shared>) -> turmoil::Result {
    let engine = shared.engines[&id].clone();
    engine.recover();
    // Real processes never start in the same millisecond. Started together, openraft's
    // ticks line up exactly, and since it draws each node's election timeout once per process,
    // two nodes whose timeouts round to the same tick split every vote forever (seed 1082 did).
    tokio::time::sleep(Duration::from_millis(rng::below(200))).await;
    let seams = Seams {
        engine: Arc::new(SharedMemoryEngine(engine)),
        transport: Arc::new(SimTransport {
            faults: shared.net.clone(),
            pool: Pool::default(),
        }),
        clock: Arc::new(SimClock {
            offset_ms: shared.clock_offsets[&id].clone(),
        }),
    };
    let node = RegionNode::start_with(node_config(id), seams, None).await?;
    node.bootstrap_if_configured().await?;
    node.spawn_background();
    shared
        .nodes
        .lock()
        .unwrap()
        .insert(id, Arc::downgrade(&node));
    net::serve(node).await
}

fn pick_node() -> String {
    host_name(NODES[rng::below(NODES.len() as u64) as usize])
}

/// Why a client call failed: the node's CMQ error, or no usable answer (`code: None`).
#[derive(Debug)]
struct CallError {
    code: Option<u32>,
    message: String,
}

impl CallError {
    fn is(&self, code: CmqCode) -> bool {
        self.code == Some(code.as_u32())
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.code {
            Some(code) => write!(f, "({code}) {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

async fn client_call(pool: &Pool, op: ClientOp) -> Result<ClientReply, CallError> {
    let req = Request::Client(op);
    let lost = |message: String| CallError {
        code: None,
        message,
    };
    match pool
        .call(&pick_node(), &req, Duration::from_secs(30))
        .await
        .map_err(lost)?
    {
        Reply::Client(ClientReply::Failed { code, message }) => Err(CallError {
            code: Some(code),
            message,
        }),
        Reply::Client(r) => Ok(r),
        Reply::Rpc(_) => Err(lost("rpc reply to a client call".into())),
    }
}

async fn ensure_queue(pool: &Pool) {
    loop {
        let op = ClientOp::CreateQueue {
            queue: QUEUE.into(),
            visibility_s: VISIBILITY_S,
        };
        match client_call(pool, op).await {
            Ok(_) => return,
            Err(e) if e.is(CmqCode::AlreadyExists) => return,
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Receives up to `max`, records the deliveries and deletes them; returns how many came and
/// whether the queue answered "no message".
async fn receive_and_delete(shared: &Shared, pool: &Pool, who: &str, max: u32) -> (usize, bool) {
    let started = sim_ms();
    let msgs = match client_call(
        pool,
        ClientOp::Receive {
            queue: QUEUE.into(),
            max,
        },
    )
    .await
    {
        Ok(ClientReply::Received(m)) => m,
        Err(e) => {
            let empty = e.is(CmqCode::NoMessage);
            shared.trace(format!("{started} {who} receive: {e}"));
            if !empty {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            return (0, empty);
        }
        Ok(other) => panic!("unexpected receive reply {other:?}"),
    };
    let answered = sim_ms();
    {
        let mut h = shared.history.lock().unwrap();
        let mut t = shared.trace.lock().unwrap();
        for m in &msgs {
            t.push(format!(
                "{answered} {who} got {} #{}",
                m.msg_id, m.dequeue_count
            ));
            h.deliveries.push(Delivery {
                msg: m.clone(),
                started_ms: started,
                answered_ms: answered,
            });
        }
    }
    let handles: Vec<String> = msgs.iter().map(|m| m.handle.clone()).collect();
    let outcome = client_call(
        pool,
        ClientOp::Delete {
            queue: QUEUE.into(),
            handles,
        },
    )
    .await;
    let acked = sim_ms();
    let mut h = shared.history.lock().unwrap();
    let mut t = shared.trace.lock().unwrap();
    match outcome {
        Ok(ClientReply::Deleted(per_handle)) => {
            for (m, o) in msgs.iter().zip(per_handle) {
                t.push(format!("{acked} {who} delete {}: {o:?}", m.msg_id));
                if o.is_none() {
                    h.deleted.entry(m.msg_id.clone()).or_insert(acked);
                }
            }
        }
        other => t.push(format!("{acked} {who} delete: {other:?}")),
    }
    (msgs.len(), false)
}

async fn client_loop(i: usize, shared: Arc<Shared>) -> turmoil::Result {
    let who = format!("client{i}");
    let pool = &Pool::default();
    ensure_queue(pool).await;
    let mut n = 0u64;
    while !shared.stop_clients.load(Ordering::Relaxed) {
        n += 1;
        let body = format!("{who}|{n}").into_bytes();
        let outcome = match client_call(
            pool,
            ClientOp::Send {
                queue: QUEUE.into(),
                body: body.clone(),
            },
        )
        .await
        {
            Ok(ClientReply::Sent(id)) => SendOutcome::Acked(id),
            _ => SendOutcome::Unknown,
        };
        shared.trace(format!("{} {who} send {n}: {outcome:?}", sim_ms()));
        let unknown = outcome == SendOutcome::Unknown;
        shared.history.lock().unwrap().sends.insert(body, outcome);
        if unknown {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if n.is_multiple_of(2) {
            receive_and_delete(&shared, pool, &who, 8).await;
        }
    }
    shared.clients_done.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Receives and deletes until the queue reports nothing left (active, in flight or delayed).
async fn drain(shared: Arc<Shared>) -> turmoil::Result {
    let pool = &Pool::default();
    loop {
        let (got, empty) = receive_and_delete(&shared, pool, "drain", 16).await;
        if got > 0 || !empty {
            continue;
        }
        if let Ok(ClientReply::View {
            active: 0,
            inactive: 0,
            delayed: 0,
        }) = client_call(
            pool,
            ClientOp::View {
                queue: QUEUE.into(),
            },
        )
        .await
        {
            shared.drained.store(true, Ordering::Relaxed);
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The nemesis currently acting, and how to undo it.
enum Active {
    Crashed(Vec<NodeId>),
    Partitioned(Vec<(NodeId, NodeId, bool)>),
    Loss,
    Clock(NodeId),
    SlowDisk,
}

struct Driver<'a> {
    sim: turmoil::Sim<'a>,
    shared: Arc<Shared>,
    inv: Invariants,
    nemesis_events: u64,
    max_skew_ms: u64,
}

impl Driver<'_> {
    fn live_nodes(&self) -> BTreeMap<NodeId, Arc<RegionNode>> {
        self.shared
            .nodes
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(&id, w)| w.upgrade().map(|n| (id, n)))
            .collect()
    }

    fn leader_of(&self, group: u32) -> Option<NodeId> {
        self.live_nodes().into_iter().find_map(|(id, n)| {
            let state = n.groups()[group as usize]
                .raft
                .metrics()
                .borrow_watched()
                .state;
            (state == ServerState::Leader).then_some(id)
        })
    }

    fn step(&mut self) -> Result<(), String> {
        self.sim.step().map_err(|e| format!("a host failed: {e}"))?;
        Ok(())
    }

    fn now_ms(&self) -> u64 {
        self.sim.elapsed().as_millis() as u64
    }

    fn start(&mut self, kind: SimNemesis, queue_group: u32) -> Active {
        let random_node = || NODES[rng::below(3) as usize];
        let now = self.now_ms();
        self.nemesis_events += 1;
        let active = match kind {
            SimNemesis::CrashOne | SimNemesis::CrashLeader | SimNemesis::CrashAll => {
                let victims = match kind {
                    SimNemesis::CrashAll => NODES.to_vec(),
                    SimNemesis::CrashLeader => {
                        vec![self.leader_of(queue_group).unwrap_or_else(random_node)]
                    }
                    _ => vec![random_node()],
                };
                for &v in &victims {
                    self.sim.crash(host_name(v));
                    self.inv.forget_node(v);
                }
                Active::Crashed(victims)
            }
            SimNemesis::IsolateNode | SimNemesis::IsolateLeader => {
                let victim = match kind {
                    SimNemesis::IsolateLeader => {
                        self.leader_of(queue_group).unwrap_or_else(random_node)
                    }
                    _ => random_node(),
                };
                let cuts: Vec<(NodeId, NodeId, bool)> = NODES
                    .iter()
                    .filter(|&&o| o != victim)
                    .map(|&o| (victim, o, false))
                    .collect();
                for &(a, b, _) in &cuts {
                    self.sim.partition(host_name(a), host_name(b));
                }
                Active::Partitioned(cuts)
            }
            SimNemesis::OneWayPartition => {
                let a = random_node();
                let b = NODES[(NODES.iter().position(|&n| n == a).unwrap()
                    + 1
                    + rng::below(2) as usize)
                    % 3];
                self.sim.partition_oneway(host_name(a), host_name(b));
                Active::Partitioned(vec![(a, b, true)])
            }
            SimNemesis::MessageLoss => {
                self.shared.net.drop_per_mille.store(100, Ordering::Relaxed);
                Active::Loss
            }
            SimNemesis::ClockJump => {
                let victim = self.leader_of(queue_group).unwrap_or_else(random_node);
                let offset: i64 = if rng::below(2) == 0 { 10_000 } else { -10_000 };
                self.max_skew_ms = self.max_skew_ms.max(offset.unsigned_abs());
                self.shared.clock_offsets[&victim].store(offset, Ordering::Relaxed);
                Active::Clock(victim)
            }
            SimNemesis::SlowDisk => {
                self.shared.slow_fsync_ms.store(200, Ordering::Relaxed);
                Active::SlowDisk
            }
        };
        self.shared
            .trace(format!("{now} nemesis {kind:?} {}", describe(&active)));
        active
    }

    fn stop(&mut self, active: Active) {
        let now = self.now_ms();
        self.shared
            .trace(format!("{now} heal {}", describe(&active)));
        match active {
            Active::Crashed(victims) => {
                for v in victims {
                    self.sim.bounce(host_name(v));
                }
            }
            Active::Partitioned(cuts) => {
                for (a, b, one_way) in cuts {
                    if one_way {
                        self.sim.repair_oneway(host_name(a), host_name(b));
                    } else {
                        self.sim.repair(host_name(a), host_name(b));
                    }
                }
            }
            Active::Loss => self.shared.net.drop_per_mille.store(0, Ordering::Relaxed),
            Active::Clock(v) => self.shared.clock_offsets[&v].store(0, Ordering::Relaxed),
            Active::SlowDisk => self.shared.slow_fsync_ms.store(0, Ordering::Relaxed),
        }
    }

    fn check_invariants(&mut self) {
        let nodes = self.live_nodes();
        let now = self.now_ms();
        self.inv.check(&nodes, &self.shared.engines, now);
    }

    /// Steps until `done` holds or `limit` of simulated time passes; checks invariants on the way.
    fn run_until(
        &mut self,
        limit: Duration,
        mut done: impl FnMut(&mut Self) -> bool,
    ) -> Result<bool, String> {
        let until = self.now_ms() + limit.as_millis() as u64;
        let mut steps = 0u64;
        while self.now_ms() < until {
            if done(self) {
                return Ok(true);
            }
            self.step()?;
            steps += 1;
            if steps.is_multiple_of(10) {
                self.check_invariants();
            }
        }
        Ok(done(self))
    }
}

fn describe(a: &Active) -> String {
    match a {
        Active::Crashed(v) => format!("crash {v:?}"),
        Active::Partitioned(c) => format!("partition {c:?}"),
        Active::Loss => "10% message loss".into(),
        Active::Clock(n) => format!("clock of node {n}"),
        Active::SlowDisk => "slow fsync".into(),
    }
}

fn trace_hash(lines: &[String]) -> u64 {
    crate::fnv1a(
        lines
            .iter()
            .flat_map(|l| l.bytes().chain(std::iter::once(b'\n'))),
    )
}

thread_local! {
    static PANICS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Counts panics per thread (a simulation runs on one), then reports them as usual: a panic in
/// any simulated node's task is a failed run even though tokio contains it.
fn count_panics() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.with(|p| p.set(p.get() + 1));
            previous(info);
        }));
    });
}

/// Runs one simulation; the report lists every invariant violated.
pub fn run(cfg: &SimConfig) -> SimReport {
    count_panics();
    let panics_before = PANICS.with(|p| p.get());
    meridian_region_node::raft::runtime::seed_thread_rng(cfg.seed);
    rng::seed(cfg.seed);
    let slow_fsync_ms = Arc::new(AtomicU64::new(0));
    let engines = NODES
        .iter()
        .map(|&id| {
            let slow = slow_fsync_ms.clone();
            let broken = cfg.broken_fsync;
            let latency: memory_engine::FsyncLatency = Arc::new(move || {
                if broken {
                    // Lazy fsync, once a second, like brokers that acknowledge from memory.
                    return Duration::from_secs(1);
                }
                Duration::from_micros(500 + rng::below(2500))
                    + Duration::from_millis(slow.load(Ordering::Relaxed))
            });
            (id, MemoryEngine::new(latency, cfg.broken_fsync))
        })
        .collect();
    let shared = Arc::new(Shared {
        nodes: Mutex::default(),
        engines,
        clock_offsets: NODES.iter().map(|&id| (id, Arc::default())).collect(),
        net: Arc::default(),
        slow_fsync_ms,
        history: Mutex::default(),
        trace: Mutex::default(),
        stop_clients: AtomicBool::new(false),
        clients_done: AtomicU32::new(0),
        drained: AtomicBool::new(false),
    });
    let sim = turmoil::Builder::new()
        .rng_seed(cfg.seed)
        .epoch(UNIX_EPOCH + Duration::from_millis(EPOCH_MS as u64))
        .simulation_duration(Duration::from_secs(3600))
        .tick_duration(Duration::from_millis(1))
        .min_message_latency(Duration::from_micros(200))
        .max_message_latency(Duration::from_millis(3))
        .build();
    let mut d = Driver {
        sim,
        shared: shared.clone(),
        inv: Invariants::new(),
        nemesis_events: 0,
        max_skew_ms: 0,
    };
    for &id in &NODES {
        let shared = shared.clone();
        d.sim.host(host_name(id), move || boot(id, shared.clone()));
    }
    for i in 0..cfg.clients {
        d.sim
            .client(format!("client{i}"), client_loop(i, shared.clone()));
    }
    let queue_group = group_of(&QueueKey::new(net::TENANT, QUEUE), DATA_GROUPS);
    let mut report = SimReport {
        seed: cfg.seed,
        ..Default::default()
    };
    let outcome = (|| -> Result<(), String> {
        // Chaos: one nemesis at a time, each for 0.5–4 s, with 0.5–2 s of calm in between.
        let chaos_end = d.now_ms() + cfg.chaos.as_millis() as u64;
        while d.now_ms() < chaos_end && !cfg.nemeses.is_empty() {
            let calm = Duration::from_millis(500 + rng::below(1500));
            d.run_until(calm, |_| false)?;
            let kind = cfg.nemeses[rng::below(cfg.nemeses.len() as u64) as usize];
            let active = d.start(kind, queue_group);
            let hold = Duration::from_millis(500 + rng::below(3500));
            d.run_until(hold, |_| false)?;
            d.stop(active);
        }
        // Quiet: everything healed, clients go on; then they stop and the queue is drained.
        d.run_until(cfg.quiet, |_| false)?;
        shared.stop_clients.store(true, Ordering::Relaxed);
        let n = cfg.clients as u32;
        if !d.run_until(Duration::from_secs(120), |d| {
            d.shared.clients_done.load(Ordering::Relaxed) == n
        })? {
            return Err(
                "liveness: clients did not finish within 120 s after every fault healed".into(),
            );
        }
        d.sim.client("drain", drain(shared.clone()));
        if !d.run_until(Duration::from_secs(180), |d| {
            d.shared.drained.load(Ordering::Relaxed)
        })? {
            return Err(
                "liveness: the queue was not drained within 180 s after every fault healed".into(),
            );
        }
        // Replicas converge: equal applied index and equal state digest in every group.
        for g in 0..=DATA_GROUPS {
            let converged = d.run_until(Duration::from_secs(30), |d| {
                let nodes = d.live_nodes();
                let applied: Vec<u64> = nodes.values().map(|n| applied_index(n, g)).collect();
                nodes.len() == NODES.len() && applied.windows(2).all(|w| w[0] == w[1])
            })?;
            if !converged {
                return Err(format!(
                    "liveness: group {g} replicas did not reach the same applied index"
                ));
            }
            let digests: Vec<(NodeId, (u64, String))> = d
                .live_nodes()
                .iter()
                .map(|(&id, n)| (id, n.groups()[g as usize].shared.digest()))
                .collect();
            if digests.windows(2).any(|w| w[0].1 != w[1].1) {
                d.inv
                    .violations
                    .push(format!("divergent replicas in group {g}: {digests:?}"));
            }
            d.shared
                .trace(format!("group {g} digest {:?}", digests[0].1));
        }
        for (g, high) in d.inv.committed_high() {
            for (id, n) in d.live_nodes() {
                let applied = applied_index(&n, g);
                if applied < high {
                    d.inv.violations.push(format!(
                        "committed entry lost: group {g} index {high} was applied, node {id} ends at {applied}"
                    ));
                }
            }
        }
        Ok(())
    })();
    if let Err(e) = outcome {
        report.violations.push(e);
    }
    d.check_invariants();
    let panics = PANICS.with(|p| p.get()) - panics_before;
    if panics > 0 {
        report
            .violations
            .push(format!("{panics} panics in simulated nodes (see stderr)"));
    }
    report.simulated_ms = d.now_ms();
    report.nemesis_events = d.nemesis_events;
    report.leader_changes = d.inv.events.len() as u64;
    report.checkpoints = shared
        .engines
        .values()
        .map(|e| {
            e.checkpoints_made
                .load(std::sync::atomic::Ordering::Relaxed)
        })
        .sum();
    report.violations.extend(d.inv.violations.iter().cloned());
    let h = shared.history.lock().unwrap();
    report.sends_acked = h
        .sends
        .values()
        .filter(|o| matches!(o, SendOutcome::Acked(_)))
        .count() as u64;
    report.sends_unknown = h.sends.len() as u64 - report.sends_acked;
    report.deliveries = h.deliveries.len() as u64;
    report.deletes_acked = h.deleted.len() as u64;
    report.violations.extend(h.check(d.max_skew_ms).all());
    let mut trace = shared.trace.lock().unwrap().clone();
    trace.extend(d.inv.events.iter().cloned());
    report.trace_hash = trace_hash(&trace);
    if std::env::var_os("MERIDIAN_SIM_TRACE").is_some() {
        for line in &trace {
            eprintln!("trace: {line}");
        }
    }
    report
}
