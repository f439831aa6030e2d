//! PostgreSQL's plans for the hot path stay look-ups by key on a new
//! database, where a prepared statement's generic plan is made while the
//! tables are nearly empty and then kept as they grow.
use std::time::{Duration, Instant};

use crate::helpers::*;

/// Waits until the statistics show `updates` rows updated in the packets'
/// partitions (the marks below): a backend reports its counts, its scans
/// with them, when it goes idle.
async fn wait_for_updates(pool: &sqlx::PgPool, updates: i64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let updated: i64 = sqlx::query_scalar(
            "SELECT COALESCE(SUM(n_tup_upd), 0)::int8 FROM pg_stat_user_tables \
             WHERE relname LIKE 'packets\\_%'",
        )
        .fetch_one(pool)
        .await
        .expect("pg_stat_user_tables");
        if updated >= updates {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the statistics never showed {updates} marks ({updated})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Rows read by sequential scans of `relname` (a `LIKE` pattern) so far.
/// The schema's own scans (index builds, on a new database) read no rows.
async fn rows_scanned(pool: &sqlx::PgPool, relname: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT COALESCE(SUM(seq_tup_read), 0)::int8 FROM pg_stat_user_tables WHERE relname LIKE $1",
    )
    .bind(relname)
    .fetch_one(pool)
    .await
    .expect("pg_stat_user_tables")
}

/// Each mark is a commit group of its own, so the MARK statement runs on
/// the writer's connections far past the sixth use, where PostgreSQL
/// settles on a generic plan; planned while `packet_ids` and the day's
/// partition were nearly empty, that plan hashed a sequential scan of both
/// and kept doing so as they grew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marks_on_a_new_database_look_packets_up_by_key() {
    const PACKETS: usize = 60;
    let db = TestDb::new(Backend::Postgres).await;
    let app = TestApp::spawn_with(db.clone(), test_config(&db)).await;
    let mut client = app.client().await;
    for n in 0..PACKETS {
        ingest(&mut client, packet_for(&format!("plan-user-{n}"))).await;
    }
    let mut stream = subscribe(&mut client, "plans", 1, 60).await;
    for _ in 0..PACKETS {
        let delivery = next(&mut stream).await;
        let id = delivery.packet.expect("a packet").packet_id;
        assert_eq!(
            mark(&mut client, &id).await.message,
            "Packet marked as processed"
        );
    }
    let pool = sqlx::PgPool::connect(&db.url)
        .await
        .expect("the test database");
    wait_for_updates(&pool, PACKETS as i64).await;
    let ids = rows_scanned(&pool, "packet\\_ids").await;
    let days = rows_scanned(&pool, "packets\\_%").await;
    let by_table: Vec<(String, i64)> = sqlx::query_as(
        "SELECT relname::text, seq_tup_read FROM pg_stat_user_tables WHERE seq_tup_read > 0 \
         ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .expect("pg_stat_user_tables");
    assert_eq!(
        (ids, days),
        (0, 0),
        "rows read by sequential scans of packet_ids, and of the packets' partitions: {by_table:?}"
    );
}
