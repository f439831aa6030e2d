//! Starts the real server on port 0 with a fresh database, and talks to it
//! over the wire.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bucket::config::Config;
use bucket::proto::bucket::v1 as pb;
use bucket::proto::bucket::v1::bucket_service_client::BucketServiceClient;
use bucket::startup::Application;
use sqlx::Row;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use tonic::transport::Channel;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    /// PostgreSQL with the Redis queue (keys under a prefix of the test's own).
    Redis,
}

/// Generates one test per backend from `async fn name(backend: Backend)`.
#[macro_export]
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::Backend::Postgres).await
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::Backend::Redis).await
                }
            )*
        }
    };
}

/// A database that exists for one test and is dropped after it.
pub struct TestDb {
    pub url: String,
    /// The Redis queue's URL and key prefix, for `Backend::Redis`.
    pub redis: Option<(String, String)>,
    _dir: Option<tempfile::TempDir>,
    pg_name: Option<String>,
    /// The stores of the apps on this database: their tables are brought
    /// up to date before a test reads them (SQLite keeps what it just
    /// acknowledged in its record log for up to a second).
    stores: std::sync::Mutex<Vec<bucket::store::TableSync>>,
}

/// The PostgreSQL server the tests create their databases on.
pub fn postgres_admin_url() -> String {
    std::env::var("BUCKET_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// The shared Redis server of the tests.
pub fn redis_url() -> String {
    std::env::var("BUCKET_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

impl TestDb {
    pub async fn new(backend: Backend) -> Arc<TestDb> {
        Arc::new(match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("tempdir");
                TestDb {
                    url: format!("sqlite://{}/bucket.db", dir.path().display()),
                    redis: None,
                    _dir: Some(dir),
                    pg_name: None,
                    stores: Default::default(),
                }
            }
            Backend::Postgres | Backend::Redis => {
                let admin = postgres_admin_url();
                let name = format!("bucket_test_{}", uuid::Uuid::new_v4().simple());
                let pool = sqlx::PgPool::connect(&admin)
                    .await
                    .expect("PostgreSQL for tests (BUCKET_TEST_POSTGRES_URL)");
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&pool)
                    .await
                    .expect("create test database");
                pool.close().await;
                let base = admin.rsplit_once('/').expect("URL with a database").0;
                let redis = (backend == Backend::Redis).then(|| {
                    (
                        redis_url(),
                        format!("bucket-test-{}:", uuid::Uuid::new_v4().simple()),
                    )
                });
                TestDb {
                    url: format!("{base}/{name}"),
                    redis,
                    _dir: None,
                    pg_name: Some(name),
                    stores: Default::default(),
                }
            }
        })
    }

    /// Brings the tables of every app on this database up to date.
    pub async fn sync_tables(&self) {
        let stores = self.stores.lock().unwrap().clone();
        for store in stores {
            store.sync().await;
        }
    }

    /// Packets per status, read straight from the database.
    pub async fn status_counts(&self) -> std::collections::HashMap<String, i64> {
        self.sync_tables().await;
        let sql = "SELECT status, COUNT(*) AS n FROM packets GROUP BY status";
        let rows: Vec<(String, i64)> = if self.pg_name.is_some() {
            let pool = sqlx::PgPool::connect(&self.url).await.unwrap();
            let rows = sqlx::query(sql).fetch_all(&pool).await.unwrap();
            pool.close().await;
            rows.iter().map(|r| (r.get("status"), r.get("n"))).collect()
        } else {
            let pool = sqlx::SqlitePool::connect(&self.url).await.unwrap();
            let rows = sqlx::query(sql).fetch_all(&pool).await.unwrap();
            pool.close().await;
            rows.iter().map(|r| (r.get("status"), r.get("n"))).collect()
        };
        rows.into_iter().collect()
    }
}

impl TestDb {
    /// Takes storage away from the server: PostgreSQL refuses connections
    /// (and drops the open ones); SQLite's record log refuses writes (its
    /// files made immutable) and its table is gone.
    pub async fn break_storage(&self) {
        self.record_log_immutable(true);
        self.admin_sql(
            &[
                "ALTER DATABASE {db} ALLOW_CONNECTIONS false",
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}'",
            ],
            "ALTER TABLE packets RENAME TO packets_away",
        )
        .await;
    }

    pub async fn mend_storage(&self) {
        self.record_log_immutable(false);
        self.admin_sql(
            &["ALTER DATABASE {db} ALLOW_CONNECTIONS true"],
            "ALTER TABLE packets_away RENAME TO packets",
        )
        .await;
    }

    /// `chattr ±i` on the SQLite record log's directory and files: a write
    /// through a descriptor already open fails (EPERM), even for root.
    fn record_log_immutable(&self, on: bool) {
        let Some(db) = self.url.strip_prefix("sqlite://") else {
            return;
        };
        let dir = format!("{db}-records");
        let mut paths: Vec<String> = std::fs::read_dir(&dir)
            .expect("the record log's directory")
            .map(|e| e.unwrap().path().display().to_string())
            .collect();
        paths.push(dir);
        let flag = if on { "+i" } else { "-i" };
        let status = std::process::Command::new("chattr")
            .arg(flag)
            .args(&paths)
            .status()
            .expect("chattr (e2fsprogs)");
        assert!(status.success(), "chattr {flag} {paths:?}");
    }

    async fn admin_sql(&self, pg: &[&str], sqlite: &str) {
        match &self.pg_name {
            Some(name) => {
                let pool = sqlx::PgPool::connect(&postgres_admin_url()).await.unwrap();
                for sql in pg {
                    sqlx::query(&sql.replace("{db}", name))
                        .execute(&pool)
                        .await
                        .unwrap();
                }
                pool.close().await;
            }
            None => {
                let pool = sqlx::SqlitePool::connect(&self.url).await.unwrap();
                sqlx::query(sqlite).execute(&pool).await.unwrap();
                pool.close().await;
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let pg_name = self.pg_name.take();
        let redis = self.redis.take();
        if pg_name.is_none() && redis.is_none() {
            return;
        }
        // Drop runs outside any runtime we may block; use a thread of its own.
        let admin = postgres_admin_url();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Some(name) = pg_name
                    && let Ok(pool) = sqlx::PgPool::connect(&admin).await
                {
                    let drop = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                    let _ = sqlx::query(&drop).execute(&pool).await;
                    pool.close().await;
                }
                if let Some((url, prefix)) = redis {
                    use fred::prelude::*;
                    let client = Builder::from_config(Config::from_url(&url).unwrap()).build();
                    if let Ok(client) = client
                        && client.init().await.is_ok()
                    {
                        let _: Result<(), _> = client.del(format!("{prefix}pending")).await;
                        let _ = client.quit().await;
                    }
                }
            });
        })
        .join();
    }
}

/// Test defaults: a quick sweeper so lease expiry shows within a second.
pub fn test_config(db: &TestDb) -> Config {
    let mut config = Config::defaults();
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.database_url = db.url.clone();
    config.redis.redis_url = db.redis.as_ref().map(|(url, _)| url.clone());
    config.redis.redis_host = None;
    if let Some((_, prefix)) = &db.redis {
        config.redis.redis_prefix = prefix.clone();
    }
    config.delivery.sweep_ms = 50;
    config
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub db: Arc<TestDb>,
    pub config: Config,
    /// Asked in-process what the node holds in memory; weak, so a stopped
    /// node lets go of its store and Redis clients.
    dispatcher: std::sync::Weak<bucket::delivery::Dispatcher>,
    stop: CancellationToken,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestApp {
    pub async fn spawn(backend: Backend) -> TestApp {
        let db = TestDb::new(backend).await;
        let config = test_config(&db);
        TestApp::spawn_with(db, config).await
    }

    pub async fn spawn_with(db: Arc<TestDb>, config: Config) -> TestApp {
        if std::env::var_os("RUST_LOG").is_some() {
            bucket::telemetry::init_logs(false);
        }
        let app = Application::build(config.clone())
            .await
            .expect("app builds");
        let addr = app.local_addr();
        let dispatcher = Arc::downgrade(app.dispatcher());
        db.stores.lock().unwrap().push(app.store().table_sync());
        let stop = CancellationToken::new();
        let handle = tokio::spawn(app.run(stop.clone().cancelled_owned()));
        TestApp {
            addr,
            db,
            config,
            dispatcher,
            stop,
            handle: Some(handle),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The packets this node holds in memory (waiting, leased).
    pub fn held(&self) -> bucket::delivery::Held {
        self.dispatcher.upgrade().expect("the node runs").held()
    }

    pub async fn client(&self) -> BucketServiceClient<Channel> {
        BucketServiceClient::connect(self.url())
            .await
            .expect("connect")
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(mut self) -> Arc<TestDb> {
        self.shutdown().await;
        self.db.clone()
    }

    async fn shutdown(&mut self) {
        self.stop.cancel();
        if let Some(handle) = self.handle.take() {
            tokio::time::timeout(Duration::from_secs(20), handle)
                .await
                .expect("server stops within 20 s")
                .expect("server task")
                .expect("server ran cleanly");
        }
    }

    /// Stops and starts again on the same database.
    pub async fn restart(self) -> TestApp {
        let config = self.config.clone();
        let db = self.stop().await;
        TestApp::spawn_with(db, config).await
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The seed document's example packet.
pub fn seed_packet() -> pb::PacketInput {
    pb::PacketInput {
        user_id: "user_123".into(),
        session_id: "session_456".into(),
        lesson_id: "lesson_789".into(),
        system_type: pb::SystemType::Gurukul as i32,
        role: pb::Role::Student as i32,
        timestamp: Some(prost_types::Timestamp {
            seconds: 1_705_746_600, // 2024-01-20T10:30:00Z
            nanos: 0,
        }),
        cognitive_state: "ON_TASK".into(),
        active_seconds: 4.5,
        idle_seconds: 0.3,
        away_seconds: 0.2,
        focus_score: Some(85.0),
        raw_signals: Some(bucket::proto::json_to_struct(
            serde_json::json!({"dwell_time_ms": 1200, "mouse_velocity": 0.5})
                .as_object()
                .unwrap(),
        )),
        ..Default::default()
    }
}

/// The seed packet for `user`.
pub fn packet_for(user: &str) -> pb::PacketInput {
    pb::PacketInput {
        user_id: user.into(),
        ..seed_packet()
    }
}

pub async fn ingest(client: &mut BucketServiceClient<Channel>, packet: pb::PacketInput) -> String {
    client
        .ingest(pb::IngestRequest {
            packet: Some(packet),
        })
        .await
        .expect("ingest")
        .into_inner()
        .packet_id
}

pub async fn subscribe(
    client: &mut BucketServiceClient<Channel>,
    consumer: &str,
    max_in_flight: u32,
    lease_seconds: u32,
) -> Streaming<pb::StreamPendingResponse> {
    client
        .stream_pending(pb::StreamPendingRequest {
            consumer: consumer.into(),
            max_in_flight,
            lease_seconds,
        })
        .await
        .expect("subscribe")
        .into_inner()
}

/// The next delivery, failing the test after 10 s.
pub async fn next(stream: &mut Streaming<pb::StreamPendingResponse>) -> pb::StreamPendingResponse {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a delivery within 10 s")
        .expect("stream ok")
        .expect("stream open")
}

/// Asserts nothing is delivered for `ms` milliseconds.
pub async fn assert_quiet(stream: &mut Streaming<pb::StreamPendingResponse>, ms: u64) {
    if let Ok(msg) = tokio::time::timeout(Duration::from_millis(ms), stream.message()).await {
        panic!("expected no delivery, got {msg:?}");
    }
}

pub async fn mark(
    client: &mut BucketServiceClient<Channel>,
    packet_id: &str,
) -> pb::MarkProcessedResponse {
    mark_outcome(client, packet_id, true).await
}

/// Marks `packet_id` failed, without an error message.
pub async fn mark_failed(
    client: &mut BucketServiceClient<Channel>,
    packet_id: &str,
) -> pb::MarkProcessedResponse {
    mark_outcome(client, packet_id, false).await
}

async fn mark_outcome(
    client: &mut BucketServiceClient<Channel>,
    packet_id: &str,
    success: bool,
) -> pb::MarkProcessedResponse {
    client
        .mark_processed(pb::MarkProcessedRequest {
            packet_id: packet_id.into(),
            success,
            ..Default::default()
        })
        .await
        .expect("mark processed")
        .into_inner()
}

pub async fn status(client: &mut BucketServiceClient<Channel>) -> pb::StatusResponse {
    client
        .status(pb::StatusRequest {})
        .await
        .expect("status")
        .into_inner()
}

/// The first page of a user's packets, every status, newest first.
pub async fn user_packets(
    client: &mut BucketServiceClient<Channel>,
    user: &str,
) -> Vec<pb::Packet> {
    client
        .user_packets(pb::UserPacketsRequest {
            user_id: user.into(),
            ..Default::default()
        })
        .await
        .expect("user packets")
        .into_inner()
        .packets
}

/// splitmix64: what a seeded test draws is a function of its seed alone,
/// so a printed seed replays the run.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
