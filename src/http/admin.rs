//! Operators' REST paths beside the seed's: Redrive and Replay, the same
//! calls as the gRPC ones (admin role).
use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::body::{Parsed, Shape};
use super::error::{ErrorMessage, HTTPValidationError};
use super::gateway::Body;
use crate::bucket::{Bucket, RequeueRequest};
use crate::domain::{DeliveryStatus, FieldViolation};
use crate::error::Error;
use crate::store::RequeueReason;

pub fn router(bucket: Arc<Bucket>) -> Router {
    Router::new()
        .route("/bucket/prana/packets/redrive", post(redrive))
        .route("/bucket/prana/packets/replay", post(replay))
        .with_state(bucket)
}

/// Which dead-letter or failed packets to send back to pending; the
/// filters combine, none selects them all.
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct RedriveBody {
    /// `dead_letter` and/or `failed`; absent or empty for both.
    statuses: Option<Vec<RedriveStatus>>,
    /// Only this user's packets. At most 256 bytes.
    #[schema(max_length = 256)]
    user_id: Option<String>,
    /// Only packets received at or after this time (RFC 3339).
    #[schema(format = DateTime)]
    received_from: Option<String>,
    /// Only packets received before this time (RFC 3339).
    #[schema(format = DateTime)]
    received_before: Option<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
enum RedriveStatus {
    DeadLetter,
    Failed,
}

/// Which processed packets to deliver again; at least one filter.
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct ReplayBody {
    /// Only this user's packets. At most 256 bytes.
    #[schema(max_length = 256)]
    user_id: Option<String>,
    /// Only packets received at or after this time (RFC 3339).
    #[schema(format = DateTime)]
    received_from: Option<String>,
    /// Only packets received before this time (RFC 3339).
    #[schema(format = DateTime)]
    received_before: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Redriven {
    /// Packets pending again, their delivery count at 0.
    pub redriven: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Replayed {
    /// Packets pending again, their outcome kept in their history.
    pub replayed: u64,
}

/// Dead-letter and failed packets back to pending (their attempts start
/// again; what they had is kept in their history).
#[utoipa::path(
    post,
    path = "/api/v1/bucket/prana/packets/redrive",
    tag = "admin",
    request_body(content = RedriveBody, content_type = "application/json"),
    responses(
        (status = 200, description = "How many packets are pending again", body = Redriven),
        (status = 400, description = "Malformed JSON", body = ErrorMessage),
        (status = 413, description = "Body over BUCKET_MAX_BODY_BYTES", body = ErrorMessage),
        (status = 415, description = "Content type is not application/json", body = ErrorMessage),
        (status = 422, description = "A filter of the wrong type or out of range, named by `loc`",
            body = HTTPValidationError),
        (status = 500, description = "Internal error", body = ErrorMessage),
        (status = 503, description = "Storage is unavailable; nothing changed", body = ErrorMessage),
    )
)]
pub(super) async fn redrive(
    State(bucket): State<Arc<Bucket>>,
    headers: HeaderMap,
    raw: Body,
) -> Response {
    requeue(&bucket, &headers, raw, RequeueReason::Redrive).await
}

/// Processed packets delivered again (after a consumer bug, say); their
/// outcome is kept in their history.
#[utoipa::path(
    post,
    path = "/api/v1/bucket/prana/packets/replay",
    tag = "admin",
    request_body(content = ReplayBody, content_type = "application/json"),
    responses(
        (status = 200, description = "How many packets are pending again", body = Replayed),
        (status = 400, description = "Malformed JSON", body = ErrorMessage),
        (status = 413, description = "Body over BUCKET_MAX_BODY_BYTES", body = ErrorMessage),
        (status = 415, description = "Content type is not application/json", body = ErrorMessage),
        (status = 422, description = "No filter, or one of the wrong type or out of range, \
            named by `loc`", body = HTTPValidationError),
        (status = 500, description = "Internal error", body = ErrorMessage),
        (status = 503, description = "Storage is unavailable; nothing changed", body = ErrorMessage),
    )
)]
pub(super) async fn replay(
    State(bucket): State<Arc<Bucket>>,
    headers: HeaderMap,
    raw: Body,
) -> Response {
    requeue(&bucket, &headers, raw, RequeueReason::Replay).await
}

async fn requeue(
    bucket: &Bucket,
    headers: &HeaderMap,
    raw: Body,
    reason: RequeueReason,
) -> Response {
    // A filter list over the limit is refused before its items are built.
    let value = match super::body::read(headers, raw, Shape::Filters, bucket.max_batch()) {
        Ok(Parsed::One(value)) => value,
        Ok(Parsed::Many(items)) => Value::Array(items),
        Err(refused) => return *refused,
    };
    let request = match filters(&value, reason == RequeueReason::Redrive) {
        Ok(request) => request,
        Err(e) => return e.prefixed("body.").into_response(),
    };
    match bucket.requeue(reason, request).await {
        Ok(n) => match reason {
            RequeueReason::Redrive => Json(Redriven { redriven: n }).into_response(),
            RequeueReason::Replay => Json(Replayed { replayed: n }).into_response(),
        },
        Err(e) => e.prefixed("body.").into_response(),
    }
}

/// The body's filters, each wrong one named; `null` counts as absent.
fn filters(body: &Value, statuses: bool) -> Result<RequeueRequest, Error> {
    let Value::Object(body) = body else {
        return Err(Error::invalid("", "expected a JSON object"));
    };
    let mut violations = Vec::new();
    let mut request = RequeueRequest {
        user_id: text(body, "user_id", &mut violations).unwrap_or_default(),
        received_from: time(body, "received_from", &mut violations),
        received_before: time(body, "received_before", &mut violations),
        ..Default::default()
    };
    if statuses {
        match body.get("statuses") {
            None | Some(Value::Null) => {}
            Some(Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    match item.as_str().and_then(DeliveryStatus::parse) {
                        Some(s @ (DeliveryStatus::DeadLetter | DeliveryStatus::Failed)) => {
                            request.statuses.push(s)
                        }
                        _ => violations.push(FieldViolation::new(
                            format!("statuses.{i}"),
                            "expected \"dead_letter\" or \"failed\"",
                        )),
                    }
                }
            }
            Some(_) => violations.push(FieldViolation::new("statuses", "expected a list")),
        }
    }
    if violations.is_empty() {
        Ok(request)
    } else {
        Err(Error::InvalidInput(violations))
    }
}

fn text(
    body: &Map<String, Value>,
    field: &str,
    violations: &mut Vec<FieldViolation>,
) -> Option<String> {
    match body.get(field) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            violations.push(FieldViolation::new(field, "expected a string"));
            None
        }
    }
}

fn time(
    body: &Map<String, Value>,
    field: &str,
    violations: &mut Vec<FieldViolation>,
) -> Option<DateTime<Utc>> {
    let raw = text(body, field, violations)?;
    match DateTime::parse_from_rfc3339(&raw) {
        Ok(at) => Some(at.with_timezone(&Utc)),
        Err(e) => {
            violations.push(FieldViolation::new(
                field,
                format!("expected an RFC 3339 date-time: {e}"),
            ));
            None
        }
    }
}
