//! Batches a group's concurrent proposals into one Raft entry.
//!
//! openraft 0.9 waits for each append's fsync before it takes the next client write, so one
//! entry per operation would cost one fsync per operation on the leader. Instead, operations
//! queue here; whenever an in-flight slot is free, everything queued becomes one
//! `CommandBatch` entry. Under load, batches grow by themselves: one append, one fsync on every
//! replica and one replication round trip carry many operations.

use std::sync::Arc;

use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::Raft;
use crate::command::{Command, CommandBatch, OpResult};

/// Upper bound on one batch's message bytes, so an entry always fits a replication RPC.
const MAX_BATCH_BYTES: usize = 2 << 20;

/// Approximate payload bytes of a command (message bodies dominate).
fn weight(cmd: &Command) -> usize {
    match &cmd.op {
        crate::command::Op::Send { bodies, .. } => {
            bodies.iter().map(|b| b.len()).sum::<usize>() + 64
        }
        crate::command::Op::Transfers { items, .. } => {
            items.iter().map(|i| i.body.len() + 64).sum::<usize>() + 64
        }
        crate::command::Op::Publish { bodies, .. } => {
            bodies.iter().map(Vec::len).sum::<usize>() + 64
        }
        _ => 64,
    }
}

/// Why a proposal has no result.
#[derive(Debug, Clone)]
pub enum ProposeError {
    /// Not proposed, or truncated before commit: it was never applied; safe to retry.
    NotLeader,
    /// The entry may or may not have been committed.
    Unknown(String),
}

struct Queued {
    cmd: Command,
    reply: oneshot::Sender<Result<OpResult, ProposeError>>,
}

pub struct Proposer {
    tx: mpsc::UnboundedSender<Queued>,
}

impl Proposer {
    /// Starts the batching task of one group.
    pub fn start(raft: Raft, max_batch: usize, max_inflight: usize) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(
            raft,
            rx,
            max_batch.max(1),
            Arc::new(Semaphore::new(max_inflight.max(1))),
        ));
        Self { tx }
    }

    /// Proposes one command and waits until it is applied (or fails).
    pub async fn propose(&self, cmd: Command) -> Result<OpResult, ProposeError> {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Queued { cmd, reply }).is_err() {
            return Err(ProposeError::NotLeader);
        }
        rx.await
            .unwrap_or_else(|_| Err(ProposeError::Unknown("proposer stopped".into())))
    }
}

async fn run(
    raft: Raft,
    mut rx: mpsc::UnboundedReceiver<Queued>,
    max_batch: usize,
    slots: Arc<Semaphore>,
) {
    let mut next: Option<Queued> = None;
    loop {
        let first = match next.take() {
            Some(q) => q,
            None => match rx.recv().await {
                Some(q) => q,
                None => return,
            },
        };
        // Wait for a free slot before draining, so the batch grows while entries are in flight.
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut bytes = weight(&first.cmd);
        let mut queued = vec![first];
        let mut carry = None;
        while queued.len() < max_batch && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(q) => {
                    let w = weight(&q.cmd);
                    if bytes + w > MAX_BATCH_BYTES {
                        carry = Some(q);
                        break;
                    }
                    bytes += w;
                    queued.push(q);
                }
                Err(_) => break,
            }
        }
        next = carry;
        let (commands, replies): (Vec<Command>, Vec<_>) =
            queued.into_iter().map(|q| (q.cmd, q.reply)).unzip();
        let raft = raft.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match raft.client_write(CommandBatch { commands }).await {
                Ok(resp) => {
                    let mut results = resp.data.into_iter();
                    for reply in replies {
                        let r = results
                            .next()
                            .ok_or_else(|| ProposeError::Unknown("missing result".into()));
                        let _ = reply.send(r);
                    }
                }
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                    for reply in replies {
                        let _ = reply.send(Err(ProposeError::NotLeader));
                    }
                }
                Err(e) => {
                    for reply in replies {
                        let _ = reply.send(Err(ProposeError::Unknown(e.to_string())));
                    }
                }
            }
        });
    }
}
