//! Load generator for Ingest: N connections × M concurrent requests each,
//! for a fixed count, then prints throughput and latency percentiles.
//!
//! cargo run --release --example ingest_load -- http://127.0.0.1:3000 20000 4 16
//! (url, total requests, connections, concurrent requests per connection)
//!
//! `ingest_load --body FILE` writes one gRPC-framed IngestRequest to FILE,
//! for h2load (see BENCHMARKS.md).
use std::time::{Duration, Instant};

use bucket::proto::bucket::v1 as pb;
use bucket::proto::bucket::v1::bucket_service_client::BucketServiceClient;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let body = match args.get(1).map(String::as_str) {
        Some("--body") => Some(prost::Message::encode_to_vec(&pb::IngestRequest {
            packet: Some(packet(0, 0)),
        })),
        Some("--batch-body") => {
            let n: usize = args.get(3).map_or(Ok(100), |s| s.parse())?;
            let packets = (0..n).map(|i| packet(0, i)).collect();
            Some(prost::Message::encode_to_vec(&pb::IngestBatchRequest {
                packets,
            }))
        }
        _ => None,
    };
    if let Some(message) = body {
        let mut framed = vec![0u8];
        framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
        framed.extend_from_slice(&message);
        std::fs::write(
            args.get(2).expect("--body FILE / --batch-body FILE N"),
            framed,
        )?;
        return Ok(());
    }
    let url = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "http://127.0.0.1:3000".into());
    let total: usize = args.get(2).map_or(Ok(20_000), |s| s.parse())?;
    let connections: usize = args.get(3).map_or(Ok(4), |s| s.parse())?;
    let per_conn: usize = args.get(4).map_or(Ok(16), |s| s.parse())?;
    let workers = connections * per_conn;

    let mut clients = Vec::new();
    for _ in 0..connections {
        clients.push(BucketServiceClient::connect(url.clone()).await?);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let mut client = clients[w % connections].clone();
        let n = total / workers + usize::from(w < total % workers);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(n);
            for i in 0..n {
                let t = Instant::now();
                client
                    .ingest(pb::IngestRequest {
                        packet: Some(packet(w, i)),
                    })
                    .await?;
                latencies.push(t.elapsed());
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies: Vec<Duration> = Vec::with_capacity(total);
    for task in tasks {
        latencies.extend(task.await??);
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "{total} ingests in {:.2} s over {connections} connections x {per_conn} streams: {:.0} req/s; latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        ms(pct(0.50)),
        ms(pct(0.99)),
        ms(*latencies.last().unwrap()),
    );
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn packet(worker: usize, i: usize) -> pb::PacketInput {
    let now = chrono::Utc::now();
    pb::PacketInput {
        user_id: format!("load_{worker}"),
        session_id: format!("s{worker}"),
        system_type: pb::SystemType::Gurukul as i32,
        role: pb::Role::Student as i32,
        timestamp: Some(prost_types::Timestamp {
            seconds: now.timestamp(),
            nanos: 0,
        }),
        cognitive_state: "ON_TASK".into(),
        active_seconds: 4.5,
        idle_seconds: 0.3,
        away_seconds: 0.2,
        focus_score: Some((i % 100) as f64),
        raw_signals: Some(bucket::proto::json_to_struct(
            serde_json::json!({"dwell_time_ms": 1200, "mouse_velocity": 0.5, "i": i})
                .as_object()
                .unwrap(),
        )),
        ..Default::default()
    }
}
