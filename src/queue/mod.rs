//! The queue: an index of pending packet ids to hand out next.
//!
//! It is not the truth (the database is): a lost id is found again by the
//! rebuild at start, and a stale id (already leased or processed) is skipped
//! when the store refuses to lease it.
pub mod memory;

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
    /// Whether a Redis queue answers right now (false for memory).
    fn redis_connected(&self) -> bool;
}
