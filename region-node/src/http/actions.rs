//! CMQ queue actions: parameters in, JSON fields out, with the exact names and types the
//! official SDKs read (reference §4, §5, §12).

use meridian_api::cmq_http::{ok_reply, Params};
use meridian_api::limits::{DeadLetterPolicy, QueueAttributesPatch};
use meridian_api::{CmqCode, CmqError, CmqResult};
use serde_json::{json, Value};

use crate::node::QueueView;
use crate::ops::{self, QueueOps, QueuePage, ReceivedMessage};
use crate::topic_ops::TopicOps;

fn patch(p: &Params, creating: bool) -> CmqResult<QueueAttributesPatch> {
    let dead_letter_policy = match p.get("deadLetterPolicy")? {
        None => None,
        Some("") if creating => None,
        Some("") => Some(None),
        Some(json) => Some(Some(DeadLetterPolicy::parse_json(json)?)),
    };
    Ok(QueueAttributesPatch {
        max_msg_heap_num: p.int("maxMsgHeapNum")?,
        polling_wait_seconds: p.int("pollingWaitSeconds")?,
        visibility_timeout: p.int("visibilityTimeout")?,
        max_msg_size: p.int("maxMsgSize")?,
        msg_retention_seconds: p.int("msgRetentionSeconds")?,
        rewind_seconds: p.int("rewindSeconds")?,
        dead_letter_policy,
    })
}

fn attributes(v: &QueueView) -> Value {
    json!({
        "queueId": v.queue_id,
        "queueName": v.name,
        "maxMsgHeapNum": v.attrs.max_msg_heap_num,
        "pollingWaitSeconds": v.attrs.polling_wait_seconds,
        "visibilityTimeout": v.attrs.visibility_timeout,
        "maxMsgSize": v.attrs.max_msg_size,
        "msgRetentionSeconds": v.attrs.msg_retention_seconds,
        "rewindSeconds": v.attrs.rewind_seconds,
        "createTime": v.created_ms / 1000,
        "lastModifyTime": v.modified_ms / 1000,
        "activeMsgNum": v.active,
        "inactiveMsgNum": v.inactive,
        "delayMsgNum": v.delayed,
        // Java reads rewindMsgNum, Python and the docs rewindmsgNum: send both.
        "rewindMsgNum": v.rewindable,
        "rewindmsgNum": v.rewindable,
        "minMsgTime": v.min_msg_ms / 1000,
        "deadLetterPolicy": v.attrs.dead_letter_policy.as_ref().map(|p| p.to_json()).unwrap_or_default(),
    })
}

fn page(p: QueuePage) -> Value {
    json!({
        "totalCount": p.total,
        "queueList": p.queues.into_iter()
            .map(|(name, id)| json!({ "queueId": id, "queueName": name }))
            .collect::<Vec<_>>(),
    })
}

fn message(m: &ReceivedMessage) -> Value {
    json!({
        "msgBody": String::from_utf8_lossy(&m.body),
        "msgId": m.msg_id,
        "receiptHandle": m.receipt_handle,
        "enqueueTime": m.enqueue_time,
        "firstDequeueTime": m.first_dequeue_time,
        "nextVisibleTime": m.next_visible_time,
        "dequeueCount": m.dequeue_count,
    })
}

pub async fn dispatch(
    ops: &QueueOps,
    topics: &TopicOps,
    tenant: &str,
    action: &str,
    p: &Params,
    request_id: &str,
) -> CmqResult<Value> {
    let queue = || p.required("queueName");
    let fields = match action.to_ascii_lowercase().as_str() {
        "createqueue" => {
            let id = ops.create(tenant, queue()?, &patch(p, true)?).await?;
            json!({ "queueId": id })
        }
        "listqueue" => {
            let offset = p.int("offset")?.unwrap_or(0);
            page(
                ops.list(
                    tenant,
                    p.get("searchWord")?.unwrap_or(""),
                    offset,
                    p.int("limit")?,
                )
                .await?,
            )
        }
        "getqueueattributes" => attributes(&ops.get(tenant, queue()?).await?),
        "setqueueattributes" => attributes(&ops.set(tenant, queue()?, patch(p, false)?).await?),
        "deletequeue" => {
            ops.delete_queue(tenant, queue()?).await?;
            json!({})
        }
        "rewindqueue" => {
            let start = p
                .int::<i64>("startConsumeTime")?
                .ok_or_else(|| CmqError::invalid(10010, "missing parameter startConsumeTime"))?;
            ops.rewind(tenant, queue()?, start).await?;
            json!({})
        }
        "unbinddeadletterqueue" => {
            ops.unbind_dead_letter(tenant, queue()?).await?;
            json!({})
        }
        "listdeadlettersourcequeues" => page(
            ops.dead_letter_sources(
                tenant,
                p.required("deadLetterQueueName")?,
                p.get("searchWord")?.unwrap_or(""),
                p.int("offset")?.unwrap_or(0),
                p.int("limit")?,
            )
            .await?,
        ),
        "sendmessage" => {
            let body = p.required("msgBody")?.as_bytes().to_vec();
            let delay = p.int("delaySeconds")?.unwrap_or(0);
            let id = ops
                .send(tenant, queue()?, vec![body], delay)
                .await?
                .pop()
                .unwrap_or_default();
            json!({ "msgId": id })
        }
        "batchsendmessage" => {
            let bodies: Vec<Vec<u8>> = p
                .array("msgBody")?
                .into_iter()
                .map(|b| b.as_bytes().to_vec())
                .collect();
            let delay = p.int("delaySeconds")?.unwrap_or(0);
            let ids = ops.send(tenant, queue()?, bodies, delay).await?;
            json!({ "msgList": ids.into_iter().map(|id| json!({ "msgId": id })).collect::<Vec<_>>() })
        }
        "receivemessage" => {
            let wait = p.int("pollingWaitSeconds")?;
            let msgs = ops.receive(tenant, queue()?, 1, wait).await?;
            msgs.first().map(message).ok_or_else(CmqError::no_message)?
        }
        "batchreceivemessage" => {
            let n = p
                .int::<u32>("numOfMsg")?
                .ok_or_else(|| CmqError::invalid(10010, "missing parameter numOfMsg"))?;
            let wait = p.int("pollingWaitSeconds")?;
            let msgs = ops.receive(tenant, queue()?, n, wait).await?;
            json!({ "msgInfoList": msgs.iter().map(message).collect::<Vec<_>>() })
        }
        "deletemessage" => {
            let handle = p.required("receiptHandle")?.to_string();
            if let Some(e) = ops
                .delete_messages(tenant, queue()?, &[handle])
                .await?
                .pop()
                .flatten()
            {
                return Err(e);
            }
            json!({})
        }
        "batchdeletemessage" => {
            let handles: Vec<String> = p
                .array("receiptHandle")?
                .into_iter()
                .map(str::to_string)
                .collect();
            let outcomes = ops.delete_messages(tenant, queue()?, &handles).await?;
            let code = ops::batch_delete_code(&outcomes);
            if code != 0 {
                let errors: Vec<Value> = outcomes
                    .iter()
                    .zip(&handles)
                    .filter_map(|(o, h)| {
                        o.as_ref().map(|e| {
                            json!({ "code": e.code.as_u32(), "message": e.to_string(), "receiptHandle": h })
                        })
                    })
                    .collect();
                let message = if code == CmqCode::BatchDeleteFailed.as_u32() {
                    "batch delete failed: no receipt handle was valid"
                } else {
                    "batch delete partially failed; see errorList"
                };
                return Ok(json!({
                    "code": code,
                    "message": message,
                    "requestId": request_id,
                    "errorList": errors,
                }));
            }
            json!({})
        }
        a if super::topic_actions::ACTIONS.contains(&a) => {
            super::topic_actions::dispatch(topics, tenant, a, p).await?
        }
        _ => {
            return Err(CmqError::invalid(
                10280,
                format!("action {action:?} does not exist"),
            ))
        }
    };
    Ok(ok_reply(request_id, fields))
}
