//! Limits that hold under abuse: an optional rate of ingest calls per
//! client (so one runaway browser cannot starve the rest), and the right
//! gRPC status for a message over the size limit.
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue};
use sha2::{Digest, Sha256};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::error::Error;

/// A token bucket per client: `rate` calls a second, `burst` at once.
pub struct IngestRate {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Above this many clients, those idle long enough to be full are forgotten.
const TRACKED: usize = 4096;

impl IngestRate {
    /// None when `rate` is 0 (no limit); `burst` 0 means twice the rate.
    pub fn new(rate: u32, burst: u32) -> Option<IngestRate> {
        (rate > 0).then(|| IngestRate {
            rate: f64::from(rate),
            burst: f64::from(if burst == 0 {
                rate.saturating_mul(2)
            } else {
                burst
            }),
            buckets: Mutex::new(HashMap::new()),
        })
    }

    /// Takes one call's token for `client`, or says how long to wait.
    fn take(&self, client: &str, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().expect("rate lock poisoned");
        if buckets.len() > TRACKED {
            let full_after = Duration::from_secs_f64(self.burst / self.rate);
            buckets.retain(|_, b| now.duration_since(b.at) < full_after);
        }
        let bucket = buckets.entry(client.to_owned()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let refilled = now.duration_since(bucket.at).as_secs_f64() * self.rate;
        bucket.tokens = (bucket.tokens + refilled).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / self.rate))
        }
    }
}

pub struct Limits {
    pub ingest_rate: Option<IngestRate>,
}

/// A client: its bearer token (as a digest: no raw token kept), else its
/// address.
fn client(request: &Request) -> String {
    if let Some(token) = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let digest = Sha256::digest(token.as_bytes());
        return format!("token:{digest:x}");
    }
    let extensions = request.extensions();
    let addr = extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|tls| tls.get_ref().remote_addr())
        });
    addr.map_or_else(|| "unknown".to_owned(), |a| format!("addr:{}", a.ip()))
}

impl Limits {
    /// Takes an ingest call's token from its client's bucket, when a rate
    /// is set; refuses with how long to wait otherwise.
    pub fn admit_ingest(&self, request: &Request) -> Result<(), Error> {
        let Some(rate) = &self.ingest_rate else {
            return Ok(());
        };
        rate.take(&client(request), Instant::now()).map_err(|wait| {
            metrics::counter!("bucket_rate_limited_total").increment(1);
            Error::ResourceExhausted {
                message: "this client sends faster than the ingest rate limit; retry later".into(),
                retry_after: Some(wait),
            }
        })
    }
}

/// What tonic's message says (percent-encoded) when a message is too large.
const TOO_LARGE: &[u8] = b"message%20length%20too%20large";

/// tonic answers OUT_OF_RANGE for a message over its decoding limit; the
/// gRPC status table says RESOURCE_EXHAUSTED, which clients know not to
/// retry unchanged.
pub fn too_large_is_resource_exhausted(headers: &mut HeaderMap) {
    let out_of_range = headers.get("grpc-status").map(HeaderValue::as_bytes) == Some(b"11");
    let too_large = headers.get("grpc-message").is_some_and(|m| {
        m.as_bytes()
            .windows(TOO_LARGE.len())
            .any(|w| w == TOO_LARGE)
    });
    if out_of_range && too_large {
        headers.insert("grpc-status", HeaderValue::from_static("8"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_gets_its_burst_then_the_rate() {
        let limit = IngestRate::new(10, 3).unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limit.take("a", t0).is_ok());
        }
        let wait = limit.take("a", t0).unwrap_err();
        assert!(wait <= Duration::from_millis(100) && wait > Duration::ZERO);
        // Another client is not held back by the first.
        assert!(limit.take("b", t0).is_ok());
        // A tenth of a second later, one more call.
        assert!(limit.take("a", t0 + Duration::from_millis(100)).is_ok());
        assert!(limit.take("a", t0 + Duration::from_millis(100)).is_err());
        assert!(IngestRate::new(0, 5).is_none(), "0: no limit");
    }

    #[test]
    fn only_the_size_limit_becomes_resource_exhausted() {
        let status = |code: &'static str, message: &'static str| {
            let mut h = HeaderMap::new();
            h.insert("grpc-status", HeaderValue::from_static(code));
            h.insert("grpc-message", HeaderValue::from_static(message));
            too_large_is_resource_exhausted(&mut h);
            h["grpc-status"].clone()
        };
        let big = "Error,%20decoded%20message%20length%20too%20large:%20found%2010%20bytes";
        assert_eq!(status("11", big), "8");
        assert_eq!(status("11", "timestamp%20out%20of%20range"), "11");
        assert_eq!(status("3", big), "3");
    }
}
