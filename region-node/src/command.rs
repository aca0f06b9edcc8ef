//! The Raft log entry: a self-contained command stamped with the leader's clock.
//!
//! Everything a state machine needs to apply a command is inside it (including "now"), so every
//! replica — and, later, a standby region replaying the same log — reaches the same state without
//! reading its own clock.

use bytes::Bytes;
use meridian_api::limits::{QueueAttributes, QueueAttributesPatch};
use meridian_api::topics::FilterType;
use meridian_api::CmqError;
use serde::{Deserialize, Serialize};

use crate::topic::{SubscriptionPatch, SubscriptionSpec};

/// Identifies a queue inside a region: names are unique per tenant, case-insensitively.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct QueueKey {
    pub tenant: String,
    /// Lower-cased name.
    pub name: String,
}

impl QueueKey {
    pub fn new(tenant: &str, name: &str) -> Self {
        Self {
            tenant: tenant.to_string(),
            name: name.to_ascii_lowercase(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Command {
    /// The leader's wall clock when it proposed the command, Unix milliseconds.
    pub now_ms: i64,
    pub op: Op,
}

/// One Raft log entry: concurrent commands of a group proposed together, so that one append
/// (and one fsync on each replica) carries many client operations.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CommandBatch {
    pub commands: Vec<Command>,
}

/// How openraft logs an entry: its size, not its (possibly large, private) bodies.
impl std::fmt::Display for CommandBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} commands", self.commands.len())
    }
}

/// One receipt handle after its MAC was checked: which receive of which message it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub seq: u64,
    pub generation: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Op {
    CreateQueue {
        tenant: String,
        name: String,
        attrs: QueueAttributes,
    },
    SetQueueAttributes {
        key: QueueKey,
        patch: QueueAttributesPatch,
    },
    DeleteQueue {
        key: QueueKey,
    },
    RewindQueue {
        key: QueueKey,
        start_ms: i64,
    },
    Send {
        key: QueueKey,
        /// Shared, not copied, between the log's in-memory entries and the state they are
        /// applied to (and the state rows written from it).
        bodies: Vec<Bytes>,
        delay_seconds: u32,
    },
    Receive {
        key: QueueKey,
        max: u32,
    },
    Delete {
        key: QueueKey,
        receipts: Vec<Receipt>,
    },
    /// Messages arriving from another group's outbox (dead-lettered, or published to a topic
    /// with a subscribed queue here). Idempotent per `(source_group, item id)`; ids ascend.
    Transfers {
        source_group: u32,
        items: Vec<TransferItem>,
    },
    /// The source group learns that these outbox entries reached their destination.
    AckTransfers {
        ids: Vec<u64>,
    },
    /// Housekeeping: retention expiry, rewind-window ends and time-to-live dead-lettering.
    Tick,
    CreateTopic {
        tenant: String,
        name: String,
        filter_type: FilterType,
        max_msg_size: u32,
    },
    SetTopicAttributes {
        key: QueueKey,
        max_msg_size: u32,
    },
    DeleteTopic {
        key: QueueKey,
    },
    /// Publishes to a topic: the fan-out to every matching subscription is part of this entry.
    Publish {
        key: QueueKey,
        #[serde(with = "byte_vecs")]
        bodies: Vec<Vec<u8>>,
        tags: Vec<String>,
        routing_key: String,
        /// Refuse with 6030 when no subscription matches (the leader's configured choice).
        reject_unmatched: bool,
    },
    Subscribe {
        key: QueueKey,
        spec: SubscriptionSpec,
    },
    SetSubscription {
        key: QueueKey,
        name: String,
        patch: SubscriptionPatch,
    },
    Unsubscribe {
        key: QueueKey,
        name: String,
    },
    /// Outcomes of HTTP push attempts, decided (with retry times) by the leader's push worker.
    PushResults {
        key: QueueKey,
        results: Vec<PushResult>,
    },
    /// Metadata group: an API key pair for the CMQ HTTP API, owned by tenant `app_id`.
    /// The leader generates the secrets; the command carries them so replicas agree.
    CreateCredential {
        secret_id: String,
        secret_key: String,
        app_id: u64,
    },
    RevokeCredential {
        secret_id: String,
    },
}

/// One message moved between groups by an outbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TransferItem {
    pub id: u64,
    pub key: QueueKey,
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

/// The outcome of one HTTP delivery attempt of message `seq` to subscription `subscription`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PushResult {
    /// Lower-cased subscription name.
    pub subscription: String,
    pub seq: u64,
    pub outcome: PushOutcome,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PushOutcome {
    Delivered,
    /// Failed; try again at this time (Unix ms).
    RetryAt(i64),
    /// Failed for the last time.
    GaveUp,
}

/// What applying a command produced; errors are results too (they are deterministic).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum OpResult {
    Done,
    Created {
        queue_id: String,
    },
    Sent {
        msg_ids: Vec<String>,
    },
    Received {
        messages: Vec<Delivered>,
        next_visible_ms: Option<i64>,
    },
    /// One entry per receipt, in input order.
    Deleted {
        outcomes: Vec<Option<CmqError>>,
    },
    Failed(CmqError),
}

/// A message as handed to a consumer by one receive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivered {
    pub queue_id: String,
    pub seq: u64,
    pub msg_id: String,
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// The body is not in `body` but in the state rows, still to be read
    /// (`StateMachineStore::read_bodies`).
    pub body_in_rows: bool,
    pub enqueue_ms: i64,
    pub first_dequeue_ms: i64,
    pub next_visible_ms: i64,
    pub dequeue_count: u32,
}

/// Message bodies as byte strings: serde's default encodes a `Vec<u8>` element by element,
/// which made a 1 MiB message cost milliseconds to encode and decode on every replica.
pub mod byte_vecs {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        let bytes: Vec<&serde_bytes::Bytes> =
            v.iter().map(|b| serde_bytes::Bytes::new(b)).collect();
        bytes.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        let bufs: Vec<serde_bytes::ByteBuf> = Vec::deserialize(d)?;
        Ok(bufs
            .into_iter()
            .map(serde_bytes::ByteBuf::into_vec)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    /// Logs and snapshots written while bodies were `Vec<u8>` (encoded with `serde_bytes`) must
    /// still decode now that they are `Bytes`: both are one byte string per body.
    #[test]
    fn shared_bodies_encode_as_the_byte_strings_they_replaced() {
        let bodies = [b"first".to_vec(), vec![7u8; 300], Vec::new()];
        let old: Vec<serde_bytes::ByteBuf> = bodies
            .iter()
            .cloned()
            .map(serde_bytes::ByteBuf::from)
            .collect();
        let new: Vec<Bytes> = bodies.iter().cloned().map(Bytes::from).collect();
        let old = bincode::serialize(&old).unwrap();
        assert_eq!(old, bincode::serialize(&new).unwrap());
        let back: Vec<Bytes> = bincode::deserialize(&old).unwrap();
        assert_eq!(back, new);
        // One body, as a model message holds it.
        assert_eq!(
            bincode::serialize(serde_bytes::Bytes::new(&bodies[1])).unwrap(),
            bincode::serialize(&new[1]).unwrap()
        );
    }
}
