//! The OpenAPI description of the JSON gateway (`GET /openapi.json`): it
//! names every path and every answer, and schemathesis finds no answer that
//! breaks it (no 5xx; every status, content type and body as documented).
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use bucket::proto::bucket::v1 as pb;
use bucket::proto::json_to_struct;
use serde_json::{Value, json};

use crate::helpers::{Backend, TestApp, ingest, packet_for, subscribe};

/// The schemathesis executable: `BUCKET_TEST_SCHEMATHESIS` (tests/run.sh
/// installs it and sets this), else `schemathesis` or `st` on the PATH.
const SCHEMATHESIS_ENV: &str = "BUCKET_TEST_SCHEMATHESIS";
/// Test cases per operation and phase: the run takes about 15 s.
const MAX_EXAMPLES: &str = "50";
/// The run fails past this, whatever it found.
const TIME_LIMIT: Duration = Duration::from_secs(90);

async fn document(app: &TestApp) -> Value {
    let response = reqwest::get(format!("{}/openapi.json", app.url()))
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    response.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_names_every_path_and_every_answer() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let doc = document(&app).await;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");

    const P: &str = "/api/v1/bucket/prana";
    let expected: &[(&str, String, &[&str])] = &[
        (
            "post",
            format!("{P}/ingest"),
            &["200", "400", "413", "415", "422", "500", "503"],
        ),
        (
            "get",
            format!("{P}/packets/pending"),
            &["200", "400", "422", "500", "503"],
        ),
        (
            "post",
            format!("{P}/packets/mark-processed"),
            &["200", "400", "404", "413", "415", "422", "500", "503"],
        ),
        (
            "get",
            format!("{P}/packets/user/{{user_id}}"),
            &["200", "400", "422", "500", "503"],
        ),
        ("get", format!("{P}/status"), &["200", "500", "503"]),
        (
            "post",
            format!("{P}/packets/redrive"),
            &["200", "400", "413", "415", "422", "500", "503"],
        ),
        (
            "post",
            format!("{P}/packets/replay"),
            &["200", "400", "413", "415", "422", "500", "503"],
        ),
        ("get", "/healthz".into(), &["200"]),
        ("get", "/readyz".into(), &["200", "503"]),
        ("get", "/metrics".into(), &["200"]),
        ("get", "/openapi.json".into(), &["200"]),
    ];
    let paths = doc["paths"].as_object().unwrap();
    assert_eq!(paths.len(), expected.len(), "{:?}", paths.keys());
    for (method, path, codes) in expected {
        let op = &doc["paths"][path][method];
        let responses = op["responses"]
            .as_object()
            .unwrap_or_else(|| panic!("{method} {path} is not described"));
        let mut got: Vec<&str> = responses.keys().map(String::as_str).collect();
        got.sort();
        assert_eq!(&got, codes, "{method} {path}");
        for (code, response) in responses {
            let content = &response["content"];
            let schema = if *path == "/metrics" {
                &content["text/plain"]["schema"]
            } else {
                &content["application/json"]["schema"]
            };
            assert!(schema.is_object(), "{method} {path} {code}: {response}");
            // Errors in FastAPI's two shapes.
            let reference = schema["$ref"].as_str().unwrap_or_default();
            match code.as_str() {
                "422" => assert!(reference.ends_with("/HTTPValidationError"), "{path} {code}"),
                "400" | "404" | "413" | "415" | "500" => {
                    assert!(reference.ends_with("/ErrorMessage"), "{path} {code}")
                }
                "503" if path.starts_with(P) => {
                    assert!(reference.ends_with("/ErrorMessage"), "{path} {code}")
                }
                _ => {}
            }
        }
    }
    // Parameters with their ranges, as the gateway checks them.
    let params = |path: &str| -> Vec<Value> {
        doc["paths"][path]["get"]["parameters"]
            .as_array()
            .unwrap()
            .clone()
    };
    let range = |params: &[Value], name: &str| {
        let p = params.iter().find(|p| p["name"] == name).unwrap();
        (
            p["schema"]["minimum"].clone(),
            p["schema"]["maximum"].clone(),
        )
    };
    let pending = params(&format!("{P}/packets/pending"));
    assert_eq!(range(&pending, "limit"), (json!(1), json!(100)));
    assert_eq!(range(&pending, "lease_seconds"), (json!(1), json!(3600)));
    let user = params(&format!("{P}/packets/user/{{user_id}}"));
    assert_eq!(range(&user, "limit"), (json!(1), json!(500)));
    assert!(user.iter().any(|p| p["name"] == "processed_only"));
    assert!(
        user.iter()
            .any(|p| p["name"] == "user_id" && p["in"] == "path")
    );
    let schemas = &doc["components"]["schemas"];
    let error = &schemas["ValidationError"]["properties"];
    for key in ["loc", "msg", "type"] {
        assert!(error[key].is_object(), "ValidationError.{key}");
    }
}

/// Where schemathesis is, or a failure saying how to get it.
fn schemathesis() -> PathBuf {
    if let Some(path) = std::env::var_os(SCHEMATHESIS_ENV) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "{SCHEMATHESIS_ENV}={} is not a file",
            path.display()
        );
        return path;
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .flat_map(|dir| [dir.join("schemathesis"), dir.join("st")])
            .find(|p| p.is_file())
    });
    on_path.unwrap_or_else(|| {
        panic!(
            "schemathesis is not installed: run `bash tests/run.sh` (it installs it into \
             target/schemathesis-venv), or `pip install schemathesis` and set \
             {SCHEMATHESIS_ENV} to the path of its `schemathesis` executable"
        )
    })
}

/// Gives every answer something to carry: packets pending, leased, processed
/// and failed for `user_123`, and a connected consumer.
async fn some_of_everything(app: &TestApp) -> tonic::Streaming<pb::StreamPendingResponse> {
    let mut client = app.client().await;
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(ingest(&mut client, packet_for("user_123")).await);
    }
    let action = json_to_struct(
        json!({"action": "completing_lessons", "reward": 5})
            .as_object()
            .unwrap(),
    );
    let marks = vec![
        pb::MarkProcessedRequest {
            packet_id: ids[0].clone(),
            success: true,
            karma_actions: vec![action],
            ..Default::default()
        },
        pb::MarkProcessedRequest {
            packet_id: ids[1].clone(),
            success: false,
            error_message: "karma API down".into(),
            ..Default::default()
        },
    ];
    client
        .mark_processed_batch(pb::MarkProcessedBatchRequest { marks })
        .await
        .unwrap();
    // Holds one leased packet for the whole run.
    let mut stream = subscribe(&mut client, "karma", 1, 3600).await;
    crate::helpers::next(&mut stream).await;
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_answer_outside_the_document() {
    let exe = schemathesis();
    let app = TestApp::spawn(Backend::Sqlite).await;
    let _consumer = some_of_everything(&app).await;
    let workdir = tempfile::tempdir().unwrap();
    let mut command = tokio::process::Command::new(&exe);
    command
        .arg("run")
        .arg(format!("{}/openapi.json", app.url()))
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            "--max-examples",
            MAX_EXAMPLES,
            "--request-timeout",
            "10",
            "--generation-database",
            "none",
            "--no-color",
        ])
        // A seed to reproduce a failure: BUCKET_TEST_SCHEMATHESIS_SEED=….
        .args(
            std::env::var("BUCKET_TEST_SCHEMATHESIS_SEED")
                .map(|seed| vec!["--seed".to_owned(), seed])
                .unwrap_or_default(),
        )
        .current_dir(workdir.path())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let started = Instant::now();
    let output = tokio::time::timeout(TIME_LIMIT, command.output())
        .await
        .unwrap_or_else(|_| panic!("schemathesis ran past {TIME_LIMIT:?}"))
        .unwrap_or_else(|e| panic!("running {}: {e}", exe.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "schemathesis found failures ({}):\n{stdout}\n{stderr}",
        output.status
    );
    // It ran every operation (not, say, none after a schema error).
    assert!(
        stdout.contains("Tested: 10"),
        "schemathesis tested fewer operations than the 10 described:\n{stdout}"
    );
    eprintln!(
        "schemathesis: no failure in {:.1} s\n{stdout}",
        started.elapsed().as_secs_f64()
    );
}
