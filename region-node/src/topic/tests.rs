//! Unit and property tests of the topic model: tag and routing-key fan-out, cross-group
//! scheduling through the outbox, the replicated HTTP push schedule, retention and errors.

use std::collections::BTreeSet;

use meridian_api::limits::QueueAttributes;
use meridian_api::topics::{FilterType, NotifyFormat, NotifyStrategy, Protocol};
use meridian_api::CmqCode;
use proptest::prelude::*;

use crate::command::{Command, Op, OpResult, PushOutcome, PushResult, QueueKey, TransferItem};
use crate::placement::group_of;
use crate::queue::GroupState;
use crate::topic::{PushState, SubscriptionPatch, SubscriptionSpec};

const T0: i64 = 1_700_000_000_000;
const DAY_MS: i64 = 86_400_000;

fn key(name: &str) -> QueueKey {
    QueueKey::new("", name)
}

fn apply(s: &mut GroupState, now: i64, op: Op) -> OpResult {
    s.apply(&Command { now_ms: now, op })
}

fn ok(r: OpResult) -> OpResult {
    assert!(!matches!(r, OpResult::Failed(_)), "{r:?}");
    r
}

fn failed(r: OpResult) -> (CmqCode, u32) {
    match r {
        OpResult::Failed(e) => (e.code, e.module),
        r => panic!("expected a failure, got {r:?}"),
    }
}

fn queue(s: &mut GroupState, name: &str) {
    ok(apply(
        s,
        T0,
        Op::CreateQueue {
            tenant: "".into(),
            name: name.into(),
            attrs: QueueAttributes::default(),
        },
    ));
}

fn topic(s: &mut GroupState, name: &str, filter_type: FilterType) {
    ok(apply(
        s,
        T0,
        Op::CreateTopic {
            tenant: "".into(),
            name: name.into(),
            filter_type,
            max_msg_size: 65_536,
        },
    ));
}

fn spec(name: &str, protocol: Protocol, endpoint: &str) -> SubscriptionSpec {
    SubscriptionSpec {
        name: name.into(),
        protocol,
        endpoint: endpoint.into(),
        strategy: NotifyStrategy::ExponentialDecayRetry,
        format: match protocol {
            Protocol::Queue => NotifyFormat::Simplified,
            Protocol::Http => NotifyFormat::Json,
        },
        filter_tags: vec![],
        binding_keys: vec![],
    }
}

fn subscribe(s: &mut GroupState, topic: &str, spec: SubscriptionSpec) -> OpResult {
    apply(
        s,
        T0,
        Op::Subscribe {
            key: key(topic),
            spec,
        },
    )
}

fn tags(t: &[&str]) -> Vec<String> {
    t.iter().map(|s| s.to_string()).collect()
}

fn publish(
    s: &mut GroupState,
    now: i64,
    topic: &str,
    body: &str,
    t: &[&str],
    rk: &str,
) -> OpResult {
    apply(
        s,
        now,
        Op::Publish {
            key: key(topic),
            bodies: vec![body.as_bytes().to_vec()],
            tags: tags(t),
            routing_key: rk.into(),
            reject_unmatched: false,
        },
    )
}

/// Everything receivable in `name`, as a set of bodies.
fn drain(s: &mut GroupState, name: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    loop {
        match apply(
            s,
            T0,
            Op::Receive {
                key: key(name),
                max: 16,
            },
        ) {
            OpResult::Received { messages, .. } if !messages.is_empty() => {
                out.extend(
                    messages
                        .into_iter()
                        .map(|m| String::from_utf8(m.body).unwrap()),
                );
            }
            _ => return out,
        }
    }
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn tag_fan_out_reaches_exactly_the_matching_queues_deterministically() {
    let mut s = GroupState::new(1, 1);
    for q in ["qa", "qb", "qall"] {
        queue(&mut s, q);
    }
    topic(&mut s, "t", FilterType::Tags);
    for (name, q, f) in [
        ("sa", "qa", &["a"][..]),
        ("sb", "qb", &["b"]),
        ("sall", "qall", &[]),
    ] {
        let mut sp = spec(name, Protocol::Queue, q);
        sp.filter_tags = tags(f);
        ok(subscribe(&mut s, "t", sp));
    }
    for (body, t) in [
        ("a", &["a"][..]),
        ("b", &["b"]),
        ("ab", &["a", "b"]),
        ("none", &[]),
    ] {
        let before = s.clone();
        let r = publish(&mut s, T0, "t", body, t, "");
        match &r {
            OpResult::Sent { msg_ids } => assert_eq!(msg_ids.len(), 1),
            r => panic!("{r:?}"),
        }
        // Determinism: the same command on the same state gives the same state.
        let mut again = before;
        publish(&mut again, T0, "t", body, t, "");
        assert_eq!(again, s);
    }
    assert_eq!(drain(&mut s, "qa"), set(&["a", "ab"]));
    assert_eq!(drain(&mut s, "qb"), set(&["b", "ab"]));
    assert_eq!(drain(&mut s, "qall"), set(&["a", "b", "ab", "none"]));
    // Queue subscriptions keep nothing in the topic.
    assert!(s.topics[&key("t")].messages.is_empty());
    assert_eq!(s.topics[&key("t")].subscriptions["sall"].stats.routed, 4);
}

#[test]
fn routing_keys_match_with_star_and_one_or_more_hash() {
    let mut s = GroupState::new(1, 1);
    topic(&mut s, "r", FilterType::RoutingKeys);
    for (q, b) in [("q1", "1.*.0"), ("q2", "1.#.0"), ("q3", "#"), ("q4", "x.y")] {
        queue(&mut s, q);
        let mut sp = spec(q, Protocol::Queue, q);
        sp.binding_keys = vec![b.into()];
        ok(subscribe(&mut s, "r", sp));
    }
    for k in ["1.2.0", "1.2.3.0", "1.0", "x.y"] {
        ok(publish(&mut s, T0, "r", k, &[], k));
    }
    assert_eq!(drain(&mut s, "q1"), set(&["1.2.0"]));
    assert_eq!(drain(&mut s, "q2"), set(&["1.2.0", "1.2.3.0"]));
    assert_eq!(
        drain(&mut s, "q3"),
        set(&["1.2.0", "1.2.3.0", "1.0", "x.y"])
    );
    assert_eq!(drain(&mut s, "q4"), set(&["x.y"]));
    assert_eq!(
        failed(publish(&mut s, T0, "r", "x", &[], "")),
        (CmqCode::InvalidParameter, 10700)
    );
    // A routing topic needs binding keys.
    assert_eq!(
        failed(subscribe(
            &mut s,
            "r",
            spec("nokeys", Protocol::Queue, "q1")
        )),
        (CmqCode::InvalidParameter, 10710)
    );
}

#[test]
fn other_groups_get_their_messages_through_the_outbox_exactly_once() {
    let groups = 3;
    let t = (0..)
        .map(|i| format!("topic{i}"))
        .find(|n| group_of(&key(n), groups) == 1)
        .unwrap();
    let q = (0..)
        .map(|i| format!("queue{i}"))
        .find(|n| group_of(&key(n), groups) == 2)
        .unwrap();
    let mut src = GroupState::new(1, groups);
    let mut dst = GroupState::new(2, groups);
    queue(&mut dst, &q);
    topic(&mut src, &t, FilterType::Tags);
    ok(subscribe(&mut src, &t, spec("s", Protocol::Queue, &q)));
    ok(publish(&mut src, T0, &t, "m1", &[], ""));
    ok(publish(&mut src, T0, &t, "m2", &[], ""));
    assert_eq!(src.outbox.len(), 2);
    let items: Vec<TransferItem> = src
        .outbox
        .iter()
        .map(|(&id, e)| {
            assert_eq!(e.target_group, 2);
            TransferItem {
                id,
                key: e.key.clone(),
                body: e.body.clone(),
            }
        })
        .collect();
    let transfer = Op::Transfers {
        source_group: 1,
        items: items.clone(),
    };
    ok(apply(&mut dst, T0, transfer.clone()));
    ok(apply(&mut dst, T0, transfer));
    assert_eq!(drain(&mut dst, &q), set(&["m1", "m2"]));
    assert_eq!(
        dst.queues[&key(&q)].live_count(),
        2,
        "no duplicate from the replay"
    );
    let ids = items.iter().map(|i| i.id).collect();
    ok(apply(&mut src, T0, Op::AckTransfers { ids }));
    assert!(src.outbox.is_empty());
}

fn results(sub: &str, seqs: &[u64], outcome: PushOutcome) -> Op {
    Op::PushResults {
        key: key("t"),
        results: seqs
            .iter()
            .map(|&seq| PushResult {
                subscription: sub.into(),
                seq,
                outcome,
            })
            .collect(),
    }
}

#[test]
fn the_push_schedule_is_replicated_state_and_idempotent() {
    let mut s = GroupState::new(1, 1);
    topic(&mut s, "t", FilterType::Tags);
    ok(subscribe(
        &mut s,
        "t",
        spec("h1", Protocol::Http, "http://127.0.0.1:1/a"),
    ));
    ok(subscribe(
        &mut s,
        "t",
        spec("h2", Protocol::Http, "http://127.0.0.1:1/b"),
    ));
    ok(publish(&mut s, T0, "t", "m1", &["x"], ""));
    ok(publish(&mut s, T0, "t", "m2", &[], ""));
    let seqs: Vec<u64> = s.topics[&key("t")].messages.keys().copied().collect();
    assert_eq!(seqs.len(), 2);
    {
        let t = &s.topics[&key("t")];
        assert!(t.messages.values().all(|m| m.refs == 2));
        let h1 = &t.subscriptions["h1"];
        assert_eq!(h1.due.len(), 2);
        assert!(h1
            .pending
            .values()
            .all(|p| p.next_attempt_ms == T0 && p.attempts == 0));
    }
    // h1: a failure, then success for both; the success replayed changes nothing.
    ok(apply(
        &mut s,
        T0,
        results("h1", &seqs[..1], PushOutcome::RetryAt(T0 + 1000)),
    ));
    let h1 = &s.topics[&key("t")].subscriptions["h1"];
    assert_eq!(
        h1.pending[&seqs[0]],
        PushState {
            attempts: 1,
            next_attempt_ms: T0 + 1000
        }
    );
    assert_eq!(h1.stats.retried, 1);
    assert!(h1.due.contains(&(T0 + 1000, seqs[0])));
    ok(apply(
        &mut s,
        T0,
        results("h1", &seqs, PushOutcome::Delivered),
    ));
    let snapshot = s.clone();
    ok(apply(
        &mut s,
        T0,
        results("h1", &seqs, PushOutcome::Delivered),
    ));
    assert_eq!(s, snapshot);
    let t = &s.topics[&key("t")];
    assert_eq!(t.subscriptions["h1"].stats.delivered, 2);
    assert!(t.subscriptions["h1"].pending.is_empty() && t.subscriptions["h1"].due.is_empty());
    // Still owed to h2.
    assert_eq!(t.messages.len(), 2);
    assert!(t.messages.values().all(|m| m.refs == 1));
    // h2 gives up on one; unsubscribing releases the other.
    ok(apply(
        &mut s,
        T0,
        results("h2", &seqs[..1], PushOutcome::GaveUp),
    ));
    assert_eq!(s.topics[&key("t")].subscriptions["h2"].stats.dropped, 1);
    assert_eq!(s.topics[&key("t")].messages.len(), 1);
    ok(apply(
        &mut s,
        T0,
        Op::Unsubscribe {
            key: key("t"),
            name: "H2".into(),
        },
    ));
    assert!(s.topics[&key("t")].messages.is_empty());
}

#[test]
fn undelivered_pushes_expire_after_a_day() {
    let mut s = GroupState::new(1, 1);
    topic(&mut s, "t", FilterType::Tags);
    ok(subscribe(
        &mut s,
        "t",
        spec("h", Protocol::Http, "http://127.0.0.1:1/"),
    ));
    ok(publish(&mut s, T0, "t", "m", &[], ""));
    ok(apply(&mut s, T0 + DAY_MS - 1000, Op::Tick));
    assert_eq!(s.topics[&key("t")].subscriptions["h"].pending.len(), 1);
    ok(apply(&mut s, T0 + DAY_MS + 1000, Op::Tick));
    let t = &s.topics[&key("t")];
    assert!(t.messages.is_empty());
    assert!(t.subscriptions["h"].pending.is_empty());
    assert_eq!(t.subscriptions["h"].stats.dropped, 1);
}

#[test]
fn topic_and_subscription_errors_carry_cmq_codes() {
    let mut s = GroupState::new(1, 1);
    topic(&mut s, "t", FilterType::Tags);
    let dup = apply(
        &mut s,
        T0,
        Op::CreateTopic {
            tenant: "".into(),
            name: "T".into(),
            filter_type: FilterType::Tags,
            max_msg_size: 65_536,
        },
    );
    assert_eq!(failed(dup).0, CmqCode::AlreadyExists);
    queue(&mut s, "q");
    ok(subscribe(&mut s, "t", spec("s", Protocol::Queue, "q")));
    assert_eq!(
        failed(subscribe(&mut s, "t", spec("S", Protocol::Queue, "q"))).0,
        CmqCode::SubscriptionExists
    );
    assert_eq!(
        failed(apply(&mut s, T0, Op::DeleteTopic { key: key("t") })),
        (CmqCode::InvalidParameter, 10540)
    );
    // Only SIMPLIFIED for a queue subscription.
    let patch = SubscriptionPatch {
        format: Some(NotifyFormat::Json),
        ..Default::default()
    };
    let r = apply(
        &mut s,
        T0,
        Op::SetSubscription {
            key: key("t"),
            name: "s".into(),
            patch,
        },
    );
    assert_eq!(failed(r), (CmqCode::InvalidParameter, 10640));
    for i in 1..100 {
        ok(subscribe(
            &mut s,
            "t",
            spec(&format!("s{i}"), Protocol::Queue, "q"),
        ));
    }
    assert_eq!(
        failed(subscribe(&mut s, "t", spec("s100", Protocol::Queue, "q"))).0,
        CmqCode::SubscriptionLimit
    );
    // Unmatched publishes: accepted, or 6030 when the leader is configured to refuse them.
    topic(&mut s, "empty", FilterType::Tags);
    let refuse = |body: &str| Op::Publish {
        key: key("empty"),
        bodies: vec![body.as_bytes().to_vec()],
        tags: vec![],
        routing_key: String::new(),
        reject_unmatched: true,
    };
    assert_eq!(
        failed(apply(&mut s, T0, refuse("x"))),
        (CmqCode::NoSubscriptionMatched, 10650)
    );
    ok(publish(&mut s, T0, "empty", "x", &[], ""));
    let mut sp = spec("picky", Protocol::Queue, "q");
    sp.filter_tags = tags(&["only"]);
    ok(subscribe(&mut s, "empty", sp));
    assert_eq!(
        failed(apply(&mut s, T0, refuse("y"))),
        (CmqCode::NoSubscriptionMatched, 10730)
    );
    assert_eq!(
        failed(publish(&mut s, T0, "missing", "x", &[], "")).0,
        CmqCode::NotFound
    );
    let big = "x".repeat(65_537);
    assert_eq!(
        failed(publish(&mut s, T0, "t", &big, &[], "")).0,
        CmqCode::MessageTooLarge
    );
    // Delete, then the name is reserved for 10 s.
    ok(apply(
        &mut s,
        T0,
        Op::Unsubscribe {
            key: key("empty"),
            name: "picky".into(),
        },
    ));
    ok(apply(&mut s, T0, Op::DeleteTopic { key: key("empty") }));
    let recreate = Op::CreateTopic {
        tenant: "".into(),
        name: "empty".into(),
        filter_type: FilterType::Tags,
        max_msg_size: 65_536,
    };
    assert_eq!(
        failed(apply(&mut s, T0 + 5000, recreate.clone())).0,
        CmqCode::RecreatedTooSoon
    );
    ok(apply(&mut s, T0 + 11_000, recreate));
}

#[test]
fn changing_filter_tags_changes_routing() {
    let mut s = GroupState::new(1, 1);
    queue(&mut s, "q");
    topic(&mut s, "t", FilterType::Tags);
    let mut sp = spec("s", Protocol::Queue, "q");
    sp.filter_tags = tags(&["a"]);
    ok(subscribe(&mut s, "t", sp));
    let patch = SubscriptionPatch {
        filter_tags: Some(tags(&["c"])),
        ..Default::default()
    };
    ok(apply(
        &mut s,
        T0,
        Op::SetSubscription {
            key: key("t"),
            name: "s".into(),
            patch,
        },
    ));
    ok(publish(&mut s, T0, "t", "tagged-a", &["a"], ""));
    ok(publish(&mut s, T0, "t", "tagged-c", &["c"], ""));
    assert_eq!(drain(&mut s, "q"), set(&["tagged-c"]));
}

proptest! {
    /// Random subscriptions and publishes: every queue ends up with exactly the bodies whose
    /// tags meet its filter (all of them for an empty filter), each once.
    #[test]
    fn tag_fan_out_matches_a_model(
        filters in prop::collection::vec(prop::collection::btree_set("[abc]", 0..3), 1..6),
        msgs in prop::collection::vec(prop::collection::btree_set("[abc]", 0..3), 0..20),
    ) {
        let mut s = GroupState::new(1, 1);
        topic(&mut s, "t", FilterType::Tags);
        for (i, f) in filters.iter().enumerate() {
            let q = format!("q{i}");
            queue(&mut s, &q);
            let mut sp = spec(&format!("s{i}"), Protocol::Queue, &q);
            sp.filter_tags = f.iter().cloned().collect();
            ok(subscribe(&mut s, "t", sp));
        }
        for (n, m) in msgs.iter().enumerate() {
            let t: Vec<&str> = m.iter().map(String::as_str).collect();
            ok(publish(&mut s, T0, "t", &format!("m{n}"), &t, ""));
        }
        for (i, f) in filters.iter().enumerate() {
            let want: BTreeSet<String> = msgs
                .iter()
                .enumerate()
                .filter(|(_, m)| f.is_empty() || !f.is_disjoint(m))
                .map(|(n, _)| format!("m{n}"))
                .collect();
            prop_assert_eq!(s.queues[&key(&format!("q{i}"))].live_count(), want.len() as u64);
            prop_assert_eq!(
                s.topics[&key("t")].subscriptions[&format!("s{i}")].stats.routed,
                want.len() as u64
            );
            prop_assert_eq!(drain(&mut s, &format!("q{i}")), want);
        }
    }
}
