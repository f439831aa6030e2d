//! Arbitrary bytes as an IngestBatch, MarkProcessedBatch, ExtendLease or
//! Redrive message, through the scan that refuses a list over the batch
//! limit before prost decodes it; the checks are in src/check.rs.
#![no_main]

use bucket_fuzz::batch_limit;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| batch_limit(data));
