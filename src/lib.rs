//! The PRANA bucket: durable ingest of PRANA telemetry packets and their
//! leased, at-least-once delivery to the Karma Tracker.
pub mod auth;
pub mod bucket;
pub mod config;
pub mod delivery;
pub mod domain;
pub mod edge;
pub mod error;
pub mod grpc;
pub mod http;
pub mod limits;
pub mod proto;
pub mod queue;
pub mod request_id;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod tls;
