//! The CMQ topic model (reference §6–§7): topics, subscriptions and the fan-out of a publish,
//! applied deterministically inside the topic's Raft group like the queue model.

mod apply;
mod model;
mod view;

pub use model::{
    DeliveryStats, PushState, Subscription, SubscriptionPatch, SubscriptionSpec, Topic,
    TopicMessage,
};
pub use view::{SubscriptionView, TopicView};

#[cfg(test)]
mod tests;
