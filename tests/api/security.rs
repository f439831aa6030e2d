//! Only the right callers: bearer tokens by role on every door, TLS, and
//! the limits that hold under abuse.
use std::time::Duration;

use bucket::proto::bucket::v1 as pb;
use bucket::proto::bucket::v1::bucket_service_client::BucketServiceClient;
use serde_json::{Value, json};
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic_types::StatusExt;

use crate::helpers::{Backend, TestApp, TestDb, packet_for, test_config};

type Client = BucketServiceClient<InterceptedService<Channel, AddToken>>;

/// Sends `authorization: Bearer <token>` with every call (or nothing).
#[derive(Clone)]
struct AddToken(Option<String>);

impl tonic::service::Interceptor for AddToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.0 {
            let value: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

async fn client(app: &TestApp, token: Option<&str>) -> Client {
    let channel = Channel::from_shared(app.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    BucketServiceClient::with_interceptor(channel, AddToken(token.map(str::to_owned)))
}

async fn secured() -> TestApp {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut config = test_config(&db);
    config.auth.ingest_tokens = vec!["browser-token".into()];
    config.auth.consumer_tokens = vec!["karma-token".into()];
    config.auth.admin_tokens = vec!["root-token".into()];
    TestApp::spawn_with(db, config).await
}

async fn ingest(client: &mut Client) -> Result<String, tonic::Status> {
    client
        .ingest(pb::IngestRequest {
            packet: Some(packet_for("secure")),
        })
        .await
        .map(|r| r.into_inner().packet_id)
}

async fn subscribe(client: &mut Client) -> Result<(), tonic::Status> {
    client
        .stream_pending(pb::StreamPendingRequest {
            consumer: "karma".into(),
            ..Default::default()
        })
        .await
        .map(drop)
}

async fn user_packets(client: &mut Client) -> Result<(), tonic::Status> {
    client
        .user_packets(pb::UserPacketsRequest {
            user_id: "secure".into(),
            ..Default::default()
        })
        .await
        .map(drop)
}

fn code<T>(result: Result<T, tonic::Status>) -> Code {
    match result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_need_a_token_of_their_role() {
    let app = secured().await;
    let mut anonymous = client(&app, None).await;
    let mut unknown = client(&app, Some("guess")).await;
    let mut browser = client(&app, Some("browser-token")).await;
    let mut karma = client(&app, Some("karma-token")).await;
    let mut root = client(&app, Some("root-token")).await;

    assert_eq!(code(ingest(&mut anonymous).await), Code::Unauthenticated);
    assert_eq!(code(ingest(&mut unknown).await), Code::Unauthenticated);
    assert_eq!(code(ingest(&mut karma).await), Code::PermissionDenied);
    assert_eq!(code(ingest(&mut browser).await), Code::Ok);
    assert_eq!(code(ingest(&mut root).await), Code::Ok);

    assert_eq!(code(subscribe(&mut anonymous).await), Code::Unauthenticated);
    assert_eq!(code(subscribe(&mut browser).await), Code::PermissionDenied);
    assert_eq!(code(subscribe(&mut karma).await), Code::Ok);
    let mark = |id: &str| pb::MarkProcessedRequest {
        packet_id: id.into(),
        success: true,
        ..Default::default()
    };
    let id = ingest(&mut browser).await.unwrap();
    assert_eq!(
        code(browser.mark_processed(mark(&id)).await),
        Code::PermissionDenied
    );
    assert_eq!(code(karma.mark_processed(mark(&id)).await), Code::Ok);
    let batch = pb::MarkProcessedBatchRequest {
        marks: vec![mark(&id)],
    };
    assert_eq!(
        code(anonymous.mark_processed_batch(batch.clone()).await),
        Code::Unauthenticated
    );
    assert_eq!(code(karma.mark_processed_batch(batch).await), Code::Ok);

    assert_eq!(code(user_packets(&mut karma).await), Code::PermissionDenied);
    assert_eq!(code(user_packets(&mut root).await), Code::Ok);

    // Status stays open, but the consumer list is the admin's.
    let _stream = karma
        .stream_pending(pb::StreamPendingRequest::default())
        .await
        .unwrap();
    let open = anonymous
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(open.consumers.is_empty(), "consumers hidden: {open:?}");
    assert!(open.total_packets >= 3);
    let full = root
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!full.consumers.is_empty());

    // Health and reflection need nothing.
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        Channel::from_shared(app.url())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
}

async fn rest(
    method: reqwest::Method,
    url: String,
    token: Option<&str>,
    body: Option<Value>,
) -> reqwest::Response {
    let mut request = reqwest::Client::new().request(method, url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    request.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_paths_need_a_token_of_their_role() {
    let app = secured().await;
    let api = |path: &str| format!("{}/api/v1/bucket/prana{path}", app.url());
    let packet = json!({
        "user_id": "secure", "timestamp": "2024-01-20T10:30:00Z", "cognitive_state": "ON_TASK",
        "active_seconds": 5.0, "idle_seconds": 0.0, "away_seconds": 0.0, "raw_signals": {}
    });
    let post = reqwest::Method::POST;
    let get = reqwest::Method::GET;

    let refused = rest(post.clone(), api("/ingest"), None, Some(packet.clone())).await;
    assert_eq!(refused.status(), 401);
    assert_eq!(refused.headers()["www-authenticate"], "Bearer");
    let detail: Value = refused.json().await.unwrap();
    assert!(detail["detail"].as_str().unwrap().contains("bearer token"));
    let wrong_role = rest(
        post.clone(),
        api("/ingest"),
        Some("karma-token"),
        Some(packet.clone()),
    )
    .await;
    assert_eq!(wrong_role.status(), 403);
    let ok = rest(
        post.clone(),
        api("/ingest"),
        Some("browser-token"),
        Some(packet.clone()),
    )
    .await;
    assert_eq!(ok.status(), 200);

    for (path, who, expected) in [
        ("/packets/pending", None, 401),
        ("/packets/pending", Some("browser-token"), 403),
        ("/packets/pending", Some("karma-token"), 200),
        ("/packets/user/secure", Some("karma-token"), 403),
        ("/packets/user/secure", Some("root-token"), 200),
        ("/status", None, 200),
    ] {
        let response = rest(get.clone(), api(path), who, None).await;
        assert_eq!(response.status(), expected, "{path} as {who:?}");
    }
    for path in ["/healthz", "/readyz", "/metrics"] {
        let response = rest(get.clone(), format!("{}{path}", app.url()), None, None).await;
        assert_eq!(response.status(), 200, "{path} stays open");
    }
    // A consumer connects: only an admin sees it in Status.
    let mut karma = client(&app, Some("karma-token")).await;
    let _stream = karma
        .stream_pending(pb::StreamPendingRequest::default())
        .await
        .unwrap();
    let status: Value = rest(get.clone(), api("/status"), None, None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(status["consumers"], json!([]), "consumers hidden");
    let status: Value = rest(get.clone(), api("/status"), Some("root-token"), None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(status["consumers"].as_array().unwrap().len(), 1);
}

/// A browser sends its token over gRPC-web after a CORS preflight that
/// asks for `authorization`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_and_cors_carry_the_token() {
    let app = secured().await;
    let url = format!("{}/bucket.v1.BucketService/Ingest", app.url());
    let preflight = reqwest::Client::new()
        .request(reqwest::Method::OPTIONS, &url)
        .header("origin", "https://prana.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type,x-grpc-web",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), 200);
    let allowed = preflight.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(allowed.contains("authorization"), "{allowed}");

    let message = prost::Message::encode_to_vec(&pb::IngestRequest {
        packet: Some(packet_for("web")),
    });
    let mut frame = vec![0u8];
    frame.extend((message.len() as u32).to_be_bytes());
    frame.extend(message);
    let send = |token: Option<&str>| {
        let mut request = reqwest::Client::new()
            .post(&url)
            .header("content-type", "application/grpc-web+proto")
            .header("x-grpc-web", "1")
            .header("origin", "https://prana.example")
            .body(frame.clone());
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    let refused = send(None).await.unwrap();
    assert_eq!(refused.headers()["grpc-status"], "16");
    assert!(
        refused
            .headers()
            .contains_key("access-control-allow-origin")
    );
    let ok = send(Some("browser-token")).await.unwrap();
    assert_eq!(ok.status(), 200);
    let body = ok.bytes().await.unwrap();
    // A data frame, then the trailer frame with grpc-status:0.
    assert_eq!(body[0], 0);
    assert!(String::from_utf8_lossy(&body).contains("grpc-status:0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_read_from_files() {
    let db = TestDb::new(Backend::Sqlite).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ingest-tokens");
    std::fs::write(&file, "first\nsecond\n").unwrap();
    let mut config = test_config(&db);
    config.auth.ingest_tokens_file = Some(file);
    let app = TestApp::spawn_with(db, config).await;
    assert_eq!(
        code(ingest(&mut client(&app, Some("second")).await).await),
        Code::Ok
    );
    assert_eq!(
        code(ingest(&mut client(&app, Some("third")).await).await),
        Code::Unauthenticated
    );
}

/// A certificate for localhost made by the test, and a client that
/// verifies it: gRPC and the JSON gateway (HTTP/2 and HTTP/1.1) over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_every_door_on_one_port() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    let db = TestDb::new(Backend::Sqlite).await;
    let mut config = test_config(&db);
    config.tls.tls_cert = Some(cert_path);
    config.tls.tls_key = Some(key_path);
    let app = TestApp::spawn_with(db, config).await;
    let https = format!("https://localhost:{}", app.addr.port());

    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(cert.cert.pem()))
        .domain_name("localhost");
    let channel = Channel::from_shared(https.clone())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = BucketServiceClient::new(channel);
    grpc.ingest(pb::IngestRequest {
        packet: Some(packet_for("tls")),
    })
    .await
    .unwrap();

    let root = reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).unwrap();
    for http1_only in [false, true] {
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .add_root_certificate(root.clone());
        if http1_only {
            builder = builder.http1_only();
        }
        let response = builder
            .build()
            .unwrap()
            .get(format!("{https}/api/v1/bucket/prana/status"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "http1_only: {http1_only}");
        let status: Value = response.json().await.unwrap();
        assert_eq!(status["total_packets"], 1);
    }
    // A client that does not know the certificate is refused.
    let unverified = reqwest::Client::builder()
        .use_rustls_tls()
        .build()
        .unwrap()
        .get(format!("{https}/healthz"))
        .send()
        .await;
    assert!(unverified.is_err());
    // Plaintext on the TLS port gets nothing.
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/healthz", app.addr.port()))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_are_resource_exhausted() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut config = test_config(&db);
    config.max_body_bytes = 2048;
    let app = TestApp::spawn_with(db, config).await;
    let mut client = app.client().await;
    let big = "x".repeat(4096);
    let packet = pb::PacketInput {
        session_id: big,
        ..packet_for("big")
    };
    let status = client
        .ingest(pb::IngestRequest {
            packet: Some(packet),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    // The server is fine and a small one goes through.
    client
        .ingest(pb::IngestRequest {
            packet: Some(packet_for("small")),
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_per_node_are_capped() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut config = test_config(&db);
    config.limits.max_subscribers = 2;
    let app = TestApp::spawn_with(db, config).await;
    let mut client = app.client().await;
    let first = crate::helpers::subscribe(&mut client, "a", 0, 0).await;
    let _second = crate::helpers::subscribe(&mut client, "b", 0, 0).await;
    let third = client
        .stream_pending(pb::StreamPendingRequest::default())
        .await
        .unwrap_err();
    assert_eq!(third.code(), Code::ResourceExhausted);
    // A slot frees when a subscriber leaves.
    drop(first);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match client
            .stream_pending(pb::StreamPendingRequest::default())
            .await
        {
            Ok(_) => break,
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted);
                assert!(std::time::Instant::now() < deadline, "slot never freed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_rate_is_limited_per_client() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut config = test_config(&db);
    config.limits.ingest_rate = 1;
    config.limits.ingest_burst = 2;
    // Clients are told apart by tokens the server knows (else by address:
    // hardening::the_ingest_rate_counts_what_a_caller_cannot_vary).
    config.auth.ingest_tokens = vec!["runaway".into(), "calm".into(), "rest".into()];
    let app = TestApp::spawn_with(db, config).await;
    let mut runaway = client(&app, Some("runaway")).await;
    assert_eq!(code(ingest(&mut runaway).await), Code::Ok);
    assert_eq!(code(ingest(&mut runaway).await), Code::Ok);
    let limited = ingest(&mut runaway).await.unwrap_err();
    assert_eq!(limited.code(), Code::ResourceExhausted);
    let retry = limited.get_details_retry_info().expect("RetryInfo");
    assert!(retry.retry_delay.unwrap() <= Duration::from_secs(1));
    // Another client is not held back by the runaway one.
    assert_eq!(
        code(ingest(&mut client(&app, Some("calm")).await).await),
        Code::Ok
    );
    // Nor are consumers: the limit is on ingest only.
    assert_eq!(code(runaway.status(pb::StatusRequest {}).await), Code::Ok);
    // REST: 429 with Retry-After.
    let url = format!("{}/api/v1/bucket/prana/ingest", app.url());
    let packet = json!({
        "user_id": "r", "timestamp": "2024-01-20T10:30:00Z", "cognitive_state": "ON_TASK",
        "active_seconds": 5.0, "idle_seconds": 0.0, "away_seconds": 0.0, "raw_signals": {}
    });
    let mut codes = Vec::new();
    for _ in 0..3 {
        let response = rest(
            reqwest::Method::POST,
            url.clone(),
            Some("rest"),
            Some(packet.clone()),
        )
        .await;
        if response.status() == 429 {
            assert_eq!(response.headers()["retry-after"], "1");
        }
        codes.push(response.status().as_u16());
    }
    assert_eq!(codes, [200, 200, 429]);
}

/// A client that sends half an HTTP/1.1 request head and stops is cut off
/// (hyper's header-read timeout, 30 s, enforced by tonic).
#[tokio::test(flavor = "current_thread")]
async fn slow_http1_headers_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::spawn(Backend::Sqlite).await;
    let mut slow = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    slow.write_all(b"POST /api/v1/bucket/prana/ingest HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Jump past the timeout rather than wait for it.
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(31)).await;
    tokio::time::resume();
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buf))
        .await
        .expect("the connection was closed");
    assert!(matches!(read, Ok(0) | Err(_)) || buf.starts_with(b"HTTP/1.1 408"));
}
