//! Retention: old finished packets go, in batches; pending ones stay; the
//! counts follow; the SQLite file shrinks.
use std::time::Duration;

use bucket::proto::bucket::v1 as pb;
use bucket::store::Store;
use bucket::store::retention::prune_now;
use tokio_util::sync::CancellationToken;

use crate::helpers::{Backend, TestApp, packet_for, status};

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
    let before = pages().await;

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let store = Store::connect(&app.db.url).await.unwrap();
    let deleted = prune_now(&store, Duration::from_secs(1), &CancellationToken::new()).await;
    assert_eq!(
        deleted,
        (N - 10) as u64,
        "every old finished packet, batch by batch"
    );
    let s = status(&mut client).await;
    assert_eq!(s.total_packets, 10, "the counts follow the deletes");
    assert_eq!(s.pending_packets, 10, "pending packets are never deleted");
    assert_eq!(app.db.status_counts().await.get("pending"), Some(&10));
    // Nothing younger than the period goes.
    assert_eq!(
        prune_now(&store, Duration::from_secs(3600), &CancellationToken::new()).await,
        0
    );
    if let (Some(before), Some(after)) = (before, pages().await) {
        assert!(
            after * 2 < before,
            "the SQLite file shrinks: {before} -> {after} pages"
        );
    }
}

crate::on_every_backend!(old_finished_packets_are_deleted_and_pending_ones_kept);
