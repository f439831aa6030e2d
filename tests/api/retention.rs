//! Retention: old finished packets go, in batches; pending ones stay; the
//! counts follow; the SQLite file shrinks. On PostgreSQL, whole days go,
//! and an existing database is brought into day partitions.
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bucket::proto::bucket::v1 as pb;
use bucket::proto::bucket::v1::bucket_service_client::BucketServiceClient;
use bucket::store::Store;
use bucket::store::retention::prune_now;
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use sqlx::migrate::Migrator;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use uuid::Uuid;

use crate::helpers::{
    Backend, TestApp, TestDb, ingest, packet_for, status, test_config, user_packets,
};

async fn old_finished_packets_are_deleted_and_pending_ones_kept(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client().await;
    const N: usize = 2500;
    let mut ids = Vec::with_capacity(N);
    for chunk in 0..N / 250 {
        let packets = (0..250)
            .map(|i| packet_for(&format!("r{}", chunk * 250 + i)))
            .collect();
        let response = client
            .ingest_batch(pb::IngestBatchRequest { packets })
            .await
            .unwrap()
            .into_inner();
        for r in response.results {
            if let Some(pb::ingest_batch_result::Outcome::Ingested(i)) = r.outcome {
                ids.push(i.packet_id);
            }
        }
    }
    assert_eq!(ids.len(), N);
    // All but the last ten processed (or failed), in batches.
    for (n, chunk) in ids[..N - 10].chunks(500).enumerate() {
        let marks = chunk
            .iter()
            .map(|id| pb::MarkProcessedRequest {
                packet_id: id.clone(),
                success: n % 2 == 0,
                ..Default::default()
            })
            .collect();
        client
            .mark_processed_batch(pb::MarkProcessedBatchRequest { marks })
            .await
            .unwrap();
    }
    // The database's size in pages as a reader sees it (WAL included): what
    // the file is after the next checkpoint.
    let url = app.db.url.clone();
    let pages = || async {
        if !url.starts_with("sqlite:") {
            return None;
        }
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        let (n,): (i64,) = sqlx::query_as("PRAGMA page_count")
            .fetch_one(&pool)
            .await
            .unwrap();
        pool.close().await;
        Some(n)
    };
    app.db.sync_tables().await;
    let before = pages().await;

    tokio::time::sleep(Duration::from_millis(1100)).await;
    // The pruning store is the only one on the database (an embedded
    // SQLite has one process writing it); the server comes back after.
    let config = app.config.clone();
    let db = app.stop().await;
    let store = Store::connect(&db.url).await.unwrap();
    let deleted = prune_now(&store, Duration::from_secs(1), &CancellationToken::new()).await;
    assert_eq!(
        deleted,
        (N - 10) as u64,
        "every old finished packet, batch by batch"
    );
    let store_counts = store.counts().await.unwrap();
    assert_eq!(
        store_counts.total(),
        10,
        "the store's counts follow the deletes"
    );
    // Nothing younger than the period goes.
    assert_eq!(
        prune_now(&store, Duration::from_secs(3600), &CancellationToken::new()).await,
        0
    );
    store.close().await;
    drop(store);
    let app = TestApp::spawn_with(db, config).await;
    let mut client = app.client().await;
    let s = status(&mut client).await;
    assert_eq!(s.total_packets, 10, "the counts follow the deletes");
    assert_eq!(s.pending_packets, 10, "pending packets are never deleted");
    assert_eq!(app.db.status_counts().await.get("pending"), Some(&10));
    if let (Some(before), Some(after)) = (before, pages().await) {
        assert!(
            after * 2 < before,
            "the SQLite file shrinks: {before} -> {after} pages"
        );
    }
    // A user whose packets all went starts over; one with a packet left
    // goes on from it.
    let gone = ingest(&mut client, packet_for("r0")).await;
    let kept = ingest(&mut client, packet_for(&format!("r{}", N - 1))).await;
    app.db.sync_tables().await;
    let listed = |packets: Vec<pb::Packet>| -> Vec<String> {
        packets.into_iter().map(|p| p.packet_id).collect()
    };
    assert_eq!(listed(user_packets(&mut client, "r0").await), vec![gone]);
    assert_eq!(
        listed(user_packets(&mut client, &format!("r{}", N - 1)).await),
        vec![kept, ids[N - 1].clone()]
    );
}

crate::on_every_backend!(old_finished_packets_are_deleted_and_pending_ones_kept);

// PostgreSQL keeps packets in day partitions (migration 0006).

/// A PostgreSQL database as migrations 0001-0005 left it (before the day
/// partitions), holding one packet per `(days ago, status)`; their ids.
async fn database_before_partitions(rows: &[(i32, &str)]) -> (Arc<TestDb>, Vec<Uuid>) {
    let db = TestDb::new(Backend::Postgres).await;
    let pool = PgPool::connect(&db.url).await.unwrap();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/postgres");
    let mut migrator = Migrator::new(Path::new(dir)).await.unwrap();
    migrator.migrations = migrator
        .migrations
        .iter()
        .filter(|m| m.version <= 5)
        .cloned()
        .collect::<Vec<_>>()
        .into();
    migrator.run(&pool).await.unwrap();
    let mut ids = Vec::with_capacity(rows.len());
    for (days, status) in rows {
        let id = Uuid::new_v4();
        sqlx::query(
            "INSERT INTO packets (packet_id, user_id, client_timestamp, cognitive_state, \
             active_seconds, idle_seconds, away_seconds, integrity_score, raw_signals, \
             received_at, status) VALUES ($1, 'old_user', now(), 'ON_TASK', 1, 0, 0, 0.9, \
             '{\"k\": 1}', now() - make_interval(days => $2), $3)",
        )
        .bind(id)
        .bind(days)
        .bind(status)
        .execute(&pool)
        .await
        .unwrap();
        ids.push(id);
    }
    pool.close().await;
    (db, ids)
}

/// Every packet as `(seq, packet_id, received_at, status)`, in seq order.
async fn rows(pool: &PgPool) -> Vec<(i64, Uuid, DateTime<Utc>, String)> {
    sqlx::query_as("SELECT seq, packet_id, received_at, status FROM packets ORDER BY seq")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// The day partitions of `packets`, by name, and whether a default one is there.
async fn partitions(pool: &PgPool) -> (Vec<String>, bool) {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = 'packets'::regclass ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let default = names.iter().any(|n| n == "packets_default");
    (
        names
            .into_iter()
            .filter(|n| n != "packets_default")
            .collect(),
        default,
    )
}

fn partition_of(at: DateTime<Utc>) -> String {
    format!("packets_p{}", at.format("%Y%m%d"))
}

fn days_ago(days: i64) -> DateTime<Utc> {
    Utc::now() - chrono::Duration::days(days)
}

/// The store's counts (kept by triggers) against a count of the rows.
async fn assert_counts_match(store: &Store, db: &TestDb) {
    let counts = store.counts().await.unwrap();
    let rows = db.status_counts().await;
    let row = |s: &str| rows.get(s).copied().unwrap_or(0) as u64;
    assert_eq!(
        (
            counts.pending,
            counts.leased,
            counts.processed,
            counts.failed,
            counts.dead_letter
        ),
        (
            row("pending"),
            row("leased"),
            row("processed"),
            row("failed"),
            row("dead_letter")
        ),
        "counts as the rows are"
    );
}

async fn ingest_id(client: &mut BucketServiceClient<Channel>, id: Uuid) -> pb::IngestResponse {
    client
        .ingest(pb::IngestRequest {
            packet: Some(pb::PacketInput {
                packet_id: id.to_string(),
                ..packet_for("retry_user")
            }),
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_migration_brings_an_existing_database_along() {
    let statuses = ["pending", "processed", "failed", "dead_letter"];
    let spec: Vec<(i32, &str)> = [6, 2, 0]
        .into_iter()
        .flat_map(|days| statuses.iter().map(move |s| (days, *s)))
        .collect();
    let (db, ids) = database_before_partitions(&spec).await;
    let pool = PgPool::connect(&db.url).await.unwrap();
    let before = rows(&pool).await;
    let counts_before: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, n FROM packet_counts WHERE n > 0 ORDER BY status")
            .fetch_all(&pool)
            .await
            .unwrap();

    let store = Store::connect(&db.url).await.unwrap();
    assert_eq!(rows(&pool).await, before, "every row, as it was");
    let (days, default) = partitions(&pool).await;
    assert!(default, "a default partition");
    for days_back in [6, 2, 0] {
        let day = partition_of(days_ago(days_back));
        assert!(days.contains(&day), "{day} holds its rows: {days:?}");
    }
    let counts = store.counts().await.unwrap();
    let counts_after: Vec<(String, i64)> = [
        ("dead_letter", counts.dead_letter),
        ("failed", counts.failed),
        ("pending", counts.pending),
        ("processed", counts.processed),
    ]
    .into_iter()
    .map(|(s, n)| (s.to_owned(), n as i64))
    .collect();
    assert_eq!(counts_after, counts_before, "the counts carry over");
    assert_counts_match(&store, &db).await;
    store.close().await;

    // Through the server: a retry of an old id (received days ago) is not
    // stored again; a new packet follows the old seqs; old packets are
    // marked by id.
    let app = TestApp::spawn_with(db.clone(), test_config(&db)).await;
    let mut client = app.client().await;
    let retry = ingest_id(&mut client, ids[0]).await;
    assert!(!retry.created, "an old id is a duplicate");
    let stored_at = before[0].2;
    let at = retry.received_at.unwrap();
    assert_eq!(
        (at.seconds, at.nanos / 1000),
        (
            stored_at.timestamp(),
            stored_at.timestamp_subsec_micros() as i32
        ),
        "the receipt of the stored packet"
    );
    let fresh = ingest_id(&mut client, Uuid::new_v4()).await;
    assert!(fresh.created);
    let after = rows(&pool).await;
    assert_eq!(after.len(), before.len() + 1);
    assert!(after.last().unwrap().0 > before.last().unwrap().0);
    let marked = client
        .mark_processed(pb::MarkProcessedRequest {
            packet_id: ids[0].to_string(),
            success: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(marked.message, "Packet marked as processed", "{marked:?}");
    let store = Store::connect(&db.url).await.unwrap();
    assert_counts_match(&store, &db).await;
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_ingest_stays_idempotent_across_days() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let mut client = app.client().await;
    let id = Uuid::new_v4();
    assert!(ingest_id(&mut client, id).await.created);
    // The packet was received two days ago: its partition is another one
    // than a retry today would go to.
    let pool = PgPool::connect(&app.db.url).await.unwrap();
    let then = days_ago(2);
    let from = then.date_naive().and_time(chrono::NaiveTime::MIN).and_utc();
    sqlx::query(&format!(
        "CREATE TABLE {} PARTITION OF packets FOR VALUES FROM ('{}') TO ('{}')",
        partition_of(then),
        from.to_rfc3339(),
        (from + chrono::Duration::days(1)).to_rfc3339()
    ))
    .execute(&pool)
    .await
    .unwrap();
    for table in ["packets", "packet_ids"] {
        sqlx::query(&format!(
            "UPDATE {table} SET received_at = received_at - interval '2 days' WHERE packet_id = $1"
        ))
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    }
    // Twice: alone, and in a batch with a new packet and itself.
    let retry = ingest_id(&mut client, id).await;
    assert!(!retry.created);
    let other = Uuid::new_v4();
    let batch = client
        .ingest_batch(pb::IngestBatchRequest {
            packets: [id, other, id]
                .iter()
                .map(|id| pb::PacketInput {
                    packet_id: id.to_string(),
                    ..packet_for("retry_user")
                })
                .collect(),
        })
        .await
        .unwrap()
        .into_inner();
    let created: Vec<bool> = batch
        .results
        .iter()
        .map(|r| match &r.outcome {
            Some(pb::ingest_batch_result::Outcome::Ingested(i)) => i.created,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(created, [false, true, false]);
    let stored: Vec<(Uuid, String)> = sqlx::query_as(
        "SELECT packet_id, tableoid::regclass::text FROM packets WHERE packet_id = $1",
    )
    .bind(id)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        stored,
        [(id, partition_of(then))],
        "stored once, where it was"
    );
    let store = Store::connect(&app.db.url).await.unwrap();
    assert_eq!(store.counts().await.unwrap().total(), 2);
    assert_counts_match(&store, &app.db).await;
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_retention_drops_old_days_whole_and_keeps_days_with_pending_packets() {
    // Five days ago: finished only. Three days ago: finished and one
    // pending. Today: a bit of everything.
    let spec = [
        (5, "processed"),
        (5, "failed"),
        (5, "dead_letter"),
        (3, "processed"),
        (3, "failed"),
        (3, "pending"),
        (0, "processed"),
        (0, "pending"),
    ];
    let (db, ids) = database_before_partitions(&spec).await;
    let store = Store::connect(&db.url).await.unwrap();
    let pool = PgPool::connect(&db.url).await.unwrap();
    let (five, three, today) = (
        partition_of(days_ago(5)),
        partition_of(days_ago(3)),
        partition_of(days_ago(0)),
    );

    let deleted = prune_now(
        &store,
        Duration::from_secs(86_400),
        &CancellationToken::new(),
    )
    .await;
    assert_eq!(
        deleted, 5,
        "the old day's three, the finished two of the kept one"
    );
    let (days, _) = partitions(&pool).await;
    assert!(!days.contains(&five), "dropped whole: {days:?}");
    let gone: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM pg_class WHERE relname = $1")
        .bind(&five)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(gone, 0, "no table left behind");
    assert!(days.contains(&three) && days.contains(&today), "{days:?}");
    let kept: Vec<Uuid> =
        sqlx::query_scalar(&format!("SELECT packet_id FROM {three} ORDER BY seq"))
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(kept, [ids[5]], "only the pending packet stays");
    let known: Vec<Uuid> = sqlx::query_scalar("SELECT packet_id FROM packet_ids ORDER BY seq")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(
        known,
        [ids[5], ids[6], ids[7]],
        "the ids go with their packets"
    );
    assert_counts_match(&store, &db).await;
    assert_eq!(store.counts().await.unwrap().total(), 3);

    // Once its last packet is processed, the day goes on the next pass.
    let app = TestApp::spawn_with(db.clone(), test_config(&db)).await;
    let mut client = app.client().await;
    client
        .mark_processed(pb::MarkProcessedRequest {
            packet_id: ids[5].to_string(),
            success: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let deleted = prune_now(
        &store,
        Duration::from_secs(86_400),
        &CancellationToken::new(),
    )
    .await;
    assert_eq!(deleted, 1);
    let (days, _) = partitions(&pool).await;
    assert!(!days.contains(&three) && days.contains(&today), "{days:?}");
    assert_counts_match(&store, &db).await;
    let s = status(&mut client).await;
    assert_eq!((s.total_packets, s.pending_packets), (2, 1));
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_days_are_ready_ahead_after_startup() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let pool = PgPool::connect(&app.db.url).await.unwrap();
    let (days, default) = partitions(&pool).await;
    assert!(default, "a default partition");
    for ahead in 0..=3 {
        let day = partition_of(days_ago(-ahead));
        assert!(days.contains(&day), "{day} in {days:?}");
    }

    // A packet for a day without a partition (a clock far ahead) lands in
    // the default partition; creating its day moves it there, counts
    // unchanged.
    let later = days_ago(-3);
    sqlx::query(&format!("DROP TABLE {}", partition_of(later)))
        .execute(&pool)
        .await
        .unwrap();
    let id = Uuid::new_v4();
    // Counted as the bucket counts its inserts (migration 0007).
    sqlx::query(
        "WITH claimed AS (INSERT INTO packet_ids (packet_id, received_at, seq) \
         VALUES ($1, $2, nextval('packet_seq')) RETURNING seq), \
         counted AS (INSERT INTO packet_count_deltas (day, status, n) \
         VALUES (($2::timestamptz AT TIME ZONE 'UTC')::date, 'pending', 1)) \
         INSERT INTO packets (seq, packet_id, user_id, client_timestamp, cognitive_state, \
         active_seconds, idle_seconds, away_seconds, integrity_score, raw_signals, received_at) \
         SELECT seq, $1, 'ahead_user', now(), 'ON_TASK', 1, 0, 0, 0.9, '{}', $2 FROM claimed",
    )
    .bind(id)
    .bind(later)
    .execute(&pool)
    .await
    .unwrap();
    let store = Store::connect(&app.db.url).await.unwrap();
    let home = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT tableoid::regclass::text FROM packets WHERE packet_id = $1",
        )
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    assert_eq!(
        home().await,
        partition_of(later),
        "moved when its day was made"
    );
    assert_counts_match(&store, &app.db).await;
    assert_eq!(store.counts().await.unwrap().pending, 1);
    pool.close().await;
}

/// Issue 15: the counts are kept by the bucket's own statements, not by
/// triggers (migration 0007). Every way a packet's status changes, and
/// every way it goes, keeps them equal to the rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_counts_stay_exact_through_every_change() {
    let db = TestDb::new(Backend::Postgres).await;
    let mut config = test_config(&db);
    config.delivery.max_deliveries = 1;
    let app = TestApp::spawn_with(db.clone(), config).await;
    let store = Store::connect(&db.url).await.unwrap();
    let mut client = app.client().await;
    let counts = || async { store.counts().await.unwrap() };
    let by_status = |c: bucket::store::Counts| (c.pending, c.processed, c.failed, c.dead_letter);

    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(Uuid::new_v4());
        assert!(ingest_id(&mut client, ids[ids.len() - 1]).await.created);
    }
    assert!(!ingest_id(&mut client, ids[0]).await.created, "a retry");
    assert_eq!(by_status(counts().await), (6, 0, 0, 0));
    assert_counts_match(&store, &db).await;

    // Marks: processed, failed, again (no change), failed then processed.
    let outcome = |id: &Uuid, success: bool| pb::MarkProcessedRequest {
        packet_id: id.to_string(),
        success,
        ..Default::default()
    };
    for (id, success) in [
        (ids[0], true),
        (ids[1], true),
        (ids[2], false),
        (ids[0], true),
        (ids[0], false),
        (ids[2], true),
        (ids[3], false),
    ] {
        client.mark_processed(outcome(&id, success)).await.unwrap();
    }
    assert_eq!(by_status(counts().await), (2, 3, 1, 0));
    assert_counts_match(&store, &db).await;

    // Leases that end unmarked with no delivery left: dead letters.
    let mut stream = crate::helpers::subscribe(&mut client, "never-marks", 0, 1).await;
    for _ in 0..2 {
        crate::helpers::next(&mut stream).await;
    }
    drop(stream);
    for _ in 0..100 {
        if counts().await.dead_letter == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(by_status(counts().await), (0, 3, 1, 2));
    assert_counts_match(&store, &db).await;

    // Redrive and Replay send them back to pending.
    let redriven = client
        .redrive(pb::RedriveRequest {
            statuses: vec![
                pb::PacketStatus::DeadLetter as i32,
                pb::PacketStatus::Failed as i32,
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(redriven.redriven, 3);
    let replayed = client
        .replay(pb::ReplayRequest {
            user_id: "retry_user".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replayed.replayed, 3);
    assert_eq!(by_status(counts().await), (6, 0, 0, 0));
    assert_counts_match(&store, &db).await;

    // All processed in one batch, then deleted by retention (today's
    // partition stays: its rows go by the batch).
    let marks = ids.iter().map(|id| outcome(id, true)).collect();
    client
        .mark_processed_batch(pb::MarkProcessedBatchRequest { marks })
        .await
        .unwrap();
    assert_eq!(by_status(counts().await), (0, 6, 0, 0));
    assert_counts_match(&store, &db).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let deleted = prune_now(&store, Duration::from_secs(1), &CancellationToken::new()).await;
    assert_eq!(deleted, 6);
    assert_eq!(counts().await.total(), 0);
    assert_counts_match(&store, &db).await;
    store.close().await;
}

/// A mark whose packet another transaction changes while the mark waits
/// for its row: the mark reads the status it replaces beside the update,
/// finds it changed once it holds the row, and is applied again from what
/// the row now holds, so the counts stay exact and the answer is right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_mark_racing_another_change_counts_what_it_replaced() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let store = Store::connect(&app.db.url).await.unwrap();
    let mut client = app.client().await;
    let id = Uuid::new_v4();
    assert!(ingest_id(&mut client, id).await.created);

    // Another writer (an operator's hand, counted as the bucket counts)
    // fails the packet and holds its row.
    let pool = PgPool::connect(&app.db.url).await.unwrap();
    let mut other = pool.begin().await.unwrap();
    sqlx::query(
        "WITH changed AS (UPDATE packets SET status = 'failed' WHERE packet_id = $1 \
         RETURNING received_at) \
         INSERT INTO packet_count_deltas (day, status, n) \
         SELECT (received_at AT TIME ZONE 'UTC')::date, s, n FROM changed \
         CROSS JOIN (VALUES ('pending', -1), ('failed', 1)) AS d(s, n)",
    )
    .bind(id)
    .execute(&mut *other)
    .await
    .unwrap();
    let mut marker = app.client().await;
    let mark = tokio::spawn(async move {
        marker
            .mark_processed(pb::MarkProcessedRequest {
                packet_id: id.to_string(),
                success: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    });
    // Until the mark waits for the row.
    let mut waiting = false;
    for _ in 0..200 {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock' AND query LIKE 'WITH changed AS (UPDATE packets p%'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if n > 0 {
            waiting = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(waiting, "the mark waits for the row");
    other.commit().await.unwrap();

    let marked = mark.await.unwrap();
    assert_eq!(marked.message, "Packet marked as processed", "{marked:?}");
    let c = store.counts().await.unwrap();
    assert_eq!((c.pending, c.failed, c.processed), (0, 0, 1));
    assert_counts_match(&store, &app.db).await;
    pool.close().await;
    store.close().await;
}
