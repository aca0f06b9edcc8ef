//! The topic and subscription operations every front end (gRPC, CMQ HTTP, CLI) offers, per
//! tenant: validation at the edge, execution on the leader of the topic's group.

use std::sync::Arc;

use meridian_api::limits::{self, MAX_MSG_SIZE_LIMIT, MIN_MSG_SIZE_LIMIT};
use meridian_api::topics::{
    self, FilterType, NotifyFormat, NotifyStrategy, Protocol, DEFAULT_TOPIC_MAX_MSG_SIZE,
    MAX_SUBSCRIPTION_LIST_LIMIT, MAX_SUBSCRIPTION_LIST_OFFSET, MAX_TOPICS_PER_TENANT,
};
use meridian_api::{CmqCode, CmqError, CmqResult};

use crate::command::{Op, OpResult, QueueKey};
use crate::node::{GroupReply, GroupRequest, RegionNode};
use crate::ops::{unexpected, QueueOps, QueuePage};
use crate::topic::{SubscriptionPatch, SubscriptionSpec, SubscriptionView, TopicView};

/// Subscribe's parameters before validation (strings as the client sent them).
#[derive(Debug, Clone, Default)]
pub struct SubscribeParams {
    pub protocol: String,
    pub endpoint: String,
    pub notify_strategy: Option<String>,
    pub notify_content_format: Option<String>,
    pub filter_tags: Vec<String>,
    pub binding_keys: Vec<String>,
}

/// SetSubscriptionAttributes' parameters; `None` leaves a setting as it is.
#[derive(Debug, Clone, Default)]
pub struct SubscriptionUpdate {
    pub notify_strategy: Option<String>,
    pub notify_content_format: Option<String>,
    pub filter_tags: Option<Vec<String>>,
    pub binding_keys: Option<Vec<String>>,
}

#[derive(Debug, Clone)]
pub struct SubscriptionPage {
    pub total: u64,
    pub subscriptions: Vec<SubscriptionView>,
}

#[derive(Clone)]
pub struct TopicOps {
    node: Arc<RegionNode>,
    queues: QueueOps,
}

fn topic_name(name: &str) -> CmqResult<()> {
    limits::validate_name_of("topic", 10590, name)
}

fn subscription_name(name: &str) -> CmqResult<()> {
    limits::validate_name_of("subscription", 10620, name)
}

fn max_msg_size(v: u32) -> CmqResult<u32> {
    if !(MIN_MSG_SIZE_LIMIT..=MAX_MSG_SIZE_LIMIT).contains(&v) {
        return Err(CmqError::invalid(
            10350,
            format!("maxMsgSize={v} is out of range {MIN_MSG_SIZE_LIMIT}-{MAX_MSG_SIZE_LIMIT}"),
        ));
    }
    Ok(v)
}

impl TopicOps {
    pub fn new(node: Arc<RegionNode>) -> Self {
        Self {
            queues: QueueOps::new(node.clone()),
            node,
        }
    }

    fn key(&self, tenant: &str, name: &str) -> CmqResult<QueueKey> {
        topic_name(name)?;
        Ok(QueueKey::new(tenant, name))
    }

    async fn write(&self, key: &QueueKey, op: Op) -> CmqResult<OpResult> {
        self.queues.write(key, op).await
    }

    /// A read on the leader of the topic's group.
    async fn read(&self, key: &QueueKey, req: GroupRequest) -> CmqResult<GroupReply> {
        self.node.execute(self.node.group_of(key), req).await
    }

    async fn list_all(&self, tenant: &str, search: &str) -> CmqResult<Vec<(String, String)>> {
        self.queues
            .fan_out(GroupRequest::ListTopics {
                tenant: tenant.into(),
                search: search.into(),
            })
            .await
    }

    pub async fn create(
        &self,
        tenant: &str,
        name: &str,
        filter_type: Option<u32>,
        size: Option<u32>,
    ) -> CmqResult<String> {
        let key = self.key(tenant, name)?;
        let filter_type = FilterType::from_param(filter_type)?;
        let max_msg_size = max_msg_size(size.unwrap_or(DEFAULT_TOPIC_MAX_MSG_SIZE))?;
        // Counted across groups before the create: concurrent creates may overshoot slightly.
        let existing = self.list_all(tenant, "").await?.len();
        if existing >= MAX_TOPICS_PER_TENANT {
            return Err(CmqError::new(
                CmqCode::LimitReached,
                10610,
                format!("tenant already has {existing} topics (limit {MAX_TOPICS_PER_TENANT})"),
            ));
        }
        let op = Op::CreateTopic {
            tenant: tenant.into(),
            name: name.into(),
            filter_type,
            max_msg_size,
        };
        match self.write(&key, op).await? {
            OpResult::Created { queue_id } => Ok(queue_id),
            _ => Err(unexpected("create topic")),
        }
    }

    pub async fn get(&self, tenant: &str, name: &str) -> CmqResult<TopicView> {
        let key = self.key(tenant, name)?;
        match self
            .read(&key, GroupRequest::GetTopic { key: key.clone() })
            .await?
        {
            GroupReply::Topic(v) => Ok(v),
            _ => Err(unexpected("get topic")),
        }
    }

    pub async fn set(&self, tenant: &str, name: &str, size: Option<u32>) -> CmqResult<TopicView> {
        let key = self.key(tenant, name)?;
        if let Some(size) = size {
            let max_msg_size = max_msg_size(size)?;
            self.write(
                &key,
                Op::SetTopicAttributes {
                    key: key.clone(),
                    max_msg_size,
                },
            )
            .await?;
        }
        self.get(tenant, name).await
    }

    pub async fn list(
        &self,
        tenant: &str,
        search: &str,
        offset: u32,
        limit: Option<u32>,
    ) -> CmqResult<QueuePage> {
        let (offset, limit) = limits::list_window(offset, limit)?;
        let all = self.list_all(tenant, search).await?;
        Ok(QueuePage {
            total: all.len() as u64,
            queues: all.into_iter().skip(offset).take(limit).collect(),
        })
    }

    pub async fn delete(&self, tenant: &str, name: &str) -> CmqResult<()> {
        let key = self.key(tenant, name)?;
        self.write(&key, Op::DeleteTopic { key: key.clone() })
            .await
            .map(|_| ())
    }

    /// Publishes `bodies` (one, or a batch of ≤16) with shared tags and routing key.
    pub async fn publish(
        &self,
        tenant: &str,
        name: &str,
        bodies: Vec<Vec<u8>>,
        tags: Vec<String>,
        routing_key: String,
    ) -> CmqResult<Vec<String>> {
        let key = self.key(tenant, name)?;
        limits::validate_batch_len("msgBody", bodies.len())?;
        topics::validate_tags(&tags, 10720)?;
        if !routing_key.is_empty() {
            topics::validate_routing_key(&routing_key)?;
        }
        let total: usize = bodies.iter().map(Vec::len).sum();
        if total > limits::MAX_BATCH_BYTES {
            return Err(CmqError::new(
                CmqCode::BatchTooLarge,
                10300,
                format!(
                    "total message size {total} exceeds {} bytes",
                    limits::MAX_BATCH_BYTES
                ),
            ));
        }
        for b in &bodies {
            limits::validate_body(b, MAX_MSG_SIZE_LIMIT)?;
        }
        let op = Op::Publish {
            key: key.clone(),
            bodies,
            tags,
            routing_key,
            reject_unmatched: self.node.config.topics.reject_unmatched_publish,
        };
        match self.write(&key, op).await? {
            OpResult::Sent { msg_ids } => Ok(msg_ids),
            _ => Err(unexpected("publish")),
        }
    }

    pub async fn subscribe(
        &self,
        tenant: &str,
        topic: &str,
        name: &str,
        p: SubscribeParams,
    ) -> CmqResult<String> {
        let key = self.key(tenant, topic)?;
        subscription_name(name)?;
        let protocol = Protocol::parse(&p.protocol)?;
        let strategy = match p.notify_strategy.as_deref() {
            None | Some("") => NotifyStrategy::ExponentialDecayRetry,
            Some(s) => NotifyStrategy::parse(s)?,
        };
        let format = match (protocol, p.notify_content_format.as_deref()) {
            (Protocol::Queue, None | Some("")) => NotifyFormat::Simplified,
            (Protocol::Http, None | Some("")) => NotifyFormat::Json,
            (_, Some(f)) => NotifyFormat::parse(f)?,
        };
        topics::validate_tags(&p.filter_tags, 10670)?;
        topics::validate_binding_keys(&p.binding_keys)?;
        let endpoint = match protocol {
            Protocol::Http => {
                topics::validate_http_endpoint(&p.endpoint)?;
                p.endpoint
            }
            Protocol::Queue => {
                if format != NotifyFormat::Simplified {
                    return Err(CmqError::invalid(
                        10640,
                        "a queue subscription's notifyContentFormat must be SIMPLIFIED",
                    ));
                }
                limits::validate_name(&p.endpoint).map_err(|_| {
                    CmqError::invalid(
                        10630,
                        format!("endpoint {:?} is not a valid queue name", p.endpoint),
                    )
                })?;
                // The queue must exist now; if it is deleted later, its deliveries are dropped.
                self.queues.get(tenant, &p.endpoint).await?;
                p.endpoint
            }
        };
        let spec = SubscriptionSpec {
            name: name.into(),
            protocol,
            endpoint,
            strategy,
            format,
            filter_tags: p.filter_tags,
            binding_keys: p.binding_keys,
        };
        match self
            .write(
                &key,
                Op::Subscribe {
                    key: key.clone(),
                    spec,
                },
            )
            .await?
        {
            OpResult::Created { queue_id } => Ok(queue_id),
            _ => Err(unexpected("subscribe")),
        }
    }

    pub async fn get_subscription(
        &self,
        tenant: &str,
        topic: &str,
        name: &str,
    ) -> CmqResult<SubscriptionView> {
        let key = self.key(tenant, topic)?;
        subscription_name(name)?;
        let req = GroupRequest::GetSubscription {
            key: key.clone(),
            name: name.into(),
        };
        match self.read(&key, req).await? {
            GroupReply::Subscription(v) => Ok(v),
            _ => Err(unexpected("get subscription")),
        }
    }

    pub async fn list_subscriptions(
        &self,
        tenant: &str,
        topic: &str,
        search: &str,
        offset: u32,
        limit: Option<u32>,
    ) -> CmqResult<SubscriptionPage> {
        let key = self.key(tenant, topic)?;
        let limit = limit.unwrap_or(20);
        if offset > MAX_SUBSCRIPTION_LIST_OFFSET || limit > MAX_SUBSCRIPTION_LIST_LIMIT {
            return Err(CmqError::invalid(
                10350,
                format!(
                    "offset must be 0-{MAX_SUBSCRIPTION_LIST_OFFSET} and limit 0-{MAX_SUBSCRIPTION_LIST_LIMIT}"
                ),
            ));
        }
        let req = GroupRequest::ListSubscriptions {
            key: key.clone(),
            search: search.into(),
        };
        match self.read(&key, req).await? {
            GroupReply::Subscriptions(all) => Ok(SubscriptionPage {
                total: all.len() as u64,
                subscriptions: all
                    .into_iter()
                    .skip(offset as usize)
                    .take(limit as usize)
                    .collect(),
            }),
            _ => Err(unexpected("list subscriptions")),
        }
    }

    pub async fn set_subscription(
        &self,
        tenant: &str,
        topic: &str,
        name: &str,
        u: SubscriptionUpdate,
    ) -> CmqResult<SubscriptionView> {
        let key = self.key(tenant, topic)?;
        subscription_name(name)?;
        if let Some(t) = &u.filter_tags {
            topics::validate_tags(t, 10670)?;
        }
        if let Some(k) = &u.binding_keys {
            topics::validate_binding_keys(k)?;
        }
        let patch = SubscriptionPatch {
            strategy: match u.notify_strategy.as_deref() {
                None | Some("") => None,
                Some(s) => Some(NotifyStrategy::parse(s)?),
            },
            format: match u.notify_content_format.as_deref() {
                None | Some("") => None,
                Some(f) => Some(NotifyFormat::parse(f)?),
            },
            filter_tags: u.filter_tags,
            binding_keys: u.binding_keys,
        };
        self.write(
            &key,
            Op::SetSubscription {
                key: key.clone(),
                name: name.into(),
                patch,
            },
        )
        .await?;
        self.get_subscription(tenant, topic, name).await
    }

    pub async fn clear_filter_tags(&self, tenant: &str, topic: &str, name: &str) -> CmqResult<()> {
        let u = SubscriptionUpdate {
            filter_tags: Some(Vec::new()),
            ..Default::default()
        };
        self.set_subscription(tenant, topic, name, u)
            .await
            .map(|_| ())
    }

    pub async fn unsubscribe(&self, tenant: &str, topic: &str, name: &str) -> CmqResult<()> {
        let key = self.key(tenant, topic)?;
        subscription_name(name)?;
        self.write(
            &key,
            Op::Unsubscribe {
                key: key.clone(),
                name: name.into(),
            },
        )
        .await
        .map(|_| ())
    }
}
