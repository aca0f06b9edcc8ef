//! The CMQ-compatible HTTP action API (reference §2–§5, §12): any path, GET or POST, form
//! bodies whatever the Content-Type, HMAC signatures, JSON replies always with HTTP 200.

mod actions;
mod auth;
mod topic_actions;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use meridian_api::cmq_http::{error_reply, parse_form, Params};
use meridian_api::CmqError;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::error::NodeError;
use crate::ops::QueueOps;
use crate::topic_ops::TopicOps;

/// Largest request accepted (CMQ: 1 MB, error 4000/10420).
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

pub struct HttpApi {
    pub ops: QueueOps,
    pub topics: TopicOps,
    pub skew_seconds: u64,
    next_request: AtomicU64,
    node_id: u64,
}

impl HttpApi {
    pub fn new(ops: QueueOps, skew_seconds: u64) -> Self {
        let node_id = ops.node.id;
        Self {
            topics: TopicOps::new(ops.node.clone()),
            ops,
            skew_seconds,
            next_request: AtomicU64::new(1),
            node_id,
        }
    }

    fn request_id(&self) -> String {
        format!(
            "{}-{}",
            self.node_id,
            self.next_request.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Handles one request; every outcome is an HTTP 200 JSON reply.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        // CMQ requests always carry a form (Action…); a bare GET /metrics is the scrape.
        if req.method() == Method::GET
            && req.uri().path() == "/metrics"
            && req.uri().query().is_none()
        {
            return Response::builder()
                .status(200)
                .header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                .body(Full::new(Bytes::from(crate::metrics::render(
                    &self.ops.node,
                ))))
                .expect("static response parts are valid");
        }
        let request_id = self.request_id();
        let (reply, client_request_id) = match self.process(req, &request_id).await {
            Ok(v) => v,
            Err((e, client_request_id)) => {
                tracing::debug!(request_id, code = e.code.as_u32(), "CMQ error: {e}");
                (error_reply(&e, &request_id), client_request_id)
            }
        };
        let mut reply = reply;
        // The Go TDMQ SDK reads clientRequestId back as a number.
        if let (Some(id), Some(obj)) = (client_request_id, reply.as_object_mut()) {
            obj.insert("clientRequestId".into(), serde_json::Value::from(id));
        }
        Response::builder()
            .status(200)
            .header("Content-Type", "application/json; charset=utf-8")
            .body(Full::new(Bytes::from(reply.to_string())))
            .expect("static response parts are valid")
    }

    /// The reply, or the error, with the request's numeric clientRequestId if it had one.
    async fn process(
        &self,
        req: Request<Incoming>,
        request_id: &str,
    ) -> Result<(serde_json::Value, Option<u64>), (CmqError, Option<u64>)> {
        let mut client_request_id = None;
        self.process_inner(req, request_id, &mut client_request_id)
            .await
            .map(|v| (v, client_request_id))
            .map_err(|e| (e, client_request_id))
    }

    async fn process_inner(
        &self,
        req: Request<Incoming>,
        request_id: &str,
        client_request_id: &mut Option<u64>,
    ) -> Result<serde_json::Value, CmqError> {
        let (parts, body) = req.into_parts();
        let raw: Bytes = match parts.method {
            Method::GET => Bytes::copy_from_slice(parts.uri.query().unwrap_or("").as_bytes()),
            // POST: the form body, whatever the Content-Type; the query string is ignored.
            Method::POST => Limited::new(body, MAX_REQUEST_BYTES)
                .collect()
                .await
                .map_err(|_| {
                    CmqError::invalid(10420, format!("request exceeds {MAX_REQUEST_BYTES} bytes"))
                })?
                .to_bytes(),
            _ => return Err(CmqError::invalid(10410, "only GET and POST are supported")),
        };
        if raw.len() > MAX_REQUEST_BYTES {
            return Err(CmqError::invalid(
                10420,
                format!("request exceeds {MAX_REQUEST_BYTES} bytes"),
            ));
        }
        let params: Params = parse_form(&raw)?;
        *client_request_id = params.int::<u64>("clientRequestId").ok().flatten();
        let action = params.required("Action")?.to_string();
        let host = parts
            .headers
            .get(hyper::header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| parts.uri.authority().map(|a| a.as_str()))
            .unwrap_or("");
        let (tenant, nonce) =
            auth::authenticate(self, parts.method.as_str(), host, parts.uri.path(), &params)
                .await?;
        let action = actions::dispatch(
            &self.ops,
            &self.topics,
            &tenant,
            &action,
            &params,
            request_id,
        );
        crate::replay::with_pending(nonce, action).await
    }
}

/// Binds the HTTP listener (separately, so a bad address fails the node's start).
pub async fn bind(listen: SocketAddr) -> Result<TcpListener, NodeError> {
    TcpListener::bind(listen)
        .await
        .map_err(|e| NodeError::Network(format!("bind HTTP {listen}: {e}")))
}

/// A TLS acceptor (rustls on the aws-lc-rs provider) from PEM certificate chain and key files.
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, NodeError> {
    let err = |what: &str, p: &Path, e: &dyn std::fmt::Display| {
        NodeError::Config(format!("{what} {}: {e}", p.display()))
    };
    let open = |p: &Path| {
        std::fs::File::open(p)
            .map(std::io::BufReader::new)
            .map_err(|e| err("open", p, &e))
    };
    let certs = rustls_pemfile::certs(&mut open(cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err("read certificates from", cert, &e))?;
    if certs.is_empty() {
        return Err(err("no certificate in", cert, &"empty"));
    }
    let key_der = rustls_pemfile::private_key(&mut open(key)?)
        .map_err(|e| err("read private key from", key, &e))?
        .ok_or_else(|| err("no private key in", key, &"empty"))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| NodeError::Config(format!("TLS: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| NodeError::Config(format!("TLS certificate/key: {e}")))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

async fn serve_connection<IO>(api: Arc<HttpApi>, io: IO)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let api = api.clone();
        async move { Ok::<_, Infallible>(api.handle(req).await) }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), svc)
        .await
    {
        tracing::debug!("HTTP connection: {e}");
    }
}

/// Serves the HTTP API (HTTPS when `tls` is given) until the task is aborted.
pub async fn serve(api: Arc<HttpApi>, listener: TcpListener, tls: Option<TlsAcceptor>) {
    tracing::info!(listen = ?listener.local_addr().ok(), https = tls.is_some(), "CMQ HTTP API serving");
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("accept: {e}");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let api = api.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(s) => serve_connection(api, s).await,
                    Err(e) => tracing::debug!("TLS handshake: {e}"),
                },
                None => serve_connection(api, stream).await,
            }
        });
    }
}
