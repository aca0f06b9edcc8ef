//! The rows written after each apply always rebuild exactly the state in memory, whatever the
//! commands: the property a restart (and a snapshot, which is a checkpoint of the rows) relies
//! on. A change that forgets to mark what it touched fails here.

use std::collections::BTreeMap;

use meridian_api::limits::{
    DeadLetterPolicy, DeadLetterTrigger, QueueAttributes, QueueAttributesPatch,
};
use meridian_api::topics::{FilterType, NotifyFormat, NotifyStrategy, Protocol};
use proptest::prelude::*;

use super::{group_rows, RowOp, Table};
use crate::command::{
    Command, Op, OpResult, PushOutcome, PushResult, QueueKey, Receipt, TransferItem,
};
use crate::queue::GroupState;
use crate::topic::SubscriptionSpec;

const T0: i64 = 1_700_000_000_000;
/// "a" and "a1": one name a prefix of another, so a queue's row ranges must not cover the
/// other's rows.
const QUEUES: [&str; 5] = ["a", "a1", "b", "Dlq", "d"];

/// Both tables of rows, as one map keyed by table and key.
type Rows = BTreeMap<(Table, Vec<u8>), Vec<u8>>;

fn write(table: &mut Rows, ops: Vec<RowOp>) {
    for op in ops {
        match op {
            RowOp::Put(t, k, v) => {
                table.insert((t, k), v.to_vec());
            }
            RowOp::Delete(t, k) => {
                table.remove(&(t, k));
            }
            RowOp::DeleteRange(t, from, to) => {
                table.retain(|(tk, k), _| *tk != t || *k < from || *k >= to)
            }
        }
    }
}

fn borrowed(table: &Rows) -> impl Iterator<Item = (Table, &[u8], &[u8])> {
    table
        .iter()
        .map(|((t, k), v)| (*t, k.as_slice(), v.as_slice()))
}

fn reload(table: &Rows) -> GroupState {
    let (from, to) = group_rows(1);
    let rows = borrowed(table).filter(|(_, k, _)| *k >= from.as_slice() && *k < to.as_slice());
    GroupState::from_rows(1, 2, rows, true).expect("rows parse")
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
                    let keys: Vec<(Table, &[u8])> = ops
                        .iter()
                        .filter(|op| !matches!(op, RowOp::DeleteRange(..)))
                        .map(|op| (op.table(), op.key()))
                        .collect();
                    prop_assert!(keys.windows(2).all(|w| w[0] < w[1]), "rows by table in ascending key order, each once");
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
    assert!(table.keys().any(|(t, _)| *t == Table::Messages));
    for (t, k) in table.keys().cloned() {
        let mut broken = table.clone();
        broken.insert((t, k.clone()), vec![0xff; 3]);
        let is_body = t == Table::Messages && k.last() == Some(&b'b');
        // Bodies are raw bytes: any value is a valid body.
        if !is_body {
            assert!(
                GroupState::from_rows(1, 2, borrowed(&broken), true).is_err(),
                "{}",
                hex::encode(&k)
            );
        }
        let mut missing = table.clone();
        missing.remove(&(t, k.clone()));
        if is_body || (t == Table::Group && k[4] == b'q') {
            // Also when bodies stay in the rows: every header's body row must be there.
            for load_bodies in [true, false] {
                assert!(
                    GroupState::from_rows(1, 2, borrowed(&missing), load_bodies).is_err(),
                    "{}",
                    hex::encode(&k)
                );
            }
        }
    }
    // Keys as broken as values: a message row short of its sequence number, or of a tag
    // that is neither body nor header.
    let (_, message) = table
        .keys()
        .find(|(t, _)| *t == Table::Messages)
        .cloned()
        .unwrap();
    let short = message[..message.len() - 2].to_vec();
    let unknown = [&message[..message.len() - 1], b"z"].concat();
    for bad in [short, unknown] {
        let mut broken = table.clone();
        broken.insert((Table::Messages, bad.clone()), b"x".to_vec());
        assert!(
            GroupState::from_rows(1, 2, borrowed(&broken), true).is_err(),
            "{}",
            hex::encode(&bad)
        );
    }
}

/// Message rows among `ops`: (puts, deletes).
fn message_rows(ops: &[RowOp]) -> (usize, usize) {
    let puts = ops
        .iter()
        .filter(|op| matches!(op, RowOp::Put(Table::Messages, ..)))
        .count();
    let deletes = ops
        .iter()
        .filter(|op| matches!(op, RowOp::Delete(Table::Messages, _)))
        .count();
    (puts, deletes)
}

fn apply(s: &mut GroupState, op: Op) -> OpResult {
    s.apply(&Command { now_ms: T0, op })
}

/// Writes what changed into `table`, checks it rebuilds `s`, and counts the message rows.
fn drain(s: &mut GroupState, table: &mut Rows) -> (usize, usize) {
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

/// What lets RocksDB move a flush's table file down instead of merging it with older ones:
/// the message rows of a write all sort after those of earlier writes of the same queue
/// (bodies and headers alike), and none of the group's own rows are among them.
#[test]
fn a_queues_newer_message_rows_sort_after_its_older_ones() {
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
    let mut last: Option<Vec<u8>> = None;
    for _ in 0..3 {
        send_and_consume(&mut s, 4, 0);
        let mut ops = Vec::new();
        s.drain_changes(&mut ops);
        let messages: Vec<&[u8]> = ops
            .iter()
            .filter(|op| op.table() == Table::Messages)
            .map(RowOp::key)
            .collect();
        assert_eq!(messages.len(), 8, "a body and a header per message");
        assert!(ops.iter().any(|op| op.table() == Table::Group));
        let (first, newest) = (messages[0], messages[messages.len() - 1]);
        if let Some(last) = &last {
            assert!(
                first > last.as_slice(),
                "a write's rows start past the last write's"
            );
        }
        last = Some(newest.to_vec());
        write(&mut table, ops);
    }
    assert_eq!(&reload(&table), &s);
}
