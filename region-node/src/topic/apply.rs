//! Topic commands applied to a group's state: the same determinism rules as queues (no clock,
//! no randomness: retry times arrive inside the command).

use meridian_api::topics::{
    self, FilterType, Protocol, MAX_SUBSCRIPTIONS_PER_TOPIC, TOPIC_MSG_RETENTION_SECONDS,
};
use meridian_api::{CmqCode, CmqError};

use crate::command::{OpResult, PushOutcome, PushResult, QueueKey};
use crate::queue::GroupState;
use crate::topic::model::{
    DeliveryStats, PushState, Subscription, SubscriptionPatch, SubscriptionSpec, Topic,
    TopicMessage,
};

/// How long a deleted topic's name stays reserved (CMQ error 6040).
const NAME_REUSE_DELAY_MS: i64 = 10_000;

pub fn topic_not_found(name: &str) -> CmqError {
    CmqError::new(
        CmqCode::NotFound,
        10600,
        format!("topic {name:?} does not exist"),
    )
}

fn subscription_not_found(name: &str) -> CmqError {
    CmqError::new(
        CmqCode::NotFound,
        10600,
        format!("subscription {name:?} does not exist"),
    )
}

impl GroupState {
    pub fn topic(&self, key: &QueueKey) -> Result<&Topic, CmqError> {
        self.topics
            .get(key)
            .ok_or_else(|| topic_not_found(&key.name))
    }

    /// A topic and one of its subscriptions (names are case-insensitive).
    pub fn subscription(
        &self,
        key: &QueueKey,
        name: &str,
    ) -> Result<(&Topic, &Subscription), CmqError> {
        let t = self.topic(key)?;
        let s = t
            .subscriptions
            .get(&name.to_ascii_lowercase())
            .ok_or_else(|| subscription_not_found(name))?;
        Ok((t, s))
    }

    /// The topic, to change: marked for writing out (`queue::rows`).
    pub(crate) fn topic_mut(&mut self, key: &QueueKey) -> Result<&mut Topic, CmqError> {
        self.changes.topics.insert(key.clone());
        self.topics
            .get_mut(key)
            .ok_or_else(|| topic_not_found(&key.name))
    }

    pub(crate) fn create_topic(
        &mut self,
        tenant: &str,
        name: &str,
        filter_type: FilterType,
        max_msg_size: u32,
        now: i64,
    ) -> Result<OpResult, CmqError> {
        let key = QueueKey::new(tenant, name);
        if self.topics.contains_key(&key) {
            return Err(CmqError::new(
                CmqCode::AlreadyExists,
                10550,
                format!("topic {name:?} already exists (names are case-insensitive)"),
            ));
        }
        if let Some(&at) = self.deleted_topic_names.get(&key) {
            if at + NAME_REUSE_DELAY_MS > now {
                return Err(CmqError::new(
                    CmqCode::RecreatedTooSoon,
                    10660,
                    format!("topic {name:?} was deleted less than 10 s ago"),
                ));
            }
        }
        let topic_id = format!("topic-{}-{}", self.group, self.next_topic_num);
        self.next_topic_num += 1;
        self.changes.topics.insert(key.clone());
        self.topics.insert(
            key,
            Topic {
                topic_id: topic_id.clone(),
                name: name.to_string(),
                filter_type,
                max_msg_size,
                created_ms: now,
                modified_ms: now,
                subscriptions: Default::default(),
                messages: Default::default(),
                published: 0,
            },
        );
        Ok(OpResult::Created { queue_id: topic_id })
    }

    pub(crate) fn delete_topic(&mut self, key: &QueueKey, now: i64) -> Result<OpResult, CmqError> {
        let t = self.topic(key)?;
        if !t.subscriptions.is_empty() {
            return Err(CmqError::invalid(
                10540,
                format!(
                    "topic {:?} still has {} subscription(s); unsubscribe them first",
                    t.name,
                    t.subscriptions.len()
                ),
            ));
        }
        self.topics.remove(key);
        self.changes.topics.insert(key.clone());
        self.deleted_topic_names.insert(key.clone(), now);
        Ok(OpResult::Done)
    }

    /// Publishes `bodies` and fans each out, in this same command, to every matching
    /// subscription: into queues (here, or through the outbox for other groups) and into the
    /// HTTP delivery schedule.
    pub(crate) fn publish(
        &mut self,
        key: &QueueKey,
        bodies: &[Vec<u8>],
        tags: &[String],
        routing_key: &str,
        reject_unmatched: bool,
        now: i64,
    ) -> Result<OpResult, CmqError> {
        let t = self.topic(key)?;
        if t.filter_type == FilterType::RoutingKeys {
            topics::validate_routing_key(routing_key)?;
        }
        for b in bodies {
            meridian_api::limits::validate_body(b, t.max_msg_size)?;
        }
        let matched: Vec<&String> = t
            .subscriptions
            .iter()
            .filter(|(_, s)| match t.filter_type {
                FilterType::Tags => topics::tags_match(&s.spec.filter_tags, tags),
                FilterType::RoutingKeys => {
                    topics::routing_matches(&s.spec.binding_keys, routing_key)
                }
            })
            .map(|(n, _)| n)
            .collect();
        if matched.is_empty() && reject_unmatched {
            let (module, why) = if t.subscriptions.is_empty() {
                (10650, "topic has no subscription")
            } else {
                (
                    10730,
                    "no bindingKey or filterTag matches the routingKey or msgTag",
                )
            };
            return Err(CmqError::new(CmqCode::NoSubscriptionMatched, module, why));
        }
        let queues: Vec<QueueKey> = matched
            .iter()
            .map(|n| &t.subscriptions[*n].spec)
            .filter(|s| s.protocol == Protocol::Queue)
            .map(|s| QueueKey::new(&key.tenant, &s.endpoint))
            .collect();
        let http_refs = (matched.len() - queues.len()) as u32;
        let matched: Vec<String> = matched.into_iter().cloned().collect();
        let mut msg_ids = Vec::with_capacity(bodies.len());
        for body in bodies {
            let seq = self.next_seq;
            self.next_seq += 1;
            let msg_id = self.msg_id(seq);
            // One copy of the body, shared by every subscribed queue of this group.
            let shared = bytes::Bytes::from(body.clone());
            for q in &queues {
                self.route_to_queue(q, shared.clone(), now);
            }
            let t = self.topic_mut(key).expect("checked above");
            for name in &matched {
                let s = t.subscriptions.get_mut(name).expect("matched above");
                s.stats.routed += 1;
                if s.spec.protocol == Protocol::Http {
                    let due = PushState {
                        attempts: 0,
                        next_attempt_ms: now,
                    };
                    s.schedule(seq, due);
                }
            }
            t.published += 1;
            if http_refs > 0 {
                t.messages.insert(
                    seq,
                    TopicMessage {
                        msg_id: msg_id.clone(),
                        body: body.clone(),
                        tags: tags.to_vec(),
                        publish_ms: now,
                        refs: http_refs,
                    },
                );
            }
            msg_ids.push(msg_id);
        }
        Ok(OpResult::Sent { msg_ids })
    }

    pub(crate) fn subscribe(
        &mut self,
        key: &QueueKey,
        spec: &SubscriptionSpec,
        now: i64,
    ) -> Result<OpResult, CmqError> {
        let subscription_id = format!("subscription-{}-{}", self.group, self.next_subscription_num);
        let t = self.topic_mut(key)?;
        let name = spec.name.to_ascii_lowercase();
        if t.subscriptions.contains_key(&name) {
            return Err(CmqError::new(
                CmqCode::SubscriptionExists,
                10470,
                format!("subscription {:?} already exists on this topic", spec.name),
            ));
        }
        if t.subscriptions.len() >= MAX_SUBSCRIPTIONS_PER_TOPIC {
            return Err(CmqError::new(
                CmqCode::SubscriptionLimit,
                10480,
                format!("a topic has at most {MAX_SUBSCRIPTIONS_PER_TOPIC} subscriptions"),
            ));
        }
        if t.filter_type == FilterType::RoutingKeys && spec.binding_keys.is_empty() {
            return Err(CmqError::invalid(
                10710,
                "a subscription to a routing-key topic (filterType 2) needs a bindingKey",
            ));
        }
        t.subscriptions.insert(
            name,
            Subscription {
                subscription_id: subscription_id.clone(),
                spec: spec.clone(),
                created_ms: now,
                modified_ms: now,
                pending: Default::default(),
                due: Default::default(),
                stats: DeliveryStats::default(),
            },
        );
        self.next_subscription_num += 1;
        Ok(OpResult::Created {
            queue_id: subscription_id,
        })
    }

    pub(crate) fn set_subscription(
        &mut self,
        key: &QueueKey,
        name: &str,
        patch: &SubscriptionPatch,
        now: i64,
    ) -> Result<OpResult, CmqError> {
        let t = self.topic_mut(key)?;
        let routing = t.filter_type == FilterType::RoutingKeys;
        let s = t
            .subscriptions
            .get_mut(&name.to_ascii_lowercase())
            .ok_or_else(|| subscription_not_found(name))?;
        if let Some(f) = patch.format {
            if s.spec.protocol == Protocol::Queue && f != topics::NotifyFormat::Simplified {
                return Err(CmqError::invalid(
                    10640,
                    "a queue subscription's notifyContentFormat must be SIMPLIFIED",
                ));
            }
            s.spec.format = f;
        }
        if let Some(k) = &patch.binding_keys {
            if routing && k.is_empty() {
                return Err(CmqError::invalid(
                    10710,
                    "a subscription to a routing-key topic needs a bindingKey",
                ));
            }
            s.spec.binding_keys = k.clone();
        }
        if let Some(st) = patch.strategy {
            s.spec.strategy = st;
        }
        if let Some(tags) = &patch.filter_tags {
            s.spec.filter_tags = tags.clone();
        }
        s.modified_ms = now;
        Ok(OpResult::Done)
    }

    pub(crate) fn unsubscribe(&mut self, key: &QueueKey, name: &str) -> Result<OpResult, CmqError> {
        let t = self.topic_mut(key)?;
        let s = t
            .subscriptions
            .remove(&name.to_ascii_lowercase())
            .ok_or_else(|| subscription_not_found(name))?;
        for seq in s.pending.keys() {
            t.release(*seq);
        }
        Ok(OpResult::Done)
    }

    /// Records push outcomes. Idempotent: an outcome for a delivery that is no longer
    /// outstanding (already recorded, subscription gone) changes nothing.
    pub(crate) fn push_results(&mut self, key: &QueueKey, results: &[PushResult]) {
        let Ok(t) = self.topic_mut(key) else {
            return;
        };
        for r in results {
            let Some(s) = t.subscriptions.get_mut(&r.subscription) else {
                continue;
            };
            let Some(&state) = s.pending.get(&r.seq) else {
                continue;
            };
            match r.outcome {
                PushOutcome::Delivered => {
                    s.finish(r.seq);
                    s.stats.delivered += 1;
                    t.release(r.seq);
                }
                PushOutcome::GaveUp => {
                    s.finish(r.seq);
                    s.stats.dropped += 1;
                    t.release(r.seq);
                }
                PushOutcome::RetryAt(at) => {
                    s.schedule(
                        r.seq,
                        PushState {
                            attempts: state.attempts + 1,
                            next_attempt_ms: at,
                        },
                    );
                    s.stats.retried += 1;
                }
            }
        }
    }

    /// Gives up deliveries of messages older than the topic retention (one day).
    pub(crate) fn expire_topic_messages(&mut self, now: i64) {
        let limit = now - i64::from(TOPIC_MSG_RETENTION_SECONDS) * 1000;
        for (key, t) in self.topics.iter_mut() {
            let old: Vec<u64> = t
                .messages
                .iter()
                .take_while(|(_, m)| m.publish_ms <= limit)
                .map(|(&seq, _)| seq)
                .collect();
            if !old.is_empty() {
                self.changes.topics.insert(key.clone());
            }
            for seq in old {
                for s in t.subscriptions.values_mut() {
                    if s.finish(seq) {
                        s.stats.dropped += 1;
                    }
                }
                t.messages.remove(&seq);
            }
        }
    }
}
