//! Tencent's official CMQ Python SDK, installed from PyPI into a virtualenv during the test run,
//! drives a real 3-node region over the CMQ HTTP API (tests/python/cmq_sdk_compat.py).

use std::path::Path;
use std::process::Command;

use meridian_api::pb::credential_service_client::CredentialServiceClient;
use meridian_api::pb::{CreateCredentialRequest, CreateQueueRequest, QueueAttributes};
use meridian_tests::Region;

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_python_sdk_drives_the_queue_api() {
    let venv = tempfile::tempdir().unwrap();
    run(
        Command::new("python3")
            .args(["-m", "venv"])
            .arg(venv.path()),
        "create virtualenv",
    );
    let pip = venv.path().join("bin/pip");
    run(
        Command::new(&pip).args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "qcloud-cmq-sdk-py3==0.1",
        ]),
        "pip install qcloud-cmq-sdk-py3",
    );

    let region = Region::start(3, 2).await;
    let mut creds = CredentialServiceClient::new(region.channel(1).await.unwrap());
    let main = creds
        .create_credential(CreateCredentialRequest { app_id: 0 })
        .await
        .unwrap()
        .into_inner();
    let other = creds
        .create_credential(CreateCredentialRequest { app_id: 7 })
        .await
        .unwrap()
        .into_inner();

    // The SDK cannot set a dead-letter policy; set it up over gRPC (tenant of app id 0).
    let mut c = region.client(2).await;
    c.create_queue(CreateQueueRequest {
        queue_name: "dlq-dst".into(),
        attributes: None,
    })
    .await
    .unwrap();
    c.create_queue(CreateQueueRequest {
        queue_name: "dlq-src".into(),
        attributes: Some(QueueAttributes {
            visibility_timeout: Some(1),
            dead_letter_policy: Some(
                r#"{"deadLetterQueue":"dlq-dst","policy":0,"maxReceiveCount":1}"#.into(),
            ),
            ..Default::default()
        }),
    })
    .await
    .unwrap();

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/cmq_sdk_compat.py");
    let scratch = tempfile::tempdir().unwrap();
    let host = format!("http://{}", region.http_addr(3));
    let out = run(
        Command::new(venv.path().join("bin/python"))
            .arg(&script)
            .args([
                &host,
                &main.secret_id,
                &main.secret_key,
                &other.secret_id,
                &other.secret_key,
            ])
            .current_dir(scratch.path()),
        "cmq_sdk_compat.py",
    );
    assert!(out.contains("OK "), "{out}");
    eprintln!("{}", out.trim());
}
