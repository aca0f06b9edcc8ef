//! CMQ topic and subscription actions (reference §6), with the response fields the official
//! SDKs read (Python's `subscriptionId`, `protocal`, `filterTags`; Java's `filterTag`).

use meridian_api::cmq_http::Params;
use meridian_api::CmqResult;
use serde_json::{json, Value};

use crate::topic::{SubscriptionView, TopicView};
use crate::topic_ops::{SubscribeParams, SubscriptionUpdate, TopicOps};

fn strings(v: Vec<&str>) -> Vec<String> {
    v.into_iter().map(str::to_string).collect()
}

/// An array parameter that is absent (`None`) or given (`Some`, possibly empty).
fn optional_array(p: &Params, prefix: &str) -> CmqResult<Option<Vec<String>>> {
    let items = p.array(prefix)?;
    Ok((!items.is_empty()).then(|| strings(items)))
}

fn topic_attributes(v: &TopicView) -> Value {
    json!({
        "topicId": v.topic_id,
        "topicName": v.name,
        "msgCount": v.msg_count,
        "maxMsgSize": v.max_msg_size,
        "msgRetentionSeconds": meridian_api::topics::TOPIC_MSG_RETENTION_SECONDS,
        "createTime": v.created_ms / 1000,
        "lastModifyTime": v.modified_ms / 1000,
        "filterType": v.filter_type.as_param(),
    })
}

fn subscription_attributes(tenant: &str, v: &SubscriptionView) -> Value {
    json!({
        "subscriptionId": v.subscription_id,
        "subscriptionName": v.spec.name,
        "topicName": v.topic_name,
        "topicOwner": tenant,
        "msgCount": v.msg_count,
        "protocol": v.spec.protocol.as_str(),
        "protocal": v.spec.protocol.as_str(),
        "endpoint": v.spec.endpoint,
        "notifyStrategy": v.spec.strategy.as_str(),
        "notifyContentFormat": v.spec.format.as_str(),
        "filterTag": v.spec.filter_tags,
        "filterTags": v.spec.filter_tags,
        "bindingKey": v.spec.binding_keys,
        "createTime": v.created_ms / 1000,
        "lastModifyTime": v.modified_ms / 1000,
        // Meridian's delivery metrics.
        "routedMsgNum": v.stats.routed,
        "deliveredMsgNum": v.stats.delivered,
        "retriedNum": v.stats.retried,
        "droppedMsgNum": v.stats.dropped,
        "oldestPendingTime": v.oldest_pending_ms / 1000,
    })
}

/// The topic and subscription actions, lower-cased.
pub const ACTIONS: &[&str] = &[
    "createtopic",
    "settopicattributes",
    "listtopic",
    "gettopicattributes",
    "deletetopic",
    "publishmessage",
    "batchpublishmessage",
    "subscribe",
    "listsubscriptionbytopic",
    "setsubscriptionattributes",
    "getsubscriptionattributes",
    "unsubscribe",
    "clearsubscriptionfiltertags",
];

/// Serves one of [`ACTIONS`] (`action` lower-cased).
pub async fn dispatch(ops: &TopicOps, tenant: &str, action: &str, p: &Params) -> CmqResult<Value> {
    let topic = || p.required("topicName");
    let sub = || p.required("subscriptionName");
    Ok(match action {
        "createtopic" => {
            let id = ops
                .create(tenant, topic()?, p.int("filterType")?, p.int("maxMsgSize")?)
                .await?;
            json!({ "topicId": id })
        }
        "settopicattributes" => {
            topic_attributes(&ops.set(tenant, topic()?, p.int("maxMsgSize")?).await?)
        }
        "gettopicattributes" => topic_attributes(&ops.get(tenant, topic()?).await?),
        "listtopic" => {
            let page = ops
                .list(
                    tenant,
                    p.get("searchWord")?.unwrap_or(""),
                    p.int("offset")?.unwrap_or(0),
                    p.int("limit")?,
                )
                .await?;
            json!({
                "totalCount": page.total,
                "topicList": page.queues.into_iter()
                    .map(|(name, id)| json!({ "topicId": id, "topicName": name }))
                    .collect::<Vec<_>>(),
            })
        }
        "deletetopic" => {
            ops.delete(tenant, topic()?).await?;
            json!({})
        }
        "publishmessage" | "batchpublishmessage" => {
            let batch = action == "batchpublishmessage";
            let bodies: Vec<Vec<u8>> = if batch {
                p.array("msgBody")?
                    .into_iter()
                    .map(|b| b.as_bytes().to_vec())
                    .collect()
            } else {
                vec![p.required("msgBody")?.as_bytes().to_vec()]
            };
            let tags = strings(p.array("msgTag")?);
            let routing_key = p.get("routingKey")?.unwrap_or("").to_string();
            let ids = ops
                .publish(tenant, topic()?, bodies, tags, routing_key)
                .await?;
            if batch {
                json!({ "msgList": ids.into_iter().map(|id| json!({ "msgId": id })).collect::<Vec<_>>() })
            } else {
                json!({ "msgId": ids.into_iter().next().unwrap_or_default() })
            }
        }
        "subscribe" => {
            let params = SubscribeParams {
                protocol: p.required("protocol")?.to_string(),
                endpoint: p.required("endpoint")?.to_string(),
                notify_strategy: p.get("notifyStrategy")?.map(str::to_string),
                notify_content_format: p.get("notifyContentFormat")?.map(str::to_string),
                filter_tags: strings(p.array("filterTag")?),
                binding_keys: strings(p.array("bindingKey")?),
            };
            let id = ops.subscribe(tenant, topic()?, sub()?, params).await?;
            json!({ "subscriptionId": id })
        }
        "listsubscriptionbytopic" => {
            let page = ops
                .list_subscriptions(
                    tenant,
                    topic()?,
                    p.get("searchWord")?.unwrap_or(""),
                    p.int("offset")?.unwrap_or(0),
                    p.int("limit")?,
                )
                .await?;
            json!({
                "totalCount": page.total,
                "subscriptionList": page.subscriptions.iter().map(|s| json!({
                    "subscriptionId": s.subscription_id,
                    "subscriptionName": s.spec.name,
                    "protocol": s.spec.protocol.as_str(),
                    "endpoint": s.spec.endpoint,
                })).collect::<Vec<_>>(),
            })
        }
        "getsubscriptionattributes" => subscription_attributes(
            tenant,
            &ops.get_subscription(tenant, topic()?, sub()?).await?,
        ),
        "setsubscriptionattributes" => {
            let u = SubscriptionUpdate {
                notify_strategy: p.get("notifyStrategy")?.map(str::to_string),
                notify_content_format: p.get("notifyContentFormat")?.map(str::to_string),
                filter_tags: optional_array(p, "filterTag")?,
                binding_keys: optional_array(p, "bindingKey")?,
            };
            subscription_attributes(
                tenant,
                &ops.set_subscription(tenant, topic()?, sub()?, u).await?,
            )
        }
        "unsubscribe" => {
            ops.unsubscribe(tenant, topic()?, sub()?).await?;
            json!({})
        }
        "clearsubscriptionfiltertags" => {
            ops.clear_filter_tags(tenant, topic()?, sub()?).await?;
            json!({})
        }
        other => {
            return Err(meridian_api::CmqError::invalid(
                10280,
                format!("action {other:?} does not exist"),
            ))
        }
    })
}
