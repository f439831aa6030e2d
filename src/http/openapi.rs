//! The OpenAPI 3 description of every plain-HTTP path, generated from the
//! handlers' `#[utoipa::path]` attributes and the answers' types, served at
//! `GET /openapi.json`.
//!
//! The gateway reads its bodies as raw JSON (so a wrong type is a named 422,
//! as FastAPI answers, not a refusal of the whole body); the request types
//! here only describe what it accepts. The operations' handlers (ops.rs) are
//! described by the stubs below.
use std::borrow::Cow;
use std::sync::LazyLock;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use serde::Deserialize;
use serde_json::Value;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::{OpenApi, PartialSchema, ToSchema};

use super::{admin, gateway};
use crate::domain::{LegacyState, SenderRole, SystemType};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "PRANA bucket: JSON gateway and operations",
        description = "The original FastAPI bucket's paths and shapes, served beside gRPC and \
            gRPC-web on the same port. Errors: 422 `{\"detail\": [{\"loc\", \"msg\", \"type\"}]}` \
            naming each violated field; every other error `{\"detail\": \"...\"}`."
    ),
    paths(
        gateway::ingest,
        gateway::pending,
        gateway::mark_processed,
        gateway::user_packets,
        gateway::status,
        admin::redrive,
        admin::replay,
        healthz,
        readyz,
        metrics,
        openapi_json,
    ),
    tags(
        (name = "gateway", description = "The seed's five paths under /api/v1/bucket/prana"),
        (name = "admin", description = "Operators' calls beside the seed's paths (admin role)"),
        (name = "operations", description = "Health, readiness, metrics, this document"),
    )
)]
pub struct ApiDoc;

/// The document, built once.
static DOCUMENT: LazyLock<String> = LazyLock::new(|| {
    ApiDoc::openapi()
        .to_json()
        .expect("the OpenAPI document serializes")
});

/// `GET /openapi.json`.
pub fn router() -> Router {
    Router::new().route(
        "/openapi.json",
        get(|| async {
            (
                [(header::CONTENT_TYPE, "application/json")],
                DOCUMENT.as_str(),
            )
                .into_response()
        }),
    )
}

/// A PRANA packet as the seed's clients send it. `null` counts as absent;
/// unknown fields are ignored.
#[derive(Deserialize, ToSchema)]
#[schema(examples(json!({
    "user_id": "user_123", "session_id": "session_456", "lesson_id": "lesson_789",
    "system_type": "gurukul", "role": "student", "timestamp": "2024-01-20T10:30:00Z",
    "cognitive_state": "ON_TASK", "active_seconds": 4.5, "idle_seconds": 0.3,
    "away_seconds": 0.2, "focus_score": 85.0,
    "raw_signals": {"dwell_time_ms": 1200, "mouse_velocity": 0.5}
})))]
#[allow(dead_code)]
pub struct PacketIn {
    /// Set by the client to make ingest idempotent; else the server makes a UUIDv7.
    #[schema(format = "uuid")]
    packet_id: Option<String>,
    /// The stored user; else `employee_id`, else `unknown`. At most 256 bytes.
    #[schema(max_length = 256)]
    user_id: Option<String>,
    #[schema(max_length = 256)]
    employee_id: Option<String>,
    #[schema(max_length = 256)]
    session_id: Option<String>,
    #[schema(max_length = 256)]
    lesson_id: Option<String>,
    system_type: Option<SystemType>,
    role: Option<SenderRole>,
    /// RFC 3339 (an ISO-8601 date-time without offset is read as UTC), at
    /// most 24 hours ahead of the server's clock.
    #[schema(format = DateTime)]
    timestamp: String,
    /// Required unless the legacy `state` is sent. At most 256 bytes.
    #[schema(max_length = 256)]
    cognitive_state: Option<String>,
    /// The legacy state; required unless `cognitive_state` is sent.
    state: Option<LegacyState>,
    /// Seconds of the 5-second window spent active; the three seconds
    /// fields add up to 5.0 ± 0.1.
    #[schema(minimum = 0.0)]
    active_seconds: f64,
    #[schema(minimum = 0.0)]
    idle_seconds: f64,
    #[schema(minimum = 0.0)]
    away_seconds: f64,
    #[schema(minimum = 0.0, maximum = 100.0)]
    focus_score: Option<f64>,
    /// When absent: `focus_score / 100`, else 0.5.
    #[schema(minimum = 0.0, maximum = 1.0)]
    integrity_score: Option<f64>,
    /// Any JSON object: at most 16 KiB encoded, at most 8 levels deep.
    #[schema(value_type = Object)]
    raw_signals: Value,
}

/// A label's schema: a string, one of the domain's values for it.
fn label_schema(values: impl Iterator<Item = &'static str>) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(values))
        .into()
}

impl PartialSchema for SystemType {
    fn schema() -> RefOr<Schema> {
        label_schema(SystemType::ALL.iter().map(|v| v.as_str()))
    }
}

impl ToSchema for SystemType {}

impl PartialSchema for SenderRole {
    fn schema() -> RefOr<Schema> {
        label_schema(SenderRole::ALL.iter().map(|v| v.as_str()))
    }
}

/// Named as the request field (and the proto enum) name it.
impl ToSchema for SenderRole {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Role")
    }
}

impl PartialSchema for LegacyState {
    fn schema() -> RefOr<Schema> {
        label_schema(LegacyState::ALL.iter().map(|v| v.as_str()))
    }
}

impl ToSchema for LegacyState {}

/// The ingest body: one packet, or a JSON array of packets.
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code, clippy::large_enum_variant)]
pub enum IngestBody {
    One(PacketIn),
    Many(Vec<PacketIn>),
}

/// The outcome of one delivered packet, as the consumer reports it.
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct MarkIn {
    #[schema(format = "uuid")]
    packet_id: String,
    /// Default true; false records a failure (with `error_message`).
    #[serde(default)]
    success: bool,
    /// What the Karma Tracker did, kept with the packet (at most 16 KiB encoded).
    karma_actions: Option<Vec<Value>>,
    /// Why it failed; at most 4096 bytes.
    #[schema(max_length = 4096)]
    error_message: Option<String>,
}

/// The mark body: one outcome, or a JSON array of outcomes.
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code, clippy::large_enum_variant)]
pub enum MarkBodies {
    One(MarkIn),
    Many(Vec<MarkIn>),
}

/// `{"status": "ok"}`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Liveness {
    /// `ok`.
    status: String,
}

/// `{"status": "ready"}`, or `{"status": "unavailable", "detail": ...}`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Readiness {
    /// `ready` or `unavailable`.
    status: String,
    /// Why the database does not answer.
    detail: Option<String>,
}

/// Alive: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "Alive", body = Liveness)))]
#[allow(dead_code)]
fn healthz() {}

/// Ready while the database answers.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "The database answers", body = Readiness),
        (status = 503, description = "The database does not answer", body = Readiness),
    ))]
#[allow(dead_code)]
fn readyz() {}

/// Prometheus metrics, in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format 0.0.4",
        body = String, content_type = "text/plain")))]
#[allow(dead_code)]
fn metrics() {}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI document", body = Object,
        content_type = "application/json")))]
#[allow(dead_code)]
fn openapi_json() {}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use crate::domain::lease::{MAX_LEASE_SECONDS, MAX_POLL};
    use crate::domain::user_page::MAX_USER_LIMIT;

    /// utoipa takes only literals for a parameter's bounds: the document
    /// restates the domain's limits, and this keeps them equal.
    #[test]
    fn documented_bounds_are_the_domains() {
        let doc: Value = serde_json::from_str(&super::DOCUMENT).unwrap();
        let maximum = |path: &str, name: &str| {
            doc["paths"][path]["get"]["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == name)
                .unwrap()["schema"]["maximum"]
                .as_u64()
                .unwrap()
        };
        let pending = "/api/v1/bucket/prana/packets/pending";
        assert_eq!(maximum(pending, "limit"), u64::from(MAX_POLL));
        assert_eq!(
            maximum(pending, "lease_seconds"),
            u64::from(MAX_LEASE_SECONDS)
        );
        let user = "/api/v1/bucket/prana/packets/user/{user_id}";
        assert_eq!(maximum(user, "limit"), u64::from(MAX_USER_LIMIT));
    }
}
