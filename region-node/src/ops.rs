//! The queue operations every front end (gRPC, CMQ HTTP) offers, per tenant: validation at the
//! edge, then execution on the leader of the queue's group via [`RegionNode::execute`].

use bytes::Bytes;
use std::sync::Arc;

use meridian_api::limits::{
    self, QueueAttributes, QueueAttributesPatch, MAX_BATCH_BYTES, MAX_DLQ_SOURCES,
};
use meridian_api::{CmqCode, CmqError, CmqResult};

use crate::command::{Delivered, Op, OpResult, QueueKey, Receipt};
use crate::node::{GroupReply, GroupRequest, QueueView, RegionNode};
use crate::placement::META_GROUP;

/// A message as a consumer receives it, with its signed receipt handle; times in Unix seconds.
#[derive(Debug, Clone)]
pub struct ReceivedMessage {
    pub msg_id: String,
    pub body: Vec<u8>,
    pub receipt_handle: String,
    pub enqueue_time: i64,
    pub first_dequeue_time: i64,
    pub next_visible_time: i64,
    pub dequeue_count: u32,
}

/// One page of a queue listing.
#[derive(Debug, Clone)]
pub struct QueuePage {
    pub total: u64,
    /// `(name, queue_id)`.
    pub queues: Vec<(String, String)>,
}

#[derive(Clone)]
pub struct QueueOps {
    pub node: Arc<RegionNode>,
}

pub(crate) fn unexpected(what: &str) -> CmqError {
    CmqError::internal(format!("unexpected reply to {what}"))
}

impl QueueOps {
    pub fn new(node: Arc<RegionNode>) -> Self {
        Self { node }
    }

    fn key(&self, tenant: &str, name: &str) -> CmqResult<QueueKey> {
        limits::validate_name(name)?;
        Ok(QueueKey::new(tenant, name))
    }

    /// Executes `op` on the leader of the group that owns `key` (a queue's or a topic's).
    pub(crate) async fn write(&self, key: &QueueKey, op: Op) -> CmqResult<OpResult> {
        match self
            .node
            .execute(self.node.group_of(key), GroupRequest::Write(op))
            .await?
        {
            GroupReply::Op(r) => Ok(r),
            _ => Err(unexpected("write")),
        }
    }

    async fn view(&self, key: &QueueKey) -> CmqResult<QueueView> {
        let req = GroupRequest::GetQueue { key: key.clone() };
        match self.node.execute(self.node.group_of(key), req).await? {
            GroupReply::Queue(v) => Ok(v),
            _ => Err(unexpected("get queue")),
        }
    }

    /// Runs `req` on every data group and concatenates the `(name, id)` lists, sorted by name.
    pub(crate) async fn fan_out(&self, req: GroupRequest) -> CmqResult<Vec<(String, String)>> {
        let calls = (1..=self.node.data_groups()).map(|g| self.node.execute(g, req.clone()));
        let mut all = Vec::new();
        for r in futures::future::join_all(calls).await {
            match r? {
                GroupReply::Queues(q) => all.extend(q),
                _ => return Err(unexpected("list")),
            }
        }
        all.sort_by_key(|a| a.0.to_ascii_lowercase());
        Ok(all)
    }

    /// Checks a dead-letter policy against the region: the DLQ exists, is not itself a source,
    /// is not the queue itself, and has room for one more source.
    async fn check_dead_letter(&self, source: &QueueKey, attrs: &QueueAttributes) -> CmqResult<()> {
        let Some(p) = &attrs.dead_letter_policy else {
            return Ok(());
        };
        let dlq = QueueKey::new(&source.tenant, &p.dead_letter_queue);
        if &dlq == source {
            return Err(CmqError::invalid(
                10740,
                "a queue cannot be its own dead-letter queue",
            ));
        }
        let view = self.view(&dlq).await.map_err(|e| match e.code {
            CmqCode::NotFound => CmqError::invalid(
                10730,
                format!("dead-letter queue {:?} does not exist", p.dead_letter_queue),
            ),
            _ => e,
        })?;
        if view.attrs.dead_letter_policy.is_some() {
            return Err(CmqError::invalid(
                10740,
                "a dead-letter queue cannot have a dead-letter policy of its own (no nesting)",
            ));
        }
        let sources = self
            .fan_out(GroupRequest::DeadLetterSources { dlq })
            .await?;
        let others = sources
            .iter()
            .filter(|(n, _)| !n.eq_ignore_ascii_case(&source.name))
            .count();
        if others >= MAX_DLQ_SOURCES {
            return Err(CmqError::invalid(
                10780,
                format!("dead-letter queue already has {MAX_DLQ_SOURCES} source queues"),
            ));
        }
        Ok(())
    }

    pub async fn create(
        &self,
        tenant: &str,
        name: &str,
        patch: &QueueAttributesPatch,
    ) -> CmqResult<String> {
        let key = self.key(tenant, name)?;
        let attrs = patch.apply_to(&QueueAttributes::default())?;
        self.check_dead_letter(&key, &attrs).await?;
        // Counted across groups before the create: concurrent creates may overshoot slightly.
        let existing = self
            .fan_out(GroupRequest::ListQueues {
                tenant: tenant.into(),
                search: String::new(),
            })
            .await?
            .len();
        if existing >= limits::MAX_QUEUES_PER_TENANT {
            return Err(CmqError::new(
                CmqCode::LimitReached,
                10220,
                format!(
                    "tenant already has {existing} queues (limit {})",
                    limits::MAX_QUEUES_PER_TENANT
                ),
            ));
        }
        let op = Op::CreateQueue {
            tenant: tenant.to_string(),
            name: name.to_string(),
            attrs,
        };
        match self.write(&key, op).await? {
            OpResult::Created { queue_id } => Ok(queue_id),
            _ => Err(unexpected("create")),
        }
    }

    pub async fn get(&self, tenant: &str, name: &str) -> CmqResult<QueueView> {
        self.view(&self.key(tenant, name)?).await
    }

    pub async fn set(
        &self,
        tenant: &str,
        name: &str,
        patch: QueueAttributesPatch,
    ) -> CmqResult<QueueView> {
        let key = self.key(tenant, name)?;
        let current = self.view(&key).await?;
        let merged = patch.apply_to(&current.attrs)?;
        if patch.dead_letter_policy.is_some() {
            self.check_dead_letter(&key, &merged).await?;
        }
        self.write(
            &key,
            Op::SetQueueAttributes {
                key: key.clone(),
                patch,
            },
        )
        .await?;
        self.view(&key).await
    }

    pub async fn list(
        &self,
        tenant: &str,
        search: &str,
        offset: u32,
        limit: Option<u32>,
    ) -> CmqResult<QueuePage> {
        let (offset, limit) = limits::list_window(offset, limit)?;
        let all = self
            .fan_out(GroupRequest::ListQueues {
                tenant: tenant.into(),
                search: search.into(),
            })
            .await?;
        Ok(QueuePage {
            total: all.len() as u64,
            queues: all.into_iter().skip(offset).take(limit).collect(),
        })
    }

    pub async fn delete_queue(&self, tenant: &str, name: &str) -> CmqResult<()> {
        let key = self.key(tenant, name)?;
        let sources = self
            .fan_out(GroupRequest::DeadLetterSources { dlq: key.clone() })
            .await?;
        if let Some((src, _)) = sources.first() {
            return Err(CmqError::invalid(
                10750,
                format!("queue is the dead-letter queue of {src:?}; unbind it first"),
            ));
        }
        self.write(&key, Op::DeleteQueue { key: key.clone() })
            .await?;
        Ok(())
    }

    pub async fn rewind(&self, tenant: &str, name: &str, start_seconds: i64) -> CmqResult<()> {
        let key = self.key(tenant, name)?;
        let start_ms = start_seconds
            .checked_mul(1000)
            .filter(|&t| t >= 0)
            .ok_or_else(|| {
                CmqError::invalid(10680, "startConsumeTime must be a Unix time in seconds")
            })?;
        self.write(
            &key,
            Op::RewindQueue {
                key: key.clone(),
                start_ms,
            },
        )
        .await?;
        Ok(())
    }

    pub async fn unbind_dead_letter(&self, tenant: &str, name: &str) -> CmqResult<()> {
        let patch = QueueAttributesPatch {
            dead_letter_policy: Some(None),
            ..Default::default()
        };
        self.set(tenant, name, patch).await.map(|_| ())
    }

    pub async fn dead_letter_sources(
        &self,
        tenant: &str,
        dlq_name: &str,
        search: &str,
        offset: u32,
        limit: Option<u32>,
    ) -> CmqResult<QueuePage> {
        let dlq = self.key(tenant, dlq_name)?;
        let (offset, limit) = limits::list_window(offset, limit)?;
        self.view(&dlq).await?;
        let search = search.to_ascii_lowercase();
        let all: Vec<_> = self
            .fan_out(GroupRequest::DeadLetterSources { dlq })
            .await?
            .into_iter()
            .filter(|(n, _)| n.to_ascii_lowercase().contains(&search))
            .collect();
        Ok(QueuePage {
            total: all.len() as u64,
            queues: all.into_iter().skip(offset).take(limit).collect(),
        })
    }

    pub async fn send(
        &self,
        tenant: &str,
        name: &str,
        bodies: Vec<Vec<u8>>,
        delay: u32,
    ) -> CmqResult<Vec<String>> {
        let key = self.key(tenant, name)?;
        limits::validate_batch_len("msgBody", bodies.len())?;
        limits::validate_delay(delay)?;
        let total: usize = bodies.iter().map(Vec::len).sum();
        if total > MAX_BATCH_BYTES {
            return Err(CmqError::new(
                CmqCode::BatchTooLarge,
                10300,
                format!("total message size {total} exceeds {MAX_BATCH_BYTES} bytes"),
            ));
        }
        for b in &bodies {
            limits::validate_body(b, limits::MAX_MSG_SIZE_LIMIT)?;
        }
        match self
            .write(
                &key,
                Op::Send {
                    key: key.clone(),
                    bodies: bodies.into_iter().map(Bytes::from).collect(),
                    delay_seconds: delay,
                },
            )
            .await?
        {
            OpResult::Sent { msg_ids } => Ok(msg_ids),
            _ => Err(unexpected("send")),
        }
    }

    /// Receives up to `max` messages, long-polling up to `wait` seconds (`None`: the queue's
    /// pollingWaitSeconds). No message is error 7000.
    pub async fn receive(
        &self,
        tenant: &str,
        name: &str,
        max: u32,
        wait: Option<u32>,
    ) -> CmqResult<Vec<ReceivedMessage>> {
        let key = self.key(tenant, name)?;
        limits::validate_batch_len("numOfMsg", max as usize)?;
        if let Some(w) = wait {
            limits::validate_polling_wait(w)?;
        }
        let group = self.node.group_of(&key);
        let req = GroupRequest::Receive {
            key: key.clone(),
            max,
            wait_ms: wait.map(|w| u64::from(w) * 1000),
        };
        match self.node.execute(group, req).await? {
            GroupReply::Op(OpResult::Received { messages, .. }) if !messages.is_empty() => {
                Ok(messages
                    .into_iter()
                    .map(|d| self.sign(&key, group, d))
                    .collect())
            }
            GroupReply::Op(OpResult::Received { .. }) => Err(CmqError::no_message()),
            _ => Err(unexpected("receive")),
        }
    }

    fn sign(&self, key: &QueueKey, group: u32, d: Delivered) -> ReceivedMessage {
        let receipt_handle = self.node.receipts.sign(
            key,
            group,
            Receipt {
                seq: d.seq,
                generation: d.dequeue_count,
            },
        );
        ReceivedMessage {
            msg_id: d.msg_id,
            body: d.body,
            receipt_handle,
            enqueue_time: d.enqueue_ms / 1000,
            first_dequeue_time: d.first_dequeue_ms / 1000,
            next_visible_time: d.next_visible_ms / 1000,
            dequeue_count: d.dequeue_count,
        }
    }

    /// Deletes by handle; one outcome per handle, in order.
    pub async fn delete_messages(
        &self,
        tenant: &str,
        name: &str,
        handles: &[String],
    ) -> CmqResult<Vec<Option<CmqError>>> {
        let key = self.key(tenant, name)?;
        limits::validate_batch_len("receiptHandle", handles.len())?;
        let group = self.node.group_of(&key);
        let mut outcomes: Vec<Option<CmqError>> = vec![None; handles.len()];
        let mut receipts = Vec::new();
        let mut positions = Vec::new();
        for (i, h) in handles.iter().enumerate() {
            match self.node.receipts.verify(&key, group, h) {
                Ok(r) => {
                    receipts.push(r);
                    positions.push(i);
                }
                Err(e) => outcomes[i] = Some(e),
            }
        }
        if receipts.is_empty() {
            // A missing queue is still 4440 rather than 4430.
            self.view(&key).await?;
            return Ok(outcomes);
        }
        match self
            .write(
                &key,
                Op::Delete {
                    key: key.clone(),
                    receipts,
                },
            )
            .await?
        {
            OpResult::Deleted { outcomes: applied } => {
                for (pos, o) in positions.into_iter().zip(applied) {
                    outcomes[pos] = o;
                }
                Ok(outcomes)
            }
            _ => Err(unexpected("delete")),
        }
    }
}

/// A credential as listed (never with its secret key).
#[derive(Debug, Clone)]
pub struct CredentialSummary {
    pub secret_id: String,
    pub app_id: u64,
    pub created_ms: i64,
    pub revoked: bool,
}

fn random_alnum(n: usize) -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    (0..n)
        .map(|_| CHARS[rng.gen_range(0..CHARS.len())] as char)
        .collect()
}

impl QueueOps {
    /// Creates a SecretId/SecretKey pair for tenant `app_id`; returns both.
    pub async fn create_credential(&self, app_id: u64) -> CmqResult<(String, String)> {
        // CMQ SecretIds begin with AKID (SDKs and error 10450 rely on it).
        let secret_id = format!("AKID{}", random_alnum(32));
        let secret_key = random_alnum(32);
        let op = Op::CreateCredential {
            secret_id: secret_id.clone(),
            secret_key: secret_key.clone(),
            app_id,
        };
        self.node
            .execute(META_GROUP, GroupRequest::Write(op))
            .await?;
        Ok((secret_id, secret_key))
    }

    pub async fn list_credentials(&self) -> CmqResult<Vec<CredentialSummary>> {
        match self
            .node
            .execute(META_GROUP, GroupRequest::ListCredentials)
            .await?
        {
            GroupReply::Credentials(c) => Ok(c
                .into_iter()
                .map(
                    |(secret_id, app_id, created_ms, revoked)| CredentialSummary {
                        secret_id,
                        app_id,
                        created_ms,
                        revoked,
                    },
                )
                .collect()),
            _ => Err(unexpected("list credentials")),
        }
    }

    pub async fn revoke_credential(&self, secret_id: &str) -> CmqResult<()> {
        let op = Op::RevokeCredential {
            secret_id: secret_id.to_string(),
        };
        self.node
            .execute(META_GROUP, GroupRequest::Write(op))
            .await?;
        Ok(())
    }
}

/// The CMQ code of a batch delete: 0 all deleted, 6010 some failed, 6020 all failed.
pub fn batch_delete_code(outcomes: &[Option<CmqError>]) -> u32 {
    match outcomes.iter().filter(|o| o.is_some()).count() {
        0 => 0,
        n if n == outcomes.len() => CmqCode::BatchDeleteFailed.as_u32(),
        _ => CmqCode::BatchDeletePartial.as_u32(),
    }
}
