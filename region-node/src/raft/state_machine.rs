//! The state machine of one group: the in-memory [`GroupState`], mirrored into RocksDB rows.
//!
//! Applying never reads the clock: each command carries the leader's time. The state is served
//! from memory; the rows that applies changed are written to the memtable only (not the WAL: the
//! log is what is durable, and a restart re-applies the log after the index the flushed rows
//! name), once enough has changed ([`ROWS_EVERY_COMMANDS`], [`ROWS_EVERY_BODY_BYTES`]) and
//! before every snapshot. Writing them seldom lets a message sent and deleted in between cost no
//! row at all. A snapshot is a RocksDB checkpoint: the flush it makes turns the rows durable, and
//! its copy is what a lagging follower is sent, so logs are only purged up to a state on disk.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use futures::{Stream, StreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, StoredMembership};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::{Entry, LogId, Membership, Snapshot, SnapshotMeta, TypeConfig};
use crate::command::{Delivered, Op, OpResult, QueueKey};
use crate::queue::{
    body_key, group_rows, is_body_key, BodySource, GroupState, RowOp, Table, TAG_APPLIED,
};
use crate::storage::{
    group_key, run_blocking, Durability, LogJob, LogOp, StorageEngine, CF_SNAPSHOT,
    CF_STATE_GROUPS, CF_STATE_MESSAGES,
};

const KEY_SNAPSHOT: &[u8] = b"snapshot";

/// State rows are written once this many commands were applied since the last write...
pub const ROWS_EVERY_COMMANDS: u64 = 1024;
/// ...or once the bodies they sent add up to this many bytes, so one write of rows (which the
/// log writer makes between two log appends) stays small.
pub const ROWS_EVERY_BODY_BYTES: u64 = 1 << 20;

type StResult<T> = Result<T, std::io::Error>;

/// Wakes long polls waiting on a queue when something may have become receivable.
#[derive(Default)]
pub struct QueueNotifier {
    waiters: Mutex<HashMap<QueueKey, Arc<Notify>>>,
}

impl QueueNotifier {
    /// The notifier of `key`, held while a long poll waits on it.
    pub fn watch(&self, key: &QueueKey) -> Watch<'_> {
        let notify = self
            .waiters
            .lock()
            .expect("notifier lock")
            .entry(key.clone())
            .or_default()
            .clone();
        Watch {
            notifier: self,
            key: key.clone(),
            notify,
        }
    }

    fn wake(&self, key: &QueueKey) {
        if let Some(n) = self.waiters.lock().expect("notifier lock").get(key) {
            n.notify_waiters();
        }
    }
}

/// A long poll's hold on a queue's notifier; the entry is dropped with the last holder, so
/// client-chosen queue names do not accumulate.
pub struct Watch<'a> {
    notifier: &'a QueueNotifier,
    key: QueueKey,
    notify: Arc<Notify>,
}

impl std::ops::Deref for Watch<'_> {
    type Target = Notify;
    fn deref(&self) -> &Notify {
        &self.notify
    }
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        let mut waiters = self.notifier.waiters.lock().expect("notifier lock");
        // One reference in the map and ours: nobody else waits.
        if Arc::strong_count(&self.notify) <= 2 {
            waiters.remove(&self.key);
        }
    }
}

/// What the API layer reads: the group's state and how far it has applied.
pub struct SharedState {
    pub state: RwLock<GroupState>,
    pub applied: RwLock<(Option<LogId>, Membership)>,
    pub notifier: QueueNotifier,
    /// Snapshots installed from a leader since start.
    pub snapshots_installed: std::sync::atomic::AtomicU64,
    /// Serialises snapshot writes.
    snapshot_store: Mutex<()>,
    /// Commands applied and body bytes sent since state rows were last written.
    unwritten: Mutex<(u64, u64)>,
    /// Bodies written to rows, to drop from memory once the write is done.
    eviction: Mutex<Eviction>,
    /// Set (under the state lock) from queueing an installed snapshot's rows until the state
    /// they hold replaces the one in memory: rows of the state being replaced (a snapshot
    /// build's `persist_pending_rows`, which runs in a task of its own) must not be written
    /// after them, or they would mix into the installed rows.
    installing: std::sync::atomic::AtomicBool,
}

/// Message bodies that writes of rows carry, dropped from the in-memory state once their write
/// is done and later writes carried more than the cache holds (a write of rows does it): from
/// then on a receive or a dead-letter move reads the body row, so a backlog of messages costs
/// memory for their headers and the cache only.
#[derive(Debug, Default)]
struct Eviction {
    /// Body bytes of the writes not yet dropped that may stay in memory
    /// (`[storage] cached_bodies_mib`, this group's share).
    cache_bytes: u64,
    /// Body bytes the writes in `pending` carried (some of those messages may be gone since),
    /// plus [`PENDING_OVERHEAD`] for each of their entries in `pending`.
    pending_bytes: u64,
    /// Number of the next write of rows (from 1).
    next: u64,
    /// Every write of rows up to this number is done. A failed write stops it for good: the
    /// bodies it carried, and any after, stay in memory.
    done: Arc<AtomicU64>,
    /// The bodies each write carried, oldest first, until dropped.
    pending: VecDeque<WrittenBodies>,
    /// Bodies dropped from memory since start.
    evicted: u64,
}

/// The messages whose bodies one write of rows carried: its number, their bytes, and which
/// (by queue).
type WrittenBodies = (u64, u64, Vec<(QueueKey, Vec<u64>)>);

/// What noting one written body costs in memory (its sequence number in `pending`), counted
/// against the cache, so that tiny bodies cannot make the bookkeeping outgrow it.
const PENDING_OVERHEAD: u64 = 8;

impl Eviction {
    /// Drops from `state` the bodies of the oldest writes that are done, while the writes
    /// carried more than the cache holds.
    fn evict_written(&mut self, state: &mut GroupState) {
        let done = self.done.load(Ordering::Acquire);
        while self.pending_bytes > self.cache_bytes
            && self.pending.front().is_some_and(|(n, ..)| *n <= done)
        {
            let (_, bytes, written) = self.pending.pop_front().expect("just looked");
            self.pending_bytes -= bytes;
            for (key, seqs) in written {
                let Some(q) = state.queues.get_mut(&key) else {
                    continue;
                };
                for seq in seqs {
                    // Sequence numbers are never reused: if the message is there, it is the
                    // one whose body that write carried.
                    if let Some(m) = q.messages.get_mut(&seq) {
                        if m.body.take().is_some() {
                            self.evicted += 1;
                        }
                    }
                }
            }
        }
    }
}

impl SharedState {
    /// The applied index and a SHA-256 (hex) of the state at exactly that index.
    pub fn digest(&self) -> (u64, String) {
        let state = self.state.read().expect("state lock");
        let applied = self.applied_index();
        let bytes = bincode::serialize(&*state).expect("state is serialisable");
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bytes);
        (applied, hex::encode(d.as_ref()))
    }

    /// Message bodies dropped from memory since start, their rows being written.
    pub fn bodies_evicted(&self) -> u64 {
        self.eviction.lock().expect("eviction lock").evicted
    }

    /// The index of the last entry applied (0 before any).
    pub fn applied_index(&self) -> u64 {
        let applied = self.applied.read().expect("applied lock");
        applied.0.map_or(0, |l| l.index)
    }
}

/// The record of a group's current snapshot: its meta and the checkpoint holding its rows.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    /// Name of the engine checkpoint (`g<group>-<seq>`).
    checkpoint: String,
    seq: u64,
}

/// A group's snapshot rows as openraft passes them around: encoded (as a leader sent them), or
/// still in the checkpoint that holds them, read only when a follower is sent them. openraft
/// keeps only the meta of a snapshot it builds and asks for the current one again to send it,
/// so building or naming a snapshot never loads the group's whole state.
pub enum SnapshotData {
    Encoded(Vec<u8>),
    InCheckpoint {
        store: StateMachineStore,
        checkpoint: String,
    },
}

impl SnapshotData {
    /// The encoded rows; reads the checkpoint (blocking) if they are still there.
    pub fn into_encoded(self) -> StResult<Vec<u8>> {
        match self {
            SnapshotData::Encoded(data) => Ok(data),
            SnapshotData::InCheckpoint { store, checkpoint } => store.read_checkpoint(&checkpoint),
        }
    }
}

impl std::fmt::Debug for SnapshotData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SnapshotData::Encoded(data) => write!(f, "Encoded({} bytes)", data.len()),
            SnapshotData::InCheckpoint { checkpoint, .. } => {
                write!(f, "InCheckpoint({checkpoint})")
            }
        }
    }
}

/// What goes over the wire to a follower: the group's rows as the checkpoint holds them.
#[derive(Serialize, Deserialize)]
struct SnapshotRows {
    rows: Vec<(Table, serde_bytes::ByteBuf, serde_bytes::ByteBuf)>,
}

/// A state row: its table, key and value.
type Row = (Table, Vec<u8>, Vec<u8>);

/// The column family that holds `table`.
fn cf_of(table: Table) -> &'static str {
    match table {
        Table::Group => CF_STATE_GROUPS,
        Table::Messages => CF_STATE_MESSAGES,
    }
}

const TABLES: [Table; 2] = [Table::Group, Table::Messages];

/// Every row of `group`, from the live database or (with `checkpoint`) from that checkpoint.
/// Without `bodies`, body rows of the live database come with empty values: what a start needs
/// (the bodies stay in the rows), without holding a backlog's bodies while it parses them.
fn scan_group(
    engine: &dyn StorageEngine,
    group: u32,
    checkpoint: Option<&str>,
    bodies: bool,
) -> std::io::Result<Vec<Row>> {
    let (from, to) = group_rows(group);
    let mut rows = Vec::new();
    for table in TABLES {
        let cf = cf_of(table);
        let kvs = match (checkpoint, table) {
            (Some(name), _) => engine.scan_checkpoint(name, cf, &from, &to)?,
            (None, Table::Messages) if !bodies => {
                engine.scan_skipping(cf, &from, &to, &is_body_key)?
            }
            (None, _) => engine.scan(cf, &from, &to)?,
        };
        rows.extend(kvs.into_iter().map(|(k, v)| (table, k, v)));
    }
    Ok(rows)
}

#[derive(Clone)]
pub struct StateMachineStore {
    group: u32,
    data_groups: u32,
    engine: Arc<dyn StorageEngine>,
    pub shared: Arc<SharedState>,
}

fn sm_err(e: &impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("state machine: {e}"))
}

fn snap_err(e: &impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("snapshot: {e}"))
}

fn applied_key(group: u32) -> Vec<u8> {
    group_key(group, &[TAG_APPLIED])
}

fn to_log_op(op: RowOp) -> LogOp {
    match op {
        RowOp::Put(table, key, value) => LogOp::Put {
            cf: cf_of(table),
            key,
            value,
        },
        RowOp::Delete(table, key) => LogOp::Delete {
            cf: cf_of(table),
            key,
        },
        RowOp::DeleteRange(table, from, to) => LogOp::DeleteRange {
            cf: cf_of(table),
            from,
            to,
        },
    }
}

/// The applied position that `rows` (one group's) hold.
fn applied_of_rows(group: u32, rows: &[Row]) -> StResult<Applied> {
    let applied_key = applied_key(group);
    match rows
        .iter()
        .find(|(t, k, _)| *t == Table::Group && *k == applied_key)
    {
        Some((_, _, v)) => bincode::deserialize(v).map_err(|e| sm_err(&e)),
        None => Ok((None, Membership::default())),
    }
}

/// The state and applied position that `rows` (one group's, each table's ascending) hold; the
/// message bodies stay in the rows, which `engine` reads.
fn state_of_rows(
    group: u32,
    data_groups: u32,
    rows: &[Row],
    engine: &Arc<dyn StorageEngine>,
) -> StResult<(GroupState, Applied)> {
    let applied = applied_of_rows(group, rows)?;
    let borrowed = rows
        .iter()
        .map(|(t, k, v)| (*t, k.as_slice(), v.as_slice()));
    let mut state =
        GroupState::from_rows(group, data_groups, borrowed, false).map_err(|e| sm_err(&e))?;
    state.bodies = body_source(group, engine.clone());
    Ok((state, applied))
}

/// The body row of message `seq` of queue `key` in `group`, from the live state.
fn body_row(
    engine: &dyn StorageEngine,
    group: u32,
    key: &QueueKey,
    seq: u64,
) -> std::io::Result<Option<Vec<u8>>> {
    engine.get(CF_STATE_MESSAGES, &body_key(group, key, seq))
}

/// Reads the body rows of `group` from `engine`'s live state.
fn body_source(group: u32, engine: Arc<dyn StorageEngine>) -> BodySource {
    BodySource::new(move |key, seq| match body_row(&*engine, group, key, seq) {
        Ok(body) => body.map(Into::into),
        Err(e) => {
            tracing::error!(group, queue = %key.name, seq, "reading a message body row: {e}");
            None
        }
    })
}

type Applied = (Option<LogId>, Membership);

impl StateMachineStore {
    /// Opens the group's state machine from its rows, and drops checkpoints of it that no
    /// snapshot record names (left by a crash between making one and recording it).
    /// Up to `cached_bodies` bytes of message bodies whose rows are written stay in memory.
    pub fn open(
        group: u32,
        data_groups: u32,
        engine: Arc<dyn StorageEngine>,
        cached_bodies: u64,
    ) -> StResult<Self> {
        let rows = scan_group(&*engine, group, None, false).map_err(|e| sm_err(&e))?;
        let (state, applied) = state_of_rows(group, data_groups, &rows, &engine)?;
        drop(rows);
        let store = Self {
            group,
            data_groups,
            engine,
            shared: Arc::new(SharedState {
                state: RwLock::new(state),
                applied: RwLock::new(applied),
                notifier: QueueNotifier::default(),
                snapshots_installed: Default::default(),
                snapshot_store: Mutex::new(()),
                unwritten: Mutex::new((0, 0)),
                installing: Default::default(),
                eviction: Mutex::new(Eviction {
                    next: 1,
                    cache_bytes: cached_bodies,
                    ..Default::default()
                }),
            }),
        };
        let current = store.load_record()?.map(|r| r.checkpoint);
        let prefix = format!("g{group}-");
        for name in store.engine.checkpoints().map_err(|e| snap_err(&e))? {
            if name.starts_with(&prefix) && Some(&name) != current.as_ref() {
                store
                    .engine
                    .remove_checkpoint(&name)
                    .map_err(|e| snap_err(&e))?;
            }
        }
        Ok(store)
    }

    fn load_record(&self) -> StResult<Option<StoredSnapshot>> {
        let raw = self
            .engine
            .get(CF_SNAPSHOT, &group_key(self.group, KEY_SNAPSHOT))
            .map_err(|e| snap_err(&e))?;
        raw.map(|v| bincode::deserialize(&v).map_err(|e| snap_err(&e)))
            .transpose()
    }

    /// Makes a checkpoint and records it as the group's snapshot, unless a newer one is
    /// recorded (a slow build racing an install must not replace it: logs up to the newer one
    /// may already be purged); then drops the checkpoint no longer named. Returns the
    /// snapshot's meta (from the checkpoint's own applied row) and the checkpoint's name. Only
    /// the applied row is read: the rows stay in the checkpoint until a follower is sent them.
    fn take_snapshot(&self) -> StResult<(SnapshotMeta, String)> {
        let _serial = self
            .shared
            .snapshot_store
            .lock()
            .expect("snapshot store lock");
        let previous = self.load_record()?;
        let seq = previous.as_ref().map_or(1, |r| r.seq + 1);
        let name = format!("g{}-{seq}", self.group);
        self.engine.checkpoint(&name).map_err(|e| sm_err(&e))?;
        let applied_key = applied_key(self.group);
        let just_after = [applied_key.as_slice(), &[0]].concat();
        let rows: Vec<Row> = self
            .engine
            .scan_checkpoint(&name, CF_STATE_GROUPS, &applied_key, &just_after)
            .map_err(|e| snap_err(&e))?
            .into_iter()
            .map(|(k, v)| (Table::Group, k, v))
            .collect();
        let (last_applied, membership) = applied_of_rows(self.group, &rows)?;
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
        };
        let stale = match &previous {
            Some(current) if current.meta.last_log_id > meta.last_log_id => Some(name.clone()),
            _ => {
                let stored = StoredSnapshot {
                    meta: meta.clone(),
                    checkpoint: name.clone(),
                    seq,
                };
                let op = LogOp::Put {
                    cf: CF_SNAPSHOT,
                    key: group_key(self.group, KEY_SNAPSHOT),
                    value: bincode::serialize(&stored).map_err(|e| sm_err(&e))?.into(),
                };
                // Synced: logs up to this snapshot may be purged right after.
                self.engine.write(vec![op], true).map_err(|e| sm_err(&e))?;
                previous.map(|p| p.checkpoint)
            }
        };
        if let Some(stale) = stale {
            self.engine
                .remove_checkpoint(&stale)
                .map_err(|e| sm_err(&e))?;
        }
        Ok((meta, name))
    }

    /// The encoded rows of checkpoint `name`, if it is still the group's snapshot (a newer
    /// one may have replaced and removed it since it was named).
    fn read_checkpoint(&self, name: &str) -> StResult<Vec<u8>> {
        let _serial = self
            .shared
            .snapshot_store
            .lock()
            .expect("snapshot store lock");
        if self.load_record()?.map(|r| r.checkpoint).as_deref() != Some(name) {
            return Err(snap_err(&format!(
                "checkpoint {name} was replaced by a newer snapshot"
            )));
        }
        let rows =
            scan_group(&*self.engine, self.group, Some(name), true).map_err(|e| snap_err(&e))?;
        encode_rows(rows)
    }

    /// Writes `ops` behind everything queued before (state rows of earlier applies among
    /// them), synced, and waits for it.
    async fn write_ordered(&self, ops: Vec<LogOp>) -> StResult<()> {
        written(self.submit_ordered(ops)).await
    }

    /// Queues `ops` behind everything queued before, synced; the receiver has the outcome.
    fn submit_ordered(
        &self,
        ops: Vec<LogOp>,
    ) -> tokio::sync::oneshot::Receiver<std::io::Result<()>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.engine.submit(LogJob {
            ops,
            durability: Durability::Synced,
            done: Box::new(move |r| {
                let _ = tx.send(r);
            }),
        });
        rx
    }
}

/// The outcome of a job queued with [`StateMachineStore::submit_ordered`].
async fn written(rx: tokio::sync::oneshot::Receiver<std::io::Result<()>>) -> StResult<()> {
    match rx.await {
        Ok(r) => r.map_err(|e| sm_err(&e)),
        Err(_) => Err(sm_err(&std::io::Error::other("log writer stopped"))),
    }
}

/// Clears [`SharedState::installing`] however an install ends.
struct Installing<'a>(&'a SharedState);

impl Drop for Installing<'_> {
    fn drop(&mut self) {
        self.0.installing.store(false, Ordering::Release);
    }
}

fn encode_rows(rows: Vec<Row>) -> StResult<Vec<u8>> {
    let rows = rows
        .into_iter()
        .map(|(t, k, v)| {
            (
                t,
                serde_bytes::ByteBuf::from(k),
                serde_bytes::ByteBuf::from(v),
            )
        })
        .collect();
    bincode::serialize(&SnapshotRows { rows }).map_err(|e| sm_err(&e))
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    type SnapshotData = SnapshotData;

    /// A RocksDB checkpoint: the rows are consistent at the applied index their own applied
    /// row names, as each apply writes its rows and that row in one batch.
    async fn build_snapshot(&mut self) -> StResult<Snapshot> {
        // Behind the rows of every apply so far, so the snapshot is as recent as openraft asks.
        self.persist_pending_rows().await?;
        let (meta, checkpoint) = run_blocking(|| self.take_snapshot())?;
        Ok(Snapshot {
            meta,
            snapshot: SnapshotData::InCheckpoint {
                store: self.clone(),
                checkpoint,
            },
        })
    }
}

impl StateMachineStore {
    /// Applies `entries` in order: one result list per entry, and one batch of state rows.
    pub fn apply_entries(&self, entries: Vec<Entry>) -> StResult<Vec<Vec<OpResult>>> {
        let mut results = Vec::new();
        let mut woken: Vec<QueueKey> = Vec::new();
        {
            let mut state = self.shared.state.write().expect("state lock");
            let mut applied = self.shared.applied.write().expect("applied lock");
            let mut unwritten = self.shared.unwritten.lock().expect("unwritten lock");
            for entry in entries {
                applied.0 = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => results.push(Vec::new()),
                    EntryPayload::Normal(batch) => {
                        let mut out = Vec::with_capacity(batch.commands.len());
                        for cmd in batch.commands {
                            if let Op::RewindQueue { key, .. } = &cmd.op {
                                woken.push(key.clone());
                            }
                            unwritten.0 += 1;
                            unwritten.1 += body_bytes(&cmd.op);
                            out.push(state.apply_owned(cmd));
                        }
                        woken.append(&mut state.woken.0);
                        results.push(out);
                    }
                    EntryPayload::Membership(m) => {
                        applied.1 = StoredMembership::new(Some(entry.log_id), m);
                        results.push(Vec::new());
                    }
                }
            }
            if unwritten.0 >= ROWS_EVERY_COMMANDS || unwritten.1 >= ROWS_EVERY_BODY_BYTES {
                self.write_rows(&mut state, &applied, &mut unwritten)?;
            }
        }
        for key in woken {
            self.shared.notifier.wake(&key);
        }
        Ok(results)
    }

    /// Fills in the bodies of `messages`, just received from queue `key`, that are only in the
    /// rows. A message whose row is gone (it expired or its queue was deleted since the
    /// receive) is left out.
    pub fn read_bodies(&self, key: &QueueKey, messages: &mut Vec<Delivered>) -> StResult<()> {
        if !messages.iter().any(|m| m.body_in_rows) {
            return Ok(());
        }
        // Inline on a current-thread runtime (the simulation's, which must replay exactly).
        run_blocking(|| {
            let mut failed = None;
            messages.retain_mut(|m| {
                if !m.body_in_rows || failed.is_some() {
                    return true;
                }
                match body_row(&*self.engine, self.group, key, m.seq) {
                    Ok(Some(body)) => {
                        m.body = body;
                        m.body_in_rows = false;
                        true
                    }
                    Ok(None) => false,
                    Err(e) => {
                        failed = Some(e);
                        true
                    }
                }
            });
            failed.map_or(Ok(()), Err)
        })
    }

    /// Writes the rows changed since they were last written, if any (a snapshot does this
    /// first; so may a graceful stop, to shorten the next start's replay).
    pub fn write_pending_rows(&self) -> StResult<()> {
        let mut state = self.shared.state.write().expect("state lock");
        let applied = self.shared.applied.read().expect("applied lock");
        let mut unwritten = self.shared.unwritten.lock().expect("unwritten lock");
        self.write_rows(&mut state, &applied, &mut unwritten)
    }

    /// [`write_pending_rows`](Self::write_pending_rows), and waits until they are written.
    pub async fn persist_pending_rows(&self) -> StResult<()> {
        self.write_pending_rows()?;
        self.write_ordered(Vec::new()).await
    }

    /// The rows changed since the last write and the applied row, in one batch: rows on disk are
    /// always a state at the index they name. Unlogged: the log is what is durable; the rows
    /// reach disk with the next flush, and after a crash the log is re-applied from the index
    /// the flushed rows name.
    fn write_rows(
        &self,
        state: &mut GroupState,
        applied: &Applied,
        unwritten: &mut (u64, u64),
    ) -> StResult<()> {
        if self.shared.installing.load(Ordering::Acquire) {
            // Being replaced by an installed snapshot, whose rows are queued already.
            return Ok(());
        }
        // No range deletion covers the applied row (they are all of messages), so it may go
        // first.
        let mut rows = vec![RowOp::Put(
            Table::Group,
            applied_key(self.group),
            bincode::serialize(applied).map_err(|e| sm_err(&e))?.into(),
        )];
        let mut eviction = self.shared.eviction.lock().expect("eviction lock");
        eviction.evict_written(state);
        let mut bodies = Vec::new();
        let body_bytes = state.drain_changes_noting_bodies(&mut rows, &mut bodies);
        *unwritten = (0, 0);
        let number = eviction.next;
        eviction.next += 1;
        if !bodies.is_empty() {
            let count: usize = bodies.iter().map(|(_, seqs)| seqs.len()).sum();
            let bytes = body_bytes + count as u64 * PENDING_OVERHEAD;
            eviction.pending_bytes += bytes;
            eviction.pending.push_back((number, bytes, bodies));
        }
        let done = eviction.done.clone();
        let ops: Vec<LogOp> = rows.into_iter().map(to_log_op).collect();
        self.engine.submit(LogJob {
            ops,
            durability: Durability::Unlogged,
            done: Box::new(move |r| match r {
                // The writer completes jobs in submission order, so this is the next number
                // unless an earlier write failed.
                Ok(()) => {
                    let _ = done.compare_exchange(
                        number - 1,
                        number,
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    );
                }
                Err(e) => tracing::error!("writing state rows: {e}"),
            }),
        });
        Ok(())
    }
}

/// Bytes of message bodies `op` brings into the state.
fn body_bytes(op: &Op) -> u64 {
    let total: usize = match op {
        Op::Send { bodies, .. } => bodies.iter().map(|b| b.len()).sum(),
        Op::Publish { bodies, .. } => bodies.iter().map(Vec::len).sum(),
        Op::Transfers { items, .. } => items.iter().map(|i| i.body.len()).sum(),
        _ => 0,
    };
    total as u64
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> StResult<(Option<LogId>, Membership)> {
        Ok(self.shared.applied.read().expect("applied lock").clone())
    }

    async fn apply<S>(&mut self, mut entries: S) -> StResult<()>
    where
        S: Stream<Item = Result<EntryResponder<TypeConfig>, std::io::Error>> + Unpin + OptionalSend,
    {
        // openraft hands over the committed entries it has; applied as one batch (one write of
        // state rows), then each client answered.
        let mut batch = Vec::new();
        let mut responders = Vec::new();
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            batch.push(entry);
            responders.push(responder);
        }
        let results = self.apply_entries(batch)?;
        for (responder, result) in responders.into_iter().zip(results) {
            if let Some(r) = responder {
                r.send(result);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotData,
    ) -> StResult<()> {
        let data = run_blocking(|| snapshot.into_encoded())?;
        let SnapshotRows { rows } = bincode::deserialize(&data).map_err(|e| sm_err(&e))?;
        let (from, to) = group_rows(self.group);
        let applied_key = applied_key(self.group);
        let mut rows: Vec<Row> = rows
            .into_iter()
            .map(|(t, k, v)| (t, k.into_vec(), v.into_vec()))
            .filter(|(t, k, _)| !(*t == Table::Group && *k == applied_key))
            .collect();
        if let Some((_, k, _)) = rows.iter().find(|(_, k, _)| *k < from || *k >= to) {
            return Err(sm_err(&std::io::Error::other(format!(
                "snapshot for group {} holds a row of another group: {}",
                self.group,
                hex::encode(k)
            ))));
        }
        let applied: Applied = (meta.last_log_id, meta.last_membership.clone());
        rows.push((
            Table::Group,
            applied_key,
            bincode::serialize(&applied).map_err(|e| sm_err(&e))?,
        ));
        rows.sort();
        // Parsed before anything is replaced: a bad snapshot leaves the group as it was.
        let (state, _) = state_of_rows(self.group, self.data_groups, &rows, &self.engine)?;
        let mut ops: Vec<LogOp> = TABLES
            .iter()
            .map(|&t| LogOp::DeleteRange {
                cf: cf_of(t),
                from: from.clone(),
                to: to.clone(),
            })
            .collect();
        ops.extend(rows.into_iter().map(|(table, key, value)| LogOp::Put {
            cf: cf_of(table),
            key,
            value: value.into(),
        }));
        let queued = {
            // Under the state lock, which every write of rows holds: none of the replaced
            // state's can be queued after these.
            let _state = self.shared.state.write().expect("state lock");
            self.shared.installing.store(true, Ordering::Release);
            self.submit_ordered(ops)
        };
        let installing = Installing(&self.shared);
        written(queued).await?;
        {
            // Both under their locks at once (state, then applied, as everywhere): a reader
            // must never pair the new state with the old applied index.
            let mut s = self.shared.state.write().expect("state lock");
            let mut a = self.shared.applied.write().expect("applied lock");
            *s = state;
            *a = applied;
            // What the replaced state had not written is gone with it, and its bodies are
            // all in the rows just written.
            *self.shared.unwritten.lock().expect("unwritten lock") = (0, 0);
            let mut eviction = self.shared.eviction.lock().expect("eviction lock");
            eviction.pending.clear();
            eviction.pending_bytes = 0;
        }
        drop(installing);
        // This node's own checkpoint of what it installed, to serve as its current snapshot.
        run_blocking(|| self.take_snapshot())?;
        self.shared
            .snapshots_installed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StResult<Option<Snapshot>> {
        // Only the record, one point read: the rows are read if and when the snapshot is sent.
        let stored = run_blocking(|| self.load_record())?;
        Ok(stored.map(|stored| Snapshot {
            meta: stored.meta,
            snapshot: SnapshotData::InCheckpoint {
                store: self.clone(),
                checkpoint: stored.checkpoint,
            },
        }))
    }
}

#[cfg(test)]
mod tests {
    use meridian_api::limits::QueueAttributes;
    use openraft::EntryPayload;

    use bytes::Bytes;

    use super::*;
    use crate::command::{Command, CommandBatch, Receipt};
    use crate::storage::Engine;

    const T0: i64 = 1_700_000_000_000;

    fn entry(index: u64, ops: Vec<Op>) -> Entry {
        Entry {
            log_id: LogId::new_term_index(1, index),
            payload: EntryPayload::Normal(CommandBatch {
                commands: ops
                    .into_iter()
                    .map(|op| Command {
                        now_ms: T0 + index as i64,
                        op,
                    })
                    .collect(),
            }),
        }
    }

    fn key() -> QueueKey {
        QueueKey::new("", "q")
    }

    fn create(name: &str, attrs: QueueAttributes) -> Op {
        Op::CreateQueue {
            tenant: "".into(),
            name: name.into(),
            attrs,
        }
    }

    fn send(n: usize) -> Op {
        Op::Send {
            key: key(),
            bodies: (0..n).map(|i| format!("body {i}").into()).collect(),
            delay_seconds: 0,
        }
    }

    /// A snapshot of everything applied so far (rows are written behind the apply; a build
    /// takes whatever is written by then, so this first waits for the writer).
    async fn build(sm: &mut StateMachineStore) -> Snapshot {
        sm.write_ordered(Vec::new()).await.unwrap();
        sm.get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap()
    }

    /// A state machine that keeps no written body in memory.
    fn open(dir: &std::path::Path) -> (Arc<dyn StorageEngine>, StateMachineStore) {
        open_caching(dir, 0)
    }

    fn open_caching(
        dir: &std::path::Path,
        cached_bodies: u64,
    ) -> (Arc<dyn StorageEngine>, StateMachineStore) {
        let engine: Arc<dyn StorageEngine> = Arc::new(Engine::open_unreserved(dir).unwrap());
        let sm = StateMachineStore::open(1, 1, engine.clone(), cached_bodies).unwrap();
        (engine, sm)
    }

    /// The applied index the group's rows (memtable included) name; 0 before any.
    fn written_index(engine: &Arc<dyn StorageEngine>) -> u64 {
        let rows = scan_group(&**engine, 1, None, true).unwrap();
        applied_of_rows(1, &rows).unwrap().0.map_or(0, |l| l.index)
    }

    #[tokio::test]
    async fn rows_are_written_once_enough_has_changed_or_when_asked() {
        let a = tempfile::tempdir().unwrap();
        let (engine, sm) = open(a.path());
        let create = create("q", QueueAttributes::default());
        sm.apply_entries(vec![entry(1, vec![create]), entry(2, vec![send(3)])])
            .unwrap();
        sm.write_ordered(Vec::new()).await.unwrap();
        assert_eq!(written_index(&engine), 0, "two commands: nothing written");

        let enough = (1..ROWS_EVERY_COMMANDS).map(|_| send(1)).collect();
        sm.apply_entries(vec![entry(3, enough)]).unwrap();
        sm.write_ordered(Vec::new()).await.unwrap();
        assert_eq!(written_index(&engine), 3, "the count reached: written");

        let big = Op::Send {
            key: key(),
            bodies: vec![vec![7; ROWS_EVERY_BODY_BYTES as usize / 2].into(); 2],
            delay_seconds: 0,
        };
        sm.apply_entries(vec![entry(4, vec![send(1)]), entry(5, vec![big])])
            .unwrap();
        sm.write_ordered(Vec::new()).await.unwrap();
        assert_eq!(written_index(&engine), 5, "the bytes reached: written");

        sm.apply_entries(vec![entry(6, vec![send(1)])]).unwrap();
        sm.write_ordered(Vec::new()).await.unwrap();
        assert_eq!(written_index(&engine), 5);
        sm.persist_pending_rows().await.unwrap();
        assert_eq!(written_index(&engine), 6, "asked: written");
        // What is written is the state in memory.
        let before = sm.shared.digest();
        drop((sm, engine));
        let (_engine, sm) = open(a.path());
        assert_eq!(sm.shared.digest(), before);
    }

    /// The bodies of `key`'s messages that are still in memory, by sequence number.
    fn bodies_in_memory(sm: &StateMachineStore, key: &QueueKey) -> Vec<(u64, Option<Bytes>)> {
        let state = sm.shared.state.read().unwrap();
        state.queues[key]
            .messages
            .iter()
            .map(|(&seq, m)| (seq, m.body.clone()))
            .collect()
    }

    #[tokio::test]
    async fn bodies_leave_memory_once_written_and_are_read_from_the_rows() {
        let a = tempfile::tempdir().unwrap();
        let (_engine, sm) = open(a.path());
        let dlq = QueueKey::new("", "dlq");
        let attrs = QueueAttributes {
            dead_letter_policy: Some(meridian_api::limits::DeadLetterPolicy {
                dead_letter_queue: "dlq".into(),
                policy: meridian_api::limits::DeadLetterTrigger::MaxReceiveCount(1),
            }),
            ..Default::default()
        };
        sm.apply_entries(vec![
            entry(1, vec![create("dlq", QueueAttributes::default())]),
            entry(2, vec![create("q", attrs)]),
            entry(3, vec![send(3)]),
        ])
        .unwrap();
        // Written once: the bodies are in the rows, but that write is not known done yet.
        sm.persist_pending_rows().await.unwrap();
        assert!(bodies_in_memory(&sm, &key())
            .iter()
            .all(|(_, b)| b.is_some()));
        // The next write finds the first done and drops its bodies.
        sm.apply_entries(vec![entry(4, vec![send(1)])]).unwrap();
        sm.persist_pending_rows().await.unwrap();
        let bodies = bodies_in_memory(&sm, &key());
        assert_eq!(
            bodies.iter().map(|(_, b)| b.is_some()).collect::<Vec<_>>(),
            [false, false, false, true],
            "{bodies:?}"
        );
        assert_eq!(sm.shared.bodies_evicted(), 3);

        // A receive names the bodies in the rows; the leader answering it reads them.
        let results = sm
            .apply_entries(vec![entry(5, vec![Op::Receive { key: key(), max: 2 }])])
            .unwrap();
        let OpResult::Received { messages, .. } = &results[0][0] else {
            panic!("{results:?}");
        };
        let mut messages = messages.clone();
        assert!(messages.iter().all(|m| m.body_in_rows && m.body.is_empty()));
        sm.read_bodies(&key(), &mut messages).unwrap();
        let read: Vec<&[u8]> = messages.iter().map(|m| m.body.as_slice()).collect();
        assert_eq!(read, [b"body 0".as_slice(), b"body 1"]);
        assert!(messages.iter().all(|m| !m.body_in_rows));

        // Visible again after the visibility timeout, received once already: the next receive
        // moves both to the dead-letter queue, which gets their bodies from the rows.
        let later = 5 + i64::from(QueueAttributes::default().visibility_timeout) as u64 * 1000;
        let results = sm
            .apply_entries(vec![entry(
                later,
                vec![Op::Receive {
                    key: dlq.clone(),
                    max: 16,
                }],
            )])
            .unwrap();
        assert!(
            matches!(&results[0][0], OpResult::Received { messages, .. } if messages.is_empty()),
            "moved by the source queue's housekeeping, not yet: {results:?}"
        );
        let results = sm
            .apply_entries(vec![
                entry(
                    later + 1,
                    vec![Op::Receive {
                        key: key(),
                        max: 16,
                    }],
                ),
                entry(
                    later + 2,
                    vec![Op::Receive {
                        key: dlq.clone(),
                        max: 16,
                    }],
                ),
            ])
            .unwrap();
        let OpResult::Received { messages, .. } = &results[1][0] else {
            panic!("{results:?}");
        };
        let moved: Vec<&[u8]> = messages.iter().map(|m| m.body.as_slice()).collect();
        assert_eq!(moved, [b"body 0".as_slice(), b"body 1"]);

        // A row gone by the time the leader reads it (the queue deleted since): left out.
        let mut gone = vec![Delivered {
            body_in_rows: true,
            seq: 999,
            ..messages[0].clone()
        }];
        sm.read_bodies(&key(), &mut gone).unwrap();
        assert!(gone.is_empty());
    }

    #[tokio::test]
    async fn the_most_recently_written_bodies_stay_in_memory_up_to_the_cache() {
        let a = tempfile::tempdir().unwrap();
        // Exactly the three 6-byte bodies of the first write, and their bookkeeping.
        let (_engine, sm) = open_caching(a.path(), 3 * (6 + PENDING_OVERHEAD));
        let create = create("q", QueueAttributes::default());
        sm.apply_entries(vec![entry(1, vec![create]), entry(2, vec![send(3)])])
            .unwrap();
        sm.persist_pending_rows().await.unwrap();
        sm.apply_entries(vec![entry(3, vec![send(1)])]).unwrap();
        sm.persist_pending_rows().await.unwrap();
        let in_memory = |sm: &StateMachineStore| {
            bodies_in_memory(sm, &key())
                .iter()
                .map(|(_, b)| b.is_some())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            in_memory(&sm),
            [true; 4],
            "the cache's worth written before: all cached"
        );
        // More written since: the oldest write goes, the newest stays.
        sm.persist_pending_rows().await.unwrap();
        assert_eq!(in_memory(&sm), [false, false, false, true]);
        assert_eq!(sm.shared.bodies_evicted(), 3);
    }

    #[tokio::test]
    async fn rows_survive_restarts_and_snapshots_are_checkpoints_a_follower_installs() {
        let a = tempfile::tempdir().unwrap();
        let (engine, mut sm) = open(a.path());
        let results = sm
            .apply_entries(vec![
                entry(1, vec![create("q", QueueAttributes::default())]),
                entry(2, vec![send(10)]),
                entry(3, vec![Op::Receive { key: key(), max: 3 }]),
            ])
            .unwrap();
        let OpResult::Received { messages, .. } = &results[2][0] else {
            panic!("{results:?}");
        };
        let receipts = vec![Receipt {
            seq: messages[0].seq,
            generation: messages[0].dequeue_count,
        }];
        sm.apply_entries(vec![entry(
            4,
            vec![Op::Delete {
                key: key(),
                receipts,
            }],
        )])
        .unwrap();

        let first = build(&mut sm).await;
        assert_eq!(first.meta.last_log_id.map(|l| l.index), Some(4));
        assert_eq!(engine.checkpoints().unwrap(), ["g1-1"]);
        // A real RocksDB checkpoint: table files of its own (hard links), openable on its own.
        let listing: Vec<String> = std::fs::read_dir(a.path().join("checkpoints/g1-1"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        let tables = listing.iter().filter(|n| n.ends_with(".sst")).count();
        assert!(tables > 0, "{listing:?}");

        sm.apply_entries(vec![entry(5, vec![send(5)])]).unwrap();
        let second = build(&mut sm).await;
        // A built snapshot names its checkpoint; the rows are read only when sent, and one a
        // newer snapshot replaced cannot be read (openraft then sends the newer one).
        assert!(format!("{:?}", second.snapshot).contains("g1-2"));
        let replaced = first.snapshot.into_encoded().unwrap_err().to_string();
        assert!(replaced.contains("replaced"), "{replaced}");
        assert_eq!(second.meta.last_log_id.map(|l| l.index), Some(5));
        // A snapshot handle holds the store (and so the engine) open.
        let Snapshot {
            meta: second,
            snapshot,
        } = second;
        drop(snapshot);
        assert_eq!(
            engine.checkpoints().unwrap(),
            ["g1-2"],
            "the older checkpoint is dropped"
        );

        sm.apply_entries(vec![entry(6, vec![send(1)])]).unwrap();
        sm.persist_pending_rows().await.unwrap();
        let before = sm.shared.digest();
        assert_eq!(before.0, 6);
        // A checkpoint nothing records (a crash right after making it) goes at the next open.
        engine.checkpoint("g1-77").unwrap();
        drop((sm, engine));

        let (engine, mut sm) = open(a.path());
        assert_eq!(
            sm.shared.digest(),
            before,
            "the rows hold the applied state"
        );
        assert_eq!(engine.checkpoints().unwrap(), ["g1-2"]);
        let current = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, second);

        // A follower installs it, and has the state at index 5 and a checkpoint of its own.
        let b = tempfile::tempdir().unwrap();
        let (engine_b, mut follower) = open(b.path());
        follower
            .install_snapshot(&current.meta, current.snapshot)
            .await
            .unwrap();
        let installed = follower.shared.digest();
        assert_eq!(installed.0, 5);
        assert_eq!(engine_b.checkpoints().unwrap(), ["g1-1"]);
        // The leader at index 5 (its own snapshot, restored) has the same state.
        let c = tempfile::tempdir().unwrap();
        let (_engine_c, mut replay) = open(c.path());
        let again = sm.get_current_snapshot().await.unwrap().unwrap();
        replay
            .install_snapshot(&again.meta, again.snapshot)
            .await
            .unwrap();
        assert_eq!(replay.shared.digest(), installed);

        // Garbage is refused and changes nothing.
        let bad = SnapshotData::Encoded(b"not a snapshot".to_vec());
        assert!(follower.install_snapshot(&current.meta, bad).await.is_err());
        assert_eq!(follower.shared.digest(), installed);
        drop((follower, engine_b));
        let (_engine_b, follower) = open(b.path());
        assert_eq!(
            follower.shared.digest(),
            installed,
            "the install is durable"
        );
        drop(engine);
    }
}
