//! The node's TOML configuration: one file per node, unknown keys rejected.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::NodeError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's id; must appear in `members`.
    pub node_id: u64,
    /// Directory for this node's RocksDB instance (created if missing).
    pub data_dir: PathBuf,
    /// Address the gRPC server (client API and node-to-node transport) listens on.
    pub grpc_listen: SocketAddr,
    /// Number of data groups. Fixed for the life of the region: queues are placed by a hash
    /// of their name over this count. The metadata group (0) comes in addition.
    #[serde(default = "default_data_groups")]
    pub data_groups: u32,
    /// Hex-encoded secret (≥ 16 bytes) shared by every node of the region; it keys the MAC
    /// that makes receipt handles unforgeable. Changing it invalidates outstanding handles.
    pub cluster_secret: String,
    /// When true and this node's data is empty, it initialises every group with `members`
    /// as voters. Set it on exactly one node of a new region.
    #[serde(default)]
    pub bootstrap: bool,
    /// Threads that run the node's async work (client APIs, Raft, replication); 0 (the
    /// default): one per CPU core. Where several nodes share a machine, give each its share of
    /// the cores: every thread more than the cores it can run on adds hand-offs and wake-ups
    /// between threads to each message. Three nodes on two cores with one thread each, in
    /// alternated runs, took the region's CPU per message from 71-76 to 67-70 µs in W1 and
    /// from 146-154 to 127-132 µs in W2 (`meridian dev` and bench's local region do this).
    /// The log writer and RocksDB's flushes have threads of their own besides.
    #[serde(default)]
    pub worker_threads: usize,
    /// Every voting member of the region, this node included.
    pub members: Vec<MemberConfig>,
    /// Raft timing and log compaction.
    #[serde(default)]
    pub raft: RaftConfig,
    /// The CMQ-compatible HTTP(S) API.
    #[serde(default)]
    pub http: HttpConfig,
    /// Topic publishing and HTTP push delivery.
    #[serde(default)]
    pub topics: TopicsConfig,
    /// The node's disk.
    #[serde(default)]
    pub storage: StorageConfig,
    /// Fault injection, for the fault tests only.
    #[serde(default)]
    pub faults: FaultsConfig,
}

/// Upper bound of `[storage] cached_bodies_mib` (1 TiB): beyond any machine's memory, so a
/// typo in units is refused instead of disabling the bound.
pub const MAX_CACHED_BODIES_MIB: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Free space (MiB) the data directory's file system must keep. Below it the node stops
    /// writing its log (nothing more is acknowledged through it) and, as a leader, refuses
    /// writes with a clear error, instead of letting RocksDB hit a full disk, which would stop
    /// the node's groups until a restart. Writing resumes by itself once space returns.
    pub min_free_mib: u64,
    /// Memtable size (MiB) of each RocksDB column family. Larger memtables flush less often,
    /// and more of the rows a short-lived message leaves (received, then deleted) die in
    /// memory instead of being written to table files: W2 (send, receive, delete) ran at
    /// 4.9-5.7k msgs/s with 128 against 2.3-2.7k with RocksDB's 64 on one machine. Costs up
    /// to about twice this per column family in memory while a flush runs.
    pub write_buffer_mib: u64,
    /// Most MiB per second that RocksDB's flushes and compactions may write (0: no limit).
    /// A flush written at full speed queues ahead of the log's next fsync on the same disk,
    /// which delays every acknowledgement waiting for it: with 48, W1 p99 fell from 55-97 ms
    /// to 22-50 ms here, but W2 right after W1 was slower (3.7k against 5.0k msgs/s), so it
    /// is off by default. It must stay well above what the node ingests (about 2 MiB/s per
    /// thousand 1 KiB messages per second, log and state together), or writes stall behind
    /// flushes.
    pub flush_rate_mib_per_s: u64,
    /// Message bodies (MiB, the node's groups together) kept in memory after their state rows
    /// are written, the most recently written first. A receive of a message whose body is no
    /// longer in memory reads its row, so this bounds what a backlog (consumers down, producers
    /// not) costs in memory, at the price of a read per message consumed from beyond it. Bodies
    /// not yet in the rows (at most about 1 MiB per group) always stay.
    pub cached_bodies_mib: u64,
    /// Size (MiB) of each Raft log segment file. Segments whose entries are all purged are
    /// reused, so a sync overwrites blocks already allocated instead of growing a file (which
    /// costs the file system metadata writes on every sync). Larger segments are reused later.
    pub log_segment_mib: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            min_free_mib: 256,
            write_buffer_mib: 128,
            flush_rate_mib_per_s: 0,
            cached_bodies_mib: 64,
            log_segment_mib: 64,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaultsConfig {
    /// Wrap storage, transport and clock in fault injectors and serve the FaultService gRPC
    /// API that sets partitions, delays, message loss, clock offsets and a full disk. For tests
    /// only: never enable it in production.
    pub enabled: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicsConfig {
    /// Answer a publish that matches no subscription with error 6030 instead of accepting it
    /// (CMQ documents the code, but whether its service used it is unknown; accepting is the
    /// default).
    pub reject_unmatched_publish: bool,
    /// BACKOFF_RETRY: how many retries after the first failed delivery.
    pub backoff_retry_attempts: u32,
    /// BACKOFF_RETRY: each retry waits a random time in [min, max] seconds.
    pub backoff_retry_min_seconds: u64,
    /// Upper end of the BACKOFF_RETRY interval, seconds.
    pub backoff_retry_max_seconds: u64,
    /// EXPONENTIAL_DECAY_RETRY: retries wait 1, 2, 4 … seconds, capped at this.
    pub exponential_retry_cap_seconds: u64,
    /// A push that has not answered within this many seconds has failed.
    pub push_timeout_seconds: u64,
    /// Most deliveries in flight to one subscription at once.
    pub push_max_in_flight_per_subscription: usize,
    /// PEM file of CA certificates trusted for `https://` push endpoints, in addition to the
    /// public web PKI roots (for endpoints behind a private CA).
    pub push_ca_file: Option<PathBuf>,
}

impl Default for TopicsConfig {
    fn default() -> Self {
        Self {
            reject_unmatched_publish: false,
            backoff_retry_attempts: 3,
            backoff_retry_min_seconds: 10,
            backoff_retry_max_seconds: 20,
            exponential_retry_cap_seconds: 512,
            push_timeout_seconds: 15,
            push_max_in_flight_per_subscription: 16,
            push_ca_file: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of the CMQ HTTP API listener; absent disables the HTTP API.
    pub listen: Option<SocketAddr>,
    /// Accepted difference between a request's Timestamp and this node's clock, seconds.
    /// Nonces are remembered for this long to reject replays.
    pub timestamp_skew_seconds: u64,
    /// PEM certificate chain; with `tls_key`, the listener serves HTTPS only.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key matching `tls_cert`.
    pub tls_key: Option<PathBuf>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: None,
            timestamp_skew_seconds: 300,
            tls_cert: None,
            tls_key: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberConfig {
    /// The member's node id.
    pub id: u64,
    /// The member's gRPC address (`host:port`), reachable from every other member.
    pub addr: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    /// Leader heartbeat interval, milliseconds.
    pub heartbeat_ms: u64,
    /// A follower starts an election after a random timeout in [min, max] ms without a leader.
    pub election_timeout_min_ms: u64,
    /// Upper end of the election timeout range, milliseconds.
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many log entries since the last one; older logs are purged.
    pub snapshot_after_entries: u64,
    /// Also snapshot by size: once the node's groups together appended this many MiB of log
    /// since their last such snapshots, the group that appended the most builds one (0: by
    /// entries only). The groups share one log memtable, and under load an entry carries many
    /// messages, so counting entries alone let the logs grow far past it before their purges;
    /// purged while still in memory, entries are never written to a table file. Keep it under
    /// `[storage] write_buffer_mib`. Each snapshot flushes the state memtable and costs the
    /// writes waiting behind it: on one machine 96 wrote 15 % fewer bytes per message than
    /// entries alone, with W2 p99 halved but W1 p99 up 3-4 ms; 32 cost W1 a seventh of its
    /// rate.
    pub snapshot_after_log_mib: u64,
    /// Most entries in one AppendEntries message.
    pub max_payload_entries: u64,
    /// Log entries kept after a snapshot, so briefly lagging followers catch up from the log
    /// instead of a full snapshot transfer.
    pub logs_kept_after_snapshot: u64,
    /// Most client operations combined into one Raft entry.
    pub max_batch_commands: usize,
    /// Raft entries of a group proposed but not yet applied; while they are in flight, new
    /// operations accumulate into the next batch. More entries in flight keep replicas'
    /// fsyncs overlapping instead of a new operation waiting for a whole round: on 3 nodes on
    /// loopback, 8 against 2 gave W2 (send, receive, delete) about 29 % more msgs/s and W1
    /// about 8 %; 16 and 32 gave no more.
    pub max_inflight_batches: usize,
}

impl Default for RaftConfig {
    fn default() -> Self {
        Self {
            heartbeat_ms: 150,
            election_timeout_min_ms: 800,
            election_timeout_max_ms: 1600,
            snapshot_after_entries: 20_000,
            snapshot_after_log_mib: 96,
            max_payload_entries: 512,
            logs_kept_after_snapshot: 1000,
            max_batch_commands: 256,
            max_inflight_batches: 8,
        }
    }
}

/// Most `worker_threads` a node accepts (a typo such as 10000 would only cost memory).
pub const MAX_WORKER_THREADS: usize = 1024;

fn default_data_groups() -> u32 {
    3
}

impl NodeConfig {
    pub fn load(path: &Path) -> Result<Self, NodeError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| NodeError::Config(format!("read {}: {e}", path.display())))?;
        let cfg: Self = toml::from_str(&text)
            .map_err(|e| NodeError::Config(format!("{}: {e}", path.display())))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), NodeError> {
        let bad = |m: String| Err(NodeError::Config(m));
        if !self.members.iter().any(|m| m.id == self.node_id) {
            return bad(format!("node_id {} is not among members", self.node_id));
        }
        let mut ids: Vec<u64> = self.members.iter().map(|m| m.id).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != self.members.len() {
            return bad("member ids must be unique".into());
        }
        if ids.contains(&0) {
            return bad("member id 0 is reserved".into());
        }
        let t = &self.topics;
        if t.backoff_retry_min_seconds > t.backoff_retry_max_seconds
            || t.exponential_retry_cap_seconds == 0
            || t.push_timeout_seconds == 0
            || t.push_max_in_flight_per_subscription == 0
        {
            return bad(
                "[topics]: backoff_retry_min_seconds must not exceed backoff_retry_max_seconds, \
                 and the cap, timeout and in-flight bound must be positive"
                    .into(),
            );
        }
        if self.data_groups == 0 || self.data_groups > 256 {
            return bad(format!("data_groups = {} must be 1-256", self.data_groups));
        }
        match hex::decode(&self.cluster_secret) {
            Ok(k) if k.len() >= 16 => {}
            _ => return bad("cluster_secret must be at least 16 bytes, hex-encoded".into()),
        }
        let r = &self.raft;
        if r.heartbeat_ms == 0 || r.election_timeout_min_ms <= r.heartbeat_ms * 2 {
            return bad("raft.election_timeout_min_ms must exceed twice heartbeat_ms".into());
        }
        if self.http.tls_cert.is_some() != self.http.tls_key.is_some() {
            return bad("http.tls_cert and http.tls_key must be given together".into());
        }
        let st = &self.storage;
        if !(1..=4096).contains(&st.write_buffer_mib) {
            return bad(format!(
                "storage.write_buffer_mib = {} must be 1-4096",
                st.write_buffer_mib
            ));
        }
        if !(1..=1024).contains(&st.log_segment_mib) {
            return bad(format!(
                "storage.log_segment_mib = {} must be 1-1024",
                st.log_segment_mib
            ));
        }
        if st.min_free_mib != 0 && st.min_free_mib < st.log_segment_mib {
            return bad(format!(
                "storage.min_free_mib = {} must be at least storage.log_segment_mib = {} (or 0), \
                 so a new log segment always finds its space",
                st.min_free_mib, st.log_segment_mib
            ));
        }
        if st.cached_bodies_mib > MAX_CACHED_BODIES_MIB {
            return bad(format!(
                "storage.cached_bodies_mib = {} must be at most {MAX_CACHED_BODIES_MIB}",
                st.cached_bodies_mib
            ));
        }
        if st.flush_rate_mib_per_s != 0 && st.flush_rate_mib_per_s < 8 {
            return bad(format!(
                "storage.flush_rate_mib_per_s = {} would stall writes behind flushes: use 0 \
                 (no limit) or at least 8",
                st.flush_rate_mib_per_s
            ));
        }
        if r.snapshot_after_log_mib > 4096 {
            return bad(format!(
                "raft.snapshot_after_log_mib = {} must be 0 (by entries only) to 4096",
                r.snapshot_after_log_mib
            ));
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms {
            return bad("raft.election_timeout_max_ms must exceed election_timeout_min_ms".into());
        }
        if self.worker_threads > MAX_WORKER_THREADS {
            return bad(format!(
                "worker_threads = {} must be 0 (one per CPU core) to {MAX_WORKER_THREADS}",
                self.worker_threads
            ));
        }
        Ok(())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> NodeConfig {
        NodeConfig {
            node_id: 1,
            data_dir: "/tmp/x".into(),
            grpc_listen: "127.0.0.1:7000".parse().unwrap(),
            data_groups: 3,
            cluster_secret: "00".repeat(16),
            bootstrap: true,
            worker_threads: 0,
            members: vec![MemberConfig {
                id: 1,
                addr: "127.0.0.1:7000".into(),
            }],
            raft: RaftConfig::default(),
            http: HttpConfig::default(),
            topics: Default::default(),
            storage: Default::default(),
            faults: Default::default(),
        }
    }

    #[test]
    fn round_trips_and_rejects_unknown_keys() {
        let c = sample();
        let text = c.to_toml();
        assert_eq!(toml::from_str::<NodeConfig>(&text).unwrap(), c);
        assert!(toml::from_str::<NodeConfig>(&format!("{text}\nbogus = 1\n")).is_err());
    }

    #[test]
    fn validation() {
        assert!(sample().validate().is_ok());
        let mut c = sample();
        c.node_id = 9;
        assert!(c.validate().is_err());
        let mut c = sample();
        c.cluster_secret = "abc".into();
        assert!(c.validate().is_err());
        let mut c = sample();
        c.storage.write_buffer_mib = 0;
        assert!(c.validate().is_err());
        let mut c = sample();
        c.storage.flush_rate_mib_per_s = 4;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("flush_rate_mib_per_s"), "{e}");
        c.storage.flush_rate_mib_per_s = 48;
        assert!(c.validate().is_ok());
        let mut c = sample();
        c.raft.snapshot_after_log_mib = 5000;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("snapshot_after_log_mib"), "{e}");
        c.raft.snapshot_after_log_mib = 0;
        assert!(c.validate().is_ok());
        let mut c = sample();
        c.worker_threads = MAX_WORKER_THREADS + 1;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("worker_threads"), "{e}");
        c.worker_threads = 1;
        assert!(c.validate().is_ok());
        let mut c = sample();
        c.storage.cached_bodies_mib = MAX_CACHED_BODIES_MIB + 1;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("cached_bodies_mib"), "{e}");
        c.storage.cached_bodies_mib = 0;
        assert!(c.validate().is_ok());
        c.storage.log_segment_mib = 0;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("log_segment_mib"), "{e}");
        c.storage.log_segment_mib = 512;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("min_free_mib"), "{e}");
        c.storage.min_free_mib = 0;
        assert!(c.validate().is_ok());
    }
}

#[cfg(test)]
mod example_tests {
    #[test]
    fn deploy_example_parses_and_validates() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/node.example.toml");
        super::NodeConfig::load(&path).unwrap();
    }
}
