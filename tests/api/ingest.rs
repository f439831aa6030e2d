//! Ingest, validation and idempotency.
use bucket::proto::bucket::v1 as pb;
use bucket::proto::json_to_struct;
use serde_json::json;
use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::{
    Backend, TestApp, ingest, next, packet_for, seed_packet, status, subscribe, user_packets,
};
use crate::on_every_backend;

on_every_backend!(
    seed_packet_round_trips_through_stream_and_user_packets,
    every_rule_is_rejected_naming_the_field_and_nothing_is_stored,
    ingest_with_a_client_id_is_idempotent,
    batch_with_one_bad_item_stores_the_rest,
    batch_over_the_limit_is_rejected_whole,
    storage_failure_is_never_acknowledged,
);

async fn seed_packet_round_trips_through_stream_and_user_packets(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client().await;
    let receipt = client
        .ingest(pb::IngestRequest {
            packet: Some(seed_packet()),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(receipt.status, "ingested");
    assert!(receipt.created);
    assert!(receipt.received_at.is_some());

    let mut stream = subscribe(&mut client, "karma", 0, 0).await;
    let delivery = next(&mut stream).await;
    assert_eq!(delivery.delivery_attempt, 1);
    assert!(delivery.lease_expires_at.is_some());
    let p = delivery.packet.unwrap();
    let sent = seed_packet();
    assert_eq!(p.packet_id, receipt.packet_id);
    assert_eq!(p.user_id, "user_123");
    assert_eq!(p.session_id, "session_456");
    assert_eq!(p.lesson_id, "lesson_789");
    assert_eq!(p.system_type, pb::SystemType::Gurukul as i32);
    assert_eq!(p.role, pb::Role::Student as i32);
    assert_eq!(p.client_timestamp, sent.timestamp);
    assert_eq!(p.cognitive_state, "ON_TASK");
    assert_eq!(p.active_seconds, 4.5);
    assert_eq!(p.idle_seconds, 0.3);
    assert_eq!(p.away_seconds, 0.2);
    assert_eq!(p.focus_score, Some(85.0));
    assert_eq!(p.integrity_score, 0.85);
    assert_eq!(p.raw_signals, sent.raw_signals);
    assert_eq!(p.received_at, receipt.received_at);
    assert_eq!(p.status, pb::PacketStatus::Leased as i32);
    assert_eq!(p.delivery_attempts, 1);

    let action = json_to_struct(
        json!({"action": "completing_lessons", "reward": 5, "token": "DharmaPoints"})
            .as_object()
            .unwrap(),
    );
    let marked = client
        .mark_processed(pb::MarkProcessedRequest {
            packet_id: p.packet_id.clone(),
            success: true,
            karma_actions: vec![action.clone()],
            error_message: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(marked.status, "ok");
    assert_eq!(marked.message, "Packet marked as processed");
    assert!(!marked.already_processed);

    let page = client
        .user_packets(pb::UserPacketsRequest {
            user_id: "user_123".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.packets.len(), 1);
    let stored = &page.packets[0];
    assert_eq!(stored.packet_id, p.packet_id);
    assert_eq!(stored.raw_signals, sent.raw_signals);
    assert_eq!(stored.status, pb::PacketStatus::Processed as i32);
    assert!(stored.processed_by_karma);
    let processed_at = stored.processed_at.expect("processed_at");
    assert_eq!(
        processed_at.nanos % 1000,
        0,
        "microseconds, as every store keeps them (before a restart too)"
    );
    assert_eq!(stored.karma_actions, vec![action]);
    assert!(page.next_page_token.is_empty());
}

/// Each case breaks one rule; the BadRequest must name `field`.
fn invalid_cases() -> Vec<(&'static str, pb::PacketInput)> {
    let s = seed_packet;
    let future = prost_types::Timestamp {
        seconds: chrono::Utc::now().timestamp() + 25 * 3600,
        nanos: 0,
    };
    let deep = json!({"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {}}}}}}}}});
    let big = json!({"blob": "x".repeat(16 * 1024)});
    vec![
        (
            "packet.timestamp",
            pb::PacketInput {
                timestamp: None,
                ..s()
            },
        ),
        (
            "packet.timestamp",
            pb::PacketInput {
                timestamp: Some(future),
                ..s()
            },
        ),
        (
            "packet.timestamp",
            pb::PacketInput {
                timestamp: Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: -5,
                }),
                ..s()
            },
        ),
        (
            "packet.cognitive_state",
            pb::PacketInput {
                cognitive_state: String::new(),
                ..s()
            },
        ),
        (
            "packet.state",
            pb::PacketInput {
                cognitive_state: String::new(),
                state: "SLEEPING".into(),
                ..s()
            },
        ),
        (
            "packet.system_type",
            pb::PacketInput {
                system_type: 9,
                ..s()
            },
        ),
        ("packet.role", pb::PacketInput { role: 7, ..s() }),
        (
            "packet.active_seconds",
            pb::PacketInput {
                active_seconds: -0.5,
                idle_seconds: 5.3,
                ..s()
            },
        ),
        (
            "packet.idle_seconds",
            pb::PacketInput {
                idle_seconds: f64::NAN,
                ..s()
            },
        ),
        (
            "packet.active_seconds",
            pb::PacketInput {
                active_seconds: 3.0,
                ..s()
            },
        ),
        (
            "packet.focus_score",
            pb::PacketInput {
                focus_score: Some(100.5),
                ..s()
            },
        ),
        (
            "packet.focus_score",
            pb::PacketInput {
                focus_score: Some(-1.0),
                ..s()
            },
        ),
        (
            "packet.integrity_score",
            pb::PacketInput {
                integrity_score: Some(1.01),
                ..s()
            },
        ),
        (
            "packet.raw_signals",
            pb::PacketInput {
                raw_signals: None,
                ..s()
            },
        ),
        (
            "packet.raw_signals",
            pb::PacketInput {
                raw_signals: Some(json_to_struct(deep.as_object().unwrap())),
                ..s()
            },
        ),
        (
            "packet.raw_signals",
            pb::PacketInput {
                raw_signals: Some(json_to_struct(big.as_object().unwrap())),
                ..s()
            },
        ),
        (
            "packet.user_id",
            pb::PacketInput {
                user_id: "u".repeat(257),
                ..s()
            },
        ),
        (
            "packet.session_id",
            pb::PacketInput {
                session_id: "s".repeat(257),
                ..s()
            },
        ),
        (
            "packet.lesson_id",
            pb::PacketInput {
                lesson_id: "l".repeat(257),
                ..s()
            },
        ),
        (
            "packet.employee_id",
            pb::PacketInput {
                employee_id: "e".repeat(257),
                ..s()
            },
        ),
        (
            "packet.cognitive_state",
            pb::PacketInput {
                cognitive_state: "C".repeat(257),
                ..s()
            },
        ),
        (
            "packet.packet_id",
            pb::PacketInput {
                packet_id: "not-a-uuid".into(),
                ..s()
            },
        ),
    ]
}

async fn every_rule_is_rejected_naming_the_field_and_nothing_is_stored(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client().await;
    for (field, packet) in invalid_cases() {
        let err = client
            .ingest(pb::IngestRequest {
                packet: Some(packet),
            })
            .await
            .expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        let bad = err
            .get_details_bad_request()
            .unwrap_or_else(|| panic!("{field}: no BadRequest"));
        let named: Vec<&str> = bad
            .field_violations
            .iter()
            .map(|v| v.field.as_str())
            .collect();
        assert!(named.contains(&field), "{field} not named in {named:?}");
    }
    let missing = client
        .ingest(pb::IngestRequest { packet: None })
        .await
        .unwrap_err();
    assert_eq!(
        missing.get_details_bad_request().unwrap().field_violations[0].field,
        "packet"
    );

    assert_eq!(status(&mut client).await.total_packets, 0);
    assert!(app.db.status_counts().await.is_empty(), "nothing stored");
}

async fn ingest_with_a_client_id_is_idempotent(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client().await;
    let id = uuid::Uuid::new_v4().to_string();
    let packet = pb::PacketInput {
        packet_id: id.clone(),
        ..seed_packet()
    };
    let first = client
        .ingest(pb::IngestRequest {
            packet: Some(packet.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    let again = client
        .ingest(pb::IngestRequest {
            packet: Some(packet),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.packet_id, id);
    assert!(first.created);
    assert_eq!(again.packet_id, id);
    assert!(!again.created);
    assert_eq!(again.received_at, first.received_at);
    assert_eq!(status(&mut client).await.total_packets, 1);

    // Delivered once: the retry queued nothing new.
    let mut stream = subscribe(&mut client, "karma", 0, 0).await;
    assert_eq!(next(&mut stream).await.packet.unwrap().packet_id, id);
    crate::helpers::assert_quiet(&mut stream, 300).await;
}

async fn batch_with_one_bad_item_stores_the_rest(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client().await;
    let bad = pb::PacketInput {
        focus_score: Some(250.0),
        ..seed_packet()
    };
    let packets = vec![packet_for("a"), bad, packet_for("b")];
    let response = client
        .ingest_batch(pb::IngestBatchRequest { packets })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((response.ingested, response.rejected), (2, 1));
    assert_eq!(response.results.len(), 3);
    use pb::ingest_batch_result::Outcome;
    for (i, result) in response.results.iter().enumerate() {
        assert_eq!(result.index as usize, i);
        match (i, result.outcome.as_ref().unwrap()) {
            (1, Outcome::Error(e)) => {
                assert_eq!(e.code, Code::InvalidArgument as i32);
                assert_eq!(e.field_violations[0].field, "focus_score");
            }
            (0 | 2, Outcome::Ingested(r)) => assert!(r.created),
            other => panic!("unexpected {other:?}"),
        }
    }
    let s = status(&mut client).await;
    assert_eq!((s.total_packets, s.pending_packets), (2, 2));
}

async fn batch_over_the_limit_is_rejected_whole(backend: Backend) {
    let db = crate::helpers::TestDb::new(backend).await;
    let mut config = crate::helpers::test_config(&db);
    config.max_batch = 3;
    let app = TestApp::spawn_with(db, config).await;
    let mut client = app.client().await;
    let err = client
        .ingest_batch(pb::IngestBatchRequest {
            packets: vec![seed_packet(); 4],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.get_details_bad_request().unwrap().field_violations[0].field,
        "packets"
    );
    assert_eq!(status(&mut client).await.total_packets, 0);
    // Exactly the limit is fine.
    let ok = client
        .ingest_batch(pb::IngestBatchRequest {
            packets: vec![seed_packet(); 3],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.ingested, 3);
}

async fn storage_failure_is_never_acknowledged(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client().await;
    let kept = ingest(&mut client, packet_for("before")).await;

    app.db.break_storage().await;
    for _ in 0..3 {
        let err = client
            .ingest(pb::IngestRequest {
                packet: Some(packet_for("during")),
            })
            .await
            .expect_err("no success without a commit");
        assert!(
            matches!(err.code(), Code::Unavailable | Code::Internal),
            "{err:?}"
        );
    }
    app.db.mend_storage().await;

    // Back in service; only acknowledged packets exist.
    let after = ingest(&mut client, packet_for("after")).await;
    assert_eq!(user_packets(&mut client, "before").await[0].packet_id, kept);
    assert!(user_packets(&mut client, "during").await.is_empty());
    assert_eq!(user_packets(&mut client, "after").await[0].packet_id, after);
    assert_eq!(status(&mut client).await.total_packets, 2);
}
