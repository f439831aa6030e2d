//! A real browser: examples/browser's page, in headless Chromium, ingests
//! over gRPC-web from another origin, with an ingest token (so CORS must let
//! `authorization` through); the packets must be in the database.
use std::path::Path;
use std::time::Duration;

use bucket::proto::bucket::v1 as pb;
use serde_json::Value;

use crate::helpers::{Backend, TestApp, TestDb, test_config, user_packets};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prana_page_in_chromium_ingests_over_grpc_web() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/browser");
    assert!(
        dir.join("dist/app.js").exists() && dir.join("node_modules/playwright-core").exists(),
        "the page is not built: run `bash tests/run.sh` (it installs chromium and node, then builds it)"
    );
    let db = TestDb::new(Backend::Sqlite).await;
    let mut config = test_config(&db);
    config.auth.ingest_tokens = vec!["prana-browser-token".into()];
    let app = TestApp::spawn_with(db, config).await;
    let run = tokio::process::Command::new("node")
        .arg("run.mjs")
        .arg(app.url())
        .arg("browser_user")
        .arg("5")
        .arg("prana-browser-token")
        .current_dir(&dir)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(90), run)
        .await
        .expect("browser run within 90 s")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "run.mjs failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();

    let ingested: Vec<String> = result["ingested"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ingested.len(), 5);
    assert_eq!(result["batchIngested"], 2);
    assert_eq!(
        result["invalidCode"], 3,
        "INVALID_ARGUMENT reaches the page: {result}"
    );
    assert!(
        result["invalidMessage"]
            .as_str()
            .unwrap()
            .contains("focus_score")
    );

    let mut client = app.client().await;
    let stored = user_packets(&mut client, "browser_user").await;
    assert_eq!(
        stored.len(),
        7,
        "5 single + 2 batch, nothing of the invalid one"
    );
    for id in &ingested {
        let p = stored.iter().find(|p| &p.packet_id == id).expect("stored");
        assert_eq!(p.session_id, "browser-session");
        assert_eq!(p.system_type, pb::SystemType::Gurukul as i32);
        assert!((p.active_seconds + p.idle_seconds + p.away_seconds - 5.0).abs() < 1e-9);
        assert_eq!(p.raw_signals.clone().unwrap().0["source"], "browser");
    }
    assert_eq!(app.db.status_counts().await.get("pending"), Some(&7));
}
