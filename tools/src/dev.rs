//! `meridian dev`: a local 3-node region as child processes, with generated configs that
//! `meridian node --config <data-dir>/node<id>/node.toml` can restart.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use meridian_api::pb::cluster_service_client::ClusterServiceClient;
use meridian_api::pb::queue_service_client::QueueServiceClient;
use meridian_api::pb::{Empty, ListQueueRequest};
use meridian_region_node::config::{MemberConfig, NodeConfig, RaftConfig};
use rand::RngCore;
use tokio::process::{Child, Command};

pub const DEFAULT_BASE_PORT: u16 = 7100;
const NODE_IDS: [u64; 3] = [1, 2, 3];

#[derive(Args)]
pub struct DevArgs {
    /// Directory for the nodes' data and configs; default: a fresh temporary directory.
    /// An existing directory with configs is reused (its region restarts with its data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Node <id> serves gRPC on base-port + id.
    #[arg(long, default_value_t = DEFAULT_BASE_PORT)]
    base_port: u16,
    /// Number of data groups (besides the metadata group).
    #[arg(long, default_value_t = 3)]
    data_groups: u32,
    /// Give up if the region is not ready within this many seconds.
    #[arg(long, default_value_t = 60)]
    ready_timeout: u64,
}

fn config_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("node{id}")).join("node.toml")
}

fn write_configs(dir: &Path, args: &DevArgs) -> anyhow::Result<()> {
    let mut secret = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut secret);
    let members: Vec<MemberConfig> = NODE_IDS
        .iter()
        .map(|&id| MemberConfig {
            id,
            addr: format!("127.0.0.1:{}", args.base_port + id as u16),
        })
        .collect();
    for &id in &NODE_IDS {
        let cfg = NodeConfig {
            node_id: id,
            data_dir: dir.join(format!("node{id}")).join("data"),
            grpc_listen: format!("127.0.0.1:{}", args.base_port + id as u16).parse()?,
            data_groups: args.data_groups,
            cluster_secret: hex_encode(&secret),
            bootstrap: id == 1,
            members: members.clone(),
            raft: RaftConfig::default(),
        };
        let path = config_path(dir, id);
        std::fs::create_dir_all(path.parent().expect("has parent"))?;
        std::fs::write(&path, cfg.to_toml())
            .with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn spawn_node(dir: &Path, id: u64) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("locate the meridian binary")?;
    let log_path = dir.join(format!("node{id}")).join("node.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)?;
    let child = Command::new(exe)
        .arg("node")
        .arg("--config")
        .arg(config_path(dir, id))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start node {id}"))?;
    Ok(child)
}

async fn wait_ready(endpoint: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if tokio::time::Instant::now() > deadline {
            bail!("region not ready after {timeout:?}; see node*/node.log in the data directory");
        }
        if let Ok(ch) = tonic::transport::Endpoint::from_shared(endpoint.to_string())?
            .connect()
            .await
        {
            let status = ClusterServiceClient::new(ch.clone())
                .cluster_status(Empty {})
                .await;
            let all_led = status
                .map(|s| s.into_inner().groups.iter().all(|g| g.leader != 0))
                .unwrap_or(false);
            // Listing queues runs a linearizable read on every data group's leader.
            if all_led
                && QueueServiceClient::new(ch)
                    .list_queue(ListQueueRequest {
                        search_word: String::new(),
                        offset: 0,
                        limit: None,
                    })
                    .await
                    .is_ok()
            {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let dir = match &args.data_dir {
        Some(d) => d.clone(),
        None => tempfile::Builder::new()
            .prefix("meridian-dev-")
            .tempdir()?
            .keep(),
    };
    std::fs::create_dir_all(&dir)?;
    if !config_path(&dir, 1).exists() {
        write_configs(&dir, &args)?;
    }
    println!("data-dir {}", dir.display());
    let mut children = Vec::new();
    let mut grpc = Vec::new();
    for &id in &NODE_IDS {
        let cfg = NodeConfig::load(&config_path(&dir, id))?;
        let child = spawn_node(&dir, id)?;
        println!(
            "node {id} pid={} grpc={}",
            child.id().unwrap_or(0),
            cfg.grpc_listen
        );
        grpc.push(format!("http://{}", cfg.grpc_listen));
        children.push((id, Some(child)));
    }
    wait_ready(&grpc[0], Duration::from_secs(args.ready_timeout)).await?;
    let _ = std::fs::write(crate::client::dev_endpoint_file(), &grpc[0]);
    println!("ready grpc={} data-dir={}", grpc[0], dir.display());

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut poll = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = poll.tick() => {
                for (id, slot) in children.iter_mut() {
                    if let Some(child) = slot {
                        if let Ok(Some(status)) = child.try_wait() {
                            println!("node {id} exited: {status} (restart it with: meridian node --config {})",
                                config_path(&dir, *id).display());
                            *slot = None;
                        }
                    }
                }
            }
        }
    }
    for (id, slot) in children.iter_mut() {
        if let Some(child) = slot {
            if let Some(pid) = child.id() {
                // SAFETY: plain kill(2) on our own child's pid.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
            println!("node {id} stopped");
        }
    }
    let _ = std::fs::remove_file(crate::client::dev_endpoint_file());
    Ok(())
}
