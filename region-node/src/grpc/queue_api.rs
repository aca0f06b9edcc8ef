//! The client-facing gRPC queue API: validation at the edge, then execution on the leader of
//! the queue's group via [`RegionNode::execute`].

use std::sync::Arc;

use meridian_api::limits::{
    self, DeadLetterPolicy, QueueAttributes, QueueAttributesPatch, MAX_BATCH_BYTES, MAX_DLQ_SOURCES,
};
use meridian_api::pb::queue_service_server::QueueService;
use meridian_api::pb::*;
use meridian_api::{CmqCode, CmqError, CmqResult};
use tonic::{Request, Response, Status};

use crate::command::{Delivered, Op, OpResult, QueueKey};
use crate::node::{GroupReply, GroupRequest, QueueView, RegionNode};

/// The tenant of requests that carry no credentials (gRPC has no tenancy yet).
pub const DEFAULT_TENANT: &str = "";

pub struct QueueApi {
    pub node: Arc<RegionNode>,
}

type Reply<T> = Result<Response<T>, Status>;

fn ok<T>(r: CmqResult<T>) -> Reply<T> {
    r.map(Response::new).map_err(|e| e.to_status())
}

fn unexpected(what: &str) -> CmqError {
    CmqError::internal(format!("unexpected reply to {what}"))
}

fn patch_from(a: Option<QueueAttributes_>) -> CmqResult<QueueAttributesPatch> {
    let Some(a) = a else {
        return Ok(QueueAttributesPatch::default());
    };
    let dead_letter_policy = match a.dead_letter_policy.as_deref() {
        None => None,
        Some("") => Some(None),
        Some(json) => Some(Some(DeadLetterPolicy::parse_json(json)?)),
    };
    Ok(QueueAttributesPatch {
        max_msg_heap_num: a.max_msg_heap_num,
        polling_wait_seconds: a.polling_wait_seconds,
        visibility_timeout: a.visibility_timeout,
        max_msg_size: a.max_msg_size,
        msg_retention_seconds: a.msg_retention_seconds,
        rewind_seconds: a.rewind_seconds,
        dead_letter_policy,
    })
}

use meridian_api::pb::QueueAttributes as QueueAttributes_;

fn view_to_pb(v: QueueView) -> QueueAttributesReply {
    QueueAttributesReply {
        queue_id: v.queue_id,
        queue_name: v.name,
        max_msg_heap_num: v.attrs.max_msg_heap_num,
        polling_wait_seconds: v.attrs.polling_wait_seconds,
        visibility_timeout: v.attrs.visibility_timeout,
        max_msg_size: v.attrs.max_msg_size,
        msg_retention_seconds: v.attrs.msg_retention_seconds,
        rewind_seconds: v.attrs.rewind_seconds,
        dead_letter_policy: v
            .attrs
            .dead_letter_policy
            .map(|p| p.to_json())
            .unwrap_or_default(),
        create_time: v.created_ms / 1000,
        last_modify_time: v.modified_ms / 1000,
        active_msg_num: v.active,
        inactive_msg_num: v.inactive,
        delay_msg_num: v.delayed,
        rewind_msg_num: v.rewindable,
        min_msg_time: v.min_msg_ms / 1000,
        group: v.group,
    }
}

impl QueueApi {
    fn key(&self, name: &str) -> CmqResult<QueueKey> {
        limits::validate_name(name)?;
        Ok(QueueKey::new(DEFAULT_TENANT, name))
    }

    async fn write(&self, key: &QueueKey, op: Op) -> CmqResult<OpResult> {
        match self
            .node
            .execute(self.node.group_of(key), GroupRequest::Write(op))
            .await?
        {
            GroupReply::Op(r) => Ok(r),
            _ => Err(unexpected("write")),
        }
    }

    pub async fn get_view(&self, key: &QueueKey) -> CmqResult<QueueView> {
        let req = GroupRequest::GetQueue { key: key.clone() };
        match self.node.execute(self.node.group_of(key), req).await? {
            GroupReply::Queue(v) => Ok(v),
            _ => Err(unexpected("get queue")),
        }
    }

    /// Runs `req` on every data group and concatenates the `(name, id)` lists, sorted by name.
    async fn fan_out(&self, req: GroupRequest) -> CmqResult<Vec<(String, String)>> {
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
        let view = self.get_view(&dlq).await.map_err(|e| match e.code {
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

    async fn receive(
        &self,
        name: &str,
        max: u32,
        wait: Option<u32>,
    ) -> CmqResult<(QueueKey, u32, Vec<Delivered>)> {
        let key = self.key(name)?;
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
                Ok((key, group, messages))
            }
            GroupReply::Op(OpResult::Received { .. }) => Err(CmqError::no_message()),
            _ => Err(unexpected("receive")),
        }
    }

    fn to_pb(&self, key: &QueueKey, group: u32, d: Delivered) -> ReceivedMessage {
        let handle = self.node.receipts.sign(
            key,
            group,
            crate::command::Receipt {
                seq: d.seq,
                generation: d.dequeue_count,
            },
        );
        ReceivedMessage {
            msg_id: d.msg_id,
            msg_body: d.body,
            receipt_handle: handle,
            enqueue_time: d.enqueue_ms / 1000,
            first_dequeue_time: d.first_dequeue_ms / 1000,
            next_visible_time: d.next_visible_ms / 1000,
            dequeue_count: d.dequeue_count,
        }
    }

    /// Deletes by handle; one outcome per handle, in order.
    pub async fn delete_handles(
        &self,
        name: &str,
        handles: &[String],
    ) -> CmqResult<Vec<Option<CmqError>>> {
        let key = self.key(name)?;
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
            // Still answer 4440 for a missing queue rather than 4430.
            self.get_view(&key).await?;
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

    pub async fn send(
        &self,
        name: &str,
        bodies: Vec<Vec<u8>>,
        delay: u32,
    ) -> CmqResult<Vec<String>> {
        let key = self.key(name)?;
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
                    bodies,
                    delay_seconds: delay,
                },
            )
            .await?
        {
            OpResult::Sent { msg_ids } => Ok(msg_ids),
            _ => Err(unexpected("send")),
        }
    }
}

#[tonic::async_trait]
impl QueueService for QueueApi {
    async fn create_queue(&self, req: Request<CreateQueueRequest>) -> Reply<CreateQueueReply> {
        let r = req.into_inner();
        ok(async {
            let key = self.key(&r.queue_name)?;
            let attrs = patch_from(r.attributes)?.apply_to(&QueueAttributes::default())?;
            self.check_dead_letter(&key, &attrs).await?;
            let op = Op::CreateQueue {
                tenant: key.tenant.clone(),
                name: r.queue_name.clone(),
                attrs,
            };
            match self.write(&key, op).await? {
                OpResult::Created { queue_id } => Ok(CreateQueueReply { queue_id }),
                _ => Err(unexpected("create")),
            }
        }
        .await)
    }

    async fn get_queue_attributes(
        &self,
        req: Request<QueueNameRequest>,
    ) -> Reply<QueueAttributesReply> {
        let r = req.into_inner();
        ok(async { Ok(view_to_pb(self.get_view(&self.key(&r.queue_name)?).await?)) }.await)
    }

    async fn set_queue_attributes(
        &self,
        req: Request<SetQueueAttributesRequest>,
    ) -> Reply<QueueAttributesReply> {
        let r = req.into_inner();
        ok(async {
            let key = self.key(&r.queue_name)?;
            let patch = patch_from(r.attributes)?;
            let current = self.get_view(&key).await?;
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
            Ok(view_to_pb(self.get_view(&key).await?))
        }
        .await)
    }

    async fn list_queue(&self, req: Request<ListQueueRequest>) -> Reply<ListQueueReply> {
        let r = req.into_inner();
        ok(async {
            let (offset, limit) = limits::list_window(r.offset, r.limit)?;
            let all = self
                .fan_out(GroupRequest::ListQueues {
                    tenant: DEFAULT_TENANT.into(),
                    search: r.search_word.clone(),
                })
                .await?;
            Ok(ListQueueReply {
                total_count: all.len() as u64,
                queues: all
                    .into_iter()
                    .skip(offset)
                    .take(limit)
                    .map(|(queue_name, queue_id)| QueueSummary {
                        queue_id,
                        queue_name,
                    })
                    .collect(),
            })
        }
        .await)
    }

    async fn delete_queue(&self, req: Request<QueueNameRequest>) -> Reply<Empty> {
        let r = req.into_inner();
        ok(async {
            let key = self.key(&r.queue_name)?;
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
            Ok(Empty {})
        }
        .await)
    }

    async fn rewind_queue(&self, req: Request<RewindQueueRequest>) -> Reply<Empty> {
        let r = req.into_inner();
        ok(async {
            let key = self.key(&r.queue_name)?;
            let start_ms = r
                .start_consume_time
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
            Ok(Empty {})
        }
        .await)
    }

    async fn unbind_dead_letter_queue(&self, req: Request<QueueNameRequest>) -> Reply<Empty> {
        let r = req.into_inner();
        ok(async {
            let key = self.key(&r.queue_name)?;
            let patch = QueueAttributesPatch {
                dead_letter_policy: Some(None),
                ..Default::default()
            };
            self.write(
                &key,
                Op::SetQueueAttributes {
                    key: key.clone(),
                    patch,
                },
            )
            .await?;
            Ok(Empty {})
        }
        .await)
    }

    async fn list_dead_letter_source_queues(
        &self,
        req: Request<ListDeadLetterSourceQueuesRequest>,
    ) -> Reply<ListQueueReply> {
        let r = req.into_inner();
        ok(async {
            let dlq = self.key(&r.dead_letter_queue_name)?;
            let (offset, limit) = limits::list_window(r.offset, r.limit)?;
            self.get_view(&dlq).await?;
            let search = r.search_word.to_ascii_lowercase();
            let all: Vec<_> = self
                .fan_out(GroupRequest::DeadLetterSources { dlq })
                .await?
                .into_iter()
                .filter(|(n, _)| n.to_ascii_lowercase().contains(&search))
                .collect();
            Ok(ListQueueReply {
                total_count: all.len() as u64,
                queues: all
                    .into_iter()
                    .skip(offset)
                    .take(limit)
                    .map(|(queue_name, queue_id)| QueueSummary {
                        queue_id,
                        queue_name,
                    })
                    .collect(),
            })
        }
        .await)
    }

    async fn send_message(&self, req: Request<SendMessageRequest>) -> Reply<SendMessageReply> {
        let r = req.into_inner();
        ok(async {
            let mut ids = self
                .send(&r.queue_name, vec![r.msg_body], r.delay_seconds)
                .await?;
            Ok(SendMessageReply {
                msg_id: ids.pop().unwrap_or_default(),
            })
        }
        .await)
    }

    async fn batch_send_message(
        &self,
        req: Request<BatchSendMessageRequest>,
    ) -> Reply<BatchSendMessageReply> {
        let r = req.into_inner();
        ok(async {
            limits::validate_batch_len("msgBody", r.msg_body.len())?;
            let msg_id = self
                .send(&r.queue_name, r.msg_body, r.delay_seconds)
                .await?;
            Ok(BatchSendMessageReply { msg_id })
        }
        .await)
    }

    async fn receive_message(&self, req: Request<ReceiveMessageRequest>) -> Reply<ReceivedMessage> {
        let r = req.into_inner();
        ok(async {
            let (key, group, mut msgs) = self
                .receive(&r.queue_name, 1, r.polling_wait_seconds)
                .await?;
            let m = msgs.pop().ok_or_else(CmqError::no_message)?;
            Ok(self.to_pb(&key, group, m))
        }
        .await)
    }

    async fn batch_receive_message(
        &self,
        req: Request<BatchReceiveMessageRequest>,
    ) -> Reply<BatchReceiveMessageReply> {
        let r = req.into_inner();
        ok(async {
            limits::validate_batch_len("numOfMsg", r.num_of_msg as usize)?;
            let (key, group, msgs) = self
                .receive(&r.queue_name, r.num_of_msg, r.polling_wait_seconds)
                .await?;
            Ok(BatchReceiveMessageReply {
                messages: msgs
                    .into_iter()
                    .map(|m| self.to_pb(&key, group, m))
                    .collect(),
            })
        }
        .await)
    }

    async fn delete_message(&self, req: Request<DeleteMessageRequest>) -> Reply<Empty> {
        let r = req.into_inner();
        ok(async {
            let mut outcomes = self
                .delete_handles(&r.queue_name, &[r.receipt_handle])
                .await?;
            match outcomes.pop().flatten() {
                Some(e) => Err(e),
                None => Ok(Empty {}),
            }
        }
        .await)
    }

    async fn batch_delete_message(
        &self,
        req: Request<BatchDeleteMessageRequest>,
    ) -> Reply<BatchDeleteMessageReply> {
        let r = req.into_inner();
        ok(async {
            let outcomes = self
                .delete_handles(&r.queue_name, &r.receipt_handle)
                .await?;
            let total = outcomes.len();
            let errors: Vec<DeleteError> = outcomes
                .into_iter()
                .zip(r.receipt_handle)
                .filter_map(|(o, h)| {
                    o.map(|e| DeleteError {
                        code: e.code.as_u32(),
                        message: e.to_string(),
                        receipt_handle: h,
                    })
                })
                .collect();
            let code = match errors.len() {
                0 => 0,
                n if n == total => CmqCode::BatchDeleteFailed.as_u32(),
                _ => CmqCode::BatchDeletePartial.as_u32(),
            };
            Ok(BatchDeleteMessageReply { code, errors })
        }
        .await)
    }
}
