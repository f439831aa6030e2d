//! The queue: an index of pending packet ids to hand out next.
//!
//! It is not the truth (the database is): a lost id is found again by the
//! rebuild at start, and a stale id (already leased or processed) is skipped
//! when the store refuses to lease it.
pub mod memory;
pub mod redis;

use std::collections::HashSet;

use async_trait::async_trait;
use uuid::Uuid;

#[derive(Debug, Clone, thiserror::Error)]
#[error("queue unavailable: {0}")]
pub struct QueueError(pub String);

#[async_trait]
pub trait Queue: Send + Sync + 'static {
    /// Appends ids to hand out; ids already queued are not queued twice.
    async fn push(&self, ids: &[Uuid]) -> Result<(), QueueError>;
    /// Waits until ids are queued, then takes up to `max` of them, oldest
    /// first. Cancel-safe: dropping the future takes nothing.
    async fn take(&self, max: usize) -> Result<Vec<Uuid>, QueueError>;
    /// Takes up to `max` ids without waiting.
    async fn try_take(&self, max: usize) -> Result<Vec<Uuid>, QueueError>;
    /// How many ids wait to be handed out.
    async fn depth(&self) -> Result<u64, QueueError>;
    /// Every id queued (for the reconciler, which queues what is missing).
    async fn queued_ids(&self) -> Result<HashSet<Uuid>, QueueError>;
    /// Creates what the queue needs before use (the Redis consumer group).
    async fn prepare(&self) -> Result<(), QueueError> {
        Ok(())
    }
    /// Tells the other nodes that the lease `owner` held on `id` ended (a
    /// MarkProcessed through this node for a stream on another).
    async fn publish_settled(&self, owner: &str, id: Uuid) {
        let _ = (owner, id);
    }
    /// Lease ends announced by other nodes: (owner, packet id).
    fn settled_events(&self) -> Option<tokio::sync::broadcast::Receiver<(String, Uuid)>> {
        None
    }
    /// Whether a Redis queue answers right now (false for memory).
    fn redis_connected(&self) -> bool;
}
