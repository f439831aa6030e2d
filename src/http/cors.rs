//! CORS for browsers (PRANA): gRPC-web and the JSON gateway from pages of
//! other origins. tonic-web has no CORS of its own since 0.12.
//!
//! Invariant: every request a browser can make (it names its `Origin`, and
//! a preflight is an OPTIONS without a gRPC body) passes the CORS layer; a
//! native gRPC call without an `Origin` (a server, the Karma Tracker, a
//! load generator) skips it. CORS has nothing to say to those, and its
//! `Vary` headers cost ~1 µs of the ~65 µs the runtime spends on a call
//! (BENCHMARKS.md, seventh session).
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::Either;
use http::{HeaderName, HeaderValue, Method, Request, Response, header};
use tower::{Layer, Service};
use tower_http::cors::{AllowHeaders, AllowOrigin, Any, Cors, CorsLayer};

/// CORS for what browsers send, nothing for native gRPC callers.
#[derive(Clone)]
pub struct BrowserCors(Arc<CorsLayer>);

impl<S> Layer<S> for BrowserCors {
    type Service = BrowserCorsService<S>;

    fn layer(&self, inner: S) -> BrowserCorsService<S> {
        BrowserCorsService {
            inner,
            cors: Arc::clone(&self.0),
        }
    }
}

/// The layer is shared, not held: the server clones the service stack for
/// every request, and a `CorsLayer` clones its lists (an allocation and a
/// few reference counts per native gRPC call, which never needs it). A
/// browser's request gets a `Cors` of its own.
#[derive(Clone)]
pub struct BrowserCorsService<S> {
    inner: S,
    cors: Arc<CorsLayer>,
}

impl<S, B, R> Service<Request<B>> for BrowserCorsService<S>
where
    S: Service<Request<B>, Response = Response<R>> + Clone,
    R: Default,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = Either<<Cors<S> as Service<Request<B>>>::Future, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        // The same inner service answers either way.
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if from_a_browser(&request) {
            // The service polled ready goes to the request; a clone stays.
            let clone = self.inner.clone();
            let ready = std::mem::replace(&mut self.inner, clone);
            Either::Left(self.cors.layer(ready).call(request))
        } else {
            Either::Right(self.inner.call(request))
        }
    }
}

/// Whether CORS may have something to say: anything with an `Origin`, and
/// everything that is not a native gRPC call (gRPC-web, REST, preflights).
fn from_a_browser<B>(request: &Request<B>) -> bool {
    let native_grpc = request
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|ct| {
            let ct = ct.as_bytes();
            ct.starts_with(b"application/grpc") && !ct.starts_with(b"application/grpc-web")
        });
    !native_grpc || request.headers().contains_key(header::ORIGIN)
}

pub fn layer(origins: &[String]) -> BrowserCors {
    BrowserCors(Arc::new(cors(origins)))
}

fn cors(origins: &[String]) -> CorsLayer {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn request(content_type: &str, origin: Option<&str>) -> Request<()> {
        let mut builder = Request::post("/bucket.v1.BucketService/Ingest")
            .header(header::CONTENT_TYPE, content_type);
        if let Some(origin) = origin {
            builder = builder.header(header::ORIGIN, origin);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn only_native_grpc_without_an_origin_skips_cors() {
        assert!(!from_a_browser(&request("application/grpc", None)));
        assert!(!from_a_browser(&request("application/grpc+proto", None)));
        assert!(from_a_browser(&request(
            "application/grpc",
            Some("http://prana.example")
        )));
        assert!(from_a_browser(&request("application/grpc-web+proto", None)));
        assert!(from_a_browser(&request("application/grpc-web-text", None)));
        assert!(from_a_browser(&request("application/json", None)));
        let preflight = Request::options("/bucket.v1.BucketService/Ingest")
            .body(())
            .unwrap();
        assert!(from_a_browser(&preflight));
    }
}
