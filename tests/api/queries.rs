//! UserPackets and Status.
use bucket::proto::bucket::v1 as pb;
use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::{
    Backend, TestApp, TestDb, ingest, mark, mark_failed, next, packet_for, status, subscribe,
    user_packets,
};
use crate::on_every_backend;

on_every_backend!(
    user_packets_pages_newest_first_and_filters,
    status_counts_match_the_database,
);

async fn user_packets_pages_newest_first_and_filters(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client().await;
    let mut ids = Vec::new();
    for _ in 0..7 {
        ids.push(ingest(&mut client, packet_for("alice")).await);
    }
    ingest(&mut client, packet_for("bob")).await;
    mark(&mut client, &ids[0]).await;
    mark(&mut client, &ids[3]).await;

    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .user_packets(pb::UserPacketsRequest {
                user_id: "alice".into(),
                limit: 3,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages.push(
            page.packets
                .iter()
                .map(|p| p.packet_id.clone())
                .collect::<Vec<_>>(),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    assert_eq!(pages.concat(), newest_first);
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [3, 3, 1]);

    let processed = client
        .user_packets(pb::UserPacketsRequest {
            user_id: "alice".into(),
            status_filter: pb::PacketStatus::Processed as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let got: Vec<_> = processed
        .packets
        .iter()
        .map(|p| p.packet_id.clone())
        .collect();
    assert_eq!(got, [ids[3].clone(), ids[0].clone()]);

    let pending = client
        .user_packets(pb::UserPacketsRequest {
            user_id: "alice".into(),
            status_filter: pb::PacketStatus::Pending as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pending.packets.len(), 5);

    for bad in [
        pb::UserPacketsRequest {
            user_id: String::new(),
            ..Default::default()
        },
        pb::UserPacketsRequest {
            user_id: "alice".into(),
            limit: 501,
            ..Default::default()
        },
        pb::UserPacketsRequest {
            user_id: "alice".into(),
            page_token: "zz".into(),
            ..Default::default()
        },
        pb::UserPacketsRequest {
            user_id: "alice".into(),
            status_filter: 42,
            ..Default::default()
        },
    ] {
        assert_eq!(
            client.user_packets(bad).await.unwrap_err().code(),
            Code::InvalidArgument
        );
    }

    // A page token is bound to its query: alice's is refused for bob's
    // pages, or for alice's with another filter, naming page_token.
    let first = client
        .user_packets(pb::UserPacketsRequest {
            user_id: "alice".into(),
            limit: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!first.next_page_token.is_empty());
    for other in [
        pb::UserPacketsRequest {
            user_id: "bob".into(),
            page_token: first.next_page_token.clone(),
            ..Default::default()
        },
        pb::UserPacketsRequest {
            user_id: "alice".into(),
            status_filter: pb::PacketStatus::Pending as i32,
            page_token: first.next_page_token.clone(),
            ..Default::default()
        },
    ] {
        let refused = client.user_packets(other).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument);
        let field = &refused.get_details_bad_request().unwrap().field_violations[0];
        assert_eq!(field.field, "page_token");
        assert!(field.description.contains("another query"), "{field:?}");
    }
}

async fn status_counts_match_the_database(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client().await;
    for i in 0..6 {
        ingest(&mut client, packet_for(&format!("u{i}"))).await;
    }
    let mut stream = subscribe(&mut client, "karma", 3, 0).await;
    let a = next(&mut stream).await.packet.unwrap().packet_id;
    let b = next(&mut stream).await.packet.unwrap().packet_id;
    next(&mut stream).await;
    mark(&mut client, &a).await;
    mark_failed(&mut client, &b).await;
    // Two slots freed: two more leased.
    next(&mut stream).await;
    next(&mut stream).await;

    let s = status(&mut client).await;
    let db = app.db.status_counts().await;
    let n = |k: &str| *db.get(k).unwrap_or(&0) as u64;
    assert_eq!(s.total_packets, 6);
    assert_eq!(s.total_packets, db.values().sum::<i64>() as u64);
    assert_eq!(s.processed_packets, n("processed"));
    assert_eq!(s.failed_packets, n("failed"));
    // Leases live in memory: the database holds leased packets as pending.
    assert_eq!(n("leased"), 0);
    assert_eq!(s.leased_packets + s.pending_packets, n("pending"));
    assert_eq!(
        (
            s.processed_packets,
            s.failed_packets,
            s.leased_packets,
            s.pending_packets
        ),
        (1, 1, 3, 1)
    );
    assert_eq!(s.queue_size, 1);
    assert_eq!(s.redis_connected, backend == Backend::Redis);
    assert!(!s.model_available);
    assert_eq!(s.consumers[0].consumer, "karma");
}

/// A SQLite database as migrations 0001-0006 left it (user chains keyed by
/// user_id text), holding `packets` as `(user, packet_id)` in seq order.
async fn sqlite_before_user_numbers(packets: &[(&str, uuid::Uuid)]) -> std::sync::Arc<TestDb> {
    use std::str::FromStr;
    let db = TestDb::new(Backend::Sqlite).await;
    let options = sqlx::sqlite::SqliteConnectOptions::from_str(&db.url)
        .unwrap()
        .create_if_missing(true);
    let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/sqlite");
    let migrator = |upto: i64| async move {
        let mut m = sqlx::migrate::Migrator::new(std::path::Path::new(dir))
            .await
            .unwrap();
        m.migrations = m
            .migrations
            .iter()
            .filter(|m| m.version <= upto)
            .cloned()
            .collect::<Vec<_>>()
            .into();
        m
    };
    migrator(5).await.run(&pool).await.unwrap();
    for (user, id) in packets {
        sqlx::query(
            "INSERT INTO packets (packet_id, user_id, client_timestamp, cognitive_state, \
             active_seconds, idle_seconds, away_seconds, integrity_score, raw_signals, \
             received_at) VALUES ($1, $2, '2026-12-01T10:00:00Z', 'ON_TASK', 1, 0, 0, 0.9, \
             '{\"k\": 1}', '2026-12-01T10:00:01Z')",
        )
        .bind(id.to_string())
        .bind(user)
        .execute(&pool)
        .await
        .unwrap();
    }
    // 0006 builds the text-keyed chains from these rows.
    migrator(6).await.run(&pool).await.unwrap();
    pool.close().await;
    db
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_user_chains_carry_over_to_user_numbers() {
    let ids: Vec<uuid::Uuid> = (0..5).map(|_| uuid::Uuid::now_v7()).collect();
    let db = sqlite_before_user_numbers(&[
        ("ann", ids[0]),
        ("bo", ids[1]),
        ("ann", ids[2]),
        ("bo", ids[3]),
        ("ann", ids[4]),
    ])
    .await;
    let app = TestApp::spawn_with(db.clone(), crate::helpers::test_config(&db)).await;
    let mut client = app.client().await;
    let listed = |packets: Vec<pb::Packet>| -> Vec<String> {
        packets.into_iter().map(|p| p.packet_id).collect()
    };
    let text = |i: &[usize]| -> Vec<String> { i.iter().map(|&i| ids[i].to_string()).collect() };
    assert_eq!(
        listed(user_packets(&mut client, "ann").await),
        text(&[4, 2, 0])
    );
    assert_eq!(listed(user_packets(&mut client, "bo").await), text(&[3, 1]));

    // An old user's chain goes on from its migrated head; a new user gets
    // a number of its own.
    let newer = ingest(&mut client, packet_for("ann")).await;
    let first = ingest(&mut client, packet_for("cy")).await;
    app.db.sync_tables().await;
    let mut ann = vec![newer];
    ann.extend(text(&[4, 2, 0]));
    assert_eq!(listed(user_packets(&mut client, "ann").await), ann);
    assert_eq!(listed(user_packets(&mut client, "cy").await), vec![first]);
    assert_eq!(listed(user_packets(&mut client, "bo").await), text(&[3, 1]));

    let pool = sqlx::SqlitePool::connect(&db.url).await.unwrap();
    let numbered: Vec<(String, i64)> = sqlx::query_as(
        "SELECT u.user_id, COUNT(*) FROM users u JOIN user_folds f ON f.num = u.num \
         GROUP BY u.user_id ORDER BY u.user_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        numbered,
        [("ann".into(), 2), ("bo".into(), 1), ("cy".into(), 1)],
        "one number per user, one chain row per user per fold"
    );
    pool.close().await;
}

/// SQLite's own counts (`packet_counts`, what a restart starts from) are
/// the rows' after folds that insert packets pending, change them later,
/// and insert packets already marked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_table_counts_match_the_rows() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let mut client = app.client().await;
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(ingest(&mut client, packet_for(&format!("u{i}"))).await);
    }
    app.db.sync_tables().await;
    mark(&mut client, &ids[0]).await;
    mark_failed(&mut client, &ids[1]).await;
    // Marked before a fold takes it (unless the fold's timer falls in
    // between): inserted with its outcome.
    let late = ingest(&mut client, packet_for("u6")).await;
    mark(&mut client, &late).await;
    ingest(&mut client, packet_for("u7")).await;

    let rows = app.db.status_counts().await;
    let pool = sqlx::SqlitePool::connect(&app.db.url).await.unwrap();
    let table: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, n FROM packet_counts WHERE n <> 0 ORDER BY status")
            .fetch_all(&pool)
            .await
            .unwrap();
    pool.close().await;
    let mut expected: Vec<(String, i64)> = rows.into_iter().collect();
    expected.sort();
    assert_eq!(
        table,
        [
            ("failed".to_string(), 1),
            ("pending".to_string(), 5),
            ("processed".to_string(), 2)
        ]
    );
    assert_eq!(table, expected, "packet_counts as the rows are");

    let app = app.restart().await;
    let mut client = app.client().await;
    let s = status(&mut client).await;
    assert_eq!(
        (
            s.total_packets,
            s.pending_packets,
            s.processed_packets,
            s.failed_packets
        ),
        (8, 5, 2, 1)
    );
}
