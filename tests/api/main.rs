//! Over-the-wire tests of the core service, on SQLite and on PostgreSQL.
mod helpers;

mod delivery;
mod gateway;
mod ingest;
mod ops;
mod queries;
mod redis_queue;
