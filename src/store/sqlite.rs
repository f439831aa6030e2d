//! SQLite, the embedded default: one file, WAL, an fsync per commit.
//!
//! Each kind of write is one statement per commit group: a multi-row
//! INSERT, and `UPDATE … FROM (VALUES …)` for marks and lease ends. Their
//! text is built once per power-of-two row count, so every shape is
//! prepared once per connection.
use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SubsecRound, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::types::Json;
use sqlx::{Connection, Row};
use tokio::sync::{OwnedRwLockReadGuard, RwLock};
use uuid::Uuid;
use uuid::fmt::Hyphenated;

use super::rows::{self, PENDING_COLUMNS, PendingRow, STORED_COLUMNS, StoredRow, chunks};
use super::{
    Backend, Counts, Inserted, LeaseEnd, Mark, MarkOutcome, PendingPacket, Released, StoreError,
    StoredPacket, UserQuery, WriteOp, WriteReply, Writers,
};
use crate::domain::{DeliveryStatus, Packet};

pub struct SqliteBackend {
    /// One connection: SQLite has one writer anyway, and a connection that
    /// always writes keeps its page cache warm.
    writes: SqlitePool,
    reads: SqlitePool,
}

impl SqliteBackend {
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a commit is on disk before ingest answers, even if the
            // machine loses power. Group commit pays for the fsync.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        let writes = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&writes).await?;
        let reads = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        Ok(Self { writes, reads })
    }
}

fn id(id: Uuid) -> Hyphenated {
    id.hyphenated()
}

/// `n` groups of `width` placeholders: `(?, ?), (?, ?)`.
fn placeholders(n: usize, width: usize) -> String {
    let row = format!("({})", vec!["?"; width].join(", "));
    vec![row; n].join(", ")
}

/// The statement for `n` rows (a power of two), built on first use.
fn cached(
    cache: &'static OnceLock<Vec<String>>,
    n: usize,
    build: fn(usize) -> String,
) -> &'static str {
    let shapes = cache.get_or_init(|| {
        (0..=rows::MAX_ROWS_PER_STATEMENT.ilog2())
            .map(|k| build(1 << k))
            .collect()
    });
    &shapes[n.ilog2() as usize]
}

fn insert_sql(n: usize) -> String {
    format!(
        "INSERT INTO packets (packet_id, user_id, employee_id, session_id, lesson_id, \
         system_type, role, client_timestamp, cognitive_state, state, active_seconds, \
         idle_seconds, away_seconds, focus_score, integrity_score, raw_signals, received_at) \
         VALUES {} ON CONFLICT (packet_id) DO NOTHING RETURNING packet_id, seq",
        placeholders(n, 17)
    )
}

fn mark_sql(n: usize) -> String {
    format!(
        "WITH m(id, status, ok, at, actions, error, attempt) AS (VALUES {}) \
         UPDATE packets SET status = m.status, processed_by_karma = m.ok, \
         processed_at = m.at, karma_actions = m.actions, processing_error = m.error, \
         delivery_attempts = MAX(packets.delivery_attempts, m.attempt) \
         FROM m WHERE packets.packet_id = m.id AND packets.status <> 'processed' \
         RETURNING packet_id",
        placeholders(n, 7)
    )
}

fn end_sql(n: usize) -> String {
    format!(
        "WITH e(id, attempts) AS (VALUES {}) \
         UPDATE packets SET delivery_attempts = MAX(packets.delivery_attempts, e.attempts), \
         status = CASE WHEN MAX(packets.delivery_attempts, e.attempts) >= ? \
         THEN 'dead_letter' ELSE 'pending' END \
         FROM e WHERE packets.packet_id = e.id AND packets.status = 'pending' \
         RETURNING packet_id, status",
        placeholders(n, 2)
    )
}

fn known_sql(n: usize) -> String {
    format!(
        "SELECT packet_id FROM packets WHERE packet_id IN ({})",
        vec!["?"; n].join(", ")
    )
}

fn pending_among_sql(n: usize) -> String {
    format!(
        "SELECT {PENDING_COLUMNS} FROM packets WHERE status = 'pending' AND packet_id IN ({})",
        vec!["?"; n].join(", ")
    )
}

static INSERT: OnceLock<Vec<String>> = OnceLock::new();
static MARK: OnceLock<Vec<String>> = OnceLock::new();
static END: OnceLock<Vec<String>> = OnceLock::new();
static KNOWN: OnceLock<Vec<String>> = OnceLock::new();
static PENDING_AMONG: OnceLock<Vec<String>> = OnceLock::new();

/// Stores `packets`; a packet whose id is already stored gets the stored receipt.
async fn insert_all(
    conn: &mut SqliteConnection,
    packets: &[&Arc<Packet>],
    now: DateTime<Utc>,
) -> Result<Vec<Inserted>, sqlx::Error> {
    let mut created = std::collections::HashMap::with_capacity(packets.len());
    for chunk in chunks(packets) {
        let mut query = sqlx::query(cached(&INSERT, chunk.len(), insert_sql));
        for p in chunk {
            query = query
                .bind(id(p.packet_id))
                .bind(&p.user_id)
                .bind(&p.employee_id)
                .bind(&p.session_id)
                .bind(&p.lesson_id)
                .bind(&p.system_type)
                .bind(&p.role)
                .bind(p.client_timestamp)
                .bind(&p.cognitive_state)
                .bind(&p.state)
                .bind(p.active_seconds)
                .bind(p.idle_seconds)
                .bind(p.away_seconds)
                .bind(p.focus_score)
                .bind(p.integrity_score)
                .bind(Json(&p.raw_signals))
                .bind(now);
        }
        for row in query.fetch_all(&mut *conn).await? {
            let packet_id: Hyphenated = row.try_get("packet_id")?;
            created.insert(Uuid::from(packet_id), row.try_get::<i64, _>("seq")?);
        }
    }
    let mut receipts = Vec::with_capacity(packets.len());
    for p in packets {
        // The first of several equal ids in a batch creates it.
        let receipt = match created.remove(&p.packet_id) {
            Some(seq) => Inserted {
                packet_id: p.packet_id,
                received_at: now,
                created: true,
                seq,
            },
            None => {
                let row = sqlx::query("SELECT seq, received_at FROM packets WHERE packet_id = ?")
                    .bind(id(p.packet_id))
                    .fetch_one(&mut *conn)
                    .await?;
                Inserted {
                    packet_id: p.packet_id,
                    received_at: row.try_get("received_at")?,
                    created: false,
                    seq: row.try_get("seq")?,
                }
            }
        };
        receipts.push(receipt);
    }
    Ok(receipts)
}

/// Records `marks`; each answer in their order.
async fn mark_all(
    conn: &mut SqliteConnection,
    marks: &[&Mark],
) -> Result<Vec<MarkOutcome>, sqlx::Error> {
    let mut outcomes = vec![MarkOutcome::NotFound; marks.len()];
    for round in rows::rounds(marks, |m| m.packet_id) {
        let round: Vec<(usize, &Mark)> = round.into_iter().map(|i| (i, marks[i])).collect();
        let mut applied = std::collections::HashSet::with_capacity(round.len());
        for chunk in chunks(&round) {
            let mut query = sqlx::query(cached(&MARK, chunk.len(), mark_sql));
            for (_, m) in chunk {
                let status = if m.success {
                    DeliveryStatus::Processed
                } else {
                    DeliveryStatus::Failed
                };
                query = query
                    .bind(id(m.packet_id))
                    .bind(status.as_str())
                    .bind(m.success)
                    .bind(m.at)
                    .bind(Json(&m.karma_actions))
                    .bind(&m.error_message)
                    .bind(m.attempt as i32);
            }
            for row in query.fetch_all(&mut *conn).await? {
                applied.insert(Uuid::from(row.try_get::<Hyphenated, _>("packet_id")?));
            }
        }
        let rest: Vec<Uuid> = round
            .iter()
            .map(|(_, m)| m.packet_id)
            .filter(|id| !applied.contains(id))
            .collect();
        let known = known_ids(conn, &rest).await?;
        for (i, m) in round {
            outcomes[i] = if applied.contains(&m.packet_id) {
                MarkOutcome::Applied
            } else if known.contains(&m.packet_id) {
                MarkOutcome::AlreadyProcessed
            } else {
                MarkOutcome::NotFound
            };
        }
    }
    Ok(outcomes)
}

/// Those of `ids` that are stored.
async fn known_ids(
    conn: &mut SqliteConnection,
    ids: &[Uuid],
) -> Result<std::collections::HashSet<Uuid>, sqlx::Error> {
    let mut known = std::collections::HashSet::new();
    for chunk in chunks(ids) {
        let mut query = sqlx::query(cached(&KNOWN, chunk.len(), known_sql));
        for packet_id in chunk {
            query = query.bind(id(*packet_id));
        }
        for row in query.fetch_all(&mut *conn).await? {
            known.insert(Uuid::from(row.try_get::<Hyphenated, _>("packet_id")?));
        }
    }
    Ok(known)
}

async fn end_all(
    conn: &mut SqliteConnection,
    ends: &[LeaseEnd],
    max_deliveries: u32,
) -> Result<Vec<Released>, sqlx::Error> {
    let mut released = Vec::with_capacity(ends.len());
    for round in rows::rounds(ends, |e| e.packet_id) {
        let round: Vec<LeaseEnd> = round.into_iter().map(|i| ends[i]).collect();
        for chunk in chunks(&round) {
            let mut query = sqlx::query(cached(&END, chunk.len(), end_sql));
            for end in chunk {
                query = query.bind(id(end.packet_id)).bind(end.attempts as i32);
            }
            query = query.bind(max_deliveries as i32);
            for row in query.fetch_all(&mut *conn).await? {
                released.push(released_row(&row)?);
            }
        }
    }
    Ok(released)
}

fn released_row(row: &sqlx::sqlite::SqliteRow) -> Result<Released, sqlx::Error> {
    let status: String = row.try_get("status")?;
    Ok(Released {
        packet_id: row.try_get::<Hyphenated, _>("packet_id")?.into(),
        status: DeliveryStatus::parse(&status)
            .ok_or_else(|| sqlx::Error::Decode(format!("unknown status {status:?}").into()))?,
    })
}

#[async_trait]
impl Backend for SqliteBackend {
    async fn write(
        &self,
        ops: &[WriteOp],
        gate: Arc<RwLock<()>>,
    ) -> Result<(Vec<WriteReply>, OwnedRwLockReadGuard<()>), StoreError> {
        // Microseconds: what PostgreSQL keeps, so a receipt equals a re-read.
        let now = Utc::now().trunc_subsecs(6);
        let mut conn = self.writes.acquire().await?;
        let mut tx = conn.begin().await?;
        let packets: Vec<&Arc<Packet>> = ops
            .iter()
            .filter_map(|op| match op {
                WriteOp::Insert(p) => Some(p),
                _ => None,
            })
            .collect();
        let marks: Vec<&Mark> = ops
            .iter()
            .filter_map(|op| match op {
                WriteOp::Mark(m) => Some(m),
                _ => None,
            })
            .collect();
        // Inserts first: no other write of a batch can concern a packet
        // whose insert is not yet acknowledged.
        let mut inserted = insert_all(&mut tx, &packets, now).await?.into_iter();
        let mut marked = mark_all(&mut tx, &marks).await?.into_iter();
        let mut replies = Vec::with_capacity(ops.len());
        for op in ops {
            replies.push(match op {
                WriteOp::Insert(_) => {
                    WriteReply::Inserted(inserted.next().expect("one receipt per insert"))
                }
                WriteOp::Mark(_) => WriteReply::Marked(marked.next().expect("one per mark")),
                WriteOp::EndLeases {
                    ends,
                    max_deliveries,
                } => WriteReply::Released(end_all(&mut tx, ends, *max_deliveries).await?),
            });
        }
        let gate = gate.read_owned().await;
        tx.commit().await?;
        Ok((replies, gate))
    }

    async fn pending_after(&self, seq: i64, limit: u32) -> Result<Vec<PendingPacket>, StoreError> {
        let sql = format!(
            "SELECT {PENDING_COLUMNS} FROM packets WHERE status = 'pending' AND seq > $1 \
             ORDER BY seq LIMIT $2"
        );
        let rows: Vec<PendingRow<Hyphenated>> = sqlx::query_as(&sql)
            .bind(seq)
            .bind(i64::from(limit))
            .fetch_all(&self.reads)
            .await?;
        Ok(rows.into_iter().map(PendingRow::into_pending).collect())
    }

    async fn pending_among(&self, ids: &[Uuid]) -> Result<Vec<PendingPacket>, StoreError> {
        let mut found = Vec::with_capacity(ids.len());
        for chunk in chunks(ids) {
            let mut query = sqlx::query_as(cached(&PENDING_AMONG, chunk.len(), pending_among_sql));
            for packet_id in chunk {
                query = query.bind(id(*packet_id));
            }
            let rows: Vec<PendingRow<Hyphenated>> = query.fetch_all(&self.reads).await?;
            found.extend(rows.into_iter().map(PendingRow::into_pending));
        }
        found.sort_by_key(|p| p.seq);
        Ok(found)
    }

    async fn pending_ids(&self) -> Result<Vec<Uuid>, StoreError> {
        let ids: Vec<Hyphenated> = sqlx::query_scalar(
            "SELECT packet_id FROM packets WHERE status = 'pending' ORDER BY seq",
        )
        .fetch_all(&self.reads)
        .await?;
        Ok(ids.into_iter().map(Uuid::from).collect())
    }

    async fn user_packets(&self, query: &UserQuery) -> Result<Vec<StoredPacket>, StoreError> {
        let sql = format!(
            "SELECT {STORED_COLUMNS} FROM packets WHERE user_id = $1 \
             AND ($2 IS NULL OR status = $2) AND seq < $3 ORDER BY seq DESC LIMIT $4"
        );
        let rows: Vec<StoredRow<Hyphenated>> = sqlx::query_as(&sql)
            .bind(&query.user_id)
            .bind(query.status.map(DeliveryStatus::as_str))
            .bind(query.before_seq.unwrap_or(i64::MAX))
            .bind(i64::from(query.limit))
            .fetch_all(&self.reads)
            .await?;
        rows.into_iter().map(StoredRow::into_stored).collect()
    }

    async fn counts(&self) -> Result<Counts, StoreError> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, COUNT(*) FROM packets GROUP BY status")
                .fetch_all(&self.reads)
                .await?;
        Ok(Counts::from_rows(rows))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.reads).await?;
        Ok(())
    }

    fn writers(&self) -> Writers {
        Writers {
            ingest: 1,
            delivery: 0,
        }
    }
}
