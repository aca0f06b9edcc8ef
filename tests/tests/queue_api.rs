//! The queue API end to end on a real 3-node region: bad input gets CMQ codes over gRPC and the
//! CLI, long poll is woken by a send, batch delete reports partial failure, dead letters cross
//! groups, and `meridian dev` runs a region.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use meridian_api::pb::*;
use meridian_tests::{cmq_code, meridian_bin, Region};

fn attrs() -> QueueAttributes {
    QueueAttributes::default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_semantics_and_bad_input() {
    let region = Region::start(3, 3).await;
    let mut c = region.client(3).await;

    // --- bad input over gRPC: the documented CMQ codes, never a panic ---
    for bad in ["", "9abc", "a b", "x".repeat(65).as_str(), "队列"] {
        let e = c
            .create_queue(CreateQueueRequest {
                queue_name: bad.into(),
                attributes: None,
            })
            .await
            .unwrap_err();
        assert_eq!(cmq_code(&e), 4000, "{bad:?}: {e}");
    }
    let e = c
        .create_queue(CreateQueueRequest {
            queue_name: "q".into(),
            attributes: Some(QueueAttributes {
                visibility_timeout: Some(0),
                ..attrs()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(cmq_code(&e), 4000);
    let e = c
        .create_queue(CreateQueueRequest {
            queue_name: "q".into(),
            attributes: Some(QueueAttributes {
                dead_letter_policy: Some("{oops".into()),
                ..attrs()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(cmq_code(&e), 4000);
    c.create_queue(CreateQueueRequest {
        queue_name: "work".into(),
        attributes: Some(QueueAttributes {
            max_msg_size: Some(1024),
            ..attrs()
        }),
    })
    .await
    .unwrap();
    let e = c
        .create_queue(CreateQueueRequest {
            queue_name: "WORK".into(),
            attributes: None,
        })
        .await
        .unwrap_err();
    assert_eq!(cmq_code(&e), 4460);
    let e = c
        .send_message(SendMessageRequest {
            queue_name: "work".into(),
            msg_body: vec![b'x'; 1025],
            delay_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(cmq_code(&e), 4400);
    let e = c
        .send_message(SendMessageRequest {
            queue_name: "work".into(),
            msg_body: vec![],
            delay_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(cmq_code(&e), 4000);
    let e = c
        .send_message(SendMessageRequest {
            queue_name: "work".into(),
            msg_body: b"x".to_vec(),
            delay_seconds: 4000,
        })
        .await
        .unwrap_err();
    assert_eq!(cmq_code(&e), 4000);
    let e = c
        .send_message(SendMessageRequest {
            queue_name: "missing".into(),
            msg_body: b"x".to_vec(),
            delay_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(cmq_code(&e), 4440);
    let e = c
        .batch_send_message(BatchSendMessageRequest {
            queue_name: "work".into(),
            msg_body: vec![b"x".to_vec(); 17],
            delay_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(cmq_code(&e), 4000);
    let e = c
        .receive_message(ReceiveMessageRequest {
            queue_name: "work".into(),
            polling_wait_seconds: Some(31),
        })
        .await
        .unwrap_err();
    assert_eq!(cmq_code(&e), 4000);
    let e = c
        .batch_receive_message(BatchReceiveMessageRequest {
            queue_name: "work".into(),
            num_of_msg: 0,
            polling_wait_seconds: Some(0),
        })
        .await
        .unwrap_err();
    assert_eq!(cmq_code(&e), 4000);
    for handle in [
        "",
        "garbage",
        "1:2:3:00112233445566778899aabbccddeeff",
        &"9".repeat(300),
    ] {
        let e = c
            .delete_message(DeleteMessageRequest {
                queue_name: "work".into(),
                receipt_handle: handle.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(cmq_code(&e), 4430, "{handle:?}");
    }
    let e = c
        .receive_message(ReceiveMessageRequest {
            queue_name: "work".into(),
            polling_wait_seconds: Some(0),
        })
        .await
        .unwrap_err();
    assert_eq!(cmq_code(&e), 7000);

    // --- long poll returns as soon as a message arrives (woken, not timed out) ---
    let mut waiter = region.client(1).await;
    let poll = tokio::spawn(async move {
        waiter
            .receive_message(ReceiveMessageRequest {
                queue_name: "work".into(),
                polling_wait_seconds: Some(30),
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.send_message(SendMessageRequest {
        queue_name: "work".into(),
        msg_body: b"wake".to_vec(),
        delay_seconds: 0,
    })
    .await
    .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(20), poll)
        .await
        .expect("long poll must be woken well before its 30 s wait")
        .unwrap()
        .unwrap()
        .into_inner();
    assert_eq!(got.msg_body, b"wake");
    assert_eq!(got.dequeue_count, 1);

    // --- batch delete: partial failure is reported per handle ---
    c.batch_send_message(BatchSendMessageRequest {
        queue_name: "work".into(),
        msg_body: vec![b"a".to_vec(), b"b".to_vec()],
        delay_seconds: 0,
    })
    .await
    .unwrap();
    let msgs = c
        .batch_receive_message(BatchReceiveMessageRequest {
            queue_name: "work".into(),
            num_of_msg: 16,
            polling_wait_seconds: Some(1),
        })
        .await
        .unwrap()
        .into_inner()
        .messages;
    assert_eq!(msgs.len(), 2);
    let mut handles: Vec<String> = msgs.iter().map(|m| m.receipt_handle.clone()).collect();
    handles.push(got.receipt_handle.clone());
    handles.push("forged".into());
    let r = c
        .batch_delete_message(BatchDeleteMessageRequest {
            queue_name: "work".into(),
            receipt_handle: handles,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.code, 6010);
    assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
    assert_eq!(r.errors[0].receipt_handle, "forged");
    assert_eq!(r.errors[0].code, 4430);

    // --- dead letters move across groups and the DLQ is protected ---
    for name in (0..8).map(|i| format!("dlq{i}")) {
        c.create_queue(CreateQueueRequest {
            queue_name: name,
            attributes: None,
        })
        .await
        .unwrap();
    }
    c.create_queue(CreateQueueRequest {
        queue_name: "poison".into(),
        attributes: Some(QueueAttributes {
            visibility_timeout: Some(1),
            dead_letter_policy: Some(
                r#"{"deadLetterQueue":"dlq7","policy":0,"maxReceiveCount":1}"#.into(),
            ),
            ..attrs()
        }),
    })
    .await
    .unwrap();
    let e = c
        .create_queue(CreateQueueRequest {
            queue_name: "nested".into(),
            attributes: Some(QueueAttributes {
                dead_letter_policy: Some(
                    r#"{"deadLetterQueue":"poison","policy":0,"maxReceiveCount":1}"#.into(),
                ),
                ..attrs()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(cmq_code(&e), 4000, "no nested dead-letter queues");
    let e = c
        .delete_queue(QueueNameRequest {
            queue_name: "dlq7".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(cmq_code(&e), 4000, "a bound DLQ cannot be deleted");
    let sources = c
        .list_dead_letter_source_queues(ListDeadLetterSourceQueuesRequest {
            dead_letter_queue_name: "dlq7".into(),
            search_word: String::new(),
            offset: 0,
            limit: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sources.total_count, 1);
    c.send_message(SendMessageRequest {
        queue_name: "poison".into(),
        msg_body: b"bad".to_vec(),
        delay_seconds: 0,
    })
    .await
    .unwrap();
    c.receive_message(ReceiveMessageRequest {
        queue_name: "poison".into(),
        polling_wait_seconds: Some(5),
    })
    .await
    .unwrap();
    // After the visibility timeout the next receive dead-letters it instead of delivering it.
    let dead = c
        .receive_message(ReceiveMessageRequest {
            queue_name: "dlq7".into(),
            polling_wait_seconds: Some(0),
        })
        .await;
    assert!(
        dead.is_err(),
        "not dead-lettered before its visibility timeout"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let e = c
        .receive_message(ReceiveMessageRequest {
            queue_name: "poison".into(),
            polling_wait_seconds: Some(0),
        })
        .await
        .unwrap_err();
    assert_eq!(cmq_code(&e), 7000);
    let dead = c
        .receive_message(ReceiveMessageRequest {
            queue_name: "dlq7".into(),
            polling_wait_seconds: Some(20),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dead.msg_body, b"bad");
    c.unbind_dead_letter_queue(QueueNameRequest {
        queue_name: "poison".into(),
    })
    .await
    .unwrap();
    c.delete_queue(QueueNameRequest {
        queue_name: "dlq7".into(),
    })
    .await
    .unwrap();

    // --- list with search, paging and total count over every group ---
    let l = c
        .list_queue(ListQueueRequest {
            search_word: "dlq".into(),
            offset: 2,
            limit: Some(3),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(l.total_count, 7);
    assert_eq!(l.queues.len(), 3);
    assert_eq!(l.queues[0].queue_name, "dlq2");
    let e = c
        .list_queue(ListQueueRequest {
            search_word: String::new(),
            offset: 0,
            limit: Some(51),
        })
        .await
        .unwrap_err();
    assert_eq!(cmq_code(&e), 4000);

    // --- rewind re-delivers consumed messages ---
    c.create_queue(CreateQueueRequest {
        queue_name: "ledger".into(),
        attributes: Some(QueueAttributes {
            rewind_seconds: Some(3600),
            ..attrs()
        }),
    })
    .await
    .unwrap();
    let start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        - 1;
    c.send_message(SendMessageRequest {
        queue_name: "ledger".into(),
        msg_body: b"entry".to_vec(),
        delay_seconds: 0,
    })
    .await
    .unwrap();
    let m = c
        .receive_message(ReceiveMessageRequest {
            queue_name: "ledger".into(),
            polling_wait_seconds: Some(1),
        })
        .await
        .unwrap()
        .into_inner();
    c.delete_message(DeleteMessageRequest {
        queue_name: "ledger".into(),
        receipt_handle: m.receipt_handle,
    })
    .await
    .unwrap();
    let a = c
        .get_queue_attributes(QueueNameRequest {
            queue_name: "ledger".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((a.active_msg_num, a.rewind_msg_num), (0, 1));
    c.rewind_queue(RewindQueueRequest {
        queue_name: "ledger".into(),
        start_consume_time: start,
    })
    .await
    .unwrap();
    let again = c
        .receive_message(ReceiveMessageRequest {
            queue_name: "ledger".into(),
            polling_wait_seconds: Some(1),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (again.msg_id, again.msg_body),
        (m.msg_id, b"entry".to_vec())
    );
    let e = c
        .rewind_queue(RewindQueueRequest {
            queue_name: "work".into(),
            start_consume_time: start,
        })
        .await
        .unwrap_err();
    assert_eq!(cmq_code(&e), 6050);

    // --- the CLI: same codes, receive on an empty queue exits non-zero with 7000 ---
    let ep = region.endpoint(2);
    let run = |args: &[&str]| {
        Command::new(meridian_bin())
            .args(args)
            .env("MERIDIAN_ENDPOINT", &ep)
            .output()
            .unwrap()
    };
    let out = run(&["queue", "create", "9bad"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("(4000)"),
        "{out:?}"
    );
    let out = run(&["queue", "create", "cli-q", "--visibility-timeout", "5"]);
    assert!(out.status.success(), "{out:?}");
    let out = run(&["receive", "cli-q", "--wait", "0"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("(7000)"),
        "{out:?}"
    );
    let out = run(&["send", "cli-q", "hello 世界"]);
    assert!(out.status.success(), "{out:?}");
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let out = run(&["receive", "cli-q", "--wait", "2", "--delete"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{id} hello 世界")
    );
    let out = run(&["delete", "cli-q", "not-a-handle"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("(4430)"),
        "{out:?}"
    );
    let out = run(&["queue", "get", "nope"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("(4440)"),
        "{out:?}"
    );
    let out = run(&["cluster", "status"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("applied"),
        "{out:?}"
    );
}

/// `meridian dev` up to its `ready` line: the process, its stdout lines, the children's pids
/// and the ready line. Another test can take a port between the check and the bind; then dev
/// reports the child that could not bind and this starts again on other ports.
fn start_dev(
    dir: &std::path::Path,
) -> (
    std::process::Child,
    std::io::Lines<BufReader<std::process::ChildStdout>>,
    Vec<i32>,
    String,
) {
    for attempt in 1..=4 {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).unwrap();
        let stderr_path = dir.with_extension("stderr");
        let mut dev = Command::new(meridian_bin())
            .args(["dev", "--data-dir"])
            .arg(dir)
            .args(["--base-port", "0"])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(dev.stdout.take().unwrap()).lines();
        let mut pids = Vec::new();
        let ready = loop {
            match lines.next() {
                Some(Ok(line)) if line.starts_with("ready ") => break Some(line),
                Some(Ok(line)) => {
                    let pid = line.strip_prefix("node ").and_then(|rest| {
                        rest.split_whitespace().find_map(|w| w.strip_prefix("pid="))
                    });
                    if let Some(pid) = pid {
                        pids.push(pid.parse::<i32>().unwrap());
                    }
                }
                _ => break None,
            }
        };
        if let Some(ready) = ready {
            return (dev, lines, pids, ready);
        }
        let status = dev.wait().unwrap();
        let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        if attempt < 4 && stderr.contains("in use") {
            eprintln!("dev could not bind a port; starting again on other ports:\n{stderr}");
            continue;
        }
        panic!("dev exited before ready ({status}):\n{stderr}");
    }
    unreachable!("the last attempt returns or panics")
}

#[test]
fn dev_region_runs_survives_a_dead_child_and_stops_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let (mut dev, mut lines, pids, ready) = start_dev(&dir);
    assert_eq!(pids.len(), 3);
    let grpc = ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("grpc="))
        .unwrap()
        .to_string();
    let ok = Command::new(meridian_bin())
        .args(["queue", "create", "devq", "--endpoint", &grpc])
        .output()
        .unwrap();
    assert!(ok.status.success(), "{ok:?}");
    // Kill one child: dev keeps running and reports it; the restart command works.
    unsafe { libc::kill(pids[2], libc::SIGKILL) };
    let line = loop {
        let l = lines.next().unwrap().unwrap();
        if l.contains("exited") {
            break l;
        }
    };
    assert!(line.contains("node 3"), "{line}");
    assert!(dev.try_wait().unwrap().is_none(), "dev must keep running");
    let cfg = dir.join("node3").join("node.toml");
    let mut restarted = Command::new(meridian_bin())
        .args(["node", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ok = Command::new(meridian_bin())
        .args(["send", "devq", "still-here", "--endpoint", &grpc])
        .output()
        .unwrap();
    assert!(ok.status.success(), "{ok:?}");
    unsafe { libc::kill(dev.id() as i32, libc::SIGTERM) };
    let status = dev.wait().unwrap();
    assert!(status.success(), "{status:?}");
    for pid in &pids[..2] {
        // The children are gone (kill with signal 0 fails for a reaped pid).
        assert_ne!(
            unsafe { libc::kill(*pid, 0) },
            0,
            "child {pid} still running"
        );
    }
    let _ = restarted.kill();
    let _ = restarted.wait();
}

/// Many concurrent maximum-size messages: batches are capped in bytes and oversized replication
/// messages are split, so the group keeps committing (each send is acknowledged and readable).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_max_size_messages_all_commit() {
    let region = Region::start(3, 1).await;
    let mut c = region.client(1).await;
    c.create_queue(CreateQueueRequest {
        queue_name: "big".into(),
        attributes: Some(QueueAttributes {
            max_msg_size: Some(1_048_576),
            ..attrs()
        }),
    })
    .await
    .unwrap();
    let sends = (0..40u8).map(|i| {
        let mut c = c.clone();
        async move {
            c.send_message(SendMessageRequest {
                queue_name: "big".into(),
                msg_body: vec![b'a' + i % 26; 1_048_576],
                delay_seconds: 0,
            })
            .await
        }
    });
    let results = futures::future::join_all(sends).await;
    let acked = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(acked, 40, "{:?}", results.iter().find(|r| r.is_err()));
    let a = c
        .get_queue_attributes(QueueNameRequest {
            queue_name: "big".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.active_msg_num, 40);
    // A follower has them too: read through another node after the leader is gone.
    let leader = region.leader_of(1).await;
    let mut region = region;
    region.kill(leader);
    let other = region.live_ids()[0];
    let mut c = region.client(other).await;
    // Receives are retried: while the new leader is elected, a receive may fail or its outcome
    // be unknown (then the message returns after the 2 s visibility timeout).
    let mut got = std::collections::BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while got.len() < 40 {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of 40 received",
            got.len()
        );
        let r = c
            .batch_receive_message(BatchReceiveMessageRequest {
                queue_name: "big".into(),
                num_of_msg: 16,
                polling_wait_seconds: Some(5),
            })
            .await;
        let Ok(r) = r else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        for m in r.into_inner().messages {
            assert_eq!(m.msg_body.len(), 1_048_576);
            got.insert(m.msg_id);
            let _ = c
                .delete_message(DeleteMessageRequest {
                    queue_name: "big".into(),
                    receipt_handle: m.receipt_handle,
                })
                .await;
        }
    }
}

/// `MessageStream` through a node that leads no group of the queue (so every operation is
/// forwarded): many sends in flight on one stream all commit exactly once, deletes on the
/// stream remove what was received, and bad operations get their CMQ code in their own reply
/// while the stream goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_stream_pipelines_sends_and_deletes_with_per_operation_errors() {
    use meridian_api::stream_client::MessageStreamClient;
    use std::collections::BTreeSet;

    let region = Region::start(3, 1).await;
    let mut c = region.client(1).await;
    c.create_queue(CreateQueueRequest {
        queue_name: "piped".into(),
        attributes: Some(QueueAttributes {
            max_msg_size: Some(1024),
            visibility_timeout: Some(30),
            ..attrs()
        }),
    })
    .await
    .unwrap();
    let leader = region.leader_of(1).await;
    let via = region
        .live_ids()
        .into_iter()
        .find(|&i| i != leader)
        .unwrap();
    let stream = MessageStreamClient::open(region.channel(via).await.unwrap())
        .await
        .unwrap();

    let send = |body: Vec<u8>, queue: &str| {
        let stream = stream.clone();
        let queue = queue.to_string();
        async move {
            stream
                .send(SendMessageRequest {
                    queue_name: queue,
                    msg_body: body,
                    delay_seconds: 0,
                })
                .await
        }
    };
    // 300 sends at once, with two bad ones among them.
    let mut calls: Vec<_> = (0..300)
        .map(|i| futures::future::Either::Left(send(format!("m{i}").into_bytes(), "piped")))
        .collect();
    calls.push(futures::future::Either::Right(send(
        vec![b'x'; 2048],
        "piped",
    )));
    calls.push(futures::future::Either::Right(send(
        b"lost".to_vec(),
        "no-such-queue",
    )));
    let mut results = futures::future::join_all(calls).await;
    let missing = results.pop().unwrap().unwrap_err();
    assert_eq!(missing.code.as_u32(), 4440, "{missing}");
    let too_big = results.pop().unwrap().unwrap_err();
    assert_eq!(too_big.code.as_u32(), 4400, "{too_big}");
    let ids: BTreeSet<String> = results.into_iter().map(|r| r.unwrap()).collect();
    assert_eq!(ids.len(), 300, "every send acknowledged with its own id");

    // Receive everything (unary), delete it on the stream, plus one bad handle.
    let mut got = BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while got.len() < 300 {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} received",
            got.len()
        );
        let r = c
            .batch_receive_message(BatchReceiveMessageRequest {
                queue_name: "piped".into(),
                num_of_msg: 16,
                polling_wait_seconds: Some(1),
            })
            .await
            .unwrap()
            .into_inner();
        let deletes = r.messages.into_iter().map(|m| {
            assert!(got.insert(m.msg_id.clone()), "{} delivered twice", m.msg_id);
            let stream = stream.clone();
            async move {
                stream
                    .delete(DeleteMessageRequest {
                        queue_name: "piped".into(),
                        receipt_handle: m.receipt_handle,
                    })
                    .await
            }
        });
        for r in futures::future::join_all(deletes).await {
            r.unwrap();
        }
    }
    assert_eq!(got, ids);
    let e = stream
        .delete(DeleteMessageRequest {
            queue_name: "piped".into(),
            receipt_handle: "not-a-handle".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code.as_u32(), 4430, "{e}");
    let a = c
        .get_queue_attributes(QueueNameRequest {
            queue_name: "piped".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (a.active_msg_num, a.inactive_msg_num),
        (0, 0),
        "all deleted"
    );

    // A request without an operation is refused in its reply; the stream still works after.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut replies = c
        .message_stream(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(StreamRequest { id: 7, op: None }).unwrap();
    let r = replies.message().await.unwrap().unwrap();
    assert_eq!(r.id, 7);
    match r.result {
        Some(stream_reply::Result::Error(e)) => assert_eq!(e.code, 4000, "{}", e.message),
        other => panic!("expected an error reply, got {other:?}"),
    }
    let send_req = |id, body: &str| StreamRequest {
        id,
        op: Some(stream_request::Op::Send(SendMessageRequest {
            queue_name: "piped".into(),
            msg_body: body.as_bytes().to_vec(),
            delay_seconds: 0,
        })),
    };
    tx.send(send_req(8, "after")).unwrap();
    let r = replies.message().await.unwrap().unwrap();
    assert!(
        matches!(r.result, Some(stream_reply::Result::Sent(_))) && r.id == 8,
        "{r:?}"
    );
    drop(tx);
    assert!(
        replies.message().await.unwrap().is_none(),
        "ends with the requests"
    );
}
