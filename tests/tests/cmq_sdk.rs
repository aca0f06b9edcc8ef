//! Tencent's official CMQ Python SDK, installed from PyPI into a virtualenv during the test run,
//! drives a real 3-node region over the CMQ HTTP API (tests/python/cmq_sdk_compat.py).

use std::path::Path;
use std::process::Command;

use meridian_api::pb::credential_service_client::CredentialServiceClient;
use meridian_api::pb::{
    CreateCredentialRequest, CreateQueueRequest, CredentialInfo, QueueAttributes,
};
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

/// A virtualenv with the official SDK installed from PyPI.
fn sdk_venv() -> tempfile::TempDir {
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
    venv
}

/// A new SecretId/SecretKey pair for tenant `app_id`.
async fn credential(region: &Region, app_id: u64) -> CredentialInfo {
    CredentialServiceClient::new(region.channel(1).await.unwrap())
        .create_credential(CreateCredentialRequest { app_id })
        .await
        .unwrap()
        .into_inner()
}

/// Runs `tests/python/<script>` with the venv's Python from a scratch directory (the SDK writes
/// its log file into the working directory); it must print `OK …`.
fn run_script(venv: &tempfile::TempDir, script: &str, args: &[&str]) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(script);
    let scratch = tempfile::tempdir().unwrap();
    let out = run(
        Command::new(venv.path().join("bin/python"))
            .arg(&path)
            .args(args)
            .current_dir(scratch.path()),
        script,
    );
    assert!(out.contains("OK "), "{out}");
    eprintln!("{}", out.trim());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_python_sdk_drives_the_queue_api() {
    let venv = sdk_venv();

    let region = Region::start(3, 2).await;
    let main = credential(&region, 0).await;
    let other = credential(&region, 7).await;

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

    let host = format!("http://{}", region.http_addr(3));
    run_script(
        &venv,
        "cmq_sdk_compat.py",
        &[
            &host,
            &main.secret_id,
            &main.secret_key,
            &other.secret_id,
            &other.secret_key,
        ],
    );
}

/// The topic surface through the official SDK: fan-out by tags and routing keys, HTTP push in
/// both formats with retries (tests/python/cmq_topic_compat.py).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_python_sdk_drives_the_topic_api() {
    let venv = sdk_venv();
    let region = Region::start(3, 3).await;
    let main = credential(&region, 0).await;
    let host = format!("http://{}", region.http_addr(2));
    run_script(
        &venv,
        "cmq_topic_compat.py",
        &[&host, &main.secret_id, &main.secret_key],
    );
}

const HTTPS_SCRIPT: &str = r#"
import sys
from cmq.account import Account
from cmq.queue import Message, QueueMeta
acct = Account(sys.argv[1], sys.argv[2], sys.argv[3])
q = acct.get_queue("tls-q")
q.create(QueueMeta())
q.send_message(Message("over https"))
m = q.receive_message(5)
assert m.msgBody == "over https", m.msgBody
q.delete_message(m.receiptHandle)
print("HTTPS OK")
"#;

/// `meridian dev --tls` serves the CMQ API over HTTPS with a generated CA; the SDK works when
/// it trusts that CA and refuses the connection when it does not.
#[test]
fn official_python_sdk_over_https_with_dev_tls() {
    use std::io::{BufRead, BufReader};
    let venv = sdk_venv();
    let dir = tempfile::tempdir().unwrap();
    let base = 20_000 + (rand::random::<u16>() % 30_000);
    let mut dev = Command::new(meridian_tests::meridian_bin())
        .args(["dev", "--tls", "--data-dir"])
        .arg(dir.path().join("region"))
        .args(["--base-port", &base.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(dev.stdout.take().unwrap()).lines();
    let ready = loop {
        let line = lines.next().expect("dev exited before ready").unwrap();
        if line.starts_with("ready ") {
            break line;
        }
    };
    let field = |k: &str| {
        ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")).map(str::to_string))
            .unwrap_or_else(|| panic!("no {k}= in {ready}"))
    };
    let (http, id, key, ca) = (
        field("http"),
        field("secret_id"),
        field("secret_key"),
        field("ca"),
    );
    assert!(http.starts_with("https://"), "{ready}");
    let scratch = tempfile::tempdir().unwrap();
    let python = venv.path().join("bin/python");
    let trusted = Command::new(&python)
        .args(["-c", HTTPS_SCRIPT, &http, &id, &key])
        .env("SSL_CERT_FILE", &ca)
        .current_dir(scratch.path())
        .output()
        .unwrap();
    let untrusted = Command::new(&python)
        .args(["-c", HTTPS_SCRIPT, &http, &id, &key])
        .env_remove("SSL_CERT_FILE")
        .current_dir(scratch.path())
        .output()
        .unwrap();
    // SAFETY: kill(2) on the child we spawned.
    unsafe { libc::kill(dev.id() as i32, libc::SIGTERM) };
    let _ = dev.wait();
    assert!(
        trusted.status.success() && String::from_utf8_lossy(&trusted.stdout).contains("HTTPS OK"),
        "{trusted:?}"
    );
    assert!(
        !untrusted.status.success(),
        "a client that does not trust the dev CA must fail"
    );
}
