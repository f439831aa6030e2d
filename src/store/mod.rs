//! Durable storage of packets and their delivery state.
//!
//! The database row is the truth about a packet: its status, its lease and
//! its delivery attempts. Every write goes through the writer task
//! ([`writer`]), which commits whatever is waiting in one transaction.
mod error;
mod postgres;
mod sql;
mod sqlite;
mod writer;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use crate::domain::{DeliveryStatus, Packet};
pub use error::StoreError;
pub use writer::{WriteOp, WriteReply, Writer};

/// A packet as stored, with its delivery state.
#[derive(Debug, Clone)]
pub struct StoredPacket {
    pub seq: i64,
    pub packet: Packet,
    pub received_at: DateTime<Utc>,
    pub status: DeliveryStatus,
    pub delivery_attempts: u32,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub processed_at: Option<DateTime<Utc>>,
    pub processed_by_karma: bool,
    pub karma_actions: Vec<Value>,
    pub error_message: Option<String>,
}

/// The receipt of an insert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inserted {
    pub packet_id: Uuid,
    pub received_at: DateTime<Utc>,
    /// False when the id was already stored (an idempotent retry).
    pub created: bool,
}

/// What MarkProcessed asks to record.
#[derive(Debug, Clone)]
pub struct Mark {
    pub packet_id: Uuid,
    pub success: bool,
    pub karma_actions: Vec<Value>,
    pub error_message: Option<String>,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MarkOutcome {
    /// Recorded; `lease_owner` held the packet until now.
    Applied {
        lease_owner: Option<String>,
    },
    AlreadyProcessed,
    NotFound,
}

/// A lease that ended without a mark: the packet is pending again or dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    pub packet_id: Uuid,
    pub status: DeliveryStatus,
}

/// Which packets of a user to list.
#[derive(Debug, Clone)]
pub struct UserQuery {
    pub user_id: String,
    pub status: Option<DeliveryStatus>,
    pub limit: u32,
    /// Only packets older than this `seq` (the page token).
    pub before_seq: Option<i64>,
}

/// Packets per status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    pub pending: u64,
    pub leased: u64,
    pub processed: u64,
    pub failed: u64,
    pub dead_letter: u64,
}

impl Counts {
    pub fn total(&self) -> u64 {
        self.pending + self.leased + self.processed + self.failed + self.dead_letter
    }
}

/// One database engine. Writes arrive in batches that the implementation
/// must apply in one transaction, all or nothing.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    async fn write_batch(&self, ops: &[WriteOp]) -> Result<Vec<WriteReply>, StoreError>;
    /// Ids of pending packets, oldest first.
    async fn pending_ids(&self) -> Result<Vec<Uuid>, StoreError>;
    async fn user_packets(&self, query: &UserQuery) -> Result<Vec<StoredPacket>, StoreError>;
    async fn counts(&self) -> Result<Counts, StoreError>;
    async fn ping(&self) -> Result<(), StoreError>;
    /// How many writer tasks suit this engine (SQLite has one writer anyway).
    fn writers(&self) -> usize;
}

/// The store the application uses: reads go to the backend, writes to the
/// writer task.
#[derive(Clone)]
pub struct Store {
    backend: Arc<dyn Backend>,
    writer: Writer,
}

impl Store {
    /// Connects to `database_url`, applies migrations and starts the writer.
    pub async fn connect(database_url: &str, max_commit: usize) -> Result<Store, StoreError> {
        let backend: Arc<dyn Backend> =
            if database_url.starts_with("postgres:") || database_url.starts_with("postgresql:") {
                Arc::new(postgres::PgBackend::connect(database_url).await?)
            } else if database_url.starts_with("sqlite:") {
                Arc::new(sqlite::SqliteBackend::connect(database_url).await?)
            } else {
                return Err(StoreError::Internal(format!(
                    "DATABASE_URL must start with sqlite: or postgres:, got {database_url:?}"
                )));
            };
        let writer = Writer::start(backend.clone(), max_commit);
        Ok(Store { backend, writer })
    }

    /// Stops taking writes, commits those already queued, and waits.
    pub async fn close(&self) {
        self.writer.close().await;
    }

    pub async fn insert(&self, packet: Packet) -> Result<Inserted, StoreError> {
        match self
            .writer
            .submit(WriteOp::Insert(Box::new(packet)))
            .await?
        {
            WriteReply::Inserted(receipt) => Ok(receipt),
            other => Err(unexpected(other)),
        }
    }

    /// Inserts many packets; they are queued together so they share commits.
    pub async fn insert_many(&self, packets: Vec<Packet>) -> Vec<Result<Inserted, StoreError>> {
        let pending: Vec<_> = packets
            .into_iter()
            .map(|p| self.writer.enqueue(WriteOp::Insert(Box::new(p))))
            .collect();
        let mut out = Vec::with_capacity(pending.len());
        for reply in pending {
            out.push(match reply.await {
                Ok(WriteReply::Inserted(receipt)) => Ok(receipt),
                Ok(other) => Err(unexpected(other)),
                Err(e) => Err(e),
            });
        }
        out
    }

    /// Leases those of `ids` that are still pending to `owner`.
    pub async fn lease(
        &self,
        ids: Vec<Uuid>,
        owner: String,
        expires_at: DateTime<Utc>,
    ) -> Result<Vec<StoredPacket>, StoreError> {
        match self
            .writer
            .submit(WriteOp::Lease {
                ids,
                owner,
                expires_at,
            })
            .await?
        {
            WriteReply::Leased(rows) => Ok(rows),
            other => Err(unexpected(other)),
        }
    }

    /// Records outcomes; they are queued together so they share commits.
    pub async fn mark_many(&self, marks: Vec<Mark>) -> Vec<Result<MarkOutcome, StoreError>> {
        let pending: Vec<_> = marks
            .into_iter()
            .map(|m| self.writer.enqueue(WriteOp::Mark(m)))
            .collect();
        let mut out = Vec::with_capacity(pending.len());
        for reply in pending {
            out.push(match reply.await {
                Ok(WriteReply::Marked(outcome)) => Ok(outcome),
                Ok(other) => Err(unexpected(other)),
                Err(e) => Err(e),
            });
        }
        out
    }

    /// Ends every lease that expired by `now`.
    pub async fn expire_leases(
        &self,
        now: DateTime<Utc>,
        max_deliveries: u32,
    ) -> Result<Vec<Released>, StoreError> {
        self.release(WriteOp::ExpireLeases {
            now,
            max_deliveries,
        })
        .await
    }

    /// Ends every lease `owner` holds (its stream ended).
    pub async fn release_owner(
        &self,
        owner: String,
        max_deliveries: u32,
    ) -> Result<Vec<Released>, StoreError> {
        self.release(WriteOp::ReleaseOwner {
            owner,
            max_deliveries,
        })
        .await
    }

    async fn release(&self, op: WriteOp) -> Result<Vec<Released>, StoreError> {
        match self.writer.submit(op).await? {
            WriteReply::Released(rows) => Ok(rows),
            other => Err(unexpected(other)),
        }
    }

    pub async fn pending_ids(&self) -> Result<Vec<Uuid>, StoreError> {
        self.backend.pending_ids().await
    }

    pub async fn user_packets(&self, query: &UserQuery) -> Result<Vec<StoredPacket>, StoreError> {
        self.backend.user_packets(query).await
    }

    pub async fn counts(&self) -> Result<Counts, StoreError> {
        self.backend.counts().await
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        self.backend.ping().await
    }
}

fn unexpected(reply: WriteReply) -> StoreError {
    StoreError::Internal(format!("writer answered with the wrong reply: {reply:?}"))
}
