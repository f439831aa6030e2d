//! Every request gets an id: `x-request-id` from the caller (up to 128
//! visible ASCII characters) or a new UUIDv7, echoed on the response (a
//! REST header; gRPC response metadata) and carried by every log line of
//! the request (a span). The same layer counts requests by method and
//! outcome and times them (`bucket_requests_total{method, code}`,
//! `bucket_request_seconds{method}`), for gRPC, gRPC-web and REST alike.
use std::time::Instant;

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;
use uuid::Uuid;

pub const HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// The caller's id when it is one we can echo and log safely.
fn given(request: &Request) -> Option<HeaderValue> {
    let value = request.headers().get(&HEADER)?;
    let ok = !value.is_empty()
        && value.len() <= 128
        && value.as_bytes().iter().all(|b| b.is_ascii_graphic());
    ok.then(|| value.clone())
}

/// The method a path names, with a bounded set of values: an RPC's name,
/// `rest:<path>` for the gateway (a user id never becomes a label), or
/// `other`.
pub fn method_label(path: &str) -> String {
    if let Some(rpc) = path.strip_prefix("/bucket.v1.BucketService/") {
        return rpc.to_owned();
    }
    if let Some(rest) = path.strip_prefix("/api/v1/bucket/prana/") {
        let rest = if rest.starts_with("packets/user/") {
            "packets/user"
        } else {
            rest
        };
        return match rest {
            "ingest"
            | "packets/pending"
            | "packets/mark-processed"
            | "packets/user"
            | "status"
            | "packets/redrive"
            | "packets/replay" => format!("rest:{rest}"),
            _ => "other".to_owned(),
        };
    }
    match path {
        "/grpc.health.v1.Health/Check" | "/grpc.health.v1.Health/Watch" => "health".into(),
        p if p.starts_with("/grpc.reflection.") => "reflection".into(),
        "/healthz" | "/readyz" | "/metrics" | "/openapi.json" => path[1..].to_owned(),
        _ => "other".into(),
    }
}

/// The outcome to count: the gRPC status when the answer carries it in
/// its headers (every refusal does), else OK for gRPC, else the HTTP status.
fn code_label(response: &Response, grpc: bool) -> String {
    if let Some(code) = response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
    {
        return format!("{:?}", tonic::Code::from_i32(code));
    }
    if grpc && response.status().is_success() {
        return "Ok".into();
    }
    response.status().as_u16().to_string()
}

pub async fn tag(mut request: Request, next: Next) -> Response {
    let id = given(&request).unwrap_or_else(|| {
        HeaderValue::from_str(&Uuid::now_v7().to_string()).expect("a UUID is a header value")
    });
    request.headers_mut().insert(HEADER, id.clone());
    let path = request.uri().path().to_owned();
    let grpc = crate::auth::is_grpc(request.headers());
    let method = method_label(&path);
    let span = tracing::info_span!(
        "request",
        request_id = %id.to_str().unwrap_or_default(),
        method = %method
    );
    let started = Instant::now();
    let mut response = next.run(request).instrument(span).await;
    response.headers_mut().insert(HEADER, id);
    let code = code_label(&response, grpc);
    metrics::counter!("bucket_requests_total", "method" => method.clone(), "code" => code)
        .increment(1);
    // For a stream, the time to its first answer (its headers).
    metrics::histogram!("bucket_request_seconds", "method" => method)
        .record(started.elapsed().as_secs_f64());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_stay_few() {
        assert_eq!(method_label("/bucket.v1.BucketService/Ingest"), "Ingest");
        assert_eq!(
            method_label("/api/v1/bucket/prana/packets/user/alice"),
            "rest:packets/user"
        );
        assert_eq!(method_label("/api/v1/bucket/prana/nope"), "other");
        assert_eq!(
            method_label("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            "reflection"
        );
        assert_eq!(method_label("/metrics"), "metrics");
        assert_eq!(method_label("/random/guess"), "other");
    }
}
