//! Unit and property tests of the queue model: visibility, delete by handle, delay, DLQ moves,
//! rewind, retention and counters.

use meridian_api::limits::{DeadLetterPolicy, DeadLetterTrigger, QueueAttributes};
use meridian_api::CmqCode;
use proptest::prelude::*;

use super::GroupState;
use crate::command::{Command, Delivered, Op, OpResult, QueueKey, Receipt};
use crate::placement::group_of;

const T0: i64 = 1_700_000_000_000;

struct Harness {
    s: GroupState,
    now: i64,
}

impl Harness {
    fn new() -> Self {
        Self {
            s: GroupState::new(1, 1),
            now: T0,
        }
    }
    fn apply(&mut self, op: Op) -> OpResult {
        self.s.apply(&Command {
            now_ms: self.now,
            op,
        })
    }
    fn key(name: &str) -> QueueKey {
        QueueKey::new("", name)
    }
    fn create(&mut self, name: &str, f: impl FnOnce(&mut QueueAttributes)) {
        let mut attrs = QueueAttributes::default();
        f(&mut attrs);
        let r = self.apply(Op::CreateQueue {
            tenant: "".into(),
            name: name.into(),
            attrs,
        });
        assert!(matches!(r, OpResult::Created { .. }), "{r:?}");
    }
    fn send(&mut self, name: &str, body: &str, delay: u32) -> String {
        match self.apply(Op::Send {
            key: Self::key(name),
            bodies: vec![body.as_bytes().to_vec().into()],
            delay_seconds: delay,
        }) {
            OpResult::Sent { mut msg_ids } => msg_ids.pop().unwrap(),
            r => panic!("{r:?}"),
        }
    }
    fn receive(&mut self, name: &str, max: u32) -> Vec<Delivered> {
        match self.apply(Op::Receive {
            key: Self::key(name),
            max,
        }) {
            OpResult::Received { messages, .. } => messages,
            r => panic!("{r:?}"),
        }
    }
    fn delete(&mut self, name: &str, d: &Delivered) -> bool {
        let receipts = vec![Receipt {
            seq: d.seq,
            generation: d.dequeue_count,
        }];
        match self.apply(Op::Delete {
            key: Self::key(name),
            receipts,
        }) {
            OpResult::Deleted { outcomes } => outcomes[0].is_none(),
            r => panic!("{r:?}"),
        }
    }
    fn counters(&self, name: &str) -> super::QueueCounters {
        self.s.queues[&Self::key(name)].counters(self.now)
    }
    fn secs(&mut self, s: i64) {
        self.now += s * 1000;
    }
}

#[test]
fn visibility_timeout_hides_then_redelivers() {
    let mut h = Harness::new();
    h.create("q", |a| a.visibility_timeout = 10);
    h.send("q", "a", 0);
    let first = h.receive("q", 16);
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].dequeue_count, 1);
    assert_eq!(first[0].next_visible_ms, T0 + 10_000);
    assert_eq!(first[0].first_dequeue_ms, T0);
    assert!(h.receive("q", 16).is_empty(), "invisible while in flight");
    assert_eq!(h.counters("q").inactive, 1);
    h.secs(10);
    let again = h.receive("q", 16);
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].dequeue_count, 2);
    assert_eq!(again[0].first_dequeue_ms, T0);
}

#[test]
fn only_the_latest_handle_deletes() {
    let mut h = Harness::new();
    h.create("q", |a| a.visibility_timeout = 5);
    h.send("q", "a", 0);
    let old = h.receive("q", 1).pop().unwrap();
    h.secs(5);
    let new = h.receive("q", 1).pop().unwrap();
    assert!(!h.delete("q", &old), "superseded handle must fail");
    assert!(h.delete("q", &new));
    assert!(!h.delete("q", &new), "second delete must fail");
    h.secs(100);
    assert!(h.receive("q", 16).is_empty(), "deleted for good");
}

#[test]
fn expired_handle_is_rejected() {
    let mut h = Harness::new();
    h.create("q", |a| a.visibility_timeout = 5);
    h.send("q", "a", 0);
    let d = h.receive("q", 1).pop().unwrap();
    h.secs(6);
    assert!(!h.delete("q", &d));
}

#[test]
fn delay_then_active() {
    let mut h = Harness::new();
    h.create("q", |_| {});
    h.send("q", "later", 30);
    assert_eq!(h.counters("q").delayed, 1);
    assert!(h.receive("q", 1).is_empty());
    h.secs(30);
    assert_eq!(h.counters("q").active, 1);
    assert_eq!(h.receive("q", 1).len(), 1);
}

#[test]
fn max_receive_count_moves_to_dead_letter_queue() {
    let mut h = Harness::new();
    h.create("dlq", |_| {});
    h.create("src", |a| {
        a.visibility_timeout = 1;
        a.dead_letter_policy = Some(DeadLetterPolicy {
            dead_letter_queue: "dlq".into(),
            policy: DeadLetterTrigger::MaxReceiveCount(2),
        })
    });
    h.send("src", "poison", 0);
    assert_eq!(h.receive("src", 1).len(), 1);
    h.secs(1);
    assert_eq!(h.receive("src", 1).len(), 1);
    h.secs(1);
    assert!(
        h.receive("src", 1).is_empty(),
        "third receive dead-letters it"
    );
    let dead = h.receive("dlq", 1);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].body, b"poison");
}

#[test]
fn time_to_live_moves_to_dead_letter_queue_on_tick() {
    let mut h = Harness::new();
    h.create("dlq", |_| {});
    h.create("src", |a| {
        a.dead_letter_policy = Some(DeadLetterPolicy {
            dead_letter_queue: "dlq".into(),
            policy: DeadLetterTrigger::MaxTimeToLive(300),
        })
    });
    h.send("src", "stale", 0);
    h.secs(300);
    h.apply(Op::Tick);
    assert_eq!(h.counters("src").active, 0);
    assert_eq!(h.receive("dlq", 1)[0].body, b"stale");
}

#[test]
fn dead_letter_queue_in_another_group_goes_through_outbox() {
    // Find a dlq name that hashes to a different group of 2.
    let mut s = GroupState::new(1, 2);
    let dlq = (0..100)
        .map(|i| format!("dlq{i}"))
        .find(|n| group_of(&QueueKey::new("", n), 2) == 2)
        .unwrap();
    let attrs = QueueAttributes {
        visibility_timeout: 1,
        dead_letter_policy: Some(DeadLetterPolicy {
            dead_letter_queue: dlq.clone(),
            policy: DeadLetterTrigger::MaxReceiveCount(1),
        }),
        ..Default::default()
    };
    let c = |now, op| Command { now_ms: now, op };
    s.apply(&c(
        T0,
        Op::CreateQueue {
            tenant: "".into(),
            name: "src".into(),
            attrs,
        },
    ));
    let key = QueueKey::new("", "src");
    s.apply(&c(
        T0,
        Op::Send {
            key: key.clone(),
            bodies: vec![b"x".to_vec().into()],
            delay_seconds: 0,
        },
    ));
    s.apply(&c(
        T0,
        Op::Receive {
            key: key.clone(),
            max: 1,
        },
    ));
    s.apply(&c(
        T0 + 1000,
        Op::Receive {
            key: key.clone(),
            max: 1,
        },
    ));
    assert_eq!(s.outbox.len(), 1);
    let (&id, e) = s.outbox.iter().next().unwrap();
    assert_eq!((e.target_group, e.key.name.as_str()), (2, dlq.as_str()));

    // The target applies the transfer once, however often it is retried.
    let mut t = GroupState::new(2, 2);
    t.apply(&c(
        T0,
        Op::CreateQueue {
            tenant: "".into(),
            name: dlq.clone(),
            attrs: Default::default(),
        },
    ));
    let transfer = Op::Transfers {
        source_group: 1,
        items: vec![crate::command::TransferItem {
            id,
            key: e.key.clone(),
            body: e.body.clone(),
        }],
    };
    t.apply(&c(T0, transfer.clone()));
    t.apply(&c(T0, transfer));
    assert_eq!(t.queues[&QueueKey::new("", &dlq)].live_count(), 1);
    s.apply(&c(T0, Op::AckTransfers { ids: vec![id] }));
    assert!(s.outbox.is_empty());
}

#[test]
fn rewind_redelivers_consumed_messages_in_window() {
    let mut h = Harness::new();
    h.create("q", |a| a.rewind_seconds = 3600);
    h.send("q", "a", 0);
    h.secs(10);
    h.send("q", "b", 0);
    for d in h.receive("q", 16) {
        assert!(h.delete("q", &d));
    }
    assert_eq!(h.counters("q").rewindable, 2);
    assert_eq!(h.counters("q").active, 0);
    h.secs(10);
    let r = h.apply(Op::RewindQueue {
        key: Harness::key("q"),
        start_ms: T0 + 5_000,
    });
    assert!(matches!(r, OpResult::Done), "{r:?}");
    let again = h.receive("q", 16);
    assert_eq!(
        again.len(),
        1,
        "only messages produced at or after the start"
    );
    assert_eq!(again[0].body, b"b");
}

#[test]
fn rewind_refused_when_disabled_or_out_of_window() {
    let mut h = Harness::new();
    h.create("off", |_| {});
    match h.apply(Op::RewindQueue {
        key: Harness::key("off"),
        start_ms: T0,
    }) {
        OpResult::Failed(e) => assert_eq!(e.code, CmqCode::RewindDisabled),
        r => panic!("{r:?}"),
    }
    h.create("on", |a| a.rewind_seconds = 60);
    match h.apply(Op::RewindQueue {
        key: Harness::key("on"),
        start_ms: T0 - 3_600_000,
    }) {
        OpResult::Failed(e) => assert_eq!((e.code, e.module), (CmqCode::InvalidParameter, 10680)),
        r => panic!("{r:?}"),
    }
}

#[test]
fn retention_expires_messages_and_rewind_window_ends() {
    let mut h = Harness::new();
    h.create("q", |a| {
        a.msg_retention_seconds = 60;
        a.rewind_seconds = 30;
    });
    h.send("q", "a", 0);
    h.send("q", "b", 0);
    let d = h.receive("q", 1).pop().unwrap();
    assert!(h.delete("q", &d));
    h.secs(31);
    h.apply(Op::Tick);
    assert_eq!(h.counters("q").rewindable, 0, "rewind window over");
    h.secs(30);
    h.apply(Op::Tick);
    let c = h.counters("q");
    assert_eq!(
        (c.active, c.inactive, c.delayed, c.min_msg_ms),
        (0, 0, 0, 0)
    );
}

#[test]
fn heap_limit_and_errors() {
    let mut h = Harness::new();
    h.create("q", |a| a.max_msg_heap_num = 2);
    h.send("q", "a", 0);
    h.send("q", "b", 0);
    match h.apply(Op::Send {
        key: Harness::key("q"),
        bodies: vec![b"c".to_vec().into()],
        delay_seconds: 0,
    }) {
        OpResult::Failed(e) => assert_eq!(e.code, CmqCode::HeapFull),
        r => panic!("{r:?}"),
    }
    match h.apply(Op::Receive {
        key: Harness::key("nope"),
        max: 1,
    }) {
        OpResult::Failed(e) => assert_eq!(e.code, CmqCode::NotFound),
        r => panic!("{r:?}"),
    }
    match h.apply(Op::CreateQueue {
        tenant: "".into(),
        name: "Q".into(),
        attrs: Default::default(),
    }) {
        OpResult::Failed(e) => assert_eq!(e.code, CmqCode::AlreadyExists, "case-insensitive"),
        r => panic!("{r:?}"),
    }
    h.apply(Op::DeleteQueue {
        key: Harness::key("q"),
    });
    match h.apply(Op::CreateQueue {
        tenant: "".into(),
        name: "q".into(),
        attrs: Default::default(),
    }) {
        OpResult::Failed(e) => assert_eq!(e.code, CmqCode::RecreatedTooSoon),
        r => panic!("{r:?}"),
    }
    h.secs(11);
    h.create("q", |_| {});
}

#[test]
fn clock_stepping_back_does_not_unhide_messages() {
    let mut h = Harness::new();
    h.create("q", |a| a.visibility_timeout = 10);
    h.send("q", "a", 0);
    h.receive("q", 1);
    h.secs(-3600);
    assert!(h.receive("q", 1).is_empty());
}

#[derive(Debug, Clone)]
enum Step {
    Send(u8),
    Receive(u8),
    DeleteLast,
    Advance(u16),
    Tick,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (1u8..4).prop_map(Step::Send),
        (1u8..17).prop_map(Step::Receive),
        Just(Step::DeleteLast),
        (0u16..40).prop_map(Step::Advance),
        Just(Step::Tick),
    ]
}

proptest! {
    /// Whatever the interleaving: nothing is lost or invented, an in-flight message is never
    /// handed out twice, a deleted one never comes back, and the counters add up.
    #[test]
    fn no_loss_no_double_delivery(steps in proptest::collection::vec(step(), 1..120)) {
        let mut h = Harness::new();
        h.create("q", |a| a.visibility_timeout = 20);
        let mut sent = std::collections::BTreeSet::new();
        let mut deleted = std::collections::BTreeSet::new();
        let mut in_flight: std::collections::BTreeMap<String, i64> = Default::default();
        let mut last: Vec<Delivered> = Vec::new();
        for s in steps {
            match s {
                Step::Send(n) => for i in 0..n {
                    sent.insert(h.send("q", &format!("m{i}"), 0));
                },
                Step::Receive(n) => {
                    let got = h.receive("q", u32::from(n));
                    for d in &got {
                        prop_assert!(sent.contains(&d.msg_id), "invented {}", d.msg_id);
                        prop_assert!(!deleted.contains(&d.msg_id), "redelivered after delete");
                        if let Some(&until) = in_flight.get(&d.msg_id) {
                            prop_assert!(h.now >= until, "delivered while invisible");
                        }
                        in_flight.insert(d.msg_id.clone(), d.next_visible_ms);
                    }
                    last = got;
                }
                Step::DeleteLast => {
                    for d in std::mem::take(&mut last) {
                        if h.delete("q", &d) {
                            deleted.insert(d.msg_id.clone());
                        }
                    }
                }
                Step::Advance(s) => h.secs(i64::from(s)),
                Step::Tick => { h.apply(Op::Tick); }
            }
            let c = h.counters("q");
            prop_assert_eq!(c.active + c.inactive + c.delayed, (sent.len() - deleted.len()) as u64);
        }
        // Drain: everything not deleted is still there.
        h.secs(1000);
        let mut remaining = std::collections::BTreeSet::new();
        loop {
            let got = h.receive("q", 16);
            if got.is_empty() { break; }
            for d in got {
                prop_assert!(remaining.insert(d.msg_id.clone()));
                prop_assert!(h.delete("q", &d));
            }
        }
        let expected: std::collections::BTreeSet<_> = sent.difference(&deleted).cloned().collect();
        prop_assert_eq!(remaining, expected);
    }
}
