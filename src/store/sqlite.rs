//! SQLite, the embedded default: one file, WAL, an fsync per commit.
//!
//! Writes run on a thread of their own that owns the writing connection
//! (rusqlite, over the same bundled SQLite as sqlx): a commit group is one
//! transaction (one fsync) of prepared one-row statements, with no thread
//! hop per statement. sqlx, which hands every statement to a worker thread
//! and back (two context switches, measured at ~60 µs of CPU each on this
//! kind of machine), does the migrations and every read.
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::{OptionalExtension, params};
use sqlx::sqlite::{
    SqliteAutoVacuum, SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection};
use tokio::sync::{OwnedRwLockReadGuard, RwLock};
use uuid::Uuid;
use uuid::fmt::Hyphenated;

use super::rows::{self, PENDING_COLUMNS, PendingRow, StoredRow};
use super::{
    Applied, Backend, Counts, Group, Inserted, LeaseEnd, Mark, MarkOutcome, PendingPacket, Pruned,
    Released, Requeue, StoreError, StoredPacket, UserQuery, Writers,
};
use crate::domain::{DeliveryStatus, Packet, PacketId};

pub struct SqliteBackend {
    /// The one writing connection, used by the writer thread only: SQLite
    /// has one writer anyway, and a connection that always writes keeps its
    /// page cache warm.
    writes: Arc<std::sync::Mutex<rusqlite::Connection>>,
    reads: SqlitePool,
    /// The checkpointer thread runs while this lives.
    _checkpointing: Arc<()>,
    /// Set by the checkpointer when the writer should let the WAL start over.
    restart_wal: Arc<AtomicBool>,
}

/// How often the WAL is copied back into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// WAL frames (4 KiB pages) past which the WAL is started over.
const WAL_LIMIT_FRAMES: i64 = 16_384;

/// The WAL file is cut back to this when it is started over.
const WAL_KEEP_BYTES: i64 = WAL_LIMIT_FRAMES * 4096;

/// Copies the WAL into the database file from a connection of its own, so
/// the writer never stops for it (SQLite's automatic checkpoint would run
/// inside a commit, holding up every waiting write for tens of ms).
/// PASSIVE: it never waits for, nor blocks, the writer or readers.
///
/// But under steady writes a checkpoint from another connection never
/// finds the WAL complete (frames keep coming while it copies), and SQLite
/// starts the WAL over only when it is, so the file grew without bound
/// (545 MB of WAL beside an 82 MB database after 200,000 packets). Past
/// `WAL_LIMIT_FRAMES` this thread raises `restart`, and the writer, between
/// two commits, copies the little left since this pass (`finish_checkpoint`):
/// the next commit then writes from the start of the file. A TRUNCATE
/// checkpoint from here did the same by holding every writer back until it
/// had copied and cut the file: 30-40 ms stalls each second at 5,000
/// packets/s, the p99 of the whole path (BENCHMARKS.md).
fn checkpoint_in_background(
    path: &std::path::Path,
    alive: std::sync::Weak<()>,
    restart: Arc<AtomicBool>,
) -> Result<(), StoreError> {
    let conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    std::thread::Builder::new()
        .name("bucket-checkpoint".into())
        .spawn(move || {
            while alive.upgrade().is_some() {
                std::thread::sleep(CHECKPOINT_EVERY);
                match passive_checkpoint(&conn) {
                    Ok(frames) if frames > WAL_LIMIT_FRAMES => {
                        restart.store(true, Ordering::Relaxed)
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed; retrying"),
                }
            }
        })
        .map_err(|e| StoreError::Internal(format!("checkpoint thread: {e}").into()))?;
    Ok(())
}

/// Copies what it can of the WAL into the database; answers the frames in
/// the WAL.
fn passive_checkpoint(conn: &rusqlite::Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))
}

/// On the writing connection, between commits, when the checkpointer asked:
/// nothing can add frames meanwhile, so (unless a reader still needs old
/// frames; then it is asked again on its next pass) the WAL ends up fully
/// copied and the next commit starts it over.
fn finish_checkpoint(conn: &rusqlite::Connection, restart: &AtomicBool) {
    if restart.swap(false, Ordering::Relaxed)
        && let Err(e) = passive_checkpoint(conn)
    {
        tracing::warn!(error = %e, "WAL checkpoint on the writer failed; retrying");
    }
}

impl SqliteBackend {
    /// Runs `work` on the writing connection, on a blocking thread (SQLite
    /// has one writer; an operator's write waits between commit groups).
    async fn on_writer<T: Send + 'static>(
        &self,
        what: &'static str,
        work: impl FnOnce(&mut rusqlite::Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let writes = self.writes.clone();
        tokio::task::spawn_blocking(move || {
            work(&mut writes.lock().expect("writer connection lock"))
        })
        .await
        .map_err(|e| StoreError::Internal(format!("{what} task: {e}").into()))?
        .map_err(StoreError::from)
    }

    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a commit is on disk before ingest answers, even if the
            // machine loses power. Group commit pays for the fsync.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(5))
            // Retention deletes old packets; with incremental vacuum the
            // freed pages are given back and the file shrinks. Takes effect
            // for a new database (an existing one keeps its mode until a
            // VACUUM; see README).
            .auto_vacuum(SqliteAutoVacuum::Incremental)
            .foreign_keys(true);
        let mut migrator = options.connect().await?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&mut migrator)
            .await?;
        migrator.close().await?;
        let writes = rusqlite::Connection::open(options.get_filename())?;
        writes.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
             PRAGMA busy_timeout = 5000; PRAGMA foreign_keys = ON; \
             PRAGMA wal_autocheckpoint = 0;",
        )?;
        writes.pragma_update(None, "journal_size_limit", WAL_KEEP_BYTES)?;
        let checkpointing = Arc::new(());
        let restart = Arc::new(AtomicBool::new(false));
        checkpoint_in_background(
            options.get_filename(),
            Arc::downgrade(&checkpointing),
            restart.clone(),
        )?;
        // Nine shapes of the insert, and the few one-row statements.
        writes.set_prepared_statement_cache_capacity(24);
        let reads = SqlitePoolOptions::new()
            .max_connections(4)
            // A ping before each use is a round trip to sqlx's worker thread.
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        Ok(Self {
            writes: Arc::new(std::sync::Mutex::new(writes)),
            reads,
            _checkpointing: checkpointing,
            restart_wal: restart,
        })
    }
}

/// How sqlx stores a date-time in SQLite: rows written here read back alike.
fn text_time(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::AutoSi, false)
}

fn id(id: PacketId) -> String {
    id.as_uuid().hyphenated().to_string()
}

fn json(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).expect("JSON values always encode")
}

const INSERT_HEAD: &str = "INSERT INTO packets (packet_id, user_id, employee_id, \
     session_id, lesson_id, system_type, role, client_timestamp, cognitive_state, state, \
     active_seconds, idle_seconds, away_seconds, focus_score, integrity_score, raw_signals, \
     received_at)";
const INSERT_TAIL: &str = "ON CONFLICT (packet_id) DO NOTHING RETURNING packet_id, seq";
const STORED: &str = "SELECT seq, received_at FROM packets WHERE packet_id = ?1";
const MARK: &str = "UPDATE packets SET status = ?2, processed_by_karma = ?3, \
     processed_at = ?4, karma_actions = ?5, processing_error = ?6, \
     delivery_attempts = MAX(delivery_attempts, ?7) \
     WHERE packet_id = ?1 AND status <> 'processed'";
const KNOWN: &str = "SELECT 1 FROM packets WHERE packet_id = ?1";
/// The oldest finished packets received before `?1`, at most `?2` of them.
const PRUNE: &str = "DELETE FROM packets WHERE seq IN (SELECT seq FROM packets \
     WHERE received_at < ?1 AND status IN ('processed', 'failed', 'dead_letter') \
     ORDER BY received_at LIMIT ?2)";
const END: &str = "UPDATE packets SET delivery_attempts = MAX(delivery_attempts, ?2), \
     status = CASE WHEN MAX(delivery_attempts, ?2) >= ?3 THEN 'dead_letter' ELSE 'pending' END \
     WHERE packet_id = ?1 AND status = 'pending' RETURNING status";

/// The multi-row INSERT for `n` rows (a power of two), built on first use:
/// one statement per chunk costs far less per row than a statement per row.
fn insert_sql(n: usize) -> &'static str {
    static SHAPES: OnceLock<Vec<String>> = OnceLock::new();
    let shapes = SHAPES.get_or_init(|| {
        (0..=rows::MAX_ROWS_PER_STATEMENT.ilog2())
            .map(|k| {
                let row = format!("({})", ["?"; 17].join(", "));
                format!(
                    "{INSERT_HEAD} VALUES {} {INSERT_TAIL}",
                    vec![row; 1 << k].join(", ")
                )
            })
            .collect()
    });
    &shapes[n.ilog2() as usize]
}

/// A packet's values that need encoding, encoded once.
struct Encoded<'a> {
    packet: &'a Packet,
    id: String,
    client_timestamp: String,
    raw_signals: String,
}

fn insert_all(
    tx: &rusqlite::Transaction<'_>,
    packets: &[&Arc<Packet>],
    at: DateTime<Utc>,
) -> rusqlite::Result<Vec<Inserted>> {
    let received_at = text_time(at);
    let encoded: Vec<Encoded> = packets
        .iter()
        .map(|p| Encoded {
            packet: p,
            id: id(p.packet_id),
            client_timestamp: text_time(p.client_timestamp),
            raw_signals: json(&p.raw_signals),
        })
        .collect();
    let mut created: HashMap<String, i64> = HashMap::with_capacity(packets.len());
    for chunk in rows::chunks(&encoded) {
        let mut insert = tx.prepare_cached(insert_sql(chunk.len()))?;
        let mut at = 0;
        let mut bind = |value: &dyn rusqlite::ToSql| {
            at += 1;
            insert.raw_bind_parameter(at, value)
        };
        for e in chunk {
            let p = e.packet;
            bind(&e.id)?;
            bind(&p.user_id)?;
            bind(&p.employee_id)?;
            bind(&p.session_id)?;
            bind(&p.lesson_id)?;
            bind(&p.system_type.map(|s| s.as_str()))?;
            bind(&p.role.map(|r| r.as_str()))?;
            bind(&e.client_timestamp)?;
            bind(&p.cognitive_state)?;
            bind(&p.state.map(|s| s.as_str()))?;
            bind(&p.active_seconds)?;
            bind(&p.idle_seconds)?;
            bind(&p.away_seconds)?;
            bind(&p.focus_score)?;
            bind(&p.integrity_score)?;
            bind(&e.raw_signals)?;
            bind(&received_at)?;
        }
        let mut returned = insert.raw_query();
        while let Some(row) = returned.next()? {
            created.insert(row.get(0)?, row.get(1)?);
        }
    }
    let mut stored = tx.prepare_cached(STORED)?;
    let mut receipts = Vec::with_capacity(packets.len());
    for e in &encoded {
        let packet_id = e.packet.packet_id;
        // The first of several equal ids in a batch creates it.
        receipts.push(match created.remove(&e.id) {
            Some(seq) => Inserted {
                packet_id,
                received_at: at,
                created: true,
                seq,
            },
            // Stored before (a retry, or twice in one batch): its receipt.
            None => {
                let (seq, received_at): (i64, String) =
                    stored.query_row([&e.id], |row| Ok((row.get(0)?, row.get(1)?)))?;
                Inserted {
                    packet_id,
                    received_at: DateTime::parse_from_rfc3339(&received_at)
                        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(e.into()))?
                        .with_timezone(&Utc),
                    created: false,
                    seq,
                }
            }
        });
    }
    Ok(receipts)
}

fn mark_all(tx: &rusqlite::Transaction<'_>, marks: &[&Mark]) -> rusqlite::Result<Vec<MarkOutcome>> {
    let mut update = tx.prepare_cached(MARK)?;
    let mut known = tx.prepare_cached(KNOWN)?;
    let mut outcomes = Vec::with_capacity(marks.len());
    for m in marks {
        let packet_id = id(m.packet_id);
        let status = match m.success {
            true => DeliveryStatus::Processed,
            false => DeliveryStatus::Failed,
        };
        let changed = update.execute(params![
            packet_id,
            status.as_str(),
            m.success,
            text_time(m.at),
            json(&m.karma_actions),
            m.error_message,
            m.attempt,
        ])?;
        outcomes.push(if changed > 0 {
            MarkOutcome::Applied
        } else if known.exists([&packet_id])? {
            MarkOutcome::AlreadyProcessed
        } else {
            MarkOutcome::NotFound
        });
    }
    Ok(outcomes)
}

fn end_all(
    tx: &rusqlite::Transaction<'_>,
    ends: &[LeaseEnd],
    max_deliveries: u32,
) -> rusqlite::Result<Vec<Released>> {
    let mut end = tx.prepare_cached(END)?;
    let mut released = Vec::with_capacity(ends.len());
    for e in ends {
        let status: Option<String> = end
            .query_row(
                params![id(e.packet_id), e.attempts, max_deliveries],
                |row| row.get(0),
            )
            .optional()?;
        if let Some(status) = status.as_deref().and_then(DeliveryStatus::parse) {
            released.push(Released {
                packet_id: e.packet_id,
                status,
            });
        }
    }
    Ok(released)
}

#[async_trait]
impl Backend for SqliteBackend {
    /// Blocks while it writes: the writer calls it from a thread of its own.
    async fn write(
        &self,
        group: &Group<'_>,
        gate: &Arc<RwLock<()>>,
    ) -> (Applied, Option<OwnedRwLockReadGuard<()>>) {
        // Taken before the inserts commit (here, before the transaction:
        // nothing below waits), kept until the caller announced them.
        let gate = match group.inserts.is_empty() {
            true => None,
            false => Some(gate.clone().read_owned().await),
        };
        let mut conn = self.writes.lock().expect("writer connection lock");
        finish_checkpoint(&conn, &self.restart_wal);
        let written = (|| {
            let tx = conn.transaction()?;
            let marks = mark_all(&tx, &group.marks)?;
            let ends = end_all(&tx, &group.ends, group.max_deliveries)?;
            let inserts = insert_all(&tx, &group.inserts, group.at)?;
            tx.commit()?;
            Ok::<_, rusqlite::Error>((marks, ends, inserts))
        })();
        let (marks, ends, inserts) = match written {
            Ok(written) => written,
            Err(e) => return failed(e.into()),
        };
        let applied = Applied {
            marks: Ok(marks),
            ends: Ok(ends),
            inserts: Ok(inserts),
        };
        (applied, gate)
    }

    async fn prune(&self, before: DateTime<Utc>, limit: u32) -> Result<Pruned, StoreError> {
        // On the writing connection, between two commit groups: a batch of
        // `limit` rows takes a few ms, the time of one commit.
        let before = text_time(before);
        self.on_writer("pruning", move |conn| {
            let deleted = conn.execute(PRUNE, params![before, limit])?;
            if deleted > 0 {
                // Give the freed pages back. Each step of this pragma frees
                // one page, so it is stepped to the end.
                let mut vacuum = conn.prepare_cached("PRAGMA incremental_vacuum")?;
                let mut steps = vacuum.raw_query();
                while steps.next()?.is_some() {}
            }
            Ok(deleted as u64)
        })
        .await
        .map(|packets| Pruned {
            packets,
            done: packets < u64::from(limit),
        })
    }

    async fn requeue(
        &self,
        requeue: &Requeue,
        at: DateTime<Utc>,
    ) -> Result<Vec<(PacketId, i64)>, StoreError> {
        // The outcome goes into the history as one JSON object; booleans
        // are stored as 0/1, hence the CASE.
        let sql = format!(
            "UPDATE packets SET history = json_insert(history, '$[#]', json_object(\
             'reason', ?1, 'requeued_at', ?2, 'status', status, \
             'delivery_attempts', delivery_attempts, 'processed_at', processed_at, \
             'processed_by_karma', json(CASE WHEN processed_by_karma THEN 'true' ELSE 'false' END), \
             'karma_actions', json(karma_actions), 'error_message', processing_error)), \
             status = 'pending', delivery_attempts = 0, processed_at = NULL, \
             processed_by_karma = FALSE, karma_actions = '[]', processing_error = NULL \
             WHERE status IN ({}) AND (?3 IS NULL OR user_id = ?3) \
             AND (?4 IS NULL OR received_at >= ?4) AND (?5 IS NULL OR received_at < ?5) \
             RETURNING packet_id, seq",
            requeue.status_list()
        );
        let params = (
            requeue.reason.as_str(),
            text_time(at),
            requeue.user_id.clone(),
            requeue.received_from.map(text_time),
            requeue.received_before.map(text_time),
        );
        let rows = self
            .on_writer("requeue", move |conn| {
                let tx = conn.transaction()?;
                let rows = {
                    let mut statement = tx.prepare(&sql)?;
                    let rows = statement.query_map(
                        params![params.0, params.1, params.2, params.3, params.4],
                        |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)),
                    )?;
                    rows.collect::<Result<Vec<_>, _>>()?
                };
                tx.commit()?;
                Ok(rows)
            })
            .await?;
        rows.into_iter()
            .map(|(id, seq)| {
                Uuid::try_parse(&id)
                    .map(|id| (id.into(), seq))
                    .map_err(|e| StoreError::Internal(format!("packet_id {id:?}: {e}").into()))
            })
            .collect()
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
        rows.into_iter().map(PendingRow::into_pending).collect()
    }

    async fn pending_among(&self, ids: &[PacketId]) -> Result<Vec<PendingPacket>, StoreError> {
        let sql = format!(
            "SELECT {PENDING_COLUMNS} FROM packets WHERE status = 'pending' \
             AND packet_id IN (SELECT value FROM json_each($1)) ORDER BY seq"
        );
        let rows: Vec<PendingRow<Hyphenated>> = sqlx::query_as(&sql)
            .bind(json(&ids))
            .fetch_all(&self.reads)
            .await?;
        rows.into_iter().map(PendingRow::into_pending).collect()
    }

    async fn pending_ids(
        &self,
        after: i64,
        limit: u32,
    ) -> Result<Vec<(PacketId, i64)>, StoreError> {
        let rows: Vec<(Hyphenated, i64)> = sqlx::query_as(
            "SELECT packet_id, seq FROM packets WHERE status = 'pending' AND seq > $1 \
             ORDER BY seq LIMIT $2",
        )
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.reads)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, seq)| (id.into_uuid().into(), seq))
            .collect())
    }

    async fn first_seq_since(&self, since: DateTime<Utc>) -> Result<Option<i64>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT MIN(seq) FROM packets WHERE received_at >= $1")
                .bind(text_time(since))
                .fetch_one(&self.reads)
                .await?,
        )
    }

    async fn user_packets(&self, query: &UserQuery) -> Result<Vec<StoredPacket>, StoreError> {
        let rows: Vec<StoredRow<Hyphenated>> =
            sqlx::query_as(&rows::user_packets_sql(query.status))
                .bind(&query.user_id)
                .bind(query.before_seq.unwrap_or(i64::MAX))
                .bind(i64::from(query.limit))
                .fetch_all(&self.reads)
                .await?;
        rows.into_iter().map(StoredRow::into_stored).collect()
    }

    async fn counts(&self) -> Result<Counts, StoreError> {
        let rows: Vec<(String, i64)> =
            // Kept by triggers (migration 0004): five rows, whatever is stored.
            sqlx::query_as("SELECT status, n FROM packet_counts")
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
            blocking: true,
            // The writer thread sleeps precisely; 300 µs cut CPU per packet
            // by ~15% at 5,000/s for +0.3 ms at the median (BENCHMARKS.md).
            linger: Duration::from_micros(300),
        }
    }
}

/// One transaction: nothing of the group was written.
fn failed(e: StoreError) -> (Applied, Option<OwnedRwLockReadGuard<()>>) {
    let applied = Applied {
        marks: Err(e.clone()),
        ends: Err(e.clone()),
        inserts: Err(e),
    };
    (applied, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An acknowledged packet is on disk: the writing connection fsyncs
    /// every commit (synchronous = FULL, 2) in WAL mode.
    #[tokio::test]
    async fn commits_are_synced_to_disk() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/bucket.db", dir.path().display());
        let backend = SqliteBackend::connect(&url).await.unwrap();
        let conn = backend.writes.lock().unwrap();
        let synchronous: i64 = conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        let journal: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!((synchronous, journal.as_str()), (2, "wal"));
    }

    /// Steady writes keep a checkpoint from another connection from ever
    /// finding the WAL complete (here a reader's snapshot stands in for the
    /// commits that land while it copies), so the WAL only grows; once the
    /// writer finishes the checkpoint between two commits, the next commit
    /// starts the WAL over.
    #[test]
    fn the_writer_lets_the_wal_start_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal.db");
        let writer = rusqlite::Connection::open(&path).unwrap();
        writer
            .execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = 0; \
                 CREATE TABLE t (v BLOB);",
            )
            .unwrap();
        let checkpointer = rusqlite::Connection::open(&path).unwrap();
        let reader = rusqlite::Connection::open(&path).unwrap();
        let write = || {
            writer
                .execute("INSERT INTO t VALUES (zeroblob(8192))", [])
                .unwrap()
        };
        let restart = AtomicBool::new(false);
        let mut frames = Vec::new();
        for _ in 0..5 {
            reader.execute_batch("BEGIN").unwrap();
            let _: i64 = reader
                .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
                .unwrap();
            write();
            frames.push(passive_checkpoint(&checkpointer).unwrap());
            reader.execute_batch("COMMIT").unwrap();
            // Not asked: the writer leaves the WAL as it is.
            finish_checkpoint(&writer, &restart);
            write();
        }
        assert!(
            frames.windows(2).all(|w| w[1] > w[0]),
            "the WAL only grows: {frames:?}"
        );
        let grown = *frames.last().unwrap();

        restart.store(true, Ordering::Relaxed);
        finish_checkpoint(&writer, &restart);
        assert!(!restart.load(Ordering::Relaxed), "the request is taken");
        write();
        let after = passive_checkpoint(&checkpointer).unwrap();
        assert!(
            after < grown / 4,
            "the WAL started over: {after} frames after, {grown} before"
        );
    }
}
