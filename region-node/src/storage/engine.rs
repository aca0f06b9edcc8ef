//! The node's RocksDB instance and its group-commit WAL syncer.
//!
//! An append writes its entries to RocksDB *without* sync (so they are readable at once, as
//! openraft requires) and then queues its completion callback. The syncer thread takes every
//! queued callback, issues one `FlushWAL(sync = true)`, and only then fires them all: one fsync
//! covers every entry written before it, from every group. Nothing is acknowledged to openraft —
//! and so nothing is committed or answered — before that fsync returns.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use rocksdb::{ColumnFamilyDescriptor, Options, WriteBatch, WriteOptions, DB};

use crate::error::NodeError;

pub const CF_LOG: &str = "log";
pub const CF_META: &str = "meta";
pub const CF_SNAPSHOT: &str = "snapshot";

type SyncCallback = Box<dyn FnOnce(io::Result<()>) + Send>;

/// Durability watermarks of the WAL syncer, exported as metrics.
#[derive(Debug, Default)]
pub struct StorageMetrics {
    /// WAL fsyncs completed.
    pub wal_syncs: AtomicU64,
    /// Append callbacks released by those fsyncs (≥ wal_syncs when group commit batches).
    pub synced_appends: AtomicU64,
    /// Total time spent inside fsync, microseconds.
    pub sync_micros: AtomicU64,
    pub sync_errors: AtomicU64,
}

pub struct Engine {
    db: Arc<DB>,
    syncer: mpsc::Sender<SyncCallback>,
    pub metrics: Arc<StorageMetrics>,
}

impl Engine {
    pub fn open(path: &Path) -> Result<Self, NodeError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // Checksums on every block read catch on-disk corruption instead of serving it.
        opts.set_paranoid_checks(true);
        let cfs = [CF_LOG, CF_META, CF_SNAPSHOT]
            .into_iter()
            .map(|n| ColumnFamilyDescriptor::new(n, Options::default()));
        let db = DB::open_cf_descriptors(&opts, path, cfs)
            .map_err(|e| NodeError::Storage(format!("open RocksDB at {}: {e}", path.display())))?;
        let db = Arc::new(db);
        let metrics = Arc::new(StorageMetrics::default());
        let (tx, rx) = mpsc::channel::<SyncCallback>();
        let sync_db = db.clone();
        let m = metrics.clone();
        std::thread::Builder::new()
            .name("wal-syncer".into())
            .spawn(move || run_syncer(sync_db, rx, m))
            .map_err(|e| NodeError::Storage(format!("spawn WAL syncer: {e}")))?;
        Ok(Self {
            db,
            syncer: tx,
            metrics,
        })
    }

    pub fn db(&self) -> &DB {
        &self.db
    }

    pub fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column families are created at open")
    }

    /// Writes a batch; `sync` makes this one write durable before returning.
    pub fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), rocksdb::Error> {
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(batch, &wo)
    }

    /// Calls `done` once everything written so far is fsynced.
    pub fn after_sync(&self, done: SyncCallback) {
        if let Err(mpsc::SendError(done)) = self.syncer.send(done) {
            done(Err(io::Error::other("WAL syncer stopped")));
        }
    }
}

fn run_syncer(db: Arc<DB>, rx: mpsc::Receiver<SyncCallback>, m: Arc<StorageMetrics>) {
    while let Ok(first) = rx.recv() {
        let mut waiting = vec![first];
        waiting.extend(rx.try_iter());
        let started = Instant::now();
        let result = db.flush_wal(true);
        m.sync_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        m.wal_syncs.fetch_add(1, Ordering::Relaxed);
        m.synced_appends
            .fetch_add(waiting.len() as u64, Ordering::Relaxed);
        if result.is_err() {
            m.sync_errors.fetch_add(1, Ordering::Relaxed);
        }
        for done in waiting {
            done(result.clone().map_err(|e| io::Error::other(e.to_string())));
        }
    }
}
