//! The node's Raft log segments, its two RocksDB instances, and their group-commit writer.
//!
//! The Raft logs of all groups, their votes, commit hints and purge points are in the
//! segments (`segments`): files of our own, reused once their entries are purged, so that a
//! sync overwrites allocated blocks. The log database holds the snapshot records; the state
//! database holds the state machines' rows, and is what a snapshot checkpoints.
//!
//! Every Raft log mutation (append, truncate, purge) of every group is a job queued to one
//! writer thread. The writer takes all queued jobs, writes their log records as one frame of
//! the segment being written and syncs it once, then writes the rest (the state rows) as one
//! `WriteBatch` per database, and only then runs each job's completion: many entries from all
//! groups, one write, one sync, then every callback. Nothing is reported durable to openraft
//! (and so nothing is committed or answered) before that sync returns. The Raft task never
//! blocks on disk: until the writer has run, a group's `LogStore` serves new entries from
//! memory.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use bytes::Bytes;
use rocksdb::{
    ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB,
};

use super::segments::{self, Segments};
use crate::config::StorageConfig;
use crate::error::NodeError;

pub const CF_LOG: &str = "log";
pub const CF_META: &str = "meta";
pub const CF_SNAPSHOT: &str = "snapshot";
/// The groups' state machines as rows (`queue::rows`), written after every apply: the small
/// rows of each group (applied position, queues, topics, counters).
pub const CF_STATE_GROUPS: &str = "groups";
/// The state rows of messages (headers and bodies).
pub const CF_STATE_MESSAGES: &str = "messages";
/// Column families of the log database, every write of which goes through its WAL.
const LOG_DB_CFS: [&str; 3] = [CF_LOG, CF_META, CF_SNAPSHOT];
/// Column families of the state database (inside the log database's directory, as `state/`).
pub const STATE_DB_CFS: [&str; 2] = [CF_STATE_GROUPS, CF_STATE_MESSAGES];
/// The one column family of the state database before messages had rows of their own, keyed
/// differently.
const CF_STATE_BEFORE_SPLIT: &str = "state";

/// Whether `cf` is one of the state database's (mostly unlogged) column families.
pub fn is_state_cf(cf: &str) -> bool {
    STATE_DB_CFS.contains(&cf)
}
const STATE_DB_DIR: &str = "state";
/// The Raft log segments, inside the log database's directory.
const SEGMENTS_DIR: &str = "raftlog";
/// Table files in level 0 of the state rows before they are compacted (RocksDB's default: 4).
const STATE_L0_COMPACTION_TRIGGER: i32 = 16;

/// One change to a column family.
pub enum LogOp {
    Put {
        cf: &'static str,
        key: Vec<u8>,
        /// Shared with the caller's copy (a state row's message body, say) until written.
        value: Bytes,
    },
    Delete {
        cf: &'static str,
        key: Vec<u8>,
    },
    DeleteRange {
        cf: &'static str,
        from: Vec<u8>,
        to: Vec<u8>,
    },
}

impl LogOp {
    /// A put of copies of `key` and `value` (tests).
    #[cfg(test)]
    pub fn put(cf: &'static str, key: &[u8], value: &[u8]) -> Self {
        LogOp::Put {
            cf,
            key: key.to_vec(),
            value: Bytes::copy_from_slice(value),
        }
    }

    pub fn cf(&self) -> &'static str {
        match self {
            LogOp::Put { cf, .. } | LogOp::Delete { cf, .. } | LogOp::DeleteRange { cf, .. } => cf,
        }
    }
}

/// How durable a job is when its `done` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// In the WAL, fsynced (log appends, ordered state writes).
    Synced,
    /// In the WAL, riding the next fsync (truncations and purges: the next append's sync
    /// makes them durable in order).
    Logged,
    /// Only in the memtable until RocksDB flushes it; a crash loses it. For the state
    /// machine's rows after each apply: the log is what is durable, a restart re-applies it
    /// after the index the flushed rows name, and logs are purged only behind a snapshot,
    /// whose checkpoint flushes the rows first. Kept out of the WAL, each message body is
    /// written to it once (in its log entry) instead of twice. Only state rows are left
    /// unlogged: the log database logs every write.
    Unlogged,
}

/// Changes written together, then `done` with the outcome.
pub struct LogJob {
    pub ops: Vec<LogOp>,
    pub durability: Durability,
    pub done: Box<dyn FnOnce(io::Result<()>) + Send>,
}

/// Durability watermarks of the log writer, exported as metrics.
#[derive(Debug, Default)]
pub struct StorageMetrics {
    /// Syncs of the Raft log segment (and of the state database's WAL, for installs).
    pub wal_syncs: AtomicU64,
    /// Jobs (appends, truncations, purges) completed by those batches.
    pub synced_appends: AtomicU64,
    /// Total time spent inside fsync, microseconds.
    pub sync_micros: AtomicU64,
    pub sync_errors: AtomicU64,
    /// 1 while the data directory's free space is below the configured reserve (log writes
    /// are held back, leaders refuse writes).
    pub disk_low: AtomicU64,
    /// Times log writing was held back for lack of free space.
    pub disk_low_episodes: AtomicU64,
}

/// The storage seam (TiKV style): what the Raft log store and the state machine store need from
/// the node's key-value engine. [`Engine`] (RocksDB) is the product; fault tests wrap it (see
/// `storage::faults`) to fail or stall writes without patching the code paths above.
pub trait StorageEngine: Send + Sync + 'static {
    fn get(&self, cf: &'static str, key: &[u8]) -> io::Result<Option<Vec<u8>>>;
    /// Entries with keys in `[from, to)`, ascending.
    fn scan(&self, cf: &'static str, from: &[u8], to: &[u8])
        -> io::Result<Vec<(Vec<u8>, Vec<u8>)>>;
    /// Like [`scan`](Self::scan), with the value of every entry whose key `skip_value` picks
    /// left empty: a start reads every key of the messages but not their bodies. [`Engine`]
    /// never copies those values; this default (for test engines) copies and drops them.
    fn scan_skipping(
        &self,
        cf: &'static str,
        from: &[u8],
        to: &[u8],
        skip_value: &dyn Fn(&[u8]) -> bool,
    ) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut rows = self.scan(cf, from, to)?;
        for (k, v) in &mut rows {
            if skip_value(k) {
                *v = Vec::new();
            }
        }
        Ok(rows)
    }
    /// The entry with the greatest key in `[from, to)`.
    fn last_in(
        &self,
        cf: &'static str,
        from: &[u8],
        to: &[u8],
    ) -> io::Result<Option<(Vec<u8>, Vec<u8>)>>;
    /// Writes `ops`; with `sync`, durable (WAL fsynced) on return. Atomic within each of the
    /// two databases (the [`STATE_DB_CFS`], and the rest), not across them.
    fn write(&self, ops: Vec<LogOp>, sync: bool) -> io::Result<()>;
    /// Queues a job for the group-commit writer; `done` runs after its batch is written.
    fn submit(&self, job: LogJob);
    fn metrics(&self) -> &StorageMetrics;
    /// Writes what is only in memory (and the WAL) into table files, so a restart after a
    /// clean shutdown need not replay the WAL.
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    /// Whether free space is below the reserve: log writes wait and writes should be refused.
    fn disk_low(&self) -> bool {
        false
    }
    /// Makes checkpoint `name`: a durable copy of the state rows ([`STATE_DB_CFS`]) as they are
    /// now, which later writes do not change. Everything written before it (synced or not) is
    /// durable once it returns. RocksDB: the state memtable flushed, table files hard-linked.
    fn checkpoint(&self, name: &str) -> io::Result<()>;
    /// Entries of `cf` (only the [`STATE_DB_CFS`] are sure to be there) with keys in `[from, to)` of
    /// checkpoint `name`, ascending.
    fn scan_checkpoint(
        &self,
        name: &str,
        cf: &'static str,
        from: &[u8],
        to: &[u8],
    ) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>>;
    /// Deletes checkpoint `name`; no error if there is none.
    fn remove_checkpoint(&self, name: &str) -> io::Result<()>;
    /// The names of the checkpoints there are.
    fn checkpoints(&self) -> io::Result<Vec<String>>;
}

fn io_err(e: rocksdb::Error) -> io::Error {
    io::Error::other(e.to_string())
}

pub struct Engine {
    dbs: Dbs,
    /// Where checkpoints live: `checkpoints/` inside the log database's directory.
    checkpoint_root: std::path::PathBuf,
    /// `None` only while dropping.
    writer: Option<mpsc::Sender<LogJob>>,
    writer_thread: Option<std::thread::JoinHandle<()>>,
    pub metrics: Arc<StorageMetrics>,
}

/// The node's two databases and its Raft log segments.
#[derive(Clone)]
struct Dbs {
    /// The Raft logs and their records (`CF_LOG`, `CF_META`).
    segments: Arc<Segments>,
    /// Snapshot records: every write goes through its WAL. (`CF_LOG` and `CF_META` are there
    /// too, empty: the log moved to the segments, and an earlier node's is imported at start.)
    log: Arc<DB>,
    /// The state rows, mostly unlogged; the database that checkpoints copy.
    state: Arc<DB>,
}

impl Dbs {
    /// The database holding column family `cf`.
    fn of(&self, cf: &str) -> &DB {
        if is_state_cf(cf) {
            &self.state
        } else {
            &self.log
        }
    }

    fn all(&self) -> [(&DB, &'static [&'static str]); 2] {
        [(&self.log, &LOG_DB_CFS), (&self.state, &STATE_DB_CFS)]
    }
}

/// `ops` as the log database's and the state database's, each in order.
fn split_by_db(ops: impl IntoIterator<Item = LogOp>) -> (Vec<LogOp>, Vec<LogOp>) {
    ops.into_iter().partition(|op| !is_state_cf(op.cf()))
}

/// Writes `ops` (not empty) to `db` as one batch: through its WAL if `logged`, fsynced if
/// `sync`.
fn write_batch(db: &DB, ops: Vec<LogOp>, logged: bool, sync: bool) -> Result<(), rocksdb::Error> {
    let mut wo = WriteOptions::default();
    wo.disable_wal(!logged);
    wo.set_sync(sync);
    db.write_opt(batch_of(db, ops), &wo)
}

/// Flushes the memtables of `cfs` in `db` into table files, waiting for them.
fn flush_cfs(db: &DB, cfs: &[&str]) -> Result<(), rocksdb::Error> {
    let mut fo = rocksdb::FlushOptions::default();
    fo.set_wait(true);
    let handles: Vec<_> = cfs
        .iter()
        .map(|&name| {
            db.cf_handle(name)
                .expect("column families are created at open")
        })
        .collect();
    // One call, so the state database's atomic flush writes its column families as of one
    // point.
    db.flush_cfs_opt(&handles, &fo)
}

/// Options both databases share.
fn base_options(storage: &StorageConfig, direct_io: bool) -> Options {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    // Checksums on every block read catch on-disk corruption instead of serving it.
    opts.set_paranoid_checks(true);
    // A damaged WAL record must stop the node, not be skipped: RocksDB's default recovery
    // silently drops everything after it, which would make this node forget fsynced (and
    // acknowledged) log entries and its vote, and so let it vote twice in a term or count
    // toward a majority for entries it no longer has. An operator then wipes the node's
    // data and it resyncs from its peers.
    opts.set_wal_recovery_mode(rocksdb::DBRecoveryMode::AbsoluteConsistency);
    // The state rows are written in every apply and read only at start and from
    // checkpoints, so their memtable is a plain vector, sorted once when flushed: a skip
    // list spent a fifth of a node's CPU finding insert positions (W3 profile). Vector
    // memtables need single-writer memtable inserts, which the log writer thread is.
    opts.set_allow_concurrent_memtable_write(false);
    // Table files that flushes and compactions write are synced a MiB at a time as they
    // grow instead of all at their end, so their writeback does not arrive in one burst
    // ahead of the WAL's next fsync (an acknowledgement-latency spike).
    opts.set_bytes_per_sync(1 << 20);
    // Flushes and compactions write their tables past the page cache. Buffered, a flush
    // left tens of MiB dirty, and ext4's ordered journal made the WAL's next fsync wait
    // for all of it: 20-110 ms acknowledgement stalls every few seconds under load (W1
    // p99 28 ms, p99.9 71 ms; with direct writes 17 and 27).
    opts.set_use_direct_io_for_flush_and_compaction(direct_io);
    if storage.flush_rate_mib_per_s > 0 {
        // Refilled every 10 ms, so a flush writes in small steps between the WAL's fsyncs.
        let rate = i64::try_from(storage.flush_rate_mib_per_s << 20).unwrap_or(i64::MAX);
        opts.set_ratelimiter(rate, 10_000, 10);
    }
    opts
}

fn open_db(
    path: &Path,
    opts: &Options,
    cfs: &[&'static str],
    storage: &StorageConfig,
) -> Result<DB, NodeError> {
    let write_buffer = usize::try_from(storage.write_buffer_mib << 20).unwrap_or(usize::MAX);
    let descriptors = cfs.iter().map(|&n| {
        let mut cf_opts = Options::default();
        cf_opts.set_write_buffer_size(write_buffer);
        if is_state_cf(n) {
            cf_opts.set_memtable_factory(rocksdb::MemtableFactory::Vector);
            // Only starts and checkpoints read these rows, so L0 files may pile up. When the
            // groups' applied rows were in every file of the messages, the files all
            // overlapped, so each L0-to-base compaction rewrote all the rows below it: at
            // RocksDB's default of 4 files, a 25 s W1 run wrote 990-1,090 MiB of state tables
            // per node; at 16, about 700, of which the flushes are about 400.
            cf_opts.set_level_zero_file_num_compaction_trigger(STATE_L0_COMPACTION_TRIGGER);
            cf_opts.set_level_zero_slowdown_writes_trigger(STATE_L0_COMPACTION_TRIGGER * 3);
            cf_opts.set_level_zero_stop_writes_trigger(STATE_L0_COMPACTION_TRIGGER * 5);
        }
        ColumnFamilyDescriptor::new(n, cf_opts)
    });
    let db = DB::open_cf_descriptors(opts, path, descriptors)
        .map_err(|e| NodeError::Storage(format!("open RocksDB at {}: {e}", path.display())))?;
    verify_checksums(&db, cfs).map_err(|e| {
        NodeError::Storage(format!(
            "integrity check of RocksDB at {}: {e}. This node's data is damaged: stop it, \
             delete the directory and start it again to resync from its peers",
            path.display()
        ))
    })?;
    Ok(db)
}

/// Opens the Raft log segments beside `log`. A log an earlier node kept in `log`'s column
/// families moves into them: written and synced there, then deleted from RocksDB. Whenever
/// rows are still there, they are imported (again, after a crash in between: nothing else is
/// written to the segments before).
fn open_segments(path: &Path, storage: &StorageConfig, log: &DB) -> Result<Segments, NodeError> {
    let dir = path.join(SEGMENTS_DIR);
    let storage_err = |e: &dyn std::fmt::Display| {
        NodeError::Storage(format!("raft log at {}: {e}", dir.display()))
    };
    let segments =
        Segments::open(&dir, storage.log_segment_mib << 20).map_err(|e| storage_err(&e))?;
    let mut rows = Vec::new();
    let mut bytes = 0;
    let mut moved = 0usize;
    let mut deletes = WriteBatch::default();
    for cf in [CF_META, CF_LOG] {
        let handle = log
            .cf_handle(cf)
            .expect("column families are created at open");
        for item in log.iterator_cf(handle, IteratorMode::Start) {
            let (key, value) = item.map_err(|e| storage_err(&e))?;
            deletes.delete_cf(handle, &key);
            bytes += key.len() + value.len();
            rows.push(LogOp::Put {
                cf,
                key: key.into_vec(),
                value: value.into_vec().into(),
            });
            // Frames of a few MiB, not one of the whole log.
            if bytes >= 4 << 20 {
                moved += rows.len();
                segments.write(&rows, false).map_err(|e| storage_err(&e))?;
                rows.clear();
                bytes = 0;
            }
        }
    }
    moved += rows.len();
    if moved > 0 {
        tracing::info!(rows = moved, dir = %dir.display(), "moved the raft log out of RocksDB");
        segments.write(&rows, true).map_err(|e| storage_err(&e))?;
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        log.write_opt(deletes, &wo).map_err(|e| storage_err(&e))?;
    }
    Ok(segments)
}

fn earlier_layout(path: &Path, what: &str) -> NodeError {
    NodeError::Storage(format!(
        "{} holds a database of an earlier Meridian layout ({what}). Stop the node, delete \
         the directory and start it again to resync from its peers",
        path.display()
    ))
}

impl Engine {
    /// Opens (or creates) the databases at `path`, sized, paced and guarded as `storage` says.
    pub fn open(path: &Path, storage: &StorageConfig) -> Result<Self, NodeError> {
        let direct = supports_direct_io(path);
        let opts = base_options(storage, direct);
        if !direct {
            tracing::info!(
                path = %path.display(),
                "the file system refuses O_DIRECT; flushes and compactions write through the page cache"
            );
        }
        // Before the split the state rows were a column family of the one database; RocksDB
        // would refuse to open it without naming why.
        if let Ok(existing) = DB::list_cf(&opts, path) {
            if existing.iter().any(|cf| cf == CF_STATE_BEFORE_SPLIT) {
                return Err(earlier_layout(path, "state rows beside the log"));
            }
        }
        // Before messages had a column family of their own, every state row was in one.
        if let Ok(existing) = DB::list_cf(&opts, path.join(STATE_DB_DIR)) {
            if existing.iter().any(|cf| cf == CF_STATE_BEFORE_SPLIT) {
                return Err(earlier_layout(
                    path,
                    "messages among the groups' state rows",
                ));
            }
        }
        // The votes and records of the small column families would hold every WAL file the
        // log's flushes have freed until the WALs reached RocksDB's bound of 4 times all
        // memtables (3 GiB here), all of it replayed at a restart: flush them sooner.
        let mut log_opts = opts.clone();
        log_opts.set_max_total_wal_size(storage.write_buffer_mib.saturating_mul(2 << 20));
        // The state rows skip the WAL, and a restart trusts the applied row it finds: every
        // flush must write the groups' rows and the messages' as of the same write.
        let mut state_opts = opts.clone();
        state_opts.set_atomic_flush(true);
        let log = open_db(path, &log_opts, &LOG_DB_CFS, storage)?;
        let segments = open_segments(path, storage, &log)?;
        let dbs = Dbs {
            segments: Arc::new(segments),
            log: Arc::new(log),
            state: Arc::new(open_db(
                &path.join(STATE_DB_DIR),
                &state_opts,
                &STATE_DB_CFS,
                storage,
            )?),
        };
        let metrics = Arc::new(StorageMetrics::default());
        let (tx, rx) = mpsc::channel::<LogJob>();
        let writer_dbs = dbs.clone();
        let m = metrics.clone();
        let space = FreeSpace {
            path: path.to_path_buf(),
            min_free_bytes: storage.min_free_mib << 20,
        };
        let thread = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || run_writer(writer_dbs, rx, m, space))
            .map_err(|e| NodeError::Storage(format!("spawn log writer: {e}")))?;
        let checkpoint_root = path.join("checkpoints");
        std::fs::create_dir_all(&checkpoint_root).map_err(|e| {
            NodeError::Storage(format!("create {}: {e}", checkpoint_root.display()))
        })?;
        Ok(Self {
            dbs,
            checkpoint_root,
            writer: Some(tx),
            writer_thread: Some(thread),
            metrics,
        })
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.dbs
            .of(name)
            .cf_handle(name)
            .expect("column families are created at open")
    }
}

#[cfg(test)]
impl Engine {
    /// The default engine without a free-space reserve (test directories are small).
    pub fn open_unreserved(path: &Path) -> Result<Self, NodeError> {
        let storage = StorageConfig {
            min_free_mib: 0,
            log_segment_mib: 1,
            ..StorageConfig::default()
        };
        Self::open(path, &storage)
    }
}

impl StorageEngine for Engine {
    fn get(&self, cf: &'static str, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        if segments::holds(cf) {
            return self.dbs.segments.get(cf, key);
        }
        self.dbs.of(cf).get_cf(self.cf(cf), key).map_err(io_err)
    }

    fn scan(
        &self,
        cf: &'static str,
        from: &[u8],
        to: &[u8],
    ) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.scan_skipping(cf, from, to, &|_| false)
    }

    fn scan_skipping(
        &self,
        cf: &'static str,
        from: &[u8],
        to: &[u8],
        skip_value: &dyn Fn(&[u8]) -> bool,
    ) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        if segments::holds(cf) {
            return self.dbs.segments.scan(cf, from, to, skip_value);
        }
        let mut out = Vec::new();
        for item in self
            .dbs
            .of(cf)
            .iterator_cf(self.cf(cf), IteratorMode::From(from, Direction::Forward))
        {
            let (k, v) = item.map_err(io_err)?;
            if &*k >= to {
                break;
            }
            let v = if skip_value(&k) {
                Vec::new()
            } else {
                v.into_vec()
            };
            out.push((k.into_vec(), v));
        }
        Ok(out)
    }

    fn last_in(
        &self,
        cf: &'static str,
        from: &[u8],
        to: &[u8],
    ) -> io::Result<Option<(Vec<u8>, Vec<u8>)>> {
        if segments::holds(cf) {
            return self.dbs.segments.last_in(cf, from, to);
        }
        let mut it = self
            .dbs
            .of(cf)
            .iterator_cf(self.cf(cf), IteratorMode::From(to, Direction::Reverse));
        for item in it.by_ref() {
            let (k, v) = item.map_err(io_err)?;
            if &*k >= to {
                continue;
            }
            if &*k < from {
                return Ok(None);
            }
            return Ok(Some((k.into_vec(), v.into_vec())));
        }
        Ok(None)
    }

    fn write(&self, ops: Vec<LogOp>, sync: bool) -> io::Result<()> {
        // The log first, as the writer does; its segments only through the writer, which
        // owns the one being written.
        let (in_segments, ops): (Vec<_>, Vec<_>) =
            ops.into_iter().partition(|op| segments::holds(op.cf()));
        if !in_segments.is_empty() {
            let (tx, rx) = mpsc::channel();
            self.submit(LogJob {
                ops: in_segments,
                durability: if sync {
                    Durability::Synced
                } else {
                    Durability::Logged
                },
                done: Box::new(move |r| {
                    let _ = tx.send(r);
                }),
            });
            rx.recv()
                .map_err(|_| io::Error::other("log writer stopped"))??;
        }
        let (log, state) = split_by_db(ops);
        for (db, ops) in [(&self.dbs.log, log), (&self.dbs.state, state)] {
            if !ops.is_empty() {
                write_batch(db, ops, true, sync).map_err(io_err)?;
            }
        }
        Ok(())
    }

    fn submit(&self, job: LogJob) {
        let sent = match &self.writer {
            Some(w) => w.send(job).map_err(|mpsc::SendError(job)| job),
            None => Err(job),
        };
        if let Err(job) = sent {
            (job.done)(Err(io::Error::other("log writer stopped")));
        }
    }

    fn metrics(&self) -> &StorageMetrics {
        &self.metrics
    }

    fn disk_low(&self) -> bool {
        self.metrics.disk_low.load(Ordering::Relaxed) != 0
    }

    fn flush(&self) -> io::Result<()> {
        self.dbs.segments.write(&[], true)?;
        for (db, cfs) in self.dbs.all() {
            flush_cfs(db, cfs).map_err(io_err)?;
        }
        Ok(())
    }

    fn checkpoint(&self, name: &str) -> io::Result<()> {
        let dir = self.checkpoint_dir(name)?;
        // Leftovers of a crash during an earlier attempt (RocksDB builds `<name>.tmp`, then
        // renames it): it wants neither to exist.
        for leftover in [dir.clone(), dir.with_extension("tmp")] {
            if leftover.exists() {
                std::fs::remove_dir_all(&leftover)?;
            }
        }
        // The state memtable into table files first, so the checkpoint is hard links (RocksDB
        // 10 copies the WAL instead of flushing). The log database is not flushed: that is
        // why it is a database of its own.
        flush_cfs(&self.dbs.state, &STATE_DB_CFS).map_err(io_err)?;
        rocksdb::checkpoint::Checkpoint::new(&self.dbs.state)
            .and_then(|c| c.create_checkpoint(&dir))
            .map_err(io_err)?;
        // Whatever the checkpoint holds, the live databases must hold durably too (logs up to
        // its index are purged next), and so must every logged write made before it.
        for (db, _) in self.dbs.all() {
            db.flush_wal(true).map_err(io_err)?;
        }
        // The directory entry itself must survive a power cut.
        std::fs::File::open(&self.checkpoint_root)?.sync_all()
    }

    fn scan_checkpoint(
        &self,
        name: &str,
        cf: &'static str,
        from: &[u8],
        to: &[u8],
    ) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let dir = self.checkpoint_dir(name)?;
        let mut opts = Options::default();
        opts.set_paranoid_checks(true);
        let db = DB::open_cf_for_read_only(&opts, &dir, STATE_DB_CFS, false).map_err(io_err)?;
        let handle = db
            .cf_handle(cf)
            .ok_or_else(|| io::Error::other(format!("checkpoint {name} lacks {cf}")))?;
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_verify_checksums(true);
        ro.fill_cache(false);
        let mut out = Vec::new();
        for item in db.iterator_cf_opt(handle, ro, IteratorMode::From(from, Direction::Forward)) {
            let (k, v) = item.map_err(io_err)?;
            if &*k >= to {
                break;
            }
            out.push((k.into_vec(), v.into_vec()));
        }
        Ok(out)
    }

    fn remove_checkpoint(&self, name: &str) -> io::Result<()> {
        match std::fs::remove_dir_all(self.checkpoint_dir(name)?) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }

    fn checkpoints(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.checkpoint_root)? {
            if let Some(name) = entry?.file_name().to_str() {
                names.push(name.to_string());
            }
        }
        names.sort();
        Ok(names)
    }
}

impl Engine {
    fn checkpoint_dir(&self, name: &str) -> io::Result<std::path::PathBuf> {
        // Plain names only (`.tmp` leftovers included): never a path out of the directory.
        let plain = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_';
        if name.is_empty() || name.starts_with('.') || !name.bytes().all(plain) {
            return Err(io::Error::other(format!("bad checkpoint name {name:?}")));
        }
        Ok(self.checkpoint_root.join(name))
    }
}

/// Reads every entry of every column family once, verifying each block's checksum, so a
/// damaged table file stops the node at start instead of failing (or worse, being trusted)
/// later in the middle of a Raft read. The log is bounded by snapshots, so this costs about as
/// much as the replay a restart does anyway.
fn verify_checksums(db: &DB, cfs: &[&str]) -> Result<(), rocksdb::Error> {
    for &name in cfs {
        let cf = db
            .cf_handle(name)
            .expect("column families are created at open");
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_verify_checksums(true);
        ro.fill_cache(false);
        for item in db.iterator_cf_opt(cf, ro, IteratorMode::Start) {
            item?;
        }
    }
    Ok(())
}

fn batch_of(db: &DB, ops: Vec<LogOp>) -> WriteBatch {
    let mut batch = WriteBatch::default();
    for op in ops {
        match op {
            LogOp::Put { cf, key, value } => {
                batch.put_cf(db.cf_handle(cf).expect("known column family"), key, value)
            }
            LogOp::Delete { cf, key } => {
                batch.delete_cf(db.cf_handle(cf).expect("known column family"), key)
            }
            LogOp::DeleteRange { cf, from, to } => {
                batch.delete_range_cf(db.cf_handle(cf).expect("known column family"), from, to)
            }
        }
    }
    batch
}

impl Drop for Engine {
    /// Finishes queued jobs and releases the database before returning, so the directory can
    /// be reopened right away.
    fn drop(&mut self) {
        self.writer.take();
        if let Some(t) = self.writer_thread.take() {
            let _ = t.join();
        }
    }
}

/// The free-space reserve of the database's file system.
struct FreeSpace {
    path: std::path::PathBuf,
    min_free_bytes: u64,
}

/// Free bytes for unprivileged writers on the file system holding `path`, or `None` if it
/// cannot say.
pub fn free_bytes(path: &Path) -> Option<u64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path and `st` is written by statvfs before we read it.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    // The field types differ between platforms (u32 on some 32-bit ones).
    #[allow(clippy::unnecessary_cast)]
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

impl FreeSpace {
    /// Updates `disk_low` from the current free space (logging each change); true if low.
    fn refresh(&self, m: &StorageMetrics) -> bool {
        if self.min_free_bytes == 0 {
            return false;
        }
        let low = matches!(free_bytes(&self.path), Some(free) if free < self.min_free_bytes);
        let was_low = m.disk_low.swap(u64::from(low), Ordering::Relaxed) != 0;
        if low && !was_low {
            m.disk_low_episodes.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                path = %self.path.display(),
                reserve_mib = self.min_free_bytes >> 20,
                "data disk below its free-space reserve: log writes wait, writes are refused"
            );
        } else if was_low && !low {
            tracing::warn!(path = %self.path.display(), "free space is back: log writes resume");
        }
        low
    }

    /// Blocks while free space is below the reserve, so RocksDB never meets a full disk (which
    /// would stop it until a restart): nothing queued is written, so nothing more is reported
    /// durable, and the node refuses new writes meanwhile (`disk_low`).
    fn wait_for_room(&self, m: &StorageMetrics) {
        while self.refresh(m) {
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
}

/// Whether files under `dir` (created if missing) open with O_DIRECT; tmpfs before Linux 6.6,
/// for one, refuses it, and RocksDB would then fail its first flush.
fn supports_direct_io(dir: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    if std::fs::create_dir_all(dir).is_err() {
        return false;
    }
    let probe = dir.join(".direct-io-probe");
    let ok = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&probe)
        .is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}

fn run_writer(dbs: Dbs, rx: mpsc::Receiver<LogJob>, m: Arc<StorageMetrics>, space: FreeSpace) {
    // When free space was last looked at; `None` before the first batch.
    let mut last_check: Option<Instant> = None;
    loop {
        // Idle or not, free space is looked at every 200 ms, so a node with nothing to write
        // still refuses writes (and reports `disk_low`) once its disk is short.
        let first = match rx.recv_timeout(std::time::Duration::from_millis(200)) {
            Ok(job) => job,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                space.refresh(&m);
                last_check = Some(Instant::now());
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        // statvfs is cheap, but not free: look at most every 50 ms while busy.
        if last_check.is_none_or(|t| t.elapsed() >= std::time::Duration::from_millis(50)) {
            space.wait_for_room(&m);
            last_check = Some(Instant::now());
        }
        let mut jobs = vec![first];
        jobs.extend(rx.try_iter());
        let is_state = |op: &LogOp| is_state_cf(op.cf());
        let in_segments = |op: &LogOp| segments::holds(op.cf());
        // The state rows of a round go through the state database's WAL only if a logged job
        // writes some (an ordered write, e.g. an installed snapshot); then all of them do, in
        // submission order. Everything else is the segments' or the log database's, always
        // logged.
        let state_logged = jobs
            .iter()
            .any(|j| j.durability != Durability::Unlogged && j.ops.iter().any(is_state));
        let synced = |pick: &dyn Fn(&LogOp) -> bool| {
            jobs.iter()
                .any(|j| j.durability == Durability::Synced && j.ops.iter().any(pick))
        };
        // A synced job without ops (an ordering barrier) needs no fsync of its own.
        let state_sync = synced(&is_state);
        let log_db_sync = synced(&|op| !is_state(op) && !in_segments(op));
        // The segments first, synced whenever anything in the round is: a synced state write
        // (an installed snapshot) must find the truncation openraft queued before it durable;
        // and state rows never reach a table file (through another group's checkpoint) ahead
        // of the log entries they were applied from.
        let segment_sync = synced(&in_segments) || log_db_sync || state_sync;
        let mut ops = Vec::new();
        let mut dones = Vec::with_capacity(jobs.len());
        for job in jobs {
            ops.extend(job.ops);
            dones.push(job.done);
        }
        let (segment_ops, ops): (Vec<_>, Vec<_>) = ops.into_iter().partition(in_segments);
        let (log_ops, state_ops) = split_by_db(ops);
        let mut syncs = 0;
        let mut sync_time = std::time::Duration::ZERO;
        let started = Instant::now();
        let mut result = dbs
            .segments
            .write_round(&segment_ops, segment_sync)
            .map_err(|e| e.to_string());
        drop(segment_ops);
        if segment_sync {
            syncs += 1;
            sync_time += started.elapsed();
        }
        for (db, ops, logged, sync) in [
            (&dbs.log, log_ops, true, log_db_sync),
            (&dbs.state, state_ops, state_logged, state_sync),
        ] {
            if result.is_err() || ops.is_empty() {
                continue;
            }
            let started = Instant::now();
            result = write_batch(db, ops, logged, sync).map_err(|e| e.to_string());
            if sync {
                syncs += 1;
                sync_time += started.elapsed();
            }
        }
        if syncs > 0 {
            m.sync_micros
                .fetch_add(sync_time.as_micros() as u64, Ordering::Relaxed);
            m.wal_syncs.fetch_add(syncs, Ordering::Relaxed);
        }
        m.synced_appends
            .fetch_add(dones.len() as u64, Ordering::Relaxed);
        if result.is_err() {
            m.sync_errors.fetch_add(1, Ordering::Relaxed);
        }
        // In submission order: a truncation's completion runs before later appends'.
        for done in dones {
            done(result.clone().map_err(io::Error::other));
        }
        if segment_sync && result.is_ok() {
            if let Err(e) = dbs.segments.tidy() {
                // Sticky: the next round fails, and with it the node's Raft groups.
                tracing::error!(error = %e, "letting go of emptied raft log segments failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(cf: &'static str, key: &[u8], value: &[u8]) -> LogOp {
        LogOp::put(cf, key, value)
    }

    fn submit(e: &Engine, op: LogOp, durability: Durability) -> mpsc::Receiver<io::Result<()>> {
        let (tx, rx) = mpsc::channel();
        e.submit(LogJob {
            ops: vec![op],
            durability,
            done: Box::new(move |r| {
                let _ = tx.send(r);
            }),
        });
        rx
    }

    /// Unlogged rows may be written ahead of logged jobs of the same round, but never ahead
    /// of a logged write to the same column family; and a clean close keeps them.
    #[test]
    fn unlogged_rows_keep_submission_order_and_survive_a_clean_close() {
        let dir = tempfile::tempdir().unwrap();
        {
            let e = Engine::open_unreserved(dir.path()).unwrap();
            let done = [
                submit(&e, put(CF_STATE_MESSAGES, b"k", b"a"), Durability::Unlogged),
                submit(&e, put(CF_LOG, b"l", b"1"), Durability::Synced),
                submit(&e, put(CF_STATE_MESSAGES, b"k", b"b"), Durability::Synced),
                submit(&e, put(CF_STATE_MESSAGES, b"k", b"c"), Durability::Unlogged),
                submit(&e, put(CF_STATE_MESSAGES, b"u", b"x"), Durability::Unlogged),
            ];
            for rx in done {
                rx.recv().unwrap().unwrap();
            }
            assert_eq!(
                e.get(CF_STATE_MESSAGES, b"k").unwrap().as_deref(),
                Some(&b"c"[..])
            );
        }
        let e = Engine::open_unreserved(dir.path()).unwrap();
        assert_eq!(
            e.get(CF_STATE_MESSAGES, b"k").unwrap().as_deref(),
            Some(&b"c"[..])
        );
        assert_eq!(
            e.get(CF_STATE_MESSAGES, b"u").unwrap().as_deref(),
            Some(&b"x"[..])
        );
        assert_eq!(e.get(CF_LOG, b"l").unwrap().as_deref(), Some(&b"1"[..]));
    }

    /// Small memtables and a flush rate limit: flushes happen (and are paced) while writes go
    /// on, and nothing written is lost across them or a reopen.
    #[test]
    fn a_tuned_engine_flushes_under_its_rate_limit_and_keeps_every_row() {
        let dir = tempfile::tempdir().unwrap();
        let storage = StorageConfig {
            min_free_mib: 0,
            write_buffer_mib: 1,
            flush_rate_mib_per_s: 8,
            ..StorageConfig::default()
        };
        let body = vec![7u8; 4096];
        {
            let e = Engine::open(dir.path(), &storage).unwrap();
            // One job per round: RocksDB switches a full memtable only at a later write, so
            // the writes must come as many batches, as they do under load.
            for i in 0..1024u32 {
                let (cf, d) = if i % 2 == 0 {
                    (CF_LOG, Durability::Synced)
                } else {
                    (CF_STATE_MESSAGES, Durability::Unlogged)
                };
                submit(&e, put(cf, &i.to_be_bytes(), &body), d)
                    .recv()
                    .unwrap()
                    .unwrap();
            }
            // Flushes run in the background: wait for one (bounded), never for a speed.
            let tables = || {
                e.dbs
                    .state
                    .live_files()
                    .unwrap()
                    .iter()
                    .filter(|f| f.column_family_name == CF_STATE_MESSAGES)
                    .count()
            };
            let deadline = Instant::now() + std::time::Duration::from_secs(30);
            while tables() == 0 && Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            assert!(
                tables() > 0,
                "2 MiB of rows into 1 MiB memtables flushed no table file"
            );
        }
        let e = Engine::open(dir.path(), &storage).unwrap();
        for i in 0..1024u32 {
            let cf = if i % 2 == 0 {
                CF_LOG
            } else {
                CF_STATE_MESSAGES
            };
            assert_eq!(
                e.get(cf, &i.to_be_bytes()).unwrap().as_deref(),
                Some(&body[..]),
                "{i}"
            );
        }
    }

    fn table_bytes(db: &DB, cf: &str) -> u64 {
        db.live_files()
            .unwrap()
            .iter()
            .filter(|f| f.column_family_name == cf)
            .map(|f| f.size as u64)
            .sum()
    }

    /// Log entries never reach RocksDB: a checkpoint and a flush write none of them to a table
    /// file, a purge drops them, and the log survives a reopen through its segments.
    #[test]
    fn the_log_never_reaches_a_table_file_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let body = vec![3u8; 1024];
        let e = Engine::open_unreserved(dir.path()).unwrap();
        for i in 0..2000u32 {
            submit(&e, put(CF_LOG, &i.to_be_bytes(), &body), Durability::Synced);
            submit(
                &e,
                put(CF_STATE_MESSAGES, &i.to_be_bytes(), &body),
                Durability::Unlogged,
            )
            .recv()
            .unwrap()
            .unwrap();
        }
        e.checkpoint("c1").unwrap();
        assert!(table_bytes(&e.dbs.state, CF_STATE_MESSAGES) > 0);
        let rows = e
            .scan_checkpoint("c1", CF_STATE_MESSAGES, &[], &[0xff; 5])
            .unwrap();
        assert_eq!(rows.len(), 2000);
        submit(
            &e,
            LogOp::DeleteRange {
                cf: CF_LOG,
                from: 0u32.to_be_bytes().to_vec(),
                to: 1990u32.to_be_bytes().to_vec(),
            },
            Durability::Logged,
        )
        .recv()
        .unwrap()
        .unwrap();
        for i in 1990..2000u32 {
            submit(
                &e,
                put(CF_LOG, &i.to_be_bytes(), b"new"),
                Durability::Synced,
            )
            .recv()
            .unwrap()
            .unwrap();
        }
        e.flush().unwrap();
        assert_eq!(table_bytes(&e.dbs.log, CF_LOG), 0, "log entries in RocksDB");
        drop(e);
        let e = Engine::open_unreserved(dir.path()).unwrap();
        assert_eq!(e.get(CF_LOG, &5u32.to_be_bytes()).unwrap(), None);
        assert_eq!(
            e.get(CF_LOG, &1995u32.to_be_bytes()).unwrap().as_deref(),
            Some(&b"new"[..])
        );
        assert_eq!(e.scan(CF_LOG, &[], &[0xff; 5]).unwrap().len(), 10);
    }

    /// A node whose log was in RocksDB's column families (before the segments) finds it in
    /// the segments after its first start, even one cut short, and RocksDB no longer holds it.
    #[test]
    fn a_log_kept_in_rocksdb_moves_into_the_segments() {
        let dir = tempfile::tempdir().unwrap();
        drop(Engine::open_unreserved(dir.path()).unwrap());
        std::fs::remove_dir_all(dir.path().join(SEGMENTS_DIR)).unwrap();
        {
            let opts = Options::default();
            let db = DB::open_cf(&opts, dir.path(), LOG_DB_CFS).unwrap();
            let mut wo = WriteOptions::default();
            wo.set_sync(true);
            let mut batch = WriteBatch::default();
            for i in 0..100u32 {
                batch.put_cf(
                    db.cf_handle(CF_LOG).unwrap(),
                    i.to_be_bytes(),
                    [i as u8; 64],
                );
            }
            batch.put_cf(db.cf_handle(CF_META).unwrap(), b"vote", b"v1");
            db.write_opt(batch, &wo).unwrap();
        }
        // A start that made its first segment and stopped before the import: the rows are
        // still imported at the next.
        drop(Segments::open(&dir.path().join(SEGMENTS_DIR), 1 << 20).unwrap());
        for _ in 0..2 {
            let e = Engine::open_unreserved(dir.path()).unwrap();
            assert_eq!(
                e.get(CF_META, b"vote").unwrap().as_deref(),
                Some(&b"v1"[..])
            );
            let log = e.scan(CF_LOG, &[], &[0xff; 5]).unwrap();
            assert_eq!(log.len(), 100);
            assert_eq!(log[42], (42u32.to_be_bytes().to_vec(), vec![42u8; 64]));
            let left = e
                .dbs
                .log
                .iterator_cf(e.dbs.log.cf_handle(CF_LOG).unwrap(), IteratorMode::Start)
                .count();
            assert_eq!(left, 0, "rows left in RocksDB");
        }
    }

    /// Overlapping state tables pile up in level 0 rather than being compacted every 4
    /// flushes, each compaction rewriting all rows below. Every file here holds a row of
    /// the same key, so no file can move down without a merge (as when every file held the
    /// groups' applied rows).
    #[test]
    fn state_tables_are_not_compacted_before_the_state_l0_trigger() {
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::open_unreserved(dir.path()).unwrap();
        let flushes = STATE_L0_COMPACTION_TRIGGER - 1;
        for round in 0..flushes {
            // A row of the same key every time (so the files overlap) and new message rows.
            submit(
                &e,
                put(CF_STATE_MESSAGES, b"a", &round.to_be_bytes()),
                Durability::Unlogged,
            );
            for i in 0..10u32 {
                let key = [&round.to_be_bytes()[..], &i.to_be_bytes()].concat();
                submit(
                    &e,
                    put(CF_STATE_MESSAGES, &key, &[7u8; 100]),
                    Durability::Unlogged,
                )
                .recv()
                .unwrap()
                .unwrap();
            }
            flush_cfs(&e.dbs.state, &STATE_DB_CFS).unwrap();
        }
        let state = &e.dbs.state;
        state
            .wait_for_compact(&rocksdb::WaitForCompactOptions::default())
            .unwrap();
        let cf = state.cf_handle(CF_STATE_MESSAGES).unwrap();
        let l0 = state
            .property_int_value_cf(&cf, "rocksdb.num-files-at-level0")
            .unwrap();
        assert_eq!(
            l0,
            Some(flushes as u64),
            "state tables were compacted early"
        );
    }

    /// A synced write of state rows alone (an installed snapshot) also syncs the log's
    /// segment, so a truncation queued before it (logged, riding the next sync) is durable with it.
    #[test]
    fn a_synced_state_write_makes_earlier_logged_log_jobs_durable() {
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::open_unreserved(dir.path()).unwrap();
        let syncs = || e.metrics.wal_syncs.load(Ordering::Relaxed);
        let truncate = LogOp::DeleteRange {
            cf: CF_LOG,
            from: b"a".to_vec(),
            to: b"z".to_vec(),
        };
        submit(&e, truncate, Durability::Logged)
            .recv()
            .unwrap()
            .unwrap();
        assert_eq!(syncs(), 0);
        submit(&e, put(CF_STATE_MESSAGES, b"k", b"v"), Durability::Synced)
            .recv()
            .unwrap()
            .unwrap();
        assert_eq!(syncs(), 2, "the log's segment and the state's WAL");
    }

    /// A directory of the one-database layout is refused with a message that says what to do,
    /// not opened half.
    #[test]
    fn a_data_directory_of_the_earlier_layout_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut opts = Options::default();
            opts.create_if_missing(true);
            opts.create_missing_column_families(true);
            let _db = DB::open_cf(
                &opts,
                dir.path(),
                [CF_LOG, CF_META, CF_SNAPSHOT, CF_STATE_BEFORE_SPLIT],
            )
            .unwrap();
        }
        let err = Engine::open_unreserved(dir.path())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("earlier Meridian layout"), "{err}");
    }

    /// A state database of one column family (messages keyed among the groups' rows) is
    /// refused the same way: its rows would not parse, or worse, parse as something else.
    #[test]
    fn a_state_database_of_the_one_table_layout_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        drop(Engine::open_unreserved(dir.path()).unwrap());
        let state = dir.path().join(STATE_DB_DIR);
        std::fs::remove_dir_all(&state).unwrap();
        {
            let mut opts = Options::default();
            opts.create_if_missing(true);
            opts.create_missing_column_families(true);
            let _db = DB::open_cf(&opts, &state, [CF_STATE_BEFORE_SPLIT]).unwrap();
        }
        let err = Engine::open_unreserved(dir.path())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("earlier Meridian layout"), "{err}");
        assert!(err.contains("messages among"), "{err}");
    }

    /// Unlogged rows of both state column families reach table files together: when the
    /// messages' memtable fills, RocksDB's flush writes the groups' too, as of the same write,
    /// so a crash can never leave a group's applied row ahead of (or behind) its messages.
    #[test]
    fn a_scan_skipping_values_returns_every_key_and_only_the_values_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::open_unreserved(dir.path()).unwrap();
        let ops = ["ab", "hb", "hh", "zb"]
            .iter()
            .map(|k| put(CF_STATE_MESSAGES, k.as_bytes(), k.as_bytes()))
            .collect();
        e.write(ops, false).unwrap();
        let skip_b = |k: &[u8]| k.last() == Some(&b'b');
        let rows = e
            .scan_skipping(CF_STATE_MESSAGES, b"b", b"z", &skip_b)
            .unwrap();
        assert_eq!(
            rows,
            [
                (b"hb".to_vec(), Vec::new()),
                (b"hh".to_vec(), b"hh".to_vec())
            ]
        );
    }

    #[test]
    fn the_state_column_families_flush_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let storage = StorageConfig {
            min_free_mib: 0,
            write_buffer_mib: 1,
            ..StorageConfig::default()
        };
        let e = Engine::open(dir.path(), &storage).unwrap();
        let mut ops = vec![LogOp::Put {
            cf: CF_STATE_GROUPS,
            key: b"applied".to_vec(),
            value: Bytes::from_static(b"1"),
        }];
        // Three times the memtable's size of messages: RocksDB flushes by itself.
        ops.extend((0u32..3 * 1024).map(|i| LogOp::Put {
            cf: CF_STATE_MESSAGES,
            key: i.to_be_bytes().to_vec(),
            value: Bytes::from(vec![7u8; 1024]),
        }));
        let (tx, rx) = mpsc::channel();
        e.submit(LogJob {
            ops,
            durability: Durability::Unlogged,
            done: Box::new(move |r| tx.send(r).unwrap()),
        });
        rx.recv().unwrap().unwrap();
        // RocksDB switches a full memtable at the next write (a batch of its own).
        submit(
            &e,
            put(CF_STATE_MESSAGES, b"next", b"v"),
            Durability::Unlogged,
        )
        .recv()
        .unwrap()
        .unwrap();
        let state = e.dbs.state.clone();
        let deadline = Instant::now() + std::time::Duration::from_secs(60);
        while table_bytes(&state, CF_STATE_MESSAGES) == 0 {
            assert!(
                Instant::now() < deadline,
                "no flush of the messages in 60 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(
            table_bytes(&state, CF_STATE_GROUPS) > 0,
            "the groups' rows were flushed with the messages'"
        );
    }
}
