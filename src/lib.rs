//! The PRANA bucket: durable ingest of PRANA telemetry packets and their
//! leased, at-least-once delivery to the Karma Tracker.
pub mod allocator;
pub mod bucket;
pub mod config;
pub mod delivery;
pub mod domain;
pub mod doors;
pub mod edge;
pub mod error;
pub mod grpc;
pub mod http;
pub mod proto;
pub mod queue;
pub mod startup;
pub mod store;
pub mod telemetry;

// The edge's parts at the paths they had before they moved into it.
pub use edge::{auth, limits, request_id, tls};
