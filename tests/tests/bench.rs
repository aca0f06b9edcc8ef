//! `meridian bench` end to end: it starts its own local region, runs short workloads and prints
//! one JSON object per workload. Nothing here asserts speed (the machine is shared); it asserts
//! that every workload completed operations without errors and reported what it promises.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use meridian_tests::meridian_bin;

/// Runs `meridian bench --json` with `args` against its own region, within a bounded wait, and
/// returns its JSON objects and the data directory (the local region's is `region` in it).
fn bench(args: &[&str]) -> (Vec<serde_json::Value>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(meridian_bin())
        .arg("bench")
        .args([
            "--warmup-s",
            "1",
            "--duration-s",
            "2",
            "--json",
            "--data-dir",
        ])
        .arg(dir.path())
        .args(args)
        .env_remove("MERIDIAN_ENDPOINT")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(240);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("bench {args:?} still running after 240 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench {args:?} failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let objects = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    (objects, dir)
}

/// The `worker_threads` of every node config of the local region bench started in `dir`.
fn node_worker_threads(dir: &tempfile::TempDir) -> Vec<u64> {
    (1..=3)
        .map(|id| {
            let path = dir.path().join(format!("region/node{id}/node.toml"));
            let cfg = meridian_region_node::NodeConfig::load(&path).unwrap();
            cfg.worker_threads as u64
        })
        .collect()
}

fn check(v: &serde_json::Value, workload: &str) {
    assert_eq!(v["workload"], workload, "{v}");
    assert!(v["completed"].as_u64().unwrap() > 0, "{v}");
    assert!(v["msgs_per_s"].as_f64().unwrap() > 0.0, "{v}");
    assert_eq!(v["errors"], 0, "{v}");
    let (p50, p99) = (v["p50_ms"].as_f64().unwrap(), v["p99_ms"].as_f64().unwrap());
    assert!(0.0 < p50 && p50 <= p99, "{v}");
    // The disk's fsync rate is measured beside every result, and the local region's costs.
    assert!(v["disk_fsync_per_s"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["disk_append_fsync_per_s"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["disk_append_fsync_p50_ms"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["region_cpu_us_per_msg"].as_f64().unwrap() > 0.0, "{v}");
}

#[test]
fn bench_runs_every_peerbench_workload_over_the_message_stream() {
    let (out, dir) = bench(&["--workload", "W1,W2,W3", "--protocol", "grpc-stream"]);
    assert_eq!(out.len(), 3, "{out:?}");
    // By default the nodes share the cores (a third each, at least one) and the client runs
    // peerbench's two threads.
    let cores = std::thread::available_parallelism().unwrap().get() as u64;
    let shared = (cores / 3).max(1);
    assert_eq!(node_worker_threads(&dir), vec![shared; 3]);
    for (v, w) in out.iter().zip(["W1", "W2", "W3"]) {
        check(v, w);
        assert_eq!(v["protocol"], "grpc-stream", "{v}");
        assert_eq!(v["node_threads"], shared, "{v}");
        assert_eq!(v["client_threads"], 2, "{v}");
    }
}

/// Serial consumers (each batch's deletes acknowledged before the next receive) over the CMQ
/// HTTP API, signed like Tencent's SDKs.
#[test]
fn bench_runs_serial_w2_consumers_over_the_cmq_http_api() {
    let (out, dir) = bench(&[
        "--workload",
        "W2",
        "--protocol",
        "http",
        "--w2-serial",
        "--node-threads",
        "0",
        "--client-threads",
        "1",
    ]);
    assert_eq!(out.len(), 1, "{out:?}");
    check(&out[0], "W2");
    assert_eq!(out[0]["protocol"], "http", "{out:?}");
    // 0: each node runs one thread per core, as a node alone on its machine would.
    assert_eq!(node_worker_threads(&dir), vec![0; 3]);
    assert_eq!(out[0]["node_threads"], 0, "{out:?}");
    assert_eq!(out[0]["client_threads"], 1, "{out:?}");
    // Over HTTP too, each queue's traffic goes to its group leader's node in a local region.
    assert_eq!(out[0]["to_leader"], true, "{out:?}");
}
