//! Configuration: every setting is a flag and an environment variable.
use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

#[derive(Debug, Clone, Parser)]
#[command(name = "bucket", version, about = "PRANA telemetry bucket")]
pub struct Config {
    /// Address to serve gRPC, gRPC-web and HTTP on.
    #[arg(long, env = "BUCKET_LISTEN", default_value = "0.0.0.0:3000")]
    pub listen: SocketAddr,

    /// sqlite://FILE or postgres://… ; unset: a bucket.db file in the working directory.
    #[arg(long, env = "DATABASE_URL", default_value = "sqlite://bucket.db")]
    pub database_url: String,

    #[command(flatten)]
    pub redis: RedisConfig,

    #[command(flatten)]
    pub delivery: DeliveryConfig,

    /// Most packets one IngestBatch (or one JSON array) may carry.
    #[arg(long, env = "BUCKET_MAX_BATCH", default_value_t = 500)]
    pub max_batch: usize,

    /// Most queued writes the writer commits in one transaction.
    #[arg(long, env = "BUCKET_MAX_COMMIT", default_value_t = 1000)]
    pub max_commit: usize,

    /// How long a writer lets writes gather before a commit when they come
    /// in company (every commit costs an fsync), in microseconds; unset:
    /// 300 on SQLite, 1000 on PostgreSQL. 0 turns it off.
    #[arg(long, env = "BUCKET_COMMIT_LINGER_US")]
    pub commit_linger_us: Option<u64>,

    /// Largest accepted request body, in bytes.
    #[arg(long, env = "BUCKET_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
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
    /// redis:// or rediss:// URL of the queue; unset (and no REDIS_HOST): in-memory queue.
    #[arg(long, env = "REDIS_URL")]
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
    /// Prefix of every Redis key, so one Redis can serve several deployments.
    #[arg(long, env = "BUCKET_REDIS_PREFIX", default_value = "bucket:")]
    pub redis_prefix: String,
    /// How often the Redis queue is checked against the database's pending
    /// packets (also on every reconnect), in seconds.
    #[arg(long, env = "BUCKET_RECONCILE_SECONDS", default_value_t = 30)]
    pub reconcile_seconds: u64,
}

#[derive(Debug, Clone, clap::Args)]
pub struct DeliveryConfig {
    /// Lease length when a subscriber does not ask for one, in seconds.
    #[arg(long, env = "BUCKET_LEASE_SECONDS", default_value_t = 30)]
    pub lease_seconds: u32,
    /// In-flight packets per stream when a subscriber does not ask.
    #[arg(long, env = "BUCKET_MAX_IN_FLIGHT", default_value_t = 64)]
    pub max_in_flight: u32,
    /// Deliveries before a packet becomes dead_letter.
    #[arg(long, env = "BUCKET_MAX_DELIVERIES", default_value_t = 5)]
    pub max_deliveries: u32,
    /// Longest pause of the lease timer (which otherwise wakes at each
    /// expiry): how often lease ends the database refused are retried, in
    /// milliseconds.
    #[arg(long, env = "BUCKET_SWEEP_MS", default_value_t = 500)]
    pub sweep_ms: u64,
    /// Most packets one node's memory queue holds; a larger backlog waits in
    /// the database and is read back a window at a time.
    #[arg(long, env = "BUCKET_QUEUE_WINDOW", default_value_t = 8192)]
    pub queue_window: usize,
}

impl DeliveryConfig {
    pub fn sweep_interval(&self) -> Duration {
        Duration::from_millis(self.sweep_ms.max(10))
    }
}

impl Config {
    /// Defaults with no flags and no environment, for tests.
    pub fn defaults() -> Self {
        Config::parse_from(["bucket"])
    }
}
