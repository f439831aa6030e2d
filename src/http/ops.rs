//! Operations: liveness, readiness (the database answers), Prometheus metrics.
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::bucket::Bucket;

pub fn router(bucket: Arc<Bucket>) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(|| async { axum::Json(json!({ "status": "ok" })) }),
        )
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(bucket)
}

async fn readyz(State(bucket): State<Arc<Bucket>>) -> Response {
    match bucket.store().ping().await {
        Ok(()) => axum::Json(json!({ "status": "ready" })).into_response(),
        Err(e) => {
            // The driver's text (hosts, users) stays in the log.
            tracing::warn!(cause = %e, "not ready: the database does not answer");
            let detail = crate::error::STORAGE_UNAVAILABLE;
            (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(json!({ "status": "unavailable", "detail": detail })),
            )
                .into_response()
        }
    }
}

async fn metrics(State(bucket): State<Arc<Bucket>>) -> Response {
    // Levels are read at scrape time; counters move as things happen.
    if let Ok(status) = bucket.status().await {
        metrics::gauge!("bucket_queue_depth").set(status.queue_size as f64);
        metrics::gauge!("bucket_packets_leased").set(status.counts.leased as f64);
        metrics::gauge!("bucket_packets_pending").set(status.counts.pending as f64);
        metrics::gauge!("bucket_packets_dead_letter").set(status.counts.dead_letter as f64);
        metrics::gauge!("bucket_redis_connected").set(f64::from(u8::from(status.redis_connected)));
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::telemetry::metrics().render(),
    )
        .into_response()
}
