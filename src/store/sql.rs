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

pub(super) const INSERT: &str = "INSERT INTO packets (packet_id, user_id, employee_id, \
     session_id, lesson_id, system_type, role, client_timestamp, cognitive_state, state, \
     active_seconds, idle_seconds, away_seconds, focus_score, integrity_score, raw_signals, \
     received_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, \
     $17) ON CONFLICT (packet_id) DO NOTHING RETURNING received_at";
pub(super) const RECEIVED_AT: &str = "SELECT received_at FROM packets WHERE packet_id = $1";
pub(super) const LEASE: &str = concat!(
    "UPDATE packets SET status = 'leased', lease_owner = $1, lease_expires_at = $2, \
     delivery_attempts = delivery_attempts + 1 WHERE packet_id = $3 AND status = 'pending' \
     RETURNING ",
    packet_columns!()
);
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
pub(super) const GET: &str = concat!(
    "SELECT ",
    packet_columns!(),
    " FROM packets WHERE packet_id = $1"
);
pub(super) const COUNTS: &str = "SELECT status, COUNT(*) AS n FROM packets GROUP BY status";

/// Implements `Backend` for `$backend`, a struct with a `pool: $pool` field.
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

        async fn apply(
            conn: &mut Conn,
            op: &WriteOp,
            now: DateTime<Utc>,
        ) -> Result<WriteReply, sqlx::Error> {
            Ok(match op {
                WriteOp::Insert(p) => {
                    let id = to_id(p.packet_id);
                    let inserted: Option<DateTime<Utc>> = sqlx::query_scalar(sql::INSERT)
                        .bind(id)
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
                        .bind(now)
                        .fetch_optional(&mut *conn)
                        .await?;
                    let (received_at, created) = match inserted {
                        Some(at) => (at, true),
                        None => (
                            sqlx::query_scalar(sql::RECEIVED_AT)
                                .bind(to_id(p.packet_id))
                                .fetch_one(&mut *conn)
                                .await?,
                            false,
                        ),
                    };
                    WriteReply::Inserted(Inserted {
                        packet_id: p.packet_id,
                        received_at,
                        created,
                    })
                }
                WriteOp::Lease {
                    ids,
                    owner,
                    expires_at,
                } => {
                    let mut leased = Vec::with_capacity(ids.len());
                    for id in ids {
                        let row = sqlx::query(sql::LEASE)
                            .bind(owner)
                            .bind(expires_at.timestamp_millis())
                            .bind(to_id(*id))
                            .fetch_optional(&mut *conn)
                            .await?;
                        if let Some(row) = row {
                            leased.push(decode_row(&row)?);
                        }
                    }
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
                let mut tx = self.pool.begin().await?;
                let mut replies = Vec::with_capacity(ops.len());
                for op in ops {
                    replies.push(apply(&mut tx, op, now).await?);
                }
                tx.commit().await?;
                Ok(replies)
            }

            async fn pending_ids(&self) -> Result<Vec<Uuid>, StoreError> {
                let ids: Vec<$id> = sqlx::query_scalar(sql::PENDING_IDS)
                    .fetch_all(&self.pool)
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
                    .fetch_all(&self.pool)
                    .await?;
                Ok(rows.iter().map(decode_row).collect::<Result<_, _>>()?)
            }

            async fn get(&self, packet_id: Uuid) -> Result<Option<StoredPacket>, StoreError> {
                let row = sqlx::query(sql::GET)
                    .bind(to_id(packet_id))
                    .fetch_optional(&self.pool)
                    .await?;
                Ok(row.as_ref().map(decode_row).transpose()?)
            }

            async fn counts(&self) -> Result<Counts, StoreError> {
                let rows = sqlx::query(sql::COUNTS).fetch_all(&self.pool).await?;
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
                sqlx::query("SELECT 1").execute(&self.pool).await?;
                Ok(())
            }

            fn writers(&self) -> usize {
                $writers
            }
        }
    };
}

pub(super) use sql_backend;
