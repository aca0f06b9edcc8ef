//! `meridian dev`: a local 3-node region as child processes, with generated configs that
//! `meridian node --config <data-dir>/node<id>/node.toml` can restart.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use meridian_api::pb::cluster_service_client::ClusterServiceClient;
use meridian_api::pb::credential_service_client::CredentialServiceClient;
use meridian_api::pb::queue_service_client::QueueServiceClient;
use meridian_api::pb::{CreateCredentialRequest, Empty, ListQueueRequest};
use meridian_region_node::config::{
    HttpConfig, MemberConfig, NodeConfig, RaftConfig, MAX_WORKER_THREADS,
};
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
    /// Node <id> serves gRPC on base-port + id and the CMQ HTTP API on base-port + 10 + id;
    /// 0 picks a base whose ports are free now.
    #[arg(long, default_value_t = DEFAULT_BASE_PORT)]
    base_port: u16,
    /// Number of data groups (besides the metadata group).
    #[arg(long, default_value_t = 3)]
    data_groups: u32,
    /// Give up if the region is not ready within this many seconds.
    #[arg(long, default_value_t = 60)]
    ready_timeout: u64,
    /// Serve the CMQ HTTP API over HTTPS with a generated local CA (printed as `ca=`); applies
    /// when the data directory is new.
    #[arg(long)]
    tls: bool,
    /// Worker threads of each node's runtime (`worker_threads` in its config; 0: one per CPU
    /// core); default: a third of this machine's cores, at least one, since the three nodes
    /// share them. Applies when the data directory is new.
    #[arg(long, value_parser = threads_arg())]
    node_threads: Option<usize>,
}

/// A runtime thread count on the command line: 0 (one per core) up to what a node's config
/// accepts.
pub fn threads_arg() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(0..=MAX_WORKER_THREADS as u64)
}

/// Worker threads per node of a local region: `requested`, or else a third of this machine's
/// cores, at least one, since its three nodes share them. More threads than cores only add
/// hand-offs between them.
pub fn node_threads(requested: Option<usize>) -> usize {
    requested.unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / NODE_IDS.len()).max(1)
    })
}

fn config_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("node{id}")).join("node.toml")
}

/// Writes a local CA and a certificate for 127.0.0.1/localhost signed by it (rcgen, aws-lc-rs);
/// returns (ca, cert, key) paths.
fn write_dev_tls(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let tls = dir.join("tls");
    std::fs::create_dir_all(&tls)?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "Meridian dev CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let mut leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
    leaf.distinguished_name
        .push(DnType::CommonName, "meridian dev node");
    let leaf_key = KeyPair::generate()?;
    let leaf_cert = leaf.signed_by(&leaf_key, &ca_cert, &ca_key)?;
    let paths = (
        tls.join("ca.pem"),
        tls.join("node.crt"),
        tls.join("node.key"),
    );
    std::fs::write(&paths.0, ca_cert.pem())?;
    std::fs::write(&paths.1, leaf_cert.pem())?;
    std::fs::write(&paths.2, leaf_key.serialize_pem())?;
    Ok(paths)
}

fn write_configs(
    dir: &Path,
    base_port: u16,
    data_groups: u32,
    tls: bool,
    node_threads: usize,
) -> anyhow::Result<()> {
    let tls_files = if tls { Some(write_dev_tls(dir)?) } else { None };
    let mut secret = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut secret);
    let members: Vec<MemberConfig> = NODE_IDS
        .iter()
        .map(|&id| MemberConfig {
            id,
            addr: format!("127.0.0.1:{}", base_port + id as u16),
        })
        .collect();
    for &id in &NODE_IDS {
        let cfg = NodeConfig {
            node_id: id,
            data_dir: dir.join(format!("node{id}")).join("data"),
            grpc_listen: format!("127.0.0.1:{}", base_port + id as u16).parse()?,
            data_groups,
            cluster_secret: hex_encode(&secret),
            bootstrap: id == 1,
            worker_threads: node_threads,
            members: members.clone(),
            raft: RaftConfig::default(),
            http: HttpConfig {
                listen: Some(format!("127.0.0.1:{}", base_port + 10 + id as u16).parse()?),
                tls_cert: tls_files.as_ref().map(|t| t.1.clone()),
                tls_key: tls_files.as_ref().map(|t| t.2.clone()),
                ..Default::default()
            },
            topics: Default::default(),
            storage: Default::default(),
            faults: Default::default(),
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

/// Three child node processes with configs under `dir`.
pub struct LocalRegion {
    pub dir: PathBuf,
    children: Vec<(u64, Option<Child>)>,
    /// gRPC endpoints by node, `http://127.0.0.1:<port>`.
    pub grpc: Vec<String>,
    /// CMQ HTTP API endpoints by node.
    pub http: Vec<String>,
}

impl LocalRegion {
    /// Writes configs (unless `dir` has them) and starts the three nodes, each with
    /// `node_threads` runtime threads (0: one per core).
    pub fn launch(
        dir: &Path,
        base_port: u16,
        data_groups: u32,
        tls: bool,
        node_threads: usize,
        announce: bool,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        if !config_path(dir, 1).exists() {
            write_configs(dir, base_port, data_groups, tls, node_threads)?;
        }
        let mut children = Vec::new();
        let mut grpc = Vec::new();
        let mut http = Vec::new();
        for &id in &NODE_IDS {
            let cfg = NodeConfig::load(&config_path(dir, id))?;
            let child = spawn_node(dir, id)?;
            if announce {
                println!(
                    "node {id} pid={} grpc={}",
                    child.id().unwrap_or(0),
                    cfg.grpc_listen
                );
            }
            grpc.push(format!("http://{}", cfg.grpc_listen));
            if let Some(h) = cfg.http.listen {
                let scheme = if cfg.http.tls_cert.is_some() {
                    "https"
                } else {
                    "http"
                };
                http.push(format!("{scheme}://{h}"));
            }
            children.push((id, Some(child)));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            children,
            grpc,
            http,
        })
    }

    /// Process ids of the nodes still running.
    pub fn pids(&self) -> Vec<u32> {
        self.children
            .iter()
            .filter_map(|(_, c)| c.as_ref()?.id())
            .collect()
    }

    /// The region's credential for app id 0 (the gRPC tenant), created on first use and kept
    /// in the data directory so a restarted dev region prints the same one.
    pub async fn dev_credential(&self) -> anyhow::Result<(String, String)> {
        let path = self.dir.join("dev-credential");
        if let Ok(text) = std::fs::read_to_string(&path) {
            if let Some((id, key)) = text.trim().split_once(' ') {
                return Ok((id.to_string(), key.to_string()));
            }
        }
        let ch = tonic::transport::Endpoint::from_shared(self.grpc[0].clone())?
            .connect()
            .await?;
        let r = CredentialServiceClient::new(ch)
            .create_credential(CreateCredentialRequest { app_id: 0 })
            .await
            .map_err(|s| anyhow::anyhow!("create the dev credential: {}", s.message()))?
            .into_inner();
        std::fs::write(&path, format!("{} {}", r.secret_id, r.secret_key))?;
        Ok((r.secret_id, r.secret_key))
    }

    /// Waits until the region serves, or fails as soon as a node exits meanwhile (a port in
    /// use, a bad config), with the end of that node's log.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let endpoint = self.grpc[0].clone();
        let ready = wait_ready(&endpoint, timeout);
        tokio::pin!(ready);
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                r = &mut ready => return r,
                _ = tick.tick() => self.fail_on_exited_child()?,
            }
        }
    }

    fn fail_on_exited_child(&mut self) -> anyhow::Result<()> {
        if let Some((id, status)) = self.exited().into_iter().next() {
            let log_path = self.dir.join(format!("node{id}")).join("node.log");
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(20)..].join("\n");
            bail!(
                "node {id} exited while the region started ({status}); the end of {}:\n{tail}",
                log_path.display()
            );
        }
        Ok(())
    }

    /// Children that exited since the last call (their slots are cleared).
    fn exited(&mut self) -> Vec<(u64, std::process::ExitStatus)> {
        let mut out = Vec::new();
        for (id, slot) in self.children.iter_mut() {
            if let Some(Ok(Some(status))) = slot.as_mut().map(|c| c.try_wait()) {
                *slot = None;
                out.push((*id, status));
            }
        }
        out
    }

    /// Reports children that exited since the last call.
    fn reap(&mut self) {
        for (id, status) in self.exited() {
            println!(
                "node {id} exited: {status} (restart it with: meridian node --config {})",
                config_path(&self.dir, id).display()
            );
        }
    }

    /// SIGTERM to every child, SIGKILL after 10 s.
    pub async fn stop(&mut self, announce: bool) {
        for (id, slot) in self.children.iter_mut() {
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
                if announce {
                    println!("node {id} stopped");
                }
            }
            *slot = None;
        }
    }
}

/// A base port such that base+1..=base+3 are free on loopback right now.
pub fn free_base_port() -> u16 {
    for _ in 0..100 {
        let base = 20_000 + (rand::random::<u16>() % 30_000);
        let free = (1..=3)
            .chain(11..=13)
            .all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok());
        if free {
            return base;
        }
    }
    DEFAULT_BASE_PORT
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let dir = match &args.data_dir {
        Some(d) => d.clone(),
        None => tempfile::Builder::new()
            .prefix("meridian-dev-")
            .tempdir()?
            .keep(),
    };
    println!("data-dir {}", dir.display());
    let base_port = match args.base_port {
        0 => free_base_port(),
        p => p,
    };
    let mut region = LocalRegion::launch(
        &dir,
        base_port,
        args.data_groups,
        args.tls,
        node_threads(args.node_threads),
        true,
    )?;
    if let Err(e) = region
        .wait_ready(Duration::from_secs(args.ready_timeout))
        .await
    {
        region.stop(true).await;
        return Err(e);
    }
    let (secret_id, secret_key) = match region.dev_credential().await {
        Ok(c) => c,
        Err(e) => {
            region.stop(true).await;
            return Err(e);
        }
    };
    let _ = std::fs::write(crate::client::dev_endpoint_file(), &region.grpc[0]);
    let ca = dir.join("tls").join("ca.pem");
    let ca = if region.http[0].starts_with("https") {
        format!(" ca={}", ca.display())
    } else {
        String::new()
    };
    println!(
        "ready grpc={} http={} secret_id={} secret_key={}{} data-dir={}",
        region.grpc[0],
        region.http[0],
        secret_id,
        secret_key,
        ca,
        dir.display()
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut poll = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = poll.tick() => region.reap(),
        }
    }
    region.stop(true).await;
    let _ = std::fs::remove_file(crate::client::dev_endpoint_file());
    Ok(())
}
