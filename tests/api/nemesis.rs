//! A nemesis and a checker (issue 16), after Jepsen's queue tests: three
//! bucket nodes (the real binary, as child processes) on a PostgreSQL and
//! a Redis of the test's own, each node reaching each store through a TCP
//! proxy the test owns; producers that retry each packet with the same
//! `packet_id` until it is acknowledged; consumers that mark every
//! delivery (some slowly, some dropping their stream now and then); and a
//! nemesis that, at moments drawn from a seed, SIGKILLs and restarts a
//! node, SIGSTOPs one past its liveness key's TTL, drops every Redis
//! connection, has Redis refuse XADD or pause, terminates the PostgreSQL
//! backends, stops PostgreSQL (fast or immediate) and starts it again,
//! restarts Redis empty or from an older snapshot, and cuts or slows one
//! node's link to a store. After the faults heal, the checker asserts that
//! every acknowledged packet ended processed (or dead_letter after
//! `max_deliveries` deliveries), that nothing is left pending, that
//! nothing was stored that no producer sent, and that every packet a
//! consumer marked is processed; it reports the duplicates, and how long
//! packets caught by each kind of fault took to be processed after it
//! healed.
//!
//! The schedule of faults is a function of `BUCKET_NEMESIS_SEED` alone
//! (printed; the workload's timing differs run to run);
//! `BUCKET_NEMESIS_SECONDS` sets how long faults are thrown (60). The
//! harness's memory grows with the packets sent, nothing else: node logs
//! are kept as their last lines (and written whole only to
//! `BUCKET_NEMESIS_LOGS`, a directory, when set; `BUCKET_NEMESIS_RUST_LOG`
//! sets the nodes' `RUST_LOG`, `warn` by default).
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bucket::proto::bucket::v1 as pb;
use bucket::proto::bucket::v1::bucket_service_client::BucketServiceClient;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::{Channel, Endpoint};

use crate::helpers::{Rng, packet_for};
use crate::own_postgres::{OwnPostgres, StopMode};
use crate::proxy::{Cut, Proxy};
use crate::redis_queue::OwnRedis;

const NODES: usize = 3;
const MAX_DELIVERIES: u32 = 5;
/// The bucket's database on the test's PostgreSQL.
const DATABASE: &str = "bucket";
/// Lines of each node's log kept for a failure's report.
const LOG_LINES: usize = 400;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillNode(usize),
    PauseNode(usize),
    DropRedisClients,
    RefuseXadd,
    PauseRedis,
    TerminatePostgres,
    RestartRedisEmpty,
    StopPostgres {
        mode: StopMode,
        secs: u64,
    },
    SnapshotRedis,
    RestoreRedisSnapshot,
    CutPostgres {
        node: usize,
        how: Cut,
        secs: u64,
    },
    CutRedis {
        node: usize,
        how: Cut,
        secs: u64,
    },
    /// Then, if `then_cut`, both links cut for a second: the answers
    /// still held back by the delay are lost, as on a link that slows
    /// down before it fails.
    DelayStores {
        node: usize,
        ms: u64,
        secs: u64,
        then_cut: bool,
    },
}

impl Fault {
    /// How long the nemesis spends throwing it.
    fn lasts(&self) -> Duration {
        match *self {
            Fault::KillNode(_) => Duration::from_secs(1),
            Fault::PauseNode(_) => Duration::from_secs(12),
            Fault::RefuseXadd => Duration::from_secs(3),
            Fault::PauseRedis => Duration::from_secs(2),
            Fault::StopPostgres { secs, .. }
            | Fault::CutPostgres { secs, .. }
            | Fault::CutRedis { secs, .. }
            | Fault::DelayStores {
                secs,
                then_cut: false,
                ..
            } => Duration::from_secs(secs),
            Fault::DelayStores {
                secs,
                then_cut: true,
                ..
            } => Duration::from_secs(secs + 1),
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
            Fault::StopPostgres {
                mode: StopMode::Fast,
                ..
            } => "PostgreSQL stopped (fast) 2-5 s",
            Fault::StopPostgres {
                mode: StopMode::Immediate,
                ..
            } => "PostgreSQL stopped (immediate) 2-5 s",
            Fault::SnapshotRedis => "Redis snapshot taken (BGSAVE)",
            Fault::RestoreRedisSnapshot => "Redis restarted from the older snapshot",
            Fault::CutPostgres {
                how: Cut::Refuse, ..
            } => "node-PostgreSQL cut 1-5 s (refused)",
            Fault::CutPostgres {
                how: Cut::BlackHole,
                ..
            } => "node-PostgreSQL cut 1-5 s (black hole)",
            Fault::CutRedis {
                how: Cut::Refuse, ..
            } => "node-Redis cut 1-5 s (refused)",
            Fault::CutRedis {
                how: Cut::BlackHole,
                ..
            } => "node-Redis cut 1-5 s (black hole)",
            Fault::DelayStores {
                then_cut: false, ..
            } => "node-stores delayed 200-800 ms each way, 3-6 s",
            Fault::DelayStores { then_cut: true, .. } => {
                "node-stores delayed 200-800 ms each way, 3-6 s, then cut 1 s"
            }
        }
    }
}

/// The faults and the pause before each, drawn from the seed.
fn schedule(seed: u64, within: Duration) -> Vec<(Duration, Fault)> {
    let mut rng = Rng(seed);
    let mut at = Duration::ZERO;
    let mut out = Vec::new();
    let mut snapshot_taken = false;
    loop {
        let gap = Duration::from_millis(1_000 + rng.below(3_000));
        let node = rng.below(NODES as u64) as usize;
        let how = if rng.below(2) == 0 {
            Cut::Refuse
        } else {
            Cut::BlackHole
        };
        let fault = match rng.below(13) {
            0 => Fault::KillNode(node),
            1 => Fault::PauseNode(node),
            2 => Fault::DropRedisClients,
            3 => Fault::RefuseXadd,
            4 => Fault::PauseRedis,
            5 => Fault::TerminatePostgres,
            6 => Fault::RestartRedisEmpty,
            7 => Fault::StopPostgres {
                mode: if rng.below(2) == 0 {
                    StopMode::Fast
                } else {
                    StopMode::Immediate
                },
                secs: 2 + rng.below(4),
            },
            // A restore needs an older snapshot to restore.
            8 if snapshot_taken => Fault::RestoreRedisSnapshot,
            8 | 9 => Fault::SnapshotRedis,
            10 => Fault::CutPostgres {
                node,
                how,
                secs: 1 + rng.below(5),
            },
            11 => Fault::CutRedis {
                node,
                how,
                secs: 1 + rng.below(5),
            },
            _ => Fault::DelayStores {
                node,
                ms: 200 + rng.below(601),
                secs: 3 + rng.below(4),
                then_cut: rng.below(2) == 0,
            },
        };
        snapshot_taken |= fault == Fault::SnapshotRedis;
        // What the fault itself lasts counts too.
        at += gap + fault.lasts();
        if at >= within {
            return out;
        }
        out.push((gap, fault));
    }
}

/// The last lines a node wrote (every run of it), and the whole log in
/// `BUCKET_NEMESIS_LOGS` when set.
#[derive(Default)]
struct Log {
    tail: Mutex<VecDeque<String>>,
}

impl Log {
    fn push(&self, line: String) {
        let mut tail = self.tail.lock().unwrap();
        if tail.len() == LOG_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }

    /// The last `n` lines, newest first.
    fn last(&self, n: usize) -> String {
        let tail = self.tail.lock().unwrap();
        tail.iter()
            .rev()
            .take(n)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }
}

struct Node {
    index: usize,
    port: u16,
    child: Option<Child>,
    log: Arc<Log>,
    /// The node's links to PostgreSQL and to Redis.
    postgres: Proxy,
    redis: Proxy,
}

impl Node {
    /// Starts the node and waits until it listens. A start that fails is
    /// tried again, as an orchestrator would (at most 10 times): its port,
    /// free while it was down, may have been taken for a moment as the
    /// local port of some outgoing connection.
    async fn start(&mut self) {
        for _ in 0..10 {
            let database_url = format!(
                "postgres://postgres@127.0.0.1:{}/{DATABASE}",
                self.postgres.port()
            );
            let mut child = Command::new(env!("CARGO_BIN_EXE_bucket"))
                .env("BUCKET_LISTEN", format!("127.0.0.1:{}", self.port))
                .env("DATABASE_URL", database_url)
                .env(
                    "REDIS_URL",
                    format!("redis://127.0.0.1:{}", self.redis.port()),
                )
                .env("BUCKET_MAX_DELIVERIES", MAX_DELIVERIES.to_string())
                .env("BUCKET_RECONCILE_SECONDS", "5")
                .env("BUCKET_SWEEP_MS", "100")
                .env("BUCKET_SHUTDOWN_GRACE_SECONDS", "2")
                .env("BUCKET_RETENTION", "off")
                .env(
                    "RUST_LOG",
                    std::env::var("BUCKET_NEMESIS_RUST_LOG").unwrap_or_else(|_| "warn".into()),
                )
                .env("RUST_BACKTRACE", "0")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .expect("the bucket binary");
            let stderr = child.stderr.take().expect("piped stderr");
            tokio::spawn(keep_log(stderr, self.log.clone(), self.index));
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
                        self.index
                    );
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "node {} did not listen within 60 s; its log, newest first:\n{}",
                    self.index,
                    self.log.last(40)
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        panic!(
            "node {} failed to start 10 times; its log, newest first:\n{}",
            self.index,
            self.log.last(40)
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

/// Reads a node's stderr until the process ends.
async fn keep_log(stderr: tokio::process::ChildStderr, log: Arc<Log>, index: usize) {
    let mut file = match std::env::var_os("BUCKET_NEMESIS_LOGS") {
        Some(dir) => tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(Path::new(&dir).join(format!("node-{index}.log")))
            .await
            .ok(),
        None => None,
    };
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(file) = &mut file {
            let _ = file.write_all(format!("{line}\n").as_bytes()).await;
        }
        log.push(line);
    }
}

fn channel(port: u16) -> BucketServiceClient<Channel> {
    let endpoint = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .expect("a URL")
        .connect_timeout(Duration::from_secs(1));
    BucketServiceClient::new(endpoint.connect_lazy())
}

/// redis-cli against the test's Redis itself (no proxy); its answer.
async fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .await;
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// The test's Redis: a snapshot it can take, and restart from later.
struct Redis {
    port: u16,
    dir: tempfile::TempDir,
    server: Option<OwnRedis>,
}

impl Redis {
    async fn start() -> Redis {
        let mut redis = Redis {
            port: OwnRedis::free_port(),
            dir: tempfile::tempdir().expect("tempdir"),
            server: None,
        };
        redis.up().await;
        redis
    }

    /// The file Redis loads at start and BGSAVE writes.
    fn dump(&self) -> PathBuf {
        self.dir.path().join("dump.rdb")
    }

    /// Where the nemesis keeps the snapshot it restores.
    fn snapshot(&self) -> PathBuf {
        self.dir.path().join("snapshot.rdb")
    }

    /// Starts Redis on its data directory: it loads `dump.rdb` if there is
    /// one. No automatic saves: a snapshot is the nemesis's decision.
    async fn up(&mut self) {
        let dir = self.dir.path().display().to_string();
        let args = ["--dir", dir.as_str(), "--dbfilename", "dump.rdb"];
        self.server = Some(OwnRedis::start_with(self.port, &args).await);
    }

    /// SIGKILL: nothing saved on the way down.
    fn kill(&mut self) {
        self.server = None;
    }

    /// Restarts Redis from `from` (None: empty).
    async fn restart(&mut self, from: Option<PathBuf>) {
        self.kill();
        let _ = std::fs::remove_file(self.dump());
        if let Some(from) = from
            && from.exists()
        {
            std::fs::copy(from, self.dump()).expect("the snapshot copied");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.up().await;
    }

    /// BGSAVE, waited for (at most 10 s), kept aside for a later restore.
    async fn take_snapshot(&self) {
        let _ = std::fs::remove_file(self.dump());
        redis_cli(self.port, &["BGSAVE"]).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let info = redis_cli(self.port, &["INFO", "persistence"]).await;
            if info.contains("rdb_bgsave_in_progress:0") && self.dump().exists() {
                std::fs::copy(self.dump(), self.snapshot()).expect("the snapshot kept");
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!("BGSAVE did not finish within 10 s; the older snapshot stays");
    }
}

/// What the producers and consumers saw.
#[derive(Default)]
struct Record {
    /// Every packet id a producer sent, acknowledged or not.
    sent: HashSet<String>,
    /// When each packet was first acknowledged.
    acknowledged: HashMap<String, Instant>,
    /// Deliveries seen per packet, by every consumer.
    deliveries: HashMap<String, u32>,
    /// When a node first acknowledged a mark (success) of each packet.
    marked: HashMap<String, Instant>,
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
                record
                    .lock()
                    .unwrap()
                    .acknowledged
                    .insert(id.clone(), Instant::now());
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
                record
                    .lock()
                    .unwrap()
                    .marked
                    .entry(packet.packet_id)
                    .or_insert_with(Instant::now);
            }
            if stop.load(Ordering::SeqCst) {
                return;
            }
        }
    }
}

async fn terminate_backends(admin_url: &str) {
    let Ok(admin) = sqlx::PgPool::connect(admin_url).await else {
        return;
    };
    let _ = sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(DATABASE)
    .execute(&admin)
    .await;
    admin.close().await;
}

/// A fault as thrown: when it began and when it healed.
struct Thrown {
    fault: Fault,
    began: Instant,
    healed: Instant,
}

/// A packet caught by a fault: how long after the heal it was processed,
/// its id, and the fault (its index in the timeline).
type Caught<'a> = (Duration, &'a str, usize);

/// Per kind of fault, how long after it healed the packets it caught were
/// processed, sorted. A packet is caught by the first fault that healed
/// after it was acknowledged, if that fault began before a consumer's mark
/// of it was acknowledged. Faults follow each other 1-4 s apart, so a time
/// can include later faults (an upper bound on what the fault itself
/// cost), and the workload's own delays: a delivery a consumer dropped, or
/// whose mark failed, comes back when its 5 s lease ends, and a consumer
/// leaves a stream quiet for 8 s.
fn heal_to_processed<'a>(
    thrown: &[Thrown],
    record: &'a Record,
) -> BTreeMap<&'static str, Vec<Caught<'a>>> {
    let mut times: BTreeMap<&'static str, Vec<Caught<'a>>> = BTreeMap::new();
    for (id, acked) in &record.acknowledged {
        let Some(marked) = record.marked.get(id) else {
            continue;
        };
        // Faults are thrown one after another: `healed` grows with `began`.
        let first = thrown.partition_point(|f| f.healed < *acked);
        let Some(fault) = thrown.get(first) else {
            continue;
        };
        if fault.began < *marked {
            let took = marked.saturating_duration_since(fault.healed);
            times
                .entry(fault.fault.kind())
                .or_default()
                .push((took, id.as_str(), first));
        }
    }
    for list in times.values_mut() {
        list.sort();
    }
    times
}

/// The `q` quantile of sorted `times`, in seconds.
fn quantile(times: &[Caught], q: f64) -> f64 {
    let at = ((times.len() - 1) as f64 * q).round() as usize;
    times[at].0.as_secs_f64()
}

/// What the stores say about packets still pending, for the failure report.
async fn describe_stuck(pool: &sqlx::PgPool, redis_port: u16, nodes: &[Node]) -> String {
    let stuck: Vec<(String, i32)> = sqlx::query_as(
        "SELECT packet_id::text, delivery_attempts FROM packets \
         WHERE status = 'pending' ORDER BY seq LIMIT 10",
    )
    .fetch_all(pool)
    .await
    .unwrap_or_default();
    let mut out = format!("pending (first 10): {stuck:?}\n");
    for key in redis_cli(redis_port, &["KEYS", "*pending*"]).await.lines() {
        let len = redis_cli(redis_port, &["XLEN", key]).await;
        let pel = redis_cli(redis_port, &["XPENDING", key, "dispatch"]).await;
        out += &format!("stream {key}: XLEN {len}; XPENDING summary {pel:?}\n");
        let entries = redis_cli(redis_port, &["XRANGE", key, "-", "+"]).await;
        for (id, _) in &stuck {
            let found = entries.lines().any(|l| l == id);
            out += &format!("  {id} in the stream: {found}\n");
        }
    }
    for node in nodes {
        out += &format!(
            "node {} log (last lines, newest first):\n{}\n",
            node.index,
            node.log.last(30)
        );
    }
    out
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

    let mut pg = OwnPostgres::start().await;
    let admin = sqlx::PgPool::connect(&pg.url())
        .await
        .expect("the test's PostgreSQL");
    sqlx::query(&format!("CREATE DATABASE {DATABASE}"))
        .execute(&admin)
        .await
        .expect("the bucket's database");
    admin.close().await;
    let database_url = format!("postgres://postgres@127.0.0.1:{}/{DATABASE}", pg.port());
    let mut redis = Redis::start().await;
    let mut nodes = Vec::new();
    for index in 0..NODES {
        nodes.push(Node {
            index,
            port: OwnRedis::free_port(),
            child: None,
            log: Arc::default(),
            postgres: Proxy::start(pg.port()).await,
            redis: Proxy::start(redis.port).await,
        });
    }
    // One at a time: the first runs the migrations.
    for node in &mut nodes {
        node.start().await;
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

    let started = Instant::now();
    let mut thrown = Vec::with_capacity(faults.len());
    for (gap, fault) in &faults {
        tokio::time::sleep(*gap).await;
        let began = Instant::now();
        match *fault {
            Fault::KillNode(i) => {
                nodes[i].kill().await;
                tokio::time::sleep(Duration::from_secs(1)).await;
                nodes[i].start().await;
            }
            Fault::PauseNode(i) => {
                nodes[i].signal("-STOP").await;
                tokio::time::sleep(Duration::from_secs(12)).await;
                nodes[i].signal("-CONT").await;
            }
            Fault::DropRedisClients => {
                redis_cli(redis.port, &["CLIENT", "KILL", "TYPE", "normal"]).await;
                redis_cli(redis.port, &["CLIENT", "KILL", "TYPE", "pubsub"]).await;
            }
            Fault::RefuseXadd => {
                redis_cli(redis.port, &["ACL", "SETUSER", "default", "-xadd"]).await;
                tokio::time::sleep(Duration::from_secs(3)).await;
                redis_cli(redis.port, &["ACL", "SETUSER", "default", "+@all"]).await;
            }
            Fault::PauseRedis => {
                redis_cli(redis.port, &["CLIENT", "PAUSE", "2000"]).await;
                // Healed when the pause ends, not when it was asked for.
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Fault::TerminatePostgres => terminate_backends(&pg.url()).await,
            Fault::RestartRedisEmpty => redis.restart(None).await,
            Fault::StopPostgres { mode, secs } => {
                pg.stop(mode).await;
                tokio::time::sleep(Duration::from_secs(secs)).await;
                pg.up().await;
            }
            Fault::SnapshotRedis => redis.take_snapshot().await,
            Fault::RestoreRedisSnapshot => redis.restart(Some(redis.snapshot())).await,
            Fault::CutPostgres { node, how, secs } => {
                nodes[node].postgres.cut(how);
                tokio::time::sleep(Duration::from_secs(secs)).await;
                nodes[node].postgres.mend();
            }
            Fault::CutRedis { node, how, secs } => {
                nodes[node].redis.cut(how);
                tokio::time::sleep(Duration::from_secs(secs)).await;
                nodes[node].redis.mend();
            }
            Fault::DelayStores {
                node,
                ms,
                secs,
                then_cut,
            } => {
                let node = &nodes[node];
                node.postgres.set_delay(Duration::from_millis(ms));
                node.redis.set_delay(Duration::from_millis(ms));
                tokio::time::sleep(Duration::from_secs(secs)).await;
                if then_cut {
                    node.postgres.cut(Cut::Refuse);
                    node.redis.cut(Cut::Refuse);
                }
                node.postgres.set_delay(Duration::ZERO);
                node.redis.set_delay(Duration::ZERO);
                if then_cut {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    node.postgres.mend();
                    node.redis.mend();
                }
            }
        }
        thrown.push(Thrown {
            fault: *fault,
            began,
            healed: Instant::now(),
        });
    }
    // The timeline, to read a slow packet or a failure against.
    for (n, t) in thrown.iter().enumerate() {
        println!(
            "fault {n}: {:.1}-{:.1} s {:?}",
            (t.began - started).as_secs_f64(),
            (t.healed - started).as_secs_f64(),
            t.fault
        );
    }

    // Heal: every node running, Redis accepting (each fault healed itself
    // already; this is belt and braces). Producers finish their packet.
    redis_cli(redis.port, &["ACL", "SETUSER", "default", "+@all"]).await;
    for node in &nodes {
        node.signal("-CONT").await;
    }
    stop_producing.store(true, Ordering::SeqCst);
    for producer in producers {
        producer.await.unwrap();
    }
    let healed = Instant::now();
    let pool = sqlx::PgPool::connect(&database_url).await.unwrap();
    loop {
        let open: Option<i64> =
            sqlx::query_scalar("SELECT count(*) FROM packets WHERE status = 'pending'")
                .fetch_one(&pool)
                .await
                .ok();
        if open == Some(0) {
            break;
        }
        if healed.elapsed() > Duration::from_secs(120) {
            let report = describe_stuck(&pool, redis.port, &nodes).await;
            panic!(
                "seed {seed}: {open:?} packets still pending 120 s after the faults healed\n{report}"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let settle_time = healed.elapsed();
    stop_consuming.store(true, Ordering::SeqCst);
    for consumer in consumers {
        consumer.abort();
    }
    for node in &mut nodes {
        node.kill().await;
    }
    let rows: Vec<(String, String, i32)> =
        sqlx::query_as("SELECT packet_id::text, status, delivery_attempts FROM packets")
            .fetch_all(&pool)
            .await
            .expect("the packets, read back");
    pool.close().await;

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
    for id in record.acknowledged.keys() {
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
    for id in record.marked.keys() {
        assert_eq!(
            stored.get(id.as_str()).map(|(s, _)| *s),
            Some("processed"),
            "seed {seed}: {id} was marked processed"
        );
    }
    let deliveries: u32 = record.deliveries.values().sum();
    let duplicates = deliveries as usize - record.deliveries.len();
    let mut by_kind: BTreeMap<&str, u32> = BTreeMap::new();
    for fault in &thrown {
        *by_kind.entry(fault.fault.kind()).or_default() += 1;
    }
    let worst = heal_to_processed(&thrown, &record);
    println!(
        "nemesis seed {seed}: {} faults {by_kind:?}; sent {}, acknowledged {}, \
         processed {processed}, dead_letter {dead}, deliveries {deliveries}, \
         duplicates {duplicates}, all finished {:.1} s after the last fault healed",
        thrown.len(),
        record.sent.len(),
        record.acknowledged.len(),
        settle_time.as_secs_f64()
    );
    println!(
        "nemesis seed {seed}: packets caught by each kind of fault, and the time from its heal \
         to their processing:"
    );
    for (kind, times) in &worst {
        // Processed before the next fault began: what this fault alone cost.
        let alone: Vec<Caught> = times
            .iter()
            .copied()
            .filter(|(_, id, n)| {
                thrown
                    .get(n + 1)
                    .is_none_or(|next| next.began > record.marked[*id])
            })
            .collect();
        let alone = match alone.last() {
            Some(last) => format!(
                "{} alone, longest {:.1} s",
                alone.len(),
                last.0.as_secs_f64()
            ),
            None => "none alone".to_owned(),
        };
        let (_, slowest, fault) = times[times.len() - 1];
        println!(
            "  {kind}: {} packets; median {:.1} s, p99 {:.1} s, longest {:.1} s \
             ({slowest}: fault {fault}, acknowledged at {:.1} s, processed at {:.1} s, \
             {} deliveries); {alone}",
            times.len(),
            quantile(times, 0.5),
            quantile(times, 0.99),
            quantile(times, 1.0),
            (record.acknowledged[slowest] - started).as_secs_f64(),
            (record.marked[slowest] - started).as_secs_f64(),
            record.deliveries.get(slowest).copied().unwrap_or(0),
        );
    }
    assert!(
        !record.acknowledged.is_empty(),
        "seed {seed}: nothing was acknowledged"
    );
    drop(redis);
    drop(pg);
}
