//! `meridian`: run a node or a local dev region, and administer and use queues and topics from the shell.

// tonic::Status is a large error type we do not control.
#![allow(clippy::result_large_err)]

mod bench;
mod client;
mod cmq_client;
mod dev;
mod topic_cli;
mod usage;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

// glibc malloc was ~17% of a node's CPU under W1 (perf: _int_malloc, malloc_consolidate, free):
// the message path allocates per message in tonic, bincode and the state machine.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "meridian",
    version,
    about = "Meridian: a replicated, CMQ-compatible message service"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
pub struct Endpoint {
    /// gRPC endpoint of any node of the region, e.g. http://127.0.0.1:7101.
    /// Defaults to $MERIDIAN_ENDPOINT, else the local dev region started by `meridian dev`.
    #[arg(long, env = "MERIDIAN_ENDPOINT", global = true)]
    pub endpoint: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one region node from its TOML config file.
    Node {
        /// Path of the node's config (see deploy/node.example.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Start a local 3-node region (node ids 1, 2, 3) as child processes and keep it running.
    Dev(dev::DevArgs),
    /// Create, inspect, change, list, rewind and delete queues.
    Queue {
        #[command(subcommand)]
        cmd: client::QueueCmd,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Send one message; prints its message id.
    Send {
        queue: String,
        body: String,
        /// Keep the message invisible for this many seconds (0-3600).
        #[arg(long, default_value_t = 0)]
        delay: u32,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Receive messages; prints `<msgId> <body>` per message and, on stderr, the receipt handle.
    /// Exits non-zero with code 7000 on stderr when no message arrives.
    Receive {
        queue: String,
        /// Long-poll for up to this many seconds (0-30); default: the queue's pollingWaitSeconds.
        #[arg(long)]
        wait: Option<u32>,
        /// Delete each message after printing it.
        #[arg(long)]
        delete: bool,
        /// Receive up to this many messages in one batch (1-16).
        #[arg(long, default_value_t = 1)]
        count: u32,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Delete a received message by its receipt handle.
    Delete {
        queue: String,
        receipt_handle: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Create, inspect, change, list and delete topics.
    Topic {
        #[command(subcommand)]
        cmd: topic_cli::TopicCmd,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Subscribe queues and HTTP endpoints to topics, and manage those subscriptions.
    Subscription {
        #[command(subcommand)]
        cmd: topic_cli::SubscriptionCmd,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Publish one message to a topic; prints its message id.
    Publish {
        topic: String,
        body: String,
        /// Message tag (repeatable, at most 5; tag topics).
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// Routing key, dot-separated words (routing-key topics).
        #[arg(long, default_value = "")]
        routing_key: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Load generator: the peerbench workloads W1-W3 against a region (or a local one it starts).
    Bench(bench::BenchArgs),
    /// Create, list and revoke SecretId/SecretKey pairs for the CMQ HTTP API.
    Credential {
        #[command(subcommand)]
        cmd: client::CredentialCmd,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Region membership and, per Raft group, leader, term and applied index on every node.
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
        #[command(flatten)]
        endpoint: Endpoint,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Show members, the leader of each group and each node's applied index.
    Status,
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MERIDIAN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: node logs are mostly read as files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A node's config sizes its runtime, so it is read before the runtime starts.
    let (threads, node_config) = match &cli.cmd {
        Cmd::Node { config } => match meridian_region_node::NodeConfig::load(config) {
            Ok(c) => (c.worker_threads, Some(c)),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        },
        Cmd::Bench(args) => (args.client_threads, None),
        _ => (0, None),
    };
    let rt = match runtime(threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.cmd {
            Cmd::Node { .. } => {
                init_tracing();
                run_node(node_config.expect("loaded above")).await
            }
            Cmd::Dev(args) => dev::run(args).await,
            Cmd::Bench(args) => bench::run(args).await,
            Cmd::Queue { cmd, endpoint } => client::queue(cmd, &endpoint).await,
            Cmd::Send {
                queue,
                body,
                delay,
                endpoint,
            } => client::send(&endpoint, &queue, body, delay).await,
            Cmd::Receive {
                queue,
                wait,
                delete,
                count,
                endpoint,
            } => client::receive(&endpoint, &queue, wait, delete, count).await,
            Cmd::Delete {
                queue,
                receipt_handle,
                endpoint,
            } => client::delete(&endpoint, &queue, receipt_handle).await,
            Cmd::Topic { cmd, endpoint } => topic_cli::topic(cmd, &endpoint).await,
            Cmd::Subscription { cmd, endpoint } => topic_cli::subscription(cmd, &endpoint).await,
            Cmd::Publish {
                topic,
                body,
                tags,
                routing_key,
                endpoint,
            } => topic_cli::publish(&endpoint, &topic, body, tags, routing_key).await,
            Cmd::Credential { cmd, endpoint } => client::credential(cmd, &endpoint).await,
            Cmd::Cluster {
                cmd: ClusterCmd::Status,
                endpoint,
            } => client::cluster_status(&endpoint).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// tokio's multi-threaded runtime with `threads` workers (0: one per CPU core, or
/// `TOKIO_WORKER_THREADS`).
fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.enable_all();
    if threads > 0 {
        b.worker_threads(threads);
    }
    b.build()
}

async fn run_node(config: meridian_region_node::NodeConfig) -> anyhow::Result<()> {
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down");
    };
    meridian_region_node::server::run(config, shutdown).await?;
    Ok(())
}
