//! A nemesis and a checker (issue 16), after Jepsen's queue tests: three
//! bucket nodes (the real binary, as child processes) on one PostgreSQL
//! database and a Redis of the test's own; producers that retry each
//! packet with the same `packet_id` until it is acknowledged; consumers
//! that mark every delivery (some slowly, some dropping their stream now
//! and then); and a nemesis that, at moments drawn from a seed, SIGKILLs
//! and restarts a node, SIGSTOPs one past its liveness key's TTL, drops
//! every Redis connection, has Redis refuse XADD or pause, terminates the
//! PostgreSQL backends, and restarts Redis empty. After the faults heal,
//! the checker asserts that every acknowledged packet ended processed (or
//! dead_letter after `max_deliveries` deliveries), that nothing is left
//! pending, that nothing was stored that no producer sent, and that every
//! packet a consumer marked is processed; it reports the duplicates.
//!
//! `BUCKET_NEMESIS_SEED` replays a schedule (the seed is printed);
//! `BUCKET_NEMESIS_SECONDS` sets how long faults are thrown (60).
use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bucket::proto::bucket::v1 as pb;
use bucket::proto::bucket::v1::bucket_service_client::BucketServiceClient;
use tokio::process::{Child, Command};
use tonic::transport::{Channel, Endpoint};

use crate::helpers::{Backend, Rng, TestDb, packet_for, postgres_admin_url};
use crate::redis_queue::OwnRedis;

const NODES: usize = 3;
const MAX_DELIVERIES: u32 = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillNode(usize),
    PauseNode(usize),
    DropRedisClients,
    RefuseXadd,
    PauseRedis,
    TerminatePostgres,
    RestartRedisEmpty,
}

impl Fault {
    /// How long the nemesis spends throwing it.
    fn lasts(&self) -> Duration {
        match self {
            Fault::KillNode(_) => Duration::from_secs(1),
            Fault::PauseNode(_) => Duration::from_secs(12),
            Fault::RefuseXadd => Duration::from_secs(3),
            _ => Duration::ZERO,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Fault::KillNode(_) => "SIGKILL a node, restart it",
            Fault::PauseNode(_) => "SIGSTOP a node 12 s (past its liveness TTL)",
            Fault::DropRedisClients => "CLIENT KILL every Redis client",
            Fault::RefuseXadd => "Redis refuses XADD for 3 s (ACL)",
            Fault::PauseRedis => "CLIENT PAUSE Redis 2 s",
            Fault::TerminatePostgres => "pg_terminate_backend every bucket backend",
            Fault::RestartRedisEmpty => "restart Redis empty",
        }
    }
}

/// The faults and the pause before each, drawn from the seed.
fn schedule(seed: u64, within: Duration) -> Vec<(Duration, Fault)> {
    let mut rng = Rng(seed);
    let mut at = Duration::ZERO;
    let mut out = Vec::new();
    loop {
        let gap = Duration::from_millis(1_000 + rng.below(3_000));
        let fault = match rng.below(7) {
            0 => Fault::KillNode(rng.below(NODES as u64) as usize),
            1 => Fault::PauseNode(rng.below(NODES as u64) as usize),
            2 => Fault::DropRedisClients,
            3 => Fault::RefuseXadd,
            4 => Fault::PauseRedis,
            5 => Fault::TerminatePostgres,
            _ => Fault::RestartRedisEmpty,
        };
        // What the fault itself lasts counts too.
        at += gap + fault.lasts();
        if at >= within {
            return out;
        }
        out.push((gap, fault));
    }
}

struct Node {
    port: u16,
    child: Option<Child>,
    log: std::path::PathBuf,
}

impl Node {
    /// Starts the node and waits until it listens. A start that fails is
    /// tried again, as an orchestrator would (at most 10 times): its port,
    /// free while it was down, may have been taken for a moment as the
    /// local port of some outgoing connection.
    async fn start(&mut self, database_url: &str, redis_port: u16) {
        for _ in 0..10 {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)
                .expect("node log");
            let mut child = Command::new(env!("CARGO_BIN_EXE_bucket"))
                .env("BUCKET_LISTEN", format!("127.0.0.1:{}", self.port))
                .env("DATABASE_URL", database_url)
                .env("REDIS_URL", format!("redis://127.0.0.1:{redis_port}"))
                .env("BUCKET_MAX_DELIVERIES", MAX_DELIVERIES.to_string())
                .env("BUCKET_RECONCILE_SECONDS", "5")
                .env("BUCKET_SWEEP_MS", "100")
                .env("BUCKET_SHUTDOWN_GRACE_SECONDS", "2")
                .env("BUCKET_RETENTION", "off")
                .env("RUST_LOG", "warn")
                .env("RUST_BACKTRACE", "0")
                .stdout(Stdio::null())
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .expect("the bucket binary");
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                    .await
                    .is_ok()
                {
                    self.child = Some(child);
                    return;
                }
                if let Ok(Some(status)) = child.try_wait() {
                    println!(
                        "node {} exited at start ({status}); starting it again",
                        self.port
                    );
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "node {} did not listen within 60 s; see {}",
                    self.port,
                    self.log.display()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        panic!(
            "node {} failed to start 10 times; its log, newest first:\n{}",
            self.port,
            tail.join("\n")
        );
    }

    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    async fn signal(&self, signal: &str) {
        if let Some(pid) = self.child.as_ref().and_then(Child::id) {
            let _ = Command::new("kill")
                .args([signal, &pid.to_string()])
                .status()
                .await;
        }
    }
}

fn channel(port: u16) -> BucketServiceClient<Channel> {
    let endpoint = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .expect("a URL")
        .connect_timeout(Duration::from_secs(1));
    BucketServiceClient::new(endpoint.connect_lazy())
}

async fn redis_cli(port: u16, args: &[&str]) {
    let _ = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
}

#[derive(Default)]
struct Record {
    /// Every packet id a producer sent, acknowledged or not.
    sent: HashSet<String>,
    acknowledged: HashSet<String>,
    /// Deliveries seen per packet, by every consumer.
    deliveries: HashMap<String, u32>,
    /// Packets whose mark (success) a node acknowledged.
    marked: HashSet<String>,
}

async fn produce(
    ports: Arc<Vec<u16>>,
    record: Arc<Mutex<Record>>,
    stop: Arc<AtomicBool>,
    who: usize,
) {
    let mut turn = who;
    let mut n = 0;
    while !stop.load(Ordering::SeqCst) {
        let id = uuid::Uuid::new_v4().to_string();
        record.lock().unwrap().sent.insert(id.clone());
        let packet = pb::PacketInput {
            packet_id: id.clone(),
            ..packet_for(&format!("user-{who}-{}", n % 50))
        };
        n += 1;
        // Until acknowledged, as a real sender does; bounded by 120 tries.
        for _ in 0..120 {
            turn += 1;
            let mut client = channel(ports[turn % ports.len()]);
            let call = client.ingest(pb::IngestRequest {
                packet: Some(packet.clone()),
            });
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(3), call).await {
                record.lock().unwrap().acknowledged.insert(id.clone());
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
}

async fn consume(
    ports: Arc<Vec<u16>>,
    record: Arc<Mutex<Record>>,
    stop: Arc<AtomicBool>,
    who: usize,
    seed: u64,
) {
    let mut rng = Rng(seed ^ ((who as u64) << 32));
    let slow = who % 2 == 1;
    let mut turn = who;
    while !stop.load(Ordering::SeqCst) {
        turn += 1;
        let mut client = channel(ports[turn % ports.len()]);
        let request = pb::StreamPendingRequest {
            consumer: format!("karma-{who}"),
            max_in_flight: 8,
            lease_seconds: 5,
        };
        let Ok(Ok(stream)) =
            tokio::time::timeout(Duration::from_secs(3), client.stream_pending(request)).await
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut stream = stream.into_inner();
        // A stream quiet for 8 s may be on a stopped node: go elsewhere.
        while let Ok(Ok(Some(delivery))) =
            tokio::time::timeout(Duration::from_secs(8), stream.message()).await
        {
            let Some(packet) = delivery.packet else {
                continue;
            };
            *record
                .lock()
                .unwrap()
                .deliveries
                .entry(packet.packet_id.clone())
                .or_default() += 1;
            if rng.below(150) == 0 {
                // This consumer dies with the delivery unmarked.
                break;
            }
            if slow {
                tokio::time::sleep(Duration::from_millis(rng.below(60))).await;
            }
            let mark = client.mark_processed(pb::MarkProcessedRequest {
                packet_id: packet.packet_id.clone(),
                success: true,
                ..Default::default()
            });
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(3), mark).await {
                record.lock().unwrap().marked.insert(packet.packet_id);
            }
            if stop.load(Ordering::SeqCst) {
                return;
            }
        }
    }
}

async fn terminate_backends(database: &str) {
    let Ok(admin) = sqlx::PgPool::connect(&postgres_admin_url()).await else {
        return;
    };
    let _ = sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(database)
    .execute(&admin)
    .await;
    admin.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_packets_survive_the_nemesis() {
    let seed = std::env::var("BUCKET_NEMESIS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| uuid::Uuid::new_v4().as_u64_pair().0);
    let seconds: u64 = std::env::var("BUCKET_NEMESIS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    println!("nemesis seed {seed} ({seconds} s; BUCKET_NEMESIS_SEED={seed} replays it)");
    let faults = schedule(seed, Duration::from_secs(seconds));

    let db = TestDb::new(Backend::Postgres).await;
    let database = db.url.rsplit('/').next().unwrap().to_owned();
    let redis_port = OwnRedis::free_port();
    let mut redis = OwnRedis::start_with(redis_port, &[]).await;
    let logs = tempfile::tempdir().unwrap();
    let mut nodes: Vec<Node> = (0..NODES)
        .map(|i| Node {
            port: OwnRedis::free_port(),
            child: None,
            log: logs.path().join(format!("node-{i}.log")),
        })
        .collect();
    // One at a time: the first runs the migrations.
    for node in &mut nodes {
        node.start(&db.url, redis_port).await;
    }
    let ports = Arc::new(nodes.iter().map(|n| n.port).collect::<Vec<_>>());
    let record = Arc::new(Mutex::new(Record::default()));
    let stop_producing = Arc::new(AtomicBool::new(false));
    let stop_consuming = Arc::new(AtomicBool::new(false));
    let producers: Vec<_> = (0..2)
        .map(|i| {
            tokio::spawn(produce(
                ports.clone(),
                record.clone(),
                stop_producing.clone(),
                i,
            ))
        })
        .collect();
    let consumers: Vec<_> = (0..4)
        .map(|i| {
            tokio::spawn(consume(
                ports.clone(),
                record.clone(),
                stop_consuming.clone(),
                i,
                seed,
            ))
        })
        .collect();

    let mut thrown: BTreeMap<&str, u32> = BTreeMap::new();
    for (gap, fault) in &faults {
        tokio::time::sleep(*gap).await;
        *thrown.entry(fault.kind()).or_default() += 1;
        match *fault {
            Fault::KillNode(i) => {
                nodes[i].kill().await;
                tokio::time::sleep(Duration::from_secs(1)).await;
                nodes[i].start(&db.url, redis_port).await;
            }
            Fault::PauseNode(i) => {
                nodes[i].signal("-STOP").await;
                tokio::time::sleep(Duration::from_secs(12)).await;
                nodes[i].signal("-CONT").await;
            }
            Fault::DropRedisClients => {
                redis_cli(redis_port, &["CLIENT", "KILL", "TYPE", "normal"]).await;
                redis_cli(redis_port, &["CLIENT", "KILL", "TYPE", "pubsub"]).await;
            }
            Fault::RefuseXadd => {
                redis_cli(redis_port, &["ACL", "SETUSER", "default", "-xadd"]).await;
                tokio::time::sleep(Duration::from_secs(3)).await;
                redis_cli(redis_port, &["ACL", "SETUSER", "default", "+@all"]).await;
            }
            Fault::PauseRedis => redis_cli(redis_port, &["CLIENT", "PAUSE", "2000"]).await,
            Fault::TerminatePostgres => terminate_backends(&database).await,
            Fault::RestartRedisEmpty => {
                drop(redis);
                tokio::time::sleep(Duration::from_millis(500)).await;
                redis = OwnRedis::start_with(redis_port, &[]).await;
            }
        }
    }

    // Heal: every node running, Redis accepting; producers finish the
    // packet they are on.
    redis_cli(redis_port, &["ACL", "SETUSER", "default", "+@all"]).await;
    for node in &nodes {
        node.signal("-CONT").await;
    }
    stop_producing.store(true, Ordering::SeqCst);
    for producer in producers {
        producer.await.unwrap();
    }
    let healed = Instant::now();
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let rows = loop {
        let rows: Vec<(String, String, i32)> =
            sqlx::query_as("SELECT packet_id::text, status, delivery_attempts FROM packets")
                .fetch_all(&pool)
                .await
                .unwrap_or_default();
        let open = rows.iter().filter(|(_, s, _)| s == "pending").count();
        if open == 0 && !rows.is_empty() {
            break rows;
        }
        if healed.elapsed() > Duration::from_secs(120) {
            for node in &nodes {
                let log = std::fs::read_to_string(&node.log).unwrap_or_default();
                let tail: String = log.lines().rev().take(20).collect::<Vec<_>>().join("\n");
                println!("node {} log (last lines, newest first):\n{tail}", node.port);
            }
            panic!("seed {seed}: {open} packets still pending 120 s after the faults healed");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let settle_time = healed.elapsed();
    stop_consuming.store(true, Ordering::SeqCst);
    for consumer in consumers {
        consumer.abort();
    }
    for node in &mut nodes {
        node.kill().await;
    }

    let record = record.lock().unwrap();
    let stored: HashMap<&str, (&str, i32)> = rows
        .iter()
        .map(|(id, status, attempts)| (id.as_str(), (status.as_str(), *attempts)))
        .collect();
    let strangers: Vec<&&str> = stored
        .keys()
        .filter(|id| !record.sent.contains(**id))
        .collect();
    assert!(
        strangers.is_empty(),
        "seed {seed}: stored but never sent: {strangers:?}"
    );
    let mut processed = 0;
    let mut dead = 0;
    for id in &record.acknowledged {
        match stored.get(id.as_str()) {
            Some(("processed", _)) => processed += 1,
            Some(("dead_letter", attempts)) => {
                assert!(
                    *attempts >= MAX_DELIVERIES as i32,
                    "seed {seed}: {id} dead-lettered after {attempts} deliveries"
                );
                dead += 1;
            }
            other => panic!("seed {seed}: acknowledged {id} ended {other:?}"),
        }
    }
    for id in &record.marked {
        assert_eq!(
            stored.get(id.as_str()).map(|(s, _)| *s),
            Some("processed"),
            "seed {seed}: {id} was marked processed"
        );
    }
    let deliveries: u32 = record.deliveries.values().sum();
    let duplicates = deliveries as usize - record.deliveries.len();
    println!(
        "nemesis seed {seed}: faults {thrown:?}; sent {}, acknowledged {}, processed {processed}, \
         dead_letter {dead}, deliveries {deliveries}, duplicates {duplicates}, \
         all finished {:.1} s after the faults healed",
        record.sent.len(),
        record.acknowledged.len(),
        settle_time.as_secs_f64()
    );
    assert!(
        !record.acknowledged.is_empty(),
        "seed {seed}: nothing was acknowledged"
    );
}
