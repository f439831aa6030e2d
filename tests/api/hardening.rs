//! Hardening, second pass: what an attacker or a careless setting could do
//! to a node (memory, connections, settings that open doors), each probe
//! as a test. Memory is read from the kernel (VmHWM, the peak resident
//! size) of a bucket started as a child process, never from timing.
use std::process::Command;

use crate::helpers::{Backend, TestApp};

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
