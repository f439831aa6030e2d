//! NATS JetStream with the bucket's workload: stream PRANA on
//! prana.packets (file storage), publishers awaiting the PubAck, one durable
//! pull consumer "karma" with explicit acks (`--marks stream`: ack-all)
//! shared by S pulling tasks.
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow};
use async_nats::jetstream::{self, consumer, context::ContextBuilder, stream};
use futures::StreamExt;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::consumers::{ConsumerSpec, Consumers, Marks};
use crate::packet;
use crate::tracker::Tracker;

pub const STREAM: &str = "PRANA";
pub const SUBJECT: &str = "prana.packets";
pub const CONSUMER: &str = "karma";

/// Printed with every NATS result: the two are not equally durable.
pub const DURABILITY_NOTE: &str = "Debian's nats-server 2.9 does not fsync each message (it syncs \
     the stream files every 2 minutes by default), while the bucket's acknowledged packets are \
     fsync'd (SQLite synchronous=FULL, PostgreSQL synchronous_commit=on)";
pub const BATCH_ACK_NOTE: &str =
    "NATS has no batch ack: --marks batch acks every message on its own, like --marks unary";
pub const ACK_ALL_NOTE: &str = "NATS --marks stream: the consumer's ack policy is All, and each \
     puller acks the newest message it took whenever more piled up behind it; one ack covers \
     every earlier message of the consumer, other pullers' included (weaker than one outcome per \
     packet: an ack may cover a message another puller has not finished)";

/// How long a publish or double ack waits for the server: an open loop far
/// past saturation keeps acks waiting for seconds, and the default 5 s would
/// turn slowness into errors.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);

async fn connect(url: &str) -> Result<async_nats::Client> {
    async_nats::connect(url)
        .await
        .with_context(|| format!("connecting to NATS at {url}"))
}

fn context(client: async_nats::Client) -> jetstream::Context {
    ContextBuilder::new()
        .timeout(ACK_TIMEOUT)
        // The open loop caps outstanding publishes itself (--max-outstanding);
        // the client's own cap (5,000) would otherwise turn into errors.
        .max_ack_inflight(1 << 16)
        .backpressure_on_inflight(true)
        .build(client)
}

/// A fresh stream PRANA: deleted first, so a reused server (--nats-url) starts
/// empty too. Retries while JetStream is still starting.
pub async fn create_stream(url: &str) -> Result<()> {
    let js = context(connect(url).await?);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let _ = js.delete_stream(STREAM).await;
        let created = js
            .create_stream(stream::Config {
                name: STREAM.into(),
                subjects: vec![SUBJECT.into()],
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await;
        match created {
            Ok(_) => return Ok(()),
            // JetStream answers only once it has started: try again.
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(anyhow!("creating stream {STREAM}: {e}")),
        }
    }
}

pub async fn delete_stream(url: &str) -> Result<()> {
    let js = context(connect(url).await?);
    js.delete_stream(STREAM)
        .await
        .map_err(|e| anyhow!("deleting stream {STREAM}: {e}"))?;
    Ok(())
}

/// The durable pull consumer; max_ack_pending = streams × max_in_flight, the
/// same bound the bucket's streams have, and ack_wait = the lease.
pub async fn create_consumer(url: &str, spec: ConsumerSpec) -> Result<()> {
    let js = context(connect(url).await?);
    let stream = js
        .get_stream(STREAM)
        .await
        .map_err(|e| anyhow!("stream {STREAM}: {e}"))?;
    stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(CONSUMER.into()),
            // Stream marks: NATS's nearest to a batch of acks on the stream.
            ack_policy: if spec.marks == Marks::Stream {
                consumer::AckPolicy::All
            } else {
                consumer::AckPolicy::Explicit
            },
            ack_wait: Duration::from_secs(u64::from(spec.lease_seconds)),
            max_ack_pending: (spec.streams as i64) * i64::from(spec.max_in_flight),
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow!("creating consumer {CONSUMER}: {e}"))?;
    Ok(())
}

/// One connection per publisher lane.
pub async fn publishers(url: &str, connections: usize) -> Result<Vec<jetstream::Context>> {
    let mut out = Vec::new();
    for _ in 0..connections.max(1) {
        out.push(context(connect(url).await?));
    }
    Ok(out)
}

/// Messages in the stream (the ingest-only modes' stored check).
pub async fn stream_messages(url: &str) -> Result<u64> {
    let js = context(connect(url).await?);
    let mut stream = js
        .get_stream(STREAM)
        .await
        .map_err(|e| anyhow!("stream {STREAM}: {e}"))?;
    let info = stream
        .info()
        .await
        .map_err(|e| anyhow!("stream info: {e}"))?;
    Ok(info.state.messages)
}

/// The consumer as the server sees it: (not yet delivered, delivered and not
/// acked). Both are 0 once everything was taken and acked.
pub async fn consumer_pending(url: &str) -> Result<(u64, usize)> {
    let js = context(connect(url).await?);
    let mut c: consumer::PullConsumer = js
        .get_consumer_from_stream(CONSUMER, STREAM)
        .await
        .map_err(|e| anyhow!("consumer {CONSUMER}: {e}"))?;
    let info = c.info().await.map_err(|e| anyhow!("consumer info: {e}"))?;
    Ok((info.num_pending, info.num_ack_pending))
}

/// S tasks pulling from "karma", each on its own connection, fetching up to
/// max_in_flight messages per pull request and acking every message.
pub async fn start_consumers(
    url: &str,
    spec: ConsumerSpec,
    tracker: Arc<Tracker>,
) -> Result<Consumers> {
    let mut consumers = Consumers::default();
    for _ in 0..spec.streams {
        let js = context(connect(url).await?);
        let pull: consumer::PullConsumer = js
            .get_consumer_from_stream(CONSUMER, STREAM)
            .await
            .map_err(|e| anyhow!("consumer {CONSUMER}: {e}"))?;
        let ack_all = (spec.marks == Marks::Stream).then(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            consumers.push(tokio::spawn(ack_all_marker(rx, tracker.clone())));
            tx
        });
        consumers.push(tokio::spawn(pull_loop(
            pull,
            spec,
            tracker.clone(),
            ack_all,
        )));
    }
    Ok(consumers)
}

/// A processed message on its way to the puller's ack-all task.
type Processed = (Uuid, jetstream::Message);

async fn pull_loop(
    pull: consumer::PullConsumer,
    spec: ConsumerSpec,
    tracker: Arc<Tracker>,
    ack_all: Option<mpsc::UnboundedSender<Processed>>,
) {
    loop {
        let mut messages = match pull
            .stream()
            .max_messages_per_batch(spec.max_in_flight as usize)
            .messages()
            .await
        {
            Ok(m) => m,
            Err(e) => {
                tracker.stream_failed(|| format!("NATS pull: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        while let Some(next) = messages.next().await {
            let msg = match next {
                Ok(m) => m,
                Err(e) => {
                    // Missed heartbeats and the like: the stream goes on.
                    tracker.stream_failed(|| format!("NATS message: {e}"));
                    continue;
                }
            };
            let at = Instant::now();
            let Some(id) = packet::id_from_json(&msg.payload) else {
                tracker.mark_failed(1, || "NATS message without a packet_id".into());
                continue;
            };
            let attempt = msg.info().map(|i| i.delivered.max(1) as u64).unwrap_or(1);
            tracker.delivered(id, attempt, at);
            match (spec.marks, &ack_all) {
                (Marks::Stream, Some(tx)) => {
                    let _ = tx.send((id, msg));
                }
                // Awaits the server's confirmation of the ack, like an
                // awaited MarkProcessed.
                (Marks::Sequential, _) => match msg.double_ack().await {
                    Ok(()) => tracker.marked(id),
                    Err(e) => tracker.mark_failed(1, || format!("NATS double ack: {e}")),
                },
                // A plain ack is a fire-and-forget publish: "marked" once it
                // is handed to the connection. The end check also asks the
                // server for num_ack_pending.
                _ => {
                    let tracker = tracker.clone();
                    tokio::spawn(async move {
                        match msg.ack().await {
                            Ok(()) => tracker.marked(id),
                            Err(e) => tracker.mark_failed(1, || format!("NATS ack: {e}")),
                        }
                    });
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `--marks stream` on NATS: waits for one processed message, takes every
/// one waiting behind it, and acks the newest, which under ack policy All
/// acks every earlier message of the consumer. No timer: under light load
/// an ack covers one message, under heavy load many.
async fn ack_all_marker(mut processed: mpsc::UnboundedReceiver<Processed>, tracker: Arc<Tracker>) {
    while let Some((id, mut newest)) = processed.recv().await {
        let mut ids = vec![id];
        while let Ok((id, msg)) = processed.try_recv() {
            ids.push(id);
            newest = msg;
        }
        match newest.ack().await {
            Ok(()) => ids.into_iter().for_each(|id| tracker.marked(id)),
            Err(e) => tracker.mark_failed(ids.len() as u64, || format!("NATS ack: {e}")),
        }
    }
}
