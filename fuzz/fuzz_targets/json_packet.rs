//! Arbitrary bytes as a JSON gateway body: one packet, or an array of them
//! (a batch), through `bucket::http::draft` and `Packet::parse`; the
//! checks are in src/check.rs.
#![no_main]

use bucket_fuzz::json_packet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| json_packet(data));
