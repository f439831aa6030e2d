//! Limits that hold under abuse: an optional rate of ingest calls per
//! client (so one runaway browser cannot starve the rest), and the right
//! gRPC status for a message over the size limit.
//!
//! A client is what a caller cannot change at will: a token this server
//! knows (its digest), else the peer's address (an IPv6 one by its /64, what
//! one host is given). A made-up `authorization` value is no client of its
//! own. The table of clients is a fixed number of LRU shards: a call costs
//! one shard's lock and no scan, and a flood of new clients evicts the
//! least recent ones instead of growing the table.
use std::hash::{BuildHasher, Hash, RandomState};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue};
use hashlink::LruCache;

use crate::error::Error;

/// Who an ingest call is counted against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Client {
    /// The SHA-256 of a token this server knows.
    Token([u8; 32]),
    /// A peer address (IPv6: its /64).
    Addr(IpAddr),
    /// Neither (no connection information).
    Unknown,
}

impl Client {
    pub fn of(verified: Option<[u8; 32]>, addr: Option<IpAddr>) -> Client {
        match (verified, addr) {
            (Some(digest), _) => Client::Token(digest),
            (None, Some(IpAddr::V6(v6))) if v6.to_ipv4_mapped().is_none() => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                Client::Addr(IpAddr::V6(prefix.into()))
            }
            (None, Some(IpAddr::V6(v6))) => {
                Client::Addr(IpAddr::V4(v6.to_ipv4_mapped().expect("mapped")))
            }
            (None, Some(addr)) => Client::Addr(addr),
            (None, None) => Client::Unknown,
        }
    }
}

/// A token bucket per client: `rate` calls a second, `burst` at once.
pub struct IngestRate {
    rate: f64,
    burst: f64,
    hasher: RandomState,
    shards: Vec<Mutex<LruCache<Client, Bucket>>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Clients tracked at most; past it the least recent are forgotten (and
/// come back with a full burst).
pub const TRACKED: usize = 65_536;
const SHARDS: usize = 16;

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
            hasher: RandomState::new(),
            shards: (0..SHARDS)
                .map(|_| Mutex::new(LruCache::new(TRACKED / SHARDS)))
                .collect(),
        })
    }

    /// Clients tracked now.
    pub fn tracked(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().expect("rate lock poisoned").len())
            .sum()
    }

    /// Takes one call's token for `client`, or says how long to wait.
    fn take(&self, client: Client, now: Instant) -> Result<(), Duration> {
        let shard = self.hasher.hash_one(client) as usize % SHARDS;
        let mut buckets = self.shards[shard].lock().expect("rate lock poisoned");
        if buckets.get_mut(&client).is_none() {
            buckets.insert(
                client,
                Bucket {
                    tokens: self.burst,
                    at: now,
                },
            );
        }
        let bucket = buckets.get_mut(&client).expect("inserted above");
        let refilled = now.saturating_duration_since(bucket.at).as_secs_f64() * self.rate;
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

impl Limits {
    /// Takes an ingest call's token from its client's bucket, when a rate
    /// is set; refuses with how long to wait otherwise.
    pub fn admit_ingest(&self, client: Client) -> Result<(), Error> {
        let Some(rate) = &self.ingest_rate else {
            return Ok(());
        };
        rate.take(client, Instant::now()).map_err(|wait| {
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

    fn addr(text: &str) -> Client {
        Client::of(None, Some(text.parse().unwrap()))
    }

    #[test]
    fn a_client_gets_its_burst_then_the_rate() {
        let limit = IngestRate::new(10, 3).unwrap();
        let t0 = Instant::now();
        let (a, b) = (addr("10.0.0.1"), addr("10.0.0.2"));
        for _ in 0..3 {
            assert!(limit.take(a, t0).is_ok());
        }
        let wait = limit.take(a, t0).unwrap_err();
        assert!(wait <= Duration::from_millis(100) && wait > Duration::ZERO);
        // Another client is not held back by the first.
        assert!(limit.take(b, t0).is_ok());
        // A tenth of a second later, one more call.
        assert!(limit.take(a, t0 + Duration::from_millis(100)).is_ok());
        assert!(limit.take(a, t0 + Duration::from_millis(100)).is_err());
        assert!(IngestRate::new(0, 5).is_none(), "0: no limit");
    }

    #[test]
    fn a_flood_of_new_clients_is_bounded_and_the_busy_one_kept() {
        let limit = IngestRate::new(1, 1).unwrap();
        let t0 = Instant::now();
        let busy = addr("192.0.2.1");
        assert!(limit.take(busy, t0).is_ok());
        // All at the same instant: none is "full again", so a table that
        // only dropped full clients would hold every one.
        for i in 0..(3 * TRACKED as u32) {
            let _ = limit.take(Client::Addr(IpAddr::V4(i.into())), t0);
            if i % 1000 == 0 {
                assert!(
                    limit.take(busy, t0).is_err(),
                    "the busy client keeps its count"
                );
            }
        }
        assert!(limit.tracked() <= TRACKED, "{} tracked", limit.tracked());
    }

    #[test]
    fn one_ipv6_host_is_one_client() {
        assert_eq!(addr("2001:db8::1"), addr("2001:db8::ffff:1"));
        assert_ne!(addr("2001:db8::1"), addr("2001:db8:0:1::1"));
        assert_eq!(addr("::ffff:10.0.0.1"), addr("10.0.0.1"));
        let token = Client::of(Some([7; 32]), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(token, Client::Token([7; 32]));
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
