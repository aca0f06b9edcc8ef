//! Client commands over the gRPC API.

use anyhow::{anyhow, Context};
use clap::{Args, Subcommand};
use meridian_api::pb::cluster_service_client::ClusterServiceClient;
use meridian_api::pb::credential_service_client::CredentialServiceClient;
use meridian_api::pb::queue_service_client::QueueServiceClient;
use meridian_api::pb::*;
use meridian_api::CmqError;
use tonic::transport::Channel;

use crate::Endpoint;

/// Where `meridian dev` records the endpoint of the region it runs.
pub fn dev_endpoint_file() -> std::path::PathBuf {
    std::env::temp_dir().join("meridian-dev-endpoint")
}

fn resolve(ep: &Endpoint) -> String {
    ep.endpoint
        .clone()
        .or_else(|| {
            std::fs::read_to_string(dev_endpoint_file())
                .ok()
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| format!("http://127.0.0.1:{}", crate::dev::DEFAULT_BASE_PORT + 1))
}

pub(crate) async fn channel(ep: &Endpoint) -> anyhow::Result<Channel> {
    let url = resolve(ep);
    tonic::transport::Endpoint::from_shared(url.clone())
        .with_context(|| format!("invalid endpoint {url:?}"))?
        .connect()
        .await
        .with_context(|| format!("cannot connect to {url}"))
}

async fn queues(ep: &Endpoint) -> anyhow::Result<QueueServiceClient<Channel>> {
    Ok(QueueServiceClient::new(channel(ep).await?).max_decoding_message_size(64 << 20))
}

/// A CMQ error as `(<code>) <message>`, so scripts can match the code.
pub(crate) fn cmq(status: tonic::Status) -> anyhow::Error {
    let e = CmqError::from_status(&status);
    anyhow!("({}) {}", e.code.as_u32(), e.message)
}

#[derive(Args, Default)]
pub struct AttrArgs {
    /// Maximum number of messages kept (1000-1000000000).
    #[arg(long)]
    max_msg_heap_num: Option<u64>,
    /// Default long-poll wait of receives, seconds (0-30).
    #[arg(long)]
    polling_wait_seconds: Option<u32>,
    /// How long a received message stays invisible, seconds (1-43200).
    #[arg(long)]
    visibility_timeout: Option<u32>,
    /// Largest message body, bytes (1024-1048576).
    #[arg(long)]
    max_msg_size: Option<u32>,
    /// How long a message is kept, seconds (60-1296000).
    #[arg(long)]
    msg_retention_seconds: Option<u32>,
    /// How long deleted messages stay rewindable, seconds (0 disables rewind).
    #[arg(long)]
    rewind_seconds: Option<u32>,
    /// CMQ deadLetterPolicy JSON, e.g. '{"deadLetterQueue":"dlq","policy":0,"maxReceiveCount":3}'.
    #[arg(long)]
    dead_letter_policy: Option<String>,
}

impl AttrArgs {
    fn into_pb(self) -> QueueAttributes {
        QueueAttributes {
            max_msg_heap_num: self.max_msg_heap_num,
            polling_wait_seconds: self.polling_wait_seconds,
            visibility_timeout: self.visibility_timeout,
            max_msg_size: self.max_msg_size,
            msg_retention_seconds: self.msg_retention_seconds,
            rewind_seconds: self.rewind_seconds,
            dead_letter_policy: self.dead_letter_policy,
        }
    }
}

#[derive(Subcommand)]
pub enum QueueCmd {
    /// Create a queue; prints its queue id.
    Create {
        name: String,
        #[command(flatten)]
        attrs: AttrArgs,
    },
    /// List queues; prints `<name> <queueId>` per queue and the total on stderr.
    List {
        /// Only names containing this text (case-insensitive).
        #[arg(long, default_value = "")]
        search: String,
        #[arg(long, default_value_t = 0)]
        offset: u32,
        /// Page size (1-50, default 20).
        #[arg(long)]
        limit: Option<u32>,
    },
    /// Show a queue's attributes and message counters.
    Get { name: String },
    /// Change a queue's attributes (only those given).
    Set {
        name: String,
        #[command(flatten)]
        attrs: AttrArgs,
    },
    /// Delete a queue and its messages.
    Delete { name: String },
    /// Re-deliver messages produced at or after a time, consumed ones within the rewind window too.
    Rewind {
        name: String,
        /// Unix time in seconds.
        #[arg(long)]
        start_time: i64,
    },
    /// Remove a queue's dead-letter policy.
    UnbindDlq { name: String },
    /// List the queues whose dead-letter queue this is.
    DlqSources { name: String },
}

pub async fn queue(cmd: QueueCmd, ep: &Endpoint) -> anyhow::Result<()> {
    let mut c = queues(ep).await?;
    match cmd {
        QueueCmd::Create { name, attrs } => {
            let r = c
                .create_queue(CreateQueueRequest {
                    queue_name: name,
                    attributes: Some(attrs.into_pb()),
                })
                .await
                .map_err(cmq)?;
            println!("{}", r.into_inner().queue_id);
        }
        QueueCmd::List {
            search,
            offset,
            limit,
        } => {
            let r = c
                .list_queue(ListQueueRequest {
                    search_word: search,
                    offset,
                    limit,
                })
                .await
                .map_err(cmq)?
                .into_inner();
            for q in &r.queues {
                println!("{} {}", q.queue_name, q.queue_id);
            }
            eprintln!("total {}", r.total_count);
        }
        QueueCmd::Get { name } => {
            let a = c
                .get_queue_attributes(QueueNameRequest { queue_name: name })
                .await
                .map_err(cmq)?
                .into_inner();
            print_attrs(&a);
        }
        QueueCmd::Set { name, attrs } => {
            let a = c
                .set_queue_attributes(SetQueueAttributesRequest {
                    queue_name: name,
                    attributes: Some(attrs.into_pb()),
                })
                .await
                .map_err(cmq)?
                .into_inner();
            print_attrs(&a);
        }
        QueueCmd::Delete { name } => {
            c.delete_queue(QueueNameRequest { queue_name: name })
                .await
                .map_err(cmq)?;
        }
        QueueCmd::Rewind { name, start_time } => {
            c.rewind_queue(RewindQueueRequest {
                queue_name: name,
                start_consume_time: start_time,
            })
            .await
            .map_err(cmq)?;
        }
        QueueCmd::UnbindDlq { name } => {
            c.unbind_dead_letter_queue(QueueNameRequest { queue_name: name })
                .await
                .map_err(cmq)?;
        }
        QueueCmd::DlqSources { name } => {
            let r = c
                .list_dead_letter_source_queues(ListDeadLetterSourceQueuesRequest {
                    dead_letter_queue_name: name,
                    search_word: String::new(),
                    offset: 0,
                    limit: Some(50),
                })
                .await
                .map_err(cmq)?
                .into_inner();
            for q in &r.queues {
                println!("{} {}", q.queue_name, q.queue_id);
            }
        }
    }
    Ok(())
}

fn print_attrs(a: &QueueAttributesReply) {
    println!("queueId              {}", a.queue_id);
    println!("queueName            {}", a.queue_name);
    println!("group                {}", a.group);
    println!("maxMsgHeapNum        {}", a.max_msg_heap_num);
    println!("pollingWaitSeconds   {}", a.polling_wait_seconds);
    println!("visibilityTimeout    {}", a.visibility_timeout);
    println!("maxMsgSize           {}", a.max_msg_size);
    println!("msgRetentionSeconds  {}", a.msg_retention_seconds);
    println!("rewindSeconds        {}", a.rewind_seconds);
    println!("deadLetterPolicy     {}", a.dead_letter_policy);
    println!("createTime           {}", a.create_time);
    println!("lastModifyTime       {}", a.last_modify_time);
    println!("activeMsgNum         {}", a.active_msg_num);
    println!("inactiveMsgNum       {}", a.inactive_msg_num);
    println!("delayMsgNum          {}", a.delay_msg_num);
    println!("rewindMsgNum         {}", a.rewind_msg_num);
    println!("minMsgTime           {}", a.min_msg_time);
}

pub async fn send(ep: &Endpoint, queue: &str, body: String, delay: u32) -> anyhow::Result<()> {
    let r = queues(ep)
        .await?
        .send_message(SendMessageRequest {
            queue_name: queue.into(),
            msg_body: body.into_bytes(),
            delay_seconds: delay,
        })
        .await
        .map_err(cmq)?;
    println!("{}", r.into_inner().msg_id);
    Ok(())
}

pub async fn receive(
    ep: &Endpoint,
    queue: &str,
    wait: Option<u32>,
    delete: bool,
    count: u32,
) -> anyhow::Result<()> {
    let mut c = queues(ep).await?;
    let msgs = c
        .batch_receive_message(BatchReceiveMessageRequest {
            queue_name: queue.into(),
            num_of_msg: count,
            polling_wait_seconds: wait,
        })
        .await
        .map_err(cmq)?
        .into_inner()
        .messages;
    for m in msgs {
        println!("{} {}", m.msg_id, String::from_utf8_lossy(&m.msg_body));
        if delete {
            c.delete_message(DeleteMessageRequest {
                queue_name: queue.into(),
                receipt_handle: m.receipt_handle,
            })
            .await
            .map_err(cmq)?;
        } else {
            eprintln!("receiptHandle {}", m.receipt_handle);
        }
    }
    Ok(())
}

pub async fn delete(ep: &Endpoint, queue: &str, handle: String) -> anyhow::Result<()> {
    queues(ep)
        .await?
        .delete_message(DeleteMessageRequest {
            queue_name: queue.into(),
            receipt_handle: handle,
        })
        .await
        .map_err(cmq)?;
    Ok(())
}

#[derive(Subcommand)]
pub enum CredentialCmd {
    /// Create a key pair; prints `secret_id=<id> secret_key=<key>` (the key is shown only once).
    Create {
        /// The tenant owning the key; queues are scoped per app id (gRPC uses app id 0).
        #[arg(long, default_value_t = 0)]
        app_id: u64,
    },
    /// List SecretIds with their app ids (never the keys).
    List,
    /// Revoke a SecretId: its requests are refused from then on.
    Revoke { secret_id: String },
}

pub async fn credential(cmd: CredentialCmd, ep: &Endpoint) -> anyhow::Result<()> {
    let mut c = CredentialServiceClient::new(channel(ep).await?);
    match cmd {
        CredentialCmd::Create { app_id } => {
            let r = c
                .create_credential(CreateCredentialRequest { app_id })
                .await
                .map_err(cmq)?;
            let r = r.into_inner();
            println!(
                "secret_id={} secret_key={} app_id={}",
                r.secret_id, r.secret_key, r.app_id
            );
        }
        CredentialCmd::List => {
            for cr in c
                .list_credentials(Empty {})
                .await
                .map_err(cmq)?
                .into_inner()
                .credentials
            {
                println!(
                    "{} app_id={} created={}{}",
                    cr.secret_id,
                    cr.app_id,
                    cr.create_time,
                    if cr.revoked { " revoked" } else { "" }
                );
            }
        }
        CredentialCmd::Revoke { secret_id } => {
            c.revoke_credential(RevokeCredentialRequest { secret_id })
                .await
                .map_err(cmq)?;
        }
    }
    Ok(())
}

pub async fn cluster_status(ep: &Endpoint) -> anyhow::Result<()> {
    let mut c = ClusterServiceClient::new(channel(ep).await?);
    let first = c.cluster_status(Empty {}).await.map_err(cmq)?.into_inner();
    println!("members:");
    for m in &first.members {
        println!("  node {} {}", m.node_id, m.addr);
    }
    println!(
        "{:<6} {:<7} {:<6} {:<6} {:>10} {:>10}",
        "group", "leader", "term", "node", "last_log", "applied"
    );
    let mut views = Vec::new();
    for m in &first.members {
        let url = format!("http://{}", m.addr);
        let view = match tonic::transport::Endpoint::from_shared(url)?
            .connect()
            .await
        {
            Ok(ch) => ClusterServiceClient::new(ch)
                .cluster_status(Empty {})
                .await
                .ok(),
            Err(_) => None,
        };
        views.push((m.node_id, view.map(|v| v.into_inner())));
    }
    for g in &first.groups {
        for (id, view) in &views {
            match view {
                Some(v) => {
                    let s = v.groups.iter().find(|x| x.group == g.group);
                    if let Some(s) = s {
                        println!(
                            "{:<6} {:<7} {:<6} {:<6} {:>10} {:>10}",
                            g.group, s.leader, s.term, id, s.last_log_index, s.applied_index
                        );
                    }
                }
                None => println!(
                    "{:<6} {:<7} {:<6} {:<6} {:>10} {:>10}",
                    g.group, "-", "-", id, "down", "-"
                ),
            }
        }
    }
    Ok(())
}
