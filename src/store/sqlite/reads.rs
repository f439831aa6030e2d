//! Reads: the tables, with the overlay laid over them.
//!
//! Each read copies what the overlay holds first and reads the tables
//! after, and for any packet the copy holds, the copy wins. A fold that
//! commits in between only moves a packet from the overlay into the
//! tables, so nothing acknowledged before the read is missed (a packet is
//! in the copy, or in the tables by the time they are read), and a state
//! newer than the copy is at most one the read did not wait for.
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use rusqlite::params;

use sqlx::SqlitePool;
use uuid::fmt::Hyphenated;

use super::overlay::{Entry, Kind, Overlay, State};
use crate::domain::{DeliveryStatus, PacketId};
use crate::store::rows::{PENDING_COLUMNS, PendingRow, STORED_COLUMNS, StoredRow};
use crate::store::{PendingPacket, StoreError, StoredPacket, UserQuery};

/// rusqlite connections for the reads on delivery's path (the backlog,
/// the reconciler's look-ups), each read on the blocking pool: sqlx hands
/// every row from its worker thread to the runtime on its own, and under a
/// sustained load that was a tenth of the bucket's CPU for the backlog's
/// reads alone.
pub struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<rusqlite::Connection>>,
}

/// Connections kept between reads; more are opened while more reads run.
const IDLE_READERS: usize = 4;

impl Readers {
    pub fn new(path: PathBuf) -> Arc<Readers> {
        Arc::new(Readers {
            path,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// Closes the idle connections (a read still running closes its own).
    pub fn close(&self) {
        self.idle.lock().expect("readers lock").clear();
    }

    /// Runs `read` on a connection of its own, off the runtime.
    async fn read<T: Send + 'static>(
        self: &Arc<Self>,
        read: impl FnOnce(&rusqlite::Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let readers = self.clone();
        tokio::task::spawn_blocking(move || {
            let idle = readers.idle.lock().expect("readers lock").pop();
            let conn = match idle {
                Some(conn) => conn,
                None => super::open_connection(&readers.path)?,
            };
            let out = read(&conn);
            let mut idle = readers.idle.lock().expect("readers lock");
            if idle.len() < IDLE_READERS {
                idle.push(conn);
            }
            out
        })
        .await
        .map_err(|e| StoreError::Internal(format!("a read stopped: {e}").into()))?
    }
}

fn json(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).expect("JSON values always encode")
}

/// A pending packet as the overlay has it.
fn pending(entry: &Entry, packet: &Arc<crate::domain::Packet>) -> PendingPacket {
    PendingPacket {
        packet: packet.clone(),
        seq: entry.seq,
        received_at: entry.received_at,
        attempts: entry.state.attempts,
    }
}

/// What the overlay says of some packets' pendingness: new pending packets
/// whole, the deliveries spent of folded pending ones (their rows are
/// pending too: only a lease end keeps a packet pending, and it needs one
/// that was), and the seqs whose rows the tables hold stale.
#[derive(Default)]
struct PendingView {
    new: Vec<PendingPacket>,
    attempts: HashMap<i64, u32>,
    stale: Vec<i64>,
}

impl PendingView {
    fn add(&mut self, entry: &Entry) {
        match (&entry.kind, entry.state.status) {
            (Kind::New { packet, .. }, DeliveryStatus::Pending) => {
                self.new.push(pending(entry, packet))
            }
            (Kind::Folded { .. }, DeliveryStatus::Pending) => {
                self.attempts.insert(entry.seq, entry.state.attempts);
            }
            _ => self.stale.push(entry.seq),
        }
    }

    /// The tables' pending rows with the overlay laid over them, in seq
    /// order. `full`: the table read stopped at its limit, so nothing past
    /// its last row may be added (the table may have more before it).
    fn merge(self, rows: Vec<PendingPacket>, full: bool) -> Vec<PendingPacket> {
        let last = rows.last().map(|p| p.seq);
        let new_seqs: HashSet<i64> = self.new.iter().map(|p| p.seq).collect();
        let mut out: Vec<PendingPacket> = rows
            .into_iter()
            // A new packet folded after the copy: the copy's is the same.
            .filter(|p| !new_seqs.contains(&p.seq))
            .map(|mut p| {
                if let Some(attempts) = self.attempts.get(&p.seq) {
                    p.attempts = *attempts;
                }
                p
            })
            .collect();
        out.extend(
            self.new
                .into_iter()
                .filter(|p| !full || last.is_some_and(|last| p.seq < last)),
        );
        out.sort_by_key(|p| p.seq);
        out
    }
}

/// Pending packets after `after`, oldest first, at most `limit`.
pub async fn pending_after(
    overlay: &Mutex<Overlay>,
    readers: &Arc<Readers>,
    after: i64,
    limit: u32,
) -> Result<Vec<PendingPacket>, StoreError> {
    let mut view = PendingView::default();
    for (_, entry) in overlay.lock().expect("overlay lock").after(after) {
        view.add(entry);
    }
    let stale = json(&view.stale);
    let rows = readers
        .read(move |conn| {
            let mut statement = conn.prepare_cached(&format!(
                "SELECT {PENDING_COLUMNS} FROM packets WHERE status = 'pending' AND seq > ?1 \
                 AND seq NOT IN (SELECT value FROM json_each(?3)) ORDER BY seq LIMIT ?2"
            ))?;
            let rows = statement
                .query_map(params![after, limit, stale], PendingRow::from_sqlite)?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await?;
    let full = rows.len() >= limit as usize;
    let rows = rows
        .into_iter()
        .map(PendingRow::into_pending)
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = view.merge(rows, full);
    out.truncate(limit as usize);
    Ok(out)
}

/// Those of `ids` that are pending, in seq order.
pub async fn pending_among(
    overlay: &Mutex<Overlay>,
    readers: &Arc<Readers>,
    ids: &[PacketId],
) -> Result<Vec<PendingPacket>, StoreError> {
    let mut view = PendingView::default();
    let mut ask = Vec::with_capacity(ids.len());
    {
        let overlay = overlay.lock().expect("overlay lock");
        for id in ids {
            match overlay.get(id) {
                Some(entry) => {
                    view.add(entry);
                    if matches!(entry.kind, Kind::Folded { .. }) {
                        ask.push(*id);
                    }
                }
                None => ask.push(*id),
            }
        }
    }
    let (ask, stale) = (json(&ask), json(&view.stale));
    let rows = readers
        .read(move |conn| {
            let mut statement = conn.prepare_cached(&format!(
                "SELECT {PENDING_COLUMNS} FROM packets WHERE status = 'pending' \
                 AND packet_id IN (SELECT value FROM json_each(?1)) \
                 AND seq NOT IN (SELECT value FROM json_each(?2)) ORDER BY seq"
            ))?;
            let rows = statement
                .query_map(params![ask, stale], PendingRow::from_sqlite)?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await?;
    let rows = rows
        .into_iter()
        .map(PendingRow::into_pending)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(view.merge(rows, false))
}

/// A stored packet from its row, with the overlay's state over it.
fn with_state(mut stored: StoredPacket, state: &State) -> StoredPacket {
    stored.status = state.status;
    stored.delivery_attempts = state.attempts;
    stored.processed_at = state.processed_at;
    stored.processed_by_karma = state.processed_by_karma;
    stored.karma_actions = serde_json::from_str(&state.karma_actions).unwrap_or_default();
    stored.error_message = state.error_message.as_deref().map(str::to_owned);
    stored
}

/// One user's packets, newest first: the overlay's, then the tables'.
pub async fn user_packets(
    overlay: &Mutex<Overlay>,
    pool: &SqlitePool,
    query: &UserQuery,
) -> Result<Vec<StoredPacket>, StoreError> {
    let before = query.before_seq.unwrap_or(i64::MAX);
    let (mut out, folded): (Vec<StoredPacket>, HashMap<i64, State>) = {
        let overlay = overlay.lock().expect("overlay lock");
        let mut out = Vec::new();
        let mut folded = HashMap::new();
        for entry in overlay.of_user(&query.user_id).filter(|e| e.seq < before) {
            match &entry.kind {
                Kind::New { packet, .. } => out.push(StoredPacket {
                    seq: entry.seq,
                    packet: (**packet).clone(),
                    received_at: entry.received_at,
                    status: entry.state.status,
                    delivery_attempts: entry.state.attempts,
                    processed_at: entry.state.processed_at,
                    processed_by_karma: entry.state.processed_by_karma,
                    karma_actions: serde_json::from_str(&entry.state.karma_actions)
                        .unwrap_or_default(),
                    error_message: entry.state.error_message.as_deref().map(str::to_owned),
                    history: Vec::new(),
                }),
                Kind::Folded { .. } => {
                    folded.insert(entry.seq, entry.state.clone());
                }
            }
        }
        (out, folded)
    };
    let held: Vec<i64> = out
        .iter()
        .map(|p| p.seq)
        .chain(folded.keys().copied())
        .collect();
    // Folded packets whose state the overlay has: their rows, whatever the
    // tables say their status is.
    if !folded.is_empty() {
        let seqs: Vec<i64> = folded.keys().copied().collect();
        for row in rows_by_seq(pool, &seqs, None).await? {
            let state = &folded[&row.seq];
            out.push(with_state(row, state));
        }
    }
    out.retain(|p| query.status.is_none_or(|s| p.status == s));
    out.extend(table_rows(pool, query, before, &held).await?);
    out.sort_by_key(|p| std::cmp::Reverse(p.seq));
    out.dedup_by_key(|p| p.seq);
    out.truncate(query.limit as usize);
    Ok(out)
}

/// Rows by seq, newest first, of one status if given.
async fn rows_by_seq(
    pool: &SqlitePool,
    seqs: &[i64],
    status: Option<DeliveryStatus>,
) -> Result<Vec<StoredPacket>, StoreError> {
    let filter = status.map_or(String::new(), |s| format!(" AND status = '{}'", s.as_str()));
    let sql = format!(
        "SELECT {STORED_COLUMNS} FROM packets WHERE seq IN (SELECT value FROM json_each($1)){filter} \
         ORDER BY seq DESC"
    );
    let rows: Vec<StoredRow<Hyphenated>> = sqlx::query_as(&sql)
        .bind(json(&seqs))
        .fetch_all(pool)
        .await?;
    rows.into_iter().map(StoredRow::into_stored).collect()
}

/// Chain rows a query walks at first; each further query walks twice as
/// many, up to `MAX_STEPS`.
const FIRST_STEPS: u32 = 64;
const MAX_STEPS: u32 = 4096;

/// One user's packets in the tables before `before`, newest first, at most
/// the query's limit, none of `held`: failed and dead-letter ones by their
/// partial indexes, the others along the user's chain of fold rows.
async fn table_rows(
    pool: &SqlitePool,
    query: &UserQuery,
    before: i64,
    held: &[i64],
) -> Result<Vec<StoredPacket>, StoreError> {
    let limit = query.limit as usize;
    if let Some(status @ (DeliveryStatus::Failed | DeliveryStatus::DeadLetter)) = query.status {
        let sql = format!(
            "SELECT {STORED_COLUMNS} FROM packets WHERE user_id = $1 AND status = '{}' \
             AND seq < $2 AND seq NOT IN (SELECT value FROM json_each($4)) \
             ORDER BY seq DESC LIMIT $3",
            status.as_str()
        );
        let rows: Vec<StoredRow<Hyphenated>> = sqlx::query_as(&sql)
            .bind(&query.user_id)
            .bind(before)
            .bind(query.limit)
            .bind(json(&held))
            .fetch_all(pool)
            .await?;
        return rows.into_iter().map(StoredRow::into_stored).collect();
    }
    let held: HashSet<i64> = held.iter().copied().collect();
    let head: Option<(i64, i64)> = sqlx::query_as(
        "SELECT u.num, h.fold FROM users u JOIN user_heads h ON h.num = u.num \
         WHERE u.user_id = $1",
    )
    .bind(&query.user_id)
    .fetch_optional(pool)
    .await?;
    let Some((num, head)) = head else {
        return Ok(Vec::new());
    };
    let mut next = Some(head);
    let mut out = Vec::new();
    let mut steps = FIRST_STEPS.max(query.limit + 1);
    while let Some(start) = next
        && out.len() < limit
    {
        let chain: Vec<(i64, Option<i64>, String)> = sqlx::query_as(
            "WITH RECURSIVE chain(fold, prev, seqs, n) AS ( \
               SELECT fold, prev, seqs, 1 FROM user_folds WHERE fold = $2 AND num = $1 \
               UNION ALL \
               SELECT f.fold, f.prev, f.seqs, chain.n + 1 FROM chain \
                 JOIN user_folds f ON f.fold = chain.prev AND f.num = $1 \
                WHERE chain.n < $3) \
             SELECT fold, prev, seqs FROM chain",
        )
        .bind(num)
        .bind(start)
        .bind(steps)
        .fetch_all(pool)
        .await?;
        next = match chain.len() < steps as usize {
            true => None,
            false => chain.last().and_then(|(_, prev, _)| *prev),
        };
        let mut seqs = Vec::new();
        // A row holds seqs from its fold on: rows from `before` on hold
        // none before it.
        for (_, _, list) in chain.iter().filter(|(fold, _, _)| *fold < before) {
            let list: Vec<i64> = serde_json::from_str(list).map_err(|e| {
                StoreError::Internal(format!("user_folds.seqs {list:?}: {e}").into())
            })?;
            seqs.extend(
                list.into_iter()
                    .filter(|s| *s < before && !held.contains(s)),
            );
        }
        if !seqs.is_empty() {
            out.extend(rows_by_seq(pool, &seqs, query.status).await?);
        }
        steps = (steps * 2).min(MAX_STEPS);
    }
    out.truncate(limit);
    Ok(out)
}
