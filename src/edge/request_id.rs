//! Every request gets an id: `x-request-id` from the caller (up to 128
//! visible ASCII characters) or a new UUIDv7, echoed on the response (a
//! REST header; gRPC response metadata) and carried by every log line of
//! the request (`crate::telemetry::request`). Requests are counted and
//! timed by `Method` (`crate::edge` does both, for gRPC, gRPC-web and REST
//! alike).
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use uuid::Uuid;

pub const HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// The caller's id when it is one we can echo and log safely.
pub fn given(headers: &HeaderMap) -> Option<HeaderValue> {
    let value = headers.get(&HEADER)?;
    let ok = !value.is_empty()
        && value.len() <= 128
        && value.as_bytes().iter().all(|b| b.is_ascii_graphic());
    ok.then(|| never_indexed(value.clone()))
}

/// A new id: a UUIDv7, so ids sort by time in logs.
pub fn new_id() -> HeaderValue {
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let text = Uuid::now_v7().hyphenated().encode_lower(&mut text);
    never_indexed(HeaderValue::from_str(text).expect("a UUID is a header value"))
}

/// An id is sent once: HTTP/2's header compression (HPACK) would add each
/// one to the connection's table, where it is never used again and pushes
/// out the headers every response repeats. Marked sensitive, h2 sends it
/// as a literal that is never indexed.
fn never_indexed(mut value: HeaderValue) -> HeaderValue {
    value.set_sensitive(true);
    value
}

/// What a request's path names, with a bounded set of labels for metrics
/// and logs (a user id never becomes one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Method(u8);

/// Every label a request can get; the index is the `Method`.
const LABELS: &[&str] = &[
    "other",
    "Ingest",
    "IngestBatch",
    "StreamPending",
    "MarkProcessed",
    "MarkProcessedBatch",
    "ExtendLease",
    "UserPackets",
    "Status",
    "Redrive",
    "Replay",
    "Consume",
    "rest:ingest",
    "rest:packets/pending",
    "rest:packets/mark-processed",
    "rest:packets/user",
    "rest:status",
    "rest:packets/redrive",
    "rest:packets/replay",
    "health",
    "reflection",
    "healthz",
    "readyz",
    "metrics",
    "openapi.json",
];

/// Where each kind of label sits in `LABELS`.
const RPCS: std::ops::Range<usize> = 1..12;
const CONSUME: usize = 11;
const REST: std::ops::Range<usize> = 12..19;
const HEALTH: usize = 19;
const REFLECTION: usize = 20;
const OPS: std::ops::Range<usize> = 21..25;

impl Method {
    pub const COUNT: usize = LABELS.len();

    pub fn of(path: &str) -> Method {
        let (range, name) = if let Some(rpc) = crate::proto::bucket_method(path) {
            (RPCS, rpc)
        } else if let Some(rest) = path.strip_prefix("/api/v1/bucket/prana/") {
            let rest = match rest.strip_prefix("packets/user") {
                // A user's packets; without a user id it is no route.
                Some(user) if user.starts_with('/') => "packets/user",
                Some(_) => return Method::at(0),
                None => rest,
            };
            return Method::find(REST, |l| l.strip_prefix("rest:") == Some(rest));
        } else if matches!(
            path,
            "/grpc.health.v1.Health/Check" | "/grpc.health.v1.Health/Watch"
        ) {
            return Method::at(HEALTH);
        } else if path.starts_with("/grpc.reflection.") {
            return Method::at(REFLECTION);
        } else {
            (OPS, path.strip_prefix('/').unwrap_or(path))
        };
        Method::find(range, |l| l == name)
    }

    /// The label in `range` that `matches`, else `other`.
    fn find(range: std::ops::Range<usize>, matches: impl Fn(&str) -> bool) -> Method {
        let start = range.start;
        LABELS[range]
            .iter()
            .position(|l| matches(l))
            .map_or(Method(0), |i| Method::at(start + i))
    }

    /// The method with this index (below `COUNT`).
    pub fn at(index: usize) -> Method {
        Method(u8::try_from(index).expect("fewer than 256 labels"))
    }

    pub fn index(self) -> usize {
        usize::from(self.0)
    }

    pub fn label(self) -> &'static str {
        LABELS[self.index()]
    }

    /// Methods whose requests are a stream of messages (reflection,
    /// Consume), so a request message over the limit can end the call
    /// after its headers.
    pub fn streams_requests(self) -> bool {
        matches!(self.index(), REFLECTION | CONSUME)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_stay_out_of_the_header_table() {
        assert!(new_id().is_sensitive());
        let mut headers = HeaderMap::new();
        headers.insert(HEADER, HeaderValue::from_static("abc-123"));
        let echoed = given(&headers).expect("a visible ASCII id is echoed");
        assert!(echoed.is_sensitive());
        assert_eq!(echoed, "abc-123");
    }

    #[test]
    fn labels_stay_few() {
        let label = |path| Method::of(path).label();
        assert_eq!(label("/bucket.v1.BucketService/Ingest"), "Ingest");
        assert_eq!(label("/bucket.v1.BucketService/Nope"), "other");
        assert_eq!(label("/bucket.v1.BucketService/rest:ingest"), "other");
        assert_eq!(
            label("/api/v1/bucket/prana/packets/user/alice"),
            "rest:packets/user"
        );
        assert_eq!(label("/api/v1/bucket/prana/ingest"), "rest:ingest");
        assert_eq!(label("/api/v1/bucket/prana/nope"), "other");
        assert_eq!(label("/api/v1/bucket/prana/packets/user"), "other");
        assert_eq!(label("/api/v1/bucket/prana/packets/userx"), "other");
        assert_eq!(
            label("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            "reflection"
        );
        assert!(
            Method::of("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
                .streams_requests()
        );
        assert!(Method::of("/bucket.v1.BucketService/Consume").streams_requests());
        assert!(!Method::of("/bucket.v1.BucketService/Ingest").streams_requests());
        assert_eq!(label("/grpc.health.v1.Health/Check"), "health");
        assert_eq!(label("/metrics"), "metrics");
        assert_eq!(label("/Ingest"), "other");
        assert_eq!(label("/random/guess"), "other");
    }

    #[test]
    fn every_label_has_a_path() {
        for i in 0..Method::COUNT {
            let label = Method::at(i).label();
            let path = if label == "rest:packets/user" {
                "/api/v1/bucket/prana/packets/user/u1".into()
            } else if let Some(rest) = label.strip_prefix("rest:") {
                format!("/api/v1/bucket/prana/{rest}")
            } else if RPCS.contains(&i) {
                format!("/bucket.v1.BucketService/{label}")
            } else if i == HEALTH {
                "/grpc.health.v1.Health/Check".into()
            } else if i == REFLECTION {
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo".into()
            } else {
                format!("/{label}")
            };
            assert_eq!(Method::of(&path), Method::at(i), "{path}");
        }
    }
}
