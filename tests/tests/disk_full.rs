//! A real full disk (not the fault seam): the region's data on a small tmpfs of the test's own,
//! filled until free space is below `[storage] min_free_mib`. Leaders then refuse writes with a
//! clear error instead of letting RocksDB meet ENOSPC; nothing acknowledged is lost; once space
//! returns, writes succeed again without a restart. Needs root (mount); skipped otherwise.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use meridian_api::pb::*;
use meridian_region_node::storage::free_bytes;
use meridian_tests::{cmq_code, Region};

/// A tmpfs mounted for the test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(size_mib: u64) -> Option<Tmpfs> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("meridian-tmpfs-")
            .tempdir()
            .unwrap()
            .keep();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Tmpfs(dir))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// `Ok(true)` acknowledged, `Ok(false)` no answer within 5 s (outcome unknown), `Err` refused.
async fn send(region: &Region, body: &str) -> Result<bool, tonic::Status> {
    let mut c = region.client(1).await;
    let call = c.send_message(SendMessageRequest {
        queue_name: "ledger".into(),
        msg_body: body.as_bytes().to_vec(),
        delay_seconds: 0,
    });
    match tokio::time::timeout(Duration::from_secs(5), call).await {
        Ok(r) => r.map(|_| true),
        Err(_) => Ok(false),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_refuses_writes_clearly_then_resumes() {
    let Some(fs) = Tmpfs::mount(512) else {
        eprintln!("skipped: needs root to mount a tmpfs");
        return;
    };
    let mut region = Region::start_in(3, 1, |c| c.storage.min_free_mib = 128, None, &fs.0).await;
    let mut c = region.client(1).await;
    c.create_queue(CreateQueueRequest {
        queue_name: "ledger".into(),
        attributes: None,
    })
    .await
    .unwrap();
    let mut acked = BTreeSet::new();
    for n in 0..100 {
        let body = format!("before-{n}");
        assert!(
            send(&region, &body).await.unwrap(),
            "no ack with room on the disk"
        );
        acked.insert(body);
    }

    // Fill the file system (shared by all three nodes) to 64 MiB free: below the reserve.
    let filler = fs.0.join("filler");
    let free = free_bytes(&fs.0).expect("statvfs of the tmpfs");
    let fill = free.saturating_sub(64 << 20);
    std::fs::write(&filler, vec![0u8; fill as usize]).unwrap();
    let mut refused = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    for n in 0.. {
        if tokio::time::Instant::now() > deadline {
            break;
        }
        let body = format!("during-{n}");
        match send(&region, &body).await {
            // A send already queued when space ran out waits, unacknowledged.
            Ok(true) => {
                acked.insert(body);
            }
            Ok(false) => {}
            Err(s) => {
                refused = Some(s);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = refused.expect("writes were never refused on a full disk");
    assert_eq!(cmq_code(&refused), 6000, "{refused:?}");
    assert!(
        refused.message().contains("free space") && refused.message().contains("min_free_mib"),
        "unclear error: {}",
        refused.message()
    );
    // Still refused a moment later: the node waits, it does not crash or fill the disk.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        send(&region, "still-full").await.is_err(),
        "accepted on a full disk"
    );

    // Space returns: writes succeed again, no restart.
    std::fs::remove_file(&filler).unwrap();
    let mut resumed = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    for n in 0.. {
        if tokio::time::Instant::now() > deadline {
            break;
        }
        let body = format!("after-{n}");
        if let Ok(true) = send(&region, &body).await {
            acked.insert(body);
            resumed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(resumed, "writes did not resume after space returned");
    for n in 0..50 {
        let body = format!("later-{n}");
        assert!(
            send(&region, &body).await.unwrap(),
            "no ack after space returned"
        );
        acked.insert(body);
    }

    let (delivered, _) = region.drain("ledger", 0).await;
    let bodies: BTreeSet<String> = delivered.into_values().map(|(_, b)| b).collect();
    let missing: Vec<&String> = acked.difference(&bodies).collect();
    assert!(missing.is_empty(), "acknowledged and lost: {missing:?}");
    // Every node is still running (none stopped on the full disk).
    for n in &mut region.nodes {
        let exited = n.child.as_mut().unwrap().try_wait().unwrap();
        assert!(exited.is_none(), "node {} exited: {exited:?}", n.id);
    }
    drop(region);
}
