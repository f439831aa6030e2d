//! MarkProcessedBatch: many outcomes in one call, each answered on its own;
//! a mark through any node counts the delivery it marks.
use bucket::proto::bucket::v1 as pb;
use tonic::Code;

use crate::helpers::{
    Backend, TestApp, TestDb, ingest, next, packet_for, status, subscribe, test_config,
    user_packets,
};
use crate::on_every_backend;

on_every_backend!(
    batch_marks_answer_each_item,
    batch_marks_free_stream_slots_and_count_the_delivery
);

fn outcome(r: &pb::MarkProcessedBatchResult) -> &pb::mark_processed_batch_result::Outcome {
    r.outcome.as_ref().expect("every item has an outcome")
}

fn mark(packet_id: &str, success: bool) -> pb::MarkProcessedRequest {
    pb::MarkProcessedRequest {
        packet_id: packet_id.into(),
        success,
        error_message: if success { "" } else { "karma API down" }.into(),
        ..Default::default()
    }
}

async fn batch_marks_answer_each_item(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client().await;
    let a = ingest(&mut client, packet_for("a")).await;
    let b = ingest(&mut client, packet_for("b")).await;
    let unknown = uuid::Uuid::new_v4().to_string();
    let response = client
        .mark_processed_batch(pb::MarkProcessedBatchRequest {
            marks: vec![
                mark(&a, true),
                mark(&b, false),
                mark(&unknown, true),
                mark("not-a-uuid", true),
                // The same packet again in one batch: as if sent after.
                mark(&a, true),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((response.marked, response.rejected), (3, 2));
    let indexes: Vec<u32> = response.results.iter().map(|r| r.index).collect();
    assert_eq!(indexes, [0, 1, 2, 3, 4]);
    use pb::mark_processed_batch_result::Outcome;
    match outcome(&response.results[0]) {
        Outcome::Marked(m) => {
            assert_eq!(
                (m.packet_id.as_str(), m.already_processed),
                (a.as_str(), false)
            );
            assert_eq!(m.message, "Packet marked as processed");
        }
        other => panic!("{other:?}"),
    }
    match outcome(&response.results[1]) {
        Outcome::Marked(m) => assert_eq!(m.message, "Packet marked as failed"),
        other => panic!("{other:?}"),
    }
    match outcome(&response.results[2]) {
        Outcome::Error(e) => assert_eq!(e.code, Code::NotFound as i32),
        other => panic!("{other:?}"),
    }
    match outcome(&response.results[3]) {
        Outcome::Error(e) => {
            assert_eq!(e.code, Code::InvalidArgument as i32);
            assert_eq!(e.field_violations[0].field, "packet_id");
        }
        other => panic!("{other:?}"),
    }
    match outcome(&response.results[4]) {
        Outcome::Marked(m) => assert!(m.already_processed),
        other => panic!("{other:?}"),
    }
    let s = status(&mut client).await;
    assert_eq!((s.processed_packets, s.failed_packets), (1, 1));
    let failed = &user_packets(&mut client, "b").await[0];
    assert_eq!(failed.error_message, "karma API down");

    // Over the batch limit: refused whole, nothing recorded.
    let too_many = (0..=app.config.max_batch)
        .map(|_| mark(&unknown, true))
        .collect();
    let refused = client
        .mark_processed_batch(pb::MarkProcessedBatchRequest { marks: too_many })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
}

async fn batch_marks_free_stream_slots_and_count_the_delivery(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client().await;
    for i in 0..6 {
        ingest(&mut client, packet_for(&format!("u{i}"))).await;
    }
    let mut stream = subscribe(&mut client, "batcher", 3, 0).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(next(&mut stream).await.packet.unwrap().packet_id);
    }
    let response = client
        .mark_processed_batch(pb::MarkProcessedBatchRequest {
            marks: ids.iter().map(|id| mark(id, true)).collect(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.marked, 3);
    // Three slots freed at once: the other three come.
    for _ in 0..3 {
        next(&mut stream).await;
    }
    let s = status(&mut client).await;
    assert_eq!((s.processed_packets, s.leased_packets), (3, 3));
    // The marked delivery is counted in the stored packet.
    let processed = user_packets(&mut client, "u0").await;
    assert_eq!(processed[0].delivery_attempts, 1);
    assert_eq!(processed[0].status, pb::PacketStatus::Processed as i32);
}

/// Issue 16, suspicion 8: MarkProcessed through a node that does not hold
/// the lease (a load balancer sent it to B; A delivered the packet)
/// recorded attempt 0: the delivery was not counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mark_through_another_node_counts_the_delivery() {
    let db = TestDb::new(Backend::Redis).await;
    let a = TestApp::spawn_with(db.clone(), test_config(&db)).await;
    let b = TestApp::spawn_with(db.clone(), test_config(&db)).await;
    let mut on_a = a.client().await;
    let mut on_b = b.client().await;
    let mut stream = subscribe(&mut on_a, "karma", 1, 0).await;
    let id = ingest(&mut on_b, packet_for("elsewhere")).await;
    let d = next(&mut stream).await;
    assert_eq!(
        (d.packet.unwrap().packet_id, d.delivery_attempt),
        (id.clone(), 1)
    );

    let response = on_b
        .mark_processed(mark(&id, true))
        .await
        .unwrap()
        .into_inner();
    assert!(!response.already_processed);
    let p = &user_packets(&mut on_b, "elsewhere").await[0];
    assert_eq!(
        (p.status, p.delivery_attempts),
        (pb::PacketStatus::Processed as i32, 1),
        "the marked delivery is counted"
    );
}
