//! The fold thread: brings SQLite's tables up to date with the record log.
//!
//! Invariants:
//! - The only writer of the tables: a fold, retention and the operators'
//!   Redrive and Replay all run here, one at a time.
//! - A fold writes a snapshot of the overlay in one transaction, with the
//!   log position the snapshot is complete to (`fold_meta.folded_lsn`);
//!   only after the commit are the folded entries taken out of the overlay
//!   and the log before that position released. A crash anywhere in
//!   between replays the log from the last committed position, and
//!   writing a replayed state again leaves the same row.
//! - A change made to the tables without the log (retention, Redrive,
//!   Replay) commits while the writer is paused and touches no packet the
//!   overlay holds, so the overlay never hides it nor is hidden by it.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, params};
use tokio::sync::oneshot;

use super::chains::{self, Numbers};
use super::log::Releaser;
use super::overlay::{Entry, Kind, State};
use super::{Shared, text_time};
use crate::domain::{DeliveryStatus, PacketId};
use crate::store::{Counts, Requeue, StoreError, rows};

/// How often the tables are brought up to date.
const FOLD_EVERY: Duration = Duration::from_secs(1);

/// Overlay entries past which a fold starts at once. Under load the
/// overlay holds every packet stored since the last fold, bodies and all
/// (~3 KB each in memory): at 20,000 a sustained closed-loop run peaked at
/// 81-90 MiB RSS, at 4,096 at 62-64 MiB (BENCHMARKS.md, issue 15).
pub const FOLD_AT: usize = 4_096;

/// WAL frames (4 KiB pages) past which the WAL file is cut back when it
/// starts over.
const WAL_KEEP_BYTES: i64 = 64 << 20;

enum Job {
    /// Fold now; answer when done (None: nobody waits).
    Fold(Option<oneshot::Sender<Result<(), StoreError>>>),
    Prune {
        before: DateTime<Utc>,
        limit: u32,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
    Requeue {
        requeue: Requeue,
        at: DateTime<Utc>,
        reply: oneshot::Sender<Result<Vec<(PacketId, i64)>, StoreError>>,
    },
    FirstSeqSince {
        since: DateTime<Utc>,
        reply: oneshot::Sender<Result<Option<i64>, StoreError>>,
    },
    /// Fold once more, let go of the record log and stop; answer when done.
    Close(oneshot::Sender<()>),
}

/// The handle to the fold thread; dropping it folds once more and waits.
pub struct Folder {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    /// A fold was asked for and has not started yet.
    asked: Arc<AtomicBool>,
    /// Why the last fold failed, until one succeeds.
    failing: Arc<Mutex<Option<StoreError>>>,
    thread: Option<JoinHandle<()>>,
}

/// Settings of the writing connection.
pub fn prepare(conn: &rusqlite::Connection) -> Result<(), StoreError> {
    conn.pragma_update(None, "journal_size_limit", WAL_KEEP_BYTES)?;
    // Every shape of the fold's statements stays prepared (six kinds of
    // nine sizes each, `chains`' among them, and the rest); past the cache
    // they are compiled again, the 256-row INSERT's 6,144 placeholders
    // among them.
    conn.set_prepared_statement_cache_capacity(96);
    Ok(())
}

/// Packets per status, as the tables count them (migration 0004's triggers
/// and, for a fold's inserts, [`count_new`]).
pub fn table_counts(conn: &rusqlite::Connection) -> Result<Counts, StoreError> {
    let mut statement = conn.prepare_cached("SELECT status, n FROM packet_counts")?;
    let rows = statement
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Counts::from_rows(rows))
}

impl Folder {
    pub fn start(tables: rusqlite::Connection, shared: Arc<Shared>) -> Result<Folder, StoreError> {
        let (tx, rx) = mpsc::channel();
        let asked = Arc::new(AtomicBool::new(false));
        let failing = Arc::new(Mutex::new(None));
        let releaser = shared.writer.lock().expect("writer lock").log.releaser();
        let thread = {
            let (asked, failing) = (asked.clone(), failing.clone());
            std::thread::Builder::new()
                .name("bucket-fold".into())
                .spawn(move || run(tables, shared, releaser, rx, asked, failing))
                .map_err(|e| StoreError::Internal(format!("fold thread: {e}").into()))?
        };
        Ok(Folder {
            jobs: Mutex::new(Some(tx)),
            asked,
            failing,
            thread: Some(thread),
        })
    }

    fn send(&self, job: Job) -> Result<(), StoreError> {
        let jobs = self.jobs.lock().expect("fold jobs lock");
        jobs.as_ref()
            .and_then(|jobs| jobs.send(job).ok())
            .ok_or_else(|| StoreError::Unavailable("the bucket is shutting down".into()))
    }

    /// Asks for a fold without waiting for it.
    pub fn soon(&self) {
        if !self.asked.swap(true, Ordering::AcqRel) {
            let _ = self.send(Job::Fold(None));
        }
    }

    /// Folds now and waits.
    pub async fn fold_now(&self) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Job::Fold(Some(reply)))?;
        answer.await.map_err(gone)?
    }

    pub async fn prune(&self, before: DateTime<Utc>, limit: u32) -> Result<u64, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Job::Prune {
            before,
            limit,
            reply,
        })?;
        answer.await.map_err(gone)?
    }

    pub async fn requeue(
        &self,
        requeue: Requeue,
        at: DateTime<Utc>,
    ) -> Result<Vec<(PacketId, i64)>, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Job::Requeue { requeue, at, reply })?;
        answer.await.map_err(gone)?
    }

    pub async fn first_seq_since(&self, since: DateTime<Utc>) -> Result<Option<i64>, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Job::FirstSeqSince { since, reply })?;
        answer.await.map_err(gone)?
    }

    /// Folds once more, lets go of the record log (its lock: another
    /// process may open the database now) and stops the thread. Later
    /// jobs answer UNAVAILABLE.
    pub async fn close(&self) {
        let (reply, answer) = oneshot::channel();
        if self.send(Job::Close(reply)).is_ok() {
            let _ = answer.await;
        }
        self.jobs.lock().expect("fold jobs lock").take();
    }

    /// Fine unless the last fold failed.
    pub fn healthy(&self) -> Result<(), StoreError> {
        match self.failing.lock().expect("fold state lock").clone() {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }
}

impl Drop for Folder {
    fn drop(&mut self) {
        self.jobs.lock().expect("fold jobs lock").take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn gone(_: oneshot::error::RecvError) -> StoreError {
    StoreError::Internal("the fold thread stopped".into())
}

fn run(
    conn: rusqlite::Connection,
    shared: Arc<Shared>,
    releaser: Releaser,
    jobs: mpsc::Receiver<Job>,
    asked: Arc<AtomicBool>,
    failing: Arc<Mutex<Option<StoreError>>>,
) {
    let record = |result: &Result<usize, StoreError>| {
        let mut failing = failing.lock().expect("fold state lock");
        match result {
            Ok(_) => *failing = None,
            Err(e) => {
                if failing.is_none() {
                    tracing::warn!(error = %e, "bringing the tables up to date failed; the record log keeps everything, retrying");
                }
                *failing = Some(e.clone());
            }
        }
    };
    let mut numbers = Numbers::default();
    loop {
        let job = match jobs.recv_timeout(FOLD_EVERY) {
            Ok(job) => Some(job),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // Shutting down: what is folded now need not be replayed.
                let _ = fold_once(&conn, &shared, &releaser, &mut numbers);
                return;
            }
        };
        match job {
            None | Some(Job::Fold(None)) => {
                asked.store(false, Ordering::Release);
                record(&fold_once(&conn, &shared, &releaser, &mut numbers));
            }
            Some(Job::Fold(Some(reply))) => {
                let result = fold_once(&conn, &shared, &releaser, &mut numbers);
                record(&result);
                let _ = reply.send(result.map(|_| ()));
            }
            Some(Job::Prune {
                before,
                limit,
                reply,
            }) => {
                let _ = reply.send(prune(&conn, &shared, &mut numbers, before, limit));
            }
            Some(Job::Requeue { requeue, at, reply }) => {
                let _ = reply.send(requeue_now(
                    &conn,
                    &shared,
                    &releaser,
                    &mut numbers,
                    &requeue,
                    at,
                ));
            }
            Some(Job::FirstSeqSince { since, reply }) => {
                let _ = reply.send(first_seq_since(&conn, since));
            }
            Some(Job::Close(reply)) => {
                let _ = fold_once(&conn, &shared, &releaser, &mut numbers);
                shared.writer.lock().expect("writer lock").log.close();
                drop(conn);
                let _ = reply.send(());
                return;
            }
        }
    }
}

/// Writes the overlay into the tables; answers how many packets it wrote.
pub fn fold_once(
    conn: &rusqlite::Connection,
    shared: &Shared,
    releaser: &Releaser,
    numbers: &mut Numbers,
) -> Result<usize, StoreError> {
    let snapshot = shared.overlay.lock().expect("overlay lock").snapshot();
    if snapshot.entries.is_empty() {
        return Ok(0);
    }
    let started = std::time::Instant::now();
    let tx = conn.unchecked_transaction()?;
    // Every seq below it was written by a committed fold (and is in the
    // tables unless retention took it, which never takes an overlay's).
    let fresh_from: i64 = tx.query_row("SELECT next_seq FROM fold_meta WHERE id = 1", [], |r| {
        r.get(0)
    })?;
    let (mut new, mut changed): (Vec<_>, Vec<_>) = snapshot
        .entries
        .iter()
        .partition(|(_, e)| matches!(e.kind, Kind::New { .. }));
    new.sort_by_key(|(_, e)| e.seq);
    changed.sort_by_key(|(_, e)| e.seq);
    insert_new(&tx, &new)?;
    count_new(&tx, &new, fresh_from)?;
    update_changed(&tx, &changed)?;
    let users: Vec<(&str, i64)> = new.iter().map(|(_, e)| (e.user_id(), e.seq)).collect();
    chains::link(&tx, &users, numbers)?;
    tx.execute(
        "UPDATE fold_meta SET folded_lsn = ?1, next_seq = MAX(next_seq, ?2) WHERE id = 1",
        params![snapshot.lsn as i64, snapshot.next_seq],
    )?;
    tx.commit()?;
    numbers.committed();
    shared
        .overlay
        .lock()
        .expect("overlay lock")
        .folded(&snapshot.entries);
    releaser.release(snapshot.lsn);
    // The only writer: a pass finds the WAL complete unless a reader still
    // reads an old snapshot, and the next fold then starts the WAL over.
    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
        tracing::warn!(error = %e, "WAL checkpoint failed; retrying after the next fold");
    }
    metrics::histogram!("bucket_fold_seconds").record(started.elapsed().as_secs_f64());
    metrics::histogram!("bucket_fold_packets").record(snapshot.entries.len() as f64);
    Ok(snapshot.entries.len())
}

/// Every column a folded row has but `history` (it keeps its default).
const ROW: &str = "seq, packet_id, user_id, employee_id, session_id, lesson_id, system_type, \
     role, client_timestamp, cognitive_state, state, active_seconds, idle_seconds, away_seconds, \
     focus_score, integrity_score, raw_signals, received_at, status, delivery_attempts, \
     processed_at, processed_by_karma, karma_actions, processing_error";
const ROW_VALUES: usize = 24;

/// The multi-row INSERT for `n` rows (a power of two): a row replayed over
/// itself (the fold that wrote it committed, its overlay entry not yet
/// gone) only takes its state again.
///
/// `OR FAIL` (here and in [`update_changed`]), not the default ABORT: a
/// statement that writes several rows, or fires the count triggers, under
/// ABORT keeps a statement journal to undo itself alone, and past 64 KiB
/// SQLite spills it to a temporary file: under a sustained load that was
/// 6.5 write syscalls per packet and a twentieth of the CPU. A fold never
/// goes on after a failed statement (the whole transaction rolls back), so
/// a statement undone alone buys nothing. The triggers take the outer
/// statement's policy.
fn insert_sql(n: usize) -> &'static str {
    rows::shaped!(n, |n| {
        let row = format!("({})", ["?"; ROW_VALUES].join(", "));
        format!(
            "INSERT OR FAIL INTO packets ({ROW}) VALUES {} ON CONFLICT (seq) DO UPDATE SET \
             status = excluded.status, delivery_attempts = excluded.delivery_attempts, \
             processed_at = excluded.processed_at, \
             processed_by_karma = excluded.processed_by_karma, \
             karma_actions = excluded.karma_actions, \
             processing_error = excluded.processing_error",
            vec![row; n].join(", ")
        )
    })
}

fn insert_new(
    tx: &rusqlite::Transaction<'_>,
    new: &[&(PacketId, Entry)],
) -> Result<(), StoreError> {
    in_chunks(tx, new, insert_sql, |bind, (id, entry)| {
        let Kind::New {
            packet: p,
            raw_signals,
        } = &entry.kind
        else {
            unreachable!("partitioned: new entries only");
        };
        bind(&entry.seq)?;
        bind(&id.text())?;
        bind(&p.user_id)?;
        bind(&p.employee_id)?;
        bind(&p.session_id)?;
        bind(&p.lesson_id)?;
        bind(&p.system_type.map(|s| s.as_str()))?;
        bind(&p.role.map(|r| r.as_str()))?;
        bind(&text_time(p.client_timestamp))?;
        bind(&p.cognitive_state)?;
        bind(&p.state.map(|s| s.as_str()))?;
        bind(&p.active_seconds)?;
        bind(&p.idle_seconds)?;
        bind(&p.away_seconds)?;
        bind(&p.focus_score)?;
        bind(&p.integrity_score)?;
        bind(&&**raw_signals)?;
        bind(&text_time(entry.received_at))?;
        bind_state(bind, &entry.state)
    })
}

/// Counts the rows this fold inserts for the first time (those from
/// `fresh_from` on) in `packet_counts`, one statement per status, where a
/// trigger ran a program per row (migration 0008). A row written over
/// itself again is an update, counted by the update trigger.
fn count_new(
    tx: &rusqlite::Transaction<'_>,
    new: &[&(PacketId, Entry)],
    fresh_from: i64,
) -> Result<(), StoreError> {
    let mut added: Vec<(DeliveryStatus, i64)> = Vec::new();
    for (_, entry) in new.iter().filter(|(_, e)| e.seq >= fresh_from) {
        match added.iter_mut().find(|(s, _)| *s == entry.state.status) {
            Some((_, n)) => *n += 1,
            None => added.push((entry.state.status, 1)),
        }
    }
    let mut count = tx.prepare_cached("UPDATE packet_counts SET n = n + ?2 WHERE status = ?1")?;
    for (status, n) in added {
        count.execute(params![status.as_str(), n])?;
    }
    Ok(())
}

fn update_changed(
    tx: &rusqlite::Transaction<'_>,
    changed: &[&(PacketId, Entry)],
) -> Result<(), StoreError> {
    in_chunks(tx, changed, update_sql, |bind, (_, entry)| {
        bind(&entry.seq)?;
        bind_state(bind, &entry.state)
    })
}

/// Binds one value after the last one bound.
type Bind<'b> = dyn FnMut(&dyn rusqlite::ToSql) -> rusqlite::Result<()> + 'b;

/// Runs `sql(n)` once per chunk of `items` (see [`rows::chunks`]), with
/// `row` binding each item's values in turn.
fn in_chunks<T>(
    tx: &rusqlite::Transaction<'_>,
    items: &[T],
    sql: fn(usize) -> &'static str,
    mut row: impl FnMut(&mut Bind<'_>, &T) -> rusqlite::Result<()>,
) -> Result<(), StoreError> {
    for chunk in rows::chunks(items) {
        let mut statement = tx.prepare_cached(sql(chunk.len()))?;
        let mut at = 0;
        let mut bind = |value: &dyn rusqlite::ToSql| {
            at += 1;
            statement.raw_bind_parameter(at, value)
        };
        for item in chunk {
            row(&mut bind, item)?;
        }
        statement.raw_execute()?;
    }
    Ok(())
}

/// A row's delivery state, in the order of the last six columns of `ROW`.
fn bind_state(bind: &mut Bind<'_>, s: &State) -> rusqlite::Result<()> {
    bind(&s.status.as_str())?;
    bind(&s.attempts)?;
    bind(&s.processed_at.map(text_time))?;
    bind(&s.processed_by_karma)?;
    bind(&&*s.karma_actions)?;
    bind(&s.error_message.as_deref())
}

/// The UPDATE of `n` rows (a power of two) by their seqs, one statement
/// for many rows: a statement per row cost a program start each, the
/// larger part of what a fold spent on marks.
fn update_sql(n: usize) -> &'static str {
    rows::shaped!(n, |n| {
        format!(
            "UPDATE OR FAIL packets SET status = v.column2, delivery_attempts = v.column3, \
             processed_at = v.column4, processed_by_karma = v.column5, \
             karma_actions = v.column6, processing_error = v.column7 \
             FROM (VALUES {}) AS v WHERE packets.seq = v.column1",
            vec!["(?, ?, ?, ?, ?, ?, ?)"; n].join(", ")
        )
    })
}

/// The first seq of the packets received at or after `since`. Seqs and
/// received_at grow together (one writer stamps both), so a binary search
/// over seq by rowid look-ups finds it without an index on received_at.
pub fn first_seq_since(
    conn: &rusqlite::Connection,
    since: DateTime<Utc>,
) -> Result<Option<i64>, StoreError> {
    let since = text_time(since);
    let mut at_or_after = conn.prepare_cached(
        "SELECT seq, received_at >= ?2 FROM packets WHERE seq >= ?1 ORDER BY seq LIMIT 1",
    )?;
    // The row at or after `seq`, and whether it is as recent as `since`.
    let mut probe = |seq: i64| -> Result<Option<(i64, bool)>, StoreError> {
        Ok(at_or_after
            .query_row(params![seq, since], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?)
    };
    let Some((first, recent)) = probe(i64::MIN)? else {
        return Ok(None);
    };
    if recent {
        return Ok(Some(first));
    }
    let last: i64 = conn.query_row("SELECT MAX(seq) FROM packets", [], |r| r.get(0))?;
    if probe(last)? != Some((last, true)) {
        return Ok(None);
    }
    // The row at or after `lo` is older; the one at or after `hi` is recent.
    let (mut lo, mut hi) = (first, last);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        match probe(mid)? {
            Some((seq, false)) => lo = seq.max(mid),
            _ => hi = mid,
        }
    }
    Ok(probe(hi)?.map(|(seq, _)| seq))
}

/// One step of retention: deletes at most `limit` finished packets received
/// before `before`, oldest first, none that the overlay holds.
fn prune(
    conn: &rusqlite::Connection,
    shared: &Shared,
    numbers: &mut Numbers,
    before: DateTime<Utc>,
    limit: u32,
) -> Result<u64, StoreError> {
    // Nothing as recent as `before`: every row may be old enough.
    let upto = first_seq_since(conn, before)?.unwrap_or(i64::MAX);
    let held: Vec<i64> = shared
        .overlay
        .lock()
        .expect("overlay lock")
        .seqs()
        .collect();
    let tx = conn.unchecked_transaction()?;
    let deleted: Vec<(i64, String)> = {
        let mut delete = tx.prepare_cached(
            "DELETE FROM packets WHERE seq IN (SELECT seq FROM packets WHERE seq < ?1 \
             AND received_at < ?2 AND status IN ('processed', 'failed', 'dead_letter') \
             AND seq NOT IN (SELECT value FROM json_each(?4)) ORDER BY seq LIMIT ?3) \
             RETURNING seq, status",
        )?;
        let rows = delete.query_map(
            params![
                upto,
                text_time(before),
                limit,
                serde_json::to_string(&held).expect("numbers encode")
            ],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        rows.collect::<Result<_, _>>()?
    };
    if deleted.is_empty() {
        return Ok(0);
    }
    {
        // No write lands between this check and the commit.
        let _paused = shared.writer.lock().expect("writer lock");
        let mut overlay = shared.overlay.lock().expect("overlay lock");
        let held_now: std::collections::HashSet<i64> = overlay.seqs().collect();
        if deleted.iter().any(|(seq, _)| held_now.contains(seq)) {
            // A late mark of one of them landed meanwhile: next pass.
            return Ok(0);
        }
        tx.commit()?;
        let statuses: Vec<DeliveryStatus> = deleted
            .iter()
            .filter_map(|(_, status)| DeliveryStatus::parse(status))
            .collect();
        overlay.pruned(&statuses);
    }
    // Chain rows whose packets are all gone, heads left pointing at them,
    // and the numbers of users with neither (a number comes back only to a
    // user with nothing left under it). Forgotten first: each statement
    // commits alone, so a failure midway has taken some back already.
    numbers.forget_all();
    conn.execute_batch(
        "DELETE FROM user_folds WHERE last_seq < (SELECT COALESCE(MIN(seq), 0) FROM packets); \
         DELETE FROM user_heads WHERE fold < (SELECT COALESCE(MIN(fold), 0) FROM user_folds); \
         DELETE FROM users WHERE num NOT IN (SELECT num FROM user_heads);",
    )?;
    // Give the freed pages back. Each step of this pragma frees one page,
    // so it is stepped to the end.
    let mut vacuum = conn.prepare_cached("PRAGMA incremental_vacuum")?;
    let mut steps = vacuum.raw_query();
    while steps.next()?.is_some() {}
    Ok(deleted.len() as u64)
}

/// Redrive or Replay: with the writer paused, folds everything, then sends
/// the selected packets back to pending in the tables.
fn requeue_now(
    conn: &rusqlite::Connection,
    shared: &Shared,
    releaser: &Releaser,
    numbers: &mut Numbers,
    requeue: &Requeue,
    at: DateTime<Utc>,
) -> Result<Vec<(PacketId, i64)>, StoreError> {
    let _paused = shared.writer.lock().expect("writer lock");
    fold_once(conn, shared, releaser, numbers)?;
    // The outcome goes into the history as one JSON object; booleans are
    // stored as 0/1, hence the CASE.
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
    let tx = conn.unchecked_transaction()?;
    let rows: Vec<(String, i64)> = {
        let mut statement = tx.prepare(&sql)?;
        let rows = statement.query_map(
            params![
                requeue.reason.as_str(),
                text_time(at),
                requeue.user_id,
                requeue.received_from.map(text_time),
                requeue.received_before.map(text_time),
            ],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        rows.collect::<Result<_, _>>()?
    };
    tx.commit()?;
    // The overlay is empty (folded, the writer paused): the tables' counts
    // are all of them.
    shared.overlay.lock().expect("overlay lock").counts = table_counts(conn)?;
    rows.into_iter()
        .map(|(id, seq)| {
            uuid::Uuid::try_parse(&id)
                .map(|id| (id.into(), seq))
                .map_err(|e| StoreError::Internal(format!("packet_id {id:?}: {e}").into()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::overlay::State;
    use super::*;
    use crate::domain::Packet;

    /// A packet's raw_signals as the log and the rows hold them.
    fn json(packet: &Packet) -> Arc<str> {
        Arc::from(serde_json::to_string(&packet.raw_signals).unwrap())
    }

    /// Packets per status, as (status, n) rows.
    type PerStatus = Vec<(String, i64)>;

    /// `packet_counts` (those not zero), and a count of the rows.
    fn counts(conn: &rusqlite::Connection) -> (PerStatus, PerStatus) {
        let read = |sql: &str| -> PerStatus {
            let mut statement = conn.prepare(sql).unwrap();
            statement
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        };
        (
            read("SELECT status, n FROM packet_counts WHERE n <> 0 ORDER BY status"),
            read("SELECT status, COUNT(*) FROM packets GROUP BY status ORDER BY status"),
        )
    }

    /// A fold that writes a row over itself again (the row's seq is below
    /// the `next_seq` a committed fold left) counts only its change of
    /// status, through the update trigger, not a second packet.
    #[test]
    fn a_row_written_over_itself_again_is_counted_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("bucket.db");
        super::super::migrate_for_tests(&rusqlite::Connection::open(&db).unwrap());
        let (shared, conn) = super::super::recover(&db).unwrap();
        let releaser = shared.writer.lock().unwrap().log.releaser();
        let mut numbers = Numbers::default();
        let (packet, at) = (Packet::sample("u"), Utc::now());
        let seq = {
            let mut overlay = shared.overlay.lock().unwrap();
            let seq = overlay.next_seq;
            overlay.insert(seq, packet.clone(), json(&packet), at);
            overlay.next_seq = seq + 1;
            seq
        };
        assert_eq!(
            fold_once(&conn, &shared, &releaser, &mut numbers).unwrap(),
            1
        );
        let pending = vec![("pending".to_string(), 1)];
        assert_eq!(counts(&conn), (pending.clone(), pending));

        {
            let mut overlay = shared.overlay.lock().unwrap();
            overlay.insert(seq, packet.clone(), json(&packet), at);
            let processed = State {
                status: DeliveryStatus::Processed,
                processed_at: Some(at),
                ..State::pending(1)
            };
            overlay.change(packet.packet_id, processed, None);
        }
        assert_eq!(
            fold_once(&conn, &shared, &releaser, &mut numbers).unwrap(),
            1
        );
        let processed = vec![("processed".to_string(), 1)];
        assert_eq!(counts(&conn), (processed.clone(), processed));
    }
}
