//! The CMQ queue model's names, limits and attribute rules (reference §4, §5, §10), shared by the
//! gRPC and HTTP front ends so both reject the same input with the same code.

use serde::{Deserialize, Serialize};

use crate::error::{CmqCode, CmqError, CmqResult};

pub const MAX_NAME_LEN: usize = 64;
pub const MAX_BATCH: usize = 16;
pub const MAX_POLLING_WAIT_SECONDS: u32 = 30;
pub const MAX_DELAY_SECONDS: u32 = 3600;
pub const MAX_MSG_SIZE_LIMIT: u32 = 1_048_576;
pub const MIN_MSG_SIZE_LIMIT: u32 = 1024;
/// Sum of the bodies of one batch send.
pub const MAX_BATCH_BYTES: usize = 1_048_576;
pub const MAX_LIST_LIMIT: u32 = 50;
pub const DEFAULT_LIST_LIMIT: u32 = 20;
/// How many source queues may point at one dead-letter queue.
pub const MAX_DLQ_SOURCES: usize = 6;
/// Queues per tenant (CMQ: 1000 per account, error 4450).
pub const MAX_QUEUES_PER_TENANT: usize = 1000;

/// Checks a queue name: starts with a letter, then letters, digits, `-` or `_`, ≤64.
pub fn validate_name(name: &str) -> CmqResult<()> {
    validate_name_of("queue", 10020, name)
}

/// The same naming rule for a `what` (topic, subscription …), reported with `module`.
pub fn validate_name_of(what: &str, module: u32, name: &str) -> CmqResult<()> {
    let mut chars = name.chars();
    let ok = match chars.next() {
        Some(c) if c.is_ascii_alphabetic() => {
            name.len() <= MAX_NAME_LEN
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        }
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(CmqError::invalid(
            module,
            format!(
                "invalid {what} name {name:?}: 1-64 characters, starting with a letter, then letters, digits, '-' or '_'"
            ),
        ))
    }
}

/// A queue's dead-letter policy (CMQ's `deadLetterPolicy` JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterPolicy {
    /// Name of the dead-letter queue (same tenant and region).
    pub dead_letter_queue: String,
    pub policy: DeadLetterTrigger,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeadLetterTrigger {
    /// Policy 0: received this many times without being deleted.
    MaxReceiveCount(u32),
    /// Policy 1: not consumed within this many seconds of being sent.
    MaxTimeToLive(u32),
}

impl DeadLetterPolicy {
    /// Parses CMQ's JSON form; every failure is a 4000 with module 10710.
    pub fn parse_json(text: &str) -> CmqResult<Self> {
        let bad = |why: &str| CmqError::invalid(10710, format!("invalid deadLetterPolicy: {why}"));
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| bad(&format!("not JSON ({e})")))?;
        let obj = v.as_object().ok_or_else(|| bad("not a JSON object"))?;
        let dlq = obj
            .get("deadLetterQueue")
            .and_then(|v| v.as_str())
            .ok_or_else(|| bad("deadLetterQueue (string) is required"))?;
        validate_name(dlq)?;
        let int = |key: &str| -> CmqResult<Option<i64>> {
            match obj.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::Number(n)) => n
                    .as_i64()
                    .map(Some)
                    .ok_or_else(|| bad(&format!("{key} must be an integer"))),
                Some(serde_json::Value::String(s)) => s
                    .parse::<i64>()
                    .map(Some)
                    .map_err(|_| bad(&format!("{key} must be an integer"))),
                Some(_) => Err(bad(&format!("{key} must be an integer"))),
            }
        };
        let policy = match int("policy")?.unwrap_or(0) {
            0 => {
                let n = int("maxReceiveCount")?
                    .ok_or_else(|| bad("maxReceiveCount is required with policy 0"))?;
                if !(1..=1000).contains(&n) {
                    return Err(bad("maxReceiveCount must be 1-1000"));
                }
                DeadLetterTrigger::MaxReceiveCount(n as u32)
            }
            1 => {
                let n = int("maxTimeToLive")?
                    .ok_or_else(|| bad("maxTimeToLive is required with policy 1"))?;
                if !(300..=43200).contains(&n) {
                    return Err(bad("maxTimeToLive must be 300-43200 seconds"));
                }
                DeadLetterTrigger::MaxTimeToLive(n as u32)
            }
            _ => return Err(bad("policy must be 0 or 1")),
        };
        Ok(Self {
            dead_letter_queue: dlq.to_string(),
            policy,
        })
    }

    pub fn to_json(&self) -> String {
        match self.policy {
            DeadLetterTrigger::MaxReceiveCount(n) => serde_json::json!({
                "deadLetterQueue": self.dead_letter_queue, "policy": 0, "maxReceiveCount": n
            }),
            DeadLetterTrigger::MaxTimeToLive(n) => serde_json::json!({
                "deadLetterQueue": self.dead_letter_queue, "policy": 1, "maxTimeToLive": n
            }),
        }
        .to_string()
    }
}

/// A queue's full, validated attribute set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueAttributes {
    pub max_msg_heap_num: u64,
    pub polling_wait_seconds: u32,
    pub visibility_timeout: u32,
    pub max_msg_size: u32,
    pub msg_retention_seconds: u32,
    pub rewind_seconds: u32,
    pub dead_letter_policy: Option<DeadLetterPolicy>,
}

impl Default for QueueAttributes {
    fn default() -> Self {
        Self {
            max_msg_heap_num: 100_000_000,
            polling_wait_seconds: 0,
            visibility_timeout: 30,
            max_msg_size: 65536,
            msg_retention_seconds: 345_600,
            rewind_seconds: 0,
            dead_letter_policy: None,
        }
    }
}

/// A partial update of [`QueueAttributes`]; `None` keeps the current value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueAttributesPatch {
    pub max_msg_heap_num: Option<u64>,
    pub polling_wait_seconds: Option<u32>,
    pub visibility_timeout: Option<u32>,
    pub max_msg_size: Option<u32>,
    pub msg_retention_seconds: Option<u32>,
    pub rewind_seconds: Option<u32>,
    /// `Some(None)` clears the policy.
    pub dead_letter_policy: Option<Option<DeadLetterPolicy>>,
}

fn range<T: PartialOrd + std::fmt::Display + Copy>(
    name: &str,
    v: Option<T>,
    lo: T,
    hi: T,
) -> CmqResult<()> {
    match v {
        Some(v) if v < lo || v > hi => Err(CmqError::invalid(
            10350,
            format!("{name}={v} is out of range {lo}-{hi}"),
        )),
        _ => Ok(()),
    }
}

impl QueueAttributesPatch {
    /// Applies the patch to `base` and checks every range and cross-field rule.
    pub fn apply_to(&self, base: &QueueAttributes) -> CmqResult<QueueAttributes> {
        range("maxMsgHeapNum", self.max_msg_heap_num, 1_000, 1_000_000_000)?;
        range(
            "pollingWaitSeconds",
            self.polling_wait_seconds,
            0,
            MAX_POLLING_WAIT_SECONDS,
        )?;
        range("visibilityTimeout", self.visibility_timeout, 1, 43_200)?;
        range(
            "maxMsgSize",
            self.max_msg_size,
            MIN_MSG_SIZE_LIMIT,
            MAX_MSG_SIZE_LIMIT,
        )?;
        range(
            "msgRetentionSeconds",
            self.msg_retention_seconds,
            60,
            1_296_000,
        )?;
        let mut a = base.clone();
        if let Some(v) = self.max_msg_heap_num {
            a.max_msg_heap_num = v;
        }
        if let Some(v) = self.polling_wait_seconds {
            a.polling_wait_seconds = v;
        }
        if let Some(v) = self.visibility_timeout {
            a.visibility_timeout = v;
        }
        if let Some(v) = self.max_msg_size {
            a.max_msg_size = v;
        }
        if let Some(v) = self.msg_retention_seconds {
            a.msg_retention_seconds = v;
        }
        if let Some(v) = self.rewind_seconds {
            a.rewind_seconds = v;
        }
        if let Some(p) = &self.dead_letter_policy {
            a.dead_letter_policy = p.clone();
        }
        if a.rewind_seconds > a.msg_retention_seconds {
            return Err(CmqError::invalid(
                10700,
                format!(
                    "rewindSeconds={} must not exceed msgRetentionSeconds={}",
                    a.rewind_seconds, a.msg_retention_seconds
                ),
            ));
        }
        if let Some(DeadLetterPolicy {
            policy: DeadLetterTrigger::MaxTimeToLive(ttl),
            ..
        }) = &a.dead_letter_policy
        {
            if *ttl >= a.msg_retention_seconds {
                return Err(CmqError::invalid(
                    10710,
                    "deadLetterPolicy maxTimeToLive must be less than msgRetentionSeconds",
                ));
            }
        }
        Ok(a)
    }
}

/// Checks one message body against the queue's size limit.
pub fn validate_body(body: &[u8], max_msg_size: u32) -> CmqResult<()> {
    if body.is_empty() {
        return Err(CmqError::invalid(10120, "msgBody is empty"));
    }
    if body.len() > max_msg_size as usize {
        return Err(CmqError::new(
            CmqCode::MessageTooLarge,
            10230,
            format!(
                "message of {} bytes exceeds maxMsgSize {}",
                body.len(),
                max_msg_size
            ),
        ));
    }
    Ok(())
}

/// Checks the shape of a batch (1..=16 items).
pub fn validate_batch_len(what: &str, n: usize) -> CmqResult<()> {
    if n == 0 || n > MAX_BATCH {
        return Err(CmqError::invalid(
            10370,
            format!("batch size of {what} is {n}, must be 1-{MAX_BATCH}"),
        ));
    }
    Ok(())
}

pub fn validate_polling_wait(v: u32) -> CmqResult<()> {
    range("pollingWaitSeconds", Some(v), 0, MAX_POLLING_WAIT_SECONDS)
}

pub fn validate_delay(v: u32) -> CmqResult<()> {
    range("delaySeconds", Some(v), 0, MAX_DELAY_SECONDS)
}

/// Resolves ListQueue paging: offset given requires limit (CMQ rule); limit ≤ 50.
pub fn list_window(offset: u32, limit: Option<u32>) -> CmqResult<(usize, usize)> {
    let limit = limit.unwrap_or(DEFAULT_LIST_LIMIT);
    if limit == 0 || limit > MAX_LIST_LIMIT {
        return Err(CmqError::invalid(
            10350,
            format!("limit={limit} is out of range 1-{MAX_LIST_LIMIT}"),
        ));
    }
    Ok((offset as usize, limit as usize))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names() {
        assert!(validate_name("orders").is_ok());
        assert!(validate_name("a-b_c9").is_ok());
        assert!(validate_name(&"a".repeat(64)).is_ok());
        for bad in ["", "9abc", "-a", "a b", "a.b", "队列", &"a".repeat(65)] {
            let e = validate_name(bad).unwrap_err();
            assert_eq!(
                (e.code, e.module),
                (CmqCode::InvalidParameter, 10020),
                "{bad}"
            );
        }
    }

    #[test]
    fn dead_letter_policy_json() {
        let p = DeadLetterPolicy::parse_json(
            r#"{"deadLetterQueue":"dlq","policy":0,"maxReceiveCount":3}"#,
        )
        .unwrap();
        assert_eq!(p.policy, DeadLetterTrigger::MaxReceiveCount(3));
        assert_eq!(DeadLetterPolicy::parse_json(&p.to_json()).unwrap(), p);
        for bad in [
            "nope",
            "[]",
            r#"{"policy":0,"maxReceiveCount":3}"#,
            r#"{"deadLetterQueue":"dlq","policy":0}"#,
            r#"{"deadLetterQueue":"dlq","policy":1,"maxTimeToLive":10}"#,
            r#"{"deadLetterQueue":"dlq","policy":7}"#,
        ] {
            assert_eq!(
                DeadLetterPolicy::parse_json(bad).unwrap_err().module,
                10710,
                "{bad}"
            );
        }
    }

    #[test]
    fn attribute_ranges() {
        let base = QueueAttributes::default();
        let bad = QueueAttributesPatch {
            visibility_timeout: Some(0),
            ..Default::default()
        };
        assert_eq!(
            bad.apply_to(&base).unwrap_err().code,
            CmqCode::InvalidParameter
        );
        let rewind = QueueAttributesPatch {
            msg_retention_seconds: Some(60),
            rewind_seconds: Some(61),
            ..Default::default()
        };
        assert_eq!(rewind.apply_to(&base).unwrap_err().module, 10700);
        let ok = QueueAttributesPatch {
            visibility_timeout: Some(5),
            ..Default::default()
        };
        assert_eq!(ok.apply_to(&base).unwrap().visibility_timeout, 5);
    }

    #[test]
    fn bodies() {
        assert_eq!(validate_body(b"", 1024).unwrap_err().module, 10120);
        assert_eq!(
            validate_body(&[1; 1025], 1024).unwrap_err().code,
            CmqCode::MessageTooLarge
        );
        assert!(validate_body(&[1; 1024], 1024).is_ok());
    }

    proptest! {
        #[test]
        fn name_validation_never_panics(s in ".{0,80}") {
            let _ = validate_name(&s);
        }

        #[test]
        fn dlq_parse_never_panics(s in ".{0,120}") {
            let _ = DeadLetterPolicy::parse_json(&s);
        }
    }
}
