//! A group's state as key-value rows, written incrementally after every apply.
//!
//! The state machine keeps [`GroupState`] in memory for serving, and mirrors it into rows so
//! that the node's RocksDB holds the whole state: a restart loads the rows instead of
//! replaying the log from a snapshot, and a snapshot is a RocksDB checkpoint of them. Only what
//! changed is written: every message has a small header row (visibility, receive count, …)
//! rewritten on receive and delete, and a body row written once.
//!
//! The rows are in two tables ([`Table`], a column family each). [`Table::Group`] holds the
//! small rows that most batches rewrite, keyed after the 4-byte group prefix
//! (`storage::group_key`) by a tag:
//! - `a`: the applied log id and membership (owned by the state machine, not by this module);
//! - `q` queue: a queue's name, id, attributes and times;
//! - `s`: the group's counters, outbox, credentials and name reservations;
//! - `t` topic: a topic with its subscriptions and outstanding deliveries.
//!
//! [`Table::Messages`] holds the messages: group, queue, sequence number, then `b` (body) or
//! `h` (header). Apart from the group's rows, and ordered by queue before sequence number, the
//! rows one flush writes cover only the newest sequence numbers of the queues written to, so
//! RocksDB moves such table files down its levels instead of merging them with every older
//! file: with the group's rows among them (and tags first), every table file spanned every
//! queue, and each compaction rewrote every row below it, the dead rows of a deleted queue
//! among them.
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

/// Which of the two tables of the state a row is in (see the module's documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Table {
    /// The applied row, queues, topics and the group's other state: small, rewritten often.
    Group,
    /// Message headers and bodies, by queue and sequence number.
    Messages,
}

/// One change to the rows (keys include the group prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowOp {
    /// The value is shared with the state it was written from (message bodies).
    Put(Table, Vec<u8>, Bytes),
    Delete(Table, Vec<u8>),
    /// Every key of the table in `[from, to)`.
    DeleteRange(Table, Vec<u8>, Vec<u8>),
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

impl RowOp {
    pub fn table(&self) -> Table {
        match self {
            RowOp::Put(t, ..) | RowOp::Delete(t, _) | RowOp::DeleteRange(t, ..) => *t,
        }
    }

    /// The key, or where the range starts.
    pub fn key(&self) -> &[u8] {
        match self {
            RowOp::Put(_, k, _) | RowOp::Delete(_, k) | RowOp::DeleteRange(_, k, _) => k,
        }
    }
}

/// `[from, to)` covering every row of `group`, in either table.
pub fn group_rows(group: u32) -> (Vec<u8>, Vec<u8>) {
    (
        crate::storage::group_key(group, &[]),
        crate::storage::group_key(group, &[0xff]),
    )
}

/// The key of a [`Table::Group`] row.
fn row_key(group: u32, tag: u8, key: Option<&QueueKey>) -> Vec<u8> {
    let mut k = Vec::with_capacity(5 + key.map_or(0, queue_key_len));
    k.extend_from_slice(&group.to_be_bytes());
    k.push(tag);
    if let Some(key) = key {
        push_queue_key(&mut k, key);
    }
    k
}

fn queue_key_len(key: &QueueKey) -> usize {
    4 + key.tenant.len() + key.name.len()
}

fn push_queue_key(k: &mut Vec<u8>, key: &QueueKey) {
    for part in [&key.tenant, &key.name] {
        // Tenants and names are validated far below 64 KiB.
        k.extend_from_slice(&(part.len() as u16).to_be_bytes());
        k.extend_from_slice(part.as_bytes());
    }
}

/// The key of a [`Table::Messages`] row: a message's body or header. Sized once: two of these
/// are made for every message a write of rows carries.
fn message_key(group: u32, key: &QueueKey, seq: u64, tag: u8) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + queue_key_len(key) + 9);
    k.extend_from_slice(&group.to_be_bytes());
    push_queue_key(&mut k, key);
    k.extend_from_slice(&seq.to_be_bytes());
    k.push(tag);
    k
}

/// Whether `key`, a key of the [`Table::Messages`] rows, is a body row's.
pub fn is_body_key(key: &[u8]) -> bool {
    key.last() == Some(&TAG_BODY)
}

/// The key of the body row of message `seq` of queue `key` in `group`.
pub fn body_key(group: u32, key: &QueueKey, seq: u64) -> Vec<u8> {
    message_key(group, key, seq, TAG_BODY)
}

/// `[from, to)` of the message rows of one queue.
fn queue_messages(group: u32, key: &QueueKey) -> (Vec<u8>, Vec<u8>) {
    let mut from = Vec::with_capacity(4 + queue_key_len(key) + 9);
    from.extend_from_slice(&group.to_be_bytes());
    push_queue_key(&mut from, key);
    let mut to = from.clone();
    // Every row of the queue continues `from` with a sequence number and a tag.
    to.extend_from_slice(&[0xff; 9]);
    (from, to)
}

/// Splits `rest` (a part of key `full`) into a queue key and what follows it.
fn parse_queue_key<'a>(full: &[u8], rest: &'a [u8]) -> Result<(QueueKey, &'a [u8]), RowError> {
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
    let [tenant, name] = parts;
    Ok((QueueKey { tenant, name }, &rest[at..]))
}

/// A queue key and nothing after it.
fn parse_whole_queue_key(full: &[u8], rest: &[u8]) -> Result<QueueKey, RowError> {
    match parse_queue_key(full, rest)? {
        (key, []) => Ok(key),
        _ => Err(malformed(full, "trailing bytes")),
    }
}

/// A message row's queue, sequence number and tag (`rest` follows the group prefix).
fn parse_message_key(full: &[u8], rest: &[u8]) -> Result<(QueueKey, u64, u8), RowError> {
    let (key, after) = parse_queue_key(full, rest)?;
    let [s0, s1, s2, s3, s4, s5, s6, s7, tag] = after else {
        return Err(malformed(full, "bad sequence number"));
    };
    let seq = u64::from_be_bytes([*s0, *s1, *s2, *s3, *s4, *s5, *s6, *s7]);
    Ok((key, seq, *tag))
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
    /// deletions first (a queue deleted and created again in one batch has its old rows
    /// deleted before its new ones are written), then every other change by table and in
    /// ascending key order, each key at most once.
    pub fn drain_changes(&mut self, out: &mut Vec<RowOp>) {
        self.drain_changes_noting_bodies(out, &mut Vec::new());
    }

    /// [`drain_changes`](Self::drain_changes), also listing in `bodies` the messages whose
    /// body rows it writes (by queue) and returning their bytes.
    pub fn drain_changes_noting_bodies(
        &mut self,
        out: &mut Vec<RowOp>,
        bodies: &mut Vec<(QueueKey, Vec<u64>)>,
    ) -> u64 {
        let start = out.len();
        let bytes = self.drain_unordered(out, bodies);
        // Sorted in place, without the scratch buffer a stable sort allocates: no key occurs
        // twice, so stability changes nothing. Range deletions (of distinct queues, so in any
        // order among themselves) go first.
        fn rank(op: &RowOp) -> (bool, Table, &[u8]) {
            (!matches!(op, RowOp::DeleteRange(..)), op.table(), op.key())
        }
        out[start..].sort_unstable_by(|a, b| rank(a).cmp(&rank(b)));
        debug_assert!(
            out[start..].windows(2).all(|w| rank(&w[0]) != rank(&w[1])),
            "a key changed twice in one batch"
        );
        bytes
    }

    fn drain_unordered(
        &mut self,
        out: &mut Vec<RowOp>,
        bodies: &mut Vec<(QueueKey, Vec<u64>)>,
    ) -> u64 {
        let mut body_bytes = 0;
        let g = self.group;
        // Sized once: up to a header and a body row per message changed since the last batch
        // (sent, received or deleted), a row per changed queue or topic, two per removed
        // queue, and the rest row.
        out.reserve(
            1 + 2 * self.changes.removed_queues.len()
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
            let (from, to) = queue_messages(g, &key);
            out.push(RowOp::DeleteRange(Table::Messages, from, to));
            // Created again since: its new queue row replaces the old one below (a delete
            // here too would be a second change of one key, in no defined order).
            if !self.queues.contains_key(&key) {
                out.push(RowOp::Delete(
                    Table::Group,
                    row_key(g, TAG_QUEUE, Some(&key)),
                ));
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
                    Table::Group,
                    row_key(g, TAG_QUEUE, Some(key)),
                    encode(&meta).into(),
                ));
            }
            let mut written = Vec::new();
            for seq in changes.headers {
                let header_key = message_key(g, key, seq, TAG_HEADER);
                match q.messages.get(&seq) {
                    Some(m) => {
                        let h = Header {
                            enqueue_ms: m.enqueue_ms,
                            visible_ms: m.visible_ms,
                            dequeue_count: m.dequeue_count,
                            first_dequeue_ms: m.first_dequeue_ms,
                            deleted_ms: m.deleted_ms,
                        };
                        out.push(RowOp::Put(Table::Messages, header_key, encode(&h).into()));
                        // A new body is in memory until its row is written.
                        debug_assert!(m.body.is_some() || !changes.bodies.contains(&seq));
                        if let (true, Some(body)) = (changes.bodies.contains(&seq), &m.body) {
                            out.push(RowOp::Put(
                                Table::Messages,
                                message_key(g, key, seq, TAG_BODY),
                                body.clone(),
                            ));
                            written.push(seq);
                            body_bytes += body.len() as u64;
                        }
                    }
                    None => {
                        out.push(RowOp::Delete(Table::Messages, header_key));
                        out.push(RowOp::Delete(
                            Table::Messages,
                            message_key(g, key, seq, TAG_BODY),
                        ));
                    }
                }
            }
            if !written.is_empty() {
                bodies.push((key.clone(), written));
            }
        }
        for key in std::mem::take(&mut self.changes.topics) {
            let row = row_key(g, TAG_TOPIC, Some(&key));
            match self.topics.get(&key) {
                Some(t) => out.push(RowOp::Put(Table::Group, row, encode(t).into())),
                None => out.push(RowOp::Delete(Table::Group, row)),
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
            Table::Group,
            row_key(g, TAG_REST, None),
            encode(&rest).into(),
        ));
        body_bytes
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

    /// Rebuilds the state of `group` from its rows (each table's ascending, as a scan returns
    /// them; rows of other groups and the applied row are ignored). No rows: a new, empty
    /// group. With `load_bodies` false, message bodies stay in the rows (`Message::body` is
    /// `None`); every header must still have its body row.
    pub fn from_rows<'a, I>(
        group: u32,
        data_groups: u32,
        rows: I,
        load_bodies: bool,
    ) -> Result<Self, RowError>
    where
        I: IntoIterator<Item = (Table, &'a [u8], &'a [u8])>,
    {
        let mut state = GroupState::new(group, data_groups);
        let prefix = group.to_be_bytes();
        let mut bodies: BTreeMap<(QueueKey, u64), Option<Bytes>> = BTreeMap::new();
        let mut headers: BTreeMap<QueueKey, Vec<(u64, Header)>> = BTreeMap::new();
        for (table, k, v) in rows {
            let Some(rest) = k.strip_prefix(&prefix) else {
                continue;
            };
            if table == Table::Messages {
                match parse_message_key(k, rest)? {
                    (key, seq, TAG_BODY) => {
                        bodies.insert((key, seq), load_bodies.then(|| Bytes::copy_from_slice(v)));
                    }
                    (key, seq, TAG_HEADER) => {
                        headers.entry(key).or_default().push((seq, decode(k, v)?));
                    }
                    (_, _, tag) => return Err(malformed(k, format!("unknown tag {tag:#x}"))),
                }
                continue;
            }
            let Some((&tag, after)) = rest.split_first() else {
                return Err(malformed(k, "no tag"));
            };
            match tag {
                TAG_APPLIED => {}
                TAG_QUEUE => {
                    let key = parse_whole_queue_key(k, after)?;
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
                    let key = parse_whole_queue_key(k, after)?;
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
                        body,
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
