//! A node's disk in memory, with a page cache that a crash empties.
//!
//! Writes are visible at once (like RocksDB's memtable) but only *durable* once a sync covers
//! them: a synchronous write syncs everything written before it, and group-commit jobs are
//! synced together by one delayed "fsync" task on the node's runtime, after which their
//! completions run (so openraft hears "durable" only then). When the simulation crashes the
//! host, that task dies with it and [`MemoryEngine::recover`] at the next boot drops every
//! unsynced write: exactly what a power cut does to a real node.
//!
//! State rows are a second domain, as in the real engine's separate state database: rows
//! written unlogged become durable only when the state "memtable" is flushed, which a
//! checkpoint does and which also happens by itself every [`STATE_FLUSH_OPS`] rows, at any
//! point relative to the log's syncs (so a crash can leave the rows ahead of the local log).

use std::collections::BTreeMap;
use std::io;
use std::ops::Bound;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meridian_region_node::storage::{
    is_state_cf, Durability, LogJob, LogOp, StorageEngine, StorageMetrics, STATE_DB_CFS,
};

type Key = (&'static str, Vec<u8>);
type Table = BTreeMap<Key, Vec<u8>>;

/// State rows written since the state memtable was last flushed, at which count it flushes by
/// itself (a full memtable).
const STATE_FLUSH_OPS: usize = 64;

#[derive(Default)]
struct Disk {
    /// What survives a crash, but for the state rows still in the memtable.
    durable: Table,
    /// What reads see: durable plus the page cache.
    visible: Table,
    /// Log writes not yet synced, in order (replayed onto `durable` by the next sync).
    unsynced: Vec<LogOp>,
    /// State rows since the last flush, in order, each with whether it went through the WAL.
    state_memtable: Vec<(LogOp, bool)>,
    /// How many of `state_memtable` a sync has covered (its logged ones are durable).
    state_synced: usize,
    /// Completions waiting for the next group-commit sync.
    waiting: Vec<Box<dyn FnOnce(io::Result<()>) + Send>>,
    sync_scheduled: bool,
    /// Bumped by every boot, so an old boot's sync task cannot complete a new boot's jobs.
    boot: u64,
    /// Checkpoints by name: durable copies of the state column families (all the project
    /// reads from a checkpoint), which survive crashes.
    checkpoints: BTreeMap<String, Table>,
}

/// Keys of `cf` in `[from, to)`.
fn key_range(cf: &'static str, from: &[u8], to: &[u8]) -> (Bound<Key>, Bound<Key>) {
    (
        Bound::Included((cf, from.to_vec())),
        Bound::Excluded((cf, to.to_vec())),
    )
}

fn apply(table: &mut Table, op: &LogOp) {
    match op {
        LogOp::Put { cf, key, value } => {
            table.insert((cf, key.clone()), value.to_vec());
        }
        LogOp::Delete { cf, key } => {
            table.remove(&(*cf, key.clone()));
        }
        LogOp::DeleteRange { cf, from, to } => {
            let doomed: Vec<Key> = table
                .range(key_range(cf, from, to))
                .map(|(k, _)| k.clone())
                .collect();
            for k in doomed {
                table.remove(&k);
            }
        }
    }
}

impl Disk {
    fn write(&mut self, ops: Vec<LogOp>, state_logged: bool) {
        for op in ops {
            apply(&mut self.visible, &op);
            // One memtable for both state column families: RocksDB flushes them atomically.
            if is_state_cf(op.cf()) {
                self.state_memtable.push((op, state_logged));
            } else {
                self.unsynced.push(op);
            }
        }
        if self.state_memtable.len() >= STATE_FLUSH_OPS {
            self.flush_state();
        }
    }

    fn sync(&mut self) {
        for op in std::mem::take(&mut self.unsynced) {
            apply(&mut self.durable, &op);
        }
        self.state_synced = self.state_memtable.len();
    }

    /// The state memtable into a table file: every row in it durable, logged or not.
    fn flush_state(&mut self) {
        for (op, _) in std::mem::take(&mut self.state_memtable) {
            apply(&mut self.durable, &op);
        }
        self.state_synced = 0;
    }
}

/// How long one simulated fsync takes, as a function of the simulation's seeded RNG.
pub type FsyncLatency = Arc<dyn Fn() -> Duration + Send + Sync>;

pub struct MemoryEngine {
    disk: Mutex<Disk>,
    fsync_latency: FsyncLatency,
    metrics: StorageMetrics,
    /// A broken disk for the checker's own test: group-commit jobs are reported durable as
    /// soon as they are written; the sync comes later (what a lazy-fsync broker does).
    pub acks_before_sync: bool,
    pub checkpoints_made: std::sync::atomic::AtomicU64,
}

impl MemoryEngine {
    pub fn new(fsync_latency: FsyncLatency, acks_before_sync: bool) -> Arc<Self> {
        Arc::new(Self {
            disk: Mutex::default(),
            fsync_latency,
            metrics: StorageMetrics::default(),
            acks_before_sync,
            checkpoints_made: Default::default(),
        })
    }

    /// A boot after a crash: everything not synced is gone, and so are pending completions.
    pub fn recover(&self) {
        let mut guard = self.disk.lock().unwrap();
        let d = &mut *guard;
        // The state WAL's synced rows come back (replayed, then flushed at open); the
        // unlogged ones since the last flush are gone.
        for (op, logged) in d.state_memtable.drain(..).take(d.state_synced) {
            if logged {
                apply(&mut d.durable, &op);
            }
        }
        d.state_synced = 0;
        d.visible = d.durable.clone();
        d.unsynced.clear();
        d.waiting.clear();
        d.sync_scheduled = false;
        d.boot += 1;
    }

    /// Entries of `cf` with keys in `[from, to)` as reads see them now.
    pub fn visible_range(
        &self,
        cf: &'static str,
        from: &[u8],
        to: &[u8],
    ) -> Vec<(Vec<u8>, Vec<u8>)> {
        let d = self.disk.lock().unwrap();
        d.visible
            .range(key_range(cf, from, to))
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect()
    }

    fn schedule_sync(self: &Arc<Self>) {
        let boot = {
            let mut d = self.disk.lock().unwrap();
            if d.sync_scheduled {
                return;
            }
            d.sync_scheduled = true;
            d.boot
        };
        let engine = self.clone();
        let latency = (self.fsync_latency)();
        tokio::spawn(async move {
            tokio::time::sleep(latency).await;
            let dones = {
                let mut d = engine.disk.lock().unwrap();
                if d.boot != boot {
                    return;
                }
                d.sync();
                d.sync_scheduled = false;
                std::mem::take(&mut d.waiting)
            };
            engine
                .metrics
                .wal_syncs
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            for done in dones {
                done(Ok(()));
            }
        });
    }
}

/// The engine behind an `Arc`, as `StorageEngine` needs `submit` to reach the runtime.
pub struct SharedMemoryEngine(pub Arc<MemoryEngine>);

impl StorageEngine for SharedMemoryEngine {
    fn get(&self, cf: &'static str, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        let d = self.0.disk.lock().unwrap();
        Ok(d.visible.get(&(cf, key.to_vec())).cloned())
    }

    fn scan(
        &self,
        cf: &'static str,
        from: &[u8],
        to: &[u8],
    ) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        Ok(self.0.visible_range(cf, from, to))
    }

    fn last_in(
        &self,
        cf: &'static str,
        from: &[u8],
        to: &[u8],
    ) -> io::Result<Option<(Vec<u8>, Vec<u8>)>> {
        let d = self.0.disk.lock().unwrap();
        Ok(d.visible
            .range(key_range(cf, from, to))
            .next_back()
            .map(|((_, k), v)| (k.clone(), v.clone())))
    }

    fn write(&self, ops: Vec<LogOp>, sync: bool) -> io::Result<()> {
        let mut d = self.0.disk.lock().unwrap();
        d.write(ops, true);
        if sync {
            // A synchronous write blocks its caller for the fsync; in simulated time that is
            // instantaneous, which only makes votes and snapshots durable sooner.
            d.sync();
        }
        Ok(())
    }

    fn submit(&self, job: LogJob) {
        let early = {
            let mut d = self.0.disk.lock().unwrap();
            d.write(job.ops, job.durability != Durability::Unlogged);
            if self.0.acks_before_sync {
                Some(job.done)
            } else {
                d.waiting.push(job.done);
                None
            }
        };
        self.0.schedule_sync();
        if let Some(done) = early {
            done(Ok(()));
        }
    }

    fn metrics(&self) -> &StorageMetrics {
        &self.0.metrics
    }

    fn flush(&self) -> io::Result<()> {
        let mut d = self.0.disk.lock().unwrap();
        d.sync();
        d.flush_state();
        Ok(())
    }

    fn checkpoint(&self, name: &str) -> io::Result<()> {
        let mut d = self.0.disk.lock().unwrap();
        // RocksDB flushes the state memtable into the checkpoint's table files, and syncs
        // the WALs: everything written so far is durable afterwards, synced or not.
        d.sync();
        d.flush_state();
        let copy: Table = STATE_DB_CFS
            .iter()
            .flat_map(|cf| d.durable.range(key_range(cf, &[], &[0xff; 8])))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        d.checkpoints.insert(name.to_string(), copy);
        self.0
            .checkpoints_made
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn scan_checkpoint(
        &self,
        name: &str,
        cf: &'static str,
        from: &[u8],
        to: &[u8],
    ) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let d = self.0.disk.lock().unwrap();
        let table = d
            .checkpoints
            .get(name)
            .ok_or_else(|| io::Error::other(format!("no checkpoint {name}")))?;
        Ok(table
            .range(key_range(cf, from, to))
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect())
    }

    fn remove_checkpoint(&self, name: &str) -> io::Result<()> {
        self.0.disk.lock().unwrap().checkpoints.remove(name);
        Ok(())
    }

    fn checkpoints(&self) -> io::Result<Vec<String>> {
        Ok(self
            .0
            .disk
            .lock()
            .unwrap()
            .checkpoints
            .keys()
            .cloned()
            .collect())
    }
}
