//! The bucket's consumers: S StreamPending subscribers, each on its own
//! connection, taking every packet and marking it one of three ways (the
//! fourth, marks on a Consume stream, is consume_stream.rs).
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Result;
use bucket::proto::bucket::v1 as pb;
use clap::ValueEnum;
use pb::bucket_service_client::BucketServiceClient;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tonic::Streaming;
use tonic::transport::Channel;
use uuid::Uuid;

use crate::load::grpc_client;
use crate::tracker::Tracker;

/// How a consumer marks what it receives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Marks {
    /// One MarkProcessed per delivery, spawned at once (marks run concurrently).
    Unary,
    /// One MarkProcessed per delivery, awaited before reading the next
    /// (examples/karma_consumer.rs).
    Sequential,
    /// Per stream a marker sending MarkProcessedBatch of whatever waits (up
    /// to 500), at most 2 batches outstanding.
    Batch,
    /// Consume streams instead of StreamPending: each mark goes on the
    /// request side of the stream its delivery came on, as many per request
    /// as piled up while the last was on its way (bucket-client's Acker).
    /// NATS: ack policy All, one ack for whatever each puller has taken.
    Stream,
}

impl Marks {
    pub fn name(self) -> &'static str {
        match self {
            Marks::Unary => "unary",
            Marks::Sequential => "sequential",
            Marks::Batch => "batch",
            Marks::Stream => "stream",
        }
    }
}

/// The server's MarkProcessedBatch limit (BUCKET_MAX_BATCH default).
const MARK_BATCH_MAX: usize = 500;
/// Batches one stream's marker may have outstanding: while one is on the
/// wire the next fills up, and a third would only split batches smaller.
const MARK_BATCHES_OUTSTANDING: usize = 2;

#[derive(Clone, Copy, Debug)]
pub struct ConsumerSpec {
    pub streams: usize,
    pub max_in_flight: u32,
    pub marks: Marks,
    pub lease_seconds: u32,
}

impl ConsumerSpec {
    pub fn describe(&self) -> String {
        format!(
            "{} streams × {} in flight, {} marks",
            self.streams,
            self.max_in_flight,
            self.marks.name()
        )
    }
}

/// The running consumer tasks; stopping (or dropping) ends them, which ends
/// their streams, so the server releases whatever they still hold.
#[derive(Default)]
pub struct Consumers {
    tasks: Vec<JoinHandle<()>>,
}

impl Consumers {
    pub fn push(&mut self, task: JoinHandle<()>) {
        self.tasks.push(task);
    }

    pub async fn stop(mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
            let _ = t.await;
        }
    }
}

impl Drop for Consumers {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Subscribes `spec.streams` consumers to the bucket at `url`. Returns once
/// every stream is open, so the load does not start before its consumers.
pub async fn start_bucket(
    url: &str,
    spec: ConsumerSpec,
    tracker: Arc<Tracker>,
) -> Result<Consumers> {
    if spec.marks == Marks::Stream {
        return crate::consume_stream::start(url, spec, tracker).await;
    }
    let mut consumers = Consumers::default();
    for s in 0..spec.streams {
        let name = format!("bench-{s}");
        let mut client = grpc_client(url).await?;
        let first = subscribe(&mut client, &name, spec).await?;
        let marker = if spec.marks == Marks::Batch {
            let (tx, rx) = mpsc::unbounded_channel();
            consumers.push(tokio::spawn(batch_marker(
                client.clone(),
                rx,
                tracker.clone(),
            )));
            Some(tx)
        } else {
            None
        };
        consumers.push(tokio::spawn(run_stream(
            client,
            first,
            name,
            spec,
            tracker.clone(),
            marker,
        )));
    }
    Ok(consumers)
}

async fn subscribe(
    client: &mut BucketServiceClient<Channel>,
    name: &str,
    spec: ConsumerSpec,
) -> Result<Streaming<pb::StreamPendingResponse>, tonic::Status> {
    Ok(client
        .stream_pending(pb::StreamPendingRequest {
            consumer: name.to_owned(),
            max_in_flight: spec.max_in_flight,
            lease_seconds: spec.lease_seconds,
        })
        .await?
        .into_inner())
}

/// One stream: read deliveries, mark them; if the stream breaks, count it and
/// subscribe again (its unmarked packets come back as redeliveries).
async fn run_stream(
    mut client: BucketServiceClient<Channel>,
    first: Streaming<pb::StreamPendingResponse>,
    name: String,
    spec: ConsumerSpec,
    tracker: Arc<Tracker>,
    marker: Option<mpsc::UnboundedSender<Uuid>>,
) {
    let mut next = Some(first);
    loop {
        let mut stream = match next.take() {
            Some(s) => s,
            None => match subscribe(&mut client, &name, spec).await {
                Ok(s) => s,
                Err(e) => {
                    tracker.stream_failed(|| format!("StreamPending: {e}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        loop {
            let delivery = match stream.message().await {
                Ok(Some(d)) => d,
                Ok(None) => {
                    tracker.stream_failed(|| "StreamPending ended".into());
                    break;
                }
                Err(e) => {
                    tracker.stream_failed(|| format!("StreamPending: {e}"));
                    break;
                }
            };
            let at = Instant::now();
            let packet_id = delivery.packet.map(|p| p.packet_id).unwrap_or_default();
            let Ok(id) = Uuid::parse_str(&packet_id) else {
                tracker.mark_failed(1, || format!("delivery with packet_id {packet_id:?}"));
                continue;
            };
            tracker.delivered(id, u64::from(delivery.delivery_attempt), at);
            match (spec.marks, &marker) {
                (Marks::Batch, Some(tx)) => {
                    let _ = tx.send(id);
                }
                (Marks::Sequential, _) => mark(client.clone(), id, &tracker).await,
                _ => {
                    let (client, tracker) = (client.clone(), tracker.clone());
                    tokio::spawn(async move { mark(client, id, &tracker).await });
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The karma action examples/karma_consumer.rs records for ON_TASK, so a mark
/// stores what a real one would.
fn karma_action_json() -> serde_json::Map<String, serde_json::Value> {
    let serde_json::Value::Object(map) = serde_json::json!(
        {"action": "completing_lessons", "reward": 5, "token": "DharmaPoints"}
    ) else {
        unreachable!("an object")
    };
    map
}

/// [`karma_action_json`] in the server crate's messages (unary marks).
pub fn karma_action() -> &'static bucket::proto::JsonStruct {
    static A: OnceLock<bucket::proto::JsonStruct> = OnceLock::new();
    A.get_or_init(|| bucket::proto::json_to_struct(&karma_action_json()))
}

/// [`karma_action_json`] in bucket-client's messages (Consume streams).
pub fn karma_action_struct() -> &'static prost_types::Struct {
    static A: OnceLock<prost_types::Struct> = OnceLock::new();
    A.get_or_init(|| bucket_client::json_to_struct(&karma_action_json()))
}

fn mark_request(id: Uuid) -> pb::MarkProcessedRequest {
    pb::MarkProcessedRequest {
        packet_id: id.to_string(),
        success: true,
        karma_actions: vec![karma_action().clone()],
        error_message: String::new(),
    }
}

async fn mark(mut client: BucketServiceClient<Channel>, id: Uuid, tracker: &Tracker) {
    match client.mark_processed(mark_request(id)).await {
        Ok(r) if r.get_ref().status == "ok" => tracker.marked(id),
        Ok(r) => tracker.mark_failed(1, || format!("MarkProcessed answered {:?}", r.get_ref())),
        Err(e) => tracker.mark_failed(1, || format!("MarkProcessed: {e}")),
    }
}

/// Waits for at least one id, takes every id waiting (up to 500), sends one
/// MarkProcessedBatch; no timers, so under light load a batch is one id and
/// under heavy load batches grow by themselves.
async fn batch_marker(
    client: BucketServiceClient<Channel>,
    mut ids: mpsc::UnboundedReceiver<Uuid>,
    tracker: Arc<Tracker>,
) {
    let permits = Arc::new(Semaphore::new(MARK_BATCHES_OUTSTANDING));
    loop {
        // The permit first: while both batches are out, ids pile up for the
        // next one instead of being sent in small pieces.
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let Some(first) = ids.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MARK_BATCH_MAX {
            match ids.try_recv() {
                Ok(id) => batch.push(id),
                Err(_) => break,
            }
        }
        let (mut client, tracker) = (client.clone(), tracker.clone());
        tokio::spawn(async move {
            mark_batch(&mut client, &batch, &tracker).await;
            drop(permit);
        });
    }
}

async fn mark_batch(client: &mut BucketServiceClient<Channel>, batch: &[Uuid], tracker: &Tracker) {
    let request = pb::MarkProcessedBatchRequest {
        marks: batch.iter().map(|id| mark_request(*id)).collect(),
    };
    let resp = match client.mark_processed_batch(request).await {
        Ok(r) => r.into_inner(),
        Err(e) => {
            tracker.mark_failed(batch.len() as u64, || format!("MarkProcessedBatch: {e}"));
            return;
        }
    };
    // Every item is answered on its own: check each, and that none is missing.
    let mut answered = vec![false; batch.len()];
    for result in resp.results {
        let Some(&id) = batch.get(result.index as usize) else {
            continue;
        };
        answered[result.index as usize] = true;
        match result.outcome {
            Some(pb::mark_processed_batch_result::Outcome::Marked(r)) if r.status == "ok" => {
                tracker.marked(id);
            }
            other => tracker.mark_failed(1, || format!("MarkProcessedBatch item: {other:?}")),
        }
    }
    let missing = answered.iter().filter(|a| !**a).count() as u64;
    if missing > 0 {
        tracker.mark_failed(missing, || "MarkProcessedBatch items not answered".into());
    }
}
