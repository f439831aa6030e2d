//! PostgreSQL, for real deployments and for several bucket nodes.
//!
//! Each kind of write is one statement per commit group whatever its size:
//! the rows travel as arrays and `UNNEST` turns them into a table, so every
//! statement has one shape and is prepared once per connection.
//!
//! `packets` is partitioned by day (migration 0006); `packet_ids` holds each
//! id once with where its packet is, so statements that address packets by
//! id join through it and touch one partition each.
use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::types::Json;
use sqlx::{Connection, Row};
use tokio::sync::{OwnedRwLockReadGuard, RwLock};
use uuid::Uuid;

use super::partitions;
use super::pg_counts::{self, counted};
use super::rows::{self, PENDING_COLUMNS, PendingRow, StoredRow};
use super::{
    Applied, Backend, Counts, Group, Inserted, LeaseEnd, Mark, MarkOutcome, MarkedDelivery,
    PendingPacket, Pruned, Released, Requeue, StoreError, StoredPacket, UserQuery, Writers,
};
use crate::domain::{DeliveryStatus, Packet, PacketId};

pub struct PgBackend {
    pool: PgPool,
    doubt: Arc<Doubt>,
    /// Folds the appended count deltas while the backend lives.
    folder: tokio::task::AbortHandle,
}

impl Drop for PgBackend {
    fn drop(&mut self) {
        self.folder.abort();
    }
}

/// Pooled connections are used without a ping (a round trip per statement),
/// so after a database restart they are all dead and each would fail its
/// next statement. Once a statement fails for want of the database, every
/// connection is pinged before use for a while, and the dead are replaced.
#[derive(Default)]
struct Doubt {
    until_ms: AtomicI64,
}

/// How long connections stay in doubt after a failure.
const DOUBT: chrono::Duration = chrono::Duration::seconds(10);

impl Doubt {
    fn raise(&self) {
        let until = (Utc::now() + DOUBT).timestamp_millis();
        self.until_ms.store(until, Ordering::Relaxed);
    }

    fn active(&self) -> bool {
        Utc::now().timestamp_millis() < self.until_ms.load(Ordering::Relaxed)
    }

    /// Passes `result` on, raising doubt when the database was away.
    fn note<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(StoreError::Unavailable(_)) = &result {
            self.raise();
        }
        result
    }
}

/// The longest wait for a pooled connection (see [`PgBackend::connect`]).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);

/// How the pool's connections plan.
///
/// Every statement the bucket sends finds its rows by key. A prepared
/// statement's generic plan is made once per connection, about its sixth
/// use: on a new database the tables are then nearly empty, and the plan (a
/// hash join over a sequential scan of packet_ids and of each day's
/// partition) is kept as they grow, until autovacuum's first ANALYZE. At
/// 5,000 packets/s every mark group read the whole of packet_ids:
/// PostgreSQL's backends 122 µs per packet, 68-88 without sequential scans
/// (BENCHMARKS.md, thirteenth session). Where no index serves a statement,
/// a sequential scan is still its plan.
///
/// Such a plan costs more than 10^10 (what PostgreSQL adds to a path it
/// was told not to take), far past `jit_above_cost`, so PostgreSQL compiled
/// it with LLVM each time it ran: the counts' fold (a scan of
/// `packet_count_deltas`, which has no index) took 100-270 ms of a backend's
/// CPU every second. The bucket's statements are short; none gains from
/// compiling. Without JIT: PostgreSQL's backends 69 and 60 µs per packet at
/// 5,000/s against 83 and 90, p99 14 and 13 ms against 24 and 17
/// (BENCHMARKS.md, eighteenth session).
fn pool_options(url: &str) -> Result<PgConnectOptions, sqlx::Error> {
    Ok(PgConnectOptions::from_str(url)?.options([("enable_seqscan", "off"), ("jit", "off")]))
}

impl PgBackend {
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let doubt = Arc::new(Doubt::default());
        let in_doubt = doubt.clone();
        // The schema's own statements plan as PostgreSQL would.
        let mut plain = PgConnection::connect(url).await?;
        sqlx::migrate!("./migrations/postgres")
            .run(&mut plain)
            .await?;
        plain.close().await?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            // While the database is away sqlx retries a refused connection
            // until this runs out, so it bounds how long a request waits to
            // hear UNAVAILABLE: a write queued behind a writer that is itself
            // waiting waits for two of these (5 s made that 10 s).
            .acquire_timeout(ACQUIRE_TIMEOUT)
            // A ping before each use would be a network round trip per
            // statement: only while in doubt (see `Doubt`).
            .test_before_acquire(false)
            .before_acquire(move |conn, _| {
                let in_doubt = in_doubt.clone();
                Box::pin(async move { Ok(!in_doubt.active() || conn.ping().await.is_ok()) })
            })
            .connect_with(pool_options(url)?)
            .await?;
        // Until the days are there, packets go to the default partition,
        // which takes them; the retention task tries again every minute.
        if let Err(e) = partitions::create_ahead(&pool, Utc::now()).await {
            tracing::warn!(error = %e, "day partitions not created ahead; will retry");
        }
        let folder =
            tokio::spawn(pg_counts::fold_every(pool.clone(), pg_counts::FOLD_EVERY)).abort_handle();
        Ok(Self {
            pool,
            doubt,
            folder,
        })
    }
}

/// The id is claimed in `packet_ids`, the packet stored and counted by one
/// statement: only the ids claimed (not already there, first of equals in
/// the batch) get a packet row, and the count of those is the group's one
/// delta (see `pg_counts`).
const INSERT: &str = "WITH u AS (SELECT nextval('packet_seq') AS seq, u.* \
     FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], \
     $5::text[], $6::text[], $7::text[], $8::timestamptz[], $9::text[], $10::text[], \
     $11::float8[], $12::float8[], $13::float8[], $14::float8[], $15::float8[], $16::jsonb[]) \
     AS u(packet_id, user_id, employee_id, session_id, lesson_id, system_type, role, \
     client_timestamp, cognitive_state, state, active_seconds, idle_seconds, away_seconds, \
     focus_score, integrity_score, raw_signals)), \
     claimed AS (INSERT INTO packet_ids (packet_id, received_at, seq) \
     SELECT packet_id, $17::timestamptz, seq FROM u ON CONFLICT (packet_id) DO NOTHING \
     RETURNING seq), \
     counted AS (INSERT INTO packet_count_deltas (day, status, n) \
     SELECT ($17::timestamptz AT TIME ZONE 'UTC')::date, 'pending', COUNT(*) FROM claimed \
     HAVING COUNT(*) > 0) \
     INSERT INTO packets (seq, packet_id, user_id, employee_id, session_id, \
     lesson_id, system_type, role, client_timestamp, cognitive_state, state, active_seconds, \
     idle_seconds, away_seconds, focus_score, integrity_score, raw_signals, received_at) \
     SELECT u.*, $17::timestamptz FROM u JOIN claimed USING (seq) \
     RETURNING packet_id, seq";

/// The status each packet had is read beside the update (`was`, by the
/// LATERAL: one look-up in one partition per id) and required again of the
/// row the update locks: a packet another statement changed in between is
/// left alone, so `was` is exactly what the update replaced, and
/// `mark_all` tries that packet again.
const MARK: &str = concat!(
    "WITH changed AS (UPDATE packets p SET status = m.status, processed_by_karma = m.ok, \
     processed_at = m.at, karma_actions = m.actions, processing_error = m.error, \
     delivery_attempts = CASE WHEN m.attempt >= 0 THEN GREATEST(p.delivery_attempts, m.attempt) \
     WHEN p.status = 'pending' THEN p.delivery_attempts + 1 ELSE p.delivery_attempts END \
     FROM (SELECT m.*, i.seq, i.received_at, o.status AS was \
     FROM UNNEST($1::uuid[], $2::text[], $3::bool[], $4::timestamptz[], $5::jsonb[], \
     $6::text[], $7::int4[]) AS m(id, status, ok, at, actions, error, attempt) \
     JOIN packet_ids i ON i.packet_id = m.id \
     CROSS JOIN LATERAL (SELECT o.status FROM packets o \
     WHERE o.seq = i.seq AND o.received_at = i.received_at LIMIT 1) o) m \
     WHERE p.seq = m.seq AND p.received_at = m.received_at AND p.status <> 'processed' \
     AND p.status = m.was \
     RETURNING p.packet_id, p.received_at, m.was, p.status AS now), ",
    counted!(),
    " SELECT packet_id FROM changed"
);

/// Only pending packets end a lease, so each was 'pending'.
const END: &str = concat!(
    "WITH changed AS (UPDATE packets p \
     SET delivery_attempts = GREATEST(p.delivery_attempts, e.attempts), \
     status = CASE WHEN GREATEST(p.delivery_attempts, e.attempts) >= $3 \
     THEN 'dead_letter' ELSE 'pending' END \
     FROM (SELECT e.*, i.seq, i.received_at FROM UNNEST($1::uuid[], $2::int4[]) AS e(id, attempts) \
     JOIN packet_ids i ON i.packet_id = e.id) e \
     WHERE p.seq = e.seq AND p.received_at = e.received_at AND p.status = 'pending' \
     RETURNING p.packet_id, p.received_at, 'pending'::text AS was, p.status AS now), ",
    counted!(),
    " SELECT packet_id, now AS status FROM changed"
);

/// Stores `packets`; a packet whose id is already stored gets the stored receipt.
async fn insert_all(
    conn: &mut PgConnection,
    packets: &[&Arc<Packet>],
    now: DateTime<Utc>,
) -> Result<Vec<Inserted>, sqlx::Error> {
    if packets.is_empty() {
        return Ok(Vec::new());
    }
    let column =
        |f: fn(&Packet) -> Option<String>| packets.iter().map(|p| f(p)).collect::<Vec<_>>();
    let numbers = |f: fn(&Packet) -> f64| packets.iter().map(|p| f(p)).collect::<Vec<_>>();
    let rows = sqlx::query(INSERT)
        .bind(packets.iter().map(|p| p.packet_id).collect::<Vec<_>>())
        .bind(
            packets
                .iter()
                .map(|p| p.user_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(column(|p| p.employee_id.clone()))
        .bind(column(|p| p.session_id.clone()))
        .bind(column(|p| p.lesson_id.clone()))
        .bind(column(|p| p.system_type.map(|s| s.as_str().to_owned())))
        .bind(column(|p| p.role.map(|r| r.as_str().to_owned())))
        .bind(
            packets
                .iter()
                .map(|p| p.client_timestamp)
                .collect::<Vec<_>>(),
        )
        .bind(
            packets
                .iter()
                .map(|p| p.cognitive_state.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(column(|p| p.state.map(|s| s.as_str().to_owned())))
        .bind(numbers(|p| p.active_seconds))
        .bind(numbers(|p| p.idle_seconds))
        .bind(numbers(|p| p.away_seconds))
        .bind(packets.iter().map(|p| p.focus_score).collect::<Vec<_>>())
        .bind(numbers(|p| p.integrity_score))
        .bind(
            packets
                .iter()
                .map(|p| Json(&p.raw_signals))
                .collect::<Vec<_>>(),
        )
        .bind(now)
        .fetch_all(&mut *conn)
        .await?;
    let mut created: HashMap<PacketId, i64> = HashMap::with_capacity(rows.len());
    for row in rows {
        created.insert(row.try_get("packet_id")?, row.try_get("seq")?);
    }
    // The first of several equal ids in a batch creates it.
    let fresh: Vec<Option<i64>> = packets
        .iter()
        .map(|p| created.remove(&p.packet_id))
        .collect();
    let retried: Vec<PacketId> = packets
        .iter()
        .zip(&fresh)
        .filter(|(_, seq)| seq.is_none())
        .map(|(p, _)| p.packet_id)
        .collect();
    // Retries get the stored receipt, all in one query. An id whose day
    // retention dropped is still there until retention forgets it: a late
    // retry of it is answered as the duplicate it is.
    let stored: HashMap<PacketId, (i64, DateTime<Utc>)> = if retried.is_empty() {
        HashMap::new()
    } else {
        sqlx::query_as::<_, (PacketId, i64, DateTime<Utc>)>(
            "SELECT packet_id, seq, received_at FROM packet_ids WHERE packet_id = ANY($1)",
        )
        .bind(&retried)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|(id, seq, at)| (id, (seq, at)))
        .collect()
    };
    packets
        .iter()
        .zip(fresh)
        .map(|(p, seq)| match seq {
            Some(seq) => Ok(Inserted {
                packet_id: p.packet_id,
                received_at: now,
                created: true,
                seq,
            }),
            None => {
                let (seq, received_at) =
                    stored.get(&p.packet_id).ok_or(sqlx::Error::RowNotFound)?;
                Ok(Inserted {
                    packet_id: p.packet_id,
                    received_at: *received_at,
                    created: false,
                    seq: *seq,
                })
            }
        })
        .collect()
}

/// A mark's delivery as MARK takes it: the attempt, or -1 for the one
/// after those counted (MarkedDelivery::count, in SQL).
fn attempt_code(attempt: MarkedDelivery) -> i32 {
    match attempt {
        MarkedDelivery::Attempt(n) => i32::try_from(n).unwrap_or(i32::MAX),
        MarkedDelivery::AfterCounted => -1,
    }
}

/// How often a mark is tried again when its packet changed between the
/// statement's read of its status and its update (see [`MARK`]): another
/// node's mark or lease end, an operator's Redrive, each a commit apart.
const RACES: usize = 8;

/// Records `marks`; each answer in their order.
async fn mark_all(
    conn: &mut PgConnection,
    marks: &[&Mark],
) -> Result<Vec<MarkOutcome>, sqlx::Error> {
    let mut outcomes = vec![MarkOutcome::NotFound; marks.len()];
    for round in rows::rounds(marks, |m| m.packet_id) {
        let all: Vec<&Mark> = round.iter().map(|&i| marks[i]).collect();
        let mut batch = all.clone();
        let mut applied: HashSet<PacketId> = HashSet::new();
        let mut known: HashSet<PacketId> = HashSet::new();
        for _ in 0..RACES {
            applied.extend(mark_once(conn, &batch).await?);
            let rest: Vec<PacketId> = batch
                .iter()
                .map(|m| m.packet_id)
                .filter(|id| !applied.contains(id))
                .collect();
            if rest.is_empty() {
                break;
            }
            // Through the packet itself: an id whose day was dropped is not
            // a packet any more.
            let stored: Vec<(PacketId, String)> = sqlx::query_as(
                "SELECT i.packet_id, x.status FROM packet_ids i CROSS JOIN LATERAL (\
                 SELECT p.status FROM packets p \
                 WHERE p.seq = i.seq AND p.received_at = i.received_at LIMIT 1) x \
                 WHERE i.packet_id = ANY($1)",
            )
            .bind(&rest)
            .fetch_all(&mut *conn)
            .await?;
            let raced: HashSet<PacketId> = stored
                .iter()
                .filter(|(_, status)| status != DeliveryStatus::Processed.as_str())
                .map(|(id, _)| *id)
                .collect();
            known.extend(stored.into_iter().map(|(id, _)| id));
            if raced.is_empty() {
                break;
            }
            batch.retain(|m| raced.contains(&m.packet_id));
        }
        for (i, m) in round.into_iter().zip(all) {
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

/// One MARK statement over `batch` (distinct ids): the ids it changed.
async fn mark_once(conn: &mut PgConnection, batch: &[&Mark]) -> Result<Vec<PacketId>, sqlx::Error> {
    let status = |m: &&Mark| {
        if m.success {
            DeliveryStatus::Processed.as_str()
        } else {
            DeliveryStatus::Failed.as_str()
        }
    };
    sqlx::query_scalar(MARK)
        .bind(batch.iter().map(|m| m.packet_id).collect::<Vec<_>>())
        .bind(batch.iter().map(status).collect::<Vec<_>>())
        .bind(batch.iter().map(|m| m.success).collect::<Vec<_>>())
        .bind(batch.iter().map(|m| m.at).collect::<Vec<_>>())
        .bind(
            batch
                .iter()
                .map(|m| Json(&m.karma_actions))
                .collect::<Vec<_>>(),
        )
        .bind(
            batch
                .iter()
                .map(|m| m.error_message.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            batch
                .iter()
                .map(|m| attempt_code(m.attempt))
                .collect::<Vec<_>>(),
        )
        .fetch_all(&mut *conn)
        .await
}

async fn end_all(
    conn: &mut PgConnection,
    ends: &[LeaseEnd],
    max_deliveries: u32,
) -> Result<Vec<Released>, sqlx::Error> {
    let mut released = Vec::with_capacity(ends.len());
    for round in rows::rounds(ends, |e| e.packet_id) {
        let rows = sqlx::query(END)
            .bind(round.iter().map(|&i| ends[i].packet_id).collect::<Vec<_>>())
            .bind(
                round
                    .iter()
                    .map(|&i| ends[i].attempts as i32)
                    .collect::<Vec<_>>(),
            )
            .bind(max_deliveries as i32)
            .fetch_all(&mut *conn)
            .await?;
        for row in rows {
            let status: String = row.try_get("status")?;
            released.push(Released {
                packet_id: row.try_get("packet_id")?,
                status: DeliveryStatus::parse(&status).ok_or_else(|| {
                    sqlx::Error::Decode(format!("unknown status {status:?}").into())
                })?,
            });
        }
    }
    Ok(released)
}

#[async_trait]
impl Backend for PgBackend {
    async fn write(
        &self,
        group: &Group<'_>,
        gate: &Arc<RwLock<()>>,
    ) -> (Applied, Option<OwnedRwLockReadGuard<()>>) {
        let mut conn = match self.pool.acquire().await {
            Ok(conn) => conn,
            Err(e) => {
                let e = self.doubt.note::<()>(Err(StoreError::from(e))).unwrap_err();
                let marks = Err(e.clone());
                let ends = Err(e.clone());
                return (
                    Applied {
                        marks,
                        ends,
                        inserts: Err(e),
                    },
                    None,
                );
            }
        };
        let marks = match group.marks.is_empty() {
            true => Ok(Vec::new()),
            false => mark_all(&mut conn, &group.marks)
                .await
                .map_err(StoreError::from),
        };
        let ends = match group.ends.is_empty() {
            true => Ok(Vec::new()),
            false => self.doubt.note(
                end_all(&mut conn, &group.ends, group.max_deliveries)
                    .await
                    .map_err(StoreError::from),
            ),
        };
        if group.inserts.is_empty() {
            let inserts = Ok(Vec::new());
            return (
                Applied {
                    marks,
                    ends,
                    inserts,
                },
                None,
            );
        }
        let gate = gate.clone().read_owned().await;
        let inserts = self.doubt.note(
            insert_all(&mut conn, &group.inserts, group.at)
                .await
                .map_err(StoreError::from),
        );
        (
            Applied {
                marks,
                ends,
                inserts,
            },
            Some(gate),
        )
    }

    async fn prune(&self, before: DateTime<Utc>, limit: u32) -> Result<Pruned, StoreError> {
        self.doubt
            .note(partitions::prune(&self.pool, before, limit).await)
    }

    async fn prepare(&self, now: DateTime<Utc>) -> Result<(), StoreError> {
        self.doubt
            .note(partitions::create_ahead(&self.pool, now).await)
    }

    async fn requeue(
        &self,
        requeue: &Requeue,
        at: DateTime<Utc>,
    ) -> Result<Vec<(PacketId, i64)>, StoreError> {
        // The status each packet had is the one its new history entry
        // keeps, read from the row the update locked: exact, whatever ran
        // beside it.
        let sql = format!(
            "WITH changed AS (UPDATE packets SET history = history || \
             jsonb_build_array(jsonb_build_object(\
             'reason', $1::text, 'requeued_at', $2::timestamptz, 'status', status, \
             'delivery_attempts', delivery_attempts, 'processed_at', processed_at, \
             'processed_by_karma', processed_by_karma, 'karma_actions', karma_actions, \
             'error_message', processing_error)), \
             status = 'pending', delivery_attempts = 0, processed_at = NULL, \
             processed_by_karma = FALSE, karma_actions = '[]', processing_error = NULL \
             WHERE status IN ({}) AND ($3::text IS NULL OR user_id = $3) \
             AND ($4::timestamptz IS NULL OR received_at >= $4) \
             AND ($5::timestamptz IS NULL OR received_at < $5) \
             RETURNING packet_id, seq, received_at, history -> -1 ->> 'status' AS was, \
             status AS now), {} \
             SELECT packet_id, seq FROM changed",
            requeue.status_list(),
            counted!()
        );
        let rows: Result<Vec<(PacketId, i64)>, StoreError> = sqlx::query_as(&sql)
            .bind(requeue.reason.as_str())
            .bind(at)
            .bind(requeue.user_id.as_deref())
            .bind(requeue.received_from)
            .bind(requeue.received_before)
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::from);
        self.doubt.note(rows)
    }

    async fn pending_after(&self, seq: i64, limit: u32) -> Result<Vec<PendingPacket>, StoreError> {
        let sql = format!(
            "SELECT {PENDING_COLUMNS} FROM packets WHERE status = 'pending' AND seq > $1 \
             ORDER BY seq LIMIT $2"
        );
        let rows: Vec<PendingRow<Uuid>> = sqlx::query_as(&sql)
            .bind(seq)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(PendingRow::into_pending).collect()
    }

    async fn pending_among(&self, ids: &[PacketId]) -> Result<Vec<PendingPacket>, StoreError> {
        // LATERAL with LIMIT keeps this a loop over the ids, each looking
        // in one partition; a semi-join would be free to read every
        // partition's pending rows.
        let sql = format!(
            "SELECT x.* FROM packet_ids i CROSS JOIN LATERAL (SELECT {PENDING_COLUMNS} \
             FROM packets WHERE seq = i.seq AND received_at = i.received_at \
             AND status = 'pending' LIMIT 1) x WHERE i.packet_id = ANY($1) ORDER BY x.seq"
        );
        let rows: Vec<PendingRow<Uuid>> =
            sqlx::query_as(&sql).bind(ids).fetch_all(&self.pool).await?;
        rows.into_iter().map(PendingRow::into_pending).collect()
    }

    async fn pending_ids(
        &self,
        after: i64,
        limit: u32,
    ) -> Result<Vec<(PacketId, i64)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT packet_id, seq FROM packets WHERE status = 'pending' AND seq > $1 \
             ORDER BY seq LIMIT $2",
        )
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?)
    }

    async fn first_seq_since(&self, since: DateTime<Utc>) -> Result<Option<i64>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT MIN(seq) FROM packets WHERE received_at >= $1")
                .bind(since)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn user_packets(&self, query: &UserQuery) -> Result<Vec<StoredPacket>, StoreError> {
        let rows: Vec<StoredRow<Uuid>> = sqlx::query_as(&rows::user_packets_sql(query.status))
            .bind(&query.user_id)
            .bind(query.before_seq.unwrap_or(i64::MAX))
            .bind(i64::from(query.limit))
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(StoredRow::into_stored).collect()
    }

    async fn counts(&self) -> Result<Counts, StoreError> {
        // Per day and status, folded (a few rows a day) and appended since
        // the last fold (about a second's statements): migration 0007.
        let rows: Vec<(String, i64)> = sqlx::query_as(pg_counts::COUNTS)
            .fetch_all(&self.pool)
            .await?;
        Ok(Counts::from_rows(rows))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let pinged = sqlx::query("SELECT 1").execute(&self.pool).await;
        self.doubt.note(pinged.map(drop).map_err(StoreError::from))
    }

    async fn close(&self) {
        self.folder.abort();
    }

    fn writers(&self) -> Writers {
        // PostgreSQL takes concurrent transactions: two insert writers
        // overlap one commit's round trips with the next, and marks have a
        // writer of their own. More writers made smaller groups, more
        // commits and more PostgreSQL CPU per packet (BENCHMARKS.md).
        Writers {
            ingest: 2,
            delivery: 1,
            blocking: false,
            // Fewer, larger commits cost PostgreSQL less CPU, which on a
            // shared machine is also lower latency (BENCHMARKS.md). The
            // wait grows with the company (see `writer::linger`): at
            // 5,000/s a fixed 1 ms made ~600 commits a second; growing it
            // 100 µs a companion to 5 ms took bucket + PostgreSQL + Redis
            // from 191-205 to 158-166 µs per packet with acks on the
            // stream, but two ingest writers split the company and the
            // wait stayed near 1.6 ms; 300 µs a companion reaches the 5 ms
            // at that rate: 137-145 µs, p99 14.6-14.7 ms in two runs of
            // three (the third stalled: 44 ms) against 14.0-14.7
            // (BENCHMARKS.md, thirteenth session). At 200/s the groups stay
            // small and so does the wait.
            linger: Duration::from_millis(1),
            max_linger: Duration::from_millis(5),
            per_companion: Duration::from_micros(300),
            // A commit is a round trip: larger groups, fewer of them.
            max_commit: 1000,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plan of the counts' fold, run on `conn`, as JSON.
    async fn explained_fold(conn: &mut PgConnection) -> String {
        let plan: serde_json::Value = sqlx::query_scalar(&format!(
            "EXPLAIN (ANALYZE, FORMAT JSON) {}",
            pg_counts::FOLD
        ))
        .bind(pg_counts::COUNTS_LOCK)
        .fetch_one(&mut *conn)
        .await
        .expect("EXPLAIN the counts' fold");
        plan.to_string()
    }

    /// The fold scans a table without an index, which the pool's
    /// connections price past `jit_above_cost` (see `pool_options`); on
    /// them it runs as it is, where PostgreSQL's defaults compile it.
    #[tokio::test]
    async fn the_pools_connections_never_compile_a_plan() {
        let url = std::env::var("BUCKET_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
        let mut conn = PgConnection::connect_with(&pool_options(&url).expect("the URL"))
            .await
            .expect("PostgreSQL for tests (BUCKET_TEST_POSTGRES_URL)");
        // The fold's tables as this session's own: they hide any others.
        sqlx::raw_sql(
            "CREATE TEMP TABLE packet_count_deltas (day DATE NOT NULL, status TEXT NOT NULL, \
             n BIGINT NOT NULL); \
             CREATE TEMP TABLE packet_counts (day DATE NOT NULL, status TEXT NOT NULL, \
             n BIGINT NOT NULL, PRIMARY KEY (day, status)); \
             INSERT INTO packet_count_deltas VALUES (CURRENT_DATE, 'pending', 3)",
        )
        .execute(&mut conn)
        .await
        .expect("the fold's tables");
        let plan = explained_fold(&mut conn).await;
        assert!(!plan.contains("\"JIT\""), "compiled: {plan}");

        // The same connection with PostgreSQL's default compiles it, where
        // this server can compile at all (which asks for `jit` on too).
        sqlx::raw_sql("SET jit = on")
            .execute(&mut conn)
            .await
            .expect("SET jit");
        let can: bool = sqlx::query_scalar("SELECT pg_jit_available()")
            .fetch_one(&mut conn)
            .await
            .expect("pg_jit_available");
        if can {
            let plan = explained_fold(&mut conn).await;
            assert!(plan.contains("\"JIT\""), "not compiled: {plan}");
        }
    }
}
