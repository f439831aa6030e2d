//! CORS for browsers (PRANA): gRPC-web and the JSON gateway from pages of
//! other origins. tonic-web has no CORS of its own since 0.12.
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use tower_http::cors::{AllowHeaders, AllowOrigin, Any, CorsLayer};

pub fn layer(origins: &[String]) -> CorsLayer {
    let base = CorsLayer::new()
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        // Echo what the preflight asks for: a wildcard would not cover
        // `authorization` (the Fetch standard names it as the exception),
        // and the bearer token must get through.
        .allow_headers(AllowHeaders::mirror_request())
        // Browsers hide response headers unless told; gRPC-web clients need these.
        .expose_headers([
            HeaderName::from_static("grpc-status"),
            HeaderName::from_static("grpc-message"),
            HeaderName::from_static("grpc-status-details-bin"),
            HeaderName::from_static("x-request-id"),
        ])
        .max_age(Duration::from_secs(24 * 3600));
    if origins.iter().any(|o| o.trim() == "*") {
        tracing::warn!("CORS is open to every origin (BUCKET_CORS_ORIGINS=*)");
        return base.allow_origin(Any);
    }
    let allowed: Vec<HeaderValue> = origins
        .iter()
        .map(|o| o.trim())
        .filter(|o| !o.is_empty())
        .filter_map(|o| match HeaderValue::from_str(o) {
            Ok(v) => Some(v),
            Err(_) => {
                tracing::warn!(origin = o, "ignoring an invalid CORS origin");
                None
            }
        })
        .collect();
    tracing::info!(origins = ?origins, "CORS allowed origins");
    base.allow_origin(AllowOrigin::list(allowed))
}
