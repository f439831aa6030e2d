//! Rows as both engines return them. Only how a UUID is stored differs
//! (PostgreSQL: `uuid`; SQLite: hyphenated text), hence the `Id` parameter.
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use sqlx::types::Json;
use uuid::Uuid;

use super::{HistoryEntry, PendingPacket, StoreError, StoredPacket};
use crate::domain::labels::Label;
use crate::domain::{DeliveryStatus, Packet, PacketId};

/// The columns [`PendingRow`] reads.
pub(super) const PENDING_COLUMNS: &str = "seq, packet_id, user_id, employee_id, session_id, \
     lesson_id, system_type, role, client_timestamp, cognitive_state, state, active_seconds, \
     idle_seconds, away_seconds, focus_score, integrity_score, raw_signals, received_at, \
     delivery_attempts";

/// The columns [`StoredRow`] reads.
pub(super) const STORED_COLUMNS: &str = "seq, packet_id, user_id, employee_id, session_id, \
     lesson_id, system_type, role, client_timestamp, cognitive_state, state, active_seconds, \
     idle_seconds, away_seconds, focus_score, integrity_score, raw_signals, received_at, \
     delivery_attempts, status, processed_at, processed_by_karma, karma_actions, \
     processing_error, history";

/// One user's packets, newest first, before seq `$2`, at most `$3`. The
/// status is written as a literal (from the enum, never from a caller), so
/// the planner sees it and picks the partial index for failed and
/// dead-letter packets.
pub(super) fn user_packets_sql(status: Option<DeliveryStatus>) -> String {
    let filter = status.map_or(String::new(), |s| format!(" AND status = '{}'", s.as_str()));
    format!(
        "SELECT {STORED_COLUMNS} FROM packets WHERE user_id = $1 AND seq < $2{filter} \
         ORDER BY seq DESC LIMIT $3"
    )
}

/// A packet and what delivery needs of it.
#[derive(sqlx::FromRow)]
pub(super) struct PendingRow<Id> {
    seq: i64,
    packet_id: Id,
    user_id: String,
    employee_id: Option<String>,
    session_id: Option<String>,
    lesson_id: Option<String>,
    system_type: Option<String>,
    role: Option<String>,
    client_timestamp: DateTime<Utc>,
    cognitive_state: String,
    state: Option<String>,
    active_seconds: f64,
    idle_seconds: f64,
    away_seconds: f64,
    focus_score: Option<f64>,
    integrity_score: f64,
    raw_signals: Json<Map<String, Value>>,
    received_at: DateTime<Utc>,
    delivery_attempts: i32,
}

/// A packet with its whole delivery record.
#[derive(sqlx::FromRow)]
pub(super) struct StoredRow<Id> {
    #[sqlx(flatten)]
    pending: PendingRow<Id>,
    status: String,
    processed_at: Option<DateTime<Utc>>,
    processed_by_karma: bool,
    karma_actions: Json<Vec<Value>>,
    processing_error: Option<String>,
    history: Json<Vec<HistoryEntry>>,
}

/// A label column's text as its type; text no version wrote is a bug.
fn label<T: Label>(column: Option<String>) -> Result<Option<T>, StoreError> {
    column
        .map(|text| {
            text.parse().map_err(|_| {
                StoreError::Internal(
                    format!("unknown {} {text:?} in the database", T::FIELD).into(),
                )
            })
        })
        .transpose()
}

impl<Id: Into<Uuid>> PendingRow<Id> {
    fn into_parts(self) -> Result<(Packet, i64, DateTime<Utc>, u32), StoreError> {
        let packet = Packet {
            packet_id: PacketId::from(self.packet_id.into()),
            user_id: self.user_id,
            employee_id: self.employee_id,
            session_id: self.session_id,
            lesson_id: self.lesson_id,
            system_type: label(self.system_type)?,
            role: label(self.role)?,
            client_timestamp: self.client_timestamp,
            cognitive_state: self.cognitive_state,
            state: label(self.state)?,
            active_seconds: self.active_seconds,
            idle_seconds: self.idle_seconds,
            away_seconds: self.away_seconds,
            focus_score: self.focus_score,
            integrity_score: self.integrity_score,
            raw_signals: self.raw_signals.0,
        };
        let attempts = self.delivery_attempts.max(0) as u32;
        Ok((packet, self.seq, self.received_at, attempts))
    }

    pub(super) fn into_pending(self) -> Result<PendingPacket, StoreError> {
        let (packet, seq, received_at, attempts) = self.into_parts()?;
        Ok(PendingPacket {
            packet: Arc::new(packet),
            seq,
            received_at,
            attempts,
        })
    }
}

impl PendingRow<Uuid> {
    /// A row of [`PENDING_COLUMNS`] as rusqlite reads it from SQLite (the
    /// hot reads skip sqlx, which hands each row to the runtime on its own):
    /// times as the text sqlx writes, the id hyphenated, JSON as text.
    pub(super) fn from_sqlite(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        fn bad(at: usize, e: impl std::error::Error + Send + Sync + 'static) -> rusqlite::Error {
            rusqlite::Error::FromSqlConversionFailure(at, rusqlite::types::Type::Text, Box::new(e))
        }
        let time = |at: usize| -> rusqlite::Result<DateTime<Utc>> {
            let text: String = r.get(at)?;
            DateTime::parse_from_rfc3339(&text)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|e| bad(at, e))
        };
        let id: String = r.get(1)?;
        let raw_signals: String = r.get(16)?;
        Ok(PendingRow {
            seq: r.get(0)?,
            packet_id: Uuid::try_parse(&id).map_err(|e| bad(1, e))?,
            user_id: r.get(2)?,
            employee_id: r.get(3)?,
            session_id: r.get(4)?,
            lesson_id: r.get(5)?,
            system_type: r.get(6)?,
            role: r.get(7)?,
            client_timestamp: time(8)?,
            cognitive_state: r.get(9)?,
            state: r.get(10)?,
            active_seconds: r.get(11)?,
            idle_seconds: r.get(12)?,
            away_seconds: r.get(13)?,
            focus_score: r.get(14)?,
            integrity_score: r.get(15)?,
            raw_signals: Json(serde_json::from_str(&raw_signals).map_err(|e| bad(16, e))?),
            received_at: time(17)?,
            delivery_attempts: r.get(18)?,
        })
    }
}

impl<Id: Into<Uuid>> StoredRow<Id> {
    pub(super) fn into_stored(self) -> Result<StoredPacket, StoreError> {
        let status = DeliveryStatus::parse(&self.status).ok_or_else(|| {
            StoreError::Internal(format!("unknown status {:?} in the database", self.status).into())
        })?;
        let (packet, seq, received_at, delivery_attempts) = self.pending.into_parts()?;
        Ok(StoredPacket {
            seq,
            packet,
            received_at,
            status,
            delivery_attempts,
            processed_at: self.processed_at,
            processed_by_karma: self.processed_by_karma,
            karma_actions: self.karma_actions.0,
            error_message: self.processing_error,
            history: self.history.0,
        })
    }
}

/// Splits `items` into rounds in which no packet id appears twice, keeping
/// each id's writes in their order: a statement that joins on the id
/// applies each row once, so a second write of the same packet must come
/// in a later statement.
pub(super) fn rounds<T>(items: &[T], id: impl Fn(&T) -> PacketId) -> Vec<Vec<usize>> {
    let mut rounds: Vec<Vec<usize>> = Vec::new();
    let mut seen: std::collections::HashMap<PacketId, usize> = std::collections::HashMap::new();
    for (i, item) in items.iter().enumerate() {
        let round = seen.entry(id(item)).and_modify(|r| *r += 1).or_insert(0);
        if rounds.len() <= *round {
            rounds.push(Vec::new());
        }
        rounds[*round].push(i);
    }
    rounds
}

/// Most rows one statement carries (SQLite binds every value of a row).
/// Statements are built for power-of-two row counts only, so each
/// connection prepares at most nine shapes.
pub(super) const MAX_ROWS_PER_STATEMENT: usize = 256;

/// Splits `items` into power-of-two chunks of at most `MAX_ROWS_PER_STATEMENT`.
pub(super) fn chunks<T>(mut items: &[T]) -> impl Iterator<Item = &[T]> {
    std::iter::from_fn(move || {
        if items.is_empty() {
            return None;
        }
        let n = MAX_ROWS_PER_STATEMENT.min(1 << items.len().ilog2());
        let (head, rest) = items.split_at(n);
        items = rest;
        Some(head)
    })
}

/// A statement's texts, one for each power of two of rows.
pub(super) type Shapes = std::sync::OnceLock<Vec<String>>;

/// `shaped!(n, text)`: [`shape`] with a cell of the call's own, so each
/// statement's texts are made once.
macro_rules! shaped {
    ($n:expr, $text:expr) => {{
        static SHAPES: $crate::store::rows::Shapes = $crate::store::rows::Shapes::new();
        $crate::store::rows::shape(&SHAPES, $n, $text)
    }};
}
pub(super) use shaped;

/// The text `text` makes for `n` rows (a power of two): made once for each
/// power up to [`MAX_ROWS_PER_STATEMENT`] and kept in `cell`.
pub(super) fn shape(
    cell: &'static Shapes,
    n: usize,
    text: impl Fn(usize) -> String,
) -> &'static str {
    let all = cell.get_or_init(|| {
        (0..=MAX_ROWS_PER_STATEMENT.ilog2())
            .map(|k| text(1 << k))
            .collect()
    });
    &all[n.ilog2() as usize]
}

#[cfg(test)]
mod tests {
    use crate::domain::PacketId;

    #[test]
    fn chunks_are_powers_of_two_covering_everything() {
        for n in [0, 1, 3, 64, 300, 1000] {
            let items: Vec<usize> = (0..n).collect();
            let parts: Vec<&[usize]> = super::chunks(&items).collect();
            assert_eq!(parts.concat(), items);
            assert!(
                parts
                    .iter()
                    .all(|c| c.len().is_power_of_two() && c.len() <= super::MAX_ROWS_PER_STATEMENT)
            );
        }
    }

    #[test]
    fn rounds_never_repeat_an_id_and_keep_order() {
        let a = PacketId::new();
        let b = PacketId::new();
        let items = [a, b, a, a, b];
        assert_eq!(
            super::rounds(&items, |id| *id),
            vec![vec![0, 1], vec![2, 4], vec![3]]
        );
    }
}
