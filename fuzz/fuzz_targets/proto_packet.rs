//! Arbitrary bytes as a protobuf `IngestRequest` and `IngestBatchRequest`,
//! through the gRPC door's conversion and `Packet::parse`; the checks are in
//! src/check.rs.
#![no_main]

use bucket_fuzz::proto_packet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| proto_packet(data));
