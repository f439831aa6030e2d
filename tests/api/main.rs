//! Over-the-wire tests of the core service, on SQLite and on PostgreSQL.
mod helpers;

mod delivery;
mod ingest;
mod queries;
mod redis_queue;
