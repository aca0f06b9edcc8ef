//! `MessageStream`: pipelined sends and deletes on one gRPC stream.
//!
//! A unary call costs an HTTP/2 stream of its own (headers, trailers, a server task) on both
//! sides, which is most of a small message's CPU. Here a client keeps many operations in
//! flight on one stream; each runs as a unary call would (same `QueueOps`, same durability)
//! and its reply goes out as soon as it finishes.

use futures::stream::{FuturesUnordered, StreamExt};
use meridian_api::pb::{
    stream_reply, stream_request, DeleteMessageRequest, Empty, SendMessageReply,
    SendMessageRequest, StreamError, StreamReply, StreamRequest,
};
use meridian_api::{CmqError, CmqResult};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use super::queue_api::DEFAULT_TENANT as T;
use crate::ops::QueueOps;

/// Operations of one stream running at once; beyond it the stream is not read (backpressure).
pub const MAX_IN_FLIGHT: usize = 1024;

pub type Replies = ReceiverStream<Result<StreamReply, Status>>;

/// Starts serving `requests`; the replies are the returned stream.
pub fn serve(ops: QueueOps, mut requests: Streaming<StreamRequest>) -> Replies {
    let (tx, rx) = mpsc::channel(MAX_IN_FLIGHT);
    tokio::spawn(async move {
        let mut running = FuturesUnordered::new();
        let mut reading = true;
        loop {
            tokio::select! {
                // Replies first: they free slots and clients wait for them.
                biased;
                Some(reply) = running.next(), if !running.is_empty() => {
                    if tx.send(Ok(reply)).await.is_err() {
                        return; // The client is gone; what runs is dropped like a cancelled call.
                    }
                }
                next = requests.message(), if reading && running.len() < MAX_IN_FLIGHT => {
                    match next {
                        Ok(Some(req)) => running.push(run(ops.clone(), req)),
                        Ok(None) => reading = false,
                        Err(status) => {
                            tracing::debug!(%status, "message stream: request stream failed");
                            reading = false;
                        }
                    }
                }
                else => return,
            }
        }
    });
    ReceiverStream::new(rx)
}

async fn run(ops: QueueOps, req: StreamRequest) -> StreamReply {
    let result = match req.op {
        Some(stream_request::Op::Send(r)) => send(&ops, r).await.map(stream_reply::Result::Sent),
        Some(stream_request::Op::Delete(r)) => delete(&ops, r)
            .await
            .map(|()| stream_reply::Result::Deleted(Empty {})),
        None => Err(CmqError::invalid(
            10110,
            "a stream request needs an operation (send or delete)",
        )),
    };
    StreamReply {
        id: req.id,
        result: Some(result.unwrap_or_else(|e| {
            stream_reply::Result::Error(StreamError {
                code: e.code.as_u32(),
                message: e.to_string(),
            })
        })),
    }
}

pub(super) async fn send(ops: &QueueOps, r: SendMessageRequest) -> CmqResult<SendMessageReply> {
    let mut ids = ops
        .send(T, &r.queue_name, vec![r.msg_body], r.delay_seconds)
        .await?;
    Ok(SendMessageReply {
        msg_id: ids.pop().unwrap_or_default(),
    })
}

pub(super) async fn delete(ops: &QueueOps, r: DeleteMessageRequest) -> CmqResult<()> {
    let mut outcomes = ops
        .delete_messages(T, &r.queue_name, &[r.receipt_handle])
        .await?;
    match outcomes.pop().flatten() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
