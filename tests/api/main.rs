//! Over-the-wire tests against a real server started on port 0: the core
//! service on SQLite, PostgreSQL and PostgreSQL + Redis, and every front door.
mod helpers;

mod bad_input;
mod browser;
mod client;
mod consume;
mod crash;
mod defaults;
mod delivery;
mod deploy;
mod faults;
mod fuzz_regressions;
mod gateway;
mod hardening;
mod ingest;
mod marks;
mod nemesis;
mod openapi;
mod operator;
mod ops;
mod own_postgres;
mod partial_faults;
mod pg_plans;
mod proxy;
mod queries;
mod redis_cluster;
mod redis_queue;
mod retention;
mod security;
mod walkthrough;
