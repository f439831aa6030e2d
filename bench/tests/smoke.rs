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

/// A report line with this label (labels start the line).
fn assert_has_line(stdout: &str, label: &str) {
    assert!(
        stdout.lines().any(|l| l.starts_with(label)),
        "no '{label}' line:\n{stdout}"
    );
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
fn e2e_stream_marks() {
    assert_none_lost(&run(&["e2e", "--rate", "200", "--marks", "stream"]));
}

#[test]
fn e2e_stream_marks_redis() {
    assert_none_lost(&run(&[
        "e2e", "--target", "redis", "--rate", "200", "--marks", "stream",
    ]));
}

#[test]
fn e2e_stream_marks_nats() {
    let out = run(&[
        "e2e", "--target", "nats", "--rate", "200", "--marks", "stream",
    ]);
    assert_none_lost(&out);
    assert!(out.contains("ack policy is All"), "no ack-all note:\n{out}");
    assert!(
        out.contains("consumer karma: 0 pending, 0 awaiting ack"),
        "the server still holds acks:\n{out}"
    );
}

#[test]
fn e2e_sustained_stream_marks() {
    let out = run(&["e2e", "--outstanding", "32", "--marks", "stream"]);
    assert_none_lost(&out);
    assert!(out.contains("sustained: "), "no sustained line:\n{out}");
}

#[test]
fn drain_stream_marks() {
    let mut cmd = Command::new(bench());
    cmd.args(["drain", "--backlog", "500", "--marks", "stream"])
        .args(["--drain-timeout", "60"])
        .arg("--server-bin")
        .arg(server_bin());
    assert_none_lost(&finish(cmd, &["drain", "--marks", "stream"]));
}

#[test]
fn e2e_postgres() {
    let out = run(&["e2e", "--target", "postgres", "--rate", "200"]);
    assert_none_lost(&out);
    for line in [
        "server writes",
        "store CPU",
        "PostgreSQL writes",
        "PostgreSQL WAL",
    ] {
        assert_has_line(&out, line);
    }
}

#[test]
fn e2e_redis() {
    let out = run(&["e2e", "--target", "redis", "--rate", "200"]);
    assert_none_lost(&out);
    assert!(
        out.contains("Redis "),
        "no Redis CPU in the store line:\n{out}"
    );
}

#[test]
fn e2e_nats() {
    let out = run(&["e2e", "--target", "nats", "--rate", "200"]);
    assert_none_lost(&out);
    assert!(out.contains("does not fsync"), "no durability note:\n{out}");
    // nats-server's own writes, as the bucket's.
    assert_has_line(&out, "server writes");
}

/// The figures every e2e report carries: the server's writes per packet
/// and the per-second p99's summary.
#[test]
fn e2e_reports_writes_and_the_worst_second() {
    let out = run(&["e2e", "--rate", "200"]);
    assert_none_lost(&out);
    assert_has_line(&out, "server writes");
    assert_has_line(&out, "p99 by second");
    assert!(out.contains("socket writes"), "no syscw note:\n{out}");
    assert!(
        out.contains("10000 users"),
        "not the default spread:\n{out}"
    );
}

#[test]
fn e2e_users_and_series_file() {
    let dir = tempfile::tempdir().unwrap();
    let series = dir.path().join("series.csv");
    let mut cmd = Command::new(bench());
    cmd.args(["e2e", "--rate", "200", "--users", "7", "--duration", "2"])
        .args(["--warmup", "0", "--drain-timeout", "60"])
        .arg("--server-bin")
        .arg(server_bin())
        .arg("--series")
        .arg(&series);
    let out = finish(cmd, &["e2e", "--series"]);
    assert_none_lost(&out);
    assert!(out.contains(" 7 users"), "{out}");
    let text = std::fs::read_to_string(&series).expect("the series was written");
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("second,acked,ack_p99_ms,delivered,e2e_p50_ms,e2e_p90_ms,e2e_p99_ms,e2e_max_ms")
    );
    // One row per measured second, numbered from 0.
    let seconds: Vec<&str> = lines.map(|l| l.split(',').next().unwrap()).collect();
    assert_eq!(seconds, ["0", "1"], "{text}");
}

#[test]
fn e2e_sustained_closed_loop() {
    let out = run(&["e2e", "--outstanding", "16", "--connections", "2"]);
    assert_none_lost(&out);
    assert!(
        out.lines().any(|l| l.starts_with("sustained: ")),
        "no sustained line:\n{out}"
    );
}

#[test]
fn e2e_sustained_nats() {
    let out = run(&["e2e", "--target", "nats", "--outstanding", "16"]);
    assert_none_lost(&out);
    assert!(out.contains("sustained: "), "no sustained line:\n{out}");
}

#[test]
fn rate_and_outstanding_exclude_each_other() {
    let out = Command::new(bench())
        .args(["e2e", "--rate", "100", "--outstanding", "8"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// Rows under an older header would be read as the wrong figures: the tool
/// refuses before it starts anything.
#[test]
fn csv_with_other_columns_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("old.csv");
    std::fs::write(&csv, "mode,target,offered_rate\ne2e,sqlite,1000\n").unwrap();
    let mut cmd = Command::new(bench());
    cmd.args(["e2e", "--rate", "100"])
        .args(QUICK)
        .arg("--server-bin")
        .arg(server_bin())
        .arg("--csv")
        .arg(&csv);
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("other columns"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(&csv).unwrap(),
        "mode,target,offered_rate\ne2e,sqlite,1000\n"
    );
}

#[test]
fn drain() {
    let mut cmd = Command::new(bench());
    cmd.args([
        "drain",
        "--backlog",
        "500",
        "--users",
        "100",
        "--drain-timeout",
        "60",
    ])
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
    // Every row has the header's columns, the new ones included.
    let header: Vec<&str> = rows.lines().next().unwrap().split(',').collect();
    for col in ["users", "write_bytes_per_packet", "worst_second_e2e_p99_ms"] {
        assert!(header.contains(&col), "no column {col}: {header:?}");
    }
    for row in rows.lines().skip(1) {
        assert_eq!(row.split(',').count(), header.len(), "{row}");
    }
    assert!(std::fs::read(&png).unwrap().starts_with(PNG_SIGNATURE));
}
