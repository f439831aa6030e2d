//! Operator and consumer controls: ExtendLease (and its nack), Redrive,
//! Replay, with their REST paths, on every backend; ExtendLease through
//! another node with Redis.
use std::time::Duration;

use bucket::proto::bucket::v1 as pb;
use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::{
    Backend, TestApp, TestDb, assert_quiet, ingest, mark, next, packet_for, status, subscribe,
    test_config, user_packets,
};

async fn extend(
    client: &mut bucket::proto::bucket::v1::bucket_service_client::BucketServiceClient<
        tonic::transport::Channel,
    >,
    tokens: Vec<String>,
    lease_seconds: u32,
) -> pb::ExtendLeaseResponse {
    client
        .extend_lease(pb::ExtendLeaseRequest {
            lease_tokens: tokens,
            lease_seconds,
        })
        .await
        .expect("extend lease")
        .into_inner()
}

fn error_code(result: &pb::ExtendLeaseResult) -> Option<i32> {
    match &result.outcome {
        Some(pb::extend_lease_result::Outcome::Error(e)) => Some(e.code),
        _ => None,
    }
}

async fn an_extended_lease_outlives_its_first_end_and_a_nack_redelivers_at_once(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client().await;
    let id = ingest(&mut client, packet_for("u")).await;
    let mut stream = subscribe(&mut client, "slow", 0, 1).await;
    let first = next(&mut stream).await;
    assert!(
        !first.lease_token.is_empty(),
        "every delivery names its lease"
    );

    // Kept for 4 s instead of 1: nothing comes back after the first second.
    let extended = extend(&mut client, vec![first.lease_token.clone()], 4).await;
    assert_eq!((extended.extended, extended.rejected), (1, 0));
    match &extended.results[0].outcome {
        Some(pb::extend_lease_result::Outcome::Extended(e)) => {
            assert_eq!(e.packet_id, id);
            let until = e.lease_expires_at.expect("the new end");
            let first_end = first.lease_expires_at.expect("the first end");
            assert!(
                until.seconds >= first_end.seconds + 2,
                "{until:?} vs {first_end:?}"
            );
        }
        other => panic!("expected an extension, got {other:?}"),
    }
    assert_quiet(&mut stream, 2000).await;

    // A nack: delivered again at once, counted as an ended delivery.
    let nacked = extend(&mut client, vec![first.lease_token.clone()], 0).await;
    assert_eq!(nacked.extended, 1);
    match &nacked.results[0].outcome {
        Some(pb::extend_lease_result::Outcome::Extended(e)) => {
            assert_eq!(e.lease_expires_at, None, "ended, not extended")
        }
        other => panic!("expected an ended lease, got {other:?}"),
    }
    let again = tokio::time::timeout(Duration::from_millis(900), next(&mut stream))
        .await
        .expect("redelivered before the lease would have ended");
    assert_eq!(again.packet.as_ref().unwrap().packet_id, id);
    assert_eq!(again.delivery_attempt, 2);
    assert_ne!(
        again.lease_token, first.lease_token,
        "a new lease, a new token"
    );

    // The old token names a lease that ended: FAILED_PRECONDITION, and the
    // new lease is untouched.
    let stale = extend(&mut client, vec![first.lease_token.clone()], 30).await;
    assert_eq!((stale.extended, stale.rejected), (0, 1));
    assert_eq!(
        error_code(&stale.results[0]),
        Some(Code::FailedPrecondition as i32)
    );
    // Marked: its token is done too.
    mark(&mut client, &id).await;
    let done = extend(&mut client, vec![again.lease_token.clone()], 30).await;
    assert_eq!(
        error_code(&done.results[0]),
        Some(Code::FailedPrecondition as i32)
    );
}

async fn extend_lease_answers_each_token_and_checks_its_input(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client().await;
    ingest(&mut client, packet_for("u")).await;
    let mut stream = subscribe(&mut client, "c", 0, 30).await;
    let d = next(&mut stream).await;
    let answer = extend(
        &mut client,
        vec!["not-a-token".into(), d.lease_token.clone(), String::new()],
        60,
    )
    .await;
    assert_eq!((answer.extended, answer.rejected), (1, 2));
    let codes: Vec<Option<i32>> = answer.results.iter().map(error_code).collect();
    assert_eq!(
        codes,
        [
            Some(Code::InvalidArgument as i32),
            None,
            Some(Code::InvalidArgument as i32)
        ]
    );
    let indexes: Vec<u32> = answer.results.iter().map(|r| r.index).collect();
    assert_eq!(indexes, [0, 1, 2]);

    let too_long = client
        .extend_lease(pb::ExtendLeaseRequest {
            lease_tokens: vec![d.lease_token.clone()],
            lease_seconds: 3601,
        })
        .await
        .unwrap_err();
    assert_eq!(too_long.code(), Code::InvalidArgument);
    assert!(
        too_long.message().contains("lease_seconds"),
        "{}",
        too_long.message()
    );
}

/// Packets that reach dead_letter (1 delivery allowed, 1 s leases);
/// returns once `total` are dead letters.
async fn dead_letters(app: &TestApp, user: &str, n: usize, total: u64) -> Vec<String> {
    let mut client = app.client().await;
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(ingest(&mut client, packet_for(user)).await);
    }
    let mut stream = subscribe(&mut client, "never-marks", 0, 1).await;
    for _ in 0..n {
        next(&mut stream).await;
    }
    drop(stream);
    for _ in 0..100 {
        if status(&mut client).await.dead_letter_packets >= total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ids
}

async fn redrive_sends_dead_letters_back_with_their_count_reset(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut config = test_config(&db);
    config.delivery.max_deliveries = 1;
    let app = TestApp::spawn_with(db, config).await;
    let mut client = app.client().await;
    let mine = dead_letters(&app, "a", 3, 3).await;
    dead_letters(&app, "b", 2, 5).await;
    let s = status(&mut client).await;
    assert_eq!(
        (s.dead_letter_packets, s.pending_packets + s.leased_packets),
        (5, 0)
    );

    // Only user a's, over REST (the same call).
    let http = reqwest::Client::new();
    let response = http
        .post(format!("{}/api/v1/bucket/prana/packets/redrive", app.url()))
        .json(&serde_json::json!({"user_id": "a", "statuses": ["dead_letter"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body, serde_json::json!({"redriven": 3}));
    let s = status(&mut client).await;
    // (With Redis, a dead letter's entry may still be acknowledged in the
    // background and count as leased for a moment: the sum is exact.)
    assert_eq!(
        (s.dead_letter_packets, s.pending_packets + s.leased_packets),
        (2, 3)
    );

    // Delivered again, from the first attempt, oldest first.
    let mut stream = subscribe(&mut client, "karma", 0, 30).await;
    for id in &mine {
        let d = next(&mut stream).await;
        assert_eq!(&d.packet.unwrap().packet_id, id);
        assert_eq!(d.delivery_attempt, 1);
        mark(&mut client, id).await;
    }
    assert_quiet(&mut stream, 500).await;
    let packets = user_packets(&mut client, "a").await;
    for p in &packets {
        assert_eq!(p.status, pb::PacketStatus::Processed as i32);
        assert_eq!(p.history.len(), 1, "what it had is kept");
        let h = &p.history[0];
        assert_eq!(h.reason, pb::RequeueReason::Redrive as i32);
        assert_eq!(h.status, pb::PacketStatus::DeadLetter as i32);
        assert_eq!(h.delivery_attempts, 1);
        assert!(h.requeued_at.is_some());
    }

    // The rest over gRPC, no filter: both statuses.
    let rest = client
        .redrive(pb::RedriveRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.redriven, 2);
    assert_eq!(status(&mut client).await.dead_letter_packets, 0);
    // Nothing left to redrive; a status Redrive does not take is named.
    let none = client.redrive(pb::RedriveRequest::default()).await.unwrap();
    assert_eq!(none.into_inner().redriven, 0);
    let bad = client
        .redrive(pb::RedriveRequest {
            statuses: vec![pb::PacketStatus::Processed as i32],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert_eq!(
        bad.get_details_bad_request().unwrap().field_violations[0].field,
        "statuses"
    );
}

async fn replay_delivers_processed_packets_again_and_keeps_their_outcome(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client().await;
    let id = ingest(&mut client, packet_for("u")).await;
    let other = ingest(&mut client, packet_for("v")).await;
    let mut stream = subscribe(&mut client, "karma", 0, 30).await;
    for _ in 0..2 {
        let d = next(&mut stream).await;
        let pid = d.packet.unwrap().packet_id;
        client
            .mark_processed(pb::MarkProcessedRequest {
                packet_id: pid,
                success: true,
                karma_actions: vec![bucket::proto::json_to_struct(
                    serde_json::json!({"action": "reward", "points": 5})
                        .as_object()
                        .unwrap(),
                )],
                ..Default::default()
            })
            .await
            .unwrap();
    }

    // Every processed packet at once is refused; a user's is fine.
    let all = client
        .replay(pb::ReplayRequest::default())
        .await
        .unwrap_err();
    assert_eq!(all.code(), Code::InvalidArgument);
    let replayed = client
        .replay(pb::ReplayRequest {
            user_id: "u".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replayed.replayed, 1);
    let d = next(&mut stream).await;
    assert_eq!(d.packet.unwrap().packet_id, id);
    assert_eq!(d.delivery_attempt, 1);
    assert_quiet(&mut stream, 300).await;

    let packets = user_packets(&mut client, "u").await;
    let p = &packets[0];
    assert_ne!(
        p.status,
        pb::PacketStatus::Processed as i32,
        "pending again"
    );
    assert!(
        p.karma_actions.is_empty(),
        "the outcome moved to the history"
    );
    let h = &p.history[0];
    assert_eq!(h.reason, pb::RequeueReason::Replay as i32);
    assert_eq!(h.status, pb::PacketStatus::Processed as i32);
    assert!(h.processed_by_karma);
    assert!(h.processed_at.is_some());
    assert_eq!(h.karma_actions.len(), 1);

    // By time range over REST: received before now is both; v's replays.
    let http = reqwest::Client::new();
    let now = chrono::Utc::now().to_rfc3339();
    let response = http
        .post(format!("{}/api/v1/bucket/prana/packets/replay", app.url()))
        .json(&serde_json::json!({"received_before": now}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        body,
        serde_json::json!({"replayed": 1}),
        "u's is not processed now"
    );
    assert_eq!(next(&mut stream).await.packet.unwrap().packet_id, other);

    let bad = http
        .post(format!("{}/api/v1/bucket/prana/packets/replay", app.url()))
        .json(&serde_json::json!({"received_from": "yesterday"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 422);
    let body: serde_json::Value = bad.json().await.unwrap();
    assert_eq!(
        body["detail"][0]["loc"],
        serde_json::json!(["body", "received_from"])
    );
}

crate::on_every_backend!(
    an_extended_lease_outlives_its_first_end_and_a_nack_redelivers_at_once,
    extend_lease_answers_each_token_and_checks_its_input,
    redrive_sends_dead_letters_back_with_their_count_reset,
    replay_delivers_processed_packets_again_and_keeps_their_outcome,
);

/// With Redis, a consumer's unary calls may land on any node: ExtendLease
/// reaches the node that granted the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extend_lease_through_another_node() {
    let db = TestDb::new(Backend::Redis).await;
    let a = TestApp::spawn_with(db.clone(), test_config(&db)).await;
    let b = TestApp::spawn_with(db.clone(), test_config(&db)).await;
    let mut on_a = a.client().await;
    let mut on_b = b.client().await;
    ingest(&mut on_a, packet_for("u")).await;
    let mut stream = subscribe(&mut on_a, "slow", 0, 1).await;
    let d = next(&mut stream).await;
    let extended = extend(&mut on_b, vec![d.lease_token.clone()], 4).await;
    assert_eq!(
        (extended.extended, extended.rejected),
        (1, 0),
        "{extended:?}"
    );
    assert_quiet(&mut stream, 2000).await;
    let nacked = extend(&mut on_b, vec![d.lease_token.clone()], 0).await;
    assert_eq!(nacked.extended, 1);
    let again = next(&mut stream).await;
    assert_eq!(again.delivery_attempt, 2);
    // After a's stream took it again, b answers for the old token as a does.
    let stale = extend(&mut on_b, vec![d.lease_token.clone()], 4).await;
    assert_eq!(
        error_code(&stale.results[0]),
        Some(Code::FailedPrecondition as i32)
    );
    drop(stream);
    b.stop().await;
    a.stop().await;
}

/// SIGTERM during a deploy: a request under way finishes within the grace
/// period; one still busy after it is cut off, and the bucket stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_requests_finish_within_the_grace_period() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let db = TestDb::new(Backend::Sqlite).await;
    let mut config = test_config(&db);
    config.limits.shutdown_grace_seconds = 2;
    let app = TestApp::spawn_with(db, config).await;
    let addr = app.url().trim_start_matches("http://").to_owned();
    let body = serde_json::to_vec(&serde_json::json!({
        "user_id": "u", "timestamp": "2024-01-20T10:30:00Z", "cognitive_state": "ON_TASK",
        "active_seconds": 5.0, "idle_seconds": 0.0, "away_seconds": 0.0, "raw_signals": {}
    }))
    .unwrap();
    let head = format!(
        "POST /api/v1/bucket/prana/ingest HTTP/1.1\r\nhost: bucket\r\nconnection: close\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    // Two requests under way: their heads and half their bodies sent.
    let mut finishing = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut stuck = tokio::net::TcpStream::connect(&addr).await.unwrap();
    for conn in [&mut finishing, &mut stuck] {
        conn.write_all(head.as_bytes()).await.unwrap();
        conn.write_all(&body[..10]).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = std::time::Instant::now();
    let stopping = tokio::spawn(app.stop());
    tokio::time::sleep(Duration::from_millis(500)).await;
    // New connections are refused at once.
    assert!(
        tokio::net::TcpStream::connect(&addr).await.is_err(),
        "still accepting during the drain"
    );
    // The first finishes its body within the grace period: answered, and
    // what it sent is stored.
    finishing.write_all(&body[10..]).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(
        Duration::from_secs(5),
        finishing.read_to_string(&mut answer),
    )
    .await
    .expect("answered and closed")
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // The other never does: cut off when the grace period ends.
    let db = tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("stopped after the grace period")
        .unwrap();
    let took = started.elapsed();
    assert!(
        (Duration::from_millis(1900)..Duration::from_secs(6)).contains(&took),
        "stopped after {took:?}"
    );
    // (In the process the runtime ends with main, closing that connection;
    // here the test's runtime lives on, so only the stop is checked.)
    drop(stuck);
    assert_eq!(db.status_counts().await.get("pending"), Some(&1));
}
