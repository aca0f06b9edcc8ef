//! The CMQ topic model's rules (reference §6, §7, §10, §14): filter types, subscription options,
//! tag and routing-key limits, and the routing-key matcher.
//!
//! Decisions on the reference's open points (§14), shared by every front end:
//! * `#` in a binding key matches **one or more** words, as CMQ's documentation says (RabbitMQ
//!   would match zero or more): `1.#.0` matches `1.2.0` and `1.2.3.0` but not `1.0`; `#` alone
//!   matches every routing key.
//! * A publish that no subscription matches (or to a topic without subscriptions) is accepted and
//!   answered with a message id, by default; a node can be configured to answer 6030 instead.

use serde::{Deserialize, Serialize};

use crate::error::{CmqCode, CmqError, CmqResult};

pub const MAX_TAGS: usize = 5;
pub const MAX_TAG_CHARS: usize = 16;
pub const MAX_BINDING_KEYS: usize = 5;
pub const MAX_ROUTING_KEY_BYTES: usize = 64;
pub const MAX_ROUTING_KEY_DOTS: usize = 15;
pub const MAX_ENDPOINT_LEN: usize = 500;
pub const MAX_SUBSCRIPTIONS_PER_TOPIC: usize = 100;
pub const MAX_TOPICS_PER_TENANT: usize = 1000;
pub const DEFAULT_TOPIC_MAX_MSG_SIZE: u32 = 65_536;
/// How long a topic keeps a message whose HTTP deliveries are still outstanding (fixed by CMQ).
pub const TOPIC_MSG_RETENTION_SECONDS: u32 = 86_400;
pub const MAX_SUBSCRIPTION_LIST_OFFSET: u32 = 1000;
pub const MAX_SUBSCRIPTION_LIST_LIMIT: u32 = 100;

/// How a topic chooses the subscriptions a message goes to; fixed at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FilterType {
    /// `filterType=1` (or absent): `msgTag` against the subscription's `filterTag`s.
    Tags,
    /// `filterType=2`: `routingKey` against the subscription's `bindingKey`s.
    RoutingKeys,
}

impl FilterType {
    pub fn from_param(v: Option<u32>) -> CmqResult<Self> {
        match v {
            None | Some(1) => Ok(Self::Tags),
            Some(2) => Ok(Self::RoutingKeys),
            Some(other) => Err(CmqError::invalid(
                10110,
                format!("filterType={other} is invalid: 1 (tags) or 2 (routing keys)"),
            )),
        }
    }

    pub fn as_param(self) -> u32 {
        match self {
            Self::Tags => 1,
            Self::RoutingKeys => 2,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Protocol {
    /// Deliver into a Meridian queue of the same tenant (the endpoint is the queue name).
    Queue,
    /// POST to an HTTP(S) endpoint.
    Http,
}

impl Protocol {
    pub fn parse(v: &str) -> CmqResult<Self> {
        match v.to_ascii_lowercase().as_str() {
            "queue" => Ok(Self::Queue),
            "http" | "https" => Ok(Self::Http),
            _ => Err(CmqError::invalid(
                10510,
                format!("protocol {v:?} is undefined: \"queue\" or \"http\""),
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queue => "queue",
            Self::Http => "http",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NotifyStrategy {
    /// A few retries at a random interval (10–20 s by default), then the message is dropped
    /// for that subscription.
    BackoffRetry,
    /// Retries after 1, 2, 4 … 512 s, then every 512 s, until the topic's retention ends.
    ExponentialDecayRetry,
}

impl NotifyStrategy {
    pub fn parse(v: &str) -> CmqResult<Self> {
        match v.to_ascii_uppercase().as_str() {
            "BACKOFF_RETRY" => Ok(Self::BackoffRetry),
            "EXPONENTIAL_DECAY_RETRY" => Ok(Self::ExponentialDecayRetry),
            _ => Err(CmqError::invalid(
                10520,
                format!(
                    "notifyStrategy {v:?} is undefined: BACKOFF_RETRY or EXPONENTIAL_DECAY_RETRY"
                ),
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::BackoffRetry => "BACKOFF_RETRY",
            Self::ExponentialDecayRetry => "EXPONENTIAL_DECAY_RETRY",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NotifyFormat {
    /// A JSON document with the message and its metadata.
    Json,
    /// The raw body; metadata only in headers. The only format for queue subscriptions.
    Simplified,
}

impl NotifyFormat {
    pub fn parse(v: &str) -> CmqResult<Self> {
        match v.to_ascii_uppercase().as_str() {
            "JSON" => Ok(Self::Json),
            "SIMPLIFIED" => Ok(Self::Simplified),
            _ => Err(CmqError::invalid(
                10530,
                format!("notifyContentFormat {v:?} is undefined: JSON or SIMPLIFIED"),
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Json => "JSON",
            Self::Simplified => "SIMPLIFIED",
        }
    }
}

/// Checks message tags (PublishMessage `msgTag.n`) or subscription filter tags.
pub fn validate_tags(tags: &[String], module_too_many: u32) -> CmqResult<()> {
    if tags.len() > MAX_TAGS {
        return Err(CmqError::invalid(
            module_too_many,
            format!("{} tags given; at most {MAX_TAGS}", tags.len()),
        ));
    }
    for t in tags {
        if t.is_empty() || t.chars().count() > MAX_TAG_CHARS {
            return Err(CmqError::invalid(
                10490,
                format!("tag {t:?} must be 1-{MAX_TAG_CHARS} characters"),
            ));
        }
    }
    Ok(())
}

fn validate_key(what: &str, key: &str) -> CmqResult<()> {
    if key.len() > MAX_ROUTING_KEY_BYTES {
        return Err(CmqError::invalid(
            10691,
            format!(
                "{what} {key:?} is {} bytes; at most {MAX_ROUTING_KEY_BYTES}",
                key.len()
            ),
        ));
    }
    let dots = key.bytes().filter(|&b| b == b'.').count();
    if dots > MAX_ROUTING_KEY_DOTS {
        return Err(CmqError::invalid(
            10691,
            format!("{what} {key:?} has {dots} dots; at most {MAX_ROUTING_KEY_DOTS}"),
        ));
    }
    Ok(())
}

/// Checks a publish's routing key: required (non-empty) on a routing-key topic.
pub fn validate_routing_key(key: &str) -> CmqResult<()> {
    if key.is_empty() {
        return Err(CmqError::invalid(
            10700,
            "routingKey is required when publishing to a topic with filterType 2",
        ));
    }
    validate_key("routingKey", key)
}

/// Checks a subscription's binding keys.
pub fn validate_binding_keys(keys: &[String]) -> CmqResult<()> {
    if keys.len() > MAX_BINDING_KEYS {
        return Err(CmqError::invalid(
            10680,
            format!(
                "{} bindingKeys given; at most {MAX_BINDING_KEYS}",
                keys.len()
            ),
        ));
    }
    for k in keys {
        if k.is_empty() {
            return Err(CmqError::invalid(10710, "a bindingKey must not be empty"));
        }
        validate_key("bindingKey", k)?;
    }
    Ok(())
}

/// Checks an HTTP subscription endpoint: an `http://` or `https://` URL without blanks.
pub fn validate_http_endpoint(endpoint: &str) -> CmqResult<()> {
    if endpoint.chars().any(char::is_whitespace) {
        return Err(CmqError::new(
            CmqCode::BlankInUrl,
            10570,
            "endpoint URL contains blank characters",
        ));
    }
    let lower = endpoint.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("http://")
        .or_else(|| lower.strip_prefix("https://"));
    match rest {
        Some(r) if !r.is_empty() && endpoint.len() <= MAX_ENDPOINT_LEN => Ok(()),
        _ => Err(CmqError::invalid(
            10500,
            format!(
                "endpoint {endpoint:?} must be an http:// or https:// URL of at most {MAX_ENDPOINT_LEN} characters"
            ),
        )),
    }
}

/// Tag filtering (reference §7): no filter tags → everything; otherwise a shared tag.
pub fn tags_match(filter_tags: &[String], msg_tags: &[String]) -> bool {
    filter_tags.is_empty() || filter_tags.iter().any(|f| msg_tags.contains(f))
}

/// Whether a binding key matches a routing key: words are `.`-separated; `*` stands for exactly
/// one word and `#` for one or more words (see the module comment).
pub fn binding_matches(binding: &str, routing_key: &str) -> bool {
    let pattern: Vec<&str> = binding.split('.').collect();
    let words: Vec<&str> = routing_key.split('.').collect();
    // reach[j]: the pattern prefix seen so far can consume exactly the first j words.
    let mut reach = vec![false; words.len() + 1];
    reach[0] = true;
    for p in &pattern {
        let mut next = vec![false; words.len() + 1];
        for j in 0..words.len() {
            if !reach[j] {
                continue;
            }
            match *p {
                "*" => next[j + 1] = true,
                "#" => next[j + 1..].iter_mut().for_each(|n| *n = true),
                w => {
                    if words[j] == w {
                        next[j + 1] = true;
                    }
                }
            }
        }
        reach = next;
    }
    reach[words.len()]
}

/// Routing-key filtering: a match with any of the subscription's binding keys.
pub fn routing_matches(binding_keys: &[String], routing_key: &str) -> bool {
    binding_keys.iter().any(|b| binding_matches(b, routing_key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn documented_examples() {
        assert!(binding_matches("1.*.0", "1.x.0"));
        assert!(!binding_matches("1.*.0", "1.x.y.0"));
        assert!(binding_matches("1.#.0", "1.2.3.4.4.2.2.0"));
        assert!(binding_matches("#", "anything.at.all"));
        assert!(binding_matches("#", "one"));
        // The decision on reference §14: `#` needs at least one word.
        assert!(!binding_matches("1.#.0", "1.0"));
        assert!(!binding_matches("a.#", "a"));
        assert!(binding_matches("a.#", "a.b"));
        assert!(binding_matches("x.y", "x.y"));
        assert!(!binding_matches("x.y", "x.y.z"));
        assert!(!binding_matches("x.y", "x"));
        assert!(binding_matches("#.#", "a.b"));
        assert!(!binding_matches("#.#", "a"));
    }

    #[test]
    fn limits() {
        assert!(validate_routing_key("").is_err());
        assert!(validate_routing_key("a.".repeat(15).trim_end_matches('.')).is_ok());
        let sixteen_dots = "a.".repeat(16) + "a";
        assert_eq!(
            validate_routing_key(&sixteen_dots).unwrap_err().module,
            10691
        );
        assert!(validate_routing_key(&"a".repeat(65)).is_err());
        assert!(validate_binding_keys(&vec!["a".into(); 6]).is_err());
        assert!(validate_tags(&vec!["t".into(); 6], 10720).is_err());
        assert!(validate_tags(&["x".repeat(17)], 10720).is_err());
        assert!(validate_tags(&["标签".into()], 10720).is_ok());
        assert_eq!(
            validate_http_endpoint("http://a b").unwrap_err().code,
            CmqCode::BlankInUrl
        );
        assert!(validate_http_endpoint("ftp://a").is_err());
        assert!(validate_http_endpoint("http://").is_err());
        assert!(validate_http_endpoint("HTTP://127.0.0.1:8080/x").is_ok());
        assert!(tags_match(&[], &[]));
        assert!(!tags_match(&["a".into()], &[]));
        assert!(tags_match(&["a".into(), "b".into()], &["b".into()]));
    }

    /// A slow, obviously-correct matcher to check the fast one against.
    fn reference(p: &[&str], w: &[&str]) -> bool {
        match (p.first(), w.first()) {
            (None, None) => true,
            (None, Some(_)) | (Some(_), None) => false,
            (Some(&"#"), Some(_)) => (1..=w.len()).any(|n| reference(&p[1..], &w[n..])),
            (Some(&"*"), Some(_)) => reference(&p[1..], &w[1..]),
            (Some(x), Some(y)) => x == y && reference(&p[1..], &w[1..]),
        }
    }

    fn word() -> impl Strategy<Value = String> {
        prop_oneof!["[ab]", "[a-z0-9]{0,3}"]
    }

    fn key() -> impl Strategy<Value = Vec<String>> {
        prop::collection::vec(word(), 1..=16)
    }

    fn pattern() -> impl Strategy<Value = Vec<String>> {
        prop::collection::vec(
            prop_oneof![word(), Just("*".to_string()), Just("#".to_string())],
            1..=8,
        )
    }

    proptest! {
        #[test]
        fn agrees_with_the_reference(p in pattern(), k in key()) {
            let pr: Vec<&str> = p.iter().map(String::as_str).collect();
            let kr: Vec<&str> = k.iter().map(String::as_str).collect();
            prop_assert_eq!(binding_matches(&p.join("."), &k.join(".")), reference(&pr, &kr));
        }

        #[test]
        fn a_literal_binding_matches_only_itself(a in key(), b in key()) {
            let (a, b) = (a.join("."), b.join("."));
            prop_assert_eq!(binding_matches(&a, &b), a == b);
        }

        #[test]
        fn hash_alone_matches_every_key(k in key()) {
            prop_assert!(binding_matches("#", &k.join(".")));
        }

        #[test]
        fn stars_match_exactly_that_many_words(n in 1usize..=16, k in key()) {
            let stars = vec!["*"; n].join(".");
            prop_assert_eq!(binding_matches(&stars, &k.join(".")), k.len() == n);
        }

        #[test]
        fn wildcarding_a_key_keeps_it_matching(k in key(), i in 0usize..16, len in 1usize..16) {
            let i = i % k.len();
            let len = 1 + (len - 1) % (k.len() - i);
            let mut starred = k.clone();
            starred[i] = "*".into();
            prop_assert!(binding_matches(&starred.join("."), &k.join(".")));
            let mut hashed: Vec<String> = k[..i].to_vec();
            hashed.push("#".into());
            hashed.extend_from_slice(&k[i + len..]);
            prop_assert!(binding_matches(&hashed.join("."), &k.join(".")));
            // `#` never stands for zero words: each pattern word needs one word of its own.
            let dropped: Vec<String> = k[..i].iter().chain(&k[i + len..]).cloned().collect();
            if !dropped.is_empty() {
                prop_assert!(!binding_matches(&hashed.join("."), &dropped.join(".")));
            }
        }

        #[test]
        fn validation_never_panics(s in ".{0,100}") {
            let _ = validate_routing_key(&s);
            let _ = validate_binding_keys(std::slice::from_ref(&s));
            let _ = validate_http_endpoint(&s);
            let _ = binding_matches(&s, &s);
        }
    }
}
