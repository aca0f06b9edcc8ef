//! One queue: its messages, the visibility index, and the per-message lifecycle
//! (delayed → active → inactive → deleted/rewindable → gone).

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use meridian_api::limits::QueueAttributes;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `None` once the body is in the state rows (the state machine then drops it from memory
    /// and reads the row when the message is received or moved): a backlog costs memory for
    /// its headers only. Whether a replica still holds it depends on when it last wrote rows,
    /// so it is not part of the state that replicas compare.
    #[serde(skip)]
    pub body: Option<Bytes>,
    pub enqueue_ms: i64,
    /// When it may next be received; meaningless once deleted.
    pub visible_ms: i64,
    /// Times received. Also the generation of the only receipt handle that may delete it.
    pub dequeue_count: u32,
    /// 0 until the first receive.
    pub first_dequeue_ms: i64,
    /// Set when deleted but kept for rewind.
    pub deleted_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Queue {
    pub queue_id: String,
    /// The name as created (lookups use the lower-cased key).
    pub name: String,
    pub attrs: QueueAttributes,
    pub created_ms: i64,
    pub modified_ms: i64,
    /// Every retained message by group sequence number, which orders them by production.
    pub messages: BTreeMap<u64, Message>,
    /// Live (not deleted) messages by the time they become receivable.
    pub ready: BTreeSet<(i64, u64)>,
    pub deleted_count: u64,
    #[serde(skip)]
    pub changes: QueueChanges,
}

/// What changed since the queue was last written out as rows (`queue::rows`). Not state: it is
/// drained when the state machine writes rows and ignored by comparisons and digests.
#[derive(Debug, Clone, Default)]
pub struct QueueChanges {
    /// Name, attributes or times.
    pub meta: bool,
    /// Messages whose header changed or that are gone.
    pub headers: BTreeSet<u64>,
    /// Messages whose body is new: none of their rows is written yet.
    pub bodies: BTreeSet<u64>,
}

impl PartialEq for QueueChanges {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for QueueChanges {}

/// The counters GetQueueAttributes reports, computed at a given time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueCounters {
    pub active: u64,
    pub inactive: u64,
    pub delayed: u64,
    pub rewindable: u64,
    /// Enqueue time of the oldest live message, Unix ms; 0 when empty.
    pub min_msg_ms: i64,
}

impl Queue {
    pub fn new(queue_id: String, name: String, attrs: QueueAttributes, now_ms: i64) -> Self {
        Self {
            queue_id,
            name,
            attrs,
            created_ms: now_ms,
            modified_ms: now_ms,
            messages: BTreeMap::new(),
            ready: BTreeSet::new(),
            deleted_count: 0,
            changes: QueueChanges {
                meta: true,
                ..Default::default()
            },
        }
    }

    pub fn live_count(&self) -> u64 {
        self.messages.len() as u64 - self.deleted_count
    }

    pub fn insert(&mut self, seq: u64, body: Bytes, now_ms: i64, delay_seconds: u32) {
        let visible_ms = now_ms + i64::from(delay_seconds) * 1000;
        self.messages.insert(
            seq,
            Message {
                body: Some(body),
                enqueue_ms: now_ms,
                visible_ms,
                dequeue_count: 0,
                first_dequeue_ms: 0,
                deleted_ms: None,
            },
        );
        self.ready.insert((visible_ms, seq));
        self.changes.headers.insert(seq);
        self.changes.bodies.insert(seq);
    }

    /// Drops messages past retention and deleted ones past the rewind window.
    pub fn expire(&mut self, now_ms: i64) {
        let retention_ms = i64::from(self.attrs.msg_retention_seconds) * 1000;
        let rewind_ms = i64::from(self.attrs.rewind_seconds) * 1000;
        // Sequence order is production order, so retention expiry only looks at the front.
        while let Some((&seq, m)) = self.messages.first_key_value() {
            if m.enqueue_ms + retention_ms > now_ms {
                break;
            }
            self.remove(seq);
        }
        if self.deleted_count > 0 {
            let stale: Vec<u64> = self
                .messages
                .iter()
                .filter(|(_, m)| m.deleted_ms.is_some_and(|d| d + rewind_ms <= now_ms))
                .map(|(&s, _)| s)
                .collect();
            for seq in stale {
                self.remove(seq);
            }
        }
    }

    pub fn remove(&mut self, seq: u64) -> Option<Message> {
        let m = self.messages.remove(&seq)?;
        // A message whose body is still new was never written out: nothing to delete.
        if self.changes.bodies.remove(&seq) {
            self.changes.headers.remove(&seq);
        } else {
            self.changes.headers.insert(seq);
        }
        if m.deleted_ms.is_some() {
            self.deleted_count -= 1;
        } else {
            self.ready.remove(&(m.visible_ms, seq));
        }
        Some(m)
    }

    /// Marks a message consumed: kept for rewind when the queue has a window, else dropped.
    pub fn mark_deleted(&mut self, seq: u64, now_ms: i64) {
        if self.attrs.rewind_seconds == 0 {
            self.remove(seq);
            return;
        }
        if let Some(m) = self.messages.get_mut(&seq) {
            if m.deleted_ms.is_none() {
                self.ready.remove(&(m.visible_ms, seq));
                m.deleted_ms = Some(now_ms);
                self.deleted_count += 1;
                self.changes.headers.insert(seq);
            }
        }
    }

    /// Makes `seq` invisible until `visible_ms` and counts the receive.
    pub fn take(&mut self, seq: u64, now_ms: i64, visible_ms: i64) -> &Message {
        let m = self
            .messages
            .get_mut(&seq)
            .expect("ready index points at a live message");
        self.ready.remove(&(m.visible_ms, seq));
        m.dequeue_count += 1;
        if m.first_dequeue_ms == 0 {
            m.first_dequeue_ms = now_ms;
        }
        m.visible_ms = visible_ms;
        self.ready.insert((visible_ms, seq));
        self.changes.headers.insert(seq);
        m
    }

    /// Re-activates every message produced at or after `start_ms`, deleted ones included.
    pub fn rewind(&mut self, start_ms: i64, now_ms: i64) {
        let seqs: Vec<u64> = self
            .messages
            .iter()
            .filter(|(_, m)| m.enqueue_ms >= start_ms)
            .map(|(&s, _)| s)
            .collect();
        for seq in seqs {
            let m = self.messages.get_mut(&seq).expect("collected above");
            if m.deleted_ms.take().is_some() {
                self.deleted_count -= 1;
            } else {
                self.ready.remove(&(m.visible_ms, seq));
            }
            m.visible_ms = now_ms;
            self.ready.insert((now_ms, seq));
            self.changes.headers.insert(seq);
        }
    }

    pub fn counters(&self, now_ms: i64) -> QueueCounters {
        let mut c = QueueCounters {
            rewindable: self.deleted_count,
            ..Default::default()
        };
        for &(visible_ms, seq) in &self.ready {
            if visible_ms <= now_ms {
                c.active += 1;
            } else if self.messages[&seq].dequeue_count > 0 {
                c.inactive += 1;
            } else {
                c.delayed += 1;
            }
        }
        c.min_msg_ms = self
            .messages
            .values()
            .find(|m| m.deleted_ms.is_none())
            .map(|m| m.enqueue_ms)
            .unwrap_or(0);
        c
    }

    /// The earliest future time at which some message becomes receivable.
    pub fn next_visible_after(&self, now_ms: i64) -> Option<i64> {
        self.ready.range((now_ms + 1, 0)..).next().map(|&(t, _)| t)
    }
}
