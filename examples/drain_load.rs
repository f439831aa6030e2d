//! Delivery benchmark: S streams drain the backlog (StreamPending +
//! MarkProcessed for each packet) until it is empty, then print the rate.
//!
//! cargo run --release --example drain_load -- http://127.0.0.1:3000 4 64
//! (url, streams, max_in_flight per stream)
use std::time::{Duration, Instant};

use bucket::proto::bucket::v1 as pb;
use bucket::proto::bucket::v1::bucket_service_client::BucketServiceClient;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let url = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "http://127.0.0.1:3000".into());
    let streams: usize = args.get(2).map_or(Ok(4), |s| s.parse())?;
    let in_flight: u32 = args.get(3).map_or(Ok(64), |s| s.parse())?;

    let mut probe = BucketServiceClient::connect(url.clone()).await?;
    let backlog = probe
        .status(pb::StatusRequest {})
        .await?
        .into_inner()
        .pending_packets;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..streams {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = BucketServiceClient::connect(url).await?;
            let mut stream = client
                .stream_pending(pb::StreamPendingRequest {
                    consumer: format!("drain-{s}"),
                    max_in_flight: in_flight,
                    lease_seconds: 60,
                })
                .await?
                .into_inner();
            let mut done = 0u64;
            loop {
                // The backlog is drained when nothing arrives for a second.
                let next =
                    match tokio::time::timeout(Duration::from_secs(1), stream.message()).await {
                        Err(_) => break,
                        Ok(result) => result?,
                    };
                let Some(delivery) = next else { break };
                let packet_id = delivery.packet.map(|p| p.packet_id).unwrap_or_default();
                client
                    .mark_processed(pb::MarkProcessedRequest {
                        packet_id,
                        success: true,
                        ..Default::default()
                    })
                    .await?;
                done += 1;
            }
            anyhow::Ok(done)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    let elapsed = started.elapsed().saturating_sub(Duration::from_secs(1));
    println!(
        "{total} of {backlog} pending packets delivered and marked in {:.2} s by {streams} streams (max_in_flight {in_flight}): {:.0} packets/s",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );
    Ok(())
}
