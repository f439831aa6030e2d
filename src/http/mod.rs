//! The plain-HTTP front doors: the seed's JSON gateway and operations.
mod admin;
mod body;
pub mod cors;
mod draft;
mod error;
mod gateway;
mod openapi;
mod ops;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;

use crate::bucket::Bucket;

/// The JSON → domain conversion of a packet (public for the fuzz target).
pub use draft::draft;

/// `/api/v1/...` (the seed's paths), `/healthz`, `/readyz`, `/metrics`,
/// `/openapi.json` (their description).
pub fn router(bucket: Arc<Bucket>, max_body_bytes: usize) -> Router {
    Router::new()
        .nest(
            "/api/v1",
            gateway::router(bucket.clone()).merge(admin::router(bucket.clone())),
        )
        .merge(ops::router(bucket))
        .merge(openapi::router())
        .layer(DefaultBodyLimit::max(max_body_bytes))
}

/// Any other path: FastAPI's 404 (a gRPC client reads it as UNIMPLEMENTED).
pub async fn not_found() -> axum::response::Response {
    error::detail(StatusCode::NOT_FOUND, "Not Found")
}
