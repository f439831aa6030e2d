//! Hardening, second pass: what an attacker or a careless setting could do
//! to a node (memory, connections, settings that open doors), each probe
//! as a test. Memory is read from the kernel (VmHWM, the peak resident
//! size) of a bucket started as a child process, never from timing.
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::helpers::{Backend, TestApp, TestDb, test_config};

const PREFIX: &str = "http://{}/api/v1/bucket/prana";

fn bucket_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_bucket"));
    // Only what the test sets: no BUCKET_*, DATABASE_URL or REDIS_* of the
    // shell that runs the tests.
    command.env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        command.env("PATH", path);
    }
    command
}

#[test]
fn a_retention_that_is_not_a_period_is_a_configuration_error() {
    let out = bucket_command()
        .env("BUCKET_RETENTION", "30é")
        .env("DATABASE_URL", "sqlite::memory:")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("retention"), "{stderr}");
}

#[test]
fn help_does_not_print_the_database_or_redis_url() {
    let out = bucket_command()
        .arg("--help")
        .env(
            "DATABASE_URL",
            "postgres://bucket:hunter2@db.internal/bucket",
        )
        .env("REDIS_URL", "redis://:swordfish@cache.internal:6379")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("DATABASE_URL"), "{help}");
    for secret in ["hunter2", "swordfish", "db.internal", "cache.internal"] {
        assert!(!help.contains(secret), "--help shows {secret}:\n{help}");
    }
}

/// `packets/pending` answers a queue failure with advice, not with what
/// Redis said (here WRONGTYPE: the stream key made a plain string).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_does_not_leak_the_queues_own_error_text() {
    use fred::prelude::*;
    let app = TestApp::spawn(Backend::Redis).await;
    let (url, prefix) = app.db.redis.clone().unwrap();
    let redis = Builder::from_config(Config::from_url(&url).unwrap())
        .build()
        .unwrap();
    redis.init().await.unwrap();
    let key = format!("{prefix}pending");
    let _: () = redis.del(&key).await.unwrap();
    let _: () = redis
        .set(&key, "not a stream", None, None, false)
        .await
        .unwrap();
    let answer = reqwest::get(format!(
        "{}/packets/pending",
        PREFIX.replace("{}", &app.addr.to_string())
    ))
    .await
    .unwrap();
    let status = answer.status().as_u16();
    let body = answer.text().await.unwrap();
    let _: () = redis.del(&key).await.unwrap();
    assert_eq!(status, 503, "{body}");
    for leak in ["WRONGTYPE", "Redis", "redis", "kind of value"] {
        assert!(!body.contains(leak), "{body}");
    }
    assert!(body.contains("retry with backoff"), "{body}");
}

/// A bucket in a process of its own (SQLite in a temporary directory), so
/// its peak memory is its own; killed when dropped.
struct ChildBucket {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl ChildBucket {
    fn start(env: &[(&str, &str)]) -> ChildBucket {
        let dir = tempfile::tempdir().unwrap();
        let mut child = bucket_command()
            .env("BUCKET_LISTEN", "127.0.0.1:0")
            .env("BUCKET_LOG_JSON", "true")
            .env(
                "DATABASE_URL",
                format!("sqlite://{}/bucket.db", dir.path().display()),
            )
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let mut lines = stderr.lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("the bucket logs that it listens")
                .unwrap();
            let Ok(log) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if let Some(addr) = log["fields"]["addr"].as_str() {
                break addr.parse().unwrap();
            }
        };
        // Keep draining its log so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        ChildBucket {
            child,
            addr,
            _dir: dir,
        }
    }

    /// The peak resident size so far (VmHWM), in KiB.
    fn peak_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/PID/status")
    }
}

impl Drop for ChildBucket {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends a message's bytes as they are, and reads none back: probes
/// that no generated client would build (nor should the test build
/// millions of items to send them).
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = ();
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = ();
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<()>, tonic::Status> {
        use bytes::Buf;
        src.advance(src.remaining());
        Ok(Some(()))
    }
}

/// A unary call of `method` with `message` as its request's bytes.
async fn raw_call(
    channel: tonic::transport::Channel,
    method: &str,
    message: Vec<u8>,
) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel)
        .max_encoding_message_size(usize::MAX)
        .max_decoding_message_size(usize::MAX);
    grpc.ready().await.unwrap();
    let path = format!("/bucket.v1.BucketService/{method}")
        .parse()
        .unwrap();
    grpc.unary(tonic::Request::new(message), path, RawCodec)
        .await
        .map(|_| ())
}

/// The issue's probe: lists of millions of empty items in a 4 MB message,
/// four at once, on every door that takes a list. Each is refused, and
/// the node's peak memory stays within a few MiB of idle (it was 2.5 GB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn millions_of_empty_items_are_refused_before_they_are_built() {
    let bucket = ChildBucket::start(&[]);
    let base = format!("http://{}", bucket.addr);
    let http = reqwest::Client::new();
    // Warm up: the first calls allocate what every call shares.
    let warm = http
        .post(format!("{base}/api/v1/bucket/prana/ingest"))
        .json(&serde_json::json!([]))
        .send()
        .await
        .unwrap();
    assert_eq!(warm.status().as_u16(), 200);
    let idle = bucket.peak_kib();

    let empties = [0x0a, 0x00].repeat(2_000_000);
    let statuses = [0x08, 0x04].repeat(2_000_000);
    let channel = tonic::transport::Channel::from_shared(base.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let probes = [
        ("IngestBatch", empties.clone()),
        ("MarkProcessedBatch", empties.clone()),
        ("ExtendLease", empties),
        ("Redrive", statuses),
    ];
    let calls = probes.into_iter().map(|(method, message)| {
        let channel = channel.clone();
        async move { (method, raw_call(channel, method, message).await) }
    });
    for (method, answer) in futures::future::join_all(calls).await {
        let status = answer.expect_err(method);
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{method}: {status:?}"
        );
    }

    // The JSON doors: an array of half a million small objects, and a
    // Redrive filter list of a million statuses.
    let objects = format!("[{}{{\"a\":0}}]", "{\"a\":0},".repeat(500_000));
    let statuses = format!(
        "{{\"statuses\":[{}\"failed\"]}}",
        "\"failed\",".repeat(400_000)
    );
    let rest = [
        ("ingest", objects.clone()),
        ("packets/mark-processed", objects),
        ("packets/redrive", statuses),
    ];
    let calls = rest.iter().map(|(path, body)| {
        let request = http
            .post(format!("{base}/api/v1/bucket/prana/{path}"))
            .header("content-type", "application/json")
            .body(body.clone());
        async move { (path, request.send().await.unwrap().status().as_u16()) }
    });
    for (path, status) in futures::future::join_all(calls).await {
        assert_eq!(status, 422, "{path}");
    }

    let peak = bucket.peak_kib();
    eprintln!("VmHWM idle {idle} KiB, after the probes {peak} KiB");
    // Each request's own bytes (4 MB) may be buffered; its items may not.
    assert!(
        peak.saturating_sub(idle) < 64 * 1024,
        "peak memory grew from {idle} KiB to {peak} KiB"
    );
}

/// Ingest calls to the REST door, each with its `authorization` value (or
/// none); their HTTP statuses.
async fn rest_ingests(app: &TestApp, authorizations: &[Option<&str>]) -> Vec<u16> {
    let url = format!("{}/api/v1/bucket/prana/ingest", app.url());
    let packet = serde_json::json!({
        "user_id": "r", "timestamp": "2024-01-20T10:30:00Z", "cognitive_state": "ON_TASK",
        "active_seconds": 5.0, "idle_seconds": 0.0, "away_seconds": 0.0, "raw_signals": {}
    });
    let http = reqwest::Client::new();
    let mut codes = Vec::new();
    for authorization in authorizations {
        let mut request = http.post(&url).json(&packet);
        if let Some(value) = authorization {
            request = request.header("authorization", *value);
        }
        codes.push(request.send().await.unwrap().status().as_u16());
    }
    codes
}

/// The issue's probe: made-up `authorization` values got a fresh allowance
/// each; spellings of one token counted as different clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ingest_rate_counts_what_a_caller_cannot_vary() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut config = test_config(&db);
    config.limits.ingest_rate = 1;
    config.limits.ingest_burst = 2;
    let open = TestApp::spawn_with(db, config.clone()).await;
    // Role open: every call from this address is one client, whatever it sends.
    let codes = rest_ingests(
        &open,
        &[
            None,
            None,
            Some("Bearer a"),
            Some("Bearer b"),
            Some("x"),
            Some("Bearer c"),
        ],
    )
    .await;
    assert_eq!(codes, [200, 200, 429, 429, 429, 429]);

    let db = TestDb::new(Backend::Sqlite).await;
    config.database_url = db.url.clone();
    config.auth.ingest_tokens = vec!["tok".into()];
    let guarded = TestApp::spawn_with(db, config).await;
    let codes = rest_ingests(
        &guarded,
        &[Some("Bearer tok"), Some("bearer tok"), Some("Bearer  tok")],
    )
    .await;
    assert_eq!(codes, [200, 200, 429], "one token, three spellings");
}

/// A node whose connection limits are `set` by the test.
async fn with_connection_limits(set: impl FnOnce(&mut bucket::config::LimitsConfig)) -> TestApp {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut config = test_config(&db);
    set(&mut config.limits);
    TestApp::spawn_with(db, config).await
}

fn secs(n: u64) -> bucket::config::Period {
    bucket::config::Period(Some(Duration::from_secs(n)))
}

const OFF: bucket::config::Period = bucket::config::Period(None);

/// Reads until the server closes the connection; fails the test if it is
/// still open after 20 s (a guard against hanging, not a measure).
async fn closed_by_server<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the connection is still open");
}

/// One HTTP/1.1 request on a kept-alive connection, its answer read.
async fn healthz(stream: &mut tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: bucket\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&answer).contains("\r\n\r\n") {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before answering");
        answer.extend_from_slice(&buf[..n]);
    }
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}

/// The issue's probe: sockets that send nothing, or stop inside the
/// HTTP/2 preface, were all still open after 75 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_send_no_request_are_closed() {
    use tokio::io::AsyncWriteExt;
    let app = with_connection_limits(|l| l.preface_timeout = secs(1)).await;
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(tokio::net::TcpStream::connect(app.addr).await.unwrap());
    }
    let mut halfway = Vec::new();
    for _ in 0..5 {
        let mut s = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        s.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        halfway.push(s);
    }
    for stream in silent.iter_mut().chain(halfway.iter_mut()) {
        closed_by_server(stream).await;
    }
    // A client that asks at once is served.
    let mut prompt = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    healthz(&mut prompt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_connection_that_sends_no_request_after_its_handshake_is_closed() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    let db = TestDb::new(Backend::Sqlite).await;
    let mut config = test_config(&db);
    config.tls.tls_cert = Some(cert_path);
    config.tls.tls_key = Some(key_path);
    config.limits.preface_timeout = secs(1);
    let app = TestApp::spawn_with(db, config).await;

    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client));
    let tcp = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.expect("handshake");
    closed_by_server(&mut tls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_idle_between_requests_is_closed() {
    let app = with_connection_limits(|l| l.idle_timeout = secs(1)).await;
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    healthz(&mut stream).await;
    healthz(&mut stream).await;
    closed_by_server(&mut stream).await;
}

/// A stream with nothing to deliver is a request under way: never idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_stream_is_not_idle() {
    let app = with_connection_limits(|l| {
        l.idle_timeout = secs(1);
        l.preface_timeout = secs(1);
    })
    .await;
    let mut client = app.client().await;
    let mut stream = crate::helpers::subscribe(&mut client, "patient", 1, 0).await;
    // Three idle timeouts pass with the stream quiet...
    crate::helpers::assert_quiet(&mut stream, 3_000).await;
    // ...and it still delivers.
    crate::helpers::ingest(&mut client, crate::helpers::seed_packet()).await;
    crate::helpers::next(&mut stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_are_closed_at_accept() {
    let app = with_connection_limits(|l| {
        l.max_connections = 2;
        l.preface_timeout = OFF;
        l.idle_timeout = OFF;
    })
    .await;
    let mut first = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let mut second = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    healthz(&mut first).await;
    healthz(&mut second).await;
    let mut third = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    closed_by_server(&mut third).await;
    // The two held are served still; once one goes, a new one is taken.
    healthz(&mut first).await;
    drop(second);
    let taken = async {
        loop {
            let mut next = tokio::net::TcpStream::connect(app.addr).await.unwrap();
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            next.write_all(b"GET /healthz HTTP/1.1\r\nhost: bucket\r\n\r\n")
                .await
                .unwrap();
            let mut buf = [0u8; 64];
            if matches!(next.read(&mut buf).await, Ok(n) if n > 0) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), taken)
        .await
        .expect("a place freed by a closed connection is taken again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_past_its_age_is_closed_after_its_calls() {
    let app = with_connection_limits(|l| {
        l.max_connection_age = secs(1);
        l.max_connection_age_grace = secs(1);
        l.idle_timeout = OFF;
        l.preface_timeout = OFF;
    })
    .await;
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    healthz(&mut stream).await;
    closed_by_server(&mut stream).await;
}

/// A consumer name is logged: one holding a newline would forge log lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_name_with_control_characters_is_refused() {
    use tonic_types::StatusExt;
    let app = TestApp::spawn(Backend::Sqlite).await;
    let mut client = app.client().await;
    let refused = client
        .stream_pending(bucket::proto::bucket::v1::StreamPendingRequest {
            consumer: "karma\n2026-12-03T00:00:00Z INFO admin logged in".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    let violations = refused.get_details_bad_request().unwrap().field_violations;
    assert_eq!(violations[0].field, "consumer");
}

/// A REST poller with hour-long leases holds at most BUCKET_MAX_POLL_LEASES
/// packets; a mark makes room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polls_hold_at_most_the_poll_lease_cap() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut config = test_config(&db);
    config.delivery.max_poll_leases = 3;
    let app = TestApp::spawn_with(db, config).await;
    let mut client = app.client().await;
    for i in 0..10 {
        crate::helpers::ingest(&mut client, crate::helpers::packet_for(&format!("u{i}"))).await;
    }
    let poll = || async {
        let page: serde_json::Value = reqwest::get(format!(
            "{}/api/v1/bucket/prana/packets/pending?limit=100&lease_seconds=3600",
            app.url()
        ))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
        page["packets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["packet_id"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    let held = poll().await;
    assert_eq!(held.len(), 3);
    assert_eq!(poll().await.len(), 0, "at the cap");
    crate::helpers::mark(&mut client, &held[0]).await;
    assert_eq!(poll().await.len(), 1, "a mark makes room for one");
}
