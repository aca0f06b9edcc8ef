//! The CMQ HTTP API under malformed and hostile input: every request gets HTTP 200 with a CMQ
//! error code and the keep-alive connection stays usable; replays and clock skew are refused.

use meridian_api::pb::credential_service_client::CredentialServiceClient;
use meridian_api::pb::CreateCredentialRequest;
use meridian_tests::{signed_form, RawHttp, Region};

fn code(body: &str) -> i64 {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert!(v["requestId"].is_string(), "{body}");
    assert!(v["message"].is_string(), "{body}");
    v["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("code is not an integer: {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_cmq_errors_on_a_live_connection() {
    let region = Region::start(3, 1).await;
    let mut creds = CredentialServiceClient::new(region.channel(1).await.unwrap());
    let cred = creds
        .create_credential(CreateCredentialRequest { app_id: 0 })
        .await
        .unwrap()
        .into_inner();
    let (id, key) = (cred.secret_id.as_str(), cred.secret_key.as_str());
    let addr = region.http_addr(2);
    let mut http = RawHttp::connect(&addr);
    let host = addr.clone();
    let form = |params: &[(&str, &str)], method: &str, path: &str| {
        signed_form(params, id, key, method, &host, path)
    };

    // A valid request first, on any path, with a lower-case action name.
    let ok = form(
        &[("Action", "createqueue"), ("queueName", "http-q")],
        "POST",
        "/any/path",
    );
    let (status, body) = http.request("POST", "/any/path", ok.as_bytes());
    assert_eq!((status, code(&body)), (200, 0), "{body}");

    let cases: Vec<(&str, Vec<u8>, i64)> = vec![
        (
            "missing Action",
            form(&[("queueName", "x")], "POST", "/").into_bytes(),
            4000,
        ),
        (
            "unknown action",
            form(&[("Action", "Nope")], "POST", "/").into_bytes(),
            4000,
        ),
        (
            "topic with an undefined filterType",
            form(
                &[
                    ("Action", "CreateTopic"),
                    ("topicName", "t"),
                    ("filterType", "3"),
                ],
                "POST",
                "/",
            )
            .into_bytes(),
            4000,
        ),
        (
            "bad percent-encoding",
            b"Action=SendMessage&msgBody=%zz".to_vec(),
            4000,
        ),
        (
            "non-UTF-8",
            b"Action=SendMessage&msgBody=%ff%fe".to_vec(),
            4000,
        ),
        ("raw non-UTF-8 bytes", b"Action=\xff\xfe".to_vec(), 4000),
        ("empty body", Vec::new(), 4000),
        ("garbage", b"&&&===&&".to_vec(), 4000),
        (
            "no signature",
            b"Action=ListQueue&SecretId=AKIDx&Timestamp=1&Nonce=1".to_vec(),
            4100,
        ),
        (
            "gap in array",
            form(
                &[
                    ("Action", "BatchSendMessage"),
                    ("queueName", "http-q"),
                    ("msgBody.1", "a"),
                    ("msgBody.3", "c"),
                ],
                "POST",
                "/",
            )
            .into_bytes(),
            4000,
        ),
        (
            "array starting at 2",
            form(
                &[
                    ("Action", "BatchDeleteMessage"),
                    ("queueName", "http-q"),
                    ("receiptHandle.2", "a"),
                ],
                "POST",
                "/",
            )
            .into_bytes(),
            4000,
        ),
        (
            "non-numeric delay",
            form(
                &[
                    ("Action", "SendMessage"),
                    ("queueName", "http-q"),
                    ("msgBody", "a"),
                    ("delaySeconds", "soon"),
                ],
                "POST",
                "/",
            )
            .into_bytes(),
            4000,
        ),
        (
            "empty message",
            form(
                &[
                    ("Action", "SendMessage"),
                    ("queueName", "http-q"),
                    ("msgBody", ""),
                ],
                "POST",
                "/",
            )
            .into_bytes(),
            4000,
        ),
        (
            "missing queue",
            form(
                &[
                    ("Action", "SendMessage"),
                    ("queueName", "nope"),
                    ("msgBody", "a"),
                ],
                "POST",
                "/",
            )
            .into_bytes(),
            4440,
        ),
        (
            "bad handle",
            form(
                &[
                    ("Action", "DeleteMessage"),
                    ("queueName", "http-q"),
                    ("receiptHandle", "1:2:3:zz"),
                ],
                "POST",
                "/",
            )
            .into_bytes(),
            4430,
        ),
        (
            "wrong path in signature",
            signed_form(
                &[("Action", "ListQueue")],
                id,
                key,
                "POST",
                &host,
                "/v2/index.php",
            )
            .into_bytes(),
            4100,
        ),
        (
            "stale timestamp",
            form(
                &[("Action", "ListQueue"), ("Timestamp", "1000")],
                "POST",
                "/",
            )
            .into_bytes(),
            4100,
        ),
    ];
    for (what, body, want) in cases {
        let (status, reply) = http.request("POST", "/", &body);
        assert_eq!(status, 200, "{what}");
        assert_eq!(code(&reply), want, "{what}: {reply}");
    }

    // The Go TDMQ SDK's clientRequestId comes back as a JSON number.
    let with_id = form(
        &[("Action", "ListQueue"), ("clientRequestId", "1231231231")],
        "POST",
        "/",
    );
    let (_, reply) = http.request("POST", "/", with_id.as_bytes());
    let v: serde_json::Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(
        v["clientRequestId"],
        serde_json::json!(1231231231u64),
        "{reply}"
    );

    // Unsupported method, still a CMQ reply.
    let (status, reply) = http.request("PUT", "/", b"");
    assert_eq!((status, code(&reply)), (200, 4000), "{reply}");

    // GET carries the form in the query string.
    let q = form(&[("Action", "ListQueue")], "GET", "/v2/index.php");
    let (_, reply) = http.request("GET", &format!("/v2/index.php?{q}"), b"");
    assert_eq!(code(&reply), 0, "{reply}");
    let v: serde_json::Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(v["totalCount"], 1);

    // A replayed request (same nonce) is refused, by the node that saw it and by any other.
    let once = form(&[("Action", "ListQueue"), ("Nonce", "424242")], "POST", "/");
    assert_eq!(code(&http.request("POST", "/", once.as_bytes()).1), 0);
    assert_eq!(code(&http.request("POST", "/", once.as_bytes()).1), 4100);
    let twice = form(&[("Action", "ListQueue"), ("Nonce", "434343")], "POST", "/");
    assert_eq!(code(&http.request("POST", "/", twice.as_bytes()).1), 0);
    let mut elsewhere = RawHttp::connect_as(&region.http_addr(3), &addr);
    let (_, reply) = elsewhere.request("POST", "/", twice.as_bytes());
    assert_eq!(code(&reply), 4100, "replay to another node: {reply}");

    // A replayed send is refused by every node and leaves exactly one message.
    let active = |http: &mut RawHttp| {
        let q = form(
            &[("Action", "GetQueueAttributes"), ("queueName", "http-q")],
            "POST",
            "/",
        );
        let (_, reply) = http.request("POST", "/", q.as_bytes());
        let v: serde_json::Value = serde_json::from_str(&reply).unwrap();
        v["activeMsgNum"].as_u64().unwrap()
    };
    let before = active(&mut http);
    let send = form(
        &[
            ("Action", "SendMessage"),
            ("queueName", "http-q"),
            ("msgBody", "exactly-once"),
            ("Nonce", "454545"),
        ],
        "POST",
        "/",
    );
    assert_eq!(code(&http.request("POST", "/", send.as_bytes()).1), 0);
    for node in 1..=3 {
        let mut c = RawHttp::connect_as(&region.http_addr(node), &addr);
        let (_, reply) = c.request("POST", "/", send.as_bytes());
        assert_eq!(code(&reply), 4100, "send replayed to node {node}: {reply}");
    }
    assert_eq!(
        active(&mut http),
        before + 1,
        "a replayed send added a message"
    );

    // Over 1 MiB: a CMQ error (the server may then close this connection).
    let huge = vec![b'a'; (1 << 20) + 100];
    let mut big = RawHttp::connect(&addr);
    let (status, reply) = big.request("POST", "/", &huge);
    assert_eq!((status, code(&reply)), (200, 4000), "{reply}");

    // The first connection still works after all of the above.
    let ok = form(
        &[("Action", "GetQueueAttributes"), ("queueName", "http-q")],
        "POST",
        "/",
    );
    let (_, reply) = http.request("POST", "/", ok.as_bytes());
    assert_eq!(code(&reply), 0, "{reply}");
    let v: serde_json::Value = serde_json::from_str(&reply).unwrap();
    for field in [
        "maxMsgHeapNum",
        "pollingWaitSeconds",
        "visibilityTimeout",
        "maxMsgSize",
        "msgRetentionSeconds",
        "createTime",
        "lastModifyTime",
        "activeMsgNum",
        "inactiveMsgNum",
        "rewindMsgNum",
        "rewindmsgNum",
        "minMsgTime",
        "delayMsgNum",
        "rewindSeconds",
    ] {
        assert!(
            v[field].is_i64() || v[field].is_u64(),
            "{field} must be an integer: {reply}"
        );
    }
}
