//! The client-facing gRPC queue API: conversions between protobuf and [`QueueOps`].

use meridian_api::limits::{DeadLetterPolicy, QueueAttributesPatch};
use meridian_api::pb::queue_service_server::QueueService;
use meridian_api::pb::*;
use meridian_api::CmqResult;
use tonic::{Request, Response, Status, Streaming};

use super::message_stream;

use crate::node::QueueView;
use crate::ops::{self, QueueOps, QueuePage};

/// The tenant of gRPC requests (gRPC carries no credentials yet): the app id of the default
/// credential that `meridian dev` creates, so both front ends see the same queues there.
pub const DEFAULT_TENANT: &str = "0";

pub struct QueueApi {
    pub ops: QueueOps,
}

type Reply<T> = Result<Response<T>, Status>;

fn ok<T>(r: CmqResult<T>) -> Reply<T> {
    r.map(Response::new).map_err(|e| e.to_status())
}

fn patch_from(a: Option<QueueAttributes>) -> CmqResult<QueueAttributesPatch> {
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

fn page_to_pb(p: QueuePage) -> ListQueueReply {
    ListQueueReply {
        total_count: p.total,
        queues: p
            .queues
            .into_iter()
            .map(|(queue_name, queue_id)| QueueSummary {
                queue_id,
                queue_name,
            })
            .collect(),
    }
}

fn received_to_pb(m: ops::ReceivedMessage) -> ReceivedMessage {
    ReceivedMessage {
        msg_id: m.msg_id,
        msg_body: m.body,
        receipt_handle: m.receipt_handle,
        enqueue_time: m.enqueue_time,
        first_dequeue_time: m.first_dequeue_time,
        next_visible_time: m.next_visible_time,
        dequeue_count: m.dequeue_count,
    }
}

const T: &str = DEFAULT_TENANT;

#[tonic::async_trait]
impl QueueService for QueueApi {
    async fn create_queue(&self, req: Request<CreateQueueRequest>) -> Reply<CreateQueueReply> {
        let r = req.into_inner();
        ok(async {
            let patch = patch_from(r.attributes)?;
            let queue_id = self.ops.create(T, &r.queue_name, &patch).await?;
            Ok(CreateQueueReply { queue_id })
        }
        .await)
    }

    async fn get_queue_attributes(
        &self,
        req: Request<QueueNameRequest>,
    ) -> Reply<QueueAttributesReply> {
        let r = req.into_inner();
        ok(self.ops.get(T, &r.queue_name).await.map(view_to_pb))
    }

    async fn set_queue_attributes(
        &self,
        req: Request<SetQueueAttributesRequest>,
    ) -> Reply<QueueAttributesReply> {
        let r = req.into_inner();
        ok(async {
            Ok(view_to_pb(
                self.ops
                    .set(T, &r.queue_name, patch_from(r.attributes)?)
                    .await?,
            ))
        }
        .await)
    }

    async fn list_queue(&self, req: Request<ListQueueRequest>) -> Reply<ListQueueReply> {
        let r = req.into_inner();
        ok(self
            .ops
            .list(T, &r.search_word, r.offset, r.limit)
            .await
            .map(page_to_pb))
    }

    async fn delete_queue(&self, req: Request<QueueNameRequest>) -> Reply<Empty> {
        let r = req.into_inner();
        ok(self
            .ops
            .delete_queue(T, &r.queue_name)
            .await
            .map(|_| Empty {}))
    }

    async fn rewind_queue(&self, req: Request<RewindQueueRequest>) -> Reply<Empty> {
        let r = req.into_inner();
        ok(self
            .ops
            .rewind(T, &r.queue_name, r.start_consume_time)
            .await
            .map(|_| Empty {}))
    }

    async fn unbind_dead_letter_queue(&self, req: Request<QueueNameRequest>) -> Reply<Empty> {
        let r = req.into_inner();
        ok(self
            .ops
            .unbind_dead_letter(T, &r.queue_name)
            .await
            .map(|_| Empty {}))
    }

    async fn list_dead_letter_source_queues(
        &self,
        req: Request<ListDeadLetterSourceQueuesRequest>,
    ) -> Reply<ListQueueReply> {
        let r = req.into_inner();
        ok(self
            .ops
            .dead_letter_sources(
                T,
                &r.dead_letter_queue_name,
                &r.search_word,
                r.offset,
                r.limit,
            )
            .await
            .map(page_to_pb))
    }

    async fn send_message(&self, req: Request<SendMessageRequest>) -> Reply<SendMessageReply> {
        ok(message_stream::send(&self.ops, req.into_inner()).await)
    }

    async fn batch_send_message(
        &self,
        req: Request<BatchSendMessageRequest>,
    ) -> Reply<BatchSendMessageReply> {
        let r = req.into_inner();
        ok(self
            .ops
            .send(T, &r.queue_name, r.msg_body, r.delay_seconds)
            .await
            .map(|msg_id| BatchSendMessageReply { msg_id }))
    }

    async fn receive_message(&self, req: Request<ReceiveMessageRequest>) -> Reply<ReceivedMessage> {
        let r = req.into_inner();
        ok(async {
            let mut msgs = self
                .ops
                .receive(T, &r.queue_name, 1, r.polling_wait_seconds)
                .await?;
            msgs.pop()
                .map(received_to_pb)
                .ok_or_else(meridian_api::CmqError::no_message)
        }
        .await)
    }

    async fn batch_receive_message(
        &self,
        req: Request<BatchReceiveMessageRequest>,
    ) -> Reply<BatchReceiveMessageReply> {
        let r = req.into_inner();
        ok(self
            .ops
            .receive(T, &r.queue_name, r.num_of_msg, r.polling_wait_seconds)
            .await
            .map(|m| BatchReceiveMessageReply {
                messages: m.into_iter().map(received_to_pb).collect(),
            }))
    }

    async fn delete_message(&self, req: Request<DeleteMessageRequest>) -> Reply<Empty> {
        ok(message_stream::delete(&self.ops, req.into_inner())
            .await
            .map(|()| Empty {}))
    }

    type MessageStreamStream = message_stream::Replies;

    async fn message_stream(
        &self,
        req: Request<Streaming<StreamRequest>>,
    ) -> Reply<Self::MessageStreamStream> {
        Ok(Response::new(message_stream::serve(
            self.ops.clone(),
            req.into_inner(),
        )))
    }

    async fn batch_delete_message(
        &self,
        req: Request<BatchDeleteMessageRequest>,
    ) -> Reply<BatchDeleteMessageReply> {
        let r = req.into_inner();
        ok(async {
            let outcomes = self
                .ops
                .delete_messages(T, &r.queue_name, &r.receipt_handle)
                .await?;
            let code = ops::batch_delete_code(&outcomes);
            let errors = outcomes
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
            Ok(BatchDeleteMessageReply { code, errors })
        }
        .await)
    }
}
