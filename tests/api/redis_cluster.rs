//! The Redis queue on a Redis Cluster of the test's own (three masters on
//! free ports), split into shards that the cluster spreads over its nodes.
use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bucket::proto::bucket::v1 as pb;

use crate::helpers::{
    Backend, TestApp, TestDb, ingest, mark, next, packet_for, subscribe, test_config,
};
use crate::redis_queue::{OwnRedis, consume_across, wait_for_redis};

const SHARDS: u16 = 8;

/// Three cluster-enabled redis-servers, joined into one cluster with every
/// slot assigned.
struct Cluster {
    ports: Vec<u16>,
    _nodes: Vec<OwnRedis>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    async fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let mut ports = Vec::new();
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let port = OwnRedis::free_port();
            // The bus port is named: the default (port + 10000) may be past 65535.
            let bus = OwnRedis::free_port().to_string();
            let config_file = format!("nodes-{port}.conf");
            let args = [
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                &bus,
                "--cluster-config-file",
                &config_file,
                "--dir",
                dir.path().to_str().unwrap(),
            ];
            nodes.push(OwnRedis::start_with(port, &args).await);
            ports.push(port);
        }
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(ports.iter().map(|p| format!("127.0.0.1:{p}")))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli on PATH");
        assert!(
            created.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        let cluster = Cluster {
            ports,
            _nodes: nodes,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        for port in &cluster.ports {
            while !cluster
                .ask(*port, &["CLUSTER", "INFO"])
                .contains("cluster_state:ok")
            {
                assert!(Instant::now() < deadline, "the cluster never became ok");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        cluster
    }

    /// What one node (and only it, no redirection) answers.
    fn ask(&self, port: u16, command: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &port.to_string(), "--raw"])
            .args(command)
            .output()
            .expect("redis-cli on PATH");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// As `redis-cluster://` names the nodes for fred.
    fn url(&self) -> String {
        let seed = self.ports[0];
        let others: Vec<String> = self.ports[1..]
            .iter()
            .map(|p| format!("node=127.0.0.1:{p}"))
            .collect();
        format!("redis-cluster://127.0.0.1:{seed}?{}", others.join("&"))
    }

    /// Each node's stream keys under `prefix`, with their lengths.
    fn streams_by_node(&self, prefix: &str) -> Vec<HashMap<String, u64>> {
        let pattern = format!("{prefix}pending*");
        self.ports
            .iter()
            .map(|port| {
                self.ask(*port, &["KEYS", &pattern])
                    .lines()
                    .filter(|k| !k.is_empty())
                    .map(|key| {
                        let len = self.ask(*port, &["XLEN", key]).trim().parse().unwrap();
                        (key.to_owned(), len)
                    })
                    .collect()
            })
            .collect()
    }

    /// Entries some node has read and not yet acknowledged, on every shard.
    fn held_entries(&self, prefix: &str) -> u64 {
        self.streams_by_node(prefix)
            .iter()
            .zip(&self.ports)
            .flat_map(|(streams, port)| streams.keys().map(move |key| (*port, key.clone())))
            .map(|(port, key)| {
                let summary = self.ask(port, &["XPENDING", &key, "dispatch"]);
                summary
                    .lines()
                    .next()
                    .unwrap_or("0")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0)
            })
            .sum()
    }
}

async fn extend(
    client: &mut pb::bucket_service_client::BucketServiceClient<tonic::transport::Channel>,
    token: &str,
    lease_seconds: u32,
) -> pb::ExtendLeaseResponse {
    client
        .extend_lease(pb::ExtendLeaseRequest {
            lease_tokens: vec![token.to_owned()],
            lease_seconds,
        })
        .await
        .expect("extend lease")
        .into_inner()
}

/// Two nodes on one PostgreSQL and one Redis Cluster: packets ingested on
/// either reach consumers on both exactly once, marks and ExtendLease
/// cross nodes over sharded pub/sub, and the queue's shards are on more
/// than one cluster node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_a_redis_cluster() {
    let cluster = Cluster::start().await;
    let db = TestDb::new(Backend::Postgres).await;
    let mut config = test_config(&db);
    config.redis.redis_url = Some(cluster.url());
    config.redis.redis_shards = SHARDS;
    config.redis.reconcile_seconds = 1;
    let prefix = config.redis.redis_prefix.clone();
    let a = TestApp::spawn_with(db.clone(), config.clone()).await;
    let b = TestApp::spawn_with(db.clone(), config).await;
    let mut on_a = a.client().await;
    let mut on_b = b.client().await;
    wait_for_redis(&mut on_a, true).await;
    wait_for_redis(&mut on_b, true).await;

    // Promptly across nodes: ingested on B, delivered to a stream on A.
    let mut stream = subscribe(&mut on_a, "probe", 1, 2).await;
    let started = Instant::now();
    let id = ingest(&mut on_b, packet_for("probe")).await;
    let d = next(&mut stream).await;
    assert_eq!(d.packet.as_ref().unwrap().packet_id, id);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    // ExtendLease through B reaches A on A's lease channel.
    let extended = extend(&mut on_b, &d.lease_token, 30).await;
    assert_eq!(
        (extended.extended, extended.rejected),
        (1, 0),
        "{extended:?}"
    );
    // Marked through B: A hears it on the settled channel and frees the
    // slot, so the next packet reaches the stream at once.
    mark(&mut on_b, &id).await;
    let second = ingest(&mut on_b, packet_for("probe")).await;
    let d = tokio::time::timeout(Duration::from_secs(2), next(&mut stream))
        .await
        .expect("the marked packet's slot freed across nodes");
    assert_eq!(d.packet.unwrap().packet_id, second);
    mark(&mut on_a, &second).await;
    drop(stream);
    // A's reader's last blocking read (1 s) ends before the packets come,
    // most times: one it brought after the stream left would be A's until
    // A handed it back (a heartbeat later), and is waited for below.
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    const N: usize = 400;
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

    // Queued (XADDed after the commit, so waited for), not yet read:
    // spread over the shards, on several nodes. No node holds any of them
    // (one read after the stream left is handed back by its node's
    // heartbeat): every entry is in a stream once.
    let deadline = Instant::now() + Duration::from_secs(10);
    let by_node = loop {
        let by_node = cluster.streams_by_node(&prefix);
        let queued: u64 = by_node.iter().flat_map(|n| n.values()).sum();
        if queued == N as u64 && cluster.held_entries(&prefix) == 0 {
            break by_node;
        }
        assert!(
            Instant::now() < deadline,
            "{queued} entries for {N} packets, {} held: {by_node:?}",
            cluster.held_entries(&prefix)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let keys: HashSet<&String> = by_node.iter().flat_map(|n| n.keys()).collect();
    assert_eq!(
        keys.len(),
        SHARDS as usize,
        "one stream key per shard: {by_node:?}"
    );
    let nodes_with_packets = by_node
        .iter()
        .filter(|n| n.values().any(|len| *len > 0))
        .count();
    assert!(
        nodes_with_packets >= 2,
        "the queue is on one node: {by_node:?}"
    );

    // An entry lost from one shard (a node stopped between commit and
    // XADD): the reconciler, reading every shard, puts back only it.
    let (port, key) = cluster
        .ports
        .iter()
        .zip(&by_node)
        .find_map(|(port, streams)| {
            let key = streams.iter().find(|(_, len)| **len > 0)?.0;
            Some((*port, key.clone()))
        })
        .unwrap();
    let first = cluster.ask(port, &["XRANGE", &key, "-", "+", "COUNT", "1"]);
    let mut lines = first.lines();
    let (entry, field, lost) = (
        lines.next().unwrap(),
        lines.next().unwrap(),
        lines.next().unwrap(),
    );
    assert_eq!(field, "id", "{first}");
    assert_eq!(cluster.ask(port, &["XDEL", &key, entry]).trim(), "1");
    let lost = lost.to_owned();
    let total = || -> u64 {
        cluster
            .streams_by_node(&prefix)
            .iter()
            .flat_map(|n| n.values())
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while total() < N as u64 {
        assert!(Instant::now() < deadline, "the lost entry never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A few more passes add nothing: the other shards' entries were seen.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        total(),
        N as u64,
        "the reconciler added entries already queued"
    );

    let (a, b) = (Arc::new(a), Arc::new(b));
    let seen = consume_across(&a, &b, 1).await;
    assert_eq!(seen.len(), N, "every packet delivered");
    assert!(
        seen.values().all(|n| *n == 1),
        "a packet reached two streams"
    );
    assert!(
        seen.contains_key(&lost),
        "the lost entry's packet never came back"
    );
    let counts = db.status_counts().await;
    assert_eq!(counts.get("processed"), Some(&(N as i64 + 2)));
    assert_eq!(
        counts.len(),
        1,
        "nothing left pending or leased: {counts:?}"
    );
}

/// A node killed while it holds packets from every shard: another node
/// claims them from each shard's pending-entries list once the dead one's
/// liveness key expires. The killed node is the binary, configured from
/// the environment (`REDIS_URL=redis-cluster://…`, `BUCKET_REDIS_SHARDS`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_s_packets_are_claimed_from_every_shard() {
    let cluster = Cluster::start().await;
    let db = TestDb::new(Backend::Postgres).await;
    let port = crate::crash::free_port();
    let mut killed = Command::new(env!("CARGO_BIN_EXE_bucket"))
        .env("BUCKET_LISTEN", format!("127.0.0.1:{port}"))
        .env("DATABASE_URL", &db.url)
        .env("REDIS_URL", cluster.url())
        .env("BUCKET_REDIS_SHARDS", SHARDS.to_string())
        .env_remove("REDIS_HOST")
        .env_remove("BUCKET_REDIS_PREFIX")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the bucket binary");
    let mut on_killed = crate::crash::connect(port).await;
    wait_for_redis(&mut on_killed, true).await;

    // Ingested until every shard holds some (ids are random).
    let mut sent = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for _ in 0..8 {
            let i = sent.len();
            sent.insert(ingest(&mut on_killed, packet_for(&format!("held{i}"))).await);
        }
        let streams: Vec<u64> = cluster
            .streams_by_node("bucket:")
            .into_iter()
            .flat_map(|n| n.into_values())
            .collect();
        let filled = streams.iter().filter(|len| **len > 0).count();
        if filled == SHARDS as usize && streams.iter().sum::<u64>() == sent.len() as u64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "shards never all filled: {streams:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let n = sent.len();
    let mut stream = subscribe(&mut on_killed, "before", n as u32, 600).await;
    for _ in 0..n {
        next(&mut stream).await;
    }
    killed.kill().unwrap(); // SIGKILL: nothing handed back
    killed.wait().unwrap();

    let mut config = test_config(&db);
    config.redis.redis_url = Some(cluster.url());
    config.redis.redis_shards = SHARDS;
    let survivor = TestApp::spawn_with(db.clone(), config).await;
    let mut client = survivor.client().await;
    let mut stream = subscribe(&mut client, "after", n as u32, 60).await;
    let mut delivered = HashSet::new();
    // The dead node's liveness key lives 10 s.
    let deadline = Instant::now() + Duration::from_secs(30);
    while delivered.len() < n && Instant::now() < deadline {
        let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(1), stream.message())
            .await
            .map(|m| m.transpose())
        else {
            continue;
        };
        let id = d.packet.unwrap().packet_id;
        assert!(delivered.insert(id.clone()), "{id} delivered twice");
    }
    assert_eq!(delivered, sent, "every held packet claimed");
}
