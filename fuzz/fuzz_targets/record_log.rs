//! Arbitrary bytes as the SQLite record log's segment and block payload:
//! the scan at start-up and the record decoding; the checks are in
//! src/check.rs.
#![no_main]

use bucket_fuzz::record_log;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| record_log(data));
