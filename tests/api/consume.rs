//! Consume: deliveries, marks, nacks and lease extensions on one stream,
//! with flow control and the same leases as StreamPending.
use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use bucket::proto::bucket::v1 as pb;
use bucket::proto::bucket::v1::bucket_service_client::BucketServiceClient;
use pb::consume_result::Outcome;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};
use tonic_types::StatusExt;

use crate::helpers::{
    Backend, TestApp, TestDb, ingest, packet_for, status, test_config, user_packets,
};
use crate::on_every_backend;

on_every_backend!(
    deliveries_and_marks_share_one_stream,
    max_in_flight_bounds_unsettled_deliveries,
    a_nack_redelivers_at_once,
    an_extension_keeps_the_lease,
    an_expired_lease_goes_to_another_subscriber,
    a_mark_for_an_unknown_lease_is_reported,
    bad_items_are_answered_and_the_stream_goes_on,
    closing_answers_what_was_sent_then_releases_the_rest,
    shutdown_ends_the_stream_and_releases_its_leases,
);

/// A Consume call driven by hand: requests go in, responses are sorted
/// into deliveries and answers.
struct Consume {
    requests: Option<mpsc::Sender<pb::ConsumeRequest>>,
    responses: Streaming<pb::ConsumeResponse>,
    deliveries: VecDeque<pb::StreamPendingResponse>,
    answers: VecDeque<pb::ConsumeAnswer>,
    /// Every delivery that came off the wire, read or not.
    received: usize,
    ended: bool,
}

fn settings(consumer: &str, max_in_flight: u32, lease_seconds: u32) -> pb::ConsumeSettings {
    pb::ConsumeSettings {
        consumer: consumer.into(),
        max_in_flight,
        lease_seconds,
    }
}

impl Consume {
    /// Opens the stream with `first` as its first request.
    async fn open_with(
        client: &mut BucketServiceClient<Channel>,
        first: pb::ConsumeRequest,
    ) -> Result<Consume, Status> {
        let (tx, rx) = mpsc::channel(64);
        tx.send(first).await.unwrap();
        let responses = client.consume(ReceiverStream::new(rx)).await?.into_inner();
        Ok(Consume {
            requests: Some(tx),
            responses,
            deliveries: VecDeque::new(),
            answers: VecDeque::new(),
            received: 0,
            ended: false,
        })
    }

    /// Subscribes and waits for the answer that confirms it.
    async fn open(
        client: &mut BucketServiceClient<Channel>,
        consumer: &str,
        max_in_flight: u32,
        lease_seconds: u32,
    ) -> Consume {
        let first = pb::ConsumeRequest {
            settings: Some(settings(consumer, max_in_flight, lease_seconds)),
            ..Default::default()
        };
        let mut stream = Consume::open_with(client, first).await.expect("subscribe");
        let confirmed = stream.answer().await;
        assert_eq!(confirmed, pb::ConsumeAnswer::default());
        stream
    }

    async fn send(&self, request: pb::ConsumeRequest) {
        self.requests
            .as_ref()
            .expect("not closed")
            .send(request)
            .await
            .expect("the call reads requests");
    }

    async fn mark(&self, deliveries: &[&pb::StreamPendingResponse]) {
        self.send(pb::ConsumeRequest {
            marks: deliveries.iter().map(|d| mark(&d.lease_token)).collect(),
            ..Default::default()
        })
        .await;
    }

    /// Ends the request side.
    fn close(&mut self) {
        self.requests = None;
    }

    /// Reads one response into the buffers; false when the stream ended.
    async fn read(&mut self) -> Result<bool, Status> {
        if self.ended {
            return Ok(false);
        }
        let message = tokio::time::timeout(Duration::from_secs(10), self.responses.message())
            .await
            .expect("a response within 10 s")?;
        match message {
            None => {
                self.ended = true;
                Ok(false)
            }
            Some(response) => {
                self.received += response.deliveries.len();
                self.deliveries.extend(response.deliveries);
                self.answers.extend(response.answer);
                Ok(true)
            }
        }
    }

    async fn delivery(&mut self) -> pb::StreamPendingResponse {
        loop {
            if let Some(d) = self.deliveries.pop_front() {
                return d;
            }
            assert!(self.read().await.expect("stream ok"), "stream ended");
        }
    }

    async fn answer(&mut self) -> pb::ConsumeAnswer {
        loop {
            if let Some(a) = self.answers.pop_front() {
                return a;
            }
            assert!(self.read().await.expect("stream ok"), "stream ended");
        }
    }

    /// Reads to the end: its status.
    async fn end(&mut self) -> Result<(), Status> {
        while self.read().await? {}
        Ok(())
    }

    /// Asserts no delivery comes for `ms` milliseconds (answers may).
    async fn assert_no_delivery(&mut self, ms: u64) {
        assert!(self.deliveries.is_empty(), "{:?}", self.deliveries);
        let quiet = tokio::time::sleep(Duration::from_millis(ms));
        tokio::pin!(quiet);
        loop {
            tokio::select! {
                _ = &mut quiet => return,
                message = self.responses.message() => {
                    let response = message.expect("stream ok").expect("stream open");
                    assert!(response.deliveries.is_empty(), "unexpected delivery: {response:?}");
                    self.answers.extend(response.answer);
                }
            }
        }
    }
}

fn mark(lease_token: &str) -> pb::ConsumeMark {
    pb::ConsumeMark {
        lease_token: lease_token.into(),
        success: true,
        ..Default::default()
    }
}

fn packet_id(d: &pb::StreamPendingResponse) -> String {
    d.packet.as_ref().unwrap().packet_id.clone()
}

fn marked(result: &pb::ConsumeResult) -> &pb::MarkProcessedResponse {
    match &result.outcome {
        Some(Outcome::Marked(m)) => m,
        other => panic!("not marked: {other:?}"),
    }
}

fn refused(result: &pb::ConsumeResult) -> &pb::IngestError {
    match &result.outcome {
        Some(Outcome::Error(e)) => e,
        other => panic!("not refused: {other:?}"),
    }
}

fn fields(e: &pb::IngestError) -> Vec<&str> {
    e.field_violations
        .iter()
        .map(|v| v.field.as_str())
        .collect()
}

fn code_of(e: &pb::IngestError) -> Code {
    Code::from_i32(e.code)
}

/// A token of the form this server makes, naming no lease it granted.
fn made_up_token(packet_id: &str) -> String {
    let id = uuid::Uuid::parse_str(packet_id).unwrap();
    format!("0nowhere.1.{}", id.simple())
}

async fn deliveries_and_marks_share_one_stream(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client().await;
    let mut sent = Vec::new();
    for i in 0..3 {
        sent.push(ingest(&mut client, packet_for(&format!("u{i}"))).await);
    }
    let mut stream = Consume::open(&mut client, "karma", 0, 0).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(stream.delivery().await);
    }
    let ids: Vec<String> = got.iter().map(packet_id).collect();
    assert_eq!(ids, sent, "the backlog, oldest first");
    assert!(got.iter().all(|d| d.delivery_attempt == 1));

    // Two marks in one request, the third in the next: one answer each.
    stream
        .send(pb::ConsumeRequest {
            marks: vec![
                mark(&got[0].lease_token),
                pb::ConsumeMark {
                    lease_token: got[1].lease_token.clone(),
                    success: false,
                    error_message: "karma API down".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        })
        .await;
    stream.mark(&[&got[2]]).await;
    let first = stream.answer().await;
    assert_eq!((first.marked, first.rejected), (2, 0));
    assert_eq!(
        first.marks.iter().map(|r| r.index).collect::<Vec<_>>(),
        [0, 1]
    );
    assert_eq!(marked(&first.marks[0]).packet_id, sent[0]);
    assert_eq!(marked(&first.marks[1]).message, "Packet marked as failed");
    assert!(first.marks.iter().all(|r| !r.lease_ended));
    let second = stream.answer().await;
    assert_eq!(second.marked, 1);
    assert_eq!(
        marked(&second.marks[0]).message,
        "Packet marked as processed"
    );

    // Live packets come on the same stream.
    let live = ingest(&mut client, packet_for("live")).await;
    let d = stream.delivery().await;
    assert_eq!(packet_id(&d), live);
    stream.mark(&[&d]).await;
    assert_eq!(stream.answer().await.marked, 1);

    let counts = app.db.status_counts().await;
    assert_eq!(
        (counts.get("processed"), counts.get("failed")),
        (Some(&3), Some(&1))
    );
    let failed = user_packets(&mut client, "u1").await;
    assert_eq!(failed[0].error_message, "karma API down");
    let s = status(&mut client).await;
    assert_eq!(s.consumers.len(), 1);
    assert_eq!(
        (s.consumers[0].consumer.as_str(), s.consumers[0].in_flight),
        ("karma", 0)
    );

    stream.close();
    stream.end().await.expect("a closed stream ends OK");
    assert!(status(&mut client).await.consumers.is_empty());
}

async fn max_in_flight_bounds_unsettled_deliveries(backend: Backend) {
    const N: usize = 20;
    const IN_FLIGHT: usize = 3;
    let app = TestApp::spawn(backend).await;
    let mut client = app.client().await;
    let packets = (0..N).map(|i| packet_for(&format!("u{i}"))).collect();
    client
        .ingest_batch(pb::IngestBatchRequest { packets })
        .await
        .unwrap();
    let mut stream = Consume::open(&mut client, "karma", IN_FLIGHT as u32, 600).await;
    let mut held = Vec::new();
    for _ in 0..IN_FLIGHT {
        held.push(stream.delivery().await);
    }
    stream.assert_no_delivery(400).await;
    let s = status(&mut client).await;
    assert_eq!(s.consumers[0].in_flight, IN_FLIGHT as u32);

    // Marking one, two or three at a time: no delivery ever comes while
    // IN_FLIGHT others are unmarked, counting every mark sent before it.
    let mut marks_sent = 0;
    let mut seen: HashSet<String> = held.iter().map(packet_id).collect();
    while marks_sent < N {
        let k = 1 + marks_sent % held.len();
        let batch: Vec<pb::StreamPendingResponse> = held.drain(..k).collect();
        stream.mark(&batch.iter().collect::<Vec<_>>()).await;
        marks_sent += k;
        while held.len() < IN_FLIGHT && stream.received < N {
            let next = stream.delivery().await;
            assert!(
                stream.received - marks_sent <= IN_FLIGHT,
                "{} delivered, {marks_sent} marked",
                stream.received
            );
            assert!(seen.insert(packet_id(&next)), "delivered twice");
            held.push(next);
        }
    }
    assert_eq!(stream.received, N);
    let mut answered = 0;
    while answered < N {
        let a = stream.answer().await;
        assert_eq!(a.rejected, 0, "{a:?}");
        answered += a.marked as usize;
    }
    assert_eq!(seen.len(), N);
    assert_eq!(
        app.db.status_counts().await.get("processed"),
        Some(&(N as i64))
    );
}

async fn a_nack_redelivers_at_once(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client().await;
    let id = ingest(&mut client, packet_for("u")).await;
    let mut stream = Consume::open(&mut client, "karma", 0, 600).await;
    let first = stream.delivery().await;
    stream
        .send(pb::ConsumeRequest {
            nack_lease_tokens: vec![first.lease_token.clone()],
            ..Default::default()
        })
        .await;
    let answer = stream.answer().await;
    match &answer.nacks[0].outcome {
        Some(Outcome::Lease(lease)) => {
            assert_eq!(lease.packet_id, id);
            assert_eq!(lease.lease_expires_at, None, "ended");
        }
        other => panic!("{other:?}"),
    }
    // Out again well before the 10-minute lease, counted.
    let again = stream.delivery().await;
    assert_eq!(packet_id(&again), id);
    assert_eq!(again.delivery_attempt, 2);
    assert_ne!(again.lease_token, first.lease_token);
    // The first delivery's token names nothing now.
    stream
        .send(pb::ConsumeRequest {
            nack_lease_tokens: vec![first.lease_token.clone()],
            ..Default::default()
        })
        .await;
    let stale = stream.answer().await;
    assert_eq!(code_of(refused(&stale.nacks[0])), Code::FailedPrecondition);
    assert_eq!(stale.rejected, 1);
    stream.mark(&[&again]).await;
    let done = stream.answer().await;
    assert!(!done.marks[0].lease_ended);
    assert!(!marked(&done.marks[0]).already_processed);
}

async fn an_extension_keeps_the_lease(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client().await;
    let id = ingest(&mut client, packet_for("u")).await;
    let mut stream = Consume::open(&mut client, "slow", 0, 2).await;
    let d = stream.delivery().await;
    stream
        .send(pb::ConsumeRequest {
            extend_lease_tokens: vec![d.lease_token.clone()],
            extend_lease_seconds: 60,
            ..Default::default()
        })
        .await;
    let answer = stream.answer().await;
    match &answer.extensions[0].outcome {
        Some(Outcome::Lease(lease)) => {
            assert_eq!(lease.packet_id, id);
            let until = lease.lease_expires_at.unwrap().seconds;
            assert!(until >= d.lease_expires_at.unwrap().seconds + 30, "moved");
        }
        other => panic!("{other:?}"),
    }
    // Well past the stream's 2 s lease: still ours, not delivered again.
    stream.assert_no_delivery(3500).await;
    stream.mark(&[&d]).await;
    let done = stream.answer().await;
    assert!(!done.marks[0].lease_ended, "the lease was still held");
    let p = &user_packets(&mut client, "u").await[0];
    assert_eq!(
        (p.status, p.delivery_attempts),
        (pb::PacketStatus::Processed as i32, 1)
    );
}

async fn an_expired_lease_goes_to_another_subscriber(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut config = test_config(&db);
    // Round robin may hand it back to the first stream a few times first.
    config.delivery.max_deliveries = 20;
    let app = TestApp::spawn_with(db, config).await;
    let mut client = app.client().await;
    let id = ingest(&mut client, packet_for("u")).await;
    let mut a = Consume::open(&mut client, "a", 1, 1).await;
    let first = a.delivery().await;
    assert_eq!(first.delivery_attempt, 1);
    let mut other = app.client().await;
    let mut b = Consume::open(&mut other, "b", 1, 600).await;
    // `a` never marks: each lease of it ends in 1 s, and one comes to `b`.
    let taken = tokio::spawn(async move {
        let d = b.delivery().await;
        (b, d)
    });
    let drain = tokio::spawn(async move {
        loop {
            let d = a.delivery().await;
            assert_eq!(packet_id(&d), packet_id(&first));
            if d.delivery_attempt > 10 {
                panic!("never went to the other stream");
            }
        }
    });
    let (mut b, again) = taken.await.unwrap();
    drain.abort();
    assert_eq!(packet_id(&again), id);
    assert!(again.delivery_attempt >= 2, "{again:?}");
    b.mark(&[&again]).await;
    let done = b.answer().await;
    assert!(!done.marks[0].lease_ended);
    assert!(!marked(&done.marks[0]).already_processed);
}

async fn a_mark_for_an_unknown_lease_is_reported(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client().await;
    let id = ingest(&mut client, packet_for("u")).await;
    let mut stream = Consume::open(&mut client, "karma", 0, 600).await;
    let d = stream.delivery().await;
    let unknown_packet = made_up_token(&uuid::Uuid::new_v4().to_string());
    stream
        .send(pb::ConsumeRequest {
            marks: vec![
                mark(&unknown_packet),
                // A token of the right packet, but no lease of this node's.
                mark(&made_up_token(&id)),
                mark("not a token"),
            ],
            ..Default::default()
        })
        .await;
    let answer = stream.answer().await;
    assert_eq!((answer.marked, answer.rejected), (1, 2));
    assert_eq!(code_of(refused(&answer.marks[0])), Code::NotFound);
    let stale = &answer.marks[1];
    assert_eq!(marked(stale).packet_id, id, "the outcome is recorded");
    assert!(stale.lease_ended, "but the lease it names was not held");
    let bad = refused(&answer.marks[2]);
    assert_eq!(code_of(bad), Code::InvalidArgument);
    assert_eq!(fields(bad), ["lease_token"]);

    // The stream goes on: the real delivery's mark finds it processed.
    stream.mark(&[&d]).await;
    let late = stream.answer().await;
    assert!(marked(&late.marks[0]).already_processed);
    let live = ingest(&mut client, packet_for("live")).await;
    assert_eq!(packet_id(&stream.delivery().await), live);
    let s = status(&mut client).await;
    assert_eq!((s.processed_packets, s.leased_packets), (1, 1));
}

async fn bad_items_are_answered_and_the_stream_goes_on(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client().await;
    ingest(&mut client, packet_for("u")).await;
    let mut stream = Consume::open(&mut client, "karma", 0, 600).await;
    let d = stream.delivery().await;
    stream
        .send(pb::ConsumeRequest {
            marks: vec![pb::ConsumeMark {
                lease_token: d.lease_token.clone(),
                success: false,
                error_message: "nul \0 inside".into(),
                ..Default::default()
            }],
            extend_lease_tokens: vec![d.lease_token.clone()],
            extend_lease_seconds: 3601,
            ..Default::default()
        })
        .await;
    let answer = stream.answer().await;
    assert_eq!((answer.marked, answer.rejected), (0, 2));
    let mark = refused(&answer.marks[0]);
    assert_eq!(code_of(mark), Code::InvalidArgument);
    assert_eq!(fields(mark), ["error_message"]);
    let extension = refused(&answer.extensions[0]);
    assert_eq!(code_of(extension), Code::InvalidArgument);
    assert_eq!(fields(extension), ["extend_lease_seconds"]);
    // Nothing was recorded; the lease is still this stream's.
    stream.mark(&[&d]).await;
    let ok = stream.answer().await;
    assert_eq!(ok.marked, 1);
    assert!(!ok.marks[0].lease_ended);
}

async fn closing_answers_what_was_sent_then_releases_the_rest(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client().await;
    let first = ingest(&mut client, packet_for("a")).await;
    let second = ingest(&mut client, packet_for("b")).await;
    let mut stream = Consume::open(&mut client, "leaving", 0, 600).await;
    let d1 = stream.delivery().await;
    let d2 = stream.delivery().await;
    assert_eq!(
        (packet_id(&d1), packet_id(&d2)),
        (first.clone(), second.clone())
    );
    // The last mark and the end of the requests go together.
    stream.mark(&[&d1]).await;
    stream.close();
    assert_eq!(stream.answer().await.marked, 1);
    stream.end().await.expect("ends OK");

    // The unmarked one was handed back at once, its delivery counted.
    let mut other = app.client().await;
    let mut next = Consume::open(&mut other, "staying", 0, 0).await;
    let again = next.delivery().await;
    assert_eq!(packet_id(&again), second);
    assert_eq!(again.delivery_attempt, 2);
    next.assert_no_delivery(300).await;
    let p = user_packets(&mut client, "a").await;
    assert_eq!(
        (p[0].status, p[0].delivery_attempts),
        (pb::PacketStatus::Processed as i32, 1)
    );
}

async fn shutdown_ends_the_stream_and_releases_its_leases(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client().await;
    let id = ingest(&mut client, packet_for("u")).await;
    let mut stream = Consume::open(&mut client, "karma", 0, 600).await;
    assert_eq!(stream.delivery().await.delivery_attempt, 1);

    let config = app.config.clone();
    let db = app.stop().await;
    let end = stream.end().await.unwrap_err();
    assert_eq!(end.code(), Code::Unavailable, "told to reconnect");

    // The 10-minute lease was handed back at shutdown: delivered again at once.
    let app = TestApp::spawn_with(db, config).await;
    let mut client = app.client().await;
    let mut stream = Consume::open(&mut client, "karma", 0, 0).await;
    let again = stream.delivery().await;
    assert_eq!(packet_id(&again), id);
    assert_eq!(again.delivery_attempt, 2);
}

/// The stream's own refusals: the settings, and what ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_settings_and_broken_protocol_are_invalid_argument() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut config = test_config(&db);
    config.max_batch = 2;
    let app = TestApp::spawn_with(db, config).await;
    let mut client = app.client().await;

    let bad = pb::ConsumeRequest {
        settings: Some(settings(&"c".repeat(257), 10_001, 3601)),
        ..Default::default()
    };
    let refused = Consume::open_with(&mut client, bad).await.err().unwrap();
    assert_eq!(refused.code(), Code::InvalidArgument);
    let violations: Vec<String> = refused
        .get_details_bad_request()
        .unwrap()
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    assert_eq!(
        violations,
        [
            "settings.consumer",
            "settings.max_in_flight",
            "settings.lease_seconds"
        ]
    );

    let unsettled = Consume::open_with(&mut client, pb::ConsumeRequest::default())
        .await
        .err()
        .unwrap();
    assert_eq!(unsettled.code(), Code::InvalidArgument);
    let violation = &unsettled
        .get_details_bad_request()
        .unwrap()
        .field_violations[0];
    assert_eq!(violation.field, "settings");

    // Settings again, later: answered up to there, then the end.
    let mut stream = Consume::open(&mut client, "karma", 0, 0).await;
    stream
        .send(pb::ConsumeRequest {
            marks: vec![mark("not a token")],
            ..Default::default()
        })
        .await;
    stream
        .send(pb::ConsumeRequest {
            settings: Some(settings("again", 0, 0)),
            ..Default::default()
        })
        .await;
    assert_eq!(stream.answer().await.rejected, 1);
    let end = stream.end().await.unwrap_err();
    assert_eq!(end.code(), Code::InvalidArgument);
    assert_eq!(
        end.get_details_bad_request().unwrap().field_violations[0].field,
        "settings"
    );

    // More items than the batch limit in one request.
    let mut stream = Consume::open(&mut client, "karma", 0, 0).await;
    stream
        .send(pb::ConsumeRequest {
            nack_lease_tokens: vec!["a".into(), "b".into(), "c".into()],
            ..Default::default()
        })
        .await;
    let end = stream.end().await.unwrap_err();
    assert_eq!(end.code(), Code::InvalidArgument);
    let violation = &end.get_details_bad_request().unwrap().field_violations[0];
    assert_eq!(violation.field, "nack_lease_tokens");
    assert!(violation.description.contains("at most 2"), "{violation:?}");
    assert!(status(&mut client).await.consumers.is_empty());
}

/// A request over the size limit after the first ends the stream with
/// RESOURCE_EXHAUSTED, after what came before it is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_ends_the_stream_with_resource_exhausted() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut config = test_config(&db);
    config.max_body_bytes = 16 * 1024;
    let app = TestApp::spawn_with(db, config).await;
    let mut client = app.client().await;
    let mut stream = Consume::open(&mut client, "karma", 0, 0).await;
    stream
        .send(pb::ConsumeRequest {
            marks: vec![mark("not a token")],
            ..Default::default()
        })
        .await;
    stream
        .send(pb::ConsumeRequest {
            marks: vec![pb::ConsumeMark {
                lease_token: "x".repeat(32 * 1024),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await;
    assert_eq!(stream.answer().await.rejected, 1);
    let end = stream.end().await.unwrap_err();
    assert_eq!(end.code(), Code::ResourceExhausted, "{end:?}");
    assert!(status(&mut client).await.consumers.is_empty());
}

/// Consume is a consumer's call, through the client crate as the Karma
/// Tracker makes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_needs_the_consumer_role() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut config = test_config(&db);
    config.auth.ingest_tokens = vec!["browser-token".into()];
    config.auth.consumer_tokens = vec!["karma-token".into()];
    let app = TestApp::spawn_with(db, config).await;
    let subscribe = || bucket_client::pb::ConsumeSettings {
        consumer: "karma".into(),
        max_in_flight: 4,
        lease_seconds: 0,
    };
    for (token, expected) in [
        (None, Code::Unauthenticated),
        (Some("guess"), Code::Unauthenticated),
        (Some("browser-token"), Code::PermissionDenied),
    ] {
        let mut client = bucket_client::connect(&app.url(), token).await.unwrap();
        let refused = bucket_client::consume(&mut client, subscribe())
            .await
            .err()
            .expect("refused");
        assert_eq!(refused.code(), expected, "{token:?}");
    }

    let mut browser = bucket_client::connect(&app.url(), Some("browser-token"))
        .await
        .unwrap();
    let id = browser
        .ingest(bucket_client::pb::IngestRequest {
            packet: Some(to_client(packet_for("u"))),
        })
        .await
        .unwrap()
        .into_inner()
        .packet_id;
    let mut karma = bucket_client::connect(&app.url(), Some("karma-token"))
        .await
        .unwrap();
    let (mut consumer, acker) = bucket_client::consume(&mut karma, subscribe())
        .await
        .unwrap();
    let mut answers = Vec::new();
    let delivery = loop {
        match consumer.next().await.unwrap().expect("open") {
            bucket_client::Received::Delivery(d) => break d,
            bucket_client::Received::Answer(a) => answers.push(a),
        }
    };
    assert_eq!(delivery.packet.as_ref().unwrap().packet_id, id);
    acker.ack(&delivery, Vec::new()).await.unwrap();
    drop(acker);
    // The rest: the answer to the mark, then a clean end.
    while let Some(received) = consumer.next().await.unwrap() {
        match received {
            bucket_client::Received::Answer(a) => answers.push(a),
            bucket_client::Received::Delivery(d) => panic!("{d:?}"),
        }
    }
    let marked: u32 = answers.iter().map(|a| a.marked).sum();
    assert_eq!(marked, 1, "{answers:?}");
    assert_eq!(app.db.status_counts().await.get("processed"), Some(&1));
}

/// The server crate's message as the client crate's (the same contract).
fn to_client(p: pb::PacketInput) -> bucket_client::pb::PacketInput {
    use prost::Message;
    bucket_client::pb::PacketInput::decode(p.encode_to_vec().as_slice()).unwrap()
}

/// Issue 16, suspicion 8: a mark whose lease another node granted (a
/// consumer whose stream moved to B, marking what A delivered) recorded
/// attempt 0: the delivery was not counted. The token names the delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mark_with_a_token_through_another_node_counts_the_delivery() {
    let db = TestDb::new(Backend::Redis).await;
    let a = TestApp::spawn_with(db.clone(), test_config(&db)).await;
    let b = TestApp::spawn_with(db.clone(), test_config(&db)).await;
    let mut on_a = a.client().await;
    let mut on_b = b.client().await;
    let mut on_a_stream = Consume::open(&mut on_a, "karma", 1, 0).await;
    let id = ingest(&mut on_b, packet_for("moved")).await;
    let d = on_a_stream.delivery().await;
    assert_eq!((packet_id(&d), d.delivery_attempt), (id, 1));

    let mut on_b_stream = Consume::open(&mut on_b, "karma", 1, 0).await;
    on_b_stream.mark(&[&d]).await;
    let answer = on_b_stream.answer().await;
    assert_eq!((answer.marked, answer.rejected), (1, 0));
    let p = &user_packets(&mut on_b, "moved").await[0];
    assert_eq!(
        (p.status, p.delivery_attempts),
        (pb::PacketStatus::Processed as i32, 1),
        "the marked delivery is counted"
    );
}
