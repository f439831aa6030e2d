//! The original bucket's five REST paths, unchanged in paths and JSON
//! shapes, over the same application code as gRPC. Translate only.
//!
//! Each answer is a struct whose fields serialize in the order `json!`
//! wrote them (alphabetical), so the bytes are the seed's; the same structs
//! describe the answers in the OpenAPI document (`openapi.rs`).
use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::body::{Parsed, Shape};
use super::error::{ErrorMessage, HTTPValidationError, Loc, ValidationError, detail};
use super::openapi::{IngestBody, MarkBodies};
use crate::auth::Caller;
use crate::bucket::{Bucket, Marked};
use crate::delivery::Delivery;
use crate::domain::lease::{DEFAULT_POLL, MAX_LEASE_SECONDS, MAX_POLL};
use crate::domain::mark::MarkRequest;
use crate::domain::user_page::{DEFAULT_USER_LIMIT, MAX_USER_LIMIT};
use crate::domain::{DeliveryStatus, FieldViolation, Packet, SystemType};
use crate::error::Error;
use crate::store::{Inserted, StoredPacket};

pub fn router(bucket: Arc<Bucket>) -> Router {
    Router::new()
        .route("/bucket/prana/ingest", post(ingest))
        .route("/bucket/prana/packets/pending", get(pending))
        .route("/bucket/prana/packets/mark-processed", post(mark_processed))
        .route("/bucket/prana/packets/user/{user_id}", get(user_packets))
        .route("/bucket/prana/status", get(status))
        .with_state(bucket)
}

/// A JSON body as sent, read by `super::body` with its lists bounded.
pub(super) type Body = Result<Bytes, BytesRejection>;
type Params = Result<Query<HashMap<String, String>>, QueryRejection>;

/// A query string the extractor refuses: 400 in the same shape (plain
/// text would match no documented answer).
fn bad_query(rejection: QueryRejection) -> Response {
    detail(StatusCode::BAD_REQUEST, rejection.body_text())
}

fn time(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// `"ingested"`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum IngestedTag {
    Ingested,
}

/// `"ok"`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OkTag {
    Ok,
}

/// `"rejected"`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RejectedTag {
    Rejected,
}

/// A stored packet's receipt (also for a retry of a stored `packet_id`).
#[derive(Debug, Serialize, ToSchema)]
pub struct Receipt {
    #[schema(format = "uuid")]
    pub packet_id: String,
    #[schema(format = DateTime)]
    pub received_at: String,
    pub status: IngestedTag,
}

impl From<&Inserted> for Receipt {
    fn from(r: &Inserted) -> Self {
        Receipt {
            packet_id: r.packet_id.text(),
            received_at: time(r.received_at),
            status: IngestedTag::Ingested,
        }
    }
}

/// One item of a JSON array that was not accepted, with FastAPI's
/// `detail` (each `loc` starts `["body", index]`).
#[derive(Debug, Serialize, ToSchema)]
pub struct Rejected {
    pub detail: Vec<ValidationError>,
    pub status: RejectedTag,
}

/// One packet's receipt, or one answer per item of a JSON array.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum IngestAnswer {
    One(Receipt),
    Many(Vec<IngestItem>),
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum IngestItem {
    Ingested(Receipt),
    Rejected(Rejected),
}

/// One packet or (ours) a JSON array of packets, answered item by item.
#[utoipa::path(
    post,
    path = "/api/v1/bucket/prana/ingest",
    tag = "gateway",
    request_body(
        content = IngestBody,
        content_type = "application/json",
        description = "One packet, or a JSON array of at most 500 (BUCKET_MAX_BATCH) packets"
    ),
    responses(
        (status = 200, description = "The packet's receipt; for an array, one answer per item \
            (a receipt, or `rejected` with the item's violations)", body = IngestAnswer),
        (status = 400, description = "Malformed JSON", body = ErrorMessage),
        (status = 413, description = "Body over BUCKET_MAX_BODY_BYTES", body = ErrorMessage),
        (status = 415, description = "Content type is not application/json", body = ErrorMessage),
        (status = 422, description = "An invalid packet (every violated field named), or an \
            array over the batch limit (`loc` `[\"body\"]`)", body = HTTPValidationError),
        (status = 500, description = "Internal error", body = ErrorMessage),
        (status = 503, description = "Storage is unavailable; nothing was stored", body = ErrorMessage),
    )
)]
pub(super) async fn ingest(
    State(bucket): State<Arc<Bucket>>,
    headers: HeaderMap,
    raw: Body,
) -> Response {
    // An array over the limit is refused whole, naming it, before any item
    // is built.
    let parsed = match super::body::read(&headers, raw, Shape::ItemOrArray, bucket.max_batch()) {
        Ok(parsed) => parsed,
        Err(refused) => return *refused,
    };
    match parsed {
        Parsed::Many(items) => {
            let drafts = items.iter().map(super::draft).collect();
            match bucket.ingest_batch(drafts).await {
                Ok(results) => {
                    let answers = results
                        .into_iter()
                        .enumerate()
                        .map(|(i, result)| match result {
                            Ok(r) => IngestItem::Ingested(Receipt::from(&r)),
                            Err(e) => IngestItem::Rejected(rejected(e, i)),
                        })
                        .collect();
                    Json(IngestAnswer::Many(answers)).into_response()
                }
                Err(e) => e.prefixed("body.").into_response(),
            }
        }
        Parsed::One(one) => match bucket.ingest(super::draft(&one)).await {
            Ok(r) => Json(IngestAnswer::One(Receipt::from(&r))).into_response(),
            Err(e) => e.prefixed("body.").into_response(),
        },
    }
}

/// One rejected item of a JSON array, in the 422 shape.
fn rejected(e: Error, index: usize) -> Rejected {
    let at = || vec![Loc::Name("body".to_owned()), Loc::Index(index)];
    let detail = match &e {
        Error::InvalidInput(vs) => vs
            .iter()
            .map(|v| ValidationError::at(at(), &v.field, v.description.clone(), "value_error"))
            .collect(),
        Error::NotFound(_) => vec![ValidationError::at(at(), "", e.to_string(), "not_found")],
        other => vec![ValidationError::at(
            at(),
            "",
            other.to_string(),
            "storage_error",
        )],
    };
    Rejected {
        detail,
        status: RejectedTag::Rejected,
    }
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

/// The page of `packets/pending`.
#[derive(Debug, Serialize, ToSchema)]
pub struct PendingPage {
    pub count: usize,
    pub packets: Vec<LeasedPacket>,
    /// Packets still pending after this poll.
    pub queue_size: u64,
}

/// A packet leased to the poller until `lease_expires_at`.
#[derive(Debug, Serialize, ToSchema)]
pub struct LeasedPacket {
    pub active_seconds: f64,
    pub away_seconds: f64,
    #[schema(format = DateTime)]
    pub client_timestamp: String,
    pub cognitive_state: String,
    /// 1 for the first delivery, one more after each lease ended unmarked.
    pub delivery_attempt: u32,
    pub focus_score: Option<f64>,
    pub idle_seconds: f64,
    #[schema(format = DateTime)]
    pub lease_expires_at: String,
    pub lesson_id: Option<String>,
    #[schema(format = "uuid")]
    pub packet_id: String,
    #[schema(value_type = Object)]
    pub raw_signals: Map<String, Value>,
    #[schema(format = DateTime)]
    pub received_at: String,
    pub session_id: Option<String>,
    #[schema(value_type = Option<String>)]
    pub system_type: Option<SystemType>,
    pub user_id: String,
}

impl From<&Delivery> for LeasedPacket {
    fn from(d: &Delivery) -> Self {
        let p: &Packet = &d.packet;
        LeasedPacket {
            active_seconds: p.active_seconds,
            away_seconds: p.away_seconds,
            client_timestamp: time(p.client_timestamp),
            cognitive_state: p.cognitive_state.clone(),
            delivery_attempt: d.attempt,
            focus_score: p.focus_score,
            idle_seconds: p.idle_seconds,
            lease_expires_at: time(d.lease_expires_at),
            lesson_id: p.lesson_id.clone(),
            packet_id: p.packet_id.text(),
            raw_signals: p.raw_signals.clone(),
            received_at: time(d.received_at),
            session_id: p.session_id.clone(),
            system_type: p.system_type,
            user_id: p.user_id.clone(),
        }
    }
}

/// Leases up to `limit` packets, like StreamPending: unmarked ones come back
/// after the lease (the original popped them and lost them on a crash).
#[utoipa::path(
    get,
    path = "/api/v1/bucket/prana/packets/pending",
    tag = "gateway",
    params(
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 100,
            description = "How many packets to lease at most (default 10)"),
        ("lease_seconds" = Option<u32>, Query, minimum = 1, maximum = 3600,
            description = "How long the lease lasts (default BUCKET_LEASE_SECONDS)"),
    ),
    responses(
        (status = 200, description = "The packets now leased to the caller", body = PendingPage),
        (status = 400, description = "A query string that cannot be read", body = ErrorMessage),
        (status = 422, description = "A parameter out of range, named by `loc`", body = HTTPValidationError),
        (status = 500, description = "Internal error", body = ErrorMessage),
        (status = 503, description = "Storage is unavailable", body = ErrorMessage),
    )
)]
pub(super) async fn pending(State(bucket): State<Arc<Bucket>>, params: Params) -> Response {
    let query = match params {
        Ok(Query(q)) => q,
        Err(rejection) => return bad_query(rejection),
    };
    // An absent lease_seconds is 0, "the default", as over gRPC.
    let params = int_param(&query, "limit", DEFAULT_POLL, 1..=MAX_POLL).and_then(|limit| {
        Ok((
            limit,
            int_param(&query, "lease_seconds", 0, 1..=MAX_LEASE_SECONDS)?,
        ))
    });
    let (limit, lease_seconds) = match params {
        Ok(p) => p,
        Err(v) => return Error::InvalidInput(vec![v]).into_response(),
    };
    let deliveries = match bucket.lease_pending(limit, lease_seconds).await {
        Ok(d) => d,
        Err(e) => return e.into_response(),
    };
    let queue_size = bucket.status().await.map(|s| s.queue_size).unwrap_or(0);
    let packets: Vec<LeasedPacket> = deliveries.iter().map(LeasedPacket::from).collect();
    Json(PendingPage {
        count: packets.len(),
        packets,
        queue_size,
    })
    .into_response()
}

/// Every field as sent, so a wrong type is named rather than refused whole.
#[derive(Deserialize)]
struct MarkBody {
    #[serde(default)]
    packet_id: Value,
    #[serde(default = "yes")]
    success: Value,
    #[serde(default)]
    karma_actions: Value,
    #[serde(default)]
    error_message: Value,
}

fn yes() -> Value {
    Value::Bool(true)
}

/// One mark body; type errors name the field relative to the body.
fn mark_request(value: Value) -> Result<MarkRequest, Error> {
    let body: MarkBody = serde_json::from_value(value)
        .map_err(|_| Error::invalid("", "a mark must be a JSON object"))?;
    let mut violations = Vec::new();
    let packet_id = match body.packet_id {
        Value::String(s) => s,
        Value::Null => {
            violations.push(FieldViolation::new("packet_id", "packet_id is required"));
            String::new()
        }
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
    let karma_actions = match body.karma_actions {
        Value::Null => Vec::new(),
        Value::Array(actions) => actions,
        _ => {
            violations.push(FieldViolation::new(
                "karma_actions",
                "karma_actions must be an array",
            ));
            Vec::new()
        }
    };
    let error_message = match body.error_message {
        Value::Null => None,
        Value::String(s) => Some(s),
        _ => {
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
        karma_actions,
        error_message,
    })
}

/// A recorded outcome.
#[derive(Debug, Serialize, ToSchema)]
pub struct MarkedAnswer {
    /// True when the packet was already processed (the mark is idempotent).
    pub already_processed: bool,
    /// `Packet marked as processed`, `Packet marked as failed` or
    /// `Packet already processed`.
    pub message: String,
    #[schema(format = "uuid")]
    pub packet_id: String,
    pub status: OkTag,
}

impl From<&Marked> for MarkedAnswer {
    fn from(marked: &Marked) -> Self {
        MarkedAnswer {
            already_processed: marked.already_processed,
            message: marked.message().to_owned(),
            packet_id: marked.packet_id.text(),
            status: OkTag::Ok,
        }
    }
}

/// One outcome's answer, or one answer per item of a JSON array.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum MarkAnswer {
    One(MarkedAnswer),
    Many(Vec<MarkItem>),
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum MarkItem {
    Marked(MarkedAnswer),
    Rejected(Rejected),
}

/// One outcome, or (ours) a JSON array of outcomes answered item by item.
#[utoipa::path(
    post,
    path = "/api/v1/bucket/prana/packets/mark-processed",
    tag = "gateway",
    request_body(
        content = MarkBodies,
        content_type = "application/json",
        description = "One outcome, or a JSON array of at most 500 (BUCKET_MAX_BATCH) outcomes"
    ),
    responses(
        (status = 200, description = "The outcome recorded; for an array, one answer per item \
            (recorded, or `rejected`: invalid, or `not_found`)", body = MarkAnswer),
        (status = 400, description = "Malformed JSON", body = ErrorMessage),
        (status = 404, description = "No packet with this id", body = ErrorMessage),
        (status = 413, description = "Body over BUCKET_MAX_BODY_BYTES", body = ErrorMessage),
        (status = 415, description = "Content type is not application/json", body = ErrorMessage),
        (status = 422, description = "An invalid outcome (every violated field named), or an \
            array over the batch limit (`loc` `[\"body\"]`)", body = HTTPValidationError),
        (status = 500, description = "Internal error", body = ErrorMessage),
        (status = 503, description = "Storage is unavailable; nothing was recorded", body = ErrorMessage),
    )
)]
pub(super) async fn mark_processed(
    State(bucket): State<Arc<Bucket>>,
    headers: HeaderMap,
    raw: Body,
) -> Response {
    let parsed = match super::body::read(&headers, raw, Shape::ItemOrArray, bucket.max_batch()) {
        Ok(parsed) => parsed,
        Err(refused) => return *refused,
    };
    match parsed {
        Parsed::Many(items) => {
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
                        Ok(marked) => MarkItem::Marked(MarkedAnswer::from(&marked)),
                        Err(e) => MarkItem::Rejected(rejected(e, i)),
                    }
                })
                .collect();
            Json(MarkAnswer::Many(answers)).into_response()
        }
        Parsed::One(one) => {
            let marked = match mark_request(one) {
                Ok(request) => bucket.mark_processed(request).await,
                Err(e) => Err(e),
            };
            match marked {
                Ok(marked) => Json(MarkAnswer::One(MarkedAnswer::from(&marked))).into_response(),
                Err(e) => e.prefixed("body.").into_response(),
            }
        }
    }
}

/// A packet of one user, with its delivery state.
#[derive(Debug, Serialize, ToSchema)]
pub struct UserPacket {
    pub active_seconds: f64,
    pub away_seconds: f64,
    pub cognitive_state: String,
    pub focus_score: Option<f64>,
    pub idle_seconds: f64,
    /// As the consumer reported them.
    pub karma_actions: Vec<Value>,
    pub lesson_id: Option<String>,
    #[schema(format = "uuid")]
    pub packet_id: String,
    #[schema(format = DateTime)]
    pub processed_at: Option<String>,
    pub processed_by_karma: bool,
    #[schema(format = DateTime)]
    pub received_at: String,
    pub session_id: Option<String>,
    pub status: PacketState,
    pub user_id: String,
}

/// Where a packet is in its delivery.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PacketState {
    Pending,
    Leased,
    Processed,
    Failed,
    DeadLetter,
}

impl From<DeliveryStatus> for PacketState {
    fn from(s: DeliveryStatus) -> Self {
        match s {
            DeliveryStatus::Pending => PacketState::Pending,
            DeliveryStatus::Leased => PacketState::Leased,
            DeliveryStatus::Processed => PacketState::Processed,
            DeliveryStatus::Failed => PacketState::Failed,
            DeliveryStatus::DeadLetter => PacketState::DeadLetter,
        }
    }
}

impl From<&StoredPacket> for UserPacket {
    fn from(s: &StoredPacket) -> Self {
        let p = &s.packet;
        UserPacket {
            active_seconds: p.active_seconds,
            away_seconds: p.away_seconds,
            cognitive_state: p.cognitive_state.clone(),
            focus_score: p.focus_score,
            idle_seconds: p.idle_seconds,
            karma_actions: s.karma_actions.clone(),
            lesson_id: p.lesson_id.clone(),
            packet_id: p.packet_id.text(),
            processed_at: s.processed_at.map(time),
            processed_by_karma: s.processed_by_karma,
            received_at: time(s.received_at),
            session_id: p.session_id.clone(),
            status: s.status.into(),
            user_id: p.user_id.clone(),
        }
    }
}

/// Newest first. `processed_only=true`: processed packets; otherwise all
/// (the original returned only unprocessed ones by mistake).
#[utoipa::path(
    get,
    path = "/api/v1/bucket/prana/packets/user/{user_id}",
    tag = "gateway",
    params(
        ("user_id" = String, Path, min_length = 1, max_length = 256, example = "user_123",
            description = "The stored user (`user_id`, else `employee_id`, else `unknown`); at most 256 bytes"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 500,
            description = "How many packets at most (default 50)"),
        ("processed_only" = Option<bool>, Query,
            description = "Processed packets only (default false: every packet)"),
    ),
    responses(
        (status = 200, description = "The user's packets, newest first", body = Vec<UserPacket>),
        (status = 400, description = "A query string that cannot be read", body = ErrorMessage),
        (status = 422, description = "A parameter out of range, or a user id over 256 bytes, \
            named by `loc`", body = HTTPValidationError),
        (status = 500, description = "Internal error", body = ErrorMessage),
        (status = 503, description = "Storage is unavailable", body = ErrorMessage),
    )
)]
pub(super) async fn user_packets(
    State(bucket): State<Arc<Bucket>>,
    user_id: Result<Path<String>, PathRejection>,
    params: Params,
) -> Response {
    // A path segment that is not UTF-8 once decoded names the user id.
    let user_id = match user_id {
        Ok(Path(id)) => id,
        Err(r) => return Error::invalid("path.user_id", r.body_text()).into_response(),
    };
    let query = match params {
        Ok(Query(q)) => q,
        Err(rejection) => return bad_query(rejection),
    };
    let params = int_param(&query, "limit", DEFAULT_USER_LIMIT, 1..=MAX_USER_LIMIT)
        .and_then(|limit| Ok((limit, bool_param(&query, "processed_only")?)));
    let (limit, processed_only) = match params {
        Ok(p) => p,
        Err(v) => return Error::InvalidInput(vec![v]).into_response(),
    };
    let filter = processed_only.then_some(DeliveryStatus::Processed);
    match bucket.user_packets(&user_id, limit, filter, "").await {
        Ok(page) => {
            let list: Vec<UserPacket> = page.packets.iter().map(UserPacket::from).collect();
            Json(list).into_response()
        }
        Err(e) => e.prefixed("path.").into_response(),
    }
}

/// Counts and consumers, the seed's keys first.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatusAnswer {
    pub consumers: Vec<ConsumerAnswer>,
    pub dead_letter_packets: u64,
    pub failed_packets: u64,
    pub leased_packets: u64,
    /// Always false: the bucket runs no model.
    pub model_available: bool,
    pub pending_packets: u64,
    pub processed_packets: u64,
    pub queue_size: u64,
    pub redis_connected: bool,
    pub total_packets: u64,
}

/// A connected StreamPending subscriber.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConsumerAnswer {
    #[schema(format = DateTime)]
    pub connected_at: String,
    pub consumer: String,
    pub in_flight: u32,
    pub max_in_flight: u32,
}

#[utoipa::path(
    get,
    path = "/api/v1/bucket/prana/status",
    tag = "gateway",
    responses(
        (status = 200, description = "Packets per state, and the connected consumers", body = StatusAnswer),
        (status = 500, description = "Internal error", body = ErrorMessage),
        (status = 503, description = "Storage is unavailable", body = ErrorMessage),
    )
)]
pub(super) async fn status(
    State(bucket): State<Arc<Bucket>>,
    caller: Option<Extension<Caller>>,
) -> Response {
    match bucket.status().await {
        Ok(mut s) => {
            // Open to anyone; who consumes is the operators' business.
            if !caller.is_some_and(|Extension(c)| c.admin) {
                s.consumers.clear();
            }
            Json(StatusAnswer {
                consumers: s
                    .consumers
                    .iter()
                    .map(|c| ConsumerAnswer {
                        connected_at: time(c.connected_at),
                        consumer: c.consumer.clone(),
                        in_flight: c.in_flight,
                        max_in_flight: c.max_in_flight,
                    })
                    .collect(),
                dead_letter_packets: s.counts.dead_letter,
                failed_packets: s.counts.failed,
                leased_packets: s.counts.leased,
                model_available: false,
                pending_packets: s.counts.pending,
                processed_packets: s.counts.processed,
                queue_size: s.queue_size,
                redis_connected: s.redis_connected,
                total_packets: s.counts.total(),
            })
            .into_response()
        }
        Err(e) => e.into_response(),
    }
}
