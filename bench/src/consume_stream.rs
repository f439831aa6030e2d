//! `--marks stream` against the bucket: S Consume streams (the bidirectional
//! RPC), each on its own connection, taking every delivery and sending its
//! mark on the request side of the same stream through bucket-client's
//! [`Acker`], which puts as many marks in one request as piled up while the
//! previous request was on its way.
//!
//! Answers come back in request order, each with one result per mark of its
//! request, and the Acker sends marks in the order they were given: so the
//! ids of marks not yet answered, kept in the order sent, are matched to
//! the results front to back.
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use bucket_client::{Acker, Client, Consumer, Received, pb};
use uuid::Uuid;

use crate::consumers::{ConsumerSpec, Consumers, karma_action_struct};
use crate::tracker::Tracker;

/// Opens `spec.streams` Consume streams on the bucket at `url`; returns once
/// every one is subscribed, so the load does not start before them.
pub async fn start(url: &str, spec: ConsumerSpec, tracker: Arc<Tracker>) -> Result<Consumers> {
    let mut consumers = Consumers::default();
    for s in 0..spec.streams {
        let name = format!("bench-{s}");
        let mut client = bucket_client::connect(url, None)
            .await
            .with_context(|| format!("connecting to {url}"))?;
        let first = open(&mut client, &name, spec)
            .await
            .context("opening a Consume stream")?;
        consumers.push(tokio::spawn(run_stream(
            client,
            first,
            name,
            spec,
            tracker.clone(),
        )));
    }
    Ok(consumers)
}

async fn open(
    client: &mut Client,
    name: &str,
    spec: ConsumerSpec,
) -> Result<(Consumer, Acker), tonic::Status> {
    bucket_client::consume(
        client,
        pb::ConsumeSettings {
            consumer: name.to_owned(),
            max_in_flight: spec.max_in_flight,
            lease_seconds: spec.lease_seconds,
        },
    )
    .await
}

/// One stream: serve it; if it breaks, count it and open it again (its
/// unmarked packets come back as redeliveries).
async fn run_stream(
    mut client: Client,
    first: (Consumer, Acker),
    name: String,
    spec: ConsumerSpec,
    tracker: Arc<Tracker>,
) {
    let mut next = Some(first);
    loop {
        let (consumer, acker) = match next.take() {
            Some(opened) => opened,
            None => match open(&mut client, &name, spec).await {
                Ok(opened) => opened,
                Err(e) => {
                    tracker.stream_failed(|| format!("Consume: {e}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        match serve(consumer, acker, &tracker).await {
            Ok(()) => tracker.stream_failed(|| "Consume ended".into()),
            Err(e) => tracker.stream_failed(|| format!("Consume: {e}")),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Takes deliveries and marks them until the stream ends.
async fn serve(mut consumer: Consumer, acker: Acker, tracker: &Tracker) -> Result<(), String> {
    // The ids of marks sent and not yet answered, in the order sent.
    let mut unanswered: VecDeque<Uuid> = VecDeque::new();
    while let Some(received) = consumer.next().await.map_err(|e| e.to_string())? {
        match received {
            Received::Delivery(delivery) => {
                let at = Instant::now();
                let packet_id = delivery
                    .packet
                    .as_ref()
                    .map(|p| p.packet_id.clone())
                    .unwrap_or_default();
                let Ok(id) = Uuid::parse_str(&packet_id) else {
                    tracker.mark_failed(1, || format!("delivery with packet_id {packet_id:?}"));
                    continue;
                };
                tracker.delivered(id, u64::from(delivery.delivery_attempt), at);
                unanswered.push_back(id);
                acker
                    .mark(pb::ConsumeMark {
                        lease_token: delivery.lease_token,
                        success: true,
                        karma_actions: vec![karma_action_struct().clone()],
                        error_message: String::new(),
                    })
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Received::Answer(answer) => {
                let n = answer.marks.len().min(unanswered.len());
                let ids: Vec<Uuid> = unanswered.drain(..n).collect();
                settle(&ids, &answer, tracker);
            }
        }
    }
    Ok(())
}

/// Every mark of an answer must be recorded: each result is checked, and
/// none may be missing.
fn settle(ids: &[Uuid], answer: &pb::ConsumeAnswer, tracker: &Tracker) {
    let mut answered = vec![false; ids.len()];
    for result in &answer.marks {
        let Some(&id) = ids.get(result.index as usize) else {
            tracker.mark_failed(1, || format!("Consume answered mark {}", result.index));
            continue;
        };
        answered[result.index as usize] = true;
        match &result.outcome {
            Some(pb::consume_result::Outcome::Marked(r)) if r.status == "ok" => {
                tracker.marked(id);
            }
            other => tracker.mark_failed(1, || format!("Consume mark: {other:?}")),
        }
    }
    let missing = answered.iter().filter(|a| !**a).count() as u64;
    if missing > 0 {
        tracker.mark_failed(missing, || "Consume marks not answered".into());
    }
}
