//! Runs a node: storage, groups, background duties and the gRPC server on one listener.

use std::sync::Arc;

use meridian_api::pb::cluster_service_server::ClusterServiceServer;
use meridian_api::pb::fault_service_server::FaultServiceServer;
use meridian_api::pb::queue_service_server::QueueServiceServer;
use meridian_api::pb::topic_service_server::TopicServiceServer;
use meridian_api::raftpb::raft_transport_server::RaftTransportServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;

use crate::config::NodeConfig;
use crate::error::NodeError;
use crate::grpc::{ClusterApi, CredentialApi, QueueApi, RaftTransportService};
use crate::node::RegionNode;
use meridian_api::pb::credential_service_server::CredentialServiceServer;

const MAX_MESSAGE: usize = 64 << 20;

/// Starts the node and serves until `shutdown` resolves.
pub async fn run(
    config: NodeConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    let listener = TcpListener::bind(config.grpc_listen)
        .await
        .map_err(|e| NodeError::Network(format!("bind {}: {e}", config.grpc_listen)))?;
    let http_listener = match config.http.listen {
        Some(addr) => Some(crate::http::bind(addr).await?),
        None => None,
    };
    let tls = match (&config.http.tls_cert, &config.http.tls_key) {
        (Some(cert), Some(key)) => Some(crate::http::tls_acceptor(cert, key)?),
        _ => None,
    };
    let node = RegionNode::start(config).await?;
    // With our own listener, tonic's `tcp_nodelay` does not apply: set it per connection, or
    // Nagle's algorithm holds small Raft replies back for a delayed ACK (~40 ms a round).
    let incoming = TcpListenerStream::new(listener).map(|s| {
        if let Ok(s) = &s {
            let _ = s.set_nodelay(true);
        }
        s
    });
    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(
            RaftTransportServer::new(RaftTransportService { node: node.clone() })
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .add_service(
            QueueServiceServer::new(QueueApi {
                ops: crate::ops::QueueOps::new(node.clone()),
            })
            .max_decoding_message_size(MAX_MESSAGE),
        )
        .add_service(
            TopicServiceServer::new(crate::grpc::TopicApi {
                ops: crate::topic_ops::TopicOps::new(node.clone()),
            })
            .max_decoding_message_size(MAX_MESSAGE),
        )
        .add_service(ClusterServiceServer::new(ClusterApi { node: node.clone() }))
        .add_optional_service(
            node.faults
                .is_some()
                .then(|| FaultServiceServer::new(crate::grpc::FaultApi { node: node.clone() })),
        )
        .add_service(CredentialServiceServer::new(CredentialApi {
            ops: crate::ops::QueueOps::new(node.clone()),
        }))
        .serve_with_incoming_shutdown(incoming, {
            let node = node.clone();
            async move {
                shutdown.await;
                node.stop_serving_streams();
            }
        });
    let serving = tokio::spawn(server);
    let http = match http_listener {
        Some(listener) => {
            let api = Arc::new(crate::http::HttpApi::new(
                crate::ops::QueueOps::new(node.clone()),
                node.config.http.timestamp_skew_seconds,
            ));
            let task = tokio::spawn(crate::http::serve(api, listener, tls));
            Some(task)
        }
        None => None,
    };
    node.bootstrap_if_configured().await?;
    node.spawn_background();
    tracing::info!(node = node.id, addr = %node.config.grpc_listen, "node serving");
    let result = serving.await;
    tracing::info!("gRPC server stopped");
    if let Some(h) = http {
        h.abort();
    }
    node.shutdown().await;
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(NodeError::Network(e.to_string())),
        Err(e) => Err(NodeError::Network(e.to_string())),
    }
}
