//! HTTP push delivery for topic subscriptions (reference §7), run by each data group's leader.
//!
//! The schedule lives in the replicated topic state: each outstanding delivery has its failed
//! attempt count and its due time. The worker on the leader POSTs what is due, then proposes
//! the outcomes (with the next retry time it chose) as one `PushResults` command per topic. A
//! new leader therefore continues exactly where the old one stopped; a delivery whose outcome
//! was not committed before a leader change is attempted again (at-least-once). Every delivery
//! runs in its own task with a timeout, and each subscription has its own in-flight bound, so a
//! slow or dead endpoint never delays another subscription.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HOST, USER_AGENT};
use hyper::{Request, Uri};
use meridian_api::topics::{NotifyFormat, NotifyStrategy, Protocol, TOPIC_MSG_RETENTION_SECONDS};
use openraft::async_runtime::WatchReceiver;
use openraft::ServerState;
use rand::Rng;
use tokio::sync::mpsc;

use crate::command::{Op, PushOutcome, PushResult, QueueKey};
use crate::config::TopicsConfig;
use crate::node::RegionNode;

const SCAN_INTERVAL: Duration = Duration::from_millis(100);
const USER_AGENT_VALUE: &str = "Qcloud Notification Service Agent";

/// One delivery attempt, with everything needed to make it.
#[derive(Debug, Clone)]
struct PushJob {
    topic: QueueKey,
    topic_name: String,
    subscription: String,
    subscription_name: String,
    endpoint: String,
    format: NotifyFormat,
    strategy: NotifyStrategy,
    attempts: u32,
    seq: u64,
    msg_id: String,
    body: Vec<u8>,
    tags: Vec<String>,
    publish_ms: i64,
}

type InFlight = Arc<Mutex<HashSet<(QueueKey, String, u64)>>>;

/// Runs forever; does work only while this node leads `group`.
pub async fn run(node: Arc<RegionNode>, group: u32) {
    let in_flight: InFlight = Arc::default();
    let (tx, mut rx) = mpsc::unbounded_channel::<(PushJob, bool)>();
    let mut tick = tokio::time::interval(SCAN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // Outcomes of finished attempts: one command per topic.
        let mut finished: Vec<(PushJob, bool)> = Vec::new();
        while let Ok(f) = rx.try_recv() {
            finished.push(f);
        }
        if !finished.is_empty() {
            record(&node, group, &in_flight, finished).await;
        }
        let Some(g) = node.group_ref(group) else {
            return;
        };
        if g.raft.metrics().borrow_watched().state != ServerState::Leader {
            continue;
        }
        for job in due_jobs(&node, group, &in_flight) {
            let tx = tx.clone();
            let timeout = Duration::from_secs(node.config.topics.push_timeout_seconds);
            let tenant_owner = job.topic.tenant.clone();
            let tls = node.push_tls.clone();
            tokio::spawn(async move {
                let ok = match tokio::time::timeout(timeout, post(&job, &tenant_owner, &tls)).await
                {
                    Ok(Ok(status)) => (200..300).contains(&status),
                    Ok(Err(e)) => {
                        tracing::debug!(endpoint = %job.endpoint, "push failed: {e}");
                        false
                    }
                    Err(_) => {
                        tracing::debug!(endpoint = %job.endpoint, "push timed out");
                        false
                    }
                };
                let _ = tx.send((job, ok));
            });
        }
    }
}

/// Due deliveries not already in flight, at most the per-subscription bound in flight each.
fn due_jobs(node: &RegionNode, group: u32, in_flight: &InFlight) -> Vec<PushJob> {
    let Some(g) = node.group_ref(group) else {
        return Vec::new();
    };
    let now = node.clock.now_ms();
    let cap = node.config.topics.push_max_in_flight_per_subscription;
    let state = g.shared.state.read().expect("state lock");
    let mut flying = in_flight.lock().expect("in-flight lock");
    let mut per_sub: HashMap<(QueueKey, String), usize> = HashMap::new();
    for (k, s, _) in flying.iter() {
        *per_sub.entry((k.clone(), s.clone())).or_default() += 1;
    }
    let mut jobs = Vec::new();
    for (key, t) in &state.topics {
        for (sub_key, s) in &t.subscriptions {
            if s.spec.protocol != Protocol::Http || s.due.is_empty() {
                continue;
            }
            let busy = per_sub
                .get(&(key.clone(), sub_key.clone()))
                .copied()
                .unwrap_or(0);
            let mut room = cap.saturating_sub(busy);
            for &(_, seq) in s.due.range(..=(now, u64::MAX)) {
                if room == 0 {
                    break;
                }
                let id = (key.clone(), sub_key.clone(), seq);
                if flying.contains(&id) {
                    continue;
                }
                let (Some(m), Some(p)) = (t.messages.get(&seq), s.pending.get(&seq)) else {
                    continue;
                };
                flying.insert(id);
                room -= 1;
                jobs.push(PushJob {
                    topic: key.clone(),
                    topic_name: t.name.clone(),
                    subscription: sub_key.clone(),
                    subscription_name: s.spec.name.clone(),
                    endpoint: s.spec.endpoint.clone(),
                    format: s.spec.format,
                    strategy: s.spec.strategy,
                    attempts: p.attempts,
                    seq,
                    msg_id: m.msg_id.clone(),
                    body: m.body.clone(),
                    tags: m.tags.clone(),
                    publish_ms: m.publish_ms,
                });
            }
        }
    }
    jobs
}

/// What happens after an attempt: done, retry at a time chosen here (so replicas agree), or
/// give up.
fn outcome(cfg: &TopicsConfig, job: &PushJob, ok: bool, now: i64) -> PushOutcome {
    if ok {
        return PushOutcome::Delivered;
    }
    let failures = job.attempts + 1;
    let delay_ms = match job.strategy {
        NotifyStrategy::BackoffRetry => {
            if failures > cfg.backoff_retry_attempts {
                return PushOutcome::GaveUp;
            }
            let s = rand::thread_rng()
                .gen_range(cfg.backoff_retry_min_seconds..=cfg.backoff_retry_max_seconds);
            s as i64 * 1000
        }
        NotifyStrategy::ExponentialDecayRetry => {
            let exp = 1u64 << job.attempts.min(30);
            exp.min(cfg.exponential_retry_cap_seconds) as i64 * 1000
        }
    };
    let at = now + delay_ms;
    if at > job.publish_ms + i64::from(TOPIC_MSG_RETENTION_SECONDS) * 1000 {
        PushOutcome::GaveUp
    } else {
        PushOutcome::RetryAt(at)
    }
}

async fn record(node: &RegionNode, group: u32, in_flight: &InFlight, done: Vec<(PushJob, bool)>) {
    let now = node.clock.now_ms();
    let mut by_topic: BTreeMap<QueueKey, Vec<PushResult>> = BTreeMap::new();
    for (job, ok) in &done {
        let o = outcome(&node.config.topics, job, *ok, now);
        if !ok {
            tracing::info!(
                topic = %job.topic_name,
                subscription = %job.subscription_name,
                msg_id = %job.msg_id,
                attempt = job.attempts + 1,
                "push to {} failed; {:?}",
                job.endpoint,
                o
            );
        }
        by_topic
            .entry(job.topic.clone())
            .or_default()
            .push(PushResult {
                subscription: job.subscription.clone(),
                seq: job.seq,
                outcome: o,
            });
    }
    for (key, results) in by_topic {
        if let Err(e) = node
            .execute(
                group,
                crate::node::GroupRequest::Write(Op::PushResults { key, results }),
            )
            .await
        {
            // Still outstanding in the replicated schedule: attempted again, here or by the
            // next leader.
            tracing::warn!(group, "recording push outcomes: {e}");
        }
    }
    let mut flying = in_flight.lock().expect("in-flight lock");
    for (job, _) in done {
        flying.remove(&(job.topic, job.subscription, job.seq));
    }
}

fn json_body(job: &PushJob, owner: &str) -> Vec<u8> {
    let owner = owner
        .parse::<u64>()
        .map(serde_json::Value::from)
        .unwrap_or_else(|_| serde_json::Value::from(owner));
    serde_json::json!({
        "TopicOwner": owner,
        "topicName": job.topic_name,
        "subscriptionName": job.subscription_name,
        "msgId": job.msg_id,
        "msgBody": String::from_utf8_lossy(&job.body),
        "publishTime": job.publish_ms / 1000,
    })
    .to_string()
    .into_bytes()
}

/// POSTs one message; the HTTP status, or why there is none.
async fn post(job: &PushJob, owner: &str, tls: &tokio_rustls::TlsConnector) -> Result<u16, String> {
    let uri: Uri = job.endpoint.parse().map_err(|e| format!("bad URL: {e}"))?;
    let https = uri.scheme_str() == Some("https");
    let host = uri.host().ok_or("URL has no host")?.to_string();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let authority = uri
        .authority()
        .map(|a| a.to_string())
        .unwrap_or(host.clone());
    let path = uri
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_else(|| "/".into());
    let body = match job.format {
        NotifyFormat::Json => json_body(job, owner),
        NotifyFormat::Simplified => job.body.clone(),
    };
    let req = Request::post(path)
        .header(HOST, authority)
        .header(CONTENT_TYPE, "text/plain")
        .header(USER_AGENT, USER_AGENT_VALUE)
        .header("x-cmq-request-id", request_id())
        .header("x-cmq-message-id", &job.msg_id)
        .header("x-cmq-message-tag", job.tags.join(", "))
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    if https {
        let name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|e| format!("server name: {e}"))?;
        let tls = tls
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        send(hyper_util::rt::TokioIo::new(tls), req).await
    } else {
        send(hyper_util::rt::TokioIo::new(tcp), req).await
    }
}

async fn send<IO>(io: IO, req: Request<Full<Bytes>>) -> Result<u16, String>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    Ok(resp.status().as_u16())
}

/// The TLS client for https:// endpoints: the web PKI roots plus `[topics] push_ca_file`.
pub fn tls_connector(cfg: &TopicsConfig) -> Result<tokio_rustls::TlsConnector, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = &cfg.push_ca_file {
        let pem = std::fs::read(path).map_err(|e| format!("read {}: {e}", path.display()))?;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

fn request_id() -> String {
    let mut rng = rand::thread_rng();
    format!("{:016x}{:016x}", rng.gen::<u64>(), rng.gen::<u64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(strategy: NotifyStrategy, attempts: u32) -> PushJob {
        PushJob {
            topic: QueueKey::new("1", "t"),
            topic_name: "t".into(),
            subscription: "s".into(),
            subscription_name: "S".into(),
            endpoint: "http://127.0.0.1:1/".into(),
            format: NotifyFormat::Json,
            strategy,
            attempts,
            seq: 1,
            msg_id: "1-1".into(),
            body: b"hello".to_vec(),
            tags: vec!["a".into(), "b".into()],
            publish_ms: 0,
        }
    }

    #[test]
    fn exponential_retries_double_up_to_the_cap_then_stop_at_retention() {
        let cfg = TopicsConfig::default();
        let delays: Vec<PushOutcome> = (0..12)
            .map(|a| {
                outcome(
                    &cfg,
                    &job(NotifyStrategy::ExponentialDecayRetry, a),
                    false,
                    0,
                )
            })
            .collect();
        let want = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 512, 512];
        for (o, s) in delays.iter().zip(want) {
            assert_eq!(*o, PushOutcome::RetryAt(s * 1000));
        }
        let late = 86_400_000 - 1000;
        assert_eq!(
            outcome(
                &cfg,
                &job(NotifyStrategy::ExponentialDecayRetry, 20),
                false,
                late
            ),
            PushOutcome::GaveUp
        );
        assert_eq!(
            outcome(
                &cfg,
                &job(NotifyStrategy::ExponentialDecayRetry, 0),
                true,
                late
            ),
            PushOutcome::Delivered
        );
    }

    #[test]
    fn backoff_retries_a_few_times_in_the_window() {
        let cfg = TopicsConfig::default();
        for a in 0..3 {
            match outcome(&cfg, &job(NotifyStrategy::BackoffRetry, a), false, 0) {
                PushOutcome::RetryAt(t) => assert!((10_000..=20_000).contains(&t)),
                o => panic!("attempt {a}: {o:?}"),
            }
        }
        assert_eq!(
            outcome(&cfg, &job(NotifyStrategy::BackoffRetry, 3), false, 0),
            PushOutcome::GaveUp
        );
    }

    #[test]
    fn json_body_has_the_documented_fields() {
        let v: serde_json::Value = serde_json::from_slice(&json_body(
            &job(NotifyStrategy::BackoffRetry, 0),
            "100015036",
        ))
        .unwrap();
        assert_eq!(v["TopicOwner"], 100015036);
        assert_eq!(v["topicName"], "t");
        assert_eq!(v["subscriptionName"], "S");
        assert_eq!(v["msgId"], "1-1");
        assert_eq!(v["msgBody"], "hello");
        assert_eq!(v["publishTime"], 0);
    }
}
