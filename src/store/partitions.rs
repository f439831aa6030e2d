//! PostgreSQL's day partitions of `packets` (migration 0006): created ahead
//! of the days they hold, and dropped whole by retention once every packet
//! in them is older than the period and none still waits for delivery, so
//! expiring a day costs a catalog change instead of a delete per row.
//!
//! A partition is `packets_pYYYYMMDD`, holding `received_at` in that UTC
//! day. `packets_default` takes rows of a day without one (only a clock far
//! off puts them there): retention deletes their finished rows in batches,
//! and creating their day moves them into it.
//!
//! Every change of partitions runs under one advisory lock (several bucket
//! nodes may run it at once) and a short lock timeout: while it waits for
//! the table lock, inserts queue behind it, so it would rather give up and
//! try again on the next pass.
use chrono::{DateTime, Days, NaiveDate, Utc};
use sqlx::Transaction;
use sqlx::postgres::{PgConnection, PgPool, Postgres};

use super::pg_counts::{self, counted};
use super::{Pruned, StoreError};

/// Days created ahead of today: how long the maintenance may fail (or every
/// node be down) before packets land in `packets_default`.
const AHEAD: u64 = 3;
/// Percent of each page a day's packets fill when stored: the rest takes
/// their marks' new row versions on the same page (migration 0007).
const FILLFACTOR: u32 = 50;
/// Serialises partition changes across bucket nodes (any fixed key).
const MAINTENANCE_LOCK: i64 = 0x6275_636b_6574;

fn table(day: NaiveDate) -> String {
    format!("packets_p{}", day.format("%Y%m%d"))
}

/// The `received_at` range of `day`'s partition.
fn bounds(day: NaiveDate) -> (DateTime<Utc>, DateTime<Utc>) {
    let from = day.and_time(chrono::NaiveTime::MIN).and_utc();
    (from, from + Days::new(1))
}

/// The day partitions that exist, oldest first.
async fn days(pool: &PgPool) -> Result<Vec<NaiveDate>, sqlx::Error> {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = 'packets'::regclass",
    )
    .fetch_all(pool)
    .await?;
    let mut days: Vec<NaiveDate> = names
        .iter()
        .filter_map(|name| name.strip_prefix("packets_p"))
        .filter_map(|day| NaiveDate::parse_from_str(day, "%Y%m%d").ok())
        .collect();
    days.sort();
    Ok(days)
}

/// Runs a statement of the maintenance's own, not kept prepared (each
/// names one day).
async fn ddl(conn: &mut PgConnection, sql: &str) -> Result<(), sqlx::Error> {
    sqlx::query(sql)
        .persistent(false)
        .execute(conn)
        .await
        .map(drop)
}

/// A transaction holding the maintenance lock, with a short lock timeout.
async fn maintenance(pool: &PgPool) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    ddl(&mut tx, "SET LOCAL lock_timeout = '500ms'").await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MAINTENANCE_LOCK)
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// Creates the partitions of today and the next [`AHEAD`] days that are
/// missing.
pub(super) async fn create_ahead(pool: &PgPool, now: DateTime<Utc>) -> Result<(), StoreError> {
    let existing = days(pool).await?;
    let today = now.date_naive();
    for day in (0..=AHEAD).map(|n| today + Days::new(n)) {
        if !existing.contains(&day) {
            create(pool, day).await?;
        }
    }
    Ok(())
}

async fn create(pool: &PgPool, day: NaiveDate) -> Result<(), sqlx::Error> {
    let (from, to) = bounds(day);
    let (name, from_text, to_text) = (table(day), from.to_rfc3339(), to.to_rfc3339());
    let mut tx = maintenance(pool).await?;
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(&name)
        .fetch_one(&mut *tx)
        .await?;
    if exists {
        return Ok(());
    }
    let strays: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM packets_default WHERE received_at >= $1 AND received_at < $2)",
    )
    .bind(from)
    .bind(to)
    .fetch_one(&mut *tx)
    .await?;
    if strays {
        // CREATE ... PARTITION OF would fail on the day's rows in the
        // default partition: they move into the new table before it is
        // attached. The rows keep their day and status: counts stay right.
        ddl(&mut tx, "LOCK TABLE packets IN ACCESS EXCLUSIVE MODE").await?;
        ddl(
            &mut tx,
            &format!(
                "CREATE TABLE {name} (LIKE packets INCLUDING DEFAULTS INCLUDING CONSTRAINTS) \
                 WITH (fillfactor = {FILLFACTOR})"
            ),
        )
        .await?;
        sqlx::query(&format!(
            "WITH moved AS (DELETE FROM packets_default WHERE received_at >= $1 \
             AND received_at < $2 RETURNING *) INSERT INTO {name} SELECT * FROM moved"
        ))
        .bind(from)
        .bind(to)
        .persistent(false)
        .execute(&mut *tx)
        .await?;
        ddl(
            &mut tx,
            &format!(
                "ALTER TABLE packets ATTACH PARTITION {name} \
                 FOR VALUES FROM ('{from_text}') TO ('{to_text}')"
            ),
        )
        .await?;
    } else {
        ddl(
            &mut tx,
            &format!(
                "CREATE TABLE {name} PARTITION OF packets \
                 FOR VALUES FROM ('{from_text}') TO ('{to_text}') \
                 WITH (fillfactor = {FILLFACTOR})"
            ),
        )
        .await?;
    }
    tx.commit().await
}

/// One step of retention (see [`super::Backend::prune`]): drops a day that
/// is over, whose packets are all older than `before` and none pending or
/// leased; else deletes a batch of finished packets older than `before`
/// from such a day that must stay (or is not over: a period shorter than a
/// day), or from the default partition; else forgets a batch of ids whose
/// packets went with their day.
pub(super) async fn prune(
    pool: &PgPool,
    before: DateTime<Utc>,
    limit: u32,
) -> Result<Pruned, StoreError> {
    let now = Utc::now();
    for day in days(pool).await? {
        let (from, to) = bounds(day);
        if from >= before {
            break;
        }
        if !all_older(pool, day, before).await? {
            continue;
        }
        // Today's partition stays even when all it holds is old: new
        // packets go there.
        if to <= now
            && let Some(packets) = drop_day(pool, day, before).await?
        {
            tracing::info!(day = %day, packets, "retention: day partition dropped");
            return Ok(Pruned {
                packets,
                done: false,
            });
        }
        let deleted = delete_finished(pool, &table(day), Some(from), before.min(to), limit).await?;
        if deleted > 0 {
            return Ok(Pruned {
                packets: deleted,
                done: false,
            });
        }
    }
    let deleted = delete_finished(pool, "packets_default", None, before, limit).await?;
    if deleted > 0 {
        return Ok(Pruned {
            packets: deleted,
            done: false,
        });
    }
    let forgotten = forget_ids(pool, before, limit).await?;
    Ok(Pruned {
        packets: 0,
        done: forgotten < u64::from(limit),
    })
}

/// Whether every packet of `day` is older than `before`; an empty day,
/// only once the day itself is (not a day still to come).
async fn all_older(
    pool: &PgPool,
    day: NaiveDate,
    before: DateTime<Utc>,
) -> Result<bool, sqlx::Error> {
    let newest: Option<DateTime<Utc>> =
        sqlx::query_scalar(&format!("SELECT max(received_at) FROM {}", table(day)))
            .fetch_one(pool)
            .await?;
    Ok(match newest {
        Some(newest) => newest < before,
        None => bounds(day).1 <= before,
    })
}

/// Drops `day`'s partition and its counts in one transaction, unless it
/// holds pending or leased packets; answers how many packets went.
async fn drop_day(
    pool: &PgPool,
    day: NaiveDate,
    before: DateTime<Utc>,
) -> Result<Option<u64>, sqlx::Error> {
    let name = table(day);
    // Most passes find a day kept for its pending packets this way, without
    // the table lock below.
    if pg_counts::waiting_on(pool, day).await? > 0 {
        return Ok(None);
    }
    let mut tx = maintenance(pool).await?;
    // DETACH takes this lock anyway; taken first, it also keeps every row
    // and count of the day still from here to the commit. Everything below
    // is a few index lookups and catalog changes, whatever the day holds.
    ddl(&mut tx, "LOCK TABLE ONLY packets IN ACCESS EXCLUSIVE MODE").await?;
    // A day not over yet may have had packets since.
    let newest: Option<DateTime<Utc>> =
        sqlx::query_scalar(&format!("SELECT max(received_at) FROM {name}"))
            .persistent(false)
            .fetch_one(&mut *tx)
            .await?;
    if newest.is_some_and(|newest| newest >= before) {
        return Ok(None);
    }
    // The day's counts go with it. They are kept per day for this, so
    // nothing is counted here.
    let mut packets = 0;
    for (status, n) in pg_counts::take_day(&mut tx, day).await? {
        if n > 0 && (status == "pending" || status == "leased") {
            // Never delete a packet still waiting for delivery; its day is
            // dropped on a later pass, once its finished rows went.
            return Ok(None);
        }
        packets += n.max(0) as u64;
    }
    ddl(
        &mut tx,
        &format!("ALTER TABLE packets DETACH PARTITION {name}"),
    )
    .await?;
    ddl(&mut tx, &format!("DROP TABLE {name}")).await?;
    tx.commit().await?;
    Ok(Some(packets))
}

/// Deletes at most `limit` of the oldest finished packets of `partition`
/// received from `from` (if given) and before `before`, with their ids.
/// Counted by the same statement (`pg_counts`); through the parent table,
/// the range repeated there so PostgreSQL plans for that partition only.
async fn delete_finished(
    pool: &PgPool,
    partition: &str,
    from: Option<DateTime<Utc>>,
    before: DateTime<Utc>,
    limit: u32,
) -> Result<u64, sqlx::Error> {
    let range = match from {
        Some(_) => "received_at >= $3 AND received_at < $1",
        None => "received_at < $1",
    };
    let sql = format!(
        "WITH changed AS (DELETE FROM packets WHERE {range} AND (seq, received_at) IN (\
         SELECT seq, received_at FROM {partition} WHERE {range} \
         AND status IN ('processed', 'failed', 'dead_letter') ORDER BY received_at LIMIT $2) \
         RETURNING packet_id, received_at, status AS was, NULL::text AS now), {}, \
         forgotten AS (DELETE FROM packet_ids WHERE packet_id IN (SELECT packet_id FROM changed)) \
         SELECT COUNT(*) FROM changed",
        counted!()
    );
    let mut query = sqlx::query_scalar(&sql)
        .bind(before)
        .bind(i64::from(limit))
        .persistent(false);
    if let Some(from) = from {
        query = query.bind(from);
    }
    let deleted: i64 = query.fetch_one(pool).await?;
    Ok(deleted.max(0) as u64)
}

/// Deletes at most `limit` ids received before `before` whose packets are
/// gone (with a dropped day); answers how many.
async fn forget_ids(pool: &PgPool, before: DateTime<Utc>, limit: u32) -> Result<u64, sqlx::Error> {
    // LEFT JOIN LATERAL with LIMIT keeps this a loop over the old ids,
    // each looking in its one partition (NOT EXISTS may become an anti-join
    // reading every partition).
    let forgotten = sqlx::query(
        "DELETE FROM packet_ids WHERE packet_id IN (\
         SELECT i.packet_id FROM packet_ids i LEFT JOIN LATERAL (SELECT 1 AS found FROM packets p \
         WHERE p.seq = i.seq AND p.received_at = i.received_at LIMIT 1) x ON TRUE \
         WHERE i.received_at < $1 AND x.found IS NULL ORDER BY i.received_at LIMIT $2)",
    )
    .bind(before)
    .bind(i64::from(limit))
    .execute(pool)
    .await?;
    Ok(forgotten.rows_affected())
}
