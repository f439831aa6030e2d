//! `scale`: what the bucket costs with a lot stored. Loads N packets
//! (IngestBatch, all pending, over --users users), optionally marks a share of
//! them processed, then measures with everything in place: Status (gRPC
//! and REST), `/metrics`, UserPackets (a random user's newest page), the
//! server's RSS, and the database's size. The calls are sequential, one
//! at a time, so the latencies are the server's and not a queue's.
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use bucket::proto::bucket::v1 as pb;
use hdrhistogram::Histogram;

use crate::load::grpc_client;
use crate::packet::PacketRef;
use crate::proc_stats::{vm_hwm_mib, vm_rss_mib};
use crate::report::Percentiles;
use crate::server::Server;
use crate::users::UserSpread;

pub struct ScalePlan {
    pub packets: u64,
    pub batch_size: usize,
    pub outstanding: usize,
    /// Share of the loaded packets marked processed (by id, in batches).
    pub processed: f64,
    pub samples: usize,
    pub users: UserSpread,
}

pub async fn scale(server: &Server, plan: &ScalePlan) -> Result<()> {
    println!("scale: {}", server.description);
    let started = Instant::now();
    let ids = load(server, plan).await?;
    let load_s = started.elapsed().as_secs_f64();
    println!(
        "loaded {} packets in {load_s:.1} s ({:.0}/s, IngestBatch of {}, {} outstanding)",
        plan.packets,
        plan.packets as f64 / load_s,
        plan.batch_size,
        plan.outstanding
    );
    if !ids.is_empty() {
        let started = Instant::now();
        mark(server, &ids).await?;
        println!(
            "marked {} processed in {:.1} s",
            ids.len(),
            started.elapsed().as_secs_f64()
        );
    }
    // Let commits, checkpoints and the queue's refill settle.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut client = grpc_client(&server.url).await?;
    let status = client.status(pb::StatusRequest {}).await?.into_inner();
    println!(
        "stored: {} total, {} pending, {} processed",
        status.total_packets, status.pending_packets, status.processed_packets
    );
    if status.total_packets < plan.packets {
        bail!(
            "the bucket holds {} of {} packets",
            status.total_packets,
            plan.packets
        );
    }
    let http = reqwest::Client::new();
    let rest_status = format!("{}/api/v1/bucket/prana/status", server.url);
    let metrics = format!("{}/metrics", server.url);
    let n = plan.samples;
    let grpc_status = timed(n, |_| {
        let mut c = client.clone();
        async move {
            c.status(pb::StatusRequest {})
                .await
                .map(|_| ())
                .map_err(Into::into)
        }
    })
    .await?;
    let rest = timed(n, |_| get(&http, &rest_status)).await?;
    let prom = timed(n, |_| get(&http, &metrics)).await?;
    let users = timed(n, |i| {
        let mut c = client.clone();
        // The user of a loaded packet (so the page is not empty), picked in
        // an order unlike the load's.
        let user = plan.users.user_id((i as u64 * 7919) % plan.packets.max(1));
        async move {
            let page = c
                .user_packets(pb::UserPacketsRequest {
                    user_id: user,
                    limit: 50,
                    ..Default::default()
                })
                .await?
                .into_inner();
            if page.packets.is_empty() {
                bail!("an empty page");
            }
            Ok(())
        }
    })
    .await?;
    for (name, h) in [
        ("Status (gRPC)", &grpc_status),
        ("status (REST)", &rest),
        ("/metrics", &prom),
        ("UserPackets (50 newest)", &users),
    ] {
        let p = Percentiles::of(h).expect("samples");
        println!(
            "{name:<26} p50 {:>7.3} ms  p99 {:>7.3} ms  max {:>7.3} ms  ({n} calls)",
            p.p50 as f64 / 1000.0,
            p.p99 as f64 / 1000.0,
            p.max as f64 / 1000.0
        );
    }
    if let Some(pid) = server.pid {
        println!(
            "server RSS now {:.1} MiB, peak {:.1} MiB",
            vm_rss_mib(pid).unwrap_or(0.0),
            vm_hwm_mib(pid).unwrap_or(0.0)
        );
    }
    if let Some(bytes) = server.database_bytes().await {
        println!(
            "database {:.1} MiB ({:.0} bytes per packet)",
            bytes as f64 / 1048576.0,
            bytes as f64 / plan.packets as f64
        );
    }
    Ok(())
}

async fn get(http: &reqwest::Client, url: &str) -> Result<()> {
    let response = http.get(url).send().await?;
    if !response.status().is_success() {
        bail!("{url}: {}", response.status());
    }
    response.bytes().await?;
    Ok(())
}

/// `n` calls one after another, after 20 unmeasured ones; microseconds.
async fn timed<F, Fut>(n: usize, call: F) -> Result<Histogram<u64>>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    for i in 0..20 {
        call(i).await?;
    }
    let mut h = Histogram::<u64>::new(3)?;
    for i in 0..n {
        let t = Instant::now();
        call(i).await?;
        h.record(t.elapsed().as_micros() as u64)?;
    }
    Ok(h)
}

/// Loads the packets; returns the ids to mark processed.
async fn load(server: &Server, plan: &ScalePlan) -> Result<Vec<String>> {
    let next = Arc::new(AtomicU64::new(0));
    let to_mark = (plan.packets as f64 * plan.processed.clamp(0.0, 1.0)) as u64;
    let mut lanes = Vec::new();
    for _ in 0..plan.outstanding {
        let mut client = grpc_client(&server.url).await?;
        let next = next.clone();
        let (total, batch, users) = (plan.packets, plan.batch_size as u64, plan.users);
        lanes.push(tokio::spawn(async move {
            let mut marked = Vec::new();
            loop {
                let first = next.fetch_add(batch, Relaxed);
                if first >= total {
                    return Ok::<_, anyhow::Error>(marked);
                }
                let packets: Vec<PacketRef> = (first..(first + batch).min(total))
                    .map(|seq| PacketRef::new(seq, users))
                    .collect();
                let answer = client
                    .ingest_batch(pb::IngestBatchRequest {
                        packets: packets.iter().map(PacketRef::proto).collect(),
                    })
                    .await?
                    .into_inner();
                if answer.rejected > 0 {
                    bail!("{} packets rejected", answer.rejected);
                }
                marked.extend(
                    packets
                        .iter()
                        .filter(|p| p.seq < to_mark)
                        .map(|p| p.id.to_string()),
                );
                if first % 1_000_000 < batch {
                    eprintln!("  … {first} loaded");
                }
            }
        }));
    }
    let mut ids = Vec::new();
    for lane in lanes {
        ids.extend(lane.await??);
    }
    Ok(ids)
}

/// Marks the ids processed, 500 per MarkProcessedBatch, 4 outstanding.
async fn mark(server: &Server, ids: &[String]) -> Result<()> {
    let chunks: Vec<Vec<String>> = ids.chunks(500).map(<[String]>::to_vec).collect();
    let next = Arc::new(AtomicU64::new(0));
    let chunks = Arc::new(chunks);
    let mut lanes = Vec::new();
    for _ in 0..4 {
        let mut client = grpc_client(&server.url).await?;
        let (next, chunks) = (next.clone(), chunks.clone());
        lanes.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Relaxed) as usize;
                let Some(chunk) = chunks.get(i) else {
                    return Ok::<_, anyhow::Error>(());
                };
                let marks = chunk
                    .iter()
                    .map(|id| pb::MarkProcessedRequest {
                        packet_id: id.clone(),
                        success: true,
                        ..Default::default()
                    })
                    .collect();
                client
                    .mark_processed_batch(pb::MarkProcessedBatchRequest { marks })
                    .await?;
            }
        }));
    }
    for lane in lanes {
        lane.await??;
    }
    Ok(())
}
