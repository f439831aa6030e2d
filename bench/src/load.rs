//! The offered load: the doors a packet can go in by (unary Ingest,
//! IngestBatch, the REST gateway, a JetStream publish) and the two ways of
//! driving them: closed loop (N requests outstanding) and open loop (a fixed
//! rate, each send its own task, latency from the scheduled time).
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use bucket::proto::bucket::v1 as pb;
use pb::bucket_service_client::BucketServiceClient;
use tonic::transport::{Channel, Endpoint};

use crate::packet::PacketRef;
use crate::tracker::Tracker;
use crate::users::UserSpread;

/// One HTTP/2 connection to the bucket.
pub async fn grpc_client(url: &str) -> Result<BucketServiceClient<Channel>> {
    let channel = Endpoint::from_shared(url.to_owned())?
        // A mark or an ingest must not wait for a delayed ACK (see BENCHMARKS.md).
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))?;
    Ok(BucketServiceClient::new(channel))
}

/// Where packets go in.
pub enum Door {
    /// Unary Ingest, requests spread over these connections.
    Grpc(Vec<BucketServiceClient<Channel>>),
    /// IngestBatch.
    Batch(Vec<BucketServiceClient<Channel>>),
    /// POST /api/v1/bucket/prana/ingest; reqwest keeps one HTTP/1.1
    /// keep-alive connection per outstanding request.
    Rest {
        client: reqwest::Client,
        url: String,
    },
    /// JetStream publish on one of these connections, awaiting the PubAck.
    Nats(Vec<async_nats::jetstream::Context>),
}

impl Door {
    pub async fn grpc(url: &str, connections: usize, batch: bool) -> Result<Self> {
        let mut clients = Vec::new();
        for _ in 0..connections.max(1) {
            clients.push(grpc_client(url).await?);
        }
        Ok(if batch {
            Door::Batch(clients)
        } else {
            Door::Grpc(clients)
        })
    }

    pub fn rest(base_url: &str) -> Result<Self> {
        let client = reqwest::Client::builder()
            .http1_only()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(usize::MAX)
            .timeout(Duration::from_secs(60))
            .build()?;
        Ok(Door::Rest {
            client,
            url: format!(
                "{}/api/v1/bucket/prana/ingest",
                base_url.trim_end_matches('/')
            ),
        })
    }

    /// Sends `packets` in one request and tells the tracker which were
    /// acknowledged. Only a request that failed as a whole is an Err.
    pub async fn send(&self, lane: usize, packets: &[PacketRef], tracker: &Tracker) -> Result<()> {
        match self {
            Door::Grpc(clients) => {
                let [p] = packets else {
                    bail!("unary ingest takes one packet")
                };
                let mut client = clients[lane % clients.len()].clone();
                let resp = client
                    .ingest(pb::IngestRequest {
                        packet: Some(p.proto()),
                    })
                    .await?
                    .into_inner();
                let at = Instant::now();
                if resp.packet_id != p.id.to_string() {
                    bail!("ingest answered packet_id {} for {}", resp.packet_id, p.id);
                }
                tracker.acked(p.id, at);
            }
            Door::Batch(clients) => {
                let mut client = clients[lane % clients.len()].clone();
                let resp = client
                    .ingest_batch(pb::IngestBatchRequest {
                        packets: packets.iter().map(PacketRef::proto).collect(),
                    })
                    .await?
                    .into_inner();
                let at = Instant::now();
                let mut answered = vec![false; packets.len()];
                for result in resp.results {
                    let Some(p) = packets.get(result.index as usize) else {
                        continue;
                    };
                    answered[result.index as usize] = true;
                    match result.outcome {
                        Some(pb::ingest_batch_result::Outcome::Ingested(r))
                            if r.packet_id == p.id.to_string() =>
                        {
                            tracker.acked(p.id, at);
                        }
                        other => tracker.ingest_failed(1, || format!("batch item: {other:?}")),
                    }
                }
                let missing = answered.iter().filter(|a| !**a).count() as u64;
                if missing > 0 {
                    tracker.ingest_failed(missing, || "IngestBatch items not answered".into());
                }
            }
            Door::Rest { client, url } => {
                let [p] = packets else {
                    bail!("REST ingest takes one packet")
                };
                let resp = client
                    .post(url)
                    .header("content-type", "application/json")
                    .body(p.json_bytes())
                    .send()
                    .await?;
                let status = resp.status();
                let body: serde_json::Value = resp.json().await?;
                let at = Instant::now();
                if !status.is_success() || body["status"] != "ingested" {
                    bail!("REST ingest answered {status}: {body}");
                }
                tracker.acked(p.id, at);
            }
            Door::Nats(contexts) => {
                let [p] = packets else {
                    bail!("a JetStream publish takes one packet")
                };
                let js = &contexts[lane % contexts.len()];
                // The first await queues the message; the second is the PubAck:
                // the stream stored it.
                js.publish(crate::nats::SUBJECT, p.json_bytes().into())
                    .await?
                    .await?;
                tracker.acked(p.id, Instant::now());
            }
        }
        Ok(())
    }

    /// Sends, with the tracker's bookkeeping around it: outstanding count and
    /// the whole request's failure.
    async fn send_tracked(&self, lane: usize, packets: &[PacketRef], tracker: &Tracker) {
        tracker.counters.outstanding.fetch_add(1, Relaxed);
        if let Err(e) = self.send(lane, packets, tracker).await {
            tracker.ingest_failed(packets.len() as u64, || format!("ingest: {e:#}"));
        }
        tracker.counters.outstanding.fetch_sub(1, Relaxed);
    }
}

/// When the measured window opens and closes; sends before `t0` warm up.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub start: Instant,
    pub t0: Instant,
    pub t1: Instant,
}

impl Window {
    pub fn new(warmup: f64, duration: f64) -> Self {
        // A little slack, so the first sends do not start late.
        let start = Instant::now() + Duration::from_millis(20);
        let t0 = start + Duration::from_secs_f64(warmup);
        Self {
            start,
            t0,
            t1: t0 + Duration::from_secs_f64(duration),
        }
    }

    pub fn measures(&self, at: Instant) -> bool {
        at >= self.t0 && at < self.t1
    }
}

/// Closed loop: `workers` tasks, each with one request outstanding at a time
/// (worker w on connection w % C), until the window closes. Latency is from
/// each send.
pub async fn closed_loop(
    door: Arc<Door>,
    tracker: Arc<Tracker>,
    workers: usize,
    per_request: usize,
    users: UserSpread,
    window: Window,
) {
    let seq = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..workers.max(1) {
        let (door, tracker, seq) = (door.clone(), tracker.clone(), seq.clone());
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(window.start.into()).await;
            loop {
                let now = Instant::now();
                if now >= window.t1 {
                    break;
                }
                let packets: Vec<PacketRef> = (0..per_request)
                    .map(|_| PacketRef::new(seq.fetch_add(1, Relaxed), users))
                    .collect();
                for p in &packets {
                    tracker.register(p.id, now, window.measures(now));
                }
                door.send_tracked(w, &packets, &tracker).await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// Loads `total` packets as fast as `workers` requests outstanding allow, not
/// measured (the drain mode's backlog).
pub async fn backlog(
    door: Arc<Door>,
    tracker: Arc<Tracker>,
    total: u64,
    per_request: usize,
    workers: usize,
    users: UserSpread,
) {
    let seq = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..workers.max(1) {
        let (door, tracker, seq) = (door.clone(), tracker.clone(), seq.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let first = seq.fetch_add(per_request as u64, Relaxed);
                if first >= total {
                    break;
                }
                let packets: Vec<PacketRef> = (first..(first + per_request as u64).min(total))
                    .map(|seq| PacketRef::new(seq, users))
                    .collect();
                let now = Instant::now();
                for p in &packets {
                    tracker.register(p.id, now, false);
                }
                door.send_tracked(w, &packets, &tracker).await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// Open loop: one packet every 1/rate s from `window.start` until the window
/// closes, each send its own task, so a slow answer never delays the next
/// send (no coordinated omission: latency counts from the scheduled time).
/// At most `max_outstanding` requests wait at once; sends beyond that are
/// counted as not offered.
pub async fn open_loop(
    door: Arc<Door>,
    tracker: Arc<Tracker>,
    rate: f64,
    max_outstanding: u64,
    lanes: usize,
    users: UserSpread,
    window: Window,
) {
    let mut i: u64 = 0;
    tokio::time::sleep_until(window.start.into()).await;
    loop {
        // The timer wakes at best every millisecond; send everything that
        // fell due since, each with its own scheduled time.
        let due = ((Instant::now() - window.start).as_secs_f64() * rate) as u64 + 1;
        while i < due {
            let scheduled = window.start + Duration::from_secs_f64(i as f64 / rate);
            if scheduled >= window.t1 {
                return;
            }
            let measured = window.measures(scheduled);
            if tracker.counters.outstanding.load(Relaxed) >= max_outstanding {
                if measured {
                    tracker.counters.offered.fetch_add(1, Relaxed);
                    tracker.counters.unoffered.fetch_add(1, Relaxed);
                }
            } else {
                let p = PacketRef::new(i, users);
                tracker.register(p.id, scheduled, measured);
                // Counted here, not in the task, so the cap holds even before
                // the tasks get to run.
                tracker.counters.outstanding.fetch_add(1, Relaxed);
                let (door, tracker) = (door.clone(), tracker.clone());
                let lane = (i as usize) % lanes.max(1);
                tokio::spawn(async move {
                    if let Err(e) = door.send(lane, &[p], &tracker).await {
                        tracker.ingest_failed(1, || format!("ingest: {e:#}"));
                    }
                    tracker.counters.outstanding.fetch_sub(1, Relaxed);
                });
            }
            i += 1;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
