//! The client-facing gRPC topic API: conversions between protobuf and [`TopicOps`].

use meridian_api::pb::topic_service_server::TopicService;
use meridian_api::pb::*;
use meridian_api::CmqResult;
use tonic::{Request, Response, Status};

use super::queue_api::DEFAULT_TENANT;
use crate::topic::{SubscriptionView, TopicView};
use crate::topic_ops::{SubscribeParams, SubscriptionUpdate, TopicOps};

pub struct TopicApi {
    pub ops: TopicOps,
}

type Reply<T> = Result<Response<T>, Status>;

fn ok<T>(r: CmqResult<T>) -> Reply<T> {
    r.map(Response::new).map_err(|e| e.to_status())
}

fn topic_to_pb(v: TopicView) -> TopicAttributesReply {
    TopicAttributesReply {
        topic_id: v.topic_id,
        topic_name: v.name,
        msg_count: v.msg_count,
        max_msg_size: v.max_msg_size,
        msg_retention_seconds: meridian_api::topics::TOPIC_MSG_RETENTION_SECONDS,
        create_time: v.created_ms / 1000,
        last_modify_time: v.modified_ms / 1000,
        filter_type: v.filter_type.as_param(),
        published: v.published,
        subscriptions: v.subscriptions,
        group: v.group,
    }
}

fn subscription_to_pb(v: SubscriptionView) -> SubscriptionAttributesReply {
    SubscriptionAttributesReply {
        subscription_id: v.subscription_id,
        subscription_name: v.spec.name,
        topic_name: v.topic_name,
        protocol: v.spec.protocol.as_str().into(),
        endpoint: v.spec.endpoint,
        notify_strategy: v.spec.strategy.as_str().into(),
        notify_content_format: v.spec.format.as_str().into(),
        filter_tag: v.spec.filter_tags,
        binding_key: v.spec.binding_keys,
        create_time: v.created_ms / 1000,
        last_modify_time: v.modified_ms / 1000,
        msg_count: v.msg_count,
        routed: v.stats.routed,
        delivered: v.stats.delivered,
        retried: v.stats.retried,
        dropped: v.stats.dropped,
        oldest_pending_time: v.oldest_pending_ms / 1000,
    }
}

#[tonic::async_trait]
impl TopicService for TopicApi {
    async fn create_topic(&self, req: Request<CreateTopicRequest>) -> Reply<CreateTopicReply> {
        let r = req.into_inner();
        ok(self
            .ops
            .create(DEFAULT_TENANT, &r.topic_name, r.filter_type, r.max_msg_size)
            .await
            .map(|topic_id| CreateTopicReply { topic_id }))
    }

    async fn get_topic_attributes(
        &self,
        req: Request<TopicNameRequest>,
    ) -> Reply<TopicAttributesReply> {
        let r = req.into_inner();
        ok(self
            .ops
            .get(DEFAULT_TENANT, &r.topic_name)
            .await
            .map(topic_to_pb))
    }

    async fn set_topic_attributes(
        &self,
        req: Request<SetTopicAttributesRequest>,
    ) -> Reply<TopicAttributesReply> {
        let r = req.into_inner();
        ok(self
            .ops
            .set(DEFAULT_TENANT, &r.topic_name, r.max_msg_size)
            .await
            .map(topic_to_pb))
    }

    async fn list_topic(&self, req: Request<ListTopicRequest>) -> Reply<ListTopicReply> {
        let r = req.into_inner();
        ok(self
            .ops
            .list(DEFAULT_TENANT, &r.search_word, r.offset, r.limit)
            .await
            .map(|p| ListTopicReply {
                total_count: p.total,
                topics: p
                    .queues
                    .into_iter()
                    .map(|(topic_name, topic_id)| TopicSummary {
                        topic_id,
                        topic_name,
                    })
                    .collect(),
            }))
    }

    async fn delete_topic(&self, req: Request<TopicNameRequest>) -> Reply<Empty> {
        let r = req.into_inner();
        ok(self
            .ops
            .delete(DEFAULT_TENANT, &r.topic_name)
            .await
            .map(|_| Empty {}))
    }

    async fn publish_message(
        &self,
        req: Request<PublishMessageRequest>,
    ) -> Reply<PublishMessageReply> {
        let r = req.into_inner();
        ok(self
            .ops
            .publish(
                DEFAULT_TENANT,
                &r.topic_name,
                vec![r.msg_body],
                r.msg_tag,
                r.routing_key,
            )
            .await
            .map(|ids| PublishMessageReply {
                msg_id: ids.into_iter().next().unwrap_or_default(),
            }))
    }

    async fn batch_publish_message(
        &self,
        req: Request<BatchPublishMessageRequest>,
    ) -> Reply<BatchPublishMessageReply> {
        let r = req.into_inner();
        ok(self
            .ops
            .publish(
                DEFAULT_TENANT,
                &r.topic_name,
                r.msg_body,
                r.msg_tag,
                r.routing_key,
            )
            .await
            .map(|msg_id| BatchPublishMessageReply { msg_id }))
    }

    async fn subscribe(&self, req: Request<SubscribeRequest>) -> Reply<SubscribeReply> {
        let r = req.into_inner();
        let p = SubscribeParams {
            protocol: r.protocol,
            endpoint: r.endpoint,
            notify_strategy: r.notify_strategy,
            notify_content_format: r.notify_content_format,
            filter_tags: r.filter_tag,
            binding_keys: r.binding_key,
        };
        ok(self
            .ops
            .subscribe(DEFAULT_TENANT, &r.topic_name, &r.subscription_name, p)
            .await
            .map(|subscription_id| SubscribeReply { subscription_id }))
    }

    async fn get_subscription_attributes(
        &self,
        req: Request<SubscriptionNameRequest>,
    ) -> Reply<SubscriptionAttributesReply> {
        let r = req.into_inner();
        ok(self
            .ops
            .get_subscription(DEFAULT_TENANT, &r.topic_name, &r.subscription_name)
            .await
            .map(subscription_to_pb))
    }

    async fn set_subscription_attributes(
        &self,
        req: Request<SetSubscriptionAttributesRequest>,
    ) -> Reply<SubscriptionAttributesReply> {
        let r = req.into_inner();
        let u = SubscriptionUpdate {
            notify_strategy: r.notify_strategy,
            notify_content_format: r.notify_content_format,
            filter_tags: r.set_filter_tag.then_some(r.filter_tag),
            binding_keys: r.set_binding_key.then_some(r.binding_key),
        };
        ok(self
            .ops
            .set_subscription(DEFAULT_TENANT, &r.topic_name, &r.subscription_name, u)
            .await
            .map(subscription_to_pb))
    }

    async fn list_subscription_by_topic(
        &self,
        req: Request<ListSubscriptionRequest>,
    ) -> Reply<ListSubscriptionReply> {
        let r = req.into_inner();
        ok(self
            .ops
            .list_subscriptions(
                DEFAULT_TENANT,
                &r.topic_name,
                &r.search_word,
                r.offset,
                r.limit,
            )
            .await
            .map(|p| ListSubscriptionReply {
                total_count: p.total,
                subscriptions: p
                    .subscriptions
                    .into_iter()
                    .map(subscription_to_pb)
                    .collect(),
            }))
    }

    async fn unsubscribe(&self, req: Request<SubscriptionNameRequest>) -> Reply<Empty> {
        let r = req.into_inner();
        ok(self
            .ops
            .unsubscribe(DEFAULT_TENANT, &r.topic_name, &r.subscription_name)
            .await
            .map(|_| Empty {}))
    }

    async fn clear_subscription_filter_tags(
        &self,
        req: Request<SubscriptionNameRequest>,
    ) -> Reply<Empty> {
        let r = req.into_inner();
        ok(self
            .ops
            .clear_filter_tags(DEFAULT_TENANT, &r.topic_name, &r.subscription_name)
            .await
            .map(|_| Empty {}))
    }
}
