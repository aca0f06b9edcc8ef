//! openraft's log storage for one group, on the node's shared [`StorageEngine`].
//!
//! Appends, truncations and purges are queued to the engine's log writer (group commit) and
//! return at once. Until the writer has applied them, `pending` serves appended entries and
//! hides entries a queued truncation removes, so readers always see the log openraft expects.
//!
//! Written entries stay in memory a while (`recent`, bounded by bytes): right after an append,
//! openraft reads the same entries again to replicate them and to apply them once committed,
//! and serving those from storage (RocksDB then: seek, copy, decode) cost a leader ~5 % of its
//! CPU.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};

use super::engine::{Durability, LogJob, LogOp, StorageEngine, CF_LOG, CF_META};
use super::group_key;
use crate::raft::{Entry, LogId, TypeConfig, Vote};

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_PURGED: &[u8] = b"purged";

/// Most bytes (encoded) of written entries kept in memory for readers.
const RECENT_BYTES: usize = 32 << 20;

/// The part of the log not yet written, and a copy of its newest written entries.
#[derive(Default)]
struct Pending {
    /// Appended entries the writer has not written yet.
    entries: BTreeMap<u64, Entry>,
    /// Queued truncations (index → count): stored entries at or above the lowest are stale.
    truncations: BTreeMap<u64, usize>,
    /// Written entries with their encoded size: always the newest ones, so together with
    /// `entries` a contiguous tail of the log.
    recent: BTreeMap<u64, (Entry, usize)>,
    recent_bytes: usize,
}

impl Pending {
    fn hidden_from(&self) -> Option<u64> {
        self.truncations.keys().next().copied()
    }

    /// The lowest index from which every entry up to the last is in memory, if any is.
    fn memory_from(&self) -> Option<u64> {
        // `recent` holds the older written part, `entries` the newer pending one.
        let mut keys = self.recent.keys().chain(self.entries.keys());
        let first = *keys.next()?;
        let last = keys.next_back().map_or(first, |&l| l);
        let held = (self.recent.len() + self.entries.len()) as u64;
        // Contiguous by construction; checked, because a gap would make readers skip entries.
        (last - first + 1 == held).then_some(first)
    }

    /// Moves a written entry from `entries` to `recent`, unless a truncate-and-reappend has
    /// replaced it meanwhile (then the newer one stays pending).
    fn written(&mut self, id: LogId, size: usize) {
        if self.entries.get(&id.index).map(|e| e.log_id) != Some(id) {
            return;
        }
        if let Some(e) = self.entries.remove(&id.index) {
            self.recent.insert(id.index, (e, size));
            self.recent_bytes += size;
        }
        while self.recent_bytes > RECENT_BYTES {
            match self.recent.pop_first() {
                Some((_, (_, size))) => self.recent_bytes -= size,
                None => break,
            }
        }
    }

    /// Forgets entries at or above `index` (a truncation).
    fn drop_from(&mut self, index: u64) {
        self.entries.split_off(&index);
        for (_, (_, size)) in self.recent.split_off(&index) {
            self.recent_bytes -= size;
        }
    }

    /// Forgets written entries at or below `index` (a purge).
    fn drop_through(&mut self, index: u64) {
        let kept = self.recent.split_off(&(index + 1));
        for (_, (_, size)) in std::mem::replace(&mut self.recent, kept) {
            self.recent_bytes -= size;
        }
    }
}

#[derive(Clone)]
pub struct LogStore {
    group: u32,
    engine: Arc<dyn StorageEngine>,
    pending: Arc<Mutex<Pending>>,
    /// Bytes of entries appended (encoded) since the node last reset it, to snapshot by
    /// size as well as by count.
    appended_bytes: Arc<AtomicU64>,
}

type StResult<T> = Result<T, std::io::Error>;

impl LogStore {
    pub fn new(group: u32, engine: Arc<dyn StorageEngine>) -> Self {
        Self {
            group,
            engine,
            pending: Arc::default(),
            appended_bytes: Arc::default(),
        }
    }

    /// The count of bytes appended, shared: the node resets it when it asks for a snapshot.
    pub fn appended_bytes(&self) -> Arc<AtomicU64> {
        self.appended_bytes.clone()
    }

    fn log_key(&self, index: u64) -> Vec<u8> {
        group_key(self.group, &index.to_be_bytes())
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> StResult<Option<T>> {
        match self.engine.get(CF_META, &group_key(self.group, key)) {
            Ok(Some(v)) => bincode::deserialize(&v).map(Some).map_err(|e| read_err(&e)),
            Ok(None) => Ok(None),
            Err(e) => Err(read_err(&e)),
        }
    }

    fn put_meta<T: serde::Serialize>(&self, key: &[u8], v: &T, sync: bool) -> StResult<()> {
        let value = bincode::serialize(v).map_err(|e| write_err(&e))?;
        let op = LogOp::Put {
            cf: CF_META,
            key: group_key(self.group, key),
            value: value.into(),
        };
        self.engine.write(vec![op], sync).map_err(|e| write_err(&e))
    }

    /// Stored entries in `[start, end)` (end exclusive, `None` unbounded), in order.
    fn stored(&self, start: u64, end: Option<u64>) -> StResult<Vec<Entry>> {
        let to = match end {
            Some(e) => self.log_key(e),
            None => group_key(self.group + 1, &[]),
        };
        self.engine
            .scan(CF_LOG, &self.log_key(start), &to)
            .map_err(|e| read_err(&e))?
            .into_iter()
            .map(|(_, v)| bincode::deserialize(&v).map_err(|e| read_err(&e)))
            .collect()
    }

    fn last_stored_below(&self, limit: Option<u64>) -> StResult<Option<LogId>> {
        let to = match limit {
            Some(0) => return Ok(None),
            Some(l) => self.log_key(l),
            None => group_key(self.group + 1, &[]),
        };
        match self
            .engine
            .last_in(CF_LOG, &self.log_key(0), &to)
            .map_err(|e| read_err(&e))?
        {
            Some((_, v)) => {
                let e: Entry = bincode::deserialize(&v).map_err(|e| read_err(&e))?;
                Ok(Some(e.log_id))
            }
            None => Ok(None),
        }
    }
}

fn read_err(e: &impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("reading the raft log: {e}"))
}

fn write_err(e: &impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("writing the raft log: {e}"))
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StResult<Vec<Entry>> {
        let start = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&i) => Some(i.saturating_add(1)),
            Bound::Excluded(&i) => Some(i),
            Bound::Unbounded => None,
        };
        // Memory first, then storage: an entry the writer stores in between is then seen in
        // one of the two.
        let (mut merged, stored_end) = {
            let p = self.pending.lock().expect("pending lock");
            // Pending last: it is the newer of the two.
            let mut m: BTreeMap<u64, Entry> = p
                .recent
                .range(range.clone())
                .map(|(&i, (e, _))| (i, e.clone()))
                .collect();
            m.extend(p.entries.range(range.clone()).map(|(&i, e)| (i, e.clone())));
            let memory_from = p.memory_from();
            if memory_from.is_some_and(|from| from <= start) {
                return Ok(m.into_values().collect());
            }
            // Storage holds the rest below what memory holds, and nothing a queued truncation
            // removes.
            let stored_end = [end, p.hidden_from(), memory_from]
                .into_iter()
                .flatten()
                .min();
            (m, stored_end)
        };
        for e in self.stored(start, stored_end)? {
            let i = e.log_id.index;
            if !range.contains(&i) {
                break;
            }
            merged.entry(i).or_insert(e);
        }
        Ok(merged.into_values().collect())
    }

    async fn read_vote(&mut self) -> StResult<Option<Vote>> {
        self.get_meta(KEY_VOTE)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StResult<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId> = self.get_meta(KEY_PURGED)?;
        let (pending_last, hidden_from) = {
            let p = self.pending.lock().expect("pending lock");
            let last = p.entries.values().next_back().map(|e| e.log_id);
            // `recent` is the newest written entries and truncations cut it too.
            let last = last.or_else(|| p.recent.values().next_back().map(|(e, _)| e.log_id));
            (last, p.hidden_from())
        };
        let last = match pending_last {
            Some(l) => Some(l),
            None => self.last_stored_below(hidden_from)?,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last.or(last_purged_log_id),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> StResult<()> {
        // A vote must survive a crash before it is answered: synced on its own.
        self.put_meta(KEY_VOTE, vote, true)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> StResult<()> {
        // Only a hint for faster re-apply after restart; the next WAL sync persists it. Queued
        // to the log writer, never written here: openraft saves it on every commit, from its
        // core task, and a write of its own would wait in RocksDB's write queue behind the
        // writer's fsync, stalling the node's Raft core (5 % of a leader's samples in W1).
        let value = bincode::serialize(&committed).map_err(|e| write_err(&e))?;
        self.engine.submit(LogJob {
            ops: vec![LogOp::Put {
                cf: CF_META,
                key: group_key(self.group, KEY_COMMITTED),
                value: value.into(),
            }],
            durability: Durability::Logged,
            done: Box::new(|_| {}),
        });
        Ok(())
    }

    async fn read_committed(&mut self) -> StResult<Option<LogId>> {
        let Some(hint) = self.get_meta::<Option<LogId>>(KEY_COMMITTED)?.flatten() else {
            return Ok(None);
        };
        // A leader commits on its followers' acknowledgements, before its own copy is durable,
        // and the hint is written outside the log writer's queue: after a crash it can name an
        // entry this node never stored, or stored from another term. openraft re-applies up to
        // the hint on startup, so trust it only where the local log holds exactly that entry
        // (log matching then vouches for everything below it).
        let local = self.try_get_log_entries(hint.index..=hint.index).await?;
        Ok(local.first().filter(|e| e.log_id == hint).map(|_| hint))
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> StResult<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut ops = Vec::new();
        let mut ids = Vec::new();
        {
            let mut p = self.pending.lock().expect("pending lock");
            for e in entries {
                let value = bincode::serialize(&e).map_err(|e| write_err(&e))?;
                ids.push((e.log_id, value.len()));
                ops.push(LogOp::Put {
                    cf: CF_LOG,
                    key: self.log_key(e.log_id.index),
                    value: value.into(),
                });
                p.entries.insert(e.log_id.index, e);
            }
        }
        let bytes: usize = ids.iter().map(|(_, size)| size).sum();
        self.appended_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
        let pending = self.pending.clone();
        self.engine.submit(LogJob {
            ops,
            durability: Durability::Synced,
            done: Box::new(move |r| {
                if r.is_ok() {
                    let mut p = pending.lock().expect("pending lock");
                    for (id, size) in ids {
                        p.written(id, size);
                    }
                }
                callback.io_completed(r)
            }),
        });
        Ok(())
    }

    async fn truncate_after(&mut self, last: Option<LogId>) -> StResult<()> {
        let index = last.map_or(0, |l| l.index + 1);
        {
            let mut p = self.pending.lock().expect("pending lock");
            p.drop_from(index);
            *p.truncations.entry(index).or_default() += 1;
        }
        let pending = self.pending.clone();
        self.engine.submit(LogJob {
            ops: vec![LogOp::DeleteRange {
                cf: CF_LOG,
                from: self.log_key(index),
                to: self.log_key(u64::MAX),
            }],
            // Not acknowledged by itself: the next append's sync makes it durable, in order.
            durability: Durability::Logged,
            done: Box::new(move |r| {
                if r.is_err() {
                    // Keep hiding the stale tail; the same failed batch failed later appends too.
                    return;
                }
                let mut p = pending.lock().expect("pending lock");
                if let Some(n) = p.truncations.get_mut(&index) {
                    *n -= 1;
                    if *n == 0 {
                        p.truncations.remove(&index);
                    }
                }
            }),
        });
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> StResult<()> {
        self.pending
            .lock()
            .expect("pending lock")
            .drop_through(log_id.index);
        let value = bincode::serialize(&log_id).map_err(|e| write_err(&e))?;
        self.engine.submit(LogJob {
            ops: vec![
                LogOp::Put {
                    cf: CF_META,
                    key: group_key(self.group, KEY_PURGED),
                    value: value.into(),
                },
                LogOp::DeleteRange {
                    cf: CF_LOG,
                    from: self.log_key(0),
                    to: self.log_key(log_id.index + 1),
                },
            ],
            durability: Durability::Logged,
            done: Box::new(|_| {}),
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use openraft::storage::RaftLogStorageExt;
    use openraft::EntryPayload;

    use super::*;
    use crate::storage::Engine;

    fn entry(term: u64, index: u64) -> Entry {
        Entry {
            log_id: LogId::new_term_index(term, index),
            payload: EntryPayload::Blank,
        }
    }

    async fn terms(s: &mut LogStore, from: u64) -> Vec<(u64, u64)> {
        s.try_get_log_entries(from..)
            .await
            .unwrap()
            .into_iter()
            .map(|e| (e.log_id.index, e.log_id.leader_id.term))
            .collect()
    }

    /// Random appends, truncations and purges, each read back (memory, storage or both) and
    /// compared with a model of the log, then once more after reopening.
    #[tokio::test]
    async fn reads_match_a_model_of_the_log_whatever_memory_holds() {
        use rand::{Rng, SeedableRng};
        let dir = tempfile::tempdir().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut model: BTreeMap<u64, u64> = BTreeMap::new();
        let mut purged = 0u64;
        let mut term = 1u64;
        {
            let engine = Arc::new(Engine::open_unreserved(dir.path()).unwrap());
            let mut s = LogStore::new(1, engine);
            for _ in 0..300 {
                let last = model.keys().next_back().copied().unwrap_or(purged);
                match rng.gen_range(0..10) {
                    0 if last > purged + 1 => {
                        let to = rng.gen_range(purged + 1..last);
                        term += 1;
                        s.truncate_after(Some(LogId::new_term_index(model[&to], to)))
                            .await
                            .unwrap();
                        model.split_off(&(to + 1));
                    }
                    1 if last > purged + 2 => {
                        let to = rng.gen_range(purged + 1..last - 1);
                        s.purge(LogId::new_term_index(model[&to], to))
                            .await
                            .unwrap();
                        model = model.split_off(&(to + 1));
                        purged = to;
                    }
                    _ => {
                        let n = rng.gen_range(1..20);
                        let new: Vec<_> = (last + 1..=last + n).map(|i| entry(term, i)).collect();
                        if rng.gen_bool(0.5) {
                            s.blocking_append(new).await.unwrap();
                        } else {
                            // Not waited for: readers must see it from memory at once.
                            s.append(new, IOFlushed::noop()).await.unwrap();
                        }
                        model.extend((last + 1..=last + n).map(|i| (i, term)));
                    }
                }
                let last = model.keys().next_back().copied().unwrap_or(purged);
                let from = rng.gen_range(purged + 1..=last + 1);
                let to = rng.gen_range(from..=last + 2);
                let got: Vec<_> = s
                    .try_get_log_entries(from..to)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|e| (e.log_id.index, e.log_id.leader_id.term))
                    .collect();
                let want: Vec<_> = model.range(from..to).map(|(&i, &t)| (i, t)).collect();
                assert_eq!(got, want, "entries {from}..{to}");
                let st = s.get_log_state().await.unwrap();
                assert_eq!(
                    st.last_log_id.map(|l| l.index),
                    Some(last).filter(|&l| l > 0)
                );
            }
            // Everything written by the last blocking call is durable; flush the rest.
            s.blocking_append([entry(term, model.keys().next_back().unwrap() + 1)])
                .await
                .unwrap();
            let i = *model.keys().next_back().unwrap() + 1;
            model.insert(i, term);
        }
        let engine = Arc::new(Engine::open_unreserved(dir.path()).unwrap());
        let mut s = LogStore::new(1, engine);
        let got = terms(&mut s, 0).await;
        let want: Vec<_> = model.iter().map(|(&i, &t)| (i, t)).collect();
        assert_eq!(got, want, "after reopening");
    }

    /// The committed hint survives a crash that the entry it names did not (a leader commits
    /// before its own write lands): it must then not send openraft re-applying into a hole.
    #[tokio::test]
    async fn a_committed_hint_ahead_of_the_local_log_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let open = || {
            let engine = Arc::new(Engine::open_unreserved(dir.path()).unwrap());
            LogStore::new(1, engine)
        };
        {
            let mut s = open();
            s.blocking_append((1..=4).map(|i| entry(1, i)))
                .await
                .unwrap();
            s.save_committed(Some(LogId::new_term_index(1, 5)))
                .await
                .unwrap();
        }
        assert_eq!(
            open().read_committed().await.unwrap(),
            None,
            "beyond the log"
        );
        {
            let mut s = open();
            s.save_committed(Some(LogId::new_term_index(2, 4)))
                .await
                .unwrap();
        }
        assert_eq!(open().read_committed().await.unwrap(), None, "another term");
        let held = Some(LogId::new_term_index(1, 3));
        open().save_committed(held).await.unwrap();
        assert_eq!(open().read_committed().await.unwrap(), held, "held locally");
        let mut s = open();
        s.purge(LogId::new_term_index(1, 3)).await.unwrap();
        s.blocking_append([entry(1, 5)]).await.unwrap();
        drop(s);
        assert_eq!(open().read_committed().await.unwrap(), None, "purged");
    }

    #[tokio::test]
    async fn append_truncate_reappend_purge_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let engine = Arc::new(Engine::open_unreserved(dir.path()).unwrap());
            let mut s = LogStore::new(1, engine.clone());
            let mut other = LogStore::new(2, engine);
            s.blocking_append((1..=5).map(|i| entry(1, i)))
                .await
                .unwrap();
            other.blocking_append([entry(7, 1)]).await.unwrap();
            assert_eq!(
                terms(&mut s, 0).await,
                (1..=5).map(|i| (i, 1)).collect::<Vec<_>>()
            );

            // Truncate and re-append without waiting: readers never see the stale tail.
            s.truncate_after(Some(LogId::new_term_index(1, 3)))
                .await
                .unwrap();
            assert_eq!(terms(&mut s, 3).await, vec![(3, 1)]);
            s.blocking_append([entry(2, 4)]).await.unwrap();
            assert_eq!(terms(&mut s, 3).await, vec![(3, 1), (4, 2)]);
            let st = s.get_log_state().await.unwrap();
            assert_eq!(
                st.last_log_id.map(|l| (l.index, l.leader_id.term)),
                Some((4, 2))
            );

            s.purge(LogId::new_term_index(1, 2)).await.unwrap();
            s.blocking_append([entry(2, 5)]).await.unwrap();
            assert_eq!(terms(&mut s, 0).await, vec![(3, 1), (4, 2), (5, 2)]);
            assert_eq!(
                terms(&mut other, 0).await,
                vec![(1, 7)],
                "groups are separate"
            );
        }
        // Everything acknowledged is there after reopening.
        let engine = Arc::new(Engine::open_unreserved(dir.path()).unwrap());
        let mut s = LogStore::new(1, engine);
        assert_eq!(terms(&mut s, 0).await, vec![(3, 1), (4, 2), (5, 2)]);
        let st = s.get_log_state().await.unwrap();
        assert_eq!(st.last_purged_log_id.map(|l| l.index), Some(2));
        assert_eq!(st.last_log_id.map(|l| l.index), Some(5));
    }
}
