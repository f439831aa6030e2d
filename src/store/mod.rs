//! Durable storage of packets and their outcomes.
//!
//! The database row is the truth about a packet: that it was acknowledged
//! (pending), its outcome (processed, failed, dead_letter), and the
//! deliveries whose lease ended without a mark. Leases themselves are not
//! stored: they live where they are cheap (the dispatcher's memory, the
//! Redis group), so a crash forgets them and the packet is simply pending
//! again. Every write goes through the writer tasks ([`writer`]), which
//! commit whatever is waiting in one transaction, one statement per kind of
//! write.
mod error;
mod partitions;
mod pg_counts;
mod postgres;
pub mod retention;
mod rows;
mod sqlite;
pub use sqlite::before_first_connection;
/// The SQLite record log's on-disk format (blocks, and the records in
/// them), public for its fuzz target.
pub use sqlite::{log as record_log, record as log_record};
mod writer;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

use crate::domain::{DeliveryStatus, Packet, PacketId};
pub use error::StoreError;
pub use writer::{CommitLimits, WriteOp, WriteReply, Writer};

/// A packet as stored, with its delivery state.
#[derive(Debug, Clone)]
pub struct StoredPacket {
    pub seq: i64,
    pub packet: Packet,
    pub received_at: DateTime<Utc>,
    pub status: DeliveryStatus,
    pub delivery_attempts: u32,
    pub processed_at: Option<DateTime<Utc>>,
    pub processed_by_karma: bool,
    pub karma_actions: Vec<Value>,
    pub error_message: Option<String>,
    /// What it had each time an operator sent it back to pending.
    pub history: Vec<HistoryEntry>,
}

/// Why an operator sent finished packets back to pending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequeueReason {
    /// Dead-letter or failed packets, to be tried again.
    Redrive,
    /// Processed packets, to be processed again.
    Replay,
}

impl RequeueReason {
    fn as_str(self) -> &'static str {
        match self {
            Self::Redrive => "redrive",
            Self::Replay => "replay",
        }
    }
}

/// What a packet had when it was sent back to pending: one entry of its
/// `history` column (a JSON list), oldest first.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HistoryEntry {
    pub reason: RequeueReason,
    pub requeued_at: DateTime<Utc>,
    /// `processed`, `failed` or `dead_letter`.
    pub status: String,
    pub delivery_attempts: u32,
    pub processed_at: Option<DateTime<Utc>>,
    pub processed_by_karma: bool,
    pub karma_actions: Vec<Value>,
    pub error_message: Option<String>,
}

/// Which finished packets go back to pending (Redrive, Replay); the
/// filters combine.
#[derive(Debug, Clone)]
pub struct Requeue {
    pub reason: RequeueReason,
    /// Finished statuses only (processed, failed, dead_letter); not empty.
    pub statuses: Vec<DeliveryStatus>,
    pub user_id: Option<String>,
    pub received_from: Option<DateTime<Utc>>,
    pub received_before: Option<DateTime<Utc>>,
}

impl Requeue {
    /// `status IN (...)` from the enum's names, never a caller's text.
    fn status_list(&self) -> String {
        self.statuses
            .iter()
            .map(|s| format!("'{}'", s.as_str()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A committed packet waiting for delivery: what the dispatcher holds.
#[derive(Debug, Clone)]
pub struct PendingPacket {
    pub packet: Arc<Packet>,
    /// Arrival order.
    pub seq: i64,
    pub received_at: DateTime<Utc>,
    /// Deliveries that ended without a mark so far.
    pub attempts: u32,
}

#[cfg(test)]
impl PendingPacket {
    /// A pending packet never delivered, for tests.
    pub fn sample(seq: i64) -> PendingPacket {
        PendingPacket {
            packet: Packet::sample("u"),
            seq,
            received_at: Utc::now(),
            attempts: 0,
        }
    }
}

/// The receipt of an insert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inserted {
    pub packet_id: PacketId,
    pub received_at: DateTime<Utc>,
    /// False when the id was already stored (an idempotent retry).
    pub created: bool,
    pub seq: i64,
}

/// What MarkProcessed asks to record.
#[derive(Debug, Clone)]
pub struct Mark {
    pub packet_id: PacketId,
    pub success: bool,
    /// The list as JSON, encoded where the mark was read: the writer
    /// stores the text as it is, and the parsed values are freed by the
    /// thread that made them. Encoding them on the writer thread and
    /// freeing them there (another thread's memory) was about a quarter of
    /// its own time (BENCHMARKS.md, fifteenth session).
    pub karma_actions: Box<RawValue>,
    pub error_message: Option<String>,
    pub at: DateTime<Utc>,
    /// The delivery being marked, counted with the outcome.
    pub attempt: MarkedDelivery,
}

/// Which delivery a mark is of, as far as the node recording it knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkedDelivery {
    /// That one: the lease this node granted, or the one the mark's lease
    /// token names. 0: none the database has not counted already (no
    /// lease on the packet lives).
    Attempt(u32),
    /// Another node may hold its lease: the delivery after those the
    /// database counted, if the packet is still pending (a lease that
    /// ended has been counted, or is about to be, and then it stays
    /// pending unless marked).
    AfterCounted,
}

impl MarkedDelivery {
    /// The delivery count a mark leaves, from the count stored before and
    /// whether the packet was pending.
    pub fn count(self, stored: u32, pending: bool) -> u32 {
        match self {
            Self::Attempt(attempt) => stored.max(attempt),
            Self::AfterCounted if pending => stored + 1,
            Self::AfterCounted => stored,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkOutcome {
    Applied,
    AlreadyProcessed,
    NotFound,
}

/// A lease that ended without a mark: `attempts` deliveries are spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseEnd {
    pub packet_id: PacketId,
    pub attempts: u32,
}

/// A packet whose lease ended and that is still open: pending again, or
/// dead_letter once its deliveries ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    pub packet_id: PacketId,
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
    /// From `(status, count)` rows.
    fn from_rows(rows: Vec<(String, i64)>) -> Counts {
        let mut counts = Counts::default();
        for (status, n) in rows {
            let n = n.max(0) as u64;
            match DeliveryStatus::parse(&status) {
                Some(DeliveryStatus::Pending) => counts.pending = n,
                Some(DeliveryStatus::Leased) => counts.leased = n,
                Some(DeliveryStatus::Processed) => counts.processed = n,
                Some(DeliveryStatus::Failed) => counts.failed = n,
                Some(DeliveryStatus::DeadLetter) => counts.dead_letter = n,
                None => {}
            }
        }
        counts
    }

    pub fn total(&self) -> u64 {
        self.pending + self.leased + self.processed + self.failed + self.dead_letter
    }
}

/// Told of every packet whose insert committed, before any later read of
/// the pending packets can run (see [`Store::pending_after`]).
pub trait CommitListener: Send + Sync + 'static {
    fn committed(&self, packets: Vec<PendingPacket>);

    /// Inserts failed in a way that may hide a commit (its answer lost):
    /// packets after seq `after_seq` may be stored and pending without
    /// having been announced.
    fn uncertain(&self, after_seq: i64) {
        let _ = after_seq;
    }
}

/// How many writer tasks suit an engine, per lane.
#[derive(Debug, Clone, Copy)]
pub struct Writers {
    /// Writers of inserts.
    pub ingest: usize,
    /// Writers of marks and lease ends; 0: the ingest writers take them
    /// first (SQLite, which has one writer anyway).
    pub delivery: usize,
    /// The engine blocks its thread while it writes: writers get threads
    /// of their own instead of runtime tasks.
    pub blocking: bool,
    /// How long a writer lets writes gather when they come in company,
    /// unless configured: every commit costs an fsync.
    pub linger: std::time::Duration,
    /// The longest the linger grows to while the groups keep company
    /// (see `writer::linger`); equal to `linger`, it stays fixed.
    pub max_linger: std::time::Duration,
    /// What each write of the last group past two adds to the linger.
    pub per_companion: std::time::Duration,
    /// Most inserts in one commit, unless configured.
    pub max_commit: usize,
}

/// A commit group: every write the writer took, by kind.
#[derive(Debug, Default)]
pub struct Group<'a> {
    pub marks: Vec<&'a Mark>,
    pub ends: Vec<LeaseEnd>,
    pub max_deliveries: u32,
    pub inserts: Vec<&'a Arc<Packet>>,
    /// `received_at` of the inserted packets.
    pub at: DateTime<Utc>,
}

/// What one step of retention did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    /// Packets deleted (or dropped with their day).
    pub packets: u64,
    /// Nothing is left to do until the next pass.
    pub done: bool,
}

/// Each kind's answers, in the group's order.
#[derive(Debug)]
pub struct Applied {
    pub marks: Result<Vec<MarkOutcome>, StoreError>,
    pub ends: Result<Vec<Released>, StoreError>,
    pub inserts: Result<Vec<Inserted>, StoreError>,
}

/// One database engine.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Applies a group with one statement per kind of write, whatever the
    /// number of rows: SQLite in one transaction (one fsync), PostgreSQL a
    /// statement that commits on its own per kind (no BEGIN/COMMIT round
    /// trips). Takes `gate` for reading before the inserts commit and
    /// returns it held, so the caller can announce them first.
    async fn write(
        &self,
        group: &Group<'_>,
        gate: &Arc<RwLock<()>>,
    ) -> (Applied, Option<OwnedRwLockReadGuard<()>>);
    /// One step of retention, bounded by `limit` rows: deletes finished
    /// packets (processed, failed, dead_letter) received before `before`,
    /// oldest first. SQLite deletes at most `limit` rows; PostgreSQL drops
    /// a whole day once all its packets are older than `before` and none is
    /// pending or leased, or else deletes rows of such a day (see
    /// `partitions`). Pending and leased packets are never deleted.
    async fn prune(&self, before: DateTime<Utc>, limit: u32) -> Result<Pruned, StoreError>;
    /// Readies storage for the days ahead (PostgreSQL creates their
    /// partitions); run at startup and every minute.
    async fn prepare(&self, _now: DateTime<Utc>) -> Result<(), StoreError> {
        Ok(())
    }
    /// Sends the packets `requeue` selects back to pending, their outcome
    /// appended to their history and their delivery count at 0; answers
    /// their ids and seqs.
    async fn requeue(
        &self,
        requeue: &Requeue,
        at: DateTime<Utc>,
    ) -> Result<Vec<(PacketId, i64)>, StoreError>;
    /// Pending packets after `seq`, oldest first.
    async fn pending_after(&self, seq: i64, limit: u32) -> Result<Vec<PendingPacket>, StoreError>;
    /// Those of `ids` that are pending.
    async fn pending_among(&self, ids: &[PacketId]) -> Result<Vec<PendingPacket>, StoreError>;
    /// Ids (and seqs) of pending packets after seq `after`, oldest first,
    /// at most `limit`.
    async fn pending_ids(&self, after: i64, limit: u32)
    -> Result<Vec<(PacketId, i64)>, StoreError>;
    /// The first seq of the packets received at or after `since` (by the
    /// index that leads with `received_at`), if any.
    async fn first_seq_since(&self, since: DateTime<Utc>) -> Result<Option<i64>, StoreError>;
    async fn user_packets(&self, query: &UserQuery) -> Result<Vec<StoredPacket>, StoreError>;
    async fn counts(&self) -> Result<Counts, StoreError>;
    async fn ping(&self) -> Result<(), StoreError>;
    /// Brings the tables up to date with everything acknowledged (SQLite
    /// folds its record log into them); PostgreSQL's always are.
    async fn sync_tables(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// After the writers: lets go of what the process holds (SQLite's
    /// record log and its lock, so another process may open the file).
    async fn close(&self) {}
    fn writers(&self) -> Writers;
}

/// The store the application uses: reads go to the backend, writes to the
/// writer tasks.
#[derive(Clone)]
pub struct Store {
    backend: Arc<dyn Backend>,
    writer: Writer,
    /// Held for reading by each writer from its COMMIT until it told the
    /// listener; for writing by [`Store::pending_after`].
    gate: Arc<RwLock<()>>,
}

impl Store {
    /// Connects to `database_url` and applies migrations; writing starts
    /// with [`Store::start_writers`].
    pub async fn connect(database_url: &str) -> Result<Store, StoreError> {
        let backend: Arc<dyn Backend> = if database_url.starts_with("postgres:")
            || database_url.starts_with("postgresql:")
        {
            Arc::new(postgres::PgBackend::connect(database_url).await?)
        } else if database_url.starts_with("sqlite:") {
            Arc::new(sqlite::SqliteBackend::connect(database_url).await?)
        } else {
            return Err(StoreError::Internal(
                format!("DATABASE_URL must start with sqlite: or postgres:, got {database_url:?}")
                    .into(),
            ));
        };
        Ok(Store {
            backend,
            writer: Writer::idle(),
            gate: Arc::new(RwLock::new(())),
        })
    }

    /// Starts the writer tasks; `listener` hears of every committed insert.
    /// Clones made before share the writers.
    pub fn start_writers(&self, limits: CommitLimits, listener: Arc<dyn CommitListener>) {
        self.writer
            .start(self.backend.clone(), self.gate.clone(), limits, listener);
    }

    /// Stops taking writes, commits those already queued, and waits.
    pub async fn close(&self) {
        self.writer.close().await;
        self.backend.close().await;
    }

    /// Inserts packets; they are queued together so they share commits.
    pub async fn insert_many(
        &self,
        packets: Vec<Arc<Packet>>,
    ) -> Vec<Result<Inserted, StoreError>> {
        self.writer
            .submit_all(packets.into_iter().map(WriteOp::Insert))
            .await
            .into_iter()
            .map(|reply| match reply? {
                WriteReply::Inserted(receipt) => Ok(receipt),
                other => Err(unexpected(other)),
            })
            .collect()
    }

    /// Records outcomes; they are queued together so they share commits,
    /// ahead of any waiting insert.
    pub async fn mark_many(&self, marks: Vec<Mark>) -> Vec<Result<MarkOutcome, StoreError>> {
        self.writer
            .submit_all(marks.into_iter().map(WriteOp::Mark))
            .await
            .into_iter()
            .map(|reply| match reply? {
                WriteReply::Marked(outcome) => Ok(outcome),
                other => Err(unexpected(other)),
            })
            .collect()
    }

    /// Counts the deliveries of leases that ended unmarked; answers which
    /// of those packets are still open (pending again, or dead_letter once
    /// `max_deliveries` ran out). Processed and failed ones are not listed.
    pub async fn end_leases(
        &self,
        ends: Vec<LeaseEnd>,
        max_deliveries: u32,
    ) -> Result<Vec<Released>, StoreError> {
        if ends.is_empty() {
            return Ok(Vec::new());
        }
        let op = WriteOp::EndLeases {
            ends,
            max_deliveries,
        };
        let reply = self.writer.submit_all([op]).await.pop();
        match reply.expect("one reply per op")? {
            WriteReply::Released(rows) => Ok(rows),
            other => Err(unexpected(other)),
        }
    }

    /// Pending packets after `seq`, oldest first. Every insert committed
    /// before the read was already handed to the commit listener, and none
    /// commits until the returned guard is dropped: what the listener
    /// missed, this read finds, if the caller takes the rows before
    /// dropping the guard.
    pub async fn pending_after(
        &self,
        seq: i64,
        limit: u32,
    ) -> Result<(Vec<PendingPacket>, Quiet), StoreError> {
        let quiet = self.gate.clone().write_owned().await;
        let rows = self.backend.pending_after(seq, limit).await?;
        Ok((rows, Quiet { _guard: quiet }))
    }

    pub async fn pending_among(&self, ids: &[PacketId]) -> Result<Vec<PendingPacket>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        self.backend.pending_among(ids).await
    }

    /// See [`Backend::pending_ids`].
    pub async fn pending_ids(
        &self,
        after: i64,
        limit: u32,
    ) -> Result<Vec<(PacketId, i64)>, StoreError> {
        self.backend.pending_ids(after, limit).await
    }

    /// See [`Backend::first_seq_since`].
    pub async fn first_seq_since(&self, since: DateTime<Utc>) -> Result<Option<i64>, StoreError> {
        self.backend.first_seq_since(since).await
    }

    pub async fn user_packets(&self, query: &UserQuery) -> Result<Vec<StoredPacket>, StoreError> {
        self.backend.user_packets(query).await
    }

    pub async fn counts(&self) -> Result<Counts, StoreError> {
        self.backend.counts().await
    }

    /// See [`Backend::prune`].
    pub async fn prune(&self, before: DateTime<Utc>, limit: u32) -> Result<Pruned, StoreError> {
        self.backend.prune(before, limit).await
    }

    /// See [`Backend::prepare`].
    pub async fn prepare(&self, now: DateTime<Utc>) -> Result<(), StoreError> {
        self.backend.prepare(now).await
    }

    /// See [`Backend::requeue`].
    pub async fn requeue(
        &self,
        requeue: &Requeue,
        at: DateTime<Utc>,
    ) -> Result<Vec<(PacketId, i64)>, StoreError> {
        if requeue.statuses.is_empty() {
            return Ok(Vec::new());
        }
        self.backend.requeue(requeue, at).await
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        self.backend.ping().await
    }

    /// See [`Backend::sync_tables`].
    pub async fn sync_tables(&self) -> Result<(), StoreError> {
        self.backend.sync_tables().await
    }

    /// A handle that brings the tables up to date while this store lives,
    /// without keeping it alive (for tests that read the tables directly).
    pub fn table_sync(&self) -> TableSync {
        TableSync(Arc::downgrade(&self.backend))
    }
}

/// See [`Store::table_sync`].
#[derive(Clone)]
pub struct TableSync(std::sync::Weak<dyn Backend>);

impl TableSync {
    /// Brings the tables up to date; nothing once the store is gone.
    pub async fn sync(&self) {
        if let Some(backend) = self.0.upgrade()
            && let Err(e) = backend.sync_tables().await
        {
            tracing::warn!(error = %e, "bringing the tables up to date failed");
        }
    }
}

/// No insert commits while this is held.
pub struct Quiet {
    _guard: OwnedRwLockWriteGuard<()>,
}

fn unexpected(reply: WriteReply) -> StoreError {
    StoreError::Internal(format!("writer answered with the wrong reply: {reply:?}").into())
}

#[cfg(test)]
mod tests {
    use super::MarkedDelivery::{AfterCounted, Attempt};

    #[test]
    fn a_mark_counts_the_delivery_it_marks() {
        // (what the node knows, stored count, pending) → count after.
        for (attempt, stored, pending, after) in [
            (Attempt(1), 0, true, 1),
            (Attempt(0), 2, true, 2),
            (Attempt(1), 2, false, 2),
            // Issue 16, suspicion 8: through a node that does not hold
            // the lease, the delivery was not counted.
            (AfterCounted, 0, true, 1),
            (AfterCounted, 2, true, 3),
            // Dead-lettered, or failed and marked again: nothing is live.
            (AfterCounted, 5, false, 5),
        ] {
            assert_eq!(
                attempt.count(stored, pending),
                after,
                "{attempt:?} {stored} {pending}"
            );
        }
    }
}
