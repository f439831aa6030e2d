//! The Redis queue: several nodes, outages, a Redis that comes late.
use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bucket::proto::bucket::v1 as pb;
use bucket::queue::redis::{RedisQueue, RedisTarget};
use fred::prelude::*;

use crate::helpers::{
    Backend, TestApp, TestDb, assert_quiet, ingest, mark, next, packet_for, status, subscribe,
    test_config,
};
use crate::partial_faults::{redis_cli, until};

/// A redis-server of the test's own, on a free port, that it can kill.
pub(crate) struct OwnRedis {
    child: Option<Child>,
}

impl OwnRedis {
    pub(crate) fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn url(port: u16) -> String {
        format!("redis://127.0.0.1:{port}")
    }

    async fn start(port: u16) -> OwnRedis {
        Self::start_with(port, &[]).await
    }

    /// Starts redis-server and waits until it listens. A start that fails
    /// is tried again (at most 5 times): the port, free while an earlier
    /// server was down, may have been taken for a moment as the local port
    /// of an outgoing connection.
    pub(crate) async fn start_with(port: u16, extra: &[&str]) -> OwnRedis {
        for attempt in 1..=5 {
            let child = Command::new("redis-server")
                .args(extra)
                .args([
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .stdout(Stdio::null())
                .spawn()
                .expect("redis-server on PATH (tests/run.sh installs it)");
            let mut redis = OwnRedis { child: Some(child) };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
                {
                    return redis;
                }
                let exited = redis
                    .child
                    .as_mut()
                    .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
                if exited {
                    println!("redis-server on {port} exited at start (try {attempt})");
                    break;
                }
                assert!(Instant::now() < deadline, "redis-server did not start");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        panic!("redis-server on {port} exited at start 5 times");
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

pub(crate) async fn wait_for_redis(
    client: &mut pb::bucket_service_client::BucketServiceClient<tonic::transport::Channel>,
    connected: bool,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while status(client).await.redis_connected != connected {
        assert!(
            Instant::now() < deadline,
            "redis_connected never became {connected}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `per_node` consumers on each of two nodes, each marking through the
/// other node, until nothing comes for 3 s; how often each packet came.
pub(crate) async fn consume_across(
    a: &Arc<TestApp>,
    b: &Arc<TestApp>,
    per_node: usize,
) -> HashMap<String, u32> {
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let pairs = (0..per_node).flat_map(|_| [(a, b), (b, a)]);
    let consumers: Vec<_> = pairs
        .enumerate()
        .map(|(i, (node, other))| {
            let (node, other, seen) = (node.clone(), other.clone(), seen.clone());
            tokio::spawn(async move {
                let name = format!("karma-{i}");
                consume(&node, &other, &name, Duration::from_secs(3), seen).await
            })
        })
        .collect();
    for consumer in consumers {
        consumer.await.unwrap();
    }
    seen.lock().unwrap().clone()
}

/// Receives and marks (through `marker`) until nothing comes for `quiet`.
pub(crate) async fn consume(
    app: &TestApp,
    marker: &TestApp,
    name: &str,
    quiet: Duration,
    seen: Arc<Mutex<HashMap<String, u32>>>,
) {
    let mut client = app.client().await;
    let mut marks = marker.client().await;
    let mut stream = subscribe(&mut client, name, 16, 0).await;
    while let Ok(Some(Ok(d))) = tokio::time::timeout(quiet, stream.message())
        .await
        .map(|m| m.transpose())
    {
        let id = d.packet.unwrap().packet_id;
        *seen.lock().unwrap().entry(id.clone()).or_insert(0) += 1;
        let marked = mark(&mut marks, &id).await;
        assert!(!marked.already_processed, "{id} processed twice");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_one_database_and_one_redis() {
    let db = TestDb::new(Backend::Redis).await;
    let a = TestApp::spawn_with(db.clone(), test_config(&db)).await;
    let b = TestApp::spawn_with(db.clone(), test_config(&db)).await;

    // Promptly across nodes: ingested on B, delivered to a stream on A.
    let mut on_a = a.client().await;
    let mut on_b = b.client().await;
    let mut stream = subscribe(&mut on_a, "probe", 1, 0).await;
    let started = Instant::now();
    let id = ingest(&mut on_b, packet_for("probe")).await;
    assert_eq!(next(&mut stream).await.packet.unwrap().packet_id, id);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    mark(&mut on_b, &id).await; // marked through the other node
    drop(stream);

    const N: usize = 2000;
    for chunk in 0..N / 100 {
        let packets = (0..100)
            .map(|i| packet_for(&format!("u{}", chunk * 100 + i)))
            .collect();
        let node = if chunk % 2 == 0 { &mut on_a } else { &mut on_b };
        let response = node
            .ingest_batch(pb::IngestBatchRequest { packets })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.ingested, 100);
    }

    // Two consumers per node, each marking through the other node.
    let (a, b) = (Arc::new(a), Arc::new(b));
    let seen = consume_across(&a, &b, 2).await;
    assert_eq!(seen.len(), N, "every packet delivered");
    assert!(
        seen.values().all(|n| *n == 1),
        "a packet reached two streams"
    );
    let counts = db.status_counts().await;
    assert_eq!(counts.get("processed"), Some(&(N as i64 + 1)));
    assert_eq!(
        counts.len(),
        1,
        "nothing left pending or leased: {counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_loses_nothing() {
    let port = OwnRedis::free_port();
    let mut redis = OwnRedis::start(port).await;
    let db = TestDb::new(Backend::Postgres).await;
    let mut config = test_config(&db);
    config.redis.redis_url = Some(OwnRedis::url(port));
    let app = TestApp::spawn_with(db.clone(), config).await;
    let mut client = app.client().await;
    wait_for_redis(&mut client, true).await;

    let mut sent = Vec::new();
    for i in 0..20 {
        sent.push(ingest(&mut client, packet_for(&format!("before{i}"))).await);
    }
    redis.kill();
    wait_for_redis(&mut client, false).await;
    for i in 0..20 {
        let started = Instant::now();
        sent.push(ingest(&mut client, packet_for(&format!("during{i}"))).await);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "ingest stalled without Redis"
        );
    }

    // Back, empty: the stream and the group are gone.
    let _redis = OwnRedis::start(port).await;
    wait_for_redis(&mut client, true).await;
    for i in 0..20 {
        sent.push(ingest(&mut client, packet_for(&format!("after{i}"))).await);
    }

    let seen = Arc::new(Mutex::new(HashMap::new()));
    consume(&app, &app, "karma", Duration::from_secs(5), seen.clone()).await;
    let seen = seen.lock().unwrap().clone();
    for id in &sent {
        assert!(seen.contains_key(id), "{id} never delivered");
    }
    assert_eq!(db.status_counts().await.get("processed"), Some(&60));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_with_redis_down_then_uses_it() {
    let port = OwnRedis::free_port();
    let db = TestDb::new(Backend::Postgres).await;
    let mut config = test_config(&db);
    config.redis.redis_url = Some(OwnRedis::url(port));
    config.redis.redis_prefix = "late:".into();
    let app = TestApp::spawn_with(db.clone(), config).await;
    let mut client = app.client().await;
    assert!(!status(&mut client).await.redis_connected);
    let mut sent = Vec::new();
    for i in 0..10 {
        sent.push(ingest(&mut client, packet_for(&format!("early{i}"))).await);
    }

    let _redis = OwnRedis::start(port).await;
    wait_for_redis(&mut client, true).await;
    for i in 0..10 {
        sent.push(ingest(&mut client, packet_for(&format!("late{i}"))).await);
    }
    let redis = Builder::from_config(Config::from_url(&OwnRedis::url(port)).unwrap())
        .build()
        .unwrap();
    redis.init().await.unwrap();
    let len: u64 = redis.xlen("late:pending").await.unwrap();
    assert!(
        len >= 10,
        "packets ingested after Redis came up are in its stream ({len})"
    );

    let seen = Arc::new(Mutex::new(HashMap::new()));
    consume(&app, &app, "karma", Duration::from_secs(3), seen.clone()).await;
    let seen = seen.lock().unwrap();
    for id in &sent {
        assert!(seen.contains_key(id), "{id} never delivered");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_end_and_dead_letter_across_nodes() {
    let db = TestDb::new(Backend::Redis).await;
    let mut config = test_config(&db);
    config.delivery.max_deliveries = 2;
    let a = TestApp::spawn_with(db.clone(), config.clone()).await;
    let b = TestApp::spawn_with(db.clone(), config).await;
    let mut on_a = a.client().await;
    let mut on_b = b.client().await;

    let mut slow = subscribe(&mut on_a, "slow", 1, 1).await;
    let id = ingest(&mut on_b, packet_for("x")).await;
    assert_eq!(next(&mut slow).await.delivery_attempt, 1);
    drop(slow); // nothing on A any more; the released packet goes to B

    let mut other = subscribe(&mut on_b, "other", 1, 1).await;
    let again = next(&mut other).await;
    assert_eq!(again.packet.unwrap().packet_id, id);
    assert_eq!(again.delivery_attempt, 2);
    // Not marked on B either: max_deliveries = 2 makes it dead, on any node.
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(&mut on_a).await.dead_letter_packets != 1 {
        assert!(Instant::now() < deadline, "never dead-lettered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), other.message())
            .await
            .is_err()
    );
}

/// An entry lost while Redis stays up (a node stopped between commit and
/// XADD, simulated by deleting the entry): the periodic pass, which looks
/// only at recent packets, puts it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recent_packet_missing_from_the_stream_is_put_back() {
    let db = TestDb::new(Backend::Redis).await;
    let mut config = test_config(&db);
    config.redis.reconcile_seconds = 1;
    let app = TestApp::spawn_with(db.clone(), config).await;
    let mut client = app.client().await;
    let id = ingest(&mut client, packet_for("lost")).await;

    let (url, prefix) = db.redis.clone().expect("a Redis backend");
    let redis = Builder::from_config(Config::from_url(&url).unwrap())
        .build()
        .unwrap();
    redis.init().await.unwrap();
    let key = format!("{prefix}pending");
    let entries: Vec<(String, HashMap<String, String>)> =
        redis.xrange(&key, "-", "+", None).await.unwrap();
    let lost: Vec<String> = entries
        .into_iter()
        .filter(|(_, fields)| fields.get("id") == Some(&id))
        .map(|(entry, _)| entry)
        .collect();
    assert_eq!(lost.len(), 1, "the packet's entry");
    let _: i64 = redis.xdel(&key, lost).await.unwrap();

    let mut stream = subscribe(&mut client, "karma", 0, 0).await;
    let d = next(&mut stream).await;
    assert_eq!(d.packet.unwrap().packet_id, id);
    redis.quit().await.unwrap();
}

/// The seed's settings (REDIS_HOST, REDIS_PORT, REDIS_PASSWORD) with a
/// password holding `@`, `:` and `/`: the connection is built field by
/// field, so it reaches Redis as typed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_with_url_characters_works() {
    const PASSWORD: &str = "p@ss:w/rd?#%";
    let port = OwnRedis::free_port();
    let _redis = OwnRedis::start_with(port, &["--requirepass", PASSWORD]).await;
    let db = TestDb::new(Backend::Postgres).await;
    let mut config = test_config(&db);
    config.redis.redis_url = None;
    config.redis.redis_host = Some("127.0.0.1".into());
    config.redis.redis_port = port;
    config.redis.redis_password = Some(PASSWORD.into());
    let app = TestApp::spawn_with(db.clone(), config).await;
    let mut client = app.client().await;
    wait_for_redis(&mut client, true).await;
    let id = ingest(&mut client, packet_for("u")).await;
    let mut stream = subscribe(&mut client, "karma", 0, 0).await;
    assert_eq!(next(&mut stream).await.packet.unwrap().packet_id, id);

    // And the packet went through this Redis, authenticated.
    let redis = Builder::from_config(Config {
        server: ServerConfig::new_centralized("127.0.0.1", port),
        password: Some(PASSWORD.into()),
        ..Default::default()
    })
    .build()
    .unwrap();
    redis.init().await.unwrap();
    let (_, keys): (String, Vec<String>) = redis
        .custom(
            fred::types::CustomCommand::new_static(
                "SCAN",
                fred::types::ClusterHash::FirstKey,
                false,
            ),
            vec!["0", "MATCH", "*pending", "COUNT", "1000"],
        )
        .await
        .unwrap();
    assert!(!keys.is_empty(), "the queue is in this Redis");
    redis.quit().await.unwrap();
}

/// Issue 16, suspicion 4: while Redis is away a node keeps what it cannot
/// XADD, at most a window of it (the rest is in the database, read back
/// once Redis answers); once Redis answers it gives back what it kept, so
/// another node delivers and marks those packets; and stopping it then
/// puts nothing back into the stream: no packet goes out twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_keeps_a_window_and_gives_it_back() {
    const WINDOW: usize = 16;
    const N: usize = 100;
    let port = OwnRedis::free_port();
    let mut redis = OwnRedis::start(port).await;
    let db = TestDb::new(Backend::Postgres).await;
    let mut config = test_config(&db);
    config.redis.redis_url = Some(OwnRedis::url(port));
    config.delivery.queue_window = WINDOW;
    let a = TestApp::spawn_with(db.clone(), config.clone()).await;
    let b = TestApp::spawn_with(db.clone(), config.clone()).await;
    let mut on_a = a.client().await;
    let mut on_b = b.client().await;
    wait_for_redis(&mut on_a, true).await;
    wait_for_redis(&mut on_b, true).await;

    redis.kill();
    wait_for_redis(&mut on_a, false).await;
    let mut sent = HashSet::new();
    for i in 0..N {
        sent.insert(ingest(&mut on_a, packet_for(&format!("away{i}"))).await);
    }
    // No stream on A takes them: what A keeps stays waiting.
    until(
        Duration::from_secs(10),
        "A keeps what Redis refused",
        || async { a.held().waiting >= WINDOW as u64 },
    )
    .await;
    let kept = a.held().waiting;
    assert!(
        kept <= WINDOW as u64,
        "A keeps {kept} packets in memory, more than its window ({WINDOW})"
    );

    // Back, empty.
    redis = OwnRedis::start(port).await;
    wait_for_redis(&mut on_a, true).await;
    until(
        Duration::from_secs(20),
        "A gives back what it kept",
        || async { a.held().waiting == 0 },
    )
    .await;

    // Every packet through B, once, marked there.
    let mut stream = subscribe(&mut on_b, "karma", 2 * N as u32, 0).await;
    let mut seen = HashSet::new();
    while seen.len() < N {
        let id = next(&mut stream).await.packet.unwrap().packet_id;
        assert!(sent.contains(&id), "{id} was not sent");
        assert!(seen.insert(id.clone()), "{id} delivered twice");
        mark(&mut on_b, &id).await;
    }
    let key = format!("{}pending", config.redis.redis_prefix);
    until(
        Duration::from_secs(10),
        "B removes the entries it marked",
        || async { redis_cli(port, &["XLEN", &key]).await == "0" },
    )
    .await;

    // A stops: it puts back nothing, so nothing goes out again.
    a.stop().await;
    assert_eq!(
        redis_cli(port, &["XLEN", &key]).await,
        "0",
        "A put packets back into the stream as it stopped"
    );
    assert_quiet(&mut stream, 1500).await;
    assert_eq!(db.status_counts().await.get("processed"), Some(&(N as i64)));
    drop(redis);
}

/// Issue 16, suspicion 7: two survivors claim a stopped node's entries at
/// once. Each lists them (XPENDING) before either claims (their XCLAIMs
/// held back by `CLIENT PAUSE WRITE` until both are waiting); with XCLAIM
/// taking entries of any idle time, the second took from the first what it
/// had just claimed, and both delivered them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_survivors_never_claim_the_same_entry() {
    const N: usize = 8;
    let port = OwnRedis::free_port();
    let _redis = OwnRedis::start(port).await;
    // The packets, pending in the database: a claim checks it.
    let app = TestApp::spawn(Backend::Postgres).await;
    let mut client = app.client().await;
    let mut sent = HashSet::new();
    for i in 0..N {
        sent.insert(ingest(&mut client, packet_for(&format!("held{i}"))).await);
    }
    // Their entries, held by a node that renews no liveness key, idle long.
    let key = "claims:pending";
    redis_cli(
        port,
        &["XGROUP", "CREATE", key, "dispatch", "$", "MKSTREAM"],
    )
    .await;
    for id in &sent {
        redis_cli(port, &["XADD", key, "*", "id", id]).await;
    }
    let read = [
        "XREADGROUP",
        "GROUP",
        "dispatch",
        "gone",
        "STREAMS",
        key,
        ">",
    ];
    redis_cli(port, &read).await;
    let listed = redis_cli(port, &["XRANGE", key, "-", "+"]).await;
    let entries: Vec<&str> = listed.lines().step_by(3).collect();
    assert_eq!(entries.len(), N);
    let mut idle = vec!["XCLAIM", key, "dispatch", "gone", "0"];
    idle.extend(&entries);
    idle.extend(["IDLE", "60000"]);
    redis_cli(port, &idle).await;

    let store = bucket::store::Store::connect(&app.db.url).await.unwrap();
    let mut settings = bucket::config::Config::defaults().redis;
    settings.redis_url = Some(OwnRedis::url(port));
    settings.redis_prefix = "claims:".into();
    let target = RedisTarget::from_config(&settings).unwrap().unwrap();
    let mut survivors = Vec::new();
    for name in ["one", "two"] {
        let queue = RedisQueue::connect(&target, &settings, name, store.clone()).unwrap();
        queue.wait_connected().await;
        survivors.push(queue);
    }

    redis_cli(port, &["CLIENT", "PAUSE", "10000", "WRITE"]).await;
    let claims: Vec<_> = survivors
        .iter()
        .map(|s| {
            let s = s.clone();
            tokio::spawn(async move { s.claim_from_stopped_nodes().await })
        })
        .collect();
    until(
        Duration::from_secs(5),
        "both survivors wait to XCLAIM",
        || async {
            let clients = redis_cli(port, &["CLIENT", "LIST"]).await;
            clients.lines().filter(|c| c.contains("cmd=xclaim")).count() == 2
        },
    )
    .await;
    redis_cli(port, &["CLIENT", "UNPAUSE"]).await;
    let mut claimed: HashMap<String, usize> = HashMap::new();
    for claim in claims {
        for queued in claim.await.unwrap() {
            *claimed.entry(queued.id().to_string()).or_default() += 1;
        }
    }
    let twice: Vec<&String> = claimed
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| id)
        .collect();
    assert!(twice.is_empty(), "claimed by both survivors: {twice:?}");
    assert_eq!(
        claimed.keys().cloned().collect::<HashSet<_>>(),
        sent,
        "every entry claimed by one survivor"
    );
}
