//! All queues of one Raft group and the deterministic `apply` of a command to them.

use std::collections::BTreeMap;

use bytes::Bytes;
use meridian_api::limits::{DeadLetterTrigger, QueueAttributes};
use meridian_api::{CmqCode, CmqError};
use serde::{Deserialize, Serialize};

use crate::command::{Command, Delivered, Op, OpResult, QueueKey, Receipt};
use crate::placement::group_of;
use crate::queue::model::Queue;
use crate::topic::Topic;

/// How long a deleted queue's name stays reserved (CMQ error 6040).
const NAME_REUSE_DELAY_MS: i64 = 10_000;

/// Queues that received messages during the current apply, for waking long polls. Not state:
/// it is drained after every apply and ignored by comparisons and snapshots.
#[derive(Debug, Clone, Default)]
pub struct Woken(pub Vec<QueueKey>);

impl PartialEq for Woken {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Woken {}

/// What changed outside the queues since the state was last written out as rows
/// (`queue::rows`). Not state, like [`Woken`].
#[derive(Debug, Clone, Default)]
pub struct GroupChanges {
    /// Queues deleted (their rows go; a queue created again under the name is written anew).
    pub removed_queues: Vec<QueueKey>,
    /// Topics changed, created or deleted.
    pub topics: std::collections::BTreeSet<QueueKey>,
}

impl PartialEq for GroupChanges {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for GroupChanges {}

type ReadBody = dyn Fn(&QueueKey, u64) -> Option<Bytes> + Send + Sync;

/// Reads the body row of message `seq` of a queue (of this group), for messages whose body is
/// no longer held in memory (`Message::body` is `None`). Not state, like [`Woken`]: the state
/// machine, which knows where the rows are and drops written bodies, sets it; a state outside
/// one (the queue logic's tests) has none and keeps every body.
#[derive(Clone, Default)]
pub struct BodySource(Option<std::sync::Arc<ReadBody>>);

impl BodySource {
    pub fn new(read: impl Fn(&QueueKey, u64) -> Option<Bytes> + Send + Sync + 'static) -> Self {
        Self(Some(std::sync::Arc::new(read)))
    }

    fn read(&self, key: &QueueKey, seq: u64) -> Option<Bytes> {
        self.0.as_ref().and_then(|read| read(key, seq))
    }
}

impl std::fmt::Debug for BodySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "BodySource(rows)"
        } else {
            "BodySource(none)"
        })
    }
}

impl PartialEq for BodySource {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for BodySource {}

/// A message waiting to be moved into a queue of another group (dead-lettered, or published to
/// a topic).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    pub target_group: u32,
    pub key: QueueKey,
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

/// A CMQ API key pair (metadata group only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credential {
    pub secret_key: String,
    /// The tenant: queues are scoped per app id.
    pub app_id: u64,
    pub created_ms: i64,
    pub revoked: bool,
}

/// Message ids are `<group>-<seq>`: unique in the region, identical on every replica.
fn msg_id(group: u32, seq: u64) -> String {
    format!("{group}-{seq}")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupState {
    pub group: u32,
    pub data_groups: u32,
    /// Next message sequence number; message ids are `<group>-<seq>`.
    pub next_seq: u64,
    pub next_queue_num: u64,
    pub queues: BTreeMap<QueueKey, Queue>,
    /// Recently deleted names and when, to refuse re-creation for 10 s.
    pub deleted_names: BTreeMap<QueueKey, i64>,
    pub outbox: BTreeMap<u64, OutboxEntry>,
    pub next_transfer_id: u64,
    /// Highest transfer id applied from each source group (makes `Transfer` idempotent).
    pub transfers_applied: BTreeMap<u32, u64>,
    /// The latest command time applied. Commands are applied at no earlier time than this, so
    /// a leader whose clock steps back cannot make messages visible early or unexpire them.
    pub clock_ms: i64,
    /// CMQ API credentials by SecretId (metadata group only).
    pub credentials: BTreeMap<String, Credential>,
    pub topics: BTreeMap<QueueKey, Topic>,
    /// Recently deleted topic names and when, to refuse re-creation for 10 s.
    pub deleted_topic_names: BTreeMap<QueueKey, i64>,
    pub next_topic_num: u64,
    pub next_subscription_num: u64,
    #[serde(skip)]
    pub woken: Woken,
    #[serde(skip)]
    pub changes: GroupChanges,
    #[serde(skip)]
    pub bodies: BodySource,
}

impl GroupState {
    pub fn new(group: u32, data_groups: u32) -> Self {
        Self {
            group,
            data_groups,
            next_seq: 1,
            next_queue_num: 1,
            queues: BTreeMap::new(),
            deleted_names: BTreeMap::new(),
            outbox: BTreeMap::new(),
            next_transfer_id: 1,
            transfers_applied: BTreeMap::new(),
            clock_ms: 0,
            credentials: BTreeMap::new(),
            topics: BTreeMap::new(),
            deleted_topic_names: BTreeMap::new(),
            next_topic_num: 1,
            next_subscription_num: 1,
            woken: Woken::default(),
            changes: GroupChanges::default(),
            bodies: BodySource::default(),
        }
    }

    pub fn msg_id(&self, seq: u64) -> String {
        msg_id(self.group, seq)
    }

    pub fn queue(&self, key: &QueueKey) -> Result<&Queue, CmqError> {
        self.queues
            .get(key)
            .ok_or_else(|| CmqError::queue_not_found(&key.name))
    }

    fn queue_mut(&mut self, key: &QueueKey) -> Result<&mut Queue, CmqError> {
        self.queues
            .get_mut(key)
            .ok_or_else(|| CmqError::queue_not_found(&key.name))
    }

    /// [`apply`](Self::apply), but a send's bodies move into the state (no reference-count
    /// traffic for each body).
    pub fn apply_owned(&mut self, cmd: Command) -> OpResult {
        match cmd.op {
            Op::Send {
                key,
                bodies,
                delay_seconds,
            } => {
                let now = cmd.now_ms.max(self.clock_ms);
                self.clock_ms = now;
                self.send(&key, bodies, delay_seconds, now)
                    .unwrap_or_else(OpResult::Failed)
            }
            op => self.apply(&Command {
                now_ms: cmd.now_ms,
                op,
            }),
        }
    }

    pub fn apply(&mut self, cmd: &Command) -> OpResult {
        let now = cmd.now_ms.max(self.clock_ms);
        self.clock_ms = now;
        let r = match &cmd.op {
            Op::CreateQueue {
                tenant,
                name,
                attrs,
            } => self.create(tenant, name, attrs, now),
            Op::SetQueueAttributes { key, patch } => self.queue_mut(key).and_then(|q| {
                q.attrs = patch.apply_to(&q.attrs)?;
                q.modified_ms = now;
                q.changes.meta = true;
                Ok(OpResult::Done)
            }),
            Op::DeleteQueue { key } => match self.queues.remove(key) {
                Some(_) => {
                    self.changes.removed_queues.push(key.clone());
                    self.deleted_names.insert(key.clone(), now);
                    Ok(OpResult::Done)
                }
                None => Err(CmqError::queue_not_found(&key.name)),
            },
            Op::RewindQueue { key, start_ms } => self.rewind(key, *start_ms, now),
            Op::Send {
                key,
                bodies,
                delay_seconds,
            } => self.send(key, bodies.clone(), *delay_seconds, now),
            Op::Receive { key, max } => self.receive(key, *max, now),
            Op::Delete { key, receipts } => self.delete(key, receipts, now),
            Op::Transfers {
                source_group,
                items,
            } => {
                for item in items {
                    let seen = self
                        .transfers_applied
                        .get(source_group)
                        .copied()
                        .unwrap_or(0);
                    if item.id > seen {
                        self.transfers_applied.insert(*source_group, item.id);
                        // A queue deleted meanwhile drops the message, as CMQ does.
                        if self.queues.contains_key(&item.key) {
                            self.enqueue(&item.key, Bytes::from(item.body.clone()), now, 0);
                        }
                    }
                }
                Ok(OpResult::Done)
            }
            Op::AckTransfers { ids } => {
                for id in ids {
                    self.outbox.remove(id);
                }
                Ok(OpResult::Done)
            }
            Op::Tick => {
                let keys: Vec<QueueKey> = self.queues.keys().cloned().collect();
                for key in keys {
                    self.housekeep(&key, now);
                }
                self.deleted_names
                    .retain(|_, &mut at| at + NAME_REUSE_DELAY_MS > now);
                self.expire_topic_messages(now);
                self.deleted_topic_names
                    .retain(|_, &mut at| at + NAME_REUSE_DELAY_MS > now);
                Ok(OpResult::Done)
            }
            Op::CreateTopic {
                tenant,
                name,
                filter_type,
                max_msg_size,
            } => self.create_topic(tenant, name, *filter_type, *max_msg_size, now),
            Op::SetTopicAttributes { key, max_msg_size } => self.topic_mut(key).map(|t| {
                t.max_msg_size = *max_msg_size;
                t.modified_ms = now;
                OpResult::Done
            }),
            Op::DeleteTopic { key } => self.delete_topic(key, now),
            Op::Publish {
                key,
                bodies,
                tags,
                routing_key,
                reject_unmatched,
            } => self.publish(key, bodies, tags, routing_key, *reject_unmatched, now),
            Op::Subscribe { key, spec } => self.subscribe(key, spec, now),
            Op::SetSubscription { key, name, patch } => {
                self.set_subscription(key, name, patch, now)
            }
            Op::Unsubscribe { key, name } => self.unsubscribe(key, name),
            Op::PushResults { key, results } => {
                self.push_results(key, results);
                Ok(OpResult::Done)
            }
            Op::CreateCredential {
                secret_id,
                secret_key,
                app_id,
            } => {
                if self.credentials.contains_key(secret_id) {
                    return OpResult::Failed(CmqError::invalid(10000, "SecretId already exists"));
                }
                self.credentials.insert(
                    secret_id.clone(),
                    Credential {
                        secret_key: secret_key.clone(),
                        app_id: *app_id,
                        created_ms: now,
                        revoked: false,
                    },
                );
                Ok(OpResult::Done)
            }
            Op::RevokeCredential { secret_id } => match self.credentials.get_mut(secret_id) {
                Some(c) => {
                    c.revoked = true;
                    Ok(OpResult::Done)
                }
                None => Err(CmqError::new(
                    CmqCode::NotFound,
                    10270,
                    format!("SecretId {secret_id:?} does not exist"),
                )),
            },
        };
        r.unwrap_or_else(OpResult::Failed)
    }

    fn create(
        &mut self,
        tenant: &str,
        name: &str,
        attrs: &QueueAttributes,
        now: i64,
    ) -> Result<OpResult, CmqError> {
        let key = QueueKey::new(tenant, name);
        if self.queues.contains_key(&key) {
            return Err(CmqError::new(
                CmqCode::AlreadyExists,
                10570,
                format!("queue {name:?} already exists (names are case-insensitive)"),
            ));
        }
        if let Some(&at) = self.deleted_names.get(&key) {
            if at + NAME_REUSE_DELAY_MS > now {
                return Err(CmqError::new(
                    CmqCode::RecreatedTooSoon,
                    10660,
                    format!("queue {name:?} was deleted less than 10 s ago"),
                ));
            }
        }
        let queue_id = format!("queue-{}-{}", self.group, self.next_queue_num);
        self.next_queue_num += 1;
        self.queues.insert(
            key,
            Queue::new(queue_id.clone(), name.to_string(), attrs.clone(), now),
        );
        Ok(OpResult::Created { queue_id })
    }

    fn rewind(&mut self, key: &QueueKey, start_ms: i64, now: i64) -> Result<OpResult, CmqError> {
        let q = self.queue_mut(key)?;
        if q.attrs.rewind_seconds == 0 {
            return Err(CmqError::new(
                CmqCode::RewindDisabled,
                10670,
                "queue cannot be rewound: rewindSeconds is 0",
            ));
        }
        let earliest = now - i64::from(q.attrs.rewind_seconds) * 1000;
        if start_ms > now || start_ms < earliest - 999 {
            return Err(CmqError::invalid(
                10680,
                format!(
                    "startConsumeTime must be within the rewind window ({} to {})",
                    earliest / 1000,
                    now / 1000
                ),
            ));
        }
        q.expire(now);
        q.rewind(start_ms, now);
        Ok(OpResult::Done)
    }

    /// Puts a message into a queue of this tenant: here if the queue lives in this group (gone
    /// queues drop it), otherwise into the outbox for its group.
    pub(crate) fn route_to_queue(&mut self, key: &QueueKey, body: Bytes, now: i64) {
        let target_group = group_of(key, self.data_groups);
        if target_group == self.group {
            if self.queues.contains_key(key) {
                self.enqueue(key, body, now, 0);
            }
        } else {
            let id = self.next_transfer_id;
            self.next_transfer_id += 1;
            self.outbox.insert(
                id,
                OutboxEntry {
                    target_group,
                    key: key.clone(),
                    body: body.to_vec(),
                },
            );
        }
    }

    pub(crate) fn enqueue(&mut self, key: &QueueKey, body: Bytes, now: i64, delay: u32) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        let q = self
            .queues
            .get_mut(key)
            .expect("caller checked the queue exists");
        q.insert(seq, body, now, delay);
        if self.woken.0.last() != Some(key) {
            self.woken.0.push(key.clone());
        }
        seq
    }

    fn send(
        &mut self,
        key: &QueueKey,
        bodies: Vec<Bytes>,
        delay: u32,
        now: i64,
    ) -> Result<OpResult, CmqError> {
        let q = self.queue_mut(key)?;
        q.expire(now);
        if q.live_count() + bodies.len() as u64 > q.attrs.max_msg_heap_num {
            return Err(CmqError::new(
                CmqCode::HeapFull,
                10240,
                format!(
                    "queue holds maxMsgHeapNum={} messages",
                    q.attrs.max_msg_heap_num
                ),
            ));
        }
        // Limits were checked by the front end; re-checked here against the queue's size limit
        // because it may have changed between check and commit.
        for b in &bodies {
            meridian_api::limits::validate_body(b, q.attrs.max_msg_size)?;
        }
        let mut msg_ids = Vec::with_capacity(bodies.len());
        for b in bodies {
            let seq = self.enqueue(key, b, now, delay);
            msg_ids.push(self.msg_id(seq));
        }
        Ok(OpResult::Sent { msg_ids })
    }

    /// Expiry plus dead-lettering of messages that are due, ahead of a receive or on a tick.
    fn housekeep(&mut self, key: &QueueKey, now: i64) {
        let Some(q) = self.queues.get_mut(key) else {
            return;
        };
        q.expire(now);
        let Some(policy) = q.attrs.dead_letter_policy.clone() else {
            return;
        };
        let due: Vec<u64> = match policy.policy {
            DeadLetterTrigger::MaxReceiveCount(n) => q
                .ready
                .range(..=(now, u64::MAX))
                .filter(|(_, seq)| q.messages[seq].dequeue_count >= n)
                .map(|&(_, seq)| seq)
                .collect(),
            DeadLetterTrigger::MaxTimeToLive(ttl) => {
                let limit = now - i64::from(ttl) * 1000;
                q.messages
                    .iter()
                    .filter(|(_, m)| m.deleted_ms.is_none() && m.enqueue_ms <= limit)
                    .map(|(&s, _)| s)
                    .collect()
            }
        };
        if due.is_empty() {
            return;
        }
        let dlq = QueueKey::new(&key.tenant, &policy.dead_letter_queue);
        let mut moved = Vec::with_capacity(due.len());
        for seq in due {
            if let Some(m) = q.remove(seq) {
                moved.push((seq, m.body));
            }
        }
        for (seq, body) in moved {
            // Read while its row is still there: the removal reaches the rows only with the
            // next write of them, after this apply. Every replica reads the same bytes; one
            // that cannot must not go on with a state the others do not have.
            let Some(body) = body.or_else(|| self.bodies.read(key, seq)) else {
                panic!(
                    "group {}: the body row of message {seq} of queue {:?}, being dead-lettered, \
                     is missing or unreadable. This node's state rows are damaged: stop it, \
                     delete its data directory and start it again to resync from its peers",
                    self.group, key.name
                );
            };
            self.route_to_queue(&dlq, body, now);
        }
    }

    fn receive(&mut self, key: &QueueKey, max: u32, now: i64) -> Result<OpResult, CmqError> {
        self.queue(key)?;
        self.housekeep(key, now);
        let group = self.group;
        let q = self.queues.get_mut(key).expect("checked above");
        let visible_until = now + i64::from(q.attrs.visibility_timeout) * 1000;
        let seqs: Vec<u64> = q
            .ready
            .range(..=(now, u64::MAX))
            .take(max as usize)
            .map(|&(_, s)| s)
            .collect();
        let mut messages = Vec::with_capacity(seqs.len());
        let queue_id = q.queue_id.clone();
        for seq in seqs {
            let m = q.take(seq, now, visible_until);
            messages.push(Delivered {
                queue_id: queue_id.clone(),
                seq,
                msg_id: msg_id(group, seq),
                // A body only in the rows is read by the leader that answers the receive
                // (`StateMachineStore::read_bodies`), not by every replica here.
                body: m.body.as_ref().map_or_else(Vec::new, |b| b.to_vec()),
                body_in_rows: m.body.is_none(),
                enqueue_ms: m.enqueue_ms,
                first_dequeue_ms: m.first_dequeue_ms,
                next_visible_ms: m.visible_ms,
                dequeue_count: m.dequeue_count,
            });
        }
        let next_visible_ms = q.next_visible_after(now);
        Ok(OpResult::Received {
            messages,
            next_visible_ms,
        })
    }

    fn delete(
        &mut self,
        key: &QueueKey,
        receipts: &[Receipt],
        now: i64,
    ) -> Result<OpResult, CmqError> {
        let q = self.queue_mut(key)?;
        let outcomes = receipts
            .iter()
            .map(|r| {
                let valid = q.messages.get(&r.seq).is_some_and(|m| {
                    m.deleted_ms.is_none() && m.dequeue_count == r.generation && m.visible_ms > now
                });
                if valid {
                    q.mark_deleted(r.seq, now);
                    None
                } else {
                    Some(CmqError::invalid_handle(
                        "invalid receiptHandle: expired, superseded by a later receive, or already deleted",
                    ))
                }
            })
            .collect();
        Ok(OpResult::Deleted { outcomes })
    }

    /// Queues of this group whose dead-letter policy points at `dlq`.
    pub fn dead_letter_sources<'a>(&'a self, dlq: &'a QueueKey) -> impl Iterator<Item = &'a Queue> {
        self.queues.iter().filter_map(move |(k, q)| {
            let p = q.attrs.dead_letter_policy.as_ref()?;
            (k.tenant == dlq.tenant && p.dead_letter_queue.eq_ignore_ascii_case(&dlq.name))
                .then_some(q)
        })
    }
}
