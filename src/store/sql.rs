//! The SQL both engines run, written once.
//!
//! SQLite and PostgreSQL accept the same statements here (numbered `$n`
//! parameters, `ON CONFLICT`, `RETURNING`); only the Rust types differ a
//! little, so one macro implements [`Backend`](super::Backend) for each pool.

/// Every column of `packets`, in the order `decode_row` reads them.
macro_rules! packet_columns {
    () => {
        "seq, packet_id, user_id, employee_id, session_id, lesson_id, system_type, role, \
         client_timestamp, cognitive_state, state, active_seconds, idle_seconds, away_seconds, \
         focus_score, integrity_score, raw_signals, received_at, status, delivery_attempts, \
         lease_owner, lease_expires_at, processed_at, processed_by_karma, karma_actions, \
         processing_error"
    };
}

pub(super) const INSERT_HEAD: &str = "INSERT INTO packets (packet_id, user_id, employee_id, \
     session_id, lesson_id, system_type, role, client_timestamp, cognitive_state, state, \
     active_seconds, idle_seconds, away_seconds, focus_score, integrity_score, raw_signals, \
     received_at) ";
pub(super) const INSERT_TAIL: &str =
    " ON CONFLICT (packet_id) DO NOTHING RETURNING packet_id, received_at";
pub(super) const RECEIVED_AT: &str = "SELECT received_at FROM packets WHERE packet_id = $1";
pub(super) const LEASE_HEAD: &str = "UPDATE packets SET status = 'leased', lease_owner = ";
pub(super) const LEASE_MID: &str = ", delivery_attempts = delivery_attempts + 1 \
     WHERE status = 'pending' AND packet_id IN (";
pub(super) const LEASE_TAIL: &str = concat!(") RETURNING ", packet_columns!());
pub(super) const MARK_LOOKUP: &str = "SELECT status, lease_owner FROM packets WHERE packet_id = $1";
pub(super) const MARK: &str = "UPDATE packets SET status = $2, processed_by_karma = $3, \
     processed_at = $4, karma_actions = $5, processing_error = $6, lease_owner = NULL, \
     lease_expires_at = NULL WHERE packet_id = $1 AND status <> 'processed'";
pub(super) const EXPIRE: &str = "UPDATE packets SET status = CASE WHEN delivery_attempts >= $2 \
     THEN 'dead_letter' ELSE 'pending' END, lease_owner = NULL, lease_expires_at = NULL \
     WHERE status = 'leased' AND lease_expires_at <= $1 RETURNING packet_id, status";
pub(super) const RELEASE_OWNER: &str = "UPDATE packets SET status = CASE WHEN \
     delivery_attempts >= $2 THEN 'dead_letter' ELSE 'pending' END, lease_owner = NULL, \
     lease_expires_at = NULL WHERE status = 'leased' AND lease_owner = $1 \
     RETURNING packet_id, status";
pub(super) const PENDING_IDS: &str =
    "SELECT packet_id FROM packets WHERE status = 'pending' ORDER BY seq";
pub(super) const USER_PACKETS: &str = concat!(
    "SELECT ",
    packet_columns!(),
    " FROM packets WHERE user_id = $1 AND ($2 IS NULL OR status = $2) AND seq < $3 \
     ORDER BY seq DESC LIMIT $4"
);
pub(super) const COUNTS: &str = "SELECT status, COUNT(*) AS n FROM packets GROUP BY status";

/// Most rows one statement carries. Statements are built for power-of-two
/// row counts only, so each connection prepares at most nine shapes.
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

/// Implements `Backend` for `$backend`, a struct with pools `writes` (for
/// the writer tasks) and `reads`.
/// `$id` is how the engine stores a UUID; `$to_id` / `$from_id` convert.
macro_rules! sql_backend {
    ($backend:ty, $db:ty, $id:ty, $to_id:expr, $from_id:expr, writers = $writers:expr) => {
        use async_trait::async_trait;
        use chrono::{DateTime, Utc};
        use serde_json::Value;
        use sqlx::Row;
        use sqlx::types::Json;
        use uuid::Uuid;

        use $crate::domain::{DeliveryStatus, Packet};
        use $crate::store::sql;
        use $crate::store::{
            Backend, Counts, Inserted, Mark, MarkOutcome, Released, StoreError, StoredPacket,
            UserQuery, WriteOp, WriteReply,
        };

        type Conn = <$db as sqlx::Database>::Connection;
        type DbRow = <$db as sqlx::Database>::Row;

        fn to_id(id: Uuid) -> $id {
            ($to_id)(id)
        }

        fn decode_row(row: &DbRow) -> Result<StoredPacket, sqlx::Error> {
            let status: String = row.try_get("status")?;
            let status = DeliveryStatus::parse(&status)
                .ok_or_else(|| sqlx::Error::Decode(format!("unknown status {status:?}").into()))?;
            let attempts: i32 = row.try_get("delivery_attempts")?;
            let lease_ms: Option<i64> = row.try_get("lease_expires_at")?;
            let Json(raw_signals): Json<serde_json::Map<String, Value>> =
                row.try_get("raw_signals")?;
            let Json(karma_actions): Json<Vec<Value>> = row.try_get("karma_actions")?;
            Ok(StoredPacket {
                seq: row.try_get("seq")?,
                packet: Packet {
                    packet_id: ($from_id)(row.try_get::<$id, _>("packet_id")?),
                    user_id: row.try_get("user_id")?,
                    employee_id: row.try_get("employee_id")?,
                    session_id: row.try_get("session_id")?,
                    lesson_id: row.try_get("lesson_id")?,
                    system_type: row.try_get("system_type")?,
                    role: row.try_get("role")?,
                    client_timestamp: row.try_get("client_timestamp")?,
                    cognitive_state: row.try_get("cognitive_state")?,
                    state: row.try_get("state")?,
                    active_seconds: row.try_get("active_seconds")?,
                    idle_seconds: row.try_get("idle_seconds")?,
                    away_seconds: row.try_get("away_seconds")?,
                    focus_score: row.try_get("focus_score")?,
                    integrity_score: row.try_get("integrity_score")?,
                    raw_signals,
                },
                received_at: row.try_get("received_at")?,
                status,
                delivery_attempts: attempts.max(0) as u32,
                lease_owner: row.try_get("lease_owner")?,
                lease_expires_at: lease_ms.and_then(DateTime::<Utc>::from_timestamp_millis),
                processed_at: row.try_get("processed_at")?,
                processed_by_karma: row.try_get("processed_by_karma")?,
                karma_actions,
                error_message: row.try_get("processing_error")?,
            })
        }

        fn decode_released(row: &DbRow) -> Result<Released, sqlx::Error> {
            let status: String = row.try_get("status")?;
            Ok(Released {
                packet_id: ($from_id)(row.try_get::<$id, _>("packet_id")?),
                status: DeliveryStatus::parse(&status).ok_or_else(|| {
                    sqlx::Error::Decode(format!("unknown status {status:?}").into())
                })?,
            })
        }

        async fn apply(conn: &mut Conn, op: &WriteOp) -> Result<WriteReply, sqlx::Error> {
            Ok(match op {
                WriteOp::Insert(_) => unreachable!("inserts are applied together by insert_all"),
                WriteOp::Lease {
                    ids,
                    owner,
                    expires_at,
                } => {
                    let mut leased = Vec::with_capacity(ids.len());
                    for chunk in sql::chunks(ids) {
                        let mut qb = sqlx::QueryBuilder::<$db>::new(sql::LEASE_HEAD);
                        qb.push_bind(owner)
                            .push(", lease_expires_at = ")
                            .push_bind(expires_at.timestamp_millis())
                            .push(sql::LEASE_MID);
                        let mut list = qb.separated(", ");
                        for id in chunk {
                            list.push_bind(to_id(*id));
                        }
                        qb.push(sql::LEASE_TAIL);
                        for row in qb.build().fetch_all(&mut *conn).await? {
                            leased.push(decode_row(&row)?);
                        }
                    }
                    // RETURNING has no order; hand out oldest first.
                    leased.sort_by_key(|p| p.seq);
                    WriteReply::Leased(leased)
                }
                WriteOp::Mark(mark) => WriteReply::Marked(apply_mark(conn, mark).await?),
                WriteOp::ExpireLeases {
                    now,
                    max_deliveries,
                } => {
                    let rows = sqlx::query(sql::EXPIRE)
                        .bind(now.timestamp_millis())
                        .bind(*max_deliveries as i32)
                        .fetch_all(&mut *conn)
                        .await?;
                    WriteReply::Released(
                        rows.iter().map(decode_released).collect::<Result<_, _>>()?,
                    )
                }
                WriteOp::ReleaseOwner {
                    owner,
                    max_deliveries,
                } => {
                    let rows = sqlx::query(sql::RELEASE_OWNER)
                        .bind(owner)
                        .bind(*max_deliveries as i32)
                        .fetch_all(&mut *conn)
                        .await?;
                    WriteReply::Released(
                        rows.iter().map(decode_released).collect::<Result<_, _>>()?,
                    )
                }
            })
        }

        /// Inserts every packet of a batch with multi-row statements; a
        /// packet whose id is already stored gets the stored receipt.
        async fn insert_all(
            conn: &mut Conn,
            packets: &[&Packet],
            now: DateTime<Utc>,
        ) -> Result<Vec<Inserted>, sqlx::Error> {
            let mut created = std::collections::HashMap::with_capacity(packets.len());
            for chunk in sql::chunks(packets) {
                let mut qb = sqlx::QueryBuilder::<$db>::new(sql::INSERT_HEAD);
                qb.push_values(chunk, |mut row, p| {
                    row.push_bind(to_id(p.packet_id))
                        .push_bind(&p.user_id)
                        .push_bind(&p.employee_id)
                        .push_bind(&p.session_id)
                        .push_bind(&p.lesson_id)
                        .push_bind(&p.system_type)
                        .push_bind(&p.role)
                        .push_bind(p.client_timestamp)
                        .push_bind(&p.cognitive_state)
                        .push_bind(&p.state)
                        .push_bind(p.active_seconds)
                        .push_bind(p.idle_seconds)
                        .push_bind(p.away_seconds)
                        .push_bind(p.focus_score)
                        .push_bind(p.integrity_score)
                        .push_bind(Json(&p.raw_signals))
                        .push_bind(now);
                });
                qb.push(sql::INSERT_TAIL);
                for row in qb.build().fetch_all(&mut *conn).await? {
                    let id = ($from_id)(row.try_get::<$id, _>("packet_id")?);
                    created.insert(id, row.try_get::<DateTime<Utc>, _>("received_at")?);
                }
            }
            let mut receipts = Vec::with_capacity(packets.len());
            for p in packets {
                // The first of several equal ids in a batch creates it.
                let receipt = match created.remove(&p.packet_id) {
                    Some(received_at) => Inserted {
                        packet_id: p.packet_id,
                        received_at,
                        created: true,
                    },
                    None => Inserted {
                        packet_id: p.packet_id,
                        received_at: sqlx::query_scalar(sql::RECEIVED_AT)
                            .bind(to_id(p.packet_id))
                            .fetch_one(&mut *conn)
                            .await?,
                        created: false,
                    },
                };
                receipts.push(receipt);
            }
            Ok(receipts)
        }

        async fn apply_mark(conn: &mut Conn, mark: &Mark) -> Result<MarkOutcome, sqlx::Error> {
            let found = sqlx::query(sql::MARK_LOOKUP)
                .bind(to_id(mark.packet_id))
                .fetch_optional(&mut *conn)
                .await?;
            let Some(found) = found else {
                return Ok(MarkOutcome::NotFound);
            };
            let status: String = found.try_get("status")?;
            if status == DeliveryStatus::Processed.as_str() {
                return Ok(MarkOutcome::AlreadyProcessed);
            }
            let lease_owner: Option<String> = found.try_get("lease_owner")?;
            let new_status = if mark.success {
                DeliveryStatus::Processed
            } else {
                DeliveryStatus::Failed
            };
            let updated = sqlx::query(sql::MARK)
                .bind(to_id(mark.packet_id))
                .bind(new_status.as_str())
                .bind(mark.success)
                .bind(mark.at)
                .bind(Json(&mark.karma_actions))
                .bind(&mark.error_message)
                .execute(&mut *conn)
                .await?;
            Ok(if updated.rows_affected() == 0 {
                MarkOutcome::AlreadyProcessed
            } else {
                MarkOutcome::Applied { lease_owner }
            })
        }

        #[async_trait]
        impl Backend for $backend {
            async fn write_batch(&self, ops: &[WriteOp]) -> Result<Vec<WriteReply>, StoreError> {
                let now = Utc::now();
                let mut tx = self.writes.begin().await?;
                let packets: Vec<&Packet> = ops
                    .iter()
                    .filter_map(|op| match op {
                        WriteOp::Insert(p) => Some(p.as_ref()),
                        _ => None,
                    })
                    .collect();
                // Inserts first, together: no other write of a batch can
                // concern a packet whose insert is not yet acknowledged.
                let mut inserted = insert_all(&mut tx, &packets, now).await?.into_iter();
                let mut replies = Vec::with_capacity(ops.len());
                for op in ops {
                    replies.push(match op {
                        WriteOp::Insert(_) => {
                            WriteReply::Inserted(inserted.next().expect("one receipt per insert"))
                        }
                        other => apply(&mut tx, other).await?,
                    });
                }
                tx.commit().await?;
                Ok(replies)
            }

            async fn pending_ids(&self) -> Result<Vec<Uuid>, StoreError> {
                let ids: Vec<$id> = sqlx::query_scalar(sql::PENDING_IDS)
                    .fetch_all(&self.reads)
                    .await?;
                Ok(ids.into_iter().map($from_id).collect())
            }

            async fn user_packets(
                &self,
                query: &UserQuery,
            ) -> Result<Vec<StoredPacket>, StoreError> {
                let rows = sqlx::query(sql::USER_PACKETS)
                    .bind(&query.user_id)
                    .bind(query.status.map(DeliveryStatus::as_str))
                    .bind(query.before_seq.unwrap_or(i64::MAX))
                    .bind(i64::from(query.limit))
                    .fetch_all(&self.reads)
                    .await?;
                Ok(rows.iter().map(decode_row).collect::<Result<_, _>>()?)
            }

            async fn counts(&self) -> Result<Counts, StoreError> {
                let rows = sqlx::query(sql::COUNTS).fetch_all(&self.reads).await?;
                let mut counts = Counts::default();
                for row in rows {
                    let status: String = row.try_get("status")?;
                    let n = row.try_get::<i64, _>("n")?.max(0) as u64;
                    match DeliveryStatus::parse(&status) {
                        Some(DeliveryStatus::Pending) => counts.pending = n,
                        Some(DeliveryStatus::Leased) => counts.leased = n,
                        Some(DeliveryStatus::Processed) => counts.processed = n,
                        Some(DeliveryStatus::Failed) => counts.failed = n,
                        Some(DeliveryStatus::DeadLetter) => counts.dead_letter = n,
                        None => {}
                    }
                }
                Ok(counts)
            }

            async fn ping(&self) -> Result<(), StoreError> {
                sqlx::query("SELECT 1").execute(&self.reads).await?;
                Ok(())
            }

            fn writers(&self) -> usize {
                $writers
            }
        }
    };
}

pub(super) use sql_backend;

#[cfg(test)]
mod tests {
    use super::{MAX_ROWS_PER_STATEMENT, chunks};

    #[test]
    fn chunks_are_powers_of_two_covering_everything() {
        for n in [0, 1, 3, 64, 300, 1000] {
            let items: Vec<usize> = (0..n).collect();
            let parts: Vec<&[usize]> = chunks(&items).collect();
            assert_eq!(parts.concat(), items);
            assert!(
                parts
                    .iter()
                    .all(|c| c.len().is_power_of_two() && c.len() <= MAX_ROWS_PER_STATEMENT)
            );
        }
    }
}
