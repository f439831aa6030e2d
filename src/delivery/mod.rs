//! Leased, at-least-once delivery.
//!
//! The dispatcher holds the packets this node is handing out: waiting in
//! the queue (memory, or read from the Redis stream), or leased to a stream
//! (StreamPending) or a poll (the JSON gateway). A lease lives in memory;
//! it ends with MarkProcessed, with its expiry, or with its stream. A lease
//! that ends without a mark is written to the database in one batch with
//! others (its delivery counted), and the packet is pending again, or
//! dead_letter after `max_deliveries` deliveries. A crash forgets the
//! leases: their packets are pending in the database and delivered again,
//! with the interrupted delivery not counted.
//!
//! Each delivery carries a lease token naming its lease (node, grant
//! number, packet): ExtendLease presents it to move the lease's end, or to
//! end it at once (a nack), on whichever node granted it.
mod backlog;
mod dispatcher;
mod expiry;
mod leases;
pub mod reconciler;
mod subscription;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::domain::Packet;
pub use crate::domain::lease_token::{LeaseChange, LeaseToken};
pub use crate::queue::QueueSink;
pub use dispatcher::Dispatcher;
pub use subscription::Subscription;

/// One packet sent to a consumer, leased to it until `lease_expires_at`.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub packet: Arc<Packet>,
    pub received_at: DateTime<Utc>,
    /// 1 for the first delivery, 2 after one lease ended unmarked, ...
    pub attempt: u32,
    pub lease_expires_at: DateTime<Utc>,
    /// Names this lease for ExtendLease; clients see its text.
    pub lease_token: LeaseToken,
}

/// What a subscriber asked for, defaults applied and bounds checked.
#[derive(Debug, Clone)]
pub struct SubscribeOptions {
    pub consumer: String,
    pub max_in_flight: u32,
    pub lease: Duration,
}

/// One connected subscriber, for Status.
#[derive(Debug, Clone)]
pub struct ConsumerInfo {
    pub consumer: String,
    pub in_flight: u32,
    pub max_in_flight: u32,
    pub connected_at: DateTime<Utc>,
}

/// What this node holds right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    /// Waiting in this node's queue.
    pub waiting: u64,
    /// Leased to a stream or a poll.
    pub leased: u64,
}
