//! gRPC-web, CORS, reflection, health, metrics, and the example consumer.
use std::time::{Duration, Instant};

use bucket::proto::bucket::v1 as pb;
use prost::Message;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::helpers::{
    Backend, TestApp, TestDb, ingest, packet_for, status, test_config, user_packets,
};

/// One gRPC-web frame: flag, big-endian length, message.
fn frame(message: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8];
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// Splits a gRPC-web response body into its data message and trailer text.
fn unframe(mut body: &[u8]) -> (Option<Vec<u8>>, String) {
    let (mut data, mut trailers) = (None, String::new());
    while body.len() >= 5 {
        let len = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
        let payload = body[5..5 + len].to_vec();
        if body[0] & 0x80 != 0 {
            trailers = String::from_utf8(payload).unwrap();
        } else {
            data = Some(payload);
        }
        body = &body[5 + len..];
    }
    (data, trailers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_binary_and_text_over_http1() {
    use base64::Engine;
    let app = TestApp::spawn(Backend::Sqlite).await;
    let http = reqwest::Client::new();
    let url = format!("{}/bucket.v1.BucketService/Ingest", app.url());
    let request = pb::IngestRequest {
        packet: Some(packet_for("web")),
    }
    .encode_to_vec();

    let response = http
        .post(&url)
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .header("origin", "http://prana.example")
        .body(frame(&request))
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_11);
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.headers()["access-control-allow-origin"], "*");
    let (data, trailers) = unframe(&response.bytes().await.unwrap());
    assert!(trailers.contains("grpc-status:0"), "{trailers}");
    let receipt = pb::IngestResponse::decode(data.unwrap().as_slice()).unwrap();
    assert_eq!(receipt.status, "ingested");

    // grpc-web-text: the same frames, base64.
    let b64 = base64::engine::general_purpose::STANDARD;
    let response = http
        .post(&url)
        .header("content-type", "application/grpc-web-text")
        .header("accept", "application/grpc-web-text")
        .body(
            b64.encode(frame(
                &pb::IngestRequest {
                    packet: Some(packet_for("web")),
                }
                .encode_to_vec(),
            )),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let text = response.text().await.unwrap();
    // A response may be several base64 chunks, each padded on its own:
    // decode quantum by quantum.
    let mut bytes = Vec::new();
    for quantum in text.trim().as_bytes().chunks(4) {
        bytes.extend(b64.decode(quantum).unwrap());
    }
    let (data, trailers) = unframe(&bytes);
    assert!(trailers.contains("grpc-status:0"), "{trailers}");
    assert!(pb::IngestResponse::decode(data.unwrap().as_slice()).is_ok());

    // An error reaches a browser as a grpc-status it can read.
    let response = http
        .post(&url)
        .header("content-type", "application/grpc-web+proto")
        .body(frame(&pb::IngestRequest { packet: None }.encode_to_vec()))
        .send()
        .await
        .unwrap();
    let header_status = response
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_owned());
    let (_, trailers) = unframe(&response.bytes().await.unwrap());
    assert!(header_status.as_deref() == Some("3") || trailers.contains("grpc-status:3"));

    let mut client = app.client().await;
    assert_eq!(status(&mut client).await.total_packets, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_for_open_and_listed_origins() {
    let preflight = |app: &TestApp, origin: &'static str| {
        reqwest::Client::new()
            .request(
                reqwest::Method::OPTIONS,
                format!("{}/bucket.v1.BucketService/Ingest", app.url()),
            )
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "content-type,x-grpc-web,x-user-agent",
            )
            .send()
    };
    let open = TestApp::spawn(Backend::Sqlite).await;
    let response = preflight(&open, "http://anywhere.example").await.unwrap();
    assert!(response.status().is_success());
    let h = response.headers();
    assert_eq!(h["access-control-allow-origin"], "*");
    assert!(
        h["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .contains("POST")
    );
    assert!(h.contains_key("access-control-allow-headers"));

    let db = TestDb::new(Backend::Sqlite).await;
    let mut config = test_config(&db);
    config.cors_origins = vec![
        "http://prana.example".into(),
        "http://localhost:5173".into(),
    ];
    let listed = TestApp::spawn_with(db, config).await;
    let ok = preflight(&listed, "http://prana.example").await.unwrap();
    assert_eq!(
        ok.headers()["access-control-allow-origin"],
        "http://prana.example"
    );
    let refused = preflight(&listed, "http://evil.example").await.unwrap();
    assert!(
        !refused
            .headers()
            .contains_key("access-control-allow-origin")
    );

    // The grpc-status headers are readable by the page.
    let response = reqwest::Client::new()
        .post(format!("{}/bucket.v1.BucketService/Status", listed.url()))
        .header("origin", "http://prana.example")
        .header("content-type", "application/grpc-web+proto")
        .body(frame(&[]))
        .send()
        .await
        .unwrap();
    let exposed = response.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_owned();
    for h in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
        assert!(exposed.contains(h), "{h} not exposed: {exposed}");
    }

    // A native gRPC caller names no origin: CORS has nothing to add, while
    // the same call with an origin still gets its headers.
    let mut client = listed.client().await;
    let answer = client.status(pb::StatusRequest {}).await.unwrap();
    for h in ["vary", "access-control-expose-headers"] {
        assert!(answer.metadata().get(h).is_none(), "{h} on a native call");
    }
    let mut named = tonic::Request::new(pb::StatusRequest {});
    named
        .metadata_mut()
        .insert("origin", "http://prana.example".parse().unwrap());
    let answer = client.status(named).await.unwrap();
    assert_eq!(
        answer
            .metadata()
            .get("access-control-allow-origin")
            .unwrap(),
        "http://prana.example"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_service_v1_and_v1alpha() {
    use futures::StreamExt;
    let app = TestApp::spawn(Backend::Sqlite).await;

    use tonic_reflection::pb::v1 as r1;
    let mut client = r1::server_reflection_client::ServerReflectionClient::new(channel(&app).await);
    let request = r1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(r1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut responses = client
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(r1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        responses.next().await.unwrap().unwrap().message_response
    else {
        panic!("no service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"bucket.v1.BucketService".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_owned()),
        "{names:?}"
    );

    use tonic_reflection::pb::v1alpha as ra;
    let mut client = ra::server_reflection_client::ServerReflectionClient::new(channel(&app).await);
    let request = ra::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            ra::server_reflection_request::MessageRequest::FileContainingSymbol(
                "bucket.v1.BucketService".into(),
            ),
        ),
    };
    let mut responses = client
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    assert!(matches!(
        response.message_response,
        Some(ra::server_reflection_response::MessageResponse::FileDescriptorResponse(_))
    ));
    // The error details a refusal carries, and what they import, asked for
    // as grpcurl and buf curl do, so they can decode them.
    let mut client = r1::server_reflection_client::ServerReflectionClient::new(channel(&app).await);
    let ask = |request| r1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    use r1::server_reflection_request::MessageRequest;
    use r1::server_reflection_response::MessageResponse;
    let mut responses = client
        .server_reflection_info(futures::stream::iter([
            ask(MessageRequest::FileContainingSymbol(
                "google.rpc.BadRequest".into(),
            )),
            ask(MessageRequest::FileContainingSymbol(
                "google.rpc.RetryInfo".into(),
            )),
        ]))
        .await
        .unwrap()
        .into_inner();
    let mut imports = Vec::new();
    for _ in 0..2 {
        let Some(MessageResponse::FileDescriptorResponse(files)) =
            responses.next().await.unwrap().unwrap().message_response
        else {
            panic!("error details not served");
        };
        let file = <prost_types::FileDescriptorProto as prost::Message>::decode(
            files.file_descriptor_proto[0].as_slice(),
        )
        .unwrap();
        assert_eq!(file.package(), "google.rpc");
        imports.extend(file.dependency);
    }
    assert!(!imports.is_empty());
    let mut responses = client
        .server_reflection_info(futures::stream::iter(
            imports
                .iter()
                .map(|name| ask(MessageRequest::FileByFilename(name.clone())))
                .collect::<Vec<_>>(),
        ))
        .await
        .unwrap()
        .into_inner();
    for name in &imports {
        let answer = responses.next().await.unwrap().unwrap().message_response;
        assert!(
            matches!(answer, Some(MessageResponse::FileDescriptorResponse(_))),
            "{name}: {answer:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_database() {
    let db = TestDb::new(Backend::Postgres).await;
    let app = TestApp::spawn_with(db.clone(), test_config(&db)).await;
    let health = HealthClient::new(channel(&app).await);
    let check = |service: &'static str| HealthCheckRequest {
        service: service.into(),
    };
    let wait_for = |want: ServingStatus| {
        let mut health = health.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                // Before the first report the service is unknown (NOT_FOUND).
                let got = health.check(check("bucket.v1.BucketService")).await;
                if got.is_ok_and(|r| r.into_inner().status == want as i32) {
                    return;
                }
                assert!(Instant::now() < deadline, "health never became {want:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    wait_for(ServingStatus::Serving).await;
    let whole = health
        .clone()
        .check(check(""))
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(whole, ServingStatus::Serving as i32);
    db.break_storage().await;
    wait_for(ServingStatus::NotServing).await;
    db.mend_storage().await;
    wait_for(ServingStatus::Serving).await;
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let scrape = || async {
        reqwest::get(format!("{}/metrics", app.url()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let before = scrape().await;
    let mut client = app.client().await;
    ingest(&mut client, packet_for("m")).await;
    let _ = client
        .ingest(pb::IngestRequest {
            packet: Some(pb::PacketInput {
                focus_score: Some(500.0),
                ..packet_for("m")
            }),
        })
        .await;
    let mut stream = crate::helpers::subscribe(&mut client, "metrics", 0, 0).await;
    crate::helpers::next(&mut stream).await;
    let after = scrape().await;
    assert!(
        metric(&after, "bucket_packets_ingested_total")
            >= metric(&before, "bucket_packets_ingested_total") + 1.0
    );
    assert!(
        after.contains("bucket_packets_rejected_total{field=\"focus_score\"}"),
        "{after}"
    );
    assert!(metric(&after, "bucket_ingest_seconds_count") >= 1.0);
    assert!(metric(&after, "bucket_deliveries_total") >= 1.0);
    assert!(metric(&after, "bucket_consumers_connected") >= 1.0);
    for name in [
        "bucket_queue_depth",
        "bucket_packets_leased",
        "bucket_redeliveries_total",
    ] {
        assert!(after.contains(name), "{name} missing");
    }
    // Per method and outcome, gRPC and REST alike.
    for series in [
        "bucket_requests_total{method=\"Ingest\",code=\"Ok\"}",
        "bucket_requests_total{method=\"Ingest\",code=\"InvalidArgument\"}",
        "bucket_requests_total{method=\"metrics\",code=\"200\"}",
        "bucket_request_seconds_count{method=\"Ingest\"}",
    ] {
        assert!(after.contains(series), "{series} missing:\n{after}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_has_an_id_echoed_back() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let http = reqwest::Client::new();
    let url = format!("{}/api/v1/bucket/prana/status", app.url());
    let given = http
        .get(&url)
        .header("x-request-id", "trace-abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(given.headers()["x-request-id"], "trace-abc-123");
    let made = http.get(&url).send().await.unwrap();
    let id = made.headers()["x-request-id"].to_str().unwrap();
    assert!(uuid::Uuid::try_parse(id).is_ok(), "{id}");
    // One that cannot be echoed safely is replaced.
    let odd = http
        .get(&url)
        .header("x-request-id", "a b")
        .send()
        .await
        .unwrap();
    assert_ne!(odd.headers()["x-request-id"], "a b");

    // gRPC: in the response metadata, refusals included.
    let mut client = app.client().await;
    let mut request = tonic::Request::new(pb::StatusRequest {});
    request
        .metadata_mut()
        .insert("x-request-id", "grpc-trace-7".parse().unwrap());
    let response = client.status(request).await.unwrap();
    assert_eq!(
        response.metadata().get("x-request-id").unwrap(),
        "grpc-trace-7"
    );
    let mut bad = tonic::Request::new(pb::IngestRequest { packet: None });
    bad.metadata_mut()
        .insert("x-request-id", "grpc-trace-8".parse().unwrap());
    let refused = client.ingest(bad).await.unwrap_err();
    assert_eq!(
        refused.metadata().get("x-request-id").unwrap(),
        "grpc-trace-8"
    );
}

/// Runs examples/karma_consumer (built by `cargo build --examples`, which
/// tests/run.sh does) against a bucket that restarts under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn karma_consumer_example_processes_and_survives_a_restart() {
    let exe = std::env::current_exe().unwrap();
    let consumer = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join("karma_consumer");
    assert!(
        consumer.exists(),
        "{} missing: `cargo build --examples` first (tests/run.sh does)",
        consumer.display()
    );

    let app = TestApp::spawn(Backend::Sqlite).await;
    let mut child = std::process::Command::new(&consumer)
        .arg(app.url())
        .arg("karma-e2e")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _kill = KillOnDrop(&mut child);
    let mut client = app.client().await;
    let focused = ingest(
        &mut client,
        pb::PacketInput {
            cognitive_state: "DEEP_FOCUS".into(),
            ..packet_for("k")
        },
    )
    .await;
    let distracted = ingest(
        &mut client,
        pb::PacketInput {
            cognitive_state: "DISTRACTED".into(),
            ..packet_for("k")
        },
    )
    .await;
    wait_processed(&mut client, 2).await;
    let packets = user_packets(&mut client, "k").await;
    let by_id = |id: &str| packets.iter().find(|p| p.packet_id == id).unwrap().clone();
    assert_eq!(by_id(&focused).karma_actions.len(), 1, "focus earns karma");
    assert!(
        by_id(&distracted).karma_actions.is_empty(),
        "distraction earns none"
    );

    // Restart on the same port: the consumer reconnects by itself.
    let mut config = app.config.clone();
    config.listen = app.addr;
    let db = app.stop().await;
    let app = TestApp::spawn_with(db, config).await;
    let mut client = app.client().await;
    ingest(
        &mut client,
        pb::PacketInput {
            cognitive_state: "ON_TASK".into(),
            ..packet_for("k")
        },
    )
    .await;
    wait_processed(&mut client, 3).await;
}

struct KillOnDrop<'a>(&'a mut std::process::Child);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn channel(app: &TestApp) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(app.url())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn wait_processed(
    client: &mut pb::bucket_service_client::BucketServiceClient<tonic::transport::Channel>,
    n: u64,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while status(client).await.processed_packets < n {
        assert!(
            Instant::now() < deadline,
            "the consumer did not process {n} packets"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
