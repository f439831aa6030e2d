//! The bucket binary killed with SIGKILL in the middle of ingesting: every
//! packet it acknowledged is there after a restart, and is delivered.
use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bucket::proto::bucket::v1 as pb;
use bucket::proto::bucket::v1::bucket_service_client::BucketServiceClient;

use crate::helpers::{Backend, Rng, TestDb, packet_for};
use crate::on_every_backend;

on_every_backend!(
    acknowledged_packets_survive_sigkill,
    leased_packets_come_back_after_sigkill,
    acknowledged_work_survives_sigkill_at_random_moments
);

pub fn start(db: &TestDb, port: u16) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_bucket"));
    command
        .env("BUCKET_LISTEN", format!("127.0.0.1:{port}"))
        .env("DATABASE_URL", &db.url)
        .env_remove("REDIS_URL")
        .env_remove("REDIS_HOST")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some((url, prefix)) = &db.redis {
        command
            .env("REDIS_URL", url)
            .env("BUCKET_REDIS_PREFIX", prefix);
    }
    command.spawn().expect("the bucket binary")
}

pub async fn connect(port: u16) -> BucketServiceClient<tonic::transport::Channel> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(client) = BucketServiceClient::connect(format!("http://127.0.0.1:{port}")).await {
            return client;
        }
        assert!(Instant::now() < deadline, "the bucket did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn acknowledged_packets_survive_sigkill(backend: Backend) {
    let db = TestDb::new(backend).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = start(&db, port);
    let client = connect(port).await;

    // Eight senders ingest as fast as they can; only acknowledged ids count.
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let senders: Vec<_> = (0..8)
        .map(|s| spawn_sender(&client, format!("crash{s}"), acked.clone()))
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.kill().unwrap(); // SIGKILL: no shutdown, no flush
    server.wait().unwrap();
    for sender in senders {
        sender.await.unwrap();
    }
    let acked: HashSet<String> = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 50,
        "too few packets acknowledged to mean anything: {}",
        acked.len()
    );

    let mut server = start(&db, port);
    let mut client = connect(port).await;
    let total = client
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .total_packets;
    assert!(
        total as usize >= acked.len(),
        "{total} stored, {} acknowledged",
        acked.len()
    );
    // Every acknowledged packet is delivered after the restart.
    let mut stream = client
        .stream_pending(pb::StreamPendingRequest {
            consumer: "after-crash".into(),
            max_in_flight: 1000,
            lease_seconds: 60,
        })
        .await
        .unwrap()
        .into_inner();
    let mut delivered = HashSet::new();
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(3), stream.message())
        .await
        .map(|m| m.transpose())
    {
        let id = d.packet.unwrap().packet_id;
        client
            .mark_processed(pb::MarkProcessedRequest {
                packet_id: id.clone(),
                success: true,
                ..Default::default()
            })
            .await
            .unwrap();
        delivered.insert(id);
    }
    let lost: Vec<&String> = acked.iter().filter(|id| !delivered.contains(*id)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged packets lost, e.g. {:?}",
        lost.len(),
        acked.len(),
        lost.first()
    );
    assert_listed_by_user(&mut client, "crash", 8, &acked, "").await;
    server.kill().unwrap();
    server.wait().unwrap();
}

/// A sender that ingests as fast as it can until the server dies under it;
/// the ids acknowledged go into `acked`.
const USERS_PER_SENDER: usize = 7;

/// Every acknowledged id must be among the packets UserPackets lists,
/// paged to the end, for the users of senders `{prefix}0`..`{prefix}{senders}`.
async fn assert_listed_by_user(
    client: &mut BucketServiceClient<tonic::transport::Channel>,
    prefix: &str,
    senders: usize,
    acked: &HashSet<String>,
    context: &str,
) {
    let mut listed = HashSet::new();
    for s in 0..senders {
        for u in 0..USERS_PER_SENDER {
            let mut token = String::new();
            loop {
                let page = client
                    .user_packets(pb::UserPacketsRequest {
                        user_id: format!("{prefix}{s}_{u}"),
                        limit: 500,
                        page_token: token,
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                listed.extend(page.packets.into_iter().map(|p| p.packet_id));
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
        }
    }
    let unlisted: Vec<&String> = acked.difference(&listed).collect();
    assert!(
        unlisted.is_empty(),
        "{} of {} acknowledged packets missing from their user's packets, e.g. {:?}{context}",
        unlisted.len(),
        acked.len(),
        unlisted.first()
    );
}

fn spawn_sender(
    client: &BucketServiceClient<tonic::transport::Channel>,
    prefix: String,
    acked: Arc<Mutex<HashSet<String>>>,
) -> tokio::task::JoinHandle<()> {
    let mut client = client.clone();
    tokio::spawn(async move {
        for i in 0.. {
            // A few users per sender, so each user's packets span folds
            // (and, where a prefix outlives a restart, restarts).
            let packet = packet_for(&format!("{prefix}_{}", i % USERS_PER_SENDER));
            match client
                .ingest(pb::IngestRequest {
                    packet: Some(packet),
                })
                .await
            {
                Ok(r) => {
                    acked.lock().unwrap().insert(r.into_inner().packet_id);
                }
                Err(_) => return, // the server died under us
            }
        }
    })
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Leases live in memory: a crash forgets them, and their packets are
/// delivered again after the restart, the interrupted delivery uncounted.
async fn leased_packets_come_back_after_sigkill(backend: Backend) {
    let db = TestDb::new(backend).await;
    let port = free_port();
    let mut server = start(&db, port);
    let mut client = connect(port).await;
    let mut sent = HashSet::new();
    for i in 0..20 {
        let id = client
            .ingest(pb::IngestRequest {
                packet: Some(packet_for(&format!("lease{i}"))),
            })
            .await
            .unwrap()
            .into_inner()
            .packet_id;
        sent.insert(id);
    }
    let mut stream = client
        .stream_pending(pb::StreamPendingRequest {
            consumer: "before-crash".into(),
            max_in_flight: 5,
            lease_seconds: 600,
        })
        .await
        .unwrap()
        .into_inner();
    let mut leased = Vec::new();
    for _ in 0..5 {
        let d = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        leased.push(d.packet.unwrap().packet_id);
    }
    for id in &leased[..2] {
        client
            .mark_processed(pb::MarkProcessedRequest {
                packet_id: id.clone(),
                success: true,
                ..Default::default()
            })
            .await
            .unwrap();
        sent.remove(id);
    }
    server.kill().unwrap(); // SIGKILL while three packets are leased for 10 min
    server.wait().unwrap();

    let mut server = start(&db, port);
    let mut client = connect(port).await;
    let mut stream = client
        .stream_pending(pb::StreamPendingRequest {
            consumer: "after-crash".into(),
            max_in_flight: 100,
            lease_seconds: 60,
        })
        .await
        .unwrap()
        .into_inner();
    let mut delivered = HashSet::new();
    // With Redis the dead node's entries are claimed once its liveness key
    // expires (10 s).
    let deadline = Instant::now() + Duration::from_secs(30);
    while delivered.len() < sent.len() && Instant::now() < deadline {
        let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(1), stream.message())
            .await
            .map(|m| m.transpose())
        else {
            continue;
        };
        let id = d.packet.unwrap().packet_id;
        if leased.contains(&id) {
            assert_eq!(
                d.delivery_attempt, 1,
                "a crash leaves the delivery uncounted"
            );
        }
        assert!(delivered.insert(id.clone()), "{id} delivered twice");
    }
    assert_eq!(
        delivered, sent,
        "every unmarked packet again, the marked ones not"
    );
    server.kill().unwrap();
    server.wait().unwrap();
}

/// Round after round, the binary is killed at a moment drawn from a seed
/// (printed; `BUCKET_TEST_SEED` replays it) while senders ingest and a
/// consumer marks what it is given: on SQLite the kill lands before, during
/// or after a fold of the record log into the tables. At the end every
/// acknowledged packet is there, listed among its user's packets (users
/// outlive the rounds, so their chains run across restarts), and exactly
/// the ones whose mark was not acknowledged are still to be delivered.
async fn acknowledged_work_survives_sigkill_at_random_moments(backend: Backend) {
    let seed: u64 = std::env::var("BUCKET_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("BUCKET_TEST_SEED={seed}");
    let mut rng = Rng(seed);
    let db = TestDb::new(backend).await;
    let port = free_port();
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let marked = Arc::new(Mutex::new(HashSet::new()));
    // Marks sent: one whose answer the kill cut off may still have been
    // recorded, and its packet is then rightly not delivered again.
    let tried = Arc::new(Mutex::new(HashSet::new()));
    const ROUNDS: usize = 3;
    for round in 0..ROUNDS {
        let mut server = start(&db, port);
        let client = connect(port).await;
        let mut tasks: Vec<_> = (0..4)
            .map(|s| spawn_sender(&client, format!("s{s}"), acked.clone()))
            .collect();
        let (mut consumer, marked, tried) = (client.clone(), marked.clone(), tried.clone());
        tasks.push(tokio::spawn(async move {
            let Ok(stream) = consumer
                .stream_pending(pb::StreamPendingRequest {
                    consumer: format!("round{round}"),
                    max_in_flight: 64,
                    lease_seconds: 600,
                })
                .await
            else {
                return;
            };
            let mut stream = stream.into_inner();
            while let Ok(Some(d)) = stream.message().await {
                let id = d.packet.unwrap().packet_id;
                tried.lock().unwrap().insert(id.clone());
                let mark = pb::MarkProcessedRequest {
                    packet_id: id.clone(),
                    success: true,
                    ..Default::default()
                };
                match consumer.mark_processed(mark).await {
                    Ok(_) => {
                        marked.lock().unwrap().insert(id);
                    }
                    Err(_) => return,
                }
            }
        }));
        let after = Duration::from_millis(300 + rng.below(2200));
        eprintln!("round {round}: SIGKILL after {after:?}");
        tokio::time::sleep(after).await;
        server.kill().unwrap();
        server.wait().unwrap();
        for task in tasks {
            task.await.unwrap();
        }
    }
    let (acked, marked) = (
        acked.lock().unwrap().clone(),
        marked.lock().unwrap().clone(),
    );
    assert!(acked.len() > 50, "too few acknowledged: {}", acked.len());
    assert!(!marked.is_empty(), "nothing was marked");

    let mut server = start(&db, port);
    let mut client = connect(port).await;
    let mut stream = client
        .stream_pending(pb::StreamPendingRequest {
            consumer: "after-crashes".into(),
            max_in_flight: 1000,
            lease_seconds: 600,
        })
        .await
        .unwrap()
        .into_inner();
    let expected: HashSet<String> = acked.difference(&marked).cloned().collect();
    // Delivered again, or marked by a mark whose answer was cut off.
    let settled = |delivered: &HashSet<String>| {
        expected
            .iter()
            .all(|id| delivered.contains(id) || tried.lock().unwrap().contains(id))
    };
    let mut delivered = HashSet::new();
    // With Redis, entries a dead node held are claimed once its liveness
    // key expires (10 s).
    let deadline = Instant::now() + Duration::from_secs(40);
    while Instant::now() < deadline {
        let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(3), stream.message())
            .await
            .map(|m| m.transpose())
        else {
            if settled(&delivered) {
                break;
            }
            continue;
        };
        let id = d.packet.unwrap().packet_id;
        assert!(
            !marked.contains(&id),
            "{id}: its mark was acknowledged, yet it is delivered again (seed {seed})"
        );
        client
            .mark_processed(pb::MarkProcessedRequest {
                packet_id: id.clone(),
                success: true,
                ..Default::default()
            })
            .await
            .unwrap();
        delivered.insert(id);
    }
    let tried = tried.lock().unwrap().clone();
    let lost: Vec<&String> = expected
        .difference(&delivered)
        .filter(|id| !tried.contains(*id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged, unmarked packets lost, e.g. {:?} (seed {seed})",
        lost.len(),
        expected.len(),
        lost.first()
    );
    // Each user's packets, along its chain of folds, across the restarts.
    assert_listed_by_user(&mut client, "s", 4, &acked, &format!(" (seed {seed})")).await;
    eprintln!(
        "{} acknowledged, {} marks acknowledged, {} delivered after the crashes",
        acked.len(),
        marked.len(),
        delivered.len()
    );
    server.kill().unwrap();
    server.wait().unwrap();
}
