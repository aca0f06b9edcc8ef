//! openraft's log storage for one group, on the node's shared [`Engine`].

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote};
use rocksdb::{Direction, IteratorMode, WriteBatch};

use super::engine::{Engine, CF_LOG, CF_META};
use super::group_key;
use crate::raft::{NodeId, TypeConfig};

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_PURGED: &[u8] = b"purged";

#[derive(Clone)]
pub struct LogStore {
    group: u32,
    engine: Arc<Engine>,
}

type StResult<T> = Result<T, StorageError<NodeId>>;

impl LogStore {
    pub fn new(group: u32, engine: Arc<Engine>) -> Self {
        Self { group, engine }
    }

    fn log_key(&self, index: u64) -> Vec<u8> {
        group_key(self.group, &index.to_be_bytes())
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> StResult<Option<T>> {
        let cf = self.engine.cf(CF_META);
        match self.engine.db().get_cf(cf, group_key(self.group, key)) {
            Ok(Some(v)) => bincode::deserialize(&v).map(Some).map_err(|e| read_err(&e)),
            Ok(None) => Ok(None),
            Err(e) => Err(read_err(&e)),
        }
    }

    fn put_meta<T: serde::Serialize>(&self, key: &[u8], v: &T, sync: bool) -> StResult<()> {
        let mut b = WriteBatch::default();
        let bytes = bincode::serialize(v).map_err(|e| write_err(&e))?;
        b.put_cf(self.engine.cf(CF_META), group_key(self.group, key), bytes);
        self.engine.write(b, sync).map_err(|e| write_err(&e))
    }

    fn last_entry_log_id(&self) -> StResult<Option<LogId<NodeId>>> {
        let cf = self.engine.cf(CF_LOG);
        let upper = group_key(self.group, &u64::MAX.to_be_bytes());
        let mut it = self
            .engine
            .db()
            .iterator_cf(cf, IteratorMode::From(&upper, Direction::Reverse));
        match it.next() {
            Some(Ok((k, v))) if k.starts_with(&self.group.to_be_bytes()) => {
                let e: Entry<TypeConfig> = bincode::deserialize(&v).map_err(|e| read_err(&e))?;
                Ok(Some(e.log_id))
            }
            Some(Err(e)) => Err(read_err(&e)),
            _ => Ok(None),
        }
    }

    fn delete_range(&self, from: u64, to_exclusive: u64) -> StResult<()> {
        let mut b = WriteBatch::default();
        b.delete_range_cf(
            self.engine.cf(CF_LOG),
            self.log_key(from),
            self.log_key(to_exclusive),
        );
        self.engine.write(b, false).map_err(|e| write_err(&e))
    }
}

fn read_err(e: &(impl std::error::Error + 'static)) -> StorageError<NodeId> {
    StorageIOError::read_logs(e).into()
}

fn write_err(e: &(impl std::error::Error + 'static)) -> StorageError<NodeId> {
    StorageIOError::write_logs(e).into()
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StResult<Vec<Entry<TypeConfig>>> {
        let start = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i + 1,
            Bound::Unbounded => 0,
        };
        let cf = self.engine.cf(CF_LOG);
        let from = self.log_key(start);
        let mut out = Vec::new();
        for item in self
            .engine
            .db()
            .iterator_cf(cf, IteratorMode::From(&from, Direction::Forward))
        {
            let (k, v) = item.map_err(|e| read_err(&e))?;
            if !k.starts_with(&self.group.to_be_bytes()) {
                break;
            }
            let index = u64::from_be_bytes(k[4..12].try_into().expect("log keys are 12 bytes"));
            if !range.contains(&index) {
                break;
            }
            out.push(bincode::deserialize(&v).map_err(|e| read_err(&e))?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StResult<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId<NodeId>> = self.get_meta(KEY_PURGED)?;
        let last_log_id = self.last_entry_log_id()?.or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StResult<()> {
        // A vote must survive a crash before it is answered: synced on its own.
        self.put_meta(KEY_VOTE, vote, true)
            .map_err(|e| StorageIOError::write_vote(&std::io::Error::other(e.to_string())).into())
    }

    async fn read_vote(&mut self) -> StResult<Option<Vote<NodeId>>> {
        self.get_meta(KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StResult<()> {
        // Only a hint for faster re-apply after restart; the next WAL sync persists it.
        self.put_meta(KEY_COMMITTED, &committed, false)
    }

    async fn read_committed(&mut self) -> StResult<Option<LogId<NodeId>>> {
        Ok(self
            .get_meta::<Option<LogId<NodeId>>>(KEY_COMMITTED)?
            .flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let cf = self.engine.cf(CF_LOG);
        let mut b = WriteBatch::default();
        for e in entries {
            let v = bincode::serialize(&e).map_err(|e| write_err(&e))?;
            b.put_cf(cf, self.log_key(e.log_id.index), v);
        }
        self.engine.write(b, false).map_err(|e| write_err(&e))?;
        self.engine
            .after_sync(Box::new(move |r| callback.log_io_completed(r)));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StResult<()> {
        self.delete_range(log_id.index, u64::MAX)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StResult<()> {
        self.put_meta(KEY_PURGED, &log_id, false)?;
        self.delete_range(0, log_id.index + 1)
    }
}
