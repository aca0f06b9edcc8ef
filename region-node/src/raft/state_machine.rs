//! The state machine of one group: the in-memory [`GroupState`] plus its snapshot in RocksDB.
//!
//! Applying never reads the clock: each command carries the leader's time. The state lives in
//! memory; on restart it is rebuilt from the last snapshot plus the committed log, which is why
//! logs are only purged after a snapshot that covers them is stored.

use std::collections::HashMap;
use std::io::Cursor;
use std::sync::{Arc, Mutex, RwLock};

use openraft::storage::RaftStateMachine;
use openraft::{
    EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::{NodeId, TypeConfig};
use crate::command::{Op, OpResult, QueueKey};
use crate::queue::GroupState;
use crate::storage::{group_key, LogOp, StorageEngine, CF_SNAPSHOT};

const KEY_SNAPSHOT: &[u8] = b"snapshot";

type StResult<T> = Result<T, StorageError<NodeId>>;
type Membership = StoredMembership<NodeId, openraft::BasicNode>;

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
    pub applied: RwLock<(Option<LogId<NodeId>>, Membership)>,
    pub notifier: QueueNotifier,
    /// Snapshots installed from a leader since start.
    pub snapshots_installed: std::sync::atomic::AtomicU64,
    /// Serialises snapshot writes.
    snapshot_store: Mutex<()>,
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

    /// The index of the last entry applied (0 before any).
    pub fn applied_index(&self) -> u64 {
        let applied = self.applied.read().expect("applied lock");
        applied.0.map_or(0, |l| l.index)
    }
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    data: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct SnapshotBody {
    last_applied: Option<LogId<NodeId>>,
    membership: Membership,
    state: GroupState,
}

#[derive(Clone)]
pub struct StateMachineStore {
    group: u32,
    engine: Arc<dyn StorageEngine>,
    pub shared: Arc<SharedState>,
}

fn sm_err(e: &(impl std::error::Error + 'static)) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(e).into()
}

impl StateMachineStore {
    /// Opens the group's state machine, restoring the stored snapshot if there is one.
    pub fn open(group: u32, data_groups: u32, engine: Arc<dyn StorageEngine>) -> StResult<Self> {
        let mut state = GroupState::new(group, data_groups);
        let mut applied = (None, Membership::default());
        if let Some(stored) = Self::load_snapshot(group, engine.as_ref())? {
            let body: SnapshotBody = bincode::deserialize(&stored.data).map_err(|e| sm_err(&e))?;
            state = body.state;
            applied = (body.last_applied, body.membership);
        }
        Ok(Self {
            group,
            engine,
            shared: Arc::new(SharedState {
                state: RwLock::new(state),
                applied: RwLock::new(applied),
                notifier: QueueNotifier::default(),
                snapshots_installed: Default::default(),
                snapshot_store: Mutex::new(()),
            }),
        })
    }

    fn load_snapshot(group: u32, engine: &dyn StorageEngine) -> StResult<Option<StoredSnapshot>> {
        let raw = engine
            .get(CF_SNAPSHOT, &group_key(group, KEY_SNAPSHOT))
            .map_err(|e| StorageError::from(StorageIOError::read_snapshot(None, &e)))?;
        raw.map(|v| bincode::deserialize(&v).map_err(|e| sm_err(&e)))
            .transpose()
    }

    /// Stores `stored` unless a newer snapshot is already stored (a slow build racing an
    /// install must not replace it: logs up to the newer one may already be purged).
    fn store_snapshot(&self, stored: &StoredSnapshot) -> StResult<()> {
        let _serial = self
            .shared
            .snapshot_store
            .lock()
            .expect("snapshot store lock");
        if let Some(current) = Self::load_snapshot(self.group, self.engine.as_ref())? {
            if current.meta.last_log_id > stored.meta.last_log_id {
                return Ok(());
            }
        }
        let value = bincode::serialize(stored).map_err(|e| sm_err(&e))?;
        let op = LogOp::Put {
            cf: CF_SNAPSHOT,
            key: group_key(self.group, KEY_SNAPSHOT),
            value,
        };
        // Synced: logs up to this snapshot may be purged right after.
        self.engine.write(vec![op], true).map_err(|e| sm_err(&e))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> StResult<Snapshot<TypeConfig>> {
        let (data, last_applied, membership) = {
            let state = self.shared.state.read().expect("state lock");
            let applied = self.shared.applied.read().expect("applied lock");
            let body = SnapshotBody {
                last_applied: applied.0,
                membership: applied.1.clone(),
                state: state.clone(),
            };
            (
                bincode::serialize(&body).map_err(|e| sm_err(&e))?,
                applied.0,
                applied.1.clone(),
            )
        };
        let snapshot_id = match last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, self.group),
            None => format!("empty-{}", self.group),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        self.store_snapshot(&stored)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> StResult<(Option<LogId<NodeId>>, Membership)> {
        Ok(self.shared.applied.read().expect("applied lock").clone())
    }

    async fn apply<I>(&mut self, entries: I) -> StResult<Vec<Vec<OpResult>>>
    where
        I: IntoIterator<Item = openraft::Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut results = Vec::new();
        let mut woken: Vec<QueueKey> = Vec::new();
        {
            let mut state = self.shared.state.write().expect("state lock");
            let mut applied = self.shared.applied.write().expect("applied lock");
            for entry in entries {
                applied.0 = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => results.push(Vec::new()),
                    EntryPayload::Normal(batch) => {
                        let mut out = Vec::with_capacity(batch.commands.len());
                        for cmd in &batch.commands {
                            if let Op::RewindQueue { key, .. } = &cmd.op {
                                woken.push(key.clone());
                            }
                            out.push(state.apply(cmd));
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
        }
        for key in woken {
            self.shared.notifier.wake(&key);
        }
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StResult<()> {
        let data = snapshot.into_inner();
        let body: SnapshotBody = bincode::deserialize(&data).map_err(|e| sm_err(&e))?;
        self.store_snapshot(&StoredSnapshot {
            meta: meta.clone(),
            data,
        })?;
        // Both under their locks at once (state, then applied, as everywhere): a snapshot build
        // must never pair the new state with the old applied index.
        let mut state = self.shared.state.write().expect("state lock");
        let mut applied = self.shared.applied.write().expect("applied lock");
        *state = body.state;
        *applied = (meta.last_log_id, meta.last_membership.clone());
        drop(applied);
        drop(state);
        self.shared
            .snapshots_installed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StResult<Option<Snapshot<TypeConfig>>> {
        Ok(
            Self::load_snapshot(self.group, self.engine.as_ref())?.map(|s| Snapshot {
                meta: s.meta,
                snapshot: Box::new(Cursor::new(s.data)),
            }),
        )
    }
}
