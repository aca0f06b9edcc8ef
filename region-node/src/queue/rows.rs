//! A group's state as key-value rows, written incrementally after every apply.
//!
//! The state machine keeps [`GroupState`] in memory for serving, and mirrors it into rows so
//! that the node's RocksDB holds the whole state: a restart loads the rows instead of
//! replaying the log from a snapshot, and a snapshot is a RocksDB checkpoint of them. Only what
//! changed is written: every message has a small header row (visibility, receive count, …)
//! rewritten on receive and delete, and a body row written once.
//!
//! Keys, after the 4-byte group prefix (`storage::group_key`):
//! - `a`: the applied log id and membership (owned by the state machine, not by this module);
//! - `b` queue seq: a message body;
//! - `h` queue seq: a message header;
//! - `q` queue: a queue's name, id, attributes and times;
//! - `s`: the group's counters, outbox, credentials and name reservations;
//! - `t` topic: a topic with its subscriptions and outstanding deliveries.
//!
//! A queue or topic key is `tenant` and `name`, each with a big-endian u16 length, so that
//! no queue's prefix is a prefix of another's.

use std::borrow::Cow;
use std::collections::BTreeMap;

use bytes::Bytes;

use meridian_api::limits::QueueAttributes;
use serde::{Deserialize, Serialize};

use super::group::{Credential, GroupChanges, OutboxEntry, Woken};
use super::model::{Message, Queue, QueueChanges};
use super::GroupState;
use crate::command::QueueKey;
use crate::topic::Topic;

pub const TAG_APPLIED: u8 = b'a';
const TAG_BODY: u8 = b'b';
const TAG_HEADER: u8 = b'h';
const TAG_QUEUE: u8 = b'q';
const TAG_REST: u8 = b's';
const TAG_TOPIC: u8 = b't';

/// One change to the rows (keys include the group prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowOp {
    /// The value is shared with the state it was written from (message bodies).
    Put(Vec<u8>, Bytes),
    Delete(Vec<u8>),
    /// Every key in `[from, to)`.
    DeleteRange(Vec<u8>, Vec<u8>),
}

#[derive(Debug, thiserror::Error)]
pub enum RowError {
    #[error("malformed state row {key}: {why}")]
    Malformed { key: String, why: String },
}

fn malformed(key: &[u8], why: impl std::fmt::Display) -> RowError {
    RowError::Malformed {
        key: hex::encode(key),
        why: why.to_string(),
    }
}

fn row_op_key(op: &RowOp) -> &[u8] {
    match op {
        RowOp::Put(k, _) | RowOp::Delete(k) | RowOp::DeleteRange(k, _) => k,
    }
}

/// `[from, to)` covering every row of `group`.
pub fn group_rows(group: u32) -> (Vec<u8>, Vec<u8>) {
    (
        crate::storage::group_key(group, &[]),
        crate::storage::group_key(group, &[0xff]),
    )
}

fn row_key(group: u32, tag: u8, key: Option<&QueueKey>, seq: Option<u64>) -> Vec<u8> {
    // `storage::group_key(group, &[tag])` and the rest, sized once: two of these are made for
    // every message a write of rows carries.
    let len =
        5 + key.map_or(0, |k| 4 + k.tenant.len() + k.name.len()) + 8 * usize::from(seq.is_some());
    let mut k = Vec::with_capacity(len);
    k.extend_from_slice(&group.to_be_bytes());
    k.push(tag);
    if let Some(key) = key {
        for part in [&key.tenant, &key.name] {
            // Tenants and names are validated far below 64 KiB.
            k.extend_from_slice(&(part.len() as u16).to_be_bytes());
            k.extend_from_slice(part.as_bytes());
        }
    }
    if let Some(seq) = seq {
        k.extend_from_slice(&seq.to_be_bytes());
    }
    k
}

/// `[from, to)` of the rows with `tag` of one queue.
fn queue_range(group: u32, tag: u8, key: &QueueKey) -> (Vec<u8>, Vec<u8>) {
    let from = row_key(group, tag, Some(key), None);
    let mut to = from.clone();
    // Every row of the queue continues `from` with an 8-byte sequence number.
    to.extend_from_slice(&[0xff; 9]);
    (from, to)
}

/// Splits the part after the tag into a queue key and an optional trailing sequence number.
fn parse_queue_key(full: &[u8], rest: &[u8], with_seq: bool) -> Result<(QueueKey, u64), RowError> {
    let mut at = 0;
    let mut parts = [String::new(), String::new()];
    for part in &mut parts {
        let len = rest
            .get(at..at + 2)
            .ok_or_else(|| malformed(full, "short key"))?;
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        at += 2;
        let bytes = rest
            .get(at..at + len)
            .ok_or_else(|| malformed(full, "short key"))?;
        *part = String::from_utf8(bytes.to_vec()).map_err(|e| malformed(full, e))?;
        at += len;
    }
    let seq = if with_seq {
        let b: [u8; 8] = rest
            .get(at..)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| malformed(full, "bad sequence number"))?;
        u64::from_be_bytes(b)
    } else {
        if at != rest.len() {
            return Err(malformed(full, "trailing bytes"));
        }
        0
    };
    let [tenant, name] = parts;
    Ok((QueueKey { tenant, name }, seq))
}

#[derive(Serialize, Deserialize)]
struct Header {
    enqueue_ms: i64,
    visible_ms: i64,
    dequeue_count: u32,
    first_dequeue_ms: i64,
    deleted_ms: Option<i64>,
}

#[derive(Serialize, Deserialize)]
struct QueueMeta<'a> {
    queue_id: Cow<'a, str>,
    name: Cow<'a, str>,
    attrs: Cow<'a, QueueAttributes>,
    created_ms: i64,
    modified_ms: i64,
}

/// Everything of [`GroupState`] but its queues and topics (borrowed to write, owned to read).
#[derive(Serialize, Deserialize)]
struct Rest<'a> {
    group: u32,
    data_groups: u32,
    next_seq: u64,
    next_queue_num: u64,
    deleted_names: Cow<'a, BTreeMap<QueueKey, i64>>,
    outbox: Cow<'a, BTreeMap<u64, OutboxEntry>>,
    next_transfer_id: u64,
    transfers_applied: Cow<'a, BTreeMap<u32, u64>>,
    clock_ms: i64,
    credentials: Cow<'a, BTreeMap<String, Credential>>,
    deleted_topic_names: Cow<'a, BTreeMap<QueueKey, i64>>,
    next_topic_num: u64,
    next_subscription_num: u64,
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    bincode::serialize(v).expect("state rows are serialisable")
}

fn decode<'de, T: Deserialize<'de>>(key: &[u8], v: &'de [u8]) -> Result<T, RowError> {
    bincode::deserialize(v).map_err(|e| malformed(key, e))
}

impl GroupState {
    /// Appends the row changes since the last call to `out`, and forgets them: range
    /// deletions first, then every other change in ascending key order (each key at most once,
    /// so the order changes nothing but speed: RocksDB's memtable inserts ascending keys of one
    /// batch without searching its skip list from the top for each; interleaved header and
    /// body rows made that search a fifth of a node's CPU in the many-queues benchmark).
    pub fn drain_changes(&mut self, out: &mut Vec<RowOp>) {
        let start = out.len();
        self.drain_unordered(out);
        // Sorted in place, without the scratch buffer a stable sort allocates: no key occurs
        // twice, so stability changes nothing. Range deletions (of distinct queues, so in any
        // order among themselves) go first.
        fn rank(op: &RowOp) -> (bool, &[u8]) {
            (!matches!(op, RowOp::DeleteRange(..)), row_op_key(op))
        }
        out[start..].sort_unstable_by(|a, b| rank(a).cmp(&rank(b)));
        debug_assert!(
            out[start..].windows(2).all(|w| rank(&w[0]) != rank(&w[1])),
            "a key changed twice in one batch"
        );
    }

    fn drain_unordered(&mut self, out: &mut Vec<RowOp>) {
        let g = self.group;
        // Sized once: up to a header and a body row per message changed since the last batch
        // (sent, received or deleted), a row per changed queue or topic, three per removed
        // queue, and the rest row.
        out.reserve(
            1 + 3 * self.changes.removed_queues.len()
                + self.changes.topics.len()
                + self
                    .queues
                    .values()
                    .map(|q| usize::from(q.changes.meta) + 2 * q.changes.headers.len())
                    .sum::<usize>(),
        );
        let mut removed = std::mem::take(&mut self.changes.removed_queues);
        removed.sort_unstable();
        removed.dedup();
        for key in removed {
            for tag in [TAG_BODY, TAG_HEADER] {
                let (from, to) = queue_range(g, tag, &key);
                out.push(RowOp::DeleteRange(from, to));
            }
            // Created again since: its new queue row replaces the old one below (a delete
            // here too would be a second change of one key, in no defined order).
            if !self.queues.contains_key(&key) {
                out.push(RowOp::Delete(row_key(g, TAG_QUEUE, Some(&key), None)));
            }
        }
        for (key, q) in &mut self.queues {
            let changes = std::mem::take(&mut q.changes);
            if changes.meta {
                let meta = QueueMeta {
                    queue_id: Cow::Borrowed(&q.queue_id),
                    name: Cow::Borrowed(&q.name),
                    attrs: Cow::Borrowed(&q.attrs),
                    created_ms: q.created_ms,
                    modified_ms: q.modified_ms,
                };
                out.push(RowOp::Put(
                    row_key(g, TAG_QUEUE, Some(key), None),
                    encode(&meta).into(),
                ));
            }
            for seq in changes.headers {
                let header_key = row_key(g, TAG_HEADER, Some(key), Some(seq));
                match q.messages.get(&seq) {
                    Some(m) => {
                        let h = Header {
                            enqueue_ms: m.enqueue_ms,
                            visible_ms: m.visible_ms,
                            dequeue_count: m.dequeue_count,
                            first_dequeue_ms: m.first_dequeue_ms,
                            deleted_ms: m.deleted_ms,
                        };
                        out.push(RowOp::Put(header_key, encode(&h).into()));
                        if changes.bodies.contains(&seq) {
                            out.push(RowOp::Put(
                                row_key(g, TAG_BODY, Some(key), Some(seq)),
                                m.body.clone(),
                            ));
                        }
                    }
                    None => {
                        out.push(RowOp::Delete(header_key));
                        out.push(RowOp::Delete(row_key(g, TAG_BODY, Some(key), Some(seq))));
                    }
                }
            }
        }
        for key in std::mem::take(&mut self.changes.topics) {
            let row = row_key(g, TAG_TOPIC, Some(&key), None);
            match self.topics.get(&key) {
                Some(t) => out.push(RowOp::Put(row, encode(t).into())),
                None => out.push(RowOp::Delete(row)),
            }
        }
        let rest = Rest {
            group: self.group,
            data_groups: self.data_groups,
            next_seq: self.next_seq,
            next_queue_num: self.next_queue_num,
            deleted_names: Cow::Borrowed(&self.deleted_names),
            outbox: Cow::Borrowed(&self.outbox),
            next_transfer_id: self.next_transfer_id,
            transfers_applied: Cow::Borrowed(&self.transfers_applied),
            clock_ms: self.clock_ms,
            credentials: Cow::Borrowed(&self.credentials),
            deleted_topic_names: Cow::Borrowed(&self.deleted_topic_names),
            next_topic_num: self.next_topic_num,
            next_subscription_num: self.next_subscription_num,
        };
        out.push(RowOp::Put(
            row_key(g, TAG_REST, None, None),
            encode(&rest).into(),
        ));
    }

    /// Every row of the state, as a fresh write: what incremental writes must add up to.
    #[cfg(test)]
    pub fn all_rows(&self) -> Vec<RowOp> {
        let mut copy = self.clone();
        for q in copy.queues.values_mut() {
            q.changes = QueueChanges {
                meta: true,
                headers: q.messages.keys().copied().collect(),
                bodies: q.messages.keys().copied().collect(),
            };
        }
        copy.changes = GroupChanges {
            removed_queues: Vec::new(),
            topics: copy.topics.keys().cloned().collect(),
        };
        let mut out = Vec::new();
        copy.drain_changes(&mut out);
        out
    }

    /// Rebuilds the state of `group` from its rows (ascending, as a scan returns them; rows of
    /// other groups and the applied row are ignored). No rows: a new, empty group.
    pub fn from_rows<'a, I>(group: u32, data_groups: u32, rows: I) -> Result<Self, RowError>
    where
        I: IntoIterator<Item = (&'a [u8], &'a [u8])>,
    {
        let mut state = GroupState::new(group, data_groups);
        let prefix = group.to_be_bytes();
        let mut bodies: BTreeMap<(QueueKey, u64), Vec<u8>> = BTreeMap::new();
        let mut headers: BTreeMap<QueueKey, Vec<(u64, Header)>> = BTreeMap::new();
        for (k, v) in rows {
            let Some(rest) = k.strip_prefix(&prefix) else {
                continue;
            };
            let Some((&tag, after)) = rest.split_first() else {
                return Err(malformed(k, "no tag"));
            };
            match tag {
                TAG_APPLIED => {}
                TAG_BODY => {
                    let (key, seq) = parse_queue_key(k, after, true)?;
                    bodies.insert((key, seq), v.to_vec());
                }
                TAG_HEADER => {
                    let (key, seq) = parse_queue_key(k, after, true)?;
                    headers.entry(key).or_default().push((seq, decode(k, v)?));
                }
                TAG_QUEUE => {
                    let (key, _) = parse_queue_key(k, after, false)?;
                    let m: QueueMeta = decode(k, v)?;
                    let mut q = Queue::new(
                        m.queue_id.into_owned(),
                        m.name.into_owned(),
                        m.attrs.into_owned(),
                        m.created_ms,
                    );
                    q.modified_ms = m.modified_ms;
                    state.queues.insert(key, q);
                }
                TAG_REST => {
                    let r: Rest = decode(k, v)?;
                    if (r.group, r.data_groups) != (group, data_groups) {
                        return Err(malformed(
                            k,
                            format!(
                                "rows are of group {} of {}, not group {group} of {data_groups}",
                                r.group, r.data_groups
                            ),
                        ));
                    }
                    state.next_seq = r.next_seq;
                    state.next_queue_num = r.next_queue_num;
                    state.deleted_names = r.deleted_names.into_owned();
                    state.outbox = r.outbox.into_owned();
                    state.next_transfer_id = r.next_transfer_id;
                    state.transfers_applied = r.transfers_applied.into_owned();
                    state.clock_ms = r.clock_ms;
                    state.credentials = r.credentials.into_owned();
                    state.deleted_topic_names = r.deleted_topic_names.into_owned();
                    state.next_topic_num = r.next_topic_num;
                    state.next_subscription_num = r.next_subscription_num;
                }
                TAG_TOPIC => {
                    let (key, _) = parse_queue_key(k, after, false)?;
                    let t: Topic = decode(k, v)?;
                    state.topics.insert(key, t);
                }
                _ => return Err(malformed(k, format!("unknown tag {tag:#x}"))),
            }
        }
        for (key, list) in headers {
            let Some(q) = state.queues.get_mut(&key) else {
                return Err(RowError::Malformed {
                    key: format!("{key:?}"),
                    why: "messages of a queue that has no queue row".into(),
                });
            };
            for (seq, h) in list {
                let body =
                    bodies
                        .remove(&(key.clone(), seq))
                        .ok_or_else(|| RowError::Malformed {
                            key: format!("{key:?} {seq}"),
                            why: "message header without a body".into(),
                        })?;
                if h.deleted_ms.is_some() {
                    q.deleted_count += 1;
                } else {
                    q.ready.insert((h.visible_ms, seq));
                }
                q.messages.insert(
                    seq,
                    Message {
                        body: Bytes::from(body),
                        enqueue_ms: h.enqueue_ms,
                        visible_ms: h.visible_ms,
                        dequeue_count: h.dequeue_count,
                        first_dequeue_ms: h.first_dequeue_ms,
                        deleted_ms: h.deleted_ms,
                    },
                );
            }
        }
        if let Some(((key, seq), _)) = bodies.into_iter().next() {
            return Err(RowError::Malformed {
                key: format!("{key:?} {seq}"),
                why: "message body without a header".into(),
            });
        }
        for q in state.queues.values_mut() {
            q.changes = QueueChanges::default();
        }
        state.woken = Woken::default();
        state.changes = GroupChanges::default();
        Ok(state)
    }
}

#[cfg(test)]
mod tests;
