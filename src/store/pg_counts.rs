//! PostgreSQL's packet counts per day and status (migration 0007): every
//! statement that stores a packet, changes its status or deletes it appends
//! its group's net change to `packet_count_deltas` in the same statement, so
//! the counts are exactly `packet_counts` plus `packet_count_deltas` at any
//! moment, and no writer waits on another's counter row. Every second the
//! appended rows are folded into `packet_counts` (one statement, so a reader
//! sees them on one side or the other); a fold and a day's drop never run
//! at once (one advisory lock), so a day's counts leave whole with it.
use std::time::Duration;

use chrono::NaiveDate;
use sqlx::Row;
use sqlx::postgres::{PgConnection, PgPool};

/// How often the deltas are folded: Status reads what is appended since,
/// a few hundred rows at 5,000 packets/s.
pub(super) const FOLD_EVERY: Duration = Duration::from_secs(1);

/// How a statement counts what it changed: `changed` (a CTE before this)
/// has one row per packet, with `received_at`, its status before (`was`,
/// NULL for a packet stored or deleted) and after (`now`, NULL for one
/// deleted); each day and status gets the group's net change as one row.
macro_rules! counted {
    () => {
        "counted AS (INSERT INTO packet_count_deltas (day, status, n) \
         SELECT (c.received_at AT TIME ZONE 'UTC')::date, d.status, SUM(d.n) FROM changed c \
         CROSS JOIN LATERAL (VALUES (c.was, -1), (c.now, 1)) AS d(status, n) \
         WHERE d.status IS NOT NULL AND c.was IS DISTINCT FROM c.now \
         GROUP BY 1, 2 HAVING SUM(d.n) <> 0)"
    };
}
pub(super) use counted;

/// Packets per status: what is folded and what is appended since.
pub(super) const COUNTS: &str = "SELECT status, SUM(n)::int8 FROM (\
     SELECT status, n FROM packet_counts UNION ALL SELECT status, n FROM packet_count_deltas) c \
     GROUP BY status";

/// The fold's statement; `$1` is [`COUNTS_LOCK`].
pub(super) const FOLD: &str = "WITH moved AS (DELETE FROM packet_count_deltas \
     WHERE (SELECT pg_try_advisory_xact_lock($1)) RETURNING day, status, n) \
     INSERT INTO packet_counts AS c (day, status, n) \
     SELECT day, status, SUM(n) FROM moved GROUP BY 1, 2 ORDER BY 1, 2 \
     ON CONFLICT (day, status) DO UPDATE SET n = c.n + EXCLUDED.n";

/// Held by a fold and by a day's drop (any fixed key).
pub(super) const COUNTS_LOCK: i64 = 0x636f_756e_7473;

/// Moves the appended deltas into `packet_counts`, unless a fold or a
/// drop holds the lock (it is then done by them, or on the next pass).
/// Rows appended by statements still running stay for the next fold.
pub(super) async fn fold(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query(FOLD)
        .bind(COUNTS_LOCK)
        .execute(pool)
        .await
        .map(drop)
}

/// Folds every `every` until aborted; a failed fold is tried again on the
/// next pass (the counts stay exact meanwhile, only slower to read).
pub(super) async fn fold_every(pool: PgPool, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if let Err(e) = fold(&pool).await {
            tracing::debug!(error = %e, "folding the packet counts failed; will retry");
        }
    }
}

/// Takes `day`'s counts away, folded and appended, inside the transaction
/// `conn` is in (which holds the table lock that keeps the day's rows
/// still): its packets per status.
pub(super) async fn take_day(
    conn: &mut PgConnection,
    day: NaiveDate,
) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(COUNTS_LOCK)
        .execute(&mut *conn)
        .await?;
    let rows = sqlx::query(
        "WITH folded AS (DELETE FROM packet_counts WHERE day = $1 RETURNING status, n), \
         appended AS (DELETE FROM packet_count_deltas WHERE day = $1 RETURNING status, n) \
         SELECT status, SUM(n)::int8 AS n FROM \
         (SELECT * FROM folded UNION ALL SELECT * FROM appended) c GROUP BY status",
    )
    .bind(day)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|row| Ok((row.try_get("status")?, row.try_get("n")?)))
        .collect()
}

/// Packets of `day` still waiting for delivery (pending or leased).
pub(super) async fn waiting_on(pool: &PgPool, day: NaiveDate) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT COALESCE(SUM(n), 0)::int8 FROM (\
         SELECT status, n FROM packet_counts WHERE day = $1 UNION ALL \
         SELECT status, n FROM packet_count_deltas WHERE day = $1) c \
         WHERE status IN ('pending', 'leased')",
    )
    .bind(day)
    .fetch_one(pool)
    .await
}
