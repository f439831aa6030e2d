//! Leased, at-least-once delivery.
//!
//! A subscriber (one StreamPending call) takes ids from the queue, leases
//! them in the database (the database decides: one lease at a time per
//! packet, across every node) and sends them. A lease ends with
//! MarkProcessed, with its expiry (the sweeper), or with the stream; an
//! unmarked packet is then pending again, or dead_letter after
//! `max_deliveries` deliveries.
mod dispatcher;
pub mod reconciler;
mod subscriber;
mod sweeper;

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::store::StoredPacket;
pub use dispatcher::{Dispatcher, Subscription};

/// One packet sent on a stream, leased to it until `lease_expires_at`.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub stored: StoredPacket,
    pub lease_expires_at: DateTime<Utc>,
}

impl Delivery {
    /// 1 for the first delivery, 2 after one lease ended unmarked, ...
    pub fn attempt(&self) -> u32 {
        self.stored.delivery_attempts
    }
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
