//! The gRPC front door (also served as gRPC-web): translate only.
mod convert;
mod service;
mod status;

pub use service::BucketGrpc;
pub use status::code_of;

/// The proto → domain conversion of a packet (public for the fuzz target).
pub use convert::draft;
