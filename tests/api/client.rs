//! The bucket-client crate against a secured bucket: its token reaches
//! every call, and its Marker records what a consumer receives.
use bucket_client::{Marker, connect, pb};
use tonic::Code;

use crate::helpers::{Backend, TestApp, TestDb, ingest, packet_for, test_config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_crate_consumes_with_a_token_and_batched_marks() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut config = test_config(&db);
    config.auth.consumer_tokens = vec!["karma-secret".into()];
    let app = TestApp::spawn_with(db.clone(), config).await;
    let mut ingest_client = app.client().await; // ingest stays open here
    let mut sent = Vec::new();
    for i in 0..20 {
        sent.push(ingest(&mut ingest_client, packet_for(&format!("c{i}"))).await);
    }

    let stream_without = connect(&app.url(), None)
        .await
        .unwrap()
        .stream_pending(pb::StreamPendingRequest::default())
        .await;
    assert_eq!(stream_without.unwrap_err().code(), Code::Unauthenticated);

    let mut client = connect(&app.url(), Some("karma-secret")).await.unwrap();
    let mut stream = client
        .stream_pending(pb::StreamPendingRequest {
            consumer: "karma".into(),
            max_in_flight: 8,
            lease_seconds: 30,
        })
        .await
        .unwrap()
        .into_inner();
    let (marker, marking) = Marker::spawn(client.clone(), 8);
    let mut received = Vec::new();
    while received.len() < sent.len() {
        let d = stream.message().await.unwrap().unwrap();
        let id = d.packet.unwrap().packet_id;
        marker
            .mark(pb::MarkProcessedRequest {
                packet_id: id.clone(),
                success: true,
                ..Default::default()
            })
            .await
            .unwrap();
        received.push(id);
    }
    drop(marker);
    marking.await.unwrap().unwrap();
    received.sort();
    sent.sort();
    assert_eq!(received, sent);
    assert_eq!(db.status_counts().await.get("processed"), Some(&20));
}
