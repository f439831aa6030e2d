//! The generated contract, and conversions between protobuf well-known
//! types and the JSON / chrono values the domain uses.
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

mod json_struct;
pub use json_struct::JsonStruct;

#[allow(clippy::all, clippy::pedantic)]
pub mod bucket {
    pub mod v1 {
        tonic::include_proto!("bucket.v1");
    }
}

/// The method a request path names on the bucket's service
/// (`/bucket.v1.BucketService/Ingest`: `Ingest`), or None for any other
/// path: the one place that knows how gRPC spells the service's paths.
pub fn bucket_method(path: &str) -> Option<&str> {
    path.strip_prefix('/')?
        .strip_prefix(bucket::v1::bucket_service_server::SERVICE_NAME)?
        .strip_prefix('/')
}

/// The compiled contract, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("bucket_descriptor");

/// `google/protobuf/any.proto` and `duration.proto`, which the error
/// details (`google/rpc/*.proto`, from tonic-types) import: reflection
/// serves a file only with its imports.
pub const WELL_KNOWN_TYPES: &[u8] = tonic::include_file_descriptor_set!("well_known_descriptor");

pub fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    }
}

/// A proto Timestamp as a date-time, or why it is not one.
pub fn from_timestamp(ts: &prost_types::Timestamp) -> Result<DateTime<Utc>, String> {
    u32::try_from(ts.nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)
        .and_then(|nanos| DateTime::from_timestamp(ts.seconds, nanos))
        .ok_or_else(|| format!("timestamp {}s {}ns is out of range", ts.seconds, ts.nanos))
}

/// A JSON object as the contract's Struct, for whoever builds a request.
pub fn json_to_struct(map: &Map<String, Value>) -> JsonStruct {
    JsonStruct(map.clone())
}

/// A karma action as a Struct; a non-object action (the REST door accepts
/// any JSON) is wrapped as `{"value": …}`.
pub fn action_to_struct(action: &Value) -> JsonStruct {
    match action {
        Value::Object(map) => json_to_struct(map),
        other => JsonStruct(Map::from_iter([("value".to_owned(), other.clone())])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_bucket_services_paths_name_its_methods() {
        assert_eq!(
            bucket_method("/bucket.v1.BucketService/Ingest"),
            Some("Ingest")
        );
        assert_eq!(
            bucket_method("/bucket.v1.BucketService/Unknown"),
            Some("Unknown")
        );
        assert_eq!(bucket_method("/bucket.v1.BucketServiceX/Ingest"), None);
        assert_eq!(bucket_method("/bucket.v1.BucketService"), None);
        assert_eq!(bucket_method("bucket.v1.BucketService/Ingest"), None);
        assert_eq!(bucket_method("/grpc.health.v1.Health/Check"), None);
        assert_eq!(bucket_method("/api/v1/bucket/prana/ingest"), None);
    }

    #[test]
    fn timestamps_round_trip_and_reject_bad_nanos() {
        let at: DateTime<Utc> = "2024-01-20T10:30:00.25Z".parse().unwrap();
        assert_eq!(from_timestamp(&timestamp(at)).unwrap(), at);
        assert!(
            from_timestamp(&prost_types::Timestamp {
                seconds: 0,
                nanos: -1
            })
            .is_err()
        );
    }
}
