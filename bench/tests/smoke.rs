//! Smoke test of bucket-bench: every mode for about a second against servers
//! it starts itself (SQLite mostly; PostgreSQL, Redis and NATS once each).
//! It checks that each mode runs and that nothing acknowledged was lost,
//! never how fast: figures on a shared 2-core box are not assertions.
//!
//! The bucket binary is taken from the same target directory as this
//! package's binary, so build the workspace first (tests/run.sh does:
//! `cargo build --workspace --bins --examples`).
use std::path::{Path, PathBuf};
use std::process::Command;

fn bench() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_bucket-bench"))
}

/// `<target dir>/<profile>/bucket`, next to the bench binary.
fn server_bin() -> PathBuf {
    let bin = bench()
        .parent()
        .expect("the bench binary is in a directory")
        .join("bucket");
    assert!(
        bin.is_file(),
        "{} is missing: build the workspace first (cargo build --workspace --bins)",
        bin.display()
    );
    bin
}

/// Short runs, and a generous end-check wait: tests share the machine.
const QUICK: &[&str] = &["--duration", "1", "--warmup", "0", "--drain-timeout", "60"];

/// Runs a measured mode against a server it starts; returns stdout.
fn run(mode: &[&str]) -> String {
    let mut cmd = Command::new(bench());
    cmd.args(mode)
        .args(QUICK)
        .arg("--server-bin")
        .arg(server_bin());
    // tests/run.sh says where PostgreSQL and Redis are (it may have had to
    // give postgres a password).
    if let Ok(url) = std::env::var("BUCKET_TEST_POSTGRES_URL") {
        cmd.args(["--pg-admin", &url]);
    }
    if let Ok(url) = std::env::var("BUCKET_TEST_REDIS_URL") {
        cmd.args(["--redis-url", &url]);
    }
    finish(cmd, mode)
}

fn finish(mut cmd: Command, what: &[&str]) -> String {
    let out = cmd.output().expect("bucket-bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bucket-bench {what:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    stdout
}

/// The end check ran and found every acknowledged packet delivered.
fn assert_none_lost(stdout: &str) {
    assert!(
        stdout.lines().any(|l| l == "undelivered: 0"),
        "no 'undelivered: 0' line:\n{stdout}"
    );
    assert!(
        stdout.contains("acknowledged ") && !stdout.contains("acknowledged 0,"),
        "nothing was acknowledged:\n{stdout}"
    );
}

#[test]
fn ingest_closed_loop() {
    assert_none_lost(&run(&[
        "ingest",
        "--concurrency",
        "8",
        "--check",
        "deliver",
    ]));
}

#[test]
fn ingest_open_loop() {
    assert_none_lost(&run(&["ingest", "--rate", "300", "--check", "deliver"]));
}

#[test]
fn batch() {
    let out = run(&[
        "batch",
        "--batch-size",
        "20",
        "--concurrency",
        "2",
        "--check",
        "deliver",
    ]);
    assert_none_lost(&out);
}

#[test]
fn rest() {
    assert_none_lost(&run(&["rest", "--concurrency", "4", "--check", "deliver"]));
}

#[test]
fn e2e_unary_marks() {
    assert_none_lost(&run(&["e2e", "--rate", "200", "--marks", "unary"]));
}

#[test]
fn e2e_sequential_marks() {
    assert_none_lost(&run(&["e2e", "--rate", "200", "--marks", "sequential"]));
}

#[test]
fn e2e_batch_marks() {
    assert_none_lost(&run(&["e2e", "--rate", "200", "--marks", "batch"]));
}

#[test]
fn e2e_postgres() {
    assert_none_lost(&run(&["e2e", "--target", "postgres", "--rate", "200"]));
}

#[test]
fn e2e_redis() {
    assert_none_lost(&run(&["e2e", "--target", "redis", "--rate", "200"]));
}

#[test]
fn e2e_nats() {
    let out = run(&["e2e", "--target", "nats", "--rate", "200"]);
    assert_none_lost(&out);
    assert!(out.contains("does not fsync"), "no durability note:\n{out}");
}

#[test]
fn drain() {
    let mut cmd = Command::new(bench());
    cmd.args(["drain", "--backlog", "500", "--drain-timeout", "60"])
        .arg("--server-bin")
        .arg(server_bin());
    assert_none_lost(&finish(cmd, &["drain"]));
}

#[test]
fn scale() {
    let mut cmd = Command::new(bench());
    cmd.args([
        "scale",
        "--packets",
        "3000",
        "--processed",
        "0.5",
        "--samples",
        "50",
    ])
    .arg("--server-bin")
    .arg(server_bin());
    let out = finish(cmd, &["scale"]);
    assert!(
        out.contains("stored: 3000 total, 1500 pending, 1500 processed"),
        "{out}"
    );
    for line in [
        "Status (gRPC)",
        "/metrics",
        "UserPackets",
        "server RSS",
        "database",
    ] {
        assert!(
            out.contains(line),
            "no {line} line:
{out}"
        );
    }
}

const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

#[test]
fn plot_from_csv() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("runs.csv");
    // Only the columns the plot reads; it finds them by name.
    std::fs::write(
        &csv,
        "mode,target,offered_rate,streams,in_flight,marks,window_s,e2e_p99_ms,saturated,machine_cores\n\
         e2e,sqlite,1000,4,64,unary,5.000,8.5,false,2\n\
         e2e,sqlite,5000,4,64,unary,5.000,90.1,false,2\n\
         e2e,nats,1000,4,64,unary,5.000,4.3,false,2\n\
         e2e,nats,5000,4,64,unary,5.000,2500.0,true,2\n\
         ingest,sqlite,,,,,10.000,,false,2\n",
    )
    .unwrap();
    let png = dir.path().join("runs.png");
    let mut cmd = Command::new(bench());
    cmd.arg("plot")
        .arg("--csv")
        .arg(&csv)
        .arg("--out")
        .arg(&png);
    finish(cmd, &["plot"]);
    let bytes = std::fs::read(&png).expect("the PNG was written");
    assert!(bytes.starts_with(PNG_SIGNATURE), "not a PNG");
}

#[test]
fn sweep_writes_rows_and_a_plot() {
    let dir = tempfile::tempdir().unwrap();
    let (csv, png) = (dir.path().join("sweep.csv"), dir.path().join("sweep.png"));
    let mut cmd = Command::new(bench());
    cmd.args(["sweep", "--targets", "sqlite", "--rates", "100,200"])
        .args(QUICK)
        .arg("--server-bin")
        .arg(server_bin())
        .arg("--csv")
        .arg(&csv)
        .arg("--png")
        .arg(&png);
    let out = finish(cmd, &["sweep"]);
    assert_eq!(out.matches("undelivered: 0").count(), 2, "{out}");
    let rows = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(rows.lines().count(), 3, "header and two rows:\n{rows}");
    assert!(std::fs::read(&png).unwrap().starts_with(PNG_SIGNATURE));
}
