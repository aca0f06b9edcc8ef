//! `meridian topic …`, `meridian subscription …` and `meridian publish` over the gRPC topic API.

use clap::{Args, Subcommand};
use meridian_api::pb::topic_service_client::TopicServiceClient;
use meridian_api::pb::*;
use tonic::transport::Channel;

use crate::client::{channel, cmq};
use crate::Endpoint;

async fn topics(ep: &Endpoint) -> anyhow::Result<TopicServiceClient<Channel>> {
    Ok(TopicServiceClient::new(channel(ep).await?))
}

#[derive(Subcommand)]
pub enum TopicCmd {
    /// Create a topic; prints its topic id.
    Create {
        name: String,
        /// How subscriptions filter messages, fixed at creation: `tags` or `routing-keys`.
        #[arg(long, default_value = "tags", value_parser = ["tags", "routing-keys"])]
        filter: String,
        /// Largest message body, bytes (1024-1048576, default 65536).
        #[arg(long)]
        max_msg_size: Option<u32>,
    },
    /// List topics; prints `<name> <topicId>` per topic and the total on stderr.
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
    /// Show a topic's attributes.
    Get { name: String },
    /// Change a topic's maximum message size.
    Set {
        name: String,
        #[arg(long)]
        max_msg_size: u32,
    },
    /// Delete a topic (refused while it has subscriptions).
    Delete { name: String },
}

/// A subscription's delivery settings, for `create` and `set`.
#[derive(Args)]
pub struct SubscriptionOptions {
    /// BACKOFF_RETRY or EXPONENTIAL_DECAY_RETRY (default).
    #[arg(long)]
    pub notify_strategy: Option<String>,
    /// JSON (default for http) or SIMPLIFIED (the only format for queues).
    #[arg(long)]
    pub notify_content_format: Option<String>,
    /// Receive only messages carrying one of these tags (repeatable; tag topics).
    #[arg(long = "filter-tag")]
    pub filter_tags: Vec<String>,
    /// Receive messages whose routing key matches (repeatable; `*` one word, `#` one or
    /// more; routing-key topics).
    #[arg(long = "binding-key")]
    pub binding_keys: Vec<String>,
}

#[derive(Subcommand)]
pub enum SubscriptionCmd {
    /// Subscribe a queue or an HTTP(S) endpoint to a topic; prints the subscription id.
    Create {
        topic: String,
        name: String,
        /// Where messages go: a queue name (protocol queue) or an http:// or https:// URL
        /// (protocol http). Positional because `--endpoint` names the region.
        #[arg(value_name = "ENDPOINT")]
        target: String,
        /// `queue` or `http`.
        #[arg(long)]
        protocol: String,
        #[command(flatten)]
        options: SubscriptionOptions,
    },
    /// List a topic's subscriptions; prints `<name> <protocol> <endpoint>` per subscription.
    List {
        topic: String,
        #[arg(long, default_value = "")]
        search: String,
        #[arg(long, default_value_t = 0)]
        offset: u32,
        /// Page size (0-100, default 20).
        #[arg(long)]
        limit: Option<u32>,
    },
    /// Show a subscription's settings and delivery metrics.
    Get { topic: String, name: String },
    /// Change a subscription's strategy, format, filter tags or binding keys (only those given).
    Set {
        topic: String,
        name: String,
        /// Filter tags and binding keys given replace the current ones.
        #[command(flatten)]
        options: SubscriptionOptions,
    },
    /// Remove all filter tags (the subscription then receives every message).
    ClearTags { topic: String, name: String },
    /// Delete a subscription; its outstanding HTTP deliveries are dropped.
    Delete { topic: String, name: String },
}

pub async fn topic(cmd: TopicCmd, ep: &Endpoint) -> anyhow::Result<()> {
    let mut c = topics(ep).await?;
    match cmd {
        TopicCmd::Create {
            name,
            filter,
            max_msg_size,
        } => {
            let r = c
                .create_topic(CreateTopicRequest {
                    topic_name: name,
                    filter_type: Some(if filter == "routing-keys" { 2 } else { 1 }),
                    max_msg_size,
                })
                .await
                .map_err(cmq)?;
            println!("{}", r.into_inner().topic_id);
        }
        TopicCmd::List {
            search,
            offset,
            limit,
        } => {
            let r = c
                .list_topic(ListTopicRequest {
                    search_word: search,
                    offset,
                    limit,
                })
                .await
                .map_err(cmq)?
                .into_inner();
            for t in &r.topics {
                println!("{} {}", t.topic_name, t.topic_id);
            }
            eprintln!("total {}", r.total_count);
        }
        TopicCmd::Get { name } => {
            let a = c
                .get_topic_attributes(TopicNameRequest { topic_name: name })
                .await
                .map_err(cmq)?
                .into_inner();
            print_topic(&a);
        }
        TopicCmd::Set { name, max_msg_size } => {
            let a = c
                .set_topic_attributes(SetTopicAttributesRequest {
                    topic_name: name,
                    max_msg_size: Some(max_msg_size),
                })
                .await
                .map_err(cmq)?
                .into_inner();
            print_topic(&a);
        }
        TopicCmd::Delete { name } => {
            c.delete_topic(TopicNameRequest { topic_name: name })
                .await
                .map_err(cmq)?;
        }
    }
    Ok(())
}

fn print_topic(a: &TopicAttributesReply) {
    println!("topicId              {}", a.topic_id);
    println!("topicName            {}", a.topic_name);
    println!(
        "filterType           {} ({})",
        a.filter_type,
        if a.filter_type == 2 {
            "routing keys"
        } else {
            "tags"
        }
    );
    println!("maxMsgSize           {}", a.max_msg_size);
    println!("msgRetentionSeconds  {}", a.msg_retention_seconds);
    println!("msgCount             {}", a.msg_count);
    println!("published            {}", a.published);
    println!("subscriptions        {}", a.subscriptions);
    println!("group                {}", a.group);
    println!("createTime           {}", a.create_time);
    println!("lastModifyTime       {}", a.last_modify_time);
}

pub async fn subscription(cmd: SubscriptionCmd, ep: &Endpoint) -> anyhow::Result<()> {
    let mut c = topics(ep).await?;
    match cmd {
        SubscriptionCmd::Create {
            topic,
            name,
            target,
            protocol,
            options: o,
        } => {
            let r = c
                .subscribe(SubscribeRequest {
                    topic_name: topic,
                    subscription_name: name,
                    protocol,
                    endpoint: target,
                    notify_strategy: o.notify_strategy,
                    notify_content_format: o.notify_content_format,
                    filter_tag: o.filter_tags,
                    binding_key: o.binding_keys,
                })
                .await
                .map_err(cmq)?;
            println!("{}", r.into_inner().subscription_id);
        }
        SubscriptionCmd::List {
            topic,
            search,
            offset,
            limit,
        } => {
            let r = c
                .list_subscription_by_topic(ListSubscriptionRequest {
                    topic_name: topic,
                    search_word: search,
                    offset,
                    limit,
                })
                .await
                .map_err(cmq)?
                .into_inner();
            for s in &r.subscriptions {
                println!("{} {} {}", s.subscription_name, s.protocol, s.endpoint);
            }
            eprintln!("total {}", r.total_count);
        }
        SubscriptionCmd::Get { topic, name } => {
            let a = c
                .get_subscription_attributes(SubscriptionNameRequest {
                    topic_name: topic,
                    subscription_name: name,
                })
                .await
                .map_err(cmq)?
                .into_inner();
            print_subscription(&a);
        }
        SubscriptionCmd::Set {
            topic,
            name,
            options: o,
        } => {
            let a = c
                .set_subscription_attributes(SetSubscriptionAttributesRequest {
                    topic_name: topic,
                    subscription_name: name,
                    notify_strategy: o.notify_strategy,
                    notify_content_format: o.notify_content_format,
                    set_filter_tag: !o.filter_tags.is_empty(),
                    filter_tag: o.filter_tags,
                    set_binding_key: !o.binding_keys.is_empty(),
                    binding_key: o.binding_keys,
                })
                .await
                .map_err(cmq)?
                .into_inner();
            print_subscription(&a);
        }
        SubscriptionCmd::ClearTags { topic, name } => {
            c.clear_subscription_filter_tags(SubscriptionNameRequest {
                topic_name: topic,
                subscription_name: name,
            })
            .await
            .map_err(cmq)?;
        }
        SubscriptionCmd::Delete { topic, name } => {
            c.unsubscribe(SubscriptionNameRequest {
                topic_name: topic,
                subscription_name: name,
            })
            .await
            .map_err(cmq)?;
        }
    }
    Ok(())
}

fn print_subscription(a: &SubscriptionAttributesReply) {
    println!("subscriptionId       {}", a.subscription_id);
    println!("subscriptionName     {}", a.subscription_name);
    println!("topicName            {}", a.topic_name);
    println!("protocol             {}", a.protocol);
    println!("endpoint             {}", a.endpoint);
    println!("notifyStrategy       {}", a.notify_strategy);
    println!("notifyContentFormat  {}", a.notify_content_format);
    println!("filterTag            {}", a.filter_tag.join(","));
    println!("bindingKey           {}", a.binding_key.join(","));
    println!("createTime           {}", a.create_time);
    println!("lastModifyTime       {}", a.last_modify_time);
    println!("msgCount             {}", a.msg_count);
    println!("routed               {}", a.routed);
    println!("delivered            {}", a.delivered);
    println!("retried              {}", a.retried);
    println!("dropped              {}", a.dropped);
    println!("oldestPendingTime    {}", a.oldest_pending_time);
}

/// Publishes one message; prints its message id.
pub async fn publish(
    ep: &Endpoint,
    topic: &str,
    body: String,
    tags: Vec<String>,
    routing_key: String,
) -> anyhow::Result<()> {
    let r = topics(ep)
        .await?
        .publish_message(PublishMessageRequest {
            topic_name: topic.into(),
            msg_body: body.into_bytes(),
            msg_tag: tags,
            routing_key,
        })
        .await
        .map_err(cmq)?;
    println!("{}", r.into_inner().msg_id);
    Ok(())
}
