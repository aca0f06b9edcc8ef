//! What clients saw, and the checks run on it once the simulation is over.

use std::collections::BTreeMap;

use super::net::SimMessage;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    Acked(String),
    /// The client got an error: the message may or may not have been committed.
    Unknown,
}

#[derive(Debug, Clone)]
pub struct Delivery {
    pub msg: SimMessage,
    /// Simulated ms when the receive was issued and when its reply arrived.
    pub started_ms: u64,
    pub answered_ms: u64,
}

#[derive(Default)]
pub struct History {
    /// By body (every body is unique).
    pub sends: BTreeMap<Vec<u8>, SendOutcome>,
    pub deliveries: Vec<Delivery>,
    /// msg id → when its first successful delete was acknowledged (ms).
    pub deleted: BTreeMap<String, u64>,
}

#[derive(Debug, Default, Clone)]
pub struct Findings {
    pub lost: Vec<String>,
    pub unexpected: Vec<String>,
    pub redelivered_after_delete: Vec<String>,
    pub corrupt: Vec<String>,
    pub visibility: Vec<String>,
}

impl Findings {
    pub fn all(&self) -> Vec<String> {
        let tag = |t: &str, v: &[String]| v.iter().map(|s| format!("{t}: {s}")).collect::<Vec<_>>();
        [
            tag("lost", &self.lost),
            tag("unexpected", &self.unexpected),
            tag("redelivered after delete", &self.redelivered_after_delete),
            tag("corrupt", &self.corrupt),
            tag("visibility", &self.visibility),
        ]
        .concat()
    }
}

impl History {
    /// `skew_ms`: the most any leader's clock was off during the run (clock nemesis), which
    /// is how much earlier than its stamp a message may legitimately become visible again.
    pub fn check(&self, skew_ms: u64) -> Findings {
        let mut f = Findings::default();
        let mut ids_of_body: BTreeMap<&[u8], Vec<&str>> = BTreeMap::new();
        let mut by_msg: BTreeMap<&str, Vec<&Delivery>> = BTreeMap::new();
        for d in &self.deliveries {
            let ids = ids_of_body.entry(&d.msg.body).or_default();
            if !ids.contains(&d.msg.msg_id.as_str()) {
                ids.push(&d.msg.msg_id);
            }
            by_msg.entry(&d.msg.msg_id).or_default().push(d);
            match self.sends.get(&d.msg.body) {
                None => f.unexpected.push(format!(
                    "{} delivered a body no client sent ({} bytes)",
                    d.msg.msg_id,
                    d.msg.body.len()
                )),
                Some(SendOutcome::Acked(id)) if *id != d.msg.msg_id => f.corrupt.push(format!(
                    "body acknowledged as {id} delivered as {}",
                    d.msg.msg_id
                )),
                _ => {}
            }
            if let Some(&at) = self.deleted.get(&d.msg.msg_id) {
                if d.started_ms > at {
                    f.redelivered_after_delete.push(format!(
                        "{} received at {} ms, its delete was acknowledged at {at} ms",
                        d.msg.msg_id, d.started_ms
                    ));
                }
            }
        }
        for (body, ids) in &ids_of_body {
            if ids.len() > 1 {
                f.unexpected.push(format!(
                    "one body ({} bytes) delivered under {} message ids: {ids:?}",
                    body.len(),
                    ids.len()
                ));
            }
        }
        for (body, outcome) in &self.sends {
            if let SendOutcome::Acked(id) = outcome {
                if !ids_of_body.contains_key(body.as_slice()) {
                    f.lost
                        .push(format!("{id} was acknowledged and never delivered"));
                }
            }
        }
        for (id, mut ds) in by_msg {
            ds.sort_by_key(|d| d.msg.dequeue_count);
            for w in ds.windows(2) {
                let (a, b) = (w[0], w[1]);
                if a.msg.dequeue_count == b.msg.dequeue_count {
                    f.visibility.push(format!(
                        "{id}: receive number {} handed out twice",
                        a.msg.dequeue_count
                    ));
                    continue;
                }
                // Times in the reply are whole seconds: one second of rounding is allowed.
                let visible_again_ms = a.msg.next_visible_s * 1000 - 1000;
                let earliest = b.answered_ms as i64 + crate::sim::EPOCH_MS + skew_ms as i64;
                if earliest < visible_again_ms {
                    f.visibility.push(format!(
                        "{id}: receive {} answered {} ms before receive {} made it visible again",
                        b.msg.dequeue_count,
                        visible_again_ms - earliest,
                        a.msg.dequeue_count
                    ));
                }
            }
        }
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: &str, body: &str, n: u32, next_visible_s: i64) -> SimMessage {
        SimMessage {
            msg_id: id.into(),
            body: body.into(),
            handle: String::new(),
            next_visible_s,
            dequeue_count: n,
        }
    }

    fn delivery(m: SimMessage, at: u64) -> Delivery {
        Delivery {
            msg: m,
            started_ms: at,
            answered_ms: at,
        }
    }

    #[test]
    fn catches_each_kind_of_violation() {
        let e = crate::sim::EPOCH_MS / 1000;
        let mut h = History::default();
        h.sends
            .insert(b"a".to_vec(), SendOutcome::Acked("m-a".into()));
        h.sends
            .insert(b"b".to_vec(), SendOutcome::Acked("m-b".into()));
        h.sends
            .insert(b"c".to_vec(), SendOutcome::Acked("m-c".into()));
        h.sends.insert(b"d".to_vec(), SendOutcome::Unknown);
        h.deliveries.push(delivery(msg("m-a", "a", 1, e + 5), 0));
        // Visible again at 5 s, received again at 1 s.
        h.deliveries
            .push(delivery(msg("m-a", "a", 2, e + 10), 1000));
        h.deliveries.push(delivery(msg("m-x", "b", 1, e + 5), 0));
        h.deliveries.push(delivery(msg("m-z", "zzz", 1, e + 5), 0));
        h.deliveries.push(delivery(msg("m-d", "d", 1, e + 5), 0));
        h.deliveries
            .push(delivery(msg("m-d", "d", 2, e + 20), 9000));
        h.deleted.insert("m-d".into(), 2000);
        let f = h.check(0);
        assert_eq!(f.lost.len(), 1, "{f:?}"); // c
        assert_eq!(f.corrupt.len(), 1, "{f:?}"); // b under m-x
        assert_eq!(f.unexpected.len(), 1, "{f:?}"); // zzz
        assert_eq!(f.visibility.len(), 1, "{f:?}"); // m-a
        assert_eq!(f.redelivered_after_delete.len(), 1, "{f:?}"); // m-d
                                                                  // A clock skew allowance covers the early redelivery.
        assert!(h.check(5000).visibility.is_empty());
    }
}
