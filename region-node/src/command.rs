//! The Raft log entry: a self-contained command stamped with the leader's clock.
//!
//! Everything a state machine needs to apply a command is inside it (including "now"), so every
//! replica — and, later, a standby region replaying the same log — reaches the same state without
//! reading its own clock.

use meridian_api::limits::{QueueAttributes, QueueAttributesPatch};
use meridian_api::CmqError;
use serde::{Deserialize, Serialize};

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
        #[serde(with = "byte_vecs")]
        bodies: Vec<Vec<u8>>,
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
    /// A dead-lettered message arriving from another group's outbox. Idempotent per
    /// `(source_group, transfer_id)`.
    Transfer {
        source_group: u32,
        transfer_id: u64,
        key: QueueKey,
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
    },
    /// The source group learns that its outbox up to `upto` reached the destination.
    AckTransfers {
        upto: u64,
    },
    /// Housekeeping: retention expiry, rewind-window ends and time-to-live dead-lettering.
    Tick,
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
