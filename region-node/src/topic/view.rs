//! What the topic read APIs report, computed on the group leader.

use meridian_api::topics::FilterType;
use serde::{Deserialize, Serialize};

use crate::topic::model::{DeliveryStats, Subscription, SubscriptionSpec, Topic};

/// GetTopicAttributes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TopicView {
    pub topic_id: String,
    pub name: String,
    pub filter_type: FilterType,
    pub max_msg_size: u32,
    pub created_ms: i64,
    pub modified_ms: i64,
    /// Messages with HTTP deliveries outstanding.
    pub msg_count: u64,
    pub published: u64,
    pub subscriptions: u64,
    /// The Raft group that owns the topic (set by the node that reads it).
    pub group: u32,
}

impl From<&Topic> for TopicView {
    fn from(t: &Topic) -> Self {
        Self {
            topic_id: t.topic_id.clone(),
            name: t.name.clone(),
            filter_type: t.filter_type,
            max_msg_size: t.max_msg_size,
            created_ms: t.created_ms,
            modified_ms: t.modified_ms,
            msg_count: t.messages.len() as u64,
            published: t.published,
            subscriptions: t.subscriptions.len() as u64,
            group: 0,
        }
    }
}

/// GetSubscriptionAttributes, plus the delivery metrics.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubscriptionView {
    pub subscription_id: String,
    pub topic_name: String,
    pub spec: SubscriptionSpec,
    pub created_ms: i64,
    pub modified_ms: i64,
    /// Deliveries outstanding.
    pub msg_count: u64,
    /// Publish time of the oldest outstanding delivery, Unix ms; 0 when none.
    pub oldest_pending_ms: i64,
    pub stats: DeliveryStats,
}

impl SubscriptionView {
    pub fn new(t: &Topic, s: &Subscription) -> Self {
        let oldest_pending_ms = s
            .pending
            .keys()
            .next()
            .and_then(|seq| t.messages.get(seq))
            .map_or(0, |m| m.publish_ms);
        Self {
            subscription_id: s.subscription_id.clone(),
            topic_name: t.name.clone(),
            spec: s.spec.clone(),
            created_ms: s.created_ms,
            modified_ms: s.modified_ms,
            msg_count: s.pending.len() as u64,
            oldest_pending_ms,
            stats: s.stats,
        }
    }
}
