//! Harness for end-to-end tests: a real region of `meridian node` processes on loopback, each
//! with a generated config in a temp dir, that tests can SIGKILL, SIGSTOP and restart; and the
//! Jepsen-style queue checker with its nemeses ([`chaos`]).

pub mod chaos;
pub mod netns;
pub mod sim;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use meridian_api::pb::cluster_service_client::ClusterServiceClient;
use meridian_api::pb::queue_service_client::QueueServiceClient;
use meridian_api::pb::{
    BatchDeleteMessageRequest, BatchReceiveMessageRequest, ClusterStatusReply, Empty,
    ListQueueRequest,
};
use meridian_region_node::config::{
    FaultsConfig, HttpConfig, MemberConfig, NodeConfig, RaftConfig, StorageConfig,
};
use tonic::transport::Channel;

/// The `meridian` binary built alongside the tests (target/<profile>/meridian).
pub fn meridian_bin() -> PathBuf {
    if let Ok(p) = std::env::var("MERIDIAN_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let bin = dir.join("meridian");
    assert!(
        bin.exists(),
        "{} not found: build it first (`cargo build -p meridian-tools`), or set MERIDIAN_BIN",
        bin.display()
    );
    bin
}

/// A free loopback port (bound then released). Never the same port twice in one test process:
/// tests run in parallel threads, and the kernel may hand a just-released port to the next
/// `bind(0)`. Another process can still take it before the node binds it; [`Region::start_in`]
/// then starts again on fresh ports.
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<BTreeSet<u16>> = std::sync::Mutex::new(BTreeSet::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if HANDED_OUT.lock().unwrap().insert(port) {
            return port;
        }
    }
}

/// How many times [`Region::start_in`] starts a region on fresh ports when a node could not bind
/// the one it was given.
const START_ATTEMPTS: usize = 4;

/// The last `lines` lines of a file, or why it could not be read.
fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(s) => {
            let all: Vec<&str> = s.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("({}: {e})", path.display()),
    }
}

/// Whether process `pid` (our child) has exited: a zombie not yet reaped, or gone.
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself hold spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => true,
    }
}

/// Why a region did not become ready.
#[derive(Debug)]
enum NotReady {
    /// Node `id` exited; `log` is the end of its log.
    Exited {
        id: u64,
        log: String,
    },
    TimedOut,
}

pub struct NodeProc {
    pub id: u64,
    pub config_path: PathBuf,
    pub addr: String,
    pub http_addr: String,
    pub child: Option<Child>,
}

impl NodeProc {
    /// The node's log (its stdout and stderr), beside its config.
    pub fn log_path(&self) -> PathBuf {
        self.config_path.with_file_name("node.log")
    }

    /// The last `lines` lines of the node's log.
    fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_path(), lines)
    }
}

pub struct Region {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<NodeProc>,
    pub data_groups: u32,
    /// Set when every node runs in its own network namespace (see [`netns`]); dropped after
    /// the nodes are stopped.
    pub netns: Option<netns::Lab>,
}

impl Region {
    /// Starts `n` nodes (ids 1..=n) with `data_groups` data groups and waits until ready.
    pub async fn start(n: u64, data_groups: u32) -> Region {
        Self::start_with(n, data_groups, RaftConfig::default()).await
    }

    /// Like [`Region::start`], with explicit Raft settings (e.g. frequent snapshots).
    pub async fn start_with(n: u64, data_groups: u32, raft: RaftConfig) -> Region {
        Self::start_full(n, data_groups, raft, false).await
    }

    /// Like [`Region::start_with`]; `faults` enables the nodes' fault injection (FaultService).
    pub async fn start_full(n: u64, data_groups: u32, raft: RaftConfig, faults: bool) -> Region {
        Self::start_configured(n, data_groups, move |c| {
            c.raft = raft.clone();
            c.faults = FaultsConfig { enabled: faults };
        })
        .await
    }

    /// Starts `n` nodes whose generated configs `adjust` may change first.
    pub async fn start_configured(
        n: u64,
        data_groups: u32,
        adjust: impl Fn(&mut NodeConfig),
    ) -> Region {
        Self::start_in(n, data_groups, adjust, None, &std::env::temp_dir()).await
    }

    /// Like [`Region::start_configured`], each node in its own network namespace of `lab` (so
    /// tests can partition the real network; on loopback when `None`), and the region's
    /// directory (every node's data and log) under `base`, e.g. a small file system of its own.
    pub async fn start_in(
        n: u64,
        data_groups: u32,
        adjust: impl Fn(&mut NodeConfig),
        lab: Option<netns::Lab>,
        base: &Path,
    ) -> Region {
        let mut lab = lab;
        for attempt in 1..=START_ATTEMPTS {
            let mut region = Self::configure(n, data_groups, &adjust, lab.take(), base);
            for id in 1..=n {
                region.spawn(id);
            }
            match region.try_wait_ready(Duration::from_secs(60)).await {
                Ok(()) => return region,
                Err(NotReady::Exited { id, log })
                    if attempt < START_ATTEMPTS && log.contains("in use") =>
                {
                    eprintln!("node {id} could not bind its port; starting again on fresh ports");
                    region.stop_all();
                    lab = region.netns.take();
                }
                Err(e) => region.not_ready(e),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Writes the configs of a region of `n` nodes (none started yet).
    fn configure(
        n: u64,
        data_groups: u32,
        adjust: &impl Fn(&mut NodeConfig),
        lab: Option<netns::Lab>,
        base: &Path,
    ) -> Region {
        let dir = tempfile::Builder::new()
            .prefix("meridian-e2e-")
            .tempdir_in(base)
            .unwrap();
        let secret: [u8; 32] = rand::random();
        // In a namespace of its own every node has its own address, so fixed ports do.
        let addr = |id: u64, port: u16| match &lab {
            Some(lab) => format!("{}:{port}", lab.addr(id)),
            None => format!("127.0.0.1:{}", free_port()),
        };
        let members: Vec<MemberConfig> = (1..=n)
            .map(|id| MemberConfig {
                id,
                addr: addr(id, 7000),
            })
            .collect();
        let mut nodes = Vec::new();
        for m in &members {
            let http_addr = addr(m.id, 7001);
            let node_dir = dir.path().join(format!("node{}", m.id));
            std::fs::create_dir_all(&node_dir).unwrap();
            let mut cfg = NodeConfig {
                node_id: m.id,
                data_dir: node_dir.join("data"),
                grpc_listen: m.addr.parse().unwrap(),
                data_groups,
                cluster_secret: hex::encode(secret),
                bootstrap: m.id == 1,
                // One per core, the production default.
                worker_threads: 0,
                members: members.clone(),
                raft: RaftConfig::default(),
                http: HttpConfig {
                    listen: Some(http_addr.parse().unwrap()),
                    ..Default::default()
                },
                topics: Default::default(),
                // Small log segments: many regions run at once, each segment preallocated.
                storage: StorageConfig {
                    log_segment_mib: 8,
                    ..Default::default()
                },
                faults: FaultsConfig::default(),
            };
            adjust(&mut cfg);
            let config_path = node_dir.join("node.toml");
            std::fs::write(&config_path, cfg.to_toml()).unwrap();
            nodes.push(NodeProc {
                id: m.id,
                config_path,
                addr: m.addr.clone(),
                http_addr,
                child: None,
            });
        }
        Region {
            dir,
            nodes,
            data_groups,
            netns: lab,
        }
    }

    /// SIGKILLs every node and reaps it.
    fn stop_all(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    fn node(&mut self, id: u64) -> &mut NodeProc {
        self.nodes.iter_mut().find(|n| n.id == id).expect("node id")
    }

    pub fn spawn(&mut self, id: u64) {
        let mut command = match &self.netns {
            Some(lab) => lab.command(id, &meridian_bin()),
            None => Command::new(meridian_bin()),
        };
        let n = self.node(id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(n.log_path())
            .unwrap();
        // `ip netns exec` execs the node, so the child's pid is the node's.
        let child = command
            .arg("node")
            .arg("--config")
            .arg(&n.config_path)
            .env("MERIDIAN_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn meridian node");
        n.child = Some(child);
    }

    pub fn signal(&mut self, id: u64, sig: i32) {
        if let Some(c) = &self.node(id).child {
            // SAFETY: kill(2) on a child we spawned.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// SIGTERM and a wait (bounded by `within`) for a clean exit; panics with the end of the
    /// node's log if it does not stop in time or exits with an error.
    pub fn stop(&mut self, id: u64, within: Duration) {
        self.signal(id, libc::SIGTERM);
        let deadline = std::time::Instant::now() + within;
        let n = self.node(id);
        let log = n.log_path();
        let mut child = n.child.take().expect("node is running");
        loop {
            match child.try_wait().expect("wait for node") {
                Some(status) => {
                    assert!(
                        status.success(),
                        "node {id} stopped with {status}; its log ends:\n{}",
                        tail(&log, 20)
                    );
                    return;
                }
                None if std::time::Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "node {id} did not stop within {within:?} of SIGTERM; its log ends:\n{}",
                        tail(&log, 20)
                    );
                }
                None => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// SIGKILL: no shutdown path runs, like a power cut for the process.
    pub fn kill(&mut self, id: u64) {
        self.signal(id, libc::SIGKILL);
        if let Some(mut c) = self.node(id).child.take() {
            let _ = c.wait();
        }
    }

    pub fn endpoint(&self, id: u64) -> String {
        let n = self.nodes.iter().find(|n| n.id == id).expect("node id");
        format!("http://{}", n.addr)
    }

    /// `host:port` of node `id`'s CMQ HTTP API.
    pub fn http_addr(&self, id: u64) -> String {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .expect("node id")
            .http_addr
            .clone()
    }

    pub fn live_ids(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.id)
            .collect()
    }

    pub async fn channel(&self, id: u64) -> Option<Channel> {
        tonic::transport::Endpoint::from_shared(self.endpoint(id))
            .unwrap()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(60))
            .connect()
            .await
            .ok()
    }

    pub async fn client(&self, id: u64) -> QueueServiceClient<Channel> {
        QueueServiceClient::new(self.channel(id).await.expect("connect to node"))
            .max_decoding_message_size(64 << 20)
    }

    pub async fn status(&self, id: u64) -> Option<ClusterStatusReply> {
        let ch = self.channel(id).await?;
        ClusterServiceClient::new(ch)
            .cluster_status(Empty {})
            .await
            .ok()
            .map(|r| r.into_inner())
    }

    /// The leader of `group` as seen by a live node, waiting (bounded) for one to exist.
    pub async fn leader_of(&self, group: u32) -> u64 {
        for _ in 0..300 {
            for id in self.live_ids() {
                if let Some(s) = self.status(id).await {
                    if let Some(g) = s.groups.iter().find(|g| g.group == group) {
                        if g.leader != 0 && self.live_ids().contains(&g.leader) {
                            return g.leader;
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("group {group} has no live leader");
    }

    /// One lazily connected channel per node (reconnecting after restarts), every call bounded
    /// by `timeout`, in node id order.
    pub fn lazy_channels(&self, timeout: Duration) -> Vec<Channel> {
        self.nodes
            .iter()
            .map(|n| {
                tonic::transport::Endpoint::from_shared(format!("http://{}", n.addr))
                    .unwrap()
                    .connect_timeout(Duration::from_secs(1))
                    .timeout(timeout)
                    .connect_lazy()
            })
            .collect()
    }

    pub fn lazy_clients(&self) -> Vec<QueueServiceClient<Channel>> {
        self.lazy_channels(Duration::from_secs(20))
            .into_iter()
            .map(QueueServiceClient::new)
            .collect()
    }

    /// Receives and deletes (through every live node in turn) until the queue stays empty and at
    /// least `expect_at_least` messages came; returns deliveries per message id with
    /// bodies, and the ids whose delete succeeded.
    pub async fn drain(
        &self,
        queue: &str,
        expect_at_least: usize,
    ) -> (BTreeMap<String, (usize, String)>, BTreeMap<String, usize>) {
        let clients = self.lazy_clients();
        let live = self.live_ids();
        let mut delivered: BTreeMap<String, (usize, String)> = BTreeMap::new();
        let mut deleted: BTreeMap<String, usize> = BTreeMap::new();
        let mut empty_in_a_row = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
        let mut turn = 0usize;
        while empty_in_a_row < 3 || delivered.len() < expect_at_least {
            assert!(
                tokio::time::Instant::now() < deadline,
                "drain did not finish: {} delivered",
                delivered.len()
            );
            let mut c = clients[(live[turn % live.len()] - 1) as usize].clone();
            turn += 1;
            let r = c
                .batch_receive_message(BatchReceiveMessageRequest {
                    queue_name: queue.into(),
                    num_of_msg: 16,
                    polling_wait_seconds: Some(1),
                })
                .await;
            let msgs = match r {
                Ok(r) => r.into_inner().messages,
                Err(s) if cmq_code(&s) == 7000 => {
                    empty_in_a_row += 1;
                    continue;
                }
                Err(s) => {
                    eprintln!("receive error (retrying): {s}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            empty_in_a_row = 0;
            let mut handles = Vec::new();
            let mut ids = Vec::new();
            for m in msgs {
                let e = delivered
                    .entry(m.msg_id.clone())
                    .or_insert((0, String::from_utf8(m.msg_body.clone()).unwrap()));
                e.0 += 1;
                handles.push(m.receipt_handle);
                ids.push(m.msg_id);
            }
            let r = c
                .batch_delete_message(BatchDeleteMessageRequest {
                    queue_name: queue.into(),
                    receipt_handle: handles.clone(),
                })
                .await;
            match r {
                Ok(r) => {
                    let r = r.into_inner();
                    let failed: BTreeSet<String> =
                        r.errors.into_iter().map(|e| e.receipt_handle).collect();
                    for (id, h) in ids.into_iter().zip(handles) {
                        if !failed.contains(&h) {
                            *deleted.entry(id).or_default() += 1;
                        }
                    }
                }
                Err(s) => eprintln!("delete error (messages will come back): {s}"),
            }
        }
        (delivered, deleted)
    }

    /// Waits until every live node answers a linearizable ListQueue (every group has a leader);
    /// panics with the end of a node's log if one exits meanwhile or time runs out.
    pub async fn wait_ready(&self, timeout: Duration) {
        if let Err(e) = self.try_wait_ready(timeout).await {
            self.not_ready(e)
        }
    }

    fn not_ready(&self, e: NotReady) -> ! {
        match e {
            NotReady::Exited { id, log } => panic!(
                "region not ready: node {id} exited; see {:?}; its log ends:\n{log}",
                self.dir.path()
            ),
            NotReady::TimedOut => panic!("region not ready: see {:?}", self.dir.path()),
        }
    }

    async fn try_wait_ready(&self, timeout: Duration) -> Result<(), NotReady> {
        let deadline = tokio::time::Instant::now() + timeout;
        for id in self.live_ids() {
            loop {
                for n in &self.nodes {
                    if n.child.as_ref().is_some_and(|c| exited(c.id())) {
                        return Err(NotReady::Exited {
                            id: n.id,
                            log: n.log_tail(20),
                        });
                    }
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(NotReady::TimedOut);
                }
                if let Some(ch) = self.channel(id).await {
                    let r = QueueServiceClient::new(ch)
                        .list_queue(ListQueueRequest {
                            search_word: String::new(),
                            offset: 0,
                            limit: None,
                        })
                        .await;
                    if r.is_ok() {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(())
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        self.stop_all();
        if std::thread::panicking() {
            self.keep_logs();
        }
    }
}

impl Region {
    /// Keeps the region's data and logs on disk after it is dropped, for inspection.
    pub fn keep_logs(&mut self) {
        let path = self.dir.path().to_path_buf();
        // CI keeps only the output, so the end of every node's log goes there too.
        for n in &self.nodes {
            eprintln!("--- end of node {} log ---\n{}", n.id, n.log_tail(40));
        }
        eprintln!("region data and logs kept at {}", path.display());
        std::mem::forget(std::mem::replace(
            &mut self.dir,
            tempfile::tempdir().unwrap(),
        ));
    }
}

/// Sets the injected faults of node `id` (started with faults enabled), retrying while it starts.
pub async fn set_faults(region: &Region, id: u64, spec: meridian_api::pb::FaultSpec) {
    // A restarted node on a busy 2-core machine can take several seconds to serve again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
        if let Some(ch) = region.channel(id).await {
            let mut client = meridian_api::pb::fault_service_client::FaultServiceClient::new(ch);
            let call = client.set_faults(spec.clone());
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(3), call).await {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("could not set faults on node {id}");
}

/// FNV-1a over `bytes`: a cheap, stable digest for test bodies and traces (not cryptographic).
pub fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The CMQ code of a gRPC error status.
pub fn cmq_code(s: &tonic::Status) -> u32 {
    meridian_api::CmqError::from_status(s).code.as_u32()
}

/// A minimal HTTP/1.1 client on one keep-alive connection, for sending exactly the bytes a test
/// wants (malformed forms, odd methods) and checking the connection survives.
pub struct RawHttp {
    stream: std::io::BufReader<std::net::TcpStream>,
    pub host: String,
}

impl RawHttp {
    pub fn connect(addr: &str) -> RawHttp {
        Self::connect_as(addr, addr)
    }

    /// Connects to `addr` but sends `host` as the Host header (to replay another node's request).
    pub fn connect_as(addr: &str, host: &str) -> RawHttp {
        let s = std::net::TcpStream::connect(addr).expect("connect HTTP");
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        RawHttp {
            stream: std::io::BufReader::new(s),
            host: host.to_string(),
        }
    }

    /// Sends one request and returns (status, body). Panics if the connection was dropped.
    pub fn request(&mut self, method: &str, target: &str, body: &[u8]) -> (u16, String) {
        use std::io::{BufRead, Read, Write};
        let head = format!(
            "{method} {target} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\nConnection: keep-alive\r\n\r\n",
            self.host,
            body.len()
        );
        let s = self.stream.get_mut();
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        let mut status_line = String::new();
        self.stream
            .read_line(&mut status_line)
            .expect("read status line");
        assert!(!status_line.is_empty(), "connection closed by the server");
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            self.stream.read_line(&mut line).unwrap();
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap();
                }
            }
        }
        let mut buf = vec![0; len];
        self.stream.read_exact(&mut buf).unwrap();
        (status, String::from_utf8(buf).unwrap())
    }
}

/// A signed CMQ form for `params` (Timestamp, Nonce, SecretId and Signature added).
pub fn signed_form(
    params: &[(&str, &str)],
    secret_id: &str,
    secret_key: &str,
    method: &str,
    host: &str,
    path: &str,
) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    meridian_api::cmq_http::sign_form(
        params,
        secret_id,
        secret_key,
        method,
        host,
        path,
        now,
        rand::random::<u32>().into(),
    )
}
