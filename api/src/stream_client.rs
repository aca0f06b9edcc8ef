//! A pipelined client of `QueueService.MessageStream`: many tasks share one stream, each call
//! waits for its own reply. Ids are assigned here; replies are matched by id, so operations
//! on different queues may finish in any order.

use std::collections::HashMap;

use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::pb::queue_service_client::QueueServiceClient;
use crate::pb::{
    stream_reply, stream_request, DeleteMessageRequest, SendMessageRequest, StreamRequest,
};
use crate::{CmqCode, CmqError};

type Waiter = oneshot::Sender<Result<stream_reply::Result, CmqError>>;

/// A handle on one open `MessageStream`; clones share it.
#[derive(Clone)]
pub struct MessageStreamClient {
    calls: mpsc::UnboundedSender<(stream_request::Op, Waiter)>,
}

fn broken(why: impl std::fmt::Display) -> CmqError {
    CmqError::internal(format!("message stream closed: {why}"))
}

impl MessageStreamClient {
    /// Opens a stream on `channel` (one HTTP/2 stream; the channel may carry other calls too).
    pub async fn open(channel: Channel) -> Result<Self, tonic::Status> {
        let (out_tx, out_rx) = mpsc::unbounded_channel::<StreamRequest>();
        let mut replies = QueueServiceClient::new(channel)
            .message_stream(UnboundedReceiverStream::new(out_rx))
            .await?
            .into_inner();
        let (calls, mut call_rx) = mpsc::unbounded_channel::<(stream_request::Op, Waiter)>();
        tokio::spawn(async move {
            let mut waiting: HashMap<u64, Waiter> = HashMap::new();
            let mut next_id = 0u64;
            let why = loop {
                tokio::select! {
                    call = call_rx.recv() => match call {
                        Some((op, waiter)) => {
                            next_id += 1;
                            let req = StreamRequest { id: next_id, op: Some(op) };
                            if out_tx.send(req).is_err() {
                                let _ = waiter.send(Err(broken("request side ended")));
                                continue;
                            }
                            waiting.insert(next_id, waiter);
                        }
                        // Every handle is gone: ending the requests ends the call.
                        None => break "client dropped".to_string(),
                    },
                    reply = replies.next() => match reply {
                        Some(Ok(r)) => {
                            if let Some(w) = waiting.remove(&r.id) {
                                let result = r.result.ok_or_else(|| {
                                    CmqError::internal("stream reply without a result")
                                });
                                let _ = w.send(result);
                            }
                        }
                        Some(Err(status)) => break status.to_string(),
                        None => break "the server ended it".to_string(),
                    },
                }
            };
            for (_, w) in waiting.drain() {
                let _ = w.send(Err(broken(&why)));
            }
            // Calls queued after the end fail too (their handles see a closed channel after).
            call_rx.close();
            while let Ok((_, w)) = call_rx.try_recv() {
                let _ = w.send(Err(broken(&why)));
            }
        });
        Ok(Self { calls })
    }

    async fn call(&self, op: stream_request::Op) -> Result<stream_reply::Result, CmqError> {
        let (tx, rx) = oneshot::channel();
        self.calls
            .send((op, tx))
            .map_err(|_| broken("it ended before this call"))?;
        match rx.await {
            Ok(Ok(stream_reply::Result::Error(e))) => Err(CmqError::new(
                CmqCode::from_u32(e.code).unwrap_or(CmqCode::Internal),
                0,
                e.message,
            )),
            Ok(r) => r,
            Err(_) => Err(broken("no reply")),
        }
    }

    /// Sends one message; its id once a majority has it on disk.
    pub async fn send(&self, req: SendMessageRequest) -> Result<String, CmqError> {
        match self.call(stream_request::Op::Send(req)).await? {
            stream_reply::Result::Sent(r) => Ok(r.msg_id),
            _ => Err(CmqError::internal("unexpected reply to a send")),
        }
    }

    /// Deletes one received message by its receipt handle.
    pub async fn delete(&self, req: DeleteMessageRequest) -> Result<(), CmqError> {
        match self.call(stream_request::Op::Delete(req)).await? {
            stream_reply::Result::Deleted(_) => Ok(()),
            _ => Err(CmqError::internal("unexpected reply to a delete")),
        }
    }
}
