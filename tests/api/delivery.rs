//! StreamPending and MarkProcessed: backlog, live delivery, leases,
//! redelivery, dead letters, restarts.
use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bucket::proto::bucket::v1 as pb;
use tonic::Code;

use crate::helpers::{
    Backend, TestApp, TestDb, assert_quiet, ingest, mark, next, packet_for, status, subscribe,
    test_config, user_packets,
};
use crate::on_every_backend;

on_every_backend!(
    backlog_oldest_first_then_live,
    max_in_flight_bounds_unmarked_packets,
    two_streams_never_hold_the_same_packet,
    expired_lease_redelivers_with_attempt_two,
    disconnect_redelivers,
    max_deliveries_dead_letters,
    mark_processed_is_idempotent_and_checks_the_id,
    mark_failure_keeps_the_error,
    pending_packets_survive_a_restart,
    shutdown_ends_streams_and_releases_their_leases,
    a_backlog_beyond_the_memory_window_is_delivered_in_order,
);

async fn backlog_oldest_first_then_live(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client().await;
    let mut sent = Vec::new();
    for i in 0..5 {
        sent.push(ingest(&mut client, packet_for(&format!("u{i}"))).await);
    }
    let mut stream = subscribe(&mut client, "karma", 0, 0).await;
    for id in &sent {
        assert_eq!(&next(&mut stream).await.packet.unwrap().packet_id, id);
    }
    // Live: pushed as soon as it is ingested, no polling delay.
    let started = std::time::Instant::now();
    let live = ingest(&mut client, packet_for("live")).await;
    assert_eq!(next(&mut stream).await.packet.unwrap().packet_id, live);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "live delivery took {:?}",
        started.elapsed()
    );
}

async fn max_in_flight_bounds_unmarked_packets(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client().await;
    for i in 0..6 {
        ingest(&mut client, packet_for(&format!("u{i}"))).await;
    }
    let mut stream = subscribe(&mut client, "karma", 2, 0).await;
    let first = next(&mut stream).await.packet.unwrap().packet_id;
    next(&mut stream).await;
    assert_quiet(&mut stream, 400).await;
    let s = status(&mut client).await;
    assert_eq!(s.consumers.len(), 1);
    assert_eq!(
        (s.consumers[0].in_flight, s.consumers[0].max_in_flight),
        (2, 2)
    );
    assert_eq!(s.leased_packets, 2);

    mark(&mut client, &first).await;
    next(&mut stream).await;
    assert_quiet(&mut stream, 400).await;
}

async fn two_streams_never_hold_the_same_packet(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client().await;
    const N: usize = 200;
    let packets = (0..N).map(|i| packet_for(&format!("u{i}"))).collect();
    client
        .ingest_batch(pb::IngestBatchRequest { packets })
        .await
        .unwrap();

    let mut consumers = Vec::new();
    for name in ["karma-a", "karma-b"] {
        let mut client = app.client().await;
        consumers.push(tokio::spawn(async move {
            let mut stream = subscribe(&mut client, name, 8, 0).await;
            let mut got = Vec::new();
            while let Ok(Some(Ok(d))) =
                tokio::time::timeout(Duration::from_secs(2), stream.message())
                    .await
                    .map(|m| m.transpose())
            {
                let id = d.packet.unwrap().packet_id;
                assert_eq!(d.delivery_attempt, 1, "redelivered without a lease ending");
                got.push(id.clone());
                mark(&mut client, &id).await;
            }
            got
        }));
    }
    let mut seen = HashMap::new();
    let mut per_stream = Vec::new();
    for consumer in consumers {
        let got = consumer.await.unwrap();
        per_stream.push(got.len());
        for id in got {
            *seen.entry(id).or_insert(0) += 1;
        }
    }
    assert_eq!(seen.len(), N, "every packet delivered");
    assert!(
        seen.values().all(|n| *n == 1),
        "a packet reached two streams"
    );
    assert!(
        per_stream.iter().all(|n| *n > 0),
        "both streams shared the work: {per_stream:?}"
    );
    assert_eq!(
        app.db.status_counts().await.get("processed"),
        Some(&(N as i64))
    );
}

async fn expired_lease_redelivers_with_attempt_two(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client().await;
    let id = ingest(&mut client, packet_for("u")).await;
    let mut stream = subscribe(&mut client, "slow", 0, 1).await;
    let first = next(&mut stream).await;
    assert_eq!(first.delivery_attempt, 1);
    // Not marked: after its 1 s lease it comes back, to the same stream here.
    let again = next(&mut stream).await;
    assert_eq!(again.packet.unwrap().packet_id, id);
    assert_eq!(again.delivery_attempt, 2);
    assert!(again.lease_expires_at.unwrap().seconds >= first.lease_expires_at.unwrap().seconds);
    mark(&mut client, &id).await;
    assert_quiet(&mut stream, 1500).await;
}

async fn disconnect_redelivers(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client().await;
    let id = ingest(&mut client, packet_for("u")).await;
    let mut stream = subscribe(&mut client, "crashes", 0, 600).await;
    assert_eq!(next(&mut stream).await.delivery_attempt, 1);
    drop(stream); // the consumer dies holding a 10-minute lease

    let mut other = app.client().await;
    let mut stream = subscribe(&mut other, "survivor", 0, 0).await;
    let again = next(&mut stream).await;
    assert_eq!(again.packet.unwrap().packet_id, id);
    assert_eq!(again.delivery_attempt, 2);
}

async fn max_deliveries_dead_letters(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut config = test_config(&db);
    config.delivery.max_deliveries = 2;
    let app = TestApp::spawn_with(db, config).await;
    let mut client = app.client().await;
    let id = ingest(&mut client, packet_for("u")).await;
    let mut stream = subscribe(&mut client, "never-marks", 0, 1).await;
    assert_eq!(next(&mut stream).await.delivery_attempt, 1);
    assert_eq!(next(&mut stream).await.delivery_attempt, 2);
    assert_quiet(&mut stream, 2000).await;

    let s = status(&mut client).await;
    assert_eq!(
        (s.dead_letter_packets, s.pending_packets, s.leased_packets),
        (1, 0, 0)
    );
    let page = client
        .user_packets(pb::UserPacketsRequest {
            user_id: "u".into(),
            status_filter: pb::PacketStatus::DeadLetter as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.packets[0].packet_id, id);
    assert_eq!(page.packets[0].delivery_attempts, 2);
}

async fn mark_processed_is_idempotent_and_checks_the_id(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client().await;
    let id = ingest(&mut client, packet_for("u")).await;
    let first = mark(&mut client, &id).await;
    assert!(!first.already_processed);
    let again = mark(&mut client, &id).await;
    assert!(again.already_processed);
    assert_eq!(again.status, "ok");
    assert_eq!(again.message, "Packet already processed");

    let unknown = client
        .mark_processed(pb::MarkProcessedRequest {
            packet_id: uuid::Uuid::new_v4().to_string(),
            success: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    let malformed = client
        .mark_processed(pb::MarkProcessedRequest {
            packet_id: "42".into(),
            success: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(malformed.code(), Code::InvalidArgument);
    use tonic_types::StatusExt;
    assert_eq!(
        malformed
            .get_details_bad_request()
            .unwrap()
            .field_violations[0]
            .field,
        "packet_id"
    );
}

async fn mark_failure_keeps_the_error(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client().await;
    let id = ingest(&mut client, packet_for("u")).await;
    let mut stream = subscribe(&mut client, "karma", 0, 0).await;
    next(&mut stream).await;
    let failed = client
        .mark_processed(pb::MarkProcessedRequest {
            packet_id: id.clone(),
            success: false,
            karma_actions: vec![],
            error_message: "karma tracker returned 500".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(failed.message, "Packet marked as failed");
    let packets = user_packets(&mut client, "u").await;
    let p = &packets[0];
    assert_eq!(p.status, pb::PacketStatus::Failed as i32);
    assert_eq!(p.error_message, "karma tracker returned 500");
    assert!(!p.processed_by_karma);
    let s = status(&mut client).await;
    assert_eq!((s.failed_packets, s.leased_packets), (1, 0));
    assert_eq!(s.consumers[0].in_flight, 0);
}

async fn pending_packets_survive_a_restart(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client().await;
    let mut sent = HashSet::new();
    for i in 0..5 {
        sent.insert(ingest(&mut client, packet_for(&format!("u{i}"))).await);
    }
    drop(client);
    let app = app.restart().await;
    let mut client = app.client().await;
    assert_eq!(status(&mut client).await.queue_size, 5);
    let mut stream = subscribe(&mut client, "karma", 0, 0).await;
    let mut got = HashSet::new();
    for _ in 0..5 {
        got.insert(next(&mut stream).await.packet.unwrap().packet_id);
    }
    assert_eq!(got, sent);
}

async fn shutdown_ends_streams_and_releases_their_leases(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client().await;
    let id = ingest(&mut client, packet_for("u")).await;
    let mut stream = subscribe(&mut client, "karma", 0, 600).await;
    assert_eq!(next(&mut stream).await.delivery_attempt, 1);

    let config = app.config.clone();
    let db = app.stop().await;
    let end = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("stream ends at shutdown");
    assert_eq!(
        end.unwrap_err().code(),
        Code::Unavailable,
        "told to reconnect"
    );

    // The 10-minute lease was released at shutdown: redelivered at once.
    let app = TestApp::spawn_with(db, config).await;
    let mut client = app.client().await;
    let mut stream = subscribe(&mut client, "karma", 0, 0).await;
    let again = next(&mut stream).await;
    assert_eq!(again.packet.unwrap().packet_id, id);
    assert_eq!(again.delivery_attempt, 2);
}

/// More packets than the memory queue holds: the rest wait in the database
/// and are read back in order while new ones keep arriving.
async fn a_backlog_beyond_the_memory_window_is_delivered_in_order(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut config = test_config(&db);
    config.delivery.queue_window = 8;
    let app = TestApp::spawn_with(db, config).await;
    let mut client = app.client().await;
    let mut sent = Vec::new();
    for chunk in 0..4 {
        let packets = (0..25)
            .map(|i| packet_for(&format!("u{}", chunk * 25 + i)))
            .collect();
        let response = client
            .ingest_batch(pb::IngestBatchRequest { packets })
            .await
            .unwrap()
            .into_inner();
        sent.extend(response.results.into_iter().map(|r| match r.outcome {
            Some(pb::ingest_batch_result::Outcome::Ingested(i)) => i.packet_id,
            other => panic!("{other:?}"),
        }));
    }
    let mut stream = subscribe(&mut client, "drain", 4, 0).await;
    let mut marker = app.client().await;
    let mut received = Vec::new();
    while received.len() < 120 {
        let id = next(&mut stream).await.packet.unwrap().packet_id;
        mark(&mut marker, &id).await;
        received.push(id);
        if received.len() == 50 {
            // New packets while the backlog drains: after it.
            for i in 0..20 {
                sent.push(ingest(&mut client, packet_for(&format!("late{i}"))).await);
            }
        }
    }
    assert_eq!(received, sent, "every packet once, oldest first");
    assert_quiet(&mut stream, 300).await;
}
