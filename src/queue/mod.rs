//! The queue: which pending packets to hand out next.
//!
//! One node keeps it in memory ([`memory`]): a bounded window of packets,
//! the rest read back from the database in arrival order. Several nodes
//! share a Redis stream ([`redis`]) read through a consumer group: the entry
//! stays in the reading node's pending-entries list while that node holds
//! the packet, so the group knows which node holds what. Neither is the
//! truth (the database is): a lost entry is found again by the rebuild.
//! The stream may be split into shards ([`shards`]) so a Redis Cluster
//! spreads it.
pub mod codec;
pub mod memory;
pub mod redis;
pub mod shards;

use crate::store::PendingPacket;

/// A packet in this node's hands, with the Redis stream entry that holds
/// it (none for the memory queue, or when Redis was away).
#[derive(Debug, Clone)]
pub struct Queued {
    pub pending: PendingPacket,
    pub entry: Option<String>,
}

impl Queued {
    pub fn local(pending: PendingPacket) -> Queued {
        Queued {
            pending,
            entry: None,
        }
    }

    pub fn id(&self) -> crate::domain::PacketId {
        self.pending.packet.packet_id
    }
}

/// Why the Redis queue could not do something, with its cause.
#[derive(Debug, Clone, thiserror::Error)]
pub enum QueueError {
    #[error("queue unavailable: {0}")]
    Redis(#[from] fred::error::Error),
    #[error("queue unavailable: not connected to Redis")]
    NotConnected,
    #[error("queue: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("Redis settings: {0}")]
    Settings(String),
}
