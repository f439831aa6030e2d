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

use std::collections::HashSet;
use std::time::Duration;

use crate::domain::PacketId;
use crate::domain::lease_token::{LeaseChange, LeaseToken};
use crate::error::Error;
use crate::store::PendingPacket;

/// What the Redis queue needs of the node it serves.
pub trait QueueSink: Send + Sync + 'static {
    /// Packets read from the stream.
    fn feed(&self, packets: Vec<Queued>);
    /// Packets Redis refused (XADD failed): kept here while there is room,
    /// the rest left to the database until Redis takes packets again.
    fn keep(&self, packets: Vec<Queued>);
    /// Packets Redis may have taken (the XADD went unanswered): their
    /// entries may land still and go out with their bodies unchecked, so
    /// none is kept; they are left to the database, and the hand-back adds
    /// those the stream lacks by then.
    fn leave(&self, packets: Vec<PendingPacket>);
    /// How many more packets local streams have room for.
    fn wanted(&self) -> usize;
    /// Another node recorded these packets' outcomes.
    fn settle_remote(&self, ids: &[PacketId]);
    /// Takes out of this node's hands the waiting packets its streams
    /// have no room for, to go back to the stream for any node: a read
    /// sent while a stream had room can answer after the stream left.
    fn surplus(&self) -> Vec<Queued>;
    /// Every packet this node holds (for the reconciler).
    fn held_ids(&self) -> HashSet<PacketId>;
    /// The stream entries of the packets this node holds (tagged with
    /// their shard): an entry in this node's pending-entries list that is
    /// not among them is one it lost track of.
    fn held_entries(&self) -> HashSet<String>;
    /// ExtendLease, for leases this node granted (asked by another node).
    fn change_leases(
        &self,
        tokens: &[LeaseToken],
        lease: Option<Duration>,
    ) -> Vec<Result<LeaseChange, Error>>;
}

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
