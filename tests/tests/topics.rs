//! Topics on a real 3-node region: fan-out to queues in every group survives a leader SIGKILL
//! with nothing lost or duplicated, and HTTP push retries survive the topic leader's SIGKILL.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meridian_api::pb::topic_service_client::TopicServiceClient;
use meridian_api::pb::*;
use meridian_region_node::command::QueueKey;
use meridian_region_node::placement::group_of;
use meridian_tests::Region;
use tonic::transport::Channel;

async fn topics(region: &Region, id: u64) -> TopicServiceClient<Channel> {
    TopicServiceClient::new(region.channel(id).await.expect("connect"))
}

/// Queue names landing in each of the data groups, two per group.
fn queue_names(groups: u32) -> Vec<String> {
    let mut per_group: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for i in 0.. {
        let name = format!("fan-{i}");
        let g = group_of(&QueueKey::new("0", &name), groups);
        let v = per_group.entry(g).or_default();
        if v.len() < 2 {
            v.push(name);
        }
        if per_group.len() == groups as usize && per_group.values().all(|v| v.len() == 2) {
            break;
        }
    }
    per_group.into_values().flatten().collect()
}

/// Receives and deletes everything in `queue` until it stays empty; every body received, once
/// per delivery.
async fn drain(region: &Region, queue: &str) -> Vec<String> {
    let (delivered, _) = region.drain(queue, 0).await;
    delivered
        .into_values()
        .flat_map(|(n, body)| std::iter::repeat_n(body, n))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_reaches_every_matching_queue_exactly_once_across_a_leader_kill() {
    let mut region = Region::start(3, 3).await;
    let queues = queue_names(3);
    let mut qc = region.client(1).await;
    for q in &queues {
        qc.create_queue(CreateQueueRequest {
            queue_name: q.clone(),
            attributes: None,
        })
        .await
        .unwrap();
    }
    let mut tc = topics(&region, 2).await;
    tc.create_topic(CreateTopicRequest {
        topic_name: "orders".into(),
        filter_type: None,
        max_msg_size: None,
    })
    .await
    .unwrap();
    // Queue i filters on tag "t{i % 3}", except the first, which takes everything.
    let filter = |i: usize| -> Vec<String> {
        if i == 0 {
            vec![]
        } else {
            vec![format!("t{}", i % 3)]
        }
    };
    for (i, q) in queues.iter().enumerate() {
        tc.subscribe(SubscribeRequest {
            topic_name: "orders".into(),
            subscription_name: format!("sub-{i}"),
            protocol: "queue".into(),
            endpoint: q.clone(),
            notify_strategy: None,
            notify_content_format: None,
            filter_tag: filter(i),
            binding_key: vec![],
        })
        .await
        .unwrap();
    }

    // 5 concurrent publishers × 40 messages, tag t(k % 3).
    let mut tasks = Vec::new();
    for p in 0..5u64 {
        let mut c = topics(&region, 1 + p % 3).await;
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for k in 0..40 {
                let body = format!("p{p}-m{k}");
                let tag = format!("t{}", k % 3);
                c.publish_message(PublishMessageRequest {
                    topic_name: "orders".into(),
                    msg_body: body.clone().into_bytes(),
                    msg_tag: vec![tag.clone()],
                    routing_key: String::new(),
                })
                .await
                .expect("publish");
                acked.push((body, tag));
            }
            acked
        }));
    }
    let mut published = Vec::new();
    for t in tasks {
        published.extend(t.await.unwrap());
    }

    // Deliveries to other groups may still sit in the topic group's outbox: kill that group's
    // leader now; the schedule is replicated, so the next leader moves them.
    let topic_group = group_of(&QueueKey::new("0", "orders"), 3);
    let leader = region.leader_of(topic_group).await;
    region.kill(leader);
    region.leader_of(topic_group).await;
    region.spawn(leader);

    for (i, q) in queues.iter().enumerate() {
        let f = filter(i);
        let want: BTreeSet<String> = published
            .iter()
            .filter(|(_, tag)| f.is_empty() || f.contains(tag))
            .map(|(b, _)| b.clone())
            .collect();
        let got = drain(&region, q).await;
        let got_set: BTreeSet<String> = got.iter().cloned().collect();
        assert_eq!(got.len(), got_set.len(), "{q}: duplicates delivered");
        assert_eq!(got_set, want, "{q} (filter {f:?}) got the wrong messages");
    }
}

/// A tiny HTTP endpoint: answers 500 while `failing`, then 200, recording each message id.
struct Hook {
    port: u16,
    failing: Arc<AtomicBool>,
    received: Arc<Mutex<Vec<String>>>,
}

fn hook() -> Hook {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let failing = Arc::new(AtomicBool::new(true));
    let received = Arc::new(Mutex::new(Vec::new()));
    let (f, r) = (failing.clone(), received.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let (f, r) = (f.clone(), r.clone());
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut len = 0usize;
                let mut id = String::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let line = line.trim_end();
                    if line.is_empty() {
                        break;
                    }
                    if let Some((k, v)) = line.split_once(':') {
                        match k.to_ascii_lowercase().as_str() {
                            "content-length" => len = v.trim().parse().unwrap_or(0),
                            "x-cmq-message-id" => id = v.trim().to_string(),
                            _ => {}
                        }
                    }
                }
                let mut body = vec![0; len];
                let _ = reader.read_exact(&mut body);
                let status = if f.load(Ordering::SeqCst) {
                    "500 Internal Server Error"
                } else {
                    r.lock().unwrap().push(id);
                    "200 OK"
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
            });
        }
    });
    Hook {
        port,
        failing,
        received,
    }
}

/// Accepts connections and never answers: a dead endpoint that must not hold anyone else up.
fn black_hole() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming().flatten() {
            held.push(s);
        }
    });
    port
}

async fn subscription(region: &Region, name: &str) -> Option<SubscriptionAttributesReply> {
    for id in region.live_ids() {
        let Some(ch) = region.channel(id).await else {
            continue;
        };
        if let Ok(r) = TopicServiceClient::new(ch)
            .get_subscription_attributes(SubscriptionNameRequest {
                topic_name: "pushy".into(),
                subscription_name: name.into(),
            })
            .await
        {
            return Some(r.into_inner());
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_push_retries_survive_the_topic_leader_sigkill() {
    let mut region = Region::start(3, 2).await;
    let hook = hook();
    let dead = black_hole();
    let mut tc = topics(&region, 1).await;
    tc.create_topic(CreateTopicRequest {
        topic_name: "pushy".into(),
        filter_type: None,
        max_msg_size: None,
    })
    .await
    .unwrap();
    for (name, port) in [("hook", hook.port), ("dead", dead)] {
        tc.subscribe(SubscribeRequest {
            topic_name: "pushy".into(),
            subscription_name: name.into(),
            protocol: "http".into(),
            endpoint: format!("http://127.0.0.1:{port}/notify"),
            notify_strategy: Some("EXPONENTIAL_DECAY_RETRY".into()),
            notify_content_format: Some("SIMPLIFIED".into()),
            filter_tag: vec![],
            binding_key: vec![],
        })
        .await
        .unwrap();
    }
    let mut ids = BTreeSet::new();
    for k in 0..40 {
        let r = tc
            .publish_message(PublishMessageRequest {
                topic_name: "pushy".into(),
                msg_body: format!("push-{k}").into_bytes(),
                msg_tag: vec![],
                routing_key: String::new(),
            })
            .await
            .unwrap();
        ids.insert(r.into_inner().msg_id);
    }

    // Every message has failed at least once: a retry backlog.
    let mut backlog = false;
    for _ in 0..300 {
        if let Some(s) = subscription(&region, "hook").await {
            if s.retried >= 40 && s.msg_count == 40 {
                backlog = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(backlog, "no retry backlog built up");

    let topic_group = group_of(&QueueKey::new("0", "pushy"), 2);
    let leader = region.leader_of(topic_group).await;
    region.kill(leader);
    hook.failing.store(false, Ordering::SeqCst);
    region.leader_of(topic_group).await;

    let mut all_arrived = false;
    for _ in 0..900 {
        let got: BTreeSet<String> = hook.received.lock().unwrap().iter().cloned().collect();
        if got == ids {
            all_arrived = true;
            break;
        }
        assert!(got.is_subset(&ids), "unknown message ids pushed: {got:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        all_arrived,
        "pushes lost: {} of {} arrived",
        hook.received.lock().unwrap().len(),
        ids.len()
    );
    region.spawn(leader);
    // Serving again before its metrics are scraped below.
    region.wait_ready(Duration::from_secs(60)).await;

    // The replicated schedule agrees: nothing outstanding, each message delivered once.
    let mut settled = None;
    for _ in 0..300 {
        if let Some(s) = subscription(&region, "hook").await {
            if s.msg_count == 0 {
                settled = Some(s);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = settled.expect("deliveries still outstanding");
    assert_eq!(s.delivered, 40);
    assert_eq!(s.dropped, 0);
    assert_eq!(s.routed, 40);
    // The group leader exports the same figures for Prometheus.
    let want = "meridian_subscription_delivered_total{tenant=\"0\",topic=\"pushy\",subscription=\"hook\"} 40";
    let scraped = region
        .live_ids()
        .into_iter()
        .map(|id| {
            meridian_tests::RawHttp::connect(&region.http_addr(id))
                .request("GET", "/metrics", b"")
                .1
        })
        .collect::<Vec<_>>();
    assert!(
        scraped.iter().any(|m| m.contains(want)),
        "no node exports {want}:\n{}",
        scraped.join("\n")
    );
    // The dead endpoint is still trying, without having held up the other subscription.
    let d = subscription(&region, "dead").await.unwrap();
    assert_eq!(d.delivered, 0);
    assert!(d.msg_count > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_manages_topics_and_subscriptions_with_cmq_codes() {
    use std::process::Command;
    let region = Region::start(3, 2).await;
    let ep = region.endpoint(3);
    let run = |args: &[&str]| {
        let out = Command::new(meridian_tests::meridian_bin())
            .args(args)
            .env("MERIDIAN_ENDPOINT", &ep)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    assert!(run(&["queue", "create", "inbox"]).0);
    let (ok, id, _) = run(&["topic", "create", "news", "--filter", "routing-keys"]);
    assert!(ok && id.starts_with("topic-"), "{id}");
    let (ok, _, err) = run(&["topic", "create", "9bad"]);
    assert!(!ok && err.contains("(4000)"), "{err}");
    let (ok, _, err) = run(&[
        "subscription",
        "create",
        "news",
        "s1",
        "inbox",
        "--protocol",
        "queue",
    ]);
    assert!(
        !ok && err.contains("(4000)") && err.contains("bindingKey"),
        "{err}"
    );
    let (ok, _, err) = run(&[
        "subscription",
        "create",
        "news",
        "s1",
        "inbox",
        "--protocol",
        "queue",
        "--binding-key",
        "sport.#",
    ]);
    assert!(ok, "{err}");
    let (ok, _, err) = run(&[
        "subscription",
        "create",
        "news",
        "s2",
        "http://a b",
        "--protocol",
        "http",
        "--binding-key",
        "#",
    ]);
    assert!(!ok && err.contains("(4510)"), "{err}");
    let (ok, _, _) = run(&[
        "publish",
        "news",
        "goal!",
        "--routing-key",
        "sport.football",
    ]);
    assert!(ok);
    let (ok, _, _) = run(&["publish", "news", "rain", "--routing-key", "weather.today"]);
    assert!(ok);
    let (ok, out, err) = run(&[
        "receive", "inbox", "--wait", "3", "--count", "16", "--delete",
    ]);
    assert!(ok, "{err}");
    assert!(out.ends_with(" goal!") && out.lines().count() == 1, "{out}");
    let (ok, out, _) = run(&["subscription", "get", "news", "s1"]);
    assert!(
        ok && out.contains("sport.#") && out.contains("routed               1"),
        "{out}"
    );
    let (ok, out, _) = run(&["subscription", "list", "news"]);
    assert!(ok && out.contains("s1 queue inbox"), "{out}");
    let (ok, _, err) = run(&["topic", "delete", "news"]);
    assert!(!ok && err.contains("(4000)"), "{err}");
    assert!(run(&["subscription", "delete", "news", "s1"]).0);
    assert!(run(&["topic", "delete", "news"]).0);
    let (ok, _, err) = run(&["topic", "get", "news"]);
    assert!(!ok && err.contains("(4440)"), "{err}");
}

/// An HTTPS endpoint under a private CA (`[topics] push_ca_file`) receives its pushes; one
/// whose certificate the node does not trust receives nothing and keeps being retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_push_trusts_the_configured_ca_only() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let dir = tempfile::tempdir().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca_cert.pem()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca_cert, &ca_key)
        .unwrap();
    // Not under the configured CA: self-signed.
    let rogue_key = KeyPair::generate().unwrap();
    let rogue = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&rogue_key)
        .unwrap();

    let received = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut ports = Vec::new();
    for (cert, key) in [
        (leaf.pem(), leaf_key.serialize_pem()),
        (rogue.pem(), rogue_key.serialize_pem()),
    ] {
        let certs: Vec<_> = rustls_pemfile::certs(&mut cert.as_bytes())
            .map(Result::unwrap)
            .collect();
        let key = rustls_pemfile::private_key(&mut key.as_bytes())
            .unwrap()
            .unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        ports.push(listener.local_addr().unwrap().port());
        let received = received.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let received = received.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    // Headers, then the Content-Length body.
                    loop {
                        let n = tls.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let text = String::from_utf8_lossy(&buf).to_string();
                        if let Some(end) = text.find("\r\n\r\n") {
                            let len: usize = text[..end]
                                .lines()
                                .find_map(|l| {
                                    l.to_ascii_lowercase()
                                        .strip_prefix("content-length:")
                                        .map(|v| v.trim().parse().unwrap())
                                })
                                .unwrap_or(0);
                            if buf.len() >= end + 4 + len {
                                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]);
                                received.lock().unwrap().push(body.to_string());
                                break;
                            }
                        }
                    }
                    let _ = tls
                        .write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                        )
                        .await;
                    let _ = tls.shutdown().await;
                });
            }
        });
    }

    let region = Region::start_configured(3, 2, |c| {
        c.topics.push_ca_file = Some(ca_path.clone());
    })
    .await;
    let mut tc = topics(&region, 1).await;
    tc.create_topic(CreateTopicRequest {
        topic_name: "secure".into(),
        filter_type: None,
        max_msg_size: None,
    })
    .await
    .unwrap();
    for (name, port) in [("trusted", ports[0]), ("rogue", ports[1])] {
        tc.subscribe(SubscribeRequest {
            topic_name: "secure".into(),
            subscription_name: name.into(),
            protocol: "http".into(),
            endpoint: format!("https://localhost:{port}/hook"),
            notify_strategy: None,
            notify_content_format: Some("SIMPLIFIED".into()),
            filter_tag: vec![],
            binding_key: vec![],
        })
        .await
        .unwrap();
    }
    tc.publish_message(PublishMessageRequest {
        topic_name: "secure".into(),
        msg_body: b"over tls".to_vec(),
        msg_tag: vec![],
        routing_key: String::new(),
    })
    .await
    .unwrap();
    let mut delivered = None;
    for _ in 0..300 {
        if let Some(s) = subscription_of(&region, "secure", "trusted").await {
            if s.delivered == 1 {
                delivered = Some(s);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        delivered.is_some(),
        "the trusted HTTPS endpoint got nothing"
    );
    assert_eq!(*received.lock().unwrap(), vec!["over tls".to_string()]);
    let rogue = subscription_of(&region, "secure", "rogue").await.unwrap();
    assert_eq!((rogue.delivered, rogue.msg_count), (0, 1));
    assert!(rogue.retried >= 1, "{rogue:?}");
}

async fn subscription_of(
    region: &Region,
    topic: &str,
    name: &str,
) -> Option<SubscriptionAttributesReply> {
    let mut c = topics(region, 2).await;
    c.get_subscription_attributes(SubscriptionNameRequest {
        topic_name: topic.into(),
        subscription_name: name.into(),
    })
    .await
    .ok()
    .map(|r| r.into_inner())
}
