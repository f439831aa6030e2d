//! The JSON gateway: the seed's five paths, shapes and status codes.
use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{Backend, TestApp, TestDb, status, test_config};

/// The seed document's curl example.
fn seed_json() -> Value {
    json!({
        "user_id": "user_123",
        "session_id": "session_456",
        "lesson_id": "lesson_789",
        "system_type": "gurukul",
        "role": "student",
        "timestamp": "2024-01-20T10:30:00Z",
        "cognitive_state": "ON_TASK",
        "active_seconds": 4.5,
        "idle_seconds": 0.3,
        "away_seconds": 0.2,
        "focus_score": 85.0,
        "raw_signals": {"dwell_time_ms": 1200, "mouse_velocity": 0.5}
    })
}

fn api(app: &TestApp, path: &str) -> String {
    format!("{}/api/v1/bucket/prana{path}", app.url())
}

async fn post(url: &str, body: &Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(url)
        .json(body)
        .send()
        .await
        .unwrap();
    let code = response.status().as_u16();
    (code, response.json().await.unwrap())
}

async fn get(url: &str) -> (u16, Value) {
    let response = reqwest::get(url).await.unwrap();
    let code = response.status().as_u16();
    (code, response.json().await.unwrap())
}

fn keys(v: &Value) -> Vec<&str> {
    let mut k: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    k.sort();
    k
}

fn is_rfc3339(v: &Value) -> bool {
    v.as_str()
        .is_some_and(|s| chrono::DateTime::parse_from_rfc3339(s).is_ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_flow_over_rest() {
    let app = TestApp::spawn(Backend::Sqlite).await;

    let (code, ingested) = post(&api(&app, "/ingest"), &seed_json()).await;
    assert_eq!(code, 200);
    assert_eq!(keys(&ingested), ["packet_id", "received_at", "status"]);
    assert_eq!(ingested["status"], "ingested");
    let id = ingested["packet_id"].as_str().unwrap().to_owned();
    assert!(uuid::Uuid::try_parse(&id).is_ok());
    assert!(is_rfc3339(&ingested["received_at"]));

    let (code, pending) = get(&api(&app, "/packets/pending?limit=10")).await;
    assert_eq!(code, 200);
    assert_eq!(keys(&pending), ["count", "packets", "queue_size"]);
    assert_eq!(pending["count"], 1);
    assert_eq!(pending["queue_size"], 0);
    let p = &pending["packets"][0];
    for key in [
        "packet_id",
        "user_id",
        "session_id",
        "lesson_id",
        "system_type",
        "cognitive_state",
        "focus_score",
        "active_seconds",
        "idle_seconds",
        "away_seconds",
        "raw_signals",
        "client_timestamp",
        "received_at",
    ] {
        assert!(p.get(key).is_some(), "pending packet lacks {key}: {p}");
    }
    assert_eq!(p["packet_id"], id);
    assert_eq!(p["user_id"], "user_123");
    assert_eq!(p["session_id"], "session_456");
    assert_eq!(p["lesson_id"], "lesson_789");
    assert_eq!(p["system_type"], "gurukul");
    assert_eq!(p["cognitive_state"], "ON_TASK");
    assert_eq!(p["focus_score"], 85.0);
    assert_eq!(
        (
            p["active_seconds"].clone(),
            p["idle_seconds"].clone(),
            p["away_seconds"].clone()
        ),
        (json!(4.5), json!(0.3), json!(0.2))
    );
    assert_eq!(
        p["raw_signals"],
        json!({"dwell_time_ms": 1200, "mouse_velocity": 0.5})
    );
    assert!(is_rfc3339(&p["client_timestamp"]));
    assert_eq!(p["received_at"], ingested["received_at"]);
    assert_eq!(p["delivery_attempt"], 1);

    // Leased, not popped: a second poll does not hand it out again.
    let (_, again) = get(&api(&app, "/packets/pending?limit=10")).await;
    assert_eq!(again["count"], 0);

    let actions = json!([{"action": "completing_lessons", "reward": 5, "token": "DharmaPoints"}]);
    let (code, marked) = post(
        &api(&app, "/packets/mark-processed"),
        &json!({"packet_id": id, "karma_actions": actions}),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(marked["status"], "ok");
    assert_eq!(marked["message"], "Packet marked as processed");
    assert_eq!(marked["packet_id"], id);

    let (code, mine) = get(&api(&app, "/packets/user/user_123?limit=50")).await;
    assert_eq!(code, 200);
    let list = mine.as_array().unwrap();
    assert_eq!(list.len(), 1);
    let u = &list[0];
    for key in [
        "packet_id",
        "user_id",
        "session_id",
        "lesson_id",
        "cognitive_state",
        "focus_score",
        "active_seconds",
        "idle_seconds",
        "away_seconds",
        "received_at",
        "processed_at",
        "processed_by_karma",
        "karma_actions",
    ] {
        assert!(u.get(key).is_some(), "user packet lacks {key}: {u}");
    }
    assert_eq!(u["processed_by_karma"], true);
    assert!(is_rfc3339(&u["processed_at"]));
    assert_eq!(u["karma_actions"], actions);

    let (code, s) = get(&api(&app, "/status")).await;
    assert_eq!(code, 200);
    for key in [
        "queue_size",
        "redis_connected",
        "model_available",
        "total_packets",
        "processed_packets",
        "pending_packets",
    ] {
        assert!(s.get(key).is_some(), "status lacks {key}");
    }
    assert_eq!(
        (
            s["total_packets"].clone(),
            s["processed_packets"].clone(),
            s["pending_packets"].clone()
        ),
        (json!(1), json!(1), json!(0))
    );
    assert_eq!(s["redis_connected"], false);
    assert_eq!(s["model_available"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polled_packets_come_back_when_not_marked() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let (_, ingested) = post(&api(&app, "/ingest"), &seed_json()).await;
    let (_, first) = get(&api(&app, "/packets/pending?limit=5&lease_seconds=1")).await;
    assert_eq!(first["count"], 1);
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let (_, again) = get(&api(&app, "/packets/pending?limit=5")).await;
    assert_eq!(
        again["count"], 1,
        "the crashed poller's packet is handed out again"
    );
    assert_eq!(again["packets"][0]["packet_id"], ingested["packet_id"]);
    assert_eq!(again["packets"][0]["delivery_attempt"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_path_filters_processed_only_and_otherwise_lists_all() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(post(&api(&app, "/ingest"), &seed_json()).await.1["packet_id"].clone());
    }
    post(
        &api(&app, "/packets/mark-processed"),
        &json!({"packet_id": ids[1]}),
    )
    .await;
    let (_, all) = get(&api(&app, "/packets/user/user_123")).await;
    let all: Vec<Value> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["packet_id"].clone())
        .collect();
    assert_eq!(
        all,
        [ids[2].clone(), ids[1].clone(), ids[0].clone()],
        "all, newest first"
    );
    let (_, processed) = get(&api(&app, "/packets/user/user_123?processed_only=true")).await;
    let processed: Vec<Value> = processed
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["packet_id"].clone())
        .collect();
    assert_eq!(processed, [ids[1].clone()]);
    let (_, limited) = get(&api(&app, "/packets/user/user_123?limit=2")).await;
    assert_eq!(limited.as_array().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_array_ingest_answers_each_item() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let mut bad = seed_json();
    bad["focus_score"] = json!(250);
    let (code, answers) = post(
        &api(&app, "/ingest"),
        &json!([seed_json(), bad, seed_json()]),
    )
    .await;
    assert_eq!(code, 200);
    let answers = answers.as_array().unwrap();
    assert_eq!(answers.len(), 3);
    assert_eq!(answers[0]["status"], "ingested");
    assert_eq!(answers[1]["status"], "rejected");
    assert_eq!(
        answers[1]["detail"][0]["loc"],
        json!(["body", 1, "focus_score"])
    );
    assert_eq!(answers[2]["status"], "ingested");
    let mut client = app.client().await;
    assert_eq!(status(&mut client).await.total_packets, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_array_mark_answers_each_item() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let (_, ingested) = post(&api(&app, "/ingest"), &json!([seed_json(), seed_json()])).await;
    let a = ingested[0]["packet_id"].clone();
    let b = ingested[1]["packet_id"].clone();
    let unknown = uuid::Uuid::new_v4().to_string();
    let (code, answers) = post(
        &api(&app, "/packets/mark-processed"),
        &json!([
            {"packet_id": a, "success": true, "karma_actions": [{"action": "completing_lessons", "reward": 5}]},
            {"packet_id": b, "success": "maybe"},
            {"packet_id": unknown},
            {"packet_id": b, "success": false, "error_message": "karma API down"},
            {"packet_id": a},
        ]),
    )
    .await;
    assert_eq!(code, 200);
    let answers = answers.as_array().unwrap();
    assert_eq!(answers.len(), 5);
    assert_eq!(answers[0]["message"], "Packet marked as processed");
    assert_eq!(answers[0]["already_processed"], false);
    assert_eq!(answers[1]["status"], "rejected");
    assert_eq!(
        answers[1]["detail"][0]["loc"],
        json!(["body", 1, "success"])
    );
    assert_eq!(answers[2]["status"], "rejected");
    assert_eq!(answers[2]["detail"][0]["type"], "not_found");
    assert_eq!(answers[3]["message"], "Packet marked as failed");
    assert_eq!(answers[4]["already_processed"], true);
    let mut client = app.client().await;
    let s = status(&mut client).await;
    assert_eq!((s.processed_packets, s.failed_packets), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_maps_to_its_status() {
    let db = TestDb::new(Backend::Postgres).await;
    let mut config = test_config(&db);
    config.max_body_bytes = 64 * 1024;
    let app = TestApp::spawn_with(db.clone(), config).await;
    let http = reqwest::Client::new();

    // Validation: 422 naming each field, FastAPI's shape.
    let mut bad = seed_json();
    bad["focus_score"] = json!(101);
    bad["role"] = json!("teacher");
    let (code, body) = post(&api(&app, "/ingest"), &bad).await;
    assert_eq!(code, 422);
    let locs: Vec<Value> = body["detail"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["loc"].clone())
        .collect();
    assert!(locs.contains(&json!(["body", "focus_score"])), "{body}");
    assert!(locs.contains(&json!(["body", "role"])), "{body}");
    for d in body["detail"].as_array().unwrap() {
        assert!(d["msg"].is_string() && d["type"].is_string());
    }
    let mut wrong_type = seed_json();
    wrong_type["active_seconds"] = json!("4.5");
    wrong_type["focus_score"] = json!(101);
    let (code, body) = post(&api(&app, "/ingest"), &wrong_type).await;
    // A type error and a rule error, both in one answer, one entry each.
    let locs: Vec<Value> = body["detail"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["loc"].clone())
        .collect();
    assert_eq!(code, 422);
    assert_eq!(
        locs,
        [
            json!(["body", "active_seconds"]),
            json!(["body", "focus_score"])
        ],
        "{body}"
    );
    let (code, body) = get(&api(&app, "/packets/pending?limit=101")).await;
    assert_eq!(
        (code, body["detail"][0]["loc"].clone()),
        (422, json!(["query", "limit"]))
    );
    let (code, body) = get(&api(&app, "/packets/user/u?limit=abc")).await;
    assert_eq!(
        (code, body["detail"][0]["loc"].clone()),
        (422, json!(["query", "limit"]))
    );
    let (code, body) = post(
        &api(&app, "/packets/mark-processed"),
        &json!({"packet_id": "nope"}),
    )
    .await;
    assert_eq!(
        (code, body["detail"][0]["loc"].clone()),
        (422, json!(["body", "packet_id"]))
    );

    // Unknown packet: 404.
    let (code, body) = post(
        &api(&app, "/packets/mark-processed"),
        &json!({"packet_id": uuid::Uuid::new_v4()}),
    )
    .await;
    assert_eq!(code, 404);
    assert!(body["detail"].is_string());

    // Malformed JSON 400, wrong content type 415, too large 413.
    let send = |body: &'static str, content_type: &'static str| {
        http.post(api(&app, "/ingest"))
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    assert_eq!(
        send("{not json", "application/json")
            .await
            .unwrap()
            .status()
            .as_u16(),
        400
    );
    assert_eq!(
        send("{}", "text/plain").await.unwrap().status().as_u16(),
        415
    );
    let huge = json!({"raw_signals": {"blob": "x".repeat(100 * 1024)}});
    let response = http
        .post(api(&app, "/ingest"))
        .json(&huge)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 413);

    // Storage down: 503, and readiness says so.
    db.break_storage().await;
    let (code, body) = post(&api(&app, "/ingest"), &seed_json()).await;
    assert_eq!(code, 503, "{body}");
    let ready = reqwest::get(format!("{}/readyz", app.url())).await.unwrap();
    assert_eq!(ready.status().as_u16(), 503);
    assert_eq!(
        reqwest::get(format!("{}/healthz", app.url()))
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    db.mend_storage().await;
    let (code, _) = post(&api(&app, "/ingest"), &seed_json()).await;
    assert_eq!(code, 200);
    assert_eq!(
        reqwest::get(format!("{}/readyz", app.url()))
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );

    let (code, _) = get(&format!("{}/api/v1/nowhere", app.url())).await;
    assert_eq!(code, 404);
}
