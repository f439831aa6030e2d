//! Faults the bucket must ride out without acknowledging anything it did not
//! store: PostgreSQL stopped in the middle of a load and started again, and
//! the SQLite file's disk running full. Both run the bucket in-process on a
//! database of the test's own (a PostgreSQL cluster on a free port, a small
//! tmpfs), which a guard takes down even when the test panics.
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bucket::proto::bucket::v1 as pb;
use bucket::proto::bucket::v1::bucket_service_client::BucketServiceClient;
use bucket::proto::json_to_struct;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::helpers::{Backend, TestApp, TestDb, packet_for, subscribe, test_config};
use crate::own_postgres::OwnPostgres;

/// No answer of the bucket may take longer than this, outage or not.
const BOUND: Duration = Duration::from_secs(10);
/// How long a client waits before it calls an answer a hang.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// Recording a load
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// Acknowledged: the bucket says it is stored.
    Ok,
    /// UNAVAILABLE (gRPC) or 503 (REST).
    Unavailable,
    /// Anything else: a wrong code, a wrong id, no answer in time.
    Other(String),
}

#[derive(Debug, Clone)]
struct Attempt {
    loader: usize,
    packet_id: String,
    started: Instant,
    took: Duration,
    outcome: Outcome,
    /// The error's message, for failures.
    detail: String,
}

impl Attempt {
    fn ended(&self) -> Instant {
        self.started + self.took
    }
}

type Log = Arc<Mutex<Vec<Attempt>>>;

/// What a loader sends through.
#[derive(Debug, Clone, Copy)]
enum Via {
    Grpc,
    Rest,
}

/// A client that ingests one packet after another until `stop`, each with a
/// fresh client-chosen id, recording every answer and how long it took.
fn spawn_loader(
    app: &TestApp,
    loader: usize,
    via: Via,
    pad: usize,
    log: Log,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let url = app.url();
    tokio::spawn(async move {
        let mut grpc = BucketServiceClient::connect(url.clone())
            .await
            .expect("connect");
        let http = reqwest::Client::new();
        let mut i = 0u64;
        while !stop.is_cancelled() {
            i += 1;
            let packet_id = uuid::Uuid::new_v4().to_string();
            let user = format!("fault{loader}_{i}");
            let started = Instant::now();
            let (outcome, detail) = match via {
                Via::Grpc => ingest_grpc(&mut grpc, &packet_id, &user, pad).await,
                Via::Rest => ingest_rest(&http, &url, &packet_id, &user, pad).await,
            };
            log.lock().unwrap().push(Attempt {
                loader,
                packet_id,
                started,
                took: started.elapsed(),
                outcome,
                detail,
            });
        }
    })
}

fn padding(pad: usize) -> serde_json::Value {
    json!({"dwell_time_ms": 1200, "pad": "x".repeat(pad)})
}

async fn ingest_grpc(
    client: &mut BucketServiceClient<Channel>,
    packet_id: &str,
    user: &str,
    pad: usize,
) -> (Outcome, String) {
    let packet = pb::PacketInput {
        packet_id: packet_id.into(),
        raw_signals: Some(json_to_struct(padding(pad).as_object().unwrap())),
        ..packet_for(user)
    };
    let call = client.ingest(pb::IngestRequest {
        packet: Some(packet),
    });
    let outcome = match tokio::time::timeout(CLIENT_TIMEOUT, call).await {
        Err(_) => Outcome::Other(format!("no answer within {CLIENT_TIMEOUT:?}")),
        Ok(Ok(r)) if r.get_ref().packet_id == packet_id => Outcome::Ok,
        Ok(Ok(r)) => Outcome::Other(format!("acknowledged another id: {:?}", r.get_ref())),
        Ok(Err(s)) if s.code() == Code::Unavailable => {
            return (Outcome::Unavailable, s.message().to_owned());
        }
        Ok(Err(s)) => Outcome::Other(format!("{:?}: {}", s.code(), s.message())),
    };
    (outcome, String::new())
}

async fn ingest_rest(
    http: &reqwest::Client,
    base: &str,
    packet_id: &str,
    user: &str,
    pad: usize,
) -> (Outcome, String) {
    let body = json!({
        "packet_id": packet_id,
        "user_id": user,
        "session_id": "session_456",
        "system_type": "gurukul",
        "role": "student",
        "timestamp": "2024-01-20T10:30:00Z",
        "cognitive_state": "ON_TASK",
        "active_seconds": 4.5,
        "idle_seconds": 0.3,
        "away_seconds": 0.2,
        "focus_score": 85.0,
        "raw_signals": padding(pad),
    });
    let call = http
        .post(format!("{base}/api/v1/bucket/prana/ingest"))
        .json(&body)
        .send();
    let response = match tokio::time::timeout(CLIENT_TIMEOUT, call).await {
        Err(_) => {
            let no_answer = format!("no answer within {CLIENT_TIMEOUT:?}");
            return (Outcome::Other(no_answer), String::new());
        }
        Ok(Err(e)) => return (Outcome::Other(format!("HTTP error: {e}")), String::new()),
        Ok(Ok(response)) => response,
    };
    let code = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    match code {
        200 if body["packet_id"] == packet_id => (Outcome::Ok, String::new()),
        503 => (
            Outcome::Unavailable,
            body["detail"].as_str().unwrap_or_default().to_owned(),
        ),
        _ => (
            Outcome::Other(format!("HTTP {code}: {body}")),
            String::new(),
        ),
    }
}

fn snapshot(log: &Log) -> Vec<Attempt> {
    log.lock().unwrap().clone()
}

/// Waits until `done` holds for the log, or fails the test with `what`.
async fn wait_log(log: &Log, within: Duration, what: &str, done: impl Fn(&[Attempt]) -> bool) {
    let deadline = Instant::now() + within;
    loop {
        if done(&snapshot(log)) {
            return;
        }
        if Instant::now() >= deadline {
            let log = snapshot(log);
            let tail: Vec<_> = log.iter().rev().take(5).collect();
            panic!(
                "{what}: not within {within:?} ({} attempts, the last: {tail:#?})",
                log.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The checks every fault shares: each answer was OK or UNAVAILABLE and
/// came within [`BOUND`]; answers the ids of the acknowledged packets.
fn acknowledged(log: &[Attempt]) -> HashSet<String> {
    let wrong: Vec<&Attempt> = log
        .iter()
        .filter(|a| matches!(a.outcome, Outcome::Other(_)))
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} ingests answered neither OK nor UNAVAILABLE, e.g. {:#?}",
        wrong.len(),
        log.len(),
        &wrong[..wrong.len().min(3)]
    );
    let slowest = log.iter().max_by_key(|a| a.took).expect("some ingests");
    assert!(
        slowest.took < BOUND,
        "an ingest took {:?} (bound {BOUND:?}): {slowest:#?}",
        slowest.took
    );
    log.iter()
        .filter(|a| a.outcome == Outcome::Ok)
        .map(|a| a.packet_id.clone())
        .collect()
}

/// The message of the first UNAVAILABLE answer, for the record.
fn first_refusal(log: &[Attempt]) -> &str {
    log.iter()
        .find(|a| a.outcome == Outcome::Unavailable)
        .map_or("", |a| a.detail.as_str())
}

fn count(log: &[Attempt], outcome: &Outcome) -> usize {
    log.iter().filter(|a| &a.outcome == outcome).count()
}

/// A StreamPending consumer receives every one of `ids` (and marks what it
/// gets, in batches, so its window keeps moving).
async fn assert_delivered(app: &TestApp, ids: &HashSet<String>, within: Duration) {
    let mut client = app.client().await;
    let mut stream = subscribe(&mut client, "after-fault", 1000, 120).await;
    let mut delivered = HashSet::new();
    let mut unmarked = Vec::new();
    let deadline = Instant::now() + within;
    while !ids.is_subset(&delivered) {
        assert!(
            Instant::now() < deadline,
            "{} of {} acknowledged packets not delivered within {within:?}, e.g. {:?}",
            ids.difference(&delivered).count(),
            ids.len(),
            ids.difference(&delivered).next()
        );
        let quiet = match tokio::time::timeout(Duration::from_millis(200), stream.message()).await {
            Ok(message) => {
                let d = message
                    .expect("the stream stays healthy")
                    .expect("the stream stays open");
                let id = d.packet.expect("a delivery has its packet").packet_id;
                delivered.insert(id.clone());
                unmarked.push(id);
                false
            }
            Err(_) => true,
        };
        if unmarked.len() >= 200 || (quiet && !unmarked.is_empty()) {
            let marks = unmarked
                .drain(..)
                .map(|packet_id| pb::MarkProcessedRequest {
                    packet_id,
                    success: true,
                    ..Default::default()
                })
                .collect();
            let marked = client
                .mark_processed_batch(pb::MarkProcessedBatchRequest { marks })
                .await
                .expect("marks answered once storage is back")
                .into_inner();
            assert_eq!(marked.rejected, 0, "{marked:?}");
        }
    }
}

// ---------------------------------------------------------------------------
// Health and readiness
// ---------------------------------------------------------------------------

/// Waits until grpc.health.v1 reports `want` for "" and for the service.
async fn wait_health(app: &TestApp, want: ServingStatus, within: Duration) {
    let channel = Channel::from_shared(app.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let deadline = Instant::now() + within;
    let mut last = Vec::new();
    loop {
        last.clear();
        for service in ["", "bucket.v1.BucketService"] {
            let check = health.check(HealthCheckRequest {
                service: service.into(),
            });
            let got = match tokio::time::timeout(Duration::from_secs(2), check).await {
                Ok(Ok(r)) => ServingStatus::try_from(r.into_inner().status).ok(),
                _ => None,
            };
            last.push((service, got));
        }
        if last.iter().all(|(_, got)| *got == Some(want)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "health never became {want:?} within {within:?}: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// GET /readyz: its status code, answered within [`BOUND`].
async fn readyz(app: &TestApp) -> u16 {
    let started = Instant::now();
    let response = tokio::time::timeout(
        CLIENT_TIMEOUT,
        reqwest::get(format!("{}/readyz", app.url())),
    )
    .await
    .expect("/readyz answers")
    .expect("/readyz over HTTP");
    assert!(
        started.elapsed() < BOUND,
        "/readyz took {:?}",
        started.elapsed()
    );
    response.status().as_u16()
}

// ---------------------------------------------------------------------------
// PostgreSQL stopped mid-load
// ---------------------------------------------------------------------------

/// Ids of every packet stored in a PostgreSQL database.
async fn stored_in_postgres(url: &str) -> HashSet<String> {
    let pool = sqlx::PgPool::connect(url).await.expect("own PostgreSQL");
    let ids: Vec<String> = sqlx::query_scalar("SELECT packet_id::text FROM packets")
        .fetch_all(&pool)
        .await
        .unwrap();
    pool.close().await;
    ids.into_iter().collect()
}

/// MarkProcessed and MarkProcessedBatch while the database is away: both
/// UNAVAILABLE (per item for the batch), within the bound.
async fn assert_marks_unavailable(app: &TestApp, ids: &[String]) {
    let mut client = app.client().await;
    let started = Instant::now();
    let one = tokio::time::timeout(
        CLIENT_TIMEOUT,
        client.mark_processed(pb::MarkProcessedRequest {
            packet_id: ids[0].clone(),
            success: true,
            ..Default::default()
        }),
    )
    .await
    .expect("MarkProcessed answers during the outage");
    let took = started.elapsed();
    match one {
        Err(s) if s.code() == Code::Unavailable => {}
        other => panic!("MarkProcessed during the outage: {other:?}"),
    }
    assert!(took < BOUND, "MarkProcessed took {took:?}");

    let started = Instant::now();
    let marks = ids[1..]
        .iter()
        .map(|id| pb::MarkProcessedRequest {
            packet_id: id.clone(),
            success: true,
            ..Default::default()
        })
        .collect();
    let batch = tokio::time::timeout(
        CLIENT_TIMEOUT,
        client.mark_processed_batch(pb::MarkProcessedBatchRequest { marks }),
    )
    .await
    .expect("MarkProcessedBatch answers during the outage")
    .expect("MarkProcessedBatch answers item by item")
    .into_inner();
    let took = started.elapsed();
    assert!(took < BOUND, "MarkProcessedBatch took {took:?}");
    assert_eq!(batch.marked, 0, "{batch:?}");
    for result in &batch.results {
        match &result.outcome {
            Some(pb::mark_processed_batch_result::Outcome::Error(e))
                if e.code == Code::Unavailable as i32 => {}
            other => panic!("a batch mark during the outage: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_mid_load_and_started_again() {
    let mut pg = OwnPostgres::start().await;
    // The bucket's database is `pg`; the TestDb (an unused SQLite path) only
    // satisfies TestApp.
    let unused = TestDb::new(Backend::Sqlite).await;
    let mut config = test_config(&unused);
    config.database_url = pg.url();
    let app = TestApp::spawn_with(unused, config).await;
    wait_health(&app, ServingStatus::Serving, Duration::from_secs(10)).await;

    // Three gRPC clients and one REST client ingest without a pause.
    let log: Log = Arc::default();
    let stop = CancellationToken::new();
    let loaders: Vec<_> = [Via::Grpc, Via::Grpc, Via::Grpc, Via::Rest]
        .into_iter()
        .enumerate()
        .map(|(i, via)| spawn_loader(&app, i, via, 0, log.clone(), stop.clone()))
        .collect();
    wait_log(
        &log,
        Duration::from_secs(10),
        "100 acknowledged before",
        |log| count(log, &Outcome::Ok) >= 100,
    )
    .await;

    pg.down().await;
    let down_at = Instant::now();
    let some_acked: Vec<String> = snapshot(&log)
        .iter()
        .filter(|a| a.outcome == Outcome::Ok)
        .take(3)
        .map(|a| a.packet_id.clone())
        .collect();
    // While it is away: health, readiness and marks say so, and every
    // loader has an ingest started and answered inside the outage.
    let health = wait_health(&app, ServingStatus::NotServing, Duration::from_secs(15));
    let ready = async {
        assert_eq!(readyz(&app).await, 503, "/readyz during the outage");
    };
    let marks = assert_marks_unavailable(&app, &some_acked);
    tokio::join!(health, ready, marks);
    wait_log(
        &log,
        Duration::from_secs(30),
        "each loader answered inside the outage",
        |log| {
            (0..4).all(|i| {
                // Logged once answered.
                log.iter().any(|a| a.loader == i && a.started >= down_at)
            })
        },
    )
    .await;

    let up_at = Instant::now();
    pg.up().await;
    wait_health(&app, ServingStatus::Serving, Duration::from_secs(20)).await;
    let serving_at = Instant::now();
    assert_eq!(readyz(&app).await, 200, "/readyz after the outage");
    // Ingest works again, the bucket never restarted: each loader gets
    // acknowledgements for ingests it started after the restart.
    wait_log(
        &log,
        Duration::from_secs(20),
        "each loader acknowledged after the restart",
        |log| {
            (0..4).all(|i| {
                log.iter()
                    .filter(|a| a.loader == i && a.started > up_at && a.outcome == Outcome::Ok)
                    .count()
                    >= 10
            })
        },
    )
    .await;
    stop.cancel();
    for loader in loaders {
        loader.await.expect("loader");
    }

    let log = snapshot(&log);
    let acked = acknowledged(&log);
    let inside: Vec<&Attempt> = log
        .iter()
        .filter(|a| a.started >= down_at && a.ended() <= up_at)
        .collect();
    assert!(
        inside.len() >= 4,
        "too few ingests inside the outage: {inside:#?}"
    );
    let acked_inside: Vec<&&Attempt> = inside
        .iter()
        .filter(|a| a.outcome != Outcome::Unavailable)
        .collect();
    assert!(
        acked_inside.is_empty(),
        "answered other than UNAVAILABLE while PostgreSQL was down: {acked_inside:#?}"
    );
    // Once health says SERVING, the pool holds no connection of the old
    // server any more: nothing fails.
    let refused: Vec<&Attempt> = log
        .iter()
        .filter(|a| a.started > serving_at && a.outcome != Outcome::Ok)
        .collect();
    assert!(
        refused.is_empty(),
        "ingests failed after health was SERVING again: {refused:#?}"
    );
    let after = log.iter().filter(|a| a.started > up_at).collect::<Vec<_>>();
    eprintln!(
        "postgres outage: {} ingests ({} OK, {} UNAVAILABLE); {} inside the outage, \
         slowest {:?}; after the restart {} ({} UNAVAILABLE); e.g. {:?}",
        log.len(),
        acked.len(),
        count(&log, &Outcome::Unavailable),
        inside.len(),
        inside.iter().map(|a| a.took).max().unwrap_or_default(),
        after.len(),
        after
            .iter()
            .filter(|a| a.outcome == Outcome::Unavailable)
            .count(),
        first_refusal(&log),
    );

    let stored = stored_in_postgres(&pg.url()).await;
    // Allowed, and counted for the record: a statement cut off by the
    // crash may have committed before its answer was lost (a client
    // retries with the same packet_id).
    let committed_unanswered = log
        .iter()
        .filter(|a| a.outcome == Outcome::Unavailable && stored.contains(&a.packet_id))
        .count();
    eprintln!("postgres outage: {committed_unanswered} UNAVAILABLE ingests stored all the same");
    let lost: Vec<&String> = acked.difference(&stored).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged packets are not in the database, e.g. {:?}",
        lost.len(),
        acked.len(),
        lost.first()
    );
    assert_delivered(&app, &acked, Duration::from_secs(30)).await;
    app.stop().await;
    drop(pg);
}

// ---------------------------------------------------------------------------
// SQLite on a full disk
// ---------------------------------------------------------------------------

/// A small filesystem mounted on a temporary directory: tmpfs, or where
/// tmpfs cannot be mounted, ext4 on a loop device. Unmounted on drop.
struct SmallDisk {
    mount: tempfile::TempDir,
    /// The ext4 image, outside the mount.
    _image: Option<tempfile::TempDir>,
    kind: &'static str,
}

impl SmallDisk {
    fn mount(mib: u64) -> SmallDisk {
        let mount = tempfile::tempdir().expect("tempdir");
        let at = mount.path().display().to_string();
        let size = format!("size={mib}m");
        if command_ok("mount", &["-t", "tmpfs", "-o", &size, "tmpfs", &at]) {
            return SmallDisk {
                mount,
                _image: None,
                kind: "tmpfs",
            };
        }
        let image_dir = tempfile::tempdir().expect("tempdir");
        let image = image_dir.path().join("disk.img").display().to_string();
        let made = command_ok("truncate", &["-s", &format!("{mib}M"), &image])
            && command_ok("mkfs.ext4", &["-q", "-m", "0", &image])
            && command_ok("mount", &["-o", "loop", &image, &at]);
        assert!(
            made,
            "neither a tmpfs nor a loop-mounted ext4 could be mounted on {at} \
             (the test needs root, or CAP_SYS_ADMIN)"
        );
        SmallDisk {
            mount,
            _image: Some(image_dir),
            kind: "ext4 on a loop device",
        }
    }

    fn path(&self) -> &Path {
        self.mount.path()
    }

    /// Free bytes, as `df` sees them.
    fn free(&self) -> u64 {
        let output = std::process::Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(self.path())
            .output()
            .expect("df");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .expect("df prints the free bytes")
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let at = self.path().display().to_string();
        // Lazily when busy (a bucket of a failed test still holding files).
        if !command_ok("umount", &[&at]) {
            let _ = command_ok("umount", &["-l", &at]);
        }
    }
}

fn command_ok(program: &str, args: &[&str]) -> bool {
    std::process::Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Takes all but `leave` bytes of the disk with a file of its own.
fn fill(disk: &SmallDisk, leave: u64) -> PathBuf {
    use std::io::Write;
    let path = disk.path().join("filler");
    let mut file = std::fs::File::create(&path).expect("filler");
    let mut left = disk.free().saturating_sub(leave);
    let chunk = vec![0xa5u8; 64 * 1024];
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        file.write_all(&chunk[..n]).expect("filler fits");
        left -= n as u64;
    }
    file.sync_all().expect("filler synced");
    path
}

/// Ids of every packet stored in a SQLite file.
async fn stored_in_sqlite(url: &str) -> HashSet<String> {
    let pool = sqlx::SqlitePool::connect(url)
        .await
        .expect("the SQLite file");
    let ids: Vec<String> = sqlx::query_scalar("SELECT packet_id FROM packets")
        .fetch_all(&pool)
        .await
        .unwrap();
    pool.close().await;
    ids.into_iter().collect()
}

/// Ids of the packets a SQLite file holds as processed.
async fn processed_in_sqlite(url: &str) -> HashSet<String> {
    let pool = sqlx::SqlitePool::connect(url)
        .await
        .expect("the SQLite file");
    let ids: Vec<String> =
        sqlx::query_scalar("SELECT packet_id FROM packets WHERE status = 'processed'")
            .fetch_all(&pool)
            .await
            .unwrap();
    pool.close().await;
    ids.into_iter().collect()
}

/// The longest run of consecutive failures at the end of the log.
fn failing_streak(log: &[Attempt]) -> usize {
    let mut sorted: Vec<&Attempt> = log.iter().collect();
    sorted.sort_by_key(|a| a.ended());
    sorted
        .iter()
        .rev()
        .take_while(|a| a.outcome != Outcome::Ok)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_on_a_full_disk() {
    let disk = SmallDisk::mount(16);
    let url = format!("sqlite://{}/bucket.db", disk.path().display());
    let unused = TestDb::new(Backend::Sqlite).await;
    let mut config = test_config(&unused);
    config.database_url = url.clone();
    let app = TestApp::spawn_with(unused, config).await;
    let mut client = app.client().await;

    // Two gRPC clients and one REST client ingest packets of ~1 KiB until
    // the disk, once a filler leaves it 1.5 MiB, is full.
    let log: Log = Arc::default();
    let stop = CancellationToken::new();
    let loaders: Vec<_> = [Via::Grpc, Via::Grpc, Via::Rest]
        .into_iter()
        .enumerate()
        .map(|(i, via)| spawn_loader(&app, i, via, 1024, log.clone(), stop.clone()))
        .collect();
    wait_log(
        &log,
        Duration::from_secs(10),
        "50 acknowledged before",
        |log| count(log, &Outcome::Ok) >= 50,
    )
    .await;
    let filler = fill(&disk, 1536 * 1024);
    wait_log(
        &log,
        Duration::from_secs(30),
        "the disk full: 30 ingests failing in a row",
        |log| failing_streak(log) >= 30,
    )
    .await;

    // Full, and still serving: alive, and reads answer.
    let alive = reqwest::get(format!("{}/healthz", app.url()))
        .await
        .expect("/healthz on a full disk");
    assert_eq!(alive.status().as_u16(), 200, "alive on a full disk");
    let status = client
        .status(pb::StatusRequest {})
        .await
        .expect("Status answers on a full disk")
        .into_inner();
    let ready_when_full = readyz(&app).await;
    // Marks need room too, though less than an insert: one may still fit
    // (in WAL space a failed insert left allocated). Each is UNAVAILABLE,
    // or acknowledged and then recorded, never anything else.
    let mut marked_when_full = HashSet::new();
    let acked_so_far: Vec<String> = snapshot(&log)
        .iter()
        .filter(|a| a.outcome == Outcome::Ok)
        .take(3)
        .map(|a| a.packet_id.clone())
        .collect();
    for packet_id in acked_so_far {
        let started = Instant::now();
        let marked = tokio::time::timeout(
            CLIENT_TIMEOUT,
            client.mark_processed(pb::MarkProcessedRequest {
                packet_id: packet_id.clone(),
                success: true,
                ..Default::default()
            }),
        )
        .await
        .expect("MarkProcessed answers on a full disk");
        assert!(
            started.elapsed() < BOUND,
            "MarkProcessed took {:?}",
            started.elapsed()
        );
        match marked {
            Ok(_) => {
                marked_when_full.insert(packet_id);
            }
            Err(s) if s.code() == Code::Unavailable => {}
            Err(s) => panic!("MarkProcessed on a full disk: {s:?}"),
        }
    }
    let full_at = Instant::now();

    // Space comes back: ingest works again, no restart.
    std::fs::remove_file(&filler).expect("the filler goes");
    let freed_at = Instant::now();
    wait_log(
        &log,
        Duration::from_secs(20),
        "each loader acknowledged after space came back",
        |log| {
            (0..3).all(|i| {
                log.iter()
                    .filter(|a| a.loader == i && a.started > freed_at && a.outcome == Outcome::Ok)
                    .count()
                    >= 10
            })
        },
    )
    .await;
    stop.cancel();
    for loader in loaders {
        loader.await.expect("loader");
    }

    let log = snapshot(&log);
    let acked = acknowledged(&log);
    let failed: HashSet<String> = log
        .iter()
        .filter(|a| a.outcome == Outcome::Unavailable)
        .map(|a| a.packet_id.clone())
        .collect();
    eprintln!(
        "sqlite full disk ({}): {} ingests, {} OK, {} UNAVAILABLE, {} stored when full, \
         /readyz {ready_when_full} when full, {} of 3 marks acknowledged when full, \
         slowest {:?}; e.g. {:?}",
        disk.kind,
        log.len(),
        acked.len(),
        failed.len(),
        status.total_packets,
        marked_when_full.len(),
        log.iter().map(|a| a.took).max().unwrap_or_default(),
        first_refusal(&log),
    );
    assert!(
        log.iter()
            .any(|a| a.outcome == Outcome::Unavailable && a.ended() < full_at),
        "the disk never ran full"
    );

    app.db.sync_tables().await;
    let stored = stored_in_sqlite(&url).await;
    let lost: Vec<&String> = acked.difference(&stored).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged packets are not in the database, e.g. {:?}",
        lost.len(),
        acked.len(),
        lost.first()
    );
    // SQLite commits a group in one transaction: one that failed left
    // nothing behind (UNAVAILABLE means nothing was written).
    let kept: Vec<&String> = failed.intersection(&stored).collect();
    assert!(
        kept.is_empty(),
        "{} packets answered UNAVAILABLE are stored, e.g. {:?}",
        kept.len(),
        kept.first()
    );
    let processed = processed_in_sqlite(&url).await;
    assert!(
        marked_when_full.is_subset(&processed),
        "acknowledged marks not recorded: {:?}",
        marked_when_full.difference(&processed).collect::<Vec<_>>()
    );
    let open: HashSet<String> = acked.difference(&marked_when_full).cloned().collect();
    assert_delivered(&app, &open, Duration::from_secs(30)).await;
    app.stop().await;
    drop(disk);
}
