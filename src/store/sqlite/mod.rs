//! SQLite, the embedded default: a record log for what is acknowledged,
//! tables brought up to date from it in the background.
//!
//! A commit group is decided in memory, written as one block of the record
//! log ([`log`]) and synced: that is the whole cost on the path of an
//! acknowledgement, one write of about the group's own size. What the log
//! holds and the tables do not yet is the [`overlay`]; every read merges it
//! over the tables ([`reads`]). About once a second the fold thread
//! ([`fold`]) writes the overlay into the tables in one transaction, a
//! packet marked meanwhile as one finished row, and the log before that
//! point is released. At start the log is replayed from where the tables
//! end and folded at once.
//!
//! Why not write the tables on every commit: SQLite writes whole pages, so
//! each commit group rewrote the table's last page, a leaf of every index it
//! touched (a random one per user in the user index) and the counts row,
//! several 4 KiB pages for a few 400-byte packets (9.4 KB written per
//! packet at 5,000/s, BENCHMARKS.md). Folding a second's worth at once
//! writes each page once for hundreds of packets, and the user index is a
//! chain of per-fold rows (`user_folds`, `user_heads`, migrations 0006-0007)
//! that only grows at its end ([`chains`]).
//!
//! The writer thread ([`SqliteBackend::write`]) owns the log and a reading
//! connection for look-ups of folded packets; the fold thread owns the
//! writing connection; delivery's reads (the backlog, the reconciler's
//! look-ups) run on rusqlite connections on the blocking pool
//! ([`reads::Readers`]), and sqlx's pool serves the rest. Operator writes
//! (retention, Redrive, Replay) run on the fold thread, which pauses the
//! writer while it commits them.
mod chains;
mod fold;
mod library;
pub mod log;
mod overlay;
mod reads;
pub mod record;
mod row_text;

pub use library::before_first_connection;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use prost::Message;
use rusqlite::OptionalExtension;
use sqlx::ConnectOptions;
use sqlx::sqlite::{
    SqliteAutoVacuum, SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use tokio::sync::{OwnedRwLockReadGuard, RwLock};

use self::fold::Folder;
use self::log::RecordLog;
use self::overlay::{Kind, Known, Overlay, State};
use self::record::{ChangeView, GroupRecord, InsertView};
use self::row_text::text_time;
use super::{
    Applied, Backend, Counts, Group, Inserted, MarkOutcome, PendingPacket, Pruned, Released,
    Requeue, StoreError, StoredPacket, UserQuery, Writers,
};
use crate::domain::packet_id::IdMap;
use crate::domain::{DeliveryStatus, Packet, PacketId};

/// Bytes of one log segment file.
const SEGMENT_BYTES: u64 = 32 << 20;

/// Entries past which inserts are refused (UNAVAILABLE, retryable) until
/// the fold catches up: what memory and the log hold is bounded even when
/// the tables cannot be written (a full disk).
const MAX_UNFOLDED: usize = 200_000;

pub struct SqliteBackend {
    shared: Arc<Shared>,
    reads: SqlitePool,
    /// Delivery's reads (see [`reads::Readers`]); `reads` serves the rest.
    readers: Arc<reads::Readers>,
    folder: Folder,
}

/// What the writer thread, the fold thread and the readers share.
struct Shared {
    overlay: Mutex<Overlay>,
    /// The writer's side; the fold thread takes it to pause writes while
    /// it commits an operator's change.
    writer: Mutex<WriterSide>,
}

struct WriterSide {
    log: RecordLog,
    /// Reads folded packets for look-ups (the writer thread only).
    lookup: rusqlite::Connection,
}

/// Applies every SQLite migration to `conn`, as files, without sqlx's
/// bookkeeping (the store's own tests).
#[cfg(test)]
fn migrate_for_tests(conn: &rusqlite::Connection) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|f| f.unwrap().path())
        .collect();
    files.sort();
    for file in files {
        conn.execute_batch(&std::fs::read_to_string(file).unwrap())
            .unwrap();
    }
}

/// Where the record log of a database file lives.
fn log_dir(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-records");
    PathBuf::from(name)
}

fn parse_time(text: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| StoreError::Internal(format!("time {text:?} in the database: {e}").into()))
}

fn open_connection(path: &Path) -> rusqlite::Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open(path)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
         PRAGMA busy_timeout = 5000; PRAGMA foreign_keys = ON; \
         PRAGMA wal_autocheckpoint = 0;",
    )?;
    Ok(conn)
}

impl SqliteBackend {
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // The tables are written once a second, each fold synced: the
            // log it releases is then no longer needed, even after a
            // power loss.
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
        sqlx::Connection::close(migrator).await?;
        let path = options.get_filename().to_owned();
        let readers = reads::Readers::new(path.clone());
        let (shared, tables) =
            tokio::task::spawn_blocking(move || -> Result<_, StoreError> { recover(&path) })
                .await
                .map_err(|e| {
                    StoreError::Internal(format!("opening the record log: {e}").into())
                })??;
        let shared = Arc::new(shared);
        let folder = Folder::start(tables, shared.clone())?;
        let reads = SqlitePoolOptions::new()
            .max_connections(4)
            // A ping before each use is a round trip to sqlx's worker thread.
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        Ok(Self {
            shared,
            reads,
            readers,
            folder,
        })
    }
}

/// Opens the log, replays it over the tables, folds it at once, and
/// returns what the threads share with the writing connection.
fn recover(db: &Path) -> Result<(Shared, rusqlite::Connection), StoreError> {
    let tables = open_connection(db)?;
    fold::prepare(&tables)?;
    let (folded_lsn, next_seq): (i64, i64) = tables.query_row(
        "SELECT folded_lsn, next_seq FROM fold_meta WHERE id = 1",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let (log, replayed) = RecordLog::open(&log_dir(db), SEGMENT_BYTES, folded_lsn as u64)?;
    if !log.direct() {
        tracing::info!(
            "the record log's file system has no direct I/O: blocks go through the page cache, each synced"
        );
    }
    let max_seq: Option<i64> =
        tables.query_row("SELECT MAX(seq) FROM packets", [], |r| r.get(0))?;
    let max_id: Option<String> =
        tables.query_row("SELECT MAX(packet_id) FROM packets", [], |r| r.get(0))?;
    let mut overlay = Overlay::default();
    overlay.lsn = log.end();
    overlay.next_seq = next_seq.max(max_seq.unwrap_or(0) + 1);
    overlay.counts = fold::table_counts(&tables)?;
    overlay.max_folded_id = max_id.and_then(|id| uuid::Uuid::try_parse(&id).ok());
    let groups = replayed.payloads.len();
    for payload in &replayed.payloads {
        let group = GroupRecord::decode(&payload[..])
            .map_err(|e| StoreError::Internal(format!("record log: {e}").into()))?;
        replay(&tables, &mut overlay, group)?;
    }
    let lookup = open_connection(db)?;
    let shared = Shared {
        overlay: Mutex::new(overlay),
        writer: Mutex::new(WriterSide { log, lookup }),
    };
    if groups > 0 {
        let releaser = shared.writer.lock().expect("writer lock").log.releaser();
        let folded = fold::fold_once(&tables, &shared, &releaser, &mut chains::Numbers::default())?;
        tracing::info!(
            groups,
            packets = folded,
            "replayed the record log into the tables"
        );
    }
    Ok((shared, tables))
}

/// One logged group, applied to the overlay at start.
fn replay(
    tables: &rusqlite::Connection,
    overlay: &mut Overlay,
    group: GroupRecord,
) -> Result<(), StoreError> {
    for change in group.changes {
        let id = record::packet_id(&change.packet_id).map_err(internal)?;
        let state = State {
            status: change.status().map_err(internal)?,
            attempts: change.delivery_attempts,
            processed_at: change
                .processed_at_us
                .map(record::from_micros)
                .transpose()
                .map_err(internal)?,
            processed_by_karma: change.processed_by_karma,
            karma_actions: Arc::from(change.karma_actions),
            error_message: change.error_message.map(Arc::from),
        };
        let known = match overlay.get(&id) {
            Some(_) => None,
            None => match look_up(tables, id)? {
                Some(found) => Some(found.known()),
                None => {
                    tracing::warn!(packet_id = %id, "the record log changes a packet the tables do not have; skipped");
                    continue;
                }
            },
        };
        overlay.change(id, state, known);
    }
    for insert in group.inserts {
        let seq = insert.seq;
        let raw_signals = Arc::from(insert.raw_signals.as_str());
        let (packet, received_at) = insert.into_packet().map_err(internal)?;
        if overlay.get(&packet.packet_id).is_none() {
            overlay.next_seq = overlay.next_seq.max(seq + 1);
            overlay.insert(seq, Arc::new(packet), raw_signals, received_at);
        }
    }
    Ok(())
}

fn internal(e: record::BadRecord) -> StoreError {
    StoreError::Internal(e.to_string().into())
}

/// A packet as the writer needs to know it.
#[derive(Debug, Clone)]
struct Current {
    seq: i64,
    received_at: DateTime<Utc>,
    status: DeliveryStatus,
    attempts: u32,
    /// The user, when the packet came from the tables.
    user_id: Option<Arc<str>>,
}

impl Current {
    fn known(&self) -> Known {
        Known {
            seq: self.seq,
            received_at: self.received_at,
            user_id: self.user_id.clone().unwrap_or_else(|| Arc::from("")),
            status: self.status,
        }
    }
}

/// A packet as the tables have it.
fn look_up(conn: &rusqlite::Connection, id: PacketId) -> Result<Option<Current>, StoreError> {
    let mut statement = conn.prepare_cached(
        "SELECT seq, received_at, status, delivery_attempts, user_id FROM packets \
         WHERE packet_id = ?1",
    )?;
    let row: Option<(i64, String, String, i64, String)> = statement
        .query_row([id.text()], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .optional()?;
    row.map(|(seq, received_at, status, attempts, user_id)| {
        Ok(Current {
            seq,
            received_at: parse_time(&received_at)?,
            status: DeliveryStatus::parse(&status).ok_or_else(|| {
                StoreError::Internal(format!("unknown status {status:?} in the database").into())
            })?,
            attempts: attempts.max(0) as u32,
            user_id: Some(Arc::from(user_id)),
        })
    })
    .transpose()
}

/// A packet a group stores for the first time.
struct New<'g> {
    seq: i64,
    packet: &'g Arc<Packet>,
    /// Its raw_signals as JSON: logged now, and the fold's column later.
    raw_signals: Arc<str>,
}

/// A packet whose state a group changes.
struct Change {
    id: PacketId,
    seq: i64,
    state: State,
    /// How the tables have it, when the overlay does not.
    known: Option<Known>,
}

impl Change {
    fn view(&self) -> ChangeView<'_> {
        let s = &self.state;
        ChangeView {
            seq: self.seq,
            packet_id: &self.id,
            status: s.status,
            delivery_attempts: s.attempts,
            processed_at_us: s.processed_at.map(record::micros),
            processed_by_karma: s.processed_by_karma,
            karma_actions: &s.karma_actions,
            error_message: s.error_message.as_deref(),
        }
    }
}

/// A commit group decided: what to log, and each write's answer.
struct Decided<'g> {
    new: Vec<New<'g>>,
    changes: Vec<Change>,
    marks: Vec<MarkOutcome>,
    ends: Vec<Released>,
    inserts: Result<Vec<Inserted>, StoreError>,
    next_seq: i64,
}

/// Decides a group against the overlay and the tables: marks first, then
/// lease ends, then inserts, each seeing the ones before it (as the rows of
/// one transaction would).
fn decide<'g>(
    overlay: &Overlay,
    lookup: &rusqlite::Connection,
    group: &Group<'g>,
) -> Result<Decided<'g>, StoreError> {
    // Packets this group changed or stored, as they are after it so far;
    // sized for the group, so it never grows while the writer holds the
    // overlay.
    let mut seen: IdMap<Current> = IdMap::with_capacity_and_hasher(
        group.marks.len() + group.ends.len() + group.inserts.len(),
        Default::default(),
    );
    let current = |seen: &IdMap<Current>, id: PacketId| {
        if let Some(c) = seen.get(&id) {
            return Ok(Some(c.clone()));
        }
        if let Some(entry) = overlay.get(&id) {
            return Ok(Some(Current {
                seq: entry.seq,
                received_at: entry.received_at,
                status: entry.state.status,
                attempts: entry.state.attempts,
                user_id: None,
            }));
        }
        match overlay.may_be_folded(&id) {
            true => look_up(lookup, id),
            false => Ok(None),
        }
    };
    let mut changes = Vec::new();
    let mut change = |seen: &mut IdMap<Current>, id: PacketId, was: Current, state: State| {
        let known = was.user_id.is_some().then(|| was.known());
        seen.insert(
            id,
            Current {
                status: state.status,
                attempts: state.attempts,
                ..was
            },
        );
        changes.push(Change {
            id,
            seq: was.seq,
            state,
            known,
        });
    };

    let mut marks = Vec::with_capacity(group.marks.len());
    for m in &group.marks {
        marks.push(match current(&seen, m.packet_id)? {
            None => MarkOutcome::NotFound,
            Some(c) if c.status == DeliveryStatus::Processed => MarkOutcome::AlreadyProcessed,
            Some(c) => {
                let state = State {
                    status: match m.success {
                        true => DeliveryStatus::Processed,
                        false => DeliveryStatus::Failed,
                    },
                    attempts: m
                        .attempt
                        .count(c.attempts, c.status == DeliveryStatus::Pending),
                    processed_at: Some(m.at),
                    processed_by_karma: m.success,
                    karma_actions: Arc::from(m.karma_actions.get()),
                    error_message: m.error_message.as_deref().map(Arc::from),
                };
                change(&mut seen, m.packet_id, c, state);
                MarkOutcome::Applied
            }
        });
    }

    let mut ends = Vec::new();
    for e in &group.ends {
        let Some(c) = current(&seen, e.packet_id)? else {
            continue;
        };
        if c.status != DeliveryStatus::Pending {
            continue;
        }
        let attempts = c.attempts.max(e.attempts);
        let mut state = State::pending(attempts);
        if attempts >= group.max_deliveries {
            state.status = DeliveryStatus::DeadLetter;
        }
        ends.push(Released {
            packet_id: e.packet_id,
            status: state.status,
        });
        change(&mut seen, e.packet_id, c, state);
    }

    let mut next_seq = overlay.next_seq;
    let mut new = Vec::new();
    let inserts = if !group.inserts.is_empty() && overlay.len() >= MAX_UNFOLDED {
        Err(StoreError::Unavailable(
            "the tables are behind the record log; retry with backoff".into(),
        ))
    } else {
        let mut receipts = Vec::with_capacity(group.inserts.len());
        for &packet in &group.inserts {
            let packet_id = packet.packet_id;
            receipts.push(match current(&seen, packet_id)? {
                // Stored before (a retry, or twice in one group): its receipt.
                Some(c) => Inserted {
                    packet_id,
                    received_at: c.received_at,
                    created: false,
                    seq: c.seq,
                },
                None => {
                    let seq = next_seq;
                    next_seq += 1;
                    new.push(New {
                        seq,
                        packet,
                        raw_signals: Arc::from(
                            serde_json::to_string(&packet.raw_signals).expect("JSON values encode"),
                        ),
                    });
                    seen.insert(
                        packet_id,
                        Current {
                            seq,
                            received_at: group.at,
                            status: DeliveryStatus::Pending,
                            attempts: 0,
                            user_id: None,
                        },
                    );
                    Inserted {
                        packet_id,
                        received_at: group.at,
                        created: true,
                        seq,
                    }
                }
            });
        }
        Ok(receipts)
    };
    Ok(Decided {
        new,
        changes,
        marks,
        ends,
        inserts,
        next_seq,
    })
}

#[async_trait]
impl Backend for SqliteBackend {
    /// Blocks while it writes: the writer calls it from a thread of its own.
    async fn write(
        &self,
        group: &Group<'_>,
        gate: &Arc<RwLock<()>>,
    ) -> (Applied, Option<OwnedRwLockReadGuard<()>>) {
        // Taken before the inserts are stored, kept until the caller
        // announced them.
        let gate = match group.inserts.is_empty() {
            true => None,
            false => Some(gate.clone().read_owned().await),
        };
        let mut side = self.shared.writer.lock().expect("writer lock");
        let mut overlay = self.shared.overlay.lock().expect("overlay lock");
        let decided = match decide(&overlay, &side.lookup, group) {
            Ok(decided) => decided,
            Err(e) => return failed(e),
        };
        if !decided.changes.is_empty() || !decided.new.is_empty() {
            let at = record::micros(group.at);
            let views: Vec<InsertView<'_>> = decided
                .new
                .iter()
                .map(|n| InsertView {
                    seq: n.seq,
                    packet: n.packet,
                    raw_signals: &n.raw_signals,
                    received_at_us: at,
                })
                .collect();
            let changes: Vec<ChangeView<'_>> = decided.changes.iter().map(Change::view).collect();
            let payload = record::encode_group(&views, &changes);
            let end = match side.log.append(&payload) {
                Ok(end) => end,
                Err(e) => {
                    tracing::warn!(error = %e, "writing the record log failed");
                    return failed(e.into());
                }
            };
            overlay.lsn = end;
        }
        overlay.next_seq = decided.next_seq;
        for Change {
            id, state, known, ..
        } in decided.changes
        {
            overlay.change(id, state, known);
        }
        for new in decided.new {
            overlay.insert(new.seq, Arc::clone(new.packet), new.raw_signals, group.at);
        }
        if overlay.len() >= fold::FOLD_AT {
            self.folder.soon();
        }
        let applied = Applied {
            marks: Ok(decided.marks),
            ends: Ok(decided.ends),
            inserts: decided.inserts,
        };
        (applied, gate)
    }

    async fn prune(&self, before: DateTime<Utc>, limit: u32) -> Result<Pruned, StoreError> {
        let packets = self.folder.prune(before, limit).await?;
        Ok(Pruned {
            packets,
            done: packets < u64::from(limit),
        })
    }

    async fn requeue(
        &self,
        requeue: &Requeue,
        at: DateTime<Utc>,
    ) -> Result<Vec<(PacketId, i64)>, StoreError> {
        self.folder.requeue(requeue.clone(), at).await
    }

    async fn pending_after(&self, seq: i64, limit: u32) -> Result<Vec<PendingPacket>, StoreError> {
        reads::pending_after(&self.shared.overlay, &self.readers, seq, limit).await
    }

    async fn pending_among(&self, ids: &[PacketId]) -> Result<Vec<PendingPacket>, StoreError> {
        reads::pending_among(&self.shared.overlay, &self.readers, ids).await
    }

    async fn pending_ids(
        &self,
        after: i64,
        limit: u32,
    ) -> Result<Vec<(PacketId, i64)>, StoreError> {
        Ok(
            reads::pending_after(&self.shared.overlay, &self.readers, after, limit)
                .await?
                .into_iter()
                .map(|p| (p.packet.packet_id, p.seq))
                .collect(),
        )
    }

    async fn first_seq_since(&self, since: DateTime<Utc>) -> Result<Option<i64>, StoreError> {
        // The overlay first: what a fold moves meanwhile is in the tables
        // by the time they are read.
        let newest = self
            .shared
            .overlay
            .lock()
            .expect("overlay lock")
            .after(i64::MIN)
            .map(|(_, e)| e)
            .find(|e| matches!(e.kind, Kind::New { .. }) && e.received_at >= since)
            .map(|e| e.seq);
        let folded = self.folder.first_seq_since(since).await?;
        Ok(folded.into_iter().chain(newest).min())
    }

    async fn user_packets(&self, query: &UserQuery) -> Result<Vec<StoredPacket>, StoreError> {
        reads::user_packets(&self.shared.overlay, &self.reads, query).await
    }

    async fn counts(&self) -> Result<Counts, StoreError> {
        Ok(self
            .shared
            .overlay
            .lock()
            .expect("overlay lock")
            .counts
            .clone())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1 FROM packets LIMIT 1")
            .execute(&self.reads)
            .await?;
        self.folder.healthy()
    }

    async fn sync_tables(&self) -> Result<(), StoreError> {
        self.folder.fold_now().await
    }

    async fn close(&self) {
        self.folder.close().await;
        self.readers.close();
        self.reads.close().await;
    }

    fn writers(&self) -> Writers {
        Writers {
            ingest: 1,
            delivery: 0,
            blocking: true,
            // The writer thread sleeps precisely; 300 µs cut CPU per packet
            // by ~15% at 5,000/s for +0.3 ms at the median (BENCHMARKS.md).
            linger: Duration::from_micros(300),
            // Each commit costs ~240 µs of CPU here (the synced append
            // alone ~130 µs on this disk, then the writer's wake-ups and
            // the waiters'): growing the wait with the company to 2 ms took
            // 5,000/s from 162-185 to 138-161 µs per packet (seventh
            // session); pacing the commits by it at up to 4 ms took acks
            // on the stream from 2.30-2.40 to 1.87-1.89 write syscalls per
            // packet and 99-130 to 75-96 µs, +1.5-2 ms at the median
            // (BENCHMARKS.md, ninth session). With the log's segments
            // written ahead a commit costs less, and 3.5 ms took the p99
            // from 8.0 to 7.4 ms for ~1 µs a packet (twenty-third session).
            max_linger: Duration::from_micros(3_500),
            per_companion: Duration::from_micros(100),
            // Marks join every commit first; under a closed loop of
            // ingests, groups of up to 1,000 inserts made each mark wait
            // out a long decide-and-write, and delivery fell behind ingest
            // (20k/s delivered of 29k/s ingested); at 128 it keeps up
            // (27k/s of 27k/s), and IngestBatch loses nothing (BENCHMARKS.md).
            max_commit: 128,
        }
    }
}

/// Nothing of the group was written.
fn failed(e: StoreError) -> (Applied, Option<OwnedRwLockReadGuard<()>>) {
    let applied = Applied {
        marks: Err(e.clone()),
        ends: Err(e.clone()),
        inserts: Err(e),
    };
    (applied, None)
}
