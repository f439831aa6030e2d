//! The original bucket's five REST paths, unchanged in paths and JSON
//! shapes, over the same application code as gRPC. Translate only.
use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::error::detail;
use crate::bucket::{Bucket, MarkRequest, Marked};
use crate::delivery::Delivery;
use crate::domain::{DeliveryStatus, FieldViolation, Packet, PacketDraft};
use crate::error::Error;
use crate::store::Inserted;

pub fn router(bucket: Arc<Bucket>) -> Router {
    Router::new()
        .route("/bucket/prana/ingest", post(ingest))
        .route("/bucket/prana/packets/pending", get(pending))
        .route("/bucket/prana/packets/mark-processed", post(mark_processed))
        .route("/bucket/prana/packets/user/{user_id}", get(user_packets))
        .route("/bucket/prana/status", get(status))
        .with_state(bucket)
}

type Body = Result<Json<Value>, JsonRejection>;

/// Malformed JSON (400), wrong content type (415), too large (413): the
/// extractor knows which; answer in FastAPI's `{"detail": ...}` shape.
fn rejected_body(rejection: JsonRejection) -> Response {
    detail(rejection.status(), rejection.body_text())
}

fn time(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn receipt(r: &Inserted) -> Value {
    json!({
        "status": "ingested",
        "packet_id": r.packet_id.to_string(),
        "received_at": time(r.received_at),
    })
}

/// One packet or (ours) a JSON array of packets, answered item by item.
async fn ingest(State(bucket): State<Arc<Bucket>>, raw: Body) -> Response {
    let value = match raw {
        Ok(Json(value)) => value,
        Err(rejection) => return rejected_body(rejection),
    };
    match value {
        Value::Array(items) => {
            let drafts = items.iter().map(PacketDraft::from_json).collect();
            match bucket.ingest_batch(drafts).await {
                Ok(results) => {
                    let answers = results
                        .into_iter()
                        .enumerate()
                        .map(|(i, result)| match result {
                            Ok(r) => receipt(&r),
                            Err(e) => rejected(e, i),
                        })
                        .collect();
                    Json(Value::Array(answers)).into_response()
                }
                Err(e) => e.prefixed("body.").into_response(),
            }
        }
        one => match bucket.ingest(PacketDraft::from_json(&one)).await {
            Ok(r) => Json(receipt(&r)).into_response(),
            Err(e) => e.prefixed("body.").into_response(),
        },
    }
}

/// One rejected item of an array ingest, in the 422 shape.
fn rejected(e: Error, index: usize) -> Value {
    let detail: Vec<Value> = match &e {
        Error::InvalidInput(vs) => vs
            .iter()
            .map(|v| {
                let mut loc = vec![json!("body"), json!(index)];
                loc.extend(
                    v.field
                        .split('.')
                        .filter(|f| !f.is_empty())
                        .map(|f| json!(f)),
                );
                json!({"loc": loc, "msg": v.description, "type": "value_error"})
            })
            .collect(),
        Error::NotFound(_) => {
            vec![json!({"loc": ["body", index], "msg": e.to_string(), "type": "not_found"})]
        }
        other => {
            vec![json!({"loc": ["body", index], "msg": other.to_string(), "type": "storage_error"})]
        }
    };
    json!({"status": "rejected", "detail": detail})
}

/// A query parameter as an integer within bounds, else a 422 naming it.
fn int_param(
    query: &HashMap<String, String>,
    name: &str,
    default: u32,
    range: std::ops::RangeInclusive<u32>,
) -> Result<u32, FieldViolation> {
    let Some(raw) = query.get(name) else {
        return Ok(default);
    };
    raw.parse::<u32>()
        .ok()
        .filter(|n| range.contains(n))
        .ok_or_else(|| {
            FieldViolation::new(
                format!("query.{name}"),
                format!(
                    "{name} must be an integer from {} to {}",
                    range.start(),
                    range.end()
                ),
            )
        })
}

fn bool_param(query: &HashMap<String, String>, name: &str) -> Result<bool, FieldViolation> {
    match query.get(name).map(|s| s.to_ascii_lowercase()).as_deref() {
        None | Some("false" | "0" | "no" | "off") => Ok(false),
        Some("true" | "1" | "yes" | "on") => Ok(true),
        Some(_) => Err(FieldViolation::new(
            format!("query.{name}"),
            format!("{name} must be true or false"),
        )),
    }
}

fn packet_json(packet: &Packet, received_at: DateTime<Utc>) -> Map<String, Value> {
    let mut out = Map::new();
    out.insert("packet_id".into(), json!(packet.packet_id.to_string()));
    out.insert("user_id".into(), json!(packet.user_id));
    out.insert("session_id".into(), json!(packet.session_id));
    out.insert("lesson_id".into(), json!(packet.lesson_id));
    out.insert("cognitive_state".into(), json!(packet.cognitive_state));
    out.insert("focus_score".into(), json!(packet.focus_score));
    out.insert("active_seconds".into(), json!(packet.active_seconds));
    out.insert("idle_seconds".into(), json!(packet.idle_seconds));
    out.insert("away_seconds".into(), json!(packet.away_seconds));
    out.insert("received_at".into(), json!(time(received_at)));
    out
}

/// Leases up to `limit` packets, like StreamPending: unmarked ones come back
/// after the lease (the original popped them and lost them on a crash).
async fn pending(
    State(bucket): State<Arc<Bucket>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let params = int_param(&query, "limit", 10, 1..=100)
        .and_then(|limit| Ok((limit, int_param(&query, "lease_seconds", 0, 1..=3600)?)));
    let (limit, lease_seconds) = match params {
        Ok(p) => p,
        Err(v) => return Error::InvalidInput(vec![v]).into_response(),
    };
    let deliveries = match bucket.lease_pending(limit, lease_seconds).await {
        Ok(d) => d,
        Err(e) => return e.into_response(),
    };
    let queue_size = bucket.status().await.map(|s| s.queue_size).unwrap_or(0);
    let packets: Vec<Value> = deliveries.iter().map(delivered_json).collect();
    Json(json!({"count": packets.len(), "packets": packets, "queue_size": queue_size}))
        .into_response()
}

fn delivered_json(d: &Delivery) -> Value {
    let packet = &d.packet;
    let mut out = packet_json(packet, d.received_at);
    out.insert("system_type".into(), json!(packet.system_type));
    out.insert(
        "raw_signals".into(),
        Value::Object(packet.raw_signals.clone()),
    );
    out.insert(
        "client_timestamp".into(),
        json!(time(packet.client_timestamp)),
    );
    out.insert("delivery_attempt".into(), json!(d.attempt));
    out.insert("lease_expires_at".into(), json!(time(d.lease_expires_at)));
    Value::Object(out)
}

#[derive(Deserialize)]
struct MarkBody {
    packet_id: Value,
    #[serde(default = "yes")]
    success: Value,
    #[serde(default)]
    karma_actions: Option<Vec<Value>>,
    #[serde(default)]
    error_message: Option<Value>,
}

fn yes() -> Value {
    Value::Bool(true)
}

/// One mark body; type errors name the field relative to the body.
fn mark_request(value: Value) -> Result<MarkRequest, Error> {
    let body: MarkBody =
        serde_json::from_value(value).map_err(|e| Error::invalid("", e.to_string()))?;
    let mut violations = Vec::new();
    let packet_id = match body.packet_id {
        Value::String(s) => s,
        _ => {
            violations.push(FieldViolation::new(
                "packet_id",
                "packet_id must be a string",
            ));
            String::new()
        }
    };
    let success = body.success.as_bool().unwrap_or_else(|| {
        violations.push(FieldViolation::new(
            "success",
            "success must be true or false",
        ));
        true
    });
    let error_message = match body.error_message {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(_) => {
            violations.push(FieldViolation::new(
                "error_message",
                "error_message must be a string",
            ));
            None
        }
    };
    if !violations.is_empty() {
        return Err(Error::InvalidInput(violations));
    }
    Ok(MarkRequest {
        packet_id,
        success,
        karma_actions: body.karma_actions.unwrap_or_default(),
        error_message,
    })
}

fn marked_json(marked: &Marked) -> Value {
    json!({
        "status": "ok",
        "message": marked.message(),
        "packet_id": marked.packet_id.to_string(),
        "already_processed": marked.already_processed,
    })
}

/// One outcome, or (ours) a JSON array of outcomes answered item by item.
async fn mark_processed(State(bucket): State<Arc<Bucket>>, raw: Body) -> Response {
    let value = match raw {
        Ok(Json(value)) => value,
        Err(rejection) => return rejected_body(rejection),
    };
    match value {
        Value::Array(items) => {
            // Bad items are answered here; the rest go to the bucket together.
            let mut valid = Vec::new();
            let parsed: Vec<Result<(), Error>> = items
                .into_iter()
                .map(|item| mark_request(item).map(|request| valid.push(request)))
                .collect();
            let mut outcomes = match bucket.mark_processed_batch(valid).await {
                Ok(outcomes) => outcomes.into_iter(),
                Err(e) => return e.prefixed("body.").into_response(),
            };
            let answers = parsed
                .into_iter()
                .enumerate()
                .map(|(i, item)| {
                    match item.and_then(|()| outcomes.next().expect("one outcome per valid mark")) {
                        Ok(marked) => marked_json(&marked),
                        Err(e) => rejected(e, i),
                    }
                })
                .collect();
            Json(Value::Array(answers)).into_response()
        }
        one => {
            let marked = match mark_request(one) {
                Ok(request) => bucket.mark_processed(request).await,
                Err(e) => Err(e),
            };
            match marked {
                Ok(marked) => Json(marked_json(&marked)).into_response(),
                Err(e) => e.prefixed("body.").into_response(),
            }
        }
    }
}

/// Newest first. `processed_only=true`: processed packets; otherwise all
/// (the original returned only unprocessed ones by mistake).
async fn user_packets(
    State(bucket): State<Arc<Bucket>>,
    Path(user_id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let params = int_param(&query, "limit", 50, 1..=500)
        .and_then(|limit| Ok((limit, bool_param(&query, "processed_only")?)));
    let (limit, processed_only) = match params {
        Ok(p) => p,
        Err(v) => return Error::InvalidInput(vec![v]).into_response(),
    };
    let filter = processed_only.then_some(DeliveryStatus::Processed);
    match bucket.user_packets(&user_id, limit, filter, "").await {
        Ok(page) => {
            let list: Vec<Value> = page
                .packets
                .iter()
                .map(|p| {
                    let mut out = packet_json(&p.packet, p.received_at);
                    out.insert("processed_at".into(), json!(p.processed_at.map(time)));
                    out.insert("processed_by_karma".into(), json!(p.processed_by_karma));
                    out.insert("karma_actions".into(), json!(p.karma_actions));
                    out.insert("status".into(), json!(p.status.as_str()));
                    Value::Object(out)
                })
                .collect();
            Json(Value::Array(list)).into_response()
        }
        Err(e) => e.prefixed("path.").into_response(),
    }
}

async fn status(State(bucket): State<Arc<Bucket>>) -> Response {
    match bucket.status().await {
        Ok(s) => Json(json!({
            "queue_size": s.queue_size,
            "redis_connected": s.redis_connected,
            "model_available": false,
            "total_packets": s.counts.total(),
            "processed_packets": s.counts.processed,
            "pending_packets": s.counts.pending,
            "leased_packets": s.counts.leased,
            "failed_packets": s.counts.failed,
            "dead_letter_packets": s.counts.dead_letter,
            "consumers": s.consumers.iter().map(|c| json!({
                "consumer": c.consumer,
                "in_flight": c.in_flight,
                "max_in_flight": c.max_in_flight,
                "connected_at": time(c.connected_at),
            })).collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(e) => e.into_response(),
    }
}
