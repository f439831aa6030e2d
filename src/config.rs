//! Configuration: every setting is a flag and an environment variable.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::domain::lease::MAX_LEASE_SECONDS;
use crate::domain::subscribe::MAX_IN_FLIGHT;

#[derive(Debug, Clone, Parser)]
#[command(name = "bucket", version, about = "PRANA telemetry bucket")]
pub struct Config {
    /// Address to serve gRPC, gRPC-web and HTTP on.
    #[arg(long, env = "BUCKET_LISTEN", default_value = "0.0.0.0:3000")]
    pub listen: SocketAddr,

    /// sqlite://FILE or postgres://… ; unset: a bucket.db file in the working directory.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "sqlite://bucket.db",
        hide_env_values = true
    )]
    pub database_url: String,

    #[command(flatten)]
    pub redis: RedisConfig,

    #[command(flatten)]
    pub delivery: DeliveryConfig,

    #[command(flatten)]
    pub auth: AuthConfig,

    #[command(flatten)]
    pub tls: TlsConfig,

    #[command(flatten)]
    pub limits: LimitsConfig,

    /// Most packets one IngestBatch (or one JSON array) may carry.
    #[arg(long, env = "BUCKET_MAX_BATCH", default_value_t = 500, value_parser = usize_in::<1, 10_000>)]
    pub max_batch: usize,

    /// Inserts waiting for a commit at once; past it ingest answers
    /// UNAVAILABLE (retry with backoff) instead of queueing without bound.
    #[arg(long, env = "BUCKET_MAX_QUEUED_WRITES", default_value_t = 100_000, value_parser = usize_in::<1, 10_000_000>)]
    pub max_queued_writes: usize,

    /// Most inserts one commit takes (every waiting mark and lease end
    /// joins it too); unset: 128 on SQLite, 1000 on PostgreSQL.
    #[arg(long, env = "BUCKET_MAX_COMMIT", value_parser = usize_in::<1, 100_000>)]
    pub max_commit: Option<usize>,

    /// How long a writer lets writes gather before a commit when they come
    /// in company (every commit costs an fsync), in microseconds; unset:
    /// on SQLite 300, growing with the company to 3,500 (there also the
    /// least time between two commits in company); on PostgreSQL 1,000,
    /// growing to 5,000.
    /// Set, the wait is fixed; 0 turns it off.
    #[arg(long, env = "BUCKET_COMMIT_LINGER_US")]
    pub commit_linger_us: Option<u64>,

    /// Threads serving the doors (the async runtime's workers); unset: on
    /// SQLite one fewer than the cores, at least one (the record log's
    /// writer and the fold are threads of their own), on PostgreSQL one a
    /// core. Two workers on 2 cores split each commit's answers between
    /// them (a wake of the other worker, a socket write each): at 5,000
    /// packets/s ~1 syscall and 6-12 µs of CPU a packet more than one
    /// worker, which delivers as much at saturation (BENCHMARKS.md,
    /// twenty-second session).
    #[arg(long, env = "BUCKET_WORKER_THREADS", value_parser = usize_in::<1, 1024>)]
    pub worker_threads: Option<usize>,

    /// Finished packets (processed, failed, dead_letter) older than this, by
    /// received_at, are deleted: `30d`, `12h`, `90m`, or `off` to keep
    /// everything. Pending packets are never deleted.
    #[arg(long, env = "BUCKET_RETENTION", default_value = "30d", value_parser = crate::store::retention::parse)]
    pub retention: crate::store::retention::Retention,

    /// Largest accepted request body, in bytes.
    #[arg(long, env = "BUCKET_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024, value_parser = usize_in::<1024, { 256 * 1024 * 1024 }>)]
    pub max_body_bytes: usize,

    /// Browser origins allowed to call gRPC-web and the JSON gateway, comma-separated; `*` for any.
    #[arg(
        long,
        env = "BUCKET_CORS_ORIGINS",
        value_delimiter = ',',
        default_value = "*"
    )]
    pub cors_origins: Vec<String>,

    /// Log as JSON lines instead of text.
    #[arg(long, env = "BUCKET_LOG_JSON", default_value_t = false)]
    pub log_json: bool,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RedisConfig {
    /// redis:// or rediss:// URL of the queue (redis-cluster://host:port?node=host2:port2
    /// for a Redis Cluster); unset (and no REDIS_HOST): in-memory queue.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// The seed's Redis host, used when REDIS_URL is unset.
    #[arg(long, env = "REDIS_HOST")]
    pub redis_host: Option<String>,
    #[arg(long, env = "REDIS_PORT", default_value_t = 6379)]
    pub redis_port: u16,
    #[arg(long, env = "REDIS_USERNAME")]
    pub redis_username: Option<String>,
    #[arg(long, env = "REDIS_PASSWORD", hide_env_values = true)]
    pub redis_password: Option<String>,
    /// The Redis is a Redis Cluster, and REDIS_HOST (or REDIS_URL's host)
    /// one of its nodes; the others are discovered.
    #[arg(long, env = "BUCKET_REDIS_CLUSTER", default_value_t = false)]
    pub redis_cluster: bool,
    /// Prefix of every Redis key, so one Redis can serve several deployments.
    #[arg(long, env = "BUCKET_REDIS_PREFIX", default_value = "bucket:")]
    pub redis_prefix: String,
    /// Stream keys the queue is split over, so a Redis Cluster spreads it
    /// over its nodes; 1 keeps the single key `{prefix}pending`. Every node
    /// of a deployment must use the same number.
    #[arg(long, env = "BUCKET_REDIS_SHARDS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub redis_shards: u16,
    /// How often the Redis queue is checked against the database's pending
    /// packets (also on every reconnect), in seconds.
    #[arg(long, env = "BUCKET_RECONCILE_SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub reconcile_seconds: u64,
}

#[derive(Debug, Clone, clap::Args)]
pub struct DeliveryConfig {
    /// Lease length when a subscriber does not ask for one, in seconds.
    #[arg(long, env = "BUCKET_LEASE_SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_LEASE_SECONDS)))]
    pub lease_seconds: u32,
    /// In-flight packets per stream when a subscriber does not ask.
    #[arg(long, env = "BUCKET_MAX_IN_FLIGHT", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_IN_FLIGHT)))]
    pub max_in_flight: u32,
    /// Deliveries before a packet becomes dead_letter.
    #[arg(long, env = "BUCKET_MAX_DELIVERIES", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_deliveries: u32,
    /// Longest pause of the lease timer (which otherwise wakes at each
    /// expiry): how often lease ends the database refused are retried, in
    /// milliseconds.
    #[arg(long, env = "BUCKET_SWEEP_MS", default_value_t = 500, value_parser = clap::value_parser!(u64).range(10..=60000))]
    pub sweep_ms: u64,
    /// Most packets one node's memory queue holds; a larger backlog waits in
    /// the database and is read back a window at a time.
    #[arg(long, env = "BUCKET_QUEUE_WINDOW", default_value_t = 8192, value_parser = usize_in::<2, 10_000_000>)]
    pub queue_window: usize,
    /// Leases the JSON gateway's polls (packets/pending) hold at once on one
    /// node; past it a poll gets fewer packets, or none, until some are
    /// marked or their leases end.
    #[arg(long, env = "BUCKET_MAX_POLL_LEASES", default_value_t = 1000, value_parser = usize_in::<1, 1_000_000>)]
    pub max_poll_leases: usize,
}

/// Bearer tokens by role. A role without tokens is open to anyone (and the
/// startup log says so); an admin token may do everything.
#[derive(Clone, Default, clap::Args)]
pub struct AuthConfig {
    /// Tokens of PRANA's browsers (Ingest, IngestBatch, REST ingest), comma-separated.
    #[arg(
        long,
        env = "BUCKET_INGEST_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub ingest_tokens: Vec<String>,
    /// A file of ingest tokens (comma- or line-separated), so they stay out
    /// of process listings.
    #[arg(long, env = "BUCKET_INGEST_TOKENS_FILE")]
    pub ingest_tokens_file: Option<PathBuf>,
    /// Tokens of consumers (StreamPending, MarkProcessed, MarkProcessedBatch,
    /// REST packets/pending and packets/mark-processed).
    #[arg(
        long,
        env = "BUCKET_CONSUMER_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub consumer_tokens: Vec<String>,
    #[arg(long, env = "BUCKET_CONSUMER_TOKENS_FILE")]
    pub consumer_tokens_file: Option<PathBuf>,
    /// Tokens of operators (UserPackets, REST packets/user/…, the consumer
    /// list in Status), allowed everything.
    #[arg(
        long,
        env = "BUCKET_ADMIN_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub admin_tokens: Vec<String>,
    #[arg(long, env = "BUCKET_ADMIN_TOKENS_FILE")]
    pub admin_tokens_file: Option<PathBuf>,
    /// With no admin tokens, answer admin calls from anywhere, not only
    /// from loopback (logged at startup).
    #[arg(long, env = "BUCKET_ADMIN_OPEN", default_value_t = false)]
    pub admin_open: bool,
}

impl std::fmt::Debug for AuthConfig {
    // Never the tokens themselves: configs end up in logs and panics.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("ingest_tokens", &self.ingest_tokens.len())
            .field("ingest_tokens_file", &self.ingest_tokens_file)
            .field("consumer_tokens", &self.consumer_tokens.len())
            .field("consumer_tokens_file", &self.consumer_tokens_file)
            .field("admin_tokens", &self.admin_tokens.len())
            .field("admin_tokens_file", &self.admin_tokens_file)
            .field("admin_open", &self.admin_open)
            .finish()
    }
}

/// TLS on the one port (gRPC, gRPC-web and HTTP alike); both or neither.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsConfig {
    /// PEM certificate chain.
    #[arg(long, env = "BUCKET_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key.
    #[arg(long, env = "BUCKET_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

/// Limits that hold under abuse.
#[derive(Debug, Clone, clap::Args)]
pub struct LimitsConfig {
    /// Subscribers (StreamPending calls) one node serves at once; more are
    /// refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "BUCKET_MAX_SUBSCRIBERS", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_subscribers: u32,

    /// On SIGTERM, how long requests under way may take to finish before
    /// their connections are closed (streams end at once, their leases
    /// handed back).
    #[arg(long, env = "BUCKET_SHUTDOWN_GRACE_SECONDS", default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub shutdown_grace_seconds: u64,
    /// Concurrent HTTP/2 streams (calls) on one connection.
    #[arg(long, env = "BUCKET_MAX_CONCURRENT_STREAMS", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_streams: u32,
    /// HTTP/2 keepalive: a ping after this many idle seconds...
    #[arg(long, env = "BUCKET_KEEPALIVE_SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub keepalive_seconds: u64,
    /// ...and the connection is closed when it is not answered within this many.
    #[arg(long, env = "BUCKET_KEEPALIVE_TIMEOUT_SECONDS", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    pub keepalive_timeout_seconds: u64,
    /// Connections one node holds open at once; one more is closed as it
    /// is accepted.
    #[arg(long, env = "BUCKET_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = usize_in::<1, 1_000_000>)]
    pub max_connections: usize,
    /// From a connection's accept (with TLS, its handshake's end) to its
    /// first request: `10s`, `1m`, or `off`.
    #[arg(long, env = "BUCKET_PREFACE_TIMEOUT", default_value = "10s", value_parser = period)]
    pub preface_timeout: Period,
    /// How long a connection may stay with no request under way: `120s`,
    /// `5m`, or `off`.
    #[arg(long, env = "BUCKET_IDLE_TIMEOUT", default_value = "120s", value_parser = period)]
    pub idle_timeout: Period,
    /// After this a connection is asked to close (HTTP/2 GOAWAY; calls
    /// under way finish), so clients spread again over the nodes: `1h`, or
    /// `off`.
    #[arg(long, env = "BUCKET_MAX_CONNECTION_AGE", default_value = "3600s", value_parser = period)]
    pub max_connection_age: Period,
    /// How long calls under way may take after the age is reached before
    /// the connection is closed.
    #[arg(long, env = "BUCKET_MAX_CONNECTION_AGE_GRACE", default_value = "60s", value_parser = period)]
    pub max_connection_age_grace: Period,
    /// Ingest calls (Ingest, IngestBatch, REST ingest) one client may make
    /// per second, by token, else by address; 0: no limit.
    #[arg(long, env = "BUCKET_INGEST_RATE", default_value_t = 0)]
    pub ingest_rate: u32,
    /// Calls a client may make at once above the rate (the bucket's size);
    /// 0: twice the rate.
    #[arg(long, env = "BUCKET_INGEST_BURST", default_value_t = 0)]
    pub ingest_burst: u32,
}

/// A length of time, or none (`off`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period(pub Option<Duration>);

/// `10s`, `2m`, `1h`, `1d`, or `off`.
fn period(text: &str) -> Result<Period, String> {
    crate::store::retention::parse_period(text).map(Period)
}

impl DeliveryConfig {
    pub fn sweep_interval(&self) -> Duration {
        Duration::from_millis(self.sweep_ms.max(10))
    }
}

impl Config {
    /// The runtime's workers: `worker_threads`, else the default for the
    /// store on a machine of `cores`.
    pub fn runtime_workers(&self, cores: usize) -> usize {
        self.worker_threads.unwrap_or(
            if self.database_url.starts_with("sqlite:") {
                cores.saturating_sub(1)
            } else {
                cores
            }
            .max(1),
        )
    }

    /// Defaults with no flags and no environment, for tests: a `BUCKET_*`,
    /// `DATABASE_URL` or `REDIS_*` in the shell that runs them changes
    /// nothing.
    pub fn defaults() -> Self {
        let command = <Config as clap::CommandFactory>::command()
            .mut_args(|arg| arg.env(None::<&'static str>));
        let matches = command.get_matches_from(["bucket"]);
        <Config as clap::FromArgMatches>::from_arg_matches(&matches)
            .expect("the defaults are valid")
    }
}

/// A database or Redis URL fit for logs: no password (in the authority or
/// as a `password=` query parameter); what is left names the server.
pub fn redact_url(url: &str) -> String {
    const HIDDEN: &str = "…";
    let Ok(mut parsed) = url::Url::parse(url) else {
        // Not a URL the parser takes: keep only what surely holds no secret.
        return match url.split_once("://") {
            Some((scheme, rest)) => {
                let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
                let host = host.split_once('?').map_or(host, |(host, _)| host);
                format!("{scheme}://{HIDDEN}@{host}")
            }
            None => HIDDEN.to_owned(),
        };
    };
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some(HIDDEN));
    }
    if parsed.query().is_some() {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(key, value)| {
                let secret = ["password", "pass", "pwd", "sslpassword", "token", "secret"]
                    .iter()
                    .any(|s| key.eq_ignore_ascii_case(s));
                let value = if secret {
                    HIDDEN.to_owned()
                } else {
                    value.into_owned()
                };
                (key.into_owned(), value)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    // `…` was percent-encoded by the setters; read back as typed.
    parsed.to_string().replace("%E2%80%A6", HIDDEN)
}

/// A whole number in `MIN..=MAX`, refused at startup otherwise (never
/// clamped behind the operator's back).
fn usize_in<const MIN: usize, const MAX: usize>(text: &str) -> Result<usize, String> {
    let n: usize = text.trim().parse().map_err(|e| format!("{text:?}: {e}"))?;
    if (MIN..=MAX).contains(&n) {
        Ok(n)
    } else {
        Err(format!("{n} is not in {MIN}..={MAX}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_leave_a_core_to_sqlite_s_threads_unless_set() {
        let mut config = Config::defaults();
        assert_eq!(config.worker_threads, None);
        assert_eq!(config.runtime_workers(1), 1);
        assert_eq!(config.runtime_workers(2), 1);
        assert_eq!(config.runtime_workers(8), 7);
        config.database_url = "postgres://bucket@db/bucket".into();
        assert_eq!(config.runtime_workers(1), 1);
        assert_eq!(config.runtime_workers(2), 2);
        config.worker_threads = Some(3);
        assert_eq!(config.runtime_workers(2), 3);
        let parsed = Config::try_parse_from(["bucket", "--worker-threads", "2"]).unwrap();
        assert_eq!(parsed.worker_threads, Some(2));
        assert!(Config::try_parse_from(["bucket", "--worker-threads", "0"]).is_err());
    }

    #[test]
    fn defaults_ignore_the_environment() {
        // SAFETY: nextest runs each test in a process of its own; no other
        // thread reads the environment here.
        unsafe {
            std::env::set_var("BUCKET_MAX_BATCH", "7");
            std::env::set_var("DATABASE_URL", "postgres://elsewhere/db");
            std::env::set_var("REDIS_HOST", "redis.elsewhere");
        }
        let config = Config::defaults();
        assert_eq!(config.max_batch, 500);
        assert_eq!(config.database_url, "sqlite://bucket.db");
        assert_eq!(config.redis.redis_host, None);
        // The real parse does read them.
        assert_eq!(Config::parse_from(["bucket"]).max_batch, 7);
    }

    #[test]
    fn urls_lose_every_password() {
        for (url, secret, kept) in [
            ("postgres://u:p@ss@db/x", "ss", "db/x"),
            ("postgres://u:hunter2@db:5432/x", "hunter2", "db:5432/x"),
            (
                "postgres://db/x?user=u&password=hunter2",
                "hunter2",
                "user=u",
            ),
            (
                "postgres://db/x?sslmode=require&PASSWORD=hunter2",
                "hunter2",
                "sslmode=require",
            ),
            ("redis://:hunter2@cache:6379", "hunter2", "cache:6379"),
            ("rediss://default:hunter2@cache", "hunter2", "cache"),
            ("not a url :hunter2@db?password=hunter2", "hunter2", ""),
        ] {
            let shown = redact_url(url);
            assert!(!shown.contains(secret), "{url} -> {shown}");
            assert!(shown.contains(kept), "{url} -> {shown}");
        }
        assert_eq!(redact_url("sqlite://bucket.db"), "sqlite://bucket.db");
    }

    #[test]
    fn bounds_are_refused_not_clamped() {
        for args in [
            ["bucket", "--max-deliveries", "0"],
            ["bucket", "--max-deliveries", "4294967296"],
            ["bucket", "--queue-window", "1"],
            ["bucket", "--max-batch", "0"],
            ["bucket", "--lease-seconds", "3601"],
        ] {
            assert!(Config::try_parse_from(args).is_err(), "{args:?}");
        }
    }
}
