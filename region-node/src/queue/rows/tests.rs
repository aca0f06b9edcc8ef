//! The rows written after each apply always rebuild exactly the state in memory, whatever the
//! commands: the property a restart (and a snapshot, which is a checkpoint of the rows) relies
//! on. A change that forgets to mark what it touched fails here.

use std::collections::BTreeMap;

use meridian_api::limits::{
    DeadLetterPolicy, DeadLetterTrigger, QueueAttributes, QueueAttributesPatch,
};
use meridian_api::topics::{FilterType, NotifyFormat, NotifyStrategy, Protocol};
use proptest::prelude::*;

use super::{group_rows, RowOp};
use crate::command::{
    Command, Op, OpResult, PushOutcome, PushResult, QueueKey, Receipt, TransferItem,
};
use crate::queue::GroupState;
use crate::topic::SubscriptionSpec;

const T0: i64 = 1_700_000_000_000;
const QUEUES: [&str; 4] = ["a", "b", "Dlq", "d"];

fn write(table: &mut BTreeMap<Vec<u8>, Vec<u8>>, ops: Vec<RowOp>) {
    for op in ops {
        match op {
            RowOp::Put(k, v) => {
                table.insert(k, v.to_vec());
            }
            RowOp::Delete(k) => {
                table.remove(&k);
            }
            RowOp::DeleteRange(from, to) => table.retain(|k, _| *k < from || *k >= to),
        }
    }
}

fn borrowed(table: &BTreeMap<Vec<u8>, Vec<u8>>) -> impl Iterator<Item = (&[u8], &[u8])> {
    table.iter().map(|(k, v)| (k.as_slice(), v.as_slice()))
}

fn reload(table: &BTreeMap<Vec<u8>, Vec<u8>>) -> GroupState {
    let (from, to) = group_rows(1);
    let rows = table
        .range(from..to)
        .map(|(k, v)| (k.as_slice(), v.as_slice()));
    GroupState::from_rows(1, 2, rows).expect("rows parse")
}

#[derive(Debug, Clone)]
enum Step {
    Create(usize, u8),
    SetAttrs(usize, u8),
    DeleteQueue(usize),
    Rewind(usize),
    Send(usize, u8, u8),
    Receive(usize, u8),
    DeleteReceived(usize),
    Transfer(usize, u8),
    AckTransfers,
    Tick,
    Advance(u16),
    CreateTopic(bool),
    DeleteTopic,
    Subscribe(bool, usize),
    Unsubscribe(bool),
    Publish(u8),
    PushResult(u8, u8),
    Credential(u8, bool),
    /// Ends a Raft entry: the changes so far are written out and checked.
    Flush,
}

fn step() -> impl Strategy<Value = Step> {
    let q = 0..QUEUES.len();
    prop_oneof![
        (q.clone(), 0u8..4).prop_map(|(q, v)| Step::Create(q, v)),
        (q.clone(), 0u8..4).prop_map(|(q, v)| Step::SetAttrs(q, v)),
        q.clone().prop_map(Step::DeleteQueue),
        q.clone().prop_map(Step::Rewind),
        (q.clone(), 1u8..4, 0u8..3).prop_map(|(q, n, d)| Step::Send(q, n, d)),
        (q.clone(), 1u8..6).prop_map(|(q, n)| Step::Receive(q, n)),
        q.clone().prop_map(Step::DeleteReceived),
        (q.clone(), 1u8..20).prop_map(|(q, id)| Step::Transfer(q, id)),
        Just(Step::AckTransfers),
        Just(Step::Tick),
        (0u16..200).prop_map(Step::Advance),
        any::<bool>().prop_map(Step::CreateTopic),
        Just(Step::DeleteTopic),
        (any::<bool>(), q.clone()).prop_map(|(h, q)| Step::Subscribe(h, q)),
        any::<bool>().prop_map(Step::Unsubscribe),
        (1u8..3).prop_map(Step::Publish),
        (0u8..3, 0u8..8).prop_map(|(o, s)| Step::PushResult(o, s)),
        (0u8..3, any::<bool>()).prop_map(|(i, r)| Step::Credential(i, r)),
        Just(Step::Flush),
        Just(Step::Flush),
    ]
}

fn key(name: &str) -> QueueKey {
    QueueKey::new("", name)
}

fn attrs(v: u8) -> QueueAttributes {
    let mut a = QueueAttributes {
        visibility_timeout: 5,
        ..Default::default()
    };
    if v & 1 == 1 {
        a.rewind_seconds = 120;
    }
    if v & 2 == 2 {
        a.msg_retention_seconds = 60;
        a.dead_letter_policy = Some(DeadLetterPolicy {
            dead_letter_queue: "dlq".into(),
            policy: DeadLetterTrigger::MaxReceiveCount(2),
        });
    }
    a
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn rows_rebuild_the_state(steps in proptest::collection::vec(step(), 1..150)) {
        let mut s = GroupState::new(1, 2);
        let mut table = BTreeMap::new();
        let mut now = T0;
        let mut received: BTreeMap<usize, Vec<Receipt>> = BTreeMap::new();
        for st in steps {
            let op = match st {
                Step::Create(q, v) => Some(Op::CreateQueue { tenant: "".into(), name: QUEUES[q].into(), attrs: attrs(v) }),
                Step::SetAttrs(q, v) => Some(Op::SetQueueAttributes {
                    key: key(QUEUES[q]),
                    patch: QueueAttributesPatch {
                        rewind_seconds: Some(if v & 1 == 1 { 60 } else { 0 }),
                        visibility_timeout: Some(u32::from(v) + 1),
                        dead_letter_policy: Some(attrs(v).dead_letter_policy),
                        ..Default::default()
                    },
                }),
                Step::DeleteQueue(q) => Some(Op::DeleteQueue { key: key(QUEUES[q]) }),
                Step::Rewind(q) => Some(Op::RewindQueue { key: key(QUEUES[q]), start_ms: now - 30_000 }),
                Step::Send(q, n, d) => Some(Op::Send {
                    key: key(QUEUES[q]),
                    bodies: (0..n).map(|i| vec![i; usize::from(i) + 1].into()).collect(),
                    delay_seconds: u32::from(d) * 3,
                }),
                Step::Receive(q, n) => {
                    if let OpResult::Received { messages, .. } = s.apply(&Command { now_ms: now, op: Op::Receive { key: key(QUEUES[q]), max: u32::from(n) } }) {
                        received.insert(q, messages.iter().map(|m| Receipt { seq: m.seq, generation: m.dequeue_count }).collect());
                    }
                    None
                }
                Step::DeleteReceived(q) => Some(Op::Delete { key: key(QUEUES[q]), receipts: received.remove(&q).unwrap_or_default() }),
                Step::Transfer(q, id) => Some(Op::Transfers {
                    source_group: 2,
                    items: vec![TransferItem { id: u64::from(id), key: key(QUEUES[q]), body: b"moved".to_vec() }],
                }),
                Step::AckTransfers => Some(Op::AckTransfers { ids: s.outbox.keys().copied().take(2).collect() }),
                Step::Tick => Some(Op::Tick),
                Step::Advance(secs) => {
                    now += i64::from(secs) * 1000;
                    None
                }
                Step::CreateTopic(routing) => Some(Op::CreateTopic {
                    tenant: "".into(),
                    name: "t".into(),
                    filter_type: if routing { FilterType::RoutingKeys } else { FilterType::Tags },
                    max_msg_size: 65_536,
                }),
                Step::DeleteTopic => Some(Op::DeleteTopic { key: key("t") }),
                Step::Subscribe(http, q) => Some(Op::Subscribe {
                    key: key("t"),
                    spec: SubscriptionSpec {
                        name: if http { "h".into() } else { format!("q{q}") },
                        protocol: if http { Protocol::Http } else { Protocol::Queue },
                        endpoint: if http { "http://127.0.0.1:9/x".into() } else { QUEUES[q].into() },
                        strategy: NotifyStrategy::ExponentialDecayRetry,
                        format: if http { NotifyFormat::Json } else { NotifyFormat::Simplified },
                        filter_tags: vec![],
                        binding_keys: vec![],
                    },
                }),
                Step::Unsubscribe(http) => Some(Op::Unsubscribe { key: key("t"), name: if http { "h".into() } else { "q0".into() } }),
                Step::Publish(n) => Some(Op::Publish {
                    key: key("t"),
                    bodies: (0..n).map(|i| vec![b'p', i]).collect(),
                    tags: vec![],
                    routing_key: String::new(),
                    reject_unmatched: false,
                }),
                Step::PushResult(o, seq) => Some(Op::PushResults {
                    key: key("t"),
                    results: vec![PushResult {
                        subscription: "h".into(),
                        seq: s.topics.get(&key("t")).and_then(|t| t.messages.keys().nth(usize::from(seq) % 3).copied()).unwrap_or(0),
                        outcome: match o { 0 => PushOutcome::Delivered, 1 => PushOutcome::GaveUp, _ => PushOutcome::RetryAt(now + 5000) },
                    }],
                }),
                Step::Credential(i, revoke) => Some(if revoke {
                    Op::RevokeCredential { secret_id: format!("id{i}") }
                } else {
                    Op::CreateCredential { secret_id: format!("id{i}"), secret_key: "k".into(), app_id: u64::from(i) }
                }),
                Step::Flush => {
                    let mut ops = Vec::new();
                    s.drain_changes(&mut ops);
                    let keys: Vec<&Vec<u8>> = ops
                        .iter()
                        .filter_map(|op| match op {
                            RowOp::Put(k, _) | RowOp::Delete(k) => Some(k),
                            RowOp::DeleteRange(..) => None,
                        })
                        .collect();
                    prop_assert!(keys.windows(2).all(|w| w[0] < w[1]), "rows in ascending key order, each once");
                    prop_assert!(
                        ops.iter().skip_while(|op| matches!(op, RowOp::DeleteRange(..))).all(|op| !matches!(op, RowOp::DeleteRange(..))),
                        "range deletions first"
                    );
                    write(&mut table, ops);
                    prop_assert_eq!(&reload(&table), &s);
                    None
                }
            };
            if let Some(op) = op {
                // The state machine's own path (sends move their bodies in).
                s.apply_owned(Command { now_ms: now, op });
            }
        }
        let mut ops = Vec::new();
        s.drain_changes(&mut ops);
        write(&mut table, ops);
        prop_assert_eq!(&reload(&table), &s);
        // A restore from scratch writes the same rows.
        let mut fresh = BTreeMap::new();
        write(&mut fresh, s.all_rows());
        prop_assert_eq!(&fresh, &table);
    }
}

#[test]
fn a_malformed_row_is_an_error_not_a_panic() {
    let mut s = GroupState::new(1, 2);
    s.apply(&Command {
        now_ms: T0,
        op: Op::CreateQueue {
            tenant: "".into(),
            name: "a".into(),
            attrs: QueueAttributes::default(),
        },
    });
    s.apply(&Command {
        now_ms: T0,
        op: Op::Send {
            key: key("a"),
            bodies: vec![b"x".to_vec().into()],
            delay_seconds: 0,
        },
    });
    let mut table = BTreeMap::new();
    write(&mut table, s.all_rows());
    for (k, _) in table.clone() {
        let mut broken = table.clone();
        broken.insert(k.clone(), vec![0xff; 3]);
        // Bodies are raw bytes: any value is a valid body.
        if k[4] != b'b' {
            assert!(
                GroupState::from_rows(1, 2, borrowed(&broken)).is_err(),
                "{}",
                hex::encode(&k)
            );
        }
        let mut missing = table.clone();
        missing.remove(&k);
        if k[4] == b'b' || k[4] == b'q' {
            assert!(
                GroupState::from_rows(1, 2, borrowed(&missing)).is_err(),
                "{}",
                hex::encode(&k)
            );
        }
    }
}

/// Message rows among `ops`: (puts, deletes). Byte 4 of a key is its tag.
fn message_rows(ops: &[RowOp]) -> (usize, usize) {
    let is_message = |k: &[u8]| k[4] == b'b' || k[4] == b'h';
    let puts = ops
        .iter()
        .filter(|op| matches!(op, RowOp::Put(k, _) if is_message(k)))
        .count();
    let deletes = ops
        .iter()
        .filter(|op| matches!(op, RowOp::Delete(k) if is_message(k)))
        .count();
    (puts, deletes)
}

fn apply(s: &mut GroupState, op: Op) -> OpResult {
    s.apply(&Command { now_ms: T0, op })
}

/// Writes what changed into `table`, checks it rebuilds `s`, and counts the message rows.
fn drain(s: &mut GroupState, table: &mut BTreeMap<Vec<u8>, Vec<u8>>) -> (usize, usize) {
    let mut ops = Vec::new();
    s.drain_changes(&mut ops);
    let counts = message_rows(&ops);
    write(table, ops);
    assert_eq!(&reload(table), s);
    counts
}

/// Sends `sent` messages to queue `a`, then receives up to `consumed` and deletes them.
fn send_and_consume(s: &mut GroupState, sent: usize, consumed: u32) {
    if sent > 0 {
        apply(
            s,
            Op::Send {
                key: key("a"),
                bodies: vec![b"x".to_vec().into(); sent],
                delay_seconds: 0,
            },
        );
    }
    let OpResult::Received { messages, .. } = apply(
        s,
        Op::Receive {
            key: key("a"),
            max: consumed,
        },
    ) else {
        panic!("receive refused");
    };
    let receipts = messages
        .iter()
        .map(|m| Receipt {
            seq: m.seq,
            generation: m.dequeue_count,
        })
        .collect();
    apply(
        s,
        Op::Delete {
            key: key("a"),
            receipts,
        },
    );
}

#[test]
fn a_message_sent_and_deleted_between_two_writes_costs_no_row() {
    let mut s = GroupState::new(1, 2);
    apply(
        &mut s,
        Op::CreateQueue {
            tenant: "".into(),
            name: "a".into(),
            attrs: QueueAttributes::default(),
        },
    );
    let mut table = BTreeMap::new();
    drain(&mut s, &mut table);
    // Three sent, two of them received and deleted, then written: only the third has rows.
    send_and_consume(&mut s, 3, 2);
    assert_eq!(drain(&mut s, &mut table), (2, 0));
    // The third, written out before, is deleted: its two rows go.
    send_and_consume(&mut s, 0, 1);
    assert_eq!(drain(&mut s, &mut table), (0, 2));
}
