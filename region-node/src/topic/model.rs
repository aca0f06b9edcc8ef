//! One topic: its subscriptions, and the messages whose HTTP deliveries are still outstanding.

use std::collections::{BTreeMap, BTreeSet};

use meridian_api::topics::{FilterType, NotifyFormat, NotifyStrategy, Protocol};
use serde::{Deserialize, Serialize};

/// A subscription's settings as Subscribe gives them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionSpec {
    /// The name as given (lookups use the lower-cased name).
    pub name: String,
    pub protocol: Protocol,
    /// A URL for `http`, a queue name of the same tenant for `queue`.
    pub endpoint: String,
    pub strategy: NotifyStrategy,
    pub format: NotifyFormat,
    pub filter_tags: Vec<String>,
    pub binding_keys: Vec<String>,
}

/// The settable part of a subscription (SetSubscriptionAttributes, ClearSubscriptionFilterTags).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionPatch {
    pub strategy: Option<NotifyStrategy>,
    pub format: Option<NotifyFormat>,
    pub filter_tags: Option<Vec<String>>,
    pub binding_keys: Option<Vec<String>>,
}

/// Where one HTTP delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushState {
    /// Failed attempts so far.
    pub attempts: u32,
    pub next_attempt_ms: i64,
}

/// Delivery counters of one subscription, replicated so that they survive leader changes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryStats {
    /// Messages routed to the subscription (for queue subscriptions: enqueued or scheduled).
    pub routed: u64,
    /// HTTP deliveries acknowledged with a 2xx.
    pub delivered: u64,
    /// Failed HTTP attempts that were scheduled for a retry.
    pub retried: u64,
    /// HTTP deliveries given up (retries exhausted or the topic's retention passed).
    pub dropped: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    pub subscription_id: String,
    pub spec: SubscriptionSpec,
    pub created_ms: i64,
    pub modified_ms: i64,
    /// HTTP only: outstanding deliveries by message sequence number.
    pub pending: BTreeMap<u64, PushState>,
    /// The same deliveries ordered by when they are due: `(next_attempt_ms, seq)`.
    pub due: BTreeSet<(i64, u64)>,
    pub stats: DeliveryStats,
}

impl Subscription {
    /// Schedules (or reschedules) the delivery of message `seq`.
    pub fn schedule(&mut self, seq: u64, state: PushState) {
        if let Some(old) = self.pending.insert(seq, state) {
            self.due.remove(&(old.next_attempt_ms, seq));
        }
        self.due.insert((state.next_attempt_ms, seq));
    }

    /// Forgets the delivery of `seq`; whether it was outstanding.
    pub fn finish(&mut self, seq: u64) -> bool {
        match self.pending.remove(&seq) {
            Some(old) => {
                self.due.remove(&(old.next_attempt_ms, seq));
                true
            }
            None => false,
        }
    }
}

/// A published message kept while HTTP deliveries of it are outstanding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicMessage {
    pub msg_id: String,
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    pub tags: Vec<String>,
    pub publish_ms: i64,
    /// Subscriptions that still have to deliver it.
    pub refs: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topic {
    pub topic_id: String,
    /// The name as created (lookups use the lower-cased key).
    pub name: String,
    pub filter_type: FilterType,
    pub max_msg_size: u32,
    pub created_ms: i64,
    pub modified_ms: i64,
    /// By lower-cased subscription name.
    pub subscriptions: BTreeMap<String, Subscription>,
    /// Messages with outstanding HTTP deliveries, by sequence number.
    pub messages: BTreeMap<u64, TopicMessage>,
    pub published: u64,
}

impl Topic {
    /// Drops one subscription's claim on message `seq`, and the message with the last claim.
    pub fn release(&mut self, seq: u64) {
        if let Some(m) = self.messages.get_mut(&seq) {
            m.refs = m.refs.saturating_sub(1);
            if m.refs == 0 {
                self.messages.remove(&seq);
            }
        }
    }
}
